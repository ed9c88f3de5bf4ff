#!/bin/bash
# Session 25 lease 2: this tree's per-slot counters under the "critical" assignment, and under "mixed" with every
# SWIGLU task placed by the cost model's expected start (XUP=all XDOWN=all: the latency-task rule of
# `_assign_levels`; an experiment switch of this tree's schedule.py).
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
run . s25c_slot_critical --checks none --assign critical
XUP=all XDOWN=all run . s25d_slot_listmoe --checks none
python3 _gpu/summary.py s25c_slot_critical s25d_slot_listmoe
