#!/bin/bash
# Session 25 lease 7 (this commit): the persistent kernel's GPU tests -- MTP D = 3 greedy through the kernel (T = 1
# and T = 4 launches) equal to plain greedy, and the FP8 experts' step against XLA on the dequantized model.
set -u
GLM_FAST_TEST_PLATFORMS=cuda timeout 330 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_kernel.py \
  -k mtp_greedy_is_lossless > $OUT/s25_gpu_test_mtp.log 2>&1
echo "mtp rc=$?"; tail -3 $OUT/s25_gpu_test_mtp.log
GLM_FAST_TEST_PLATFORMS=cuda timeout 240 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_fp8.py \
  > $OUT/s25_gpu_test_fp8.log 2>&1
echo "fp8 rc=$?"; tail -3 $OUT/s25_gpu_test_fp8.log
