"""Where a jitted step's time goes on the device: a `jax.profiler` trace of a few steps, reduced to the kernels
the GPU ran per step, the time it was busy and the idle gaps between kernels.

Why: a decode step's wall time (`bench_decode.py`'s ms_per_step) is the sum of its kernels' device time plus the
gaps between them (launches, host waits). The persistent kernel's own profiler (pallas_kernels/persistent/profile
.py) sees only the inside of its one launch; this sees the whole step, every backend alike.

    path = capture(lambda: step(...), steps=5, directory=tmp)   # perfetto trace (Chrome trace JSON, gzip)
    summary = breakdown(path, steps=5)                        # per-step microseconds, kernels by total time

The trace's device tracks are its processes named "/device:..." (the GPU's). Kernel events are taken from their
stream tracks ("Stream #..." threads: what the GPU ran) -- the derived "XLA Ops" / "XLA Modules" tracks repeat
the same time and are ignored. On a host without an accelerator the trace has no device track and the summary
says so (`device_tracks` empty, zero busy time).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os

import jax


def capture(fn, steps: int, directory: str) -> str:
    """Runs fn() `steps` times under `jax.profiler.trace` (each result waited for) -> the perfetto trace path."""
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn())
    paths = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "perfetto_trace.json.gz")),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"jax.profiler.trace wrote no perfetto_trace.json.gz under {directory}")
    return paths[-1]


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def breakdown(path: str, steps: int, top: int = 25) -> dict:
    """The trace at `path` (`capture`'s) as per-step figures, in microseconds:

    span_us: first kernel start to last kernel end, over the device's stream tracks; busy_us: the union of the
    kernels' intervals; idle_us: span - busy (gaps between kernels: launches, host waits, syncs); kernels: the
    `top` kernel names by total time (calls and us per step, and the share of busy time); device_tracks: the
    stream tracks found (name -> busy us per step)."""
    if steps < 1:
        raise ValueError(f"breakdown: steps must be >= 1, got {steps}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    streams = {k for k, name in threads.items() if k[0] in device and name.startswith("Stream")}
    per_track = collections.defaultdict(list)
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") != "X" or key not in streams:
            continue
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        per_track[key].append((start, start + dur))
        stats = kernels[e.get("name", "?")]
        stats[0] += 1
        stats[1] += dur
    spans = [s for v in per_track.values() for s in v]
    busy = _union_us(spans) / steps
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) / steps if spans else 0.0
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    return {
        "steps": steps,
        "span_us": span,
        "busy_us": busy,
        "idle_us": span - busy,
        "kernel_calls": sum(n for n, _ in kernels.values()) / steps,
        "kernels": [{"name": name[:160], "calls": n / steps, "us": us / steps,
                     "share_of_busy": (us / steps) / busy if busy else 0.0} for name, (n, us) in ranked[:top]],
        "device_tracks": {f"{procs[k[0]]} {threads[k]}": _union_us(v) / steps for k, v in per_track.items()},
    }
