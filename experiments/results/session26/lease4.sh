#!/bin/bash
# Session 26 lease 4, in the session's last ~4 minutes of device time: one run of this tree (de88b00 + the two
# prepared variants: INDEX_SCORE's q staging from the 4 warps, UV's merge weights as one register vector), every
# task of layers 0-1 checked against the simulator. Its kernel time is compared across leases only.
set -u
timeout 225 python3 experiments/bench_persistent.py --variants full --timeout 215 --reps 10 --trace-launches 3 \
  --stamps --task-stamps --ptxas --checks tasks --out $OUT --name s26d_q_lse > $OUT/s26d_q_lse.log 2>&1
echo "rc=$?"
python3 _gpu/summary.py s26d_q_lse
