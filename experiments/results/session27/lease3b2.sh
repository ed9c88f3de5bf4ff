#!/bin/bash
# Session 27 lease 3, call b: this tree, UV's first W_uv tiles before its dependency wait alone (the INDEX_TOPK
# warp-issued candidate rows of call a reverted), beside call a's base in the same lease; every task of layers 0-1
# checked against the simulator.
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 290 python3 experiments/bench_persistent.py --variants full --timeout 280 --reps 10 "$@" \
     --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
stamps="--trace-launches 3 --stamps --task-stamps --ptxas"

run . s27g_uv_prefetch $stamps --checks tasks
OUT=$OUT python3 _gpu/summary.py s27d_base s27g_uv_prefetch
