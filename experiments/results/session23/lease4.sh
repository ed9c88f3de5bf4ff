#!/bin/bash
# Session 23 lease 4: the stamps without a thread-0 branch (every thread stores): base with --stamps, and with
# --task-stamps; each with the compiler's report.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
run() {  # name flags...
  local n=$1; shift
  timeout 190 python3 experiments/bench_persistent.py --variants full --timeout 185 \
     --checks none --reps 10 --trace-launches 3 --stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?" >> $OUT/rc.txt
}
run s23b_base
run s23b_base_ts --task-stamps
cat $OUT/rc.txt; ls -la $OUT
