#!/bin/bash
# Session 25 lease 3: this tree's per-slot counters ("mixed") again, beside XMERGE=1 (an experiment switch of this
# tree's schedule.py): a MoE layer's router, shared and routed SWIGLU tiles ordered and balanced as one dependency
# level (shared expert first), so that the SMs that stream a shared up tile take fewer routed tiles.
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
run . s25e_slot --checks none
XMERGE=1 run . s25e_slot_merge --checks none
python3 _gpu/summary.py s25e_slot s25e_slot_merge
