"""Prints each named result's kernel time, critical path and checks (from $OUT)."""
import json, os, sys
o = os.environ["OUT"]
for n in sys.argv[1:]:
    try:
        row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    except Exception as e:
        print(n, "no result", e); continue
    paths = row.get("stamped_critical_paths") or [{}]
    print(n, "kernel_us", row.get("device_trace", {}).get("kernels", [{}])[0].get("us"), "median_ms", row.get("median_ms"),
          "error", row.get("error"), "check", {k: v for k, v in (row.get("check") or {}).items() if k != "tasks"})
    for p in paths:
        print("   path", p.get("length_ns"), p.get("ops_ns"), p.get("per_layer_ns"))
