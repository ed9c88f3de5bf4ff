#!/bin/bash
# Session 27 lease 1, call a (commit 0af4f4a): the persistent kernel's GPU tests -- MTP D = 3 greedy through the
# kernel (T = 1 and T = 4 launches) equal to plain greedy, and the FP8 experts' step against XLA on the
# dequantized model -- on the tree with session 26's UV merge weights, INDEX_SCORE q staging and LSE padding.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu_lease1.txt
GLM_FAST_TEST_PLATFORMS=cuda timeout 400 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_kernel.py \
  -k mtp_greedy_is_lossless > $OUT/s27_gpu_test_mtp.log 2>&1
echo "mtp rc=$?"; tail -n 3 $OUT/s27_gpu_test_mtp.log
GLM_FAST_TEST_PLATFORMS=cuda timeout 185 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_fp8.py \
  > $OUT/s27_gpu_test_fp8.log 2>&1
echo "fp8 rc=$?"; tail -n 3 $OUT/s27_gpu_test_fp8.log
