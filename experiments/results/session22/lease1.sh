#!/bin/bash
# Session 22 lease 1: base (HEAD), P (select exchange + paused), D (select exchange), each with task stamps.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
mk() { rm -rf $1 && mkdir $1 && cp -r glm_fast pallas_kernels configs setup.py $1/ && mkdir $1/experiments && cp experiments/*.py $1/experiments/; }
for v in base P D; do
  mk _v$v
  if [ $v != base ]; then (cd _v$v && patch -p1 -s < ../experiments/variants/session21/variant_${v}_*.diff) || echo "patch $v failed"; fi
  (cd _v$v && timeout 185 python3 experiments/bench_persistent.py --variants full --timeout 185 --checks none --reps 10 \
     --trace-launches 3 --stamps --task-stamps --out $OUT --name s22_$v) > $OUT/s22_$v.log 2>&1
  echo "$v rc=$?" >> $OUT/rc.txt
done
cat $OUT/rc.txt
