"""Prints each named result's per-op profile (mean us per task, the phases' us per task) for a few ops."""
import json, os, sys
o = os.environ["OUT"]
for n in sys.argv[1:]:
    row = json.load(open(f"{o}/{n}.json"))["rows"][0]
    prof = row.get("profile") or {}
    mhz = prof.get("sm_clock_mhz") or 1835.0
    print(n, "median_ms_profiled", row.get("median_ms_profiled"), "clock", mhz)
    for op, d in (prof.get("ops") or {}).items():
        cnt = d["count"]
        per = lambda cy: round(cy / cnt / mhz, 2)
        print(f"  {op:16s} n={cnt:4d} mean_us={per(d['cycles'])} wait_us={per(d['wait_cycles'])}",
              {k: per(v) for k, v in d.get("parts_cycles", {}).items()})
    cp = row.get("critical_path") or {}
    print("  path", cp.get("length_ns"), cp.get("ops_ns"))
