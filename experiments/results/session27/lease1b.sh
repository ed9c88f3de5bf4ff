#!/bin/bash
# Session 27 lease 1, call b (commit 0af4f4a): the protocol benchmark (session 26's command).
set -u
timeout 420 python3 experiments/bench_decode.py --config glm5_slice --backends persistent,persistent:fp8,xla,pallas \
  --contexts 4096 --steps 30 --warmup 3 --trace-steps 3 --out $OUT --name s27_bench_decode > $OUT/s27_bench_decode.log 2>&1
echo "rc=$?"; tail -n 8 $OUT/s27_bench_decode.log
