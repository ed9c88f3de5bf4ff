#!/bin/bash
# Session 27 lease 2, call b (this tree): the persistent kernel's GPU tests -- MTP D = 3 greedy through the kernel
# (T = 1 and T = 4 launches: UV's units of 4 tokens through its 4-slot ring) equal to plain greedy, and the FP8
# experts' step against XLA on the dequantized model.
set -u
GLM_FAST_TEST_PLATFORMS=cuda timeout 400 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_kernel.py \
  -k mtp_greedy_is_lossless > $OUT/s27b_gpu_test_mtp.log 2>&1
echo "mtp rc=$?"; tail -n 3 $OUT/s27b_gpu_test_mtp.log
GLM_FAST_TEST_PLATFORMS=cuda timeout 185 python3 -m pytest -x -q -rs -m gpu tests/test_persistent_fp8.py \
  > $OUT/s27b_gpu_test_fp8.log 2>&1
echo "fp8 rc=$?"; tail -n 3 $OUT/s27b_gpu_test_fp8.log
