#!/bin/bash
# Session 25 lease 6 (this commit): the protocol benchmark (session 24's command): the persistent kernel, bf16 and
# FP8 experts, beside XLA and pallas, one run.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
timeout 580 python3 experiments/bench_decode.py --config glm5_slice --backends persistent,persistent:fp8,xla,pallas \
  --contexts 4096 --steps 30 --warmup 3 --trace-steps 3 --out $OUT --name s25_bench_decode > $OUT/s25_bench_decode.log 2>&1
echo "rc=$?"; tail -8 $OUT/s25_bench_decode.log
