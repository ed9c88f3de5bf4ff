#!/bin/bash
# Session 24 lease 3: gemv.mma_fp8_tiles in the component kernels first (gemv_fp8 / moe_experts_fp8 GPU tests,
# quick to compile: does the primitive run?), then, if they pass, the persistent kernel's FP8 variant.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
GLM_FAST_TEST_PLATFORMS=cuda timeout 200 python3 -m pytest -x -q -rs -m gpu tests/test_kernels_gemv_moe.py -k fp8 \
  > $OUT/s24c_component_tests.log 2>&1
rc=$?; echo "component tests rc=$rc"; tail -5 $OUT/s24c_component_tests.log
if [ $rc -eq 0 ]; then
  timeout 200 python3 experiments/bench_persistent.py --variants full --timeout 195 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas --expert-format fp8 --checks tasks --out $OUT --name s24c_fp8 > $OUT/s24c_fp8.log 2>&1
  echo "fp8 rc=$?"
  python3 - <<'PY'
import json, os
row = json.load(open(os.environ["OUT"] + "/s24c_fp8.json"))["rows"][0]
p = (row.get("stamped_critical_paths") or [{}])[0]
print(row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), (row.get("ptxas", {}).get("functions") or [{}])[0],
      p.get("length_ns"), p.get("ops_ns"), row.get("check"), row.get("error"))
PY
fi
