#!/bin/bash
# Session 27 lease 4, call a: the base kernel (commit 4df4eb4's sources = 23f58ee's, copied to _gpu/base) beside
# this tree: INDEX_TOPK's compaction scan of a row stops once the part's last output slot is written (every task of
# layers 0-1 checked against the simulator).
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 290 python3 experiments/bench_persistent.py --variants full --timeout 280 --reps 10 "$@" \
     --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
stamps="--trace-launches 3 --stamps --task-stamps --ptxas"
run _gpu/base s27h_base $stamps --checks none
run . s27h_scan_stop $stamps --checks tasks
OUT=$OUT python3 _gpu/summary.py s27h_base s27h_scan_stop
