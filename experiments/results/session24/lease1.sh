#!/bin/bash
# Session 24 lease 1: FP8 routed experts on the H200 for the first time: the full variant with the simulator's
# checks, stamps and ptxas report, beside bf16 in the same lease; then the gpu-marked FP8 step test.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
run() {  # name flags...
  local n=$1; shift
  timeout 200 python3 experiments/bench_persistent.py --variants full --timeout 195 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s24_fp8 --expert-format fp8 --checks tasks
run s24_bf16 --checks none
GLM_FAST_TEST_PLATFORMS=cuda timeout 150 python3 -m pytest -x -q -rs -s -m gpu tests/test_persistent_fp8.py > $OUT/s24_test_fp8.log 2>&1
echo "test rc=$?"; tail -5 $OUT/s24_test_fp8.log
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for n in ("s24_fp8", "s24_bf16"):
    try:
        row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    except Exception as e:
        print(n, "no json", e); continue
    p = (row.get("stamped_critical_paths") or [{}])[0]
    print(n, row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), (row.get("ptxas", {}).get("functions") or [{}])[0],
          p.get("length_ns"), p.get("ops_ns"), {k: v for k, v in row.items() if "check" in k or "err" in k})
PY
