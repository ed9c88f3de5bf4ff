#!/bin/bash
# Session 27 lease 2, call c (this tree): a profile (per-op phases), then the protocol benchmark.
set -u
timeout 230 python3 experiments/bench_persistent.py --variants full --timeout 220 --reps 10 --profile --checks none \
  --out $OUT --name s27c_uv_profile > $OUT/s27c_uv_profile.log 2>&1
echo "profile rc=$?"
OUT=$OUT python3 _gpu/phases.py s27c_uv_profile | head -20
timeout 340 python3 experiments/bench_decode.py --config glm5_slice --backends persistent,persistent:fp8,xla,pallas \
  --contexts 4096 --steps 30 --warmup 3 --trace-steps 3 --out $OUT --name s27c_bench_decode > $OUT/s27c_bench_decode.log 2>&1
echo "rc=$?"; tail -n 7 $OUT/s27c_bench_decode.log
