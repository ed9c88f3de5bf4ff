#!/bin/bash
# Session 22 lease 3: SMEM-buffered task clocks on base and D; the float32-distance GPU test.
set -u
mk() { rm -rf $1 && mkdir $1 && cp -r glm_fast pallas_kernels configs setup.py $1/ && mkdir $1/experiments && cp experiments/*.py $1/experiments/; }
mk _vD; (cd _vD && patch -p1 -s < ../experiments/variants/session21/variant_D_select_only.diff) || echo "patch D failed"
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 170 python3 experiments/bench_persistent.py --variants full --timeout 170 --checks none --reps 10 \
     --trace-launches 3 --stamps "$@" --out $OUT --name $n) > $OUT/$n.log 2>&1
  echo "$n rc=$?" >> $OUT/rc.txt
}
run . s22c_base_ts --task-stamps
(GLM_FAST_TEST_PLATFORMS=cuda timeout 215 python3 -m pytest -x -q -rs -m gpu tests/test_pallas_backend.py -k "float32 and persistent" -p no:cacheprovider) > $OUT/float32_test.log 2>&1
echo "float32 rc=$?" >> $OUT/rc.txt
run _vD s22c_D_ts --task-stamps
cat $OUT/rc.txt
