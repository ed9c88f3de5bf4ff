#!/bin/bash
# Session 24 lease 9: the FP8 variant of lease 6 with task stamps (its critical path), and with four k-tiles per
# ring step (--step-tiles 4).
set -u
run() {  # name flags...
  local n=$1; shift
  timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas --expert-format fp8 --checks none "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s24g_fp8
run s24g_fp8_st4 --step-tiles 4
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for n in ("s24g_fp8", "s24g_fp8_st4"):
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    p = (row.get("stamped_critical_paths") or [{}])[0]
    print(n, row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), (row.get("ptxas", {}).get("functions") or [{}])[0],
          p.get("length_ns"), p.get("ops_ns"), row.get("error"))
PY
