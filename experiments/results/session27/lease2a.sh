#!/bin/bash
# Session 27 lease 2, call a: the base kernel (commit 5e87408 = 0af4f4a's kernel, copied to _gpu/base) beside this
# tree's UV merge of the T token rows (every task of layers 0-1 checked against the simulator).
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 290 python3 experiments/bench_persistent.py --variants full --timeout 280 --reps 10 "$@" \
     --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
stamps="--trace-launches 3 --stamps --task-stamps --ptxas"
run _gpu/base s27a_base $stamps --checks none
run . s27a_uv $stamps --checks tasks
OUT=$OUT python3 _gpu/summary.py s27a_base s27a_uv
