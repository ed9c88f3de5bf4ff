"""Where the persistent kernel's time goes: the per-op breakdown of one launch's on-device profile.

`persistent_step(..., profile_dir=DIR)` turns on Mosaic GPU's profiler: each CTA's warpgroup records, per task,
a range named by the task's op with the dependency wait's range ("wait") nested in it, plus Mosaic's own "Init"
range, and each launch's ranges are dumped to DIR as a Chrome trace (`ProfilerSpec.dump` in
jax/experimental/mosaic/gpu/profiler.py): {"traceEvents": [{"name", "ph": "B" | "E", "ts", "pid": 1 + SM id,
"tid": the warpgroup}]}. `ts` is (globaltimer at the CTA's start in ns + SM clock cycles since its first event)
/ 1e3, so within one (pid, tid) timeline, differences of ts times 1e3 are clock cycles (not microseconds), and
timelines of different CTAs share no clock. The breakdown therefore sums cycles per timeline:

    trace_breakdown(json.load(open(path)), cycles_per_ms=1980e3)
"""
from __future__ import annotations

import numpy as np

WAIT = "wait"  # the dependency wait's range (`kernel._Seam.wait`)


def _timeline(events: list, key) -> tuple[int, list]:
    """(span, top-level ranges) of one timeline's events in recorded order: span in cycles from its first event to
    its last; each top-level range as (name, cycles, cycles in "wait" ranges: nested in it at any depth, or all of
    it for a "wait" range, {name: cycles} of its other nested ranges at any depth, e.g. a body's phases)."""
    t0 = events[0]["ts"]
    stack, top = [], []  # stack: [name, start, nested wait cycles, nested other ranges]
    for e in events:
        t = round((e["ts"] - t0) * 1e3)  # cycles since the first event
        if e["ph"] == "B":
            stack.append([e["name"], t, 0, {}])
            continue
        if not stack or stack[-1][0] != e["name"]:
            open_ = stack[-1][0] if stack else None
            raise ValueError(f"timeline {key}: end of {e['name']!r} at ts {e['ts']} while {open_!r} is open")
        name, start, wait, parts = stack.pop()
        cycles = t - start
        if name == WAIT:
            wait = cycles
        if stack:
            stack[-1][2] += wait
            for n, cy in parts.items():
                stack[-1][3][n] = stack[-1][3].get(n, 0) + cy
            if name != WAIT:
                stack[-1][3][name] = stack[-1][3].get(name, 0) + cycles
        else:
            top.append((name, cycles, wait, parts))
    if stack:
        raise ValueError(f"timeline {key}: {stack[-1][0]!r} begun and never ended")
    return round((events[-1]["ts"] - t0) * 1e3), top


def trace_breakdown(trace: dict, cycles_per_ms: float | None = None) -> dict:
    """The breakdown of one launch's trace (the dump's JSON), cycle counts summed over the (pid, tid) timelines:

    ops: per top-level range name (the ops, Mosaic's "Init", the bare "wait" of a task whose body is compiled
      out), largest first: count (ranges), cycles (inclusive), wait_cycles (in "wait" ranges nested inside; of a
      bare "wait": all of it), exclusive_cycles (cycles - wait_cycles), fraction (cycles / span_cycles),
      mean_cycles (per range), parts_cycles ({name: cycles} of the other ranges nested inside at any depth:
      the phases a body marks with `jax.named_scope`, e.g. INDEX_TOPK's "select" / "compact");
    span_cycles: the timelines' spans (first event to last) summed; max_span_cycles / median_span_cycles: over
      the timelines (one SM's time);
    outside_cycles: the spans outside every top-level range (the task table's copy and walk, the signals): the
      ops' cycles plus outside_cycles are span_cycles;
    wait_cycles: in all "wait" ranges; outside_fraction, wait_fraction: of span_cycles.

    With cycles_per_ms (the SM clock), each cycle count also in ms (`*_ms`). Raises ValueError where the ranges
    of a timeline do not nest.
    """
    timelines: dict = {}
    for e in trace["traceEvents"]:
        if e.get("ph") in ("B", "E"):
            timelines.setdefault((e["pid"], e["tid"]), []).append(e)
    spans, ops = [], {}
    for key, events in timelines.items():
        span, top = _timeline(events, key)
        spans.append(span)
        for name, cycles, wait, parts in top:
            op = ops.setdefault(name, {"count": 0, "cycles": 0, "wait_cycles": 0, "parts_cycles": {}})
            op["count"] += 1
            op["cycles"] += cycles
            op["wait_cycles"] += wait
            for n, cy in parts.items():
                op["parts_cycles"][n] = op["parts_cycles"].get(n, 0) + cy
    total = sum(spans)
    frac = (lambda c: c / total) if total else (lambda c: 0.0)
    for op in ops.values():
        op.update(exclusive_cycles=op["cycles"] - op["wait_cycles"], fraction=frac(op["cycles"]),
                  mean_cycles=op["cycles"] / op["count"])
    top_cycles = sum(op["cycles"] for op in ops.values())
    waits = sum(op["wait_cycles"] for op in ops.values())
    out = {"timelines": len(spans), "span_cycles": total,
           "max_span_cycles": max(spans, default=0), "median_span_cycles": float(np.median(spans)) if spans else 0.0,
           "outside_cycles": total - top_cycles, "outside_fraction": frac(total - top_cycles),
           "wait_cycles": waits, "wait_fraction": frac(waits),
           "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["cycles"]))}
    if cycles_per_ms:
        out["cycles_per_ms"] = cycles_per_ms
        for d in (out, *out["ops"].values()):
            for k in [k for k in d if k.endswith("cycles")]:
                v = d[k]
                d[k[:-len("cycles")] + "ms"] = ({n: c / cycles_per_ms for n, c in v.items()} if isinstance(v, dict)
                                                 else v / cycles_per_ms)
    return out
