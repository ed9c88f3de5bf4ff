#!/bin/bash
# Session 24 lease 8: the gpu-marked FP8 step test (glm5_slice, one step after a 300-token prompt, vs XLA on the
# dequantized experts). Run as one command line.
GLM_FAST_TEST_PLATFORMS=cuda timeout 420 python3 -m pytest -x -q -rs -s -m gpu tests/test_persistent_fp8.py > $OUT/s24_test_fp8.log 2>&1; echo "rc=$?"; grep -v "^W\|^I" $OUT/s24_test_fp8.log | tail -6
