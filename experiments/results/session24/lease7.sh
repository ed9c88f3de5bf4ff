#!/bin/bash
# Session 24 lease 7: the protocol benchmark (session 20's command) with the FP8 persistent kernel beside the bf16
# one, XLA and pallas, one run.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
timeout 580 python3 experiments/bench_decode.py --config glm5_slice --backends persistent,persistent:fp8,xla,pallas \
  --contexts 4096 --steps 30 --warmup 3 --trace-steps 3 --out $OUT --name s24_bench_decode > $OUT/s24_bench_decode.log 2>&1
echo "rc=$?"; tail -8 $OUT/s24_bench_decode.log
