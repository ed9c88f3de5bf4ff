#!/bin/bash
# Session 26 lease 1: a profile of this tree (main + ROUTER_SELECT's profiler phases), every phase per op.
set -u
timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --profile --checks none \
  --out $OUT --name s26a_profile > $OUT/s26a_profile.log 2>&1
echo "rc=$?"
python3 _gpu/phases.py s26a_profile
