#!/bin/bash
# Session 25 lease 8 (this commit): the MoE router GEMV's split-K parts, 8 (the default) / 4 / 2: ROUTER_SELECT sums
# the parts' logits as SMEM scalars (64 experts x P loads), the router window in which only the shared expert's
# tiles stream.
set -u
run() {  # name flags...
  local n=$1; shift
  timeout 200 python3 experiments/bench_persistent.py --variants full --timeout 195 --reps 10 --trace-launches 3 \
     --stamps --task-stamps "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s25i_router8 --checks none
run s25i_router4 --checks none --router-splits 4
run s25i_router2 --checks none --router-splits 2
python3 _gpu/summary.py s25i_router8 s25i_router4 s25i_router2
