#!/bin/bash
# Session 25 lease 5 (this commit): the single-weight streams (GEMV, bf16 SWIGLU_DOWN) through both weight rings
# as one 16-slot ring (TileConfig.solo_ring, the default) beside one 8-slot ring (--no-solo-ring); the first run
# also checks every task of layers 0-1 against the simulator.
set -u
run() {  # name flags...
  local n=$1; shift
  timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s25h_solo --checks tasks
run s25h_nosolo --checks none --no-solo-ring
python3 _gpu/summary.py s25h_solo s25h_nosolo
