#!/bin/bash
# Session 26 lease 2: the base kernel (commit fea534e, copied to _gpu/base) beside this tree's ROUTER_SELECT in
# register vectors (every task of layers 0-1 checked against the simulator), then a profile of this tree.
set -u
run() {  # dir name flags...
  local d=$1 n=$2; shift 2
  (cd $d && timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 "$@" \
     --out $OUT --name $n > $OUT/$n.log 2>&1)
  echo "$n rc=$?"
}
stamps="--trace-launches 3 --stamps --task-stamps --ptxas"
run _gpu/base s26b_base $stamps --checks none
run . s26b_router $stamps --checks tasks
run . s26c_router_profile --profile --checks none
python3 _gpu/summary.py s26b_base s26b_router
python3 _gpu/phases.py s26c_router_profile
