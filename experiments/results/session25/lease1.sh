#!/bin/bash
# Session 25 lease 1: the base kernel (commit b211754, copied to _gpu/base) beside the schedule with one counter per
# routed expert slot's up tiles (this tree, "mixed"), whose every task of layers 0-1 is checked against the simulator.
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
run _gpu/base s25a_base --checks none
run . s25b_slot --checks tasks
python3 _gpu/summary.py s25a_base s25b_slot
