#!/bin/bash
# Session 24 lease 6: FP8 experts with two 128-wide k-tiles per ring step (step_group, as bf16), beside bf16
# (leases 2-3 timed the FP8 variant out at 195 s after a 111 s lowering + compile: not a hang, lease 4's probe).
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
run() {  # name flags...
  local n=$1; shift
  timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s24f_fp8 --expert-format fp8 --checks tasks
run s24f_bf16 --checks none
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for n in ("s24f_fp8", "s24f_bf16"):
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    print(n, row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), (row.get("ptxas", {}).get("functions") or [{}])[0],
          row.get("check"), row.get("error"), row.get("stages"))
PY
