#!/bin/bash
# Session 27 lease 4, call b (this tree): MTP D = 3 greedy through the kernel (T = 1 and T = 4 launches: INDEX_TOPK
# per token) equal to plain greedy; then a profile (per-op phases).
set -u
GLM_FAST_TEST_PLATFORMS=cuda timeout 400 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_kernel.py \
  -k mtp_greedy_is_lossless > $OUT/s27i_gpu_test_mtp.log 2>&1
echo "mtp rc=$?"; tail -n 3 $OUT/s27i_gpu_test_mtp.log
timeout 190 python3 experiments/bench_persistent.py --variants full --timeout 180 --reps 10 --profile --checks none \
  --out $OUT --name s27i_profile > $OUT/s27i_profile.log 2>&1
echo "profile rc=$?"
OUT=$OUT python3 _gpu/phases.py s27i_profile | head -20
