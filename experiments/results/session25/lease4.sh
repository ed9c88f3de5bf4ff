#!/bin/bash
# Session 25 lease 4 (this commit): the T = 4 verification step's kernel checked task by task against the simulator
# (its 32 expert slots per layer now each have an up counter); then a 6-slot weight ring beside the default
# 8-slot one (is a stream bound by its bytes in flight?).
set -u
run() {  # name flags...
  local n=$1; shift
  timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
case "${1:-a}" in
  a) run s25f_t4 --tokens 4 --checks tasks
     python3 _gpu/summary.py s25f_t4 ;;
  b) run s25g_slots8 --checks none
     run s25g_slots6 --checks none --slots 6
     python3 _gpu/summary.py s25g_slots8 s25g_slots6 ;;
esac
