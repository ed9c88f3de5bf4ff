#!/bin/bash
# Session 24 lease 5: FP8 experts through gemv.mma_fp8_tiles beside bf16, same flags, a longer per-variant limit
# (leases 2-3 timed the FP8 variant out at 195 s after a 111 s lowering + compile: not a hang, lease 4's probe).
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
run() {  # name flags...
  local n=$1; shift
  timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s24e_fp8 --expert-format fp8 --checks tasks
run s24e_bf16 --checks none
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for n in ("s24e_fp8", "s24e_bf16"):
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    print(n, row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), (row.get("ptxas", {}).get("functions") or [{}])[0],
          row.get("check"), row.get("error"), row.get("stages"))
PY
