#!/bin/bash
# Session 23 lease 3: the compiler's report (ptxas -v) on the base, the base with task stamps, and D.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
mk() { rm -rf $1 && mkdir $1 && cp -r glm_fast pallas_kernels configs setup.py $1/ && mkdir $1/experiments && cp experiments/*.py $1/experiments/; }
mk _vD; (cd _vD && patch -p1 -s < ../experiments/variants/session21/variant_D_select_only.diff) || echo "patch D failed"
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 190 python3 experiments/bench_persistent.py --variants full --timeout 185 \
     --checks none --reps 10 --trace-launches 3 --stamps --ptxas "$@" --out $OUT --name $n) \
     > $OUT/$n.log 2>&1
  echo "$n rc=$?" >> $OUT/rc.txt
}
run . s23_base
run . s23_base_ts --task-stamps
run _vD s23_D
cat $OUT/rc.txt; ls -la $OUT
