#!/bin/bash
# Session 23 lease 7: variant R (ATTN emits no ring-refill code when no block refills: glm5_slice's one block
# per split): ATTN alone compiled with ptxas' report, then R and the base timed side by side.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
mk() { rm -rf $1 && mkdir $1 && cp -r glm_fast pallas_kernels configs setup.py $1/ && mkdir $1/experiments && cp experiments/*.py $1/experiments/; }
mk _base; (cd _base && patch -R -p1 -s < ../experiments/variants/session23/variant_R_attn_no_dead_refill.diff) || echo "unpatch failed"
timeout 100 python3 experiments/persistent_lowering.py --config glm5_slice --ptxas --ops ATTN,INDEX_TOPK+ATTN \
  --out $OUT --name s23d_R_lowering > $OUT/s23d_R_lowering.log 2>&1; echo "lowering rc=$?"
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 190 python3 experiments/bench_persistent.py --variants full --timeout 185 \
     --checks none --reps 10 --trace-launches 3 --stamps --task-stamps --ptxas "$@" --out $OUT --name $n) > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run . s23d_R
run _base s23d_base
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for row in json.load(open(o + "/s23d_R_lowering.json"))["rows"]:
    f = (row.get("ptxas", {}).get("functions") or [{}])[0]
    print(row["ops"][:30], f.get("registers"), f.get("spill_stores_bytes"), f.get("spill_loads_bytes"))
for n in ("s23d_R", "s23d_base"):
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    p = row["stamped_critical_paths"][0]
    print(n, row["device_trace"]["kernels"][0]["us"], row["ptxas"]["functions"][0], p["length_ns"], p["ops_ns"])
PY
