#!/bin/bash
# Session 26 lease 3, call a (commit 65bd52d): the protocol benchmark (session 25's command).
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu_lease3.txt
timeout 420 python3 experiments/bench_decode.py --config glm5_slice --backends persistent,persistent:fp8,xla,pallas \
  --contexts 4096 --steps 30 --warmup 3 --trace-steps 3 --out $OUT --name s26_bench_decode > $OUT/s26_bench_decode.log 2>&1
echo "rc=$?"; tail -n 8 $OUT/s26_bench_decode.log
