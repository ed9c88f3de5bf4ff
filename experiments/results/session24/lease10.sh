#!/bin/bash
# Session 24 lease 10: FP8 with one wgmma wait per ring step (a step's four tiles converted and issued back to
# back, `Tiles.stream(per_step=True)`), beside bf16, same flags.
set -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
run() {  # name flags...
  local n=$1; shift
  timeout 300 python3 experiments/bench_persistent.py --variants full --timeout 290 --reps 10 --trace-launches 3 \
     --stamps --task-stamps --ptxas "$@" --out $OUT --name $n > $OUT/$n.log 2>&1
  echo "$n rc=$?"
}
run s24h_fp8 --expert-format fp8 --checks tasks
run s24h_bf16 --checks none
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for n in ("s24h_fp8", "s24h_bf16"):
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    p = (row.get("stamped_critical_paths") or [{}])[0]
    tv = {k: v["err"] for k, v in (row.get("tasks_vs_simulator") or {}).items() if isinstance(v, dict) and "err" in v}
    print(n, row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), (row.get("ptxas", {}).get("functions") or [{}])[0],
          p.get("length_ns"), p.get("ops_ns"), (row.get("check") or {}).get("logits"), max(tv.values(), default=None), row.get("error"))
PY
