#!/bin/bash
# Session 27 lease 3, call a: the base kernel (commit 23f58ee, copied to _gpu/base) beside this tree: UV's first
# W_uv tiles in flight before its dependency wait, and INDEX_TOPK's candidate rows issued from the 4 warps (every
# task of layers 0-1 checked against the simulator).
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 290 python3 experiments/bench_persistent.py --variants full --timeout 280 --reps 10 "$@" \
     --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
stamps="--trace-launches 3 --stamps --task-stamps --ptxas"
run _gpu/base s27d_base $stamps --checks none
run . s27d_prefetch $stamps --checks tasks
OUT=$OUT python3 _gpu/summary.py s27d_base s27d_prefetch
