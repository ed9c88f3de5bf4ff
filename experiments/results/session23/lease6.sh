#!/bin/bash
# Session 23 lease 6: variant A (ATTN's accumulator in 4 column passes of 128, not 2 of 256): its compiler report
# (ATTN alone, the whole kernel) and its time, side by side with the base.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
mk() { rm -rf $1 && mkdir $1 && cp -r glm_fast pallas_kernels configs setup.py $1/ && mkdir $1/experiments && cp experiments/*.py $1/experiments/; }
mk _vA; (cd _vA && patch -p1 -s < ../experiments/variants/session23/variant_A_attn_acc128.diff) || echo "patch A failed"
ALL=EMBED+GEMV+KV_WRITE+IK_WRITE+INDEX_SCORE+INDEX_TOPK+ABSORB+ATTN+UV+ROUTER_SELECT+SWIGLU_UP+SWIGLU_DOWN+MOE_COMBINE
(cd _vA && timeout 150 python3 experiments/persistent_lowering.py --config glm5_slice --ptxas --ops ATTN,$ALL \
  --out $OUT --name s23c_A_lowering > $OUT/s23c_A_lowering.log 2>&1); echo "lowering rc=$?"
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 190 python3 experiments/bench_persistent.py --variants full --timeout 185 \
     --checks none --reps 10 --trace-launches 3 --stamps --task-stamps --ptxas "$@" --out $OUT --name $n) > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run _vA s23c_A
run . s23c_base
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for row in json.load(open(o + "/s23c_A_lowering.json"))["rows"]:
    f = (row.get("ptxas", {}).get("functions") or [{}])[0]
    print(row["ops"][:30], f.get("registers"), f.get("spill_stores_bytes"), f.get("spill_loads_bytes"))
for n in ("s23c_A", "s23c_base"):
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    p = row["stamped_critical_paths"][0]
    print(n, row["device_trace"]["kernels"][0]["us"], row["ptxas"]["functions"][0], p["length_ns"], p["ops_ns"])
PY
