"""Where the persistent kernel's time goes: the per-op breakdown of one launch's on-device profile.

`persistent_step(..., profile_dir=DIR)` turns on Mosaic GPU's profiler: each CTA's warpgroup records, per task, a
range named by the task's op with the dependency wait's range ("wait") and its release ("signal": the proxy fence
and the counter's +1) nested in it, plus Mosaic's own "Init" range, and each launch's ranges are dumped to DIR as a
Chrome trace (`ProfilerSpec.dump` in jax/experimental/mosaic/gpu/profiler.py): {"traceEvents": [{"name", "ph": "B" |
"E", "ts", "pid": 1 + the SM it ran on, "tid": 1 + the traced warpgroup's index in the grid (here: 1 + the CTA)}]}.
`ts` is (globaltimer at the CTA's start in ns + SM clock cycles since its first event) / 1e3, so within one (pid,
tid) timeline, differences of ts times 1e3 are clock cycles (not microseconds), and timelines of different CTAs
share no clock. The breakdown therefore sums cycles per timeline:

    trace_breakdown(json.load(open(path)), cycles_per_ms=1835e3)

at the SM clock that the launch ran at: `persistent_step(..., stamps=True)` measures it (`launch_window`); on
the H200 it was ~1835 MHz under this kernel while nvidia-smi reported 1980 MHz
(experiments/results/bench_persistent_glm5_slice_stamps.json), and converting at nvidia-smi's figure had made
the profiled spans look ~0.15 ms shorter than the kernel's device time.

The critical path needs one clock across SMs: a timeline's first event is its CTA's globaltimer, which all CTAs
share, and the cycles after it convert at the SM clock (`task_times`); `critical_path` then walks the launch back
from its last task through whichever bound each task (its SM's previous task, or the counter it waited on):

    critical_path(task_times(trace, schedule.sm_lists(), np.array(window["cta_clock_mhz"]) / 1e3), schedule)

The profiler's records and dump slow the launch itself (2.10 -> 2.15 ms at glm5_slice in session 21, where a
faster INDEX_TOPK made the unprofiled launch 2.15 ms too and the profiled one no slower: experiments/results/
session21/). `persistent_step(..., task_stamps=True)` records only three stamps per task, read by
`stamped_task_times` into the same {task: (start, deps_met, end)} for `critical_path` (no per-op phases); they
cost the launch ~6 us (2.103 -> 2.108 ms, session23/). (Until session 23 one thread stored them under a branch,
which made ptxas serialize every wgmma of the kernel: 2.10 -> 2.49 ms, session22/.)
"""
from __future__ import annotations

import numpy as np

WAIT = "wait"  # the dependency wait's range (`kernel._Seam.wait`)


def _timeline(events: list, key) -> tuple[int, list]:
    """(span, top-level ranges) of one timeline's events in recorded order: span in cycles from its first event to
    its last; each top-level range as (name, cycles, cycles in "wait" ranges: nested in it at any depth, or all of
    it for a "wait" range, {name: cycles} and {name: count} of its other nested ranges at any depth, e.g. a body's
    phases and how often each ran)."""
    t0 = events[0]["ts"]
    stack, top = [], []  # stack: [name, start, nested wait cycles, nested other ranges, their counts]
    for e in events:
        t = round((e["ts"] - t0) * 1e3)  # cycles since the first event
        if e["ph"] == "B":
            stack.append([e["name"], t, 0, {}, {}])
            continue
        if not stack or stack[-1][0] != e["name"]:
            open_ = stack[-1][0] if stack else None
            raise ValueError(f"timeline {key}: end of {e['name']!r} at ts {e['ts']} while {open_!r} is open")
        name, start, wait, parts, counts = stack.pop()
        cycles = t - start
        if name == WAIT:
            wait = cycles
        if stack:
            outer = stack[-1]
            outer[2] += wait
            for n, cy in parts.items():
                outer[3][n] = outer[3].get(n, 0) + cy
                outer[4][n] = outer[4].get(n, 0) + counts[n]
            if name != WAIT:
                outer[3][name] = outer[3].get(name, 0) + cycles
                outer[4][name] = outer[4].get(name, 0) + 1
        else:
            top.append((name, cycles, wait, parts, counts))
    if stack:
        raise ValueError(f"timeline {key}: {stack[-1][0]!r} begun and never ended")
    return round((events[-1]["ts"] - t0) * 1e3), top


def trace_breakdown(trace: dict, cycles_per_ms: float | None = None) -> dict:
    """The breakdown of one launch's trace (the dump's JSON), cycle counts summed over the (pid, tid) timelines:

    ops: per top-level range name (the ops, Mosaic's "Init", the bare "wait" of a task whose body is compiled
      out), largest first: count (ranges), cycles (inclusive), wait_cycles (in "wait" ranges nested inside; of a
      bare "wait": all of it), exclusive_cycles (cycles - wait_cycles), fraction (cycles / span_cycles),
      mean_cycles (per range), parts_cycles ({name: cycles} of the other ranges nested inside at any depth:
      the phases a body marks with `jax.named_scope`, e.g. INDEX_TOPK's "select" / "compact"), parts_count (how
      many of each: per range, e.g. INDEX_TOPK's radix passes);
    span_cycles: the timelines' spans (first event to last) summed; max_span_cycles / median_span_cycles: over
      the timelines (one SM's time);
    outside_cycles: the spans outside every top-level range (the task table's copy and walk): the
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
        for name, cycles, wait, parts, counts in top:
            op = ops.setdefault(name, {"count": 0, "cycles": 0, "wait_cycles": 0, "parts_cycles": {},
                                       "parts_count": {}})
            op["count"] += 1
            op["cycles"] += cycles
            op["wait_cycles"] += wait
            for n, cy in parts.items():
                op["parts_cycles"][n] = op["parts_cycles"].get(n, 0) + cy
                op["parts_count"][n] = op["parts_count"].get(n, 0) + counts[n]
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


def task_times(trace: dict, sm_lists: list[list[int]], cycles_per_ns) -> dict[int, tuple[float, float, float]]:
    """task id -> (start, deps_met, end) in ns on the launch's shared clock, from one launch's trace.

    Timeline tid = 1 + CTA index (Mosaic numbers a trace by block and warpgroup; the kernel traces one warpgroup
    per CTA) holds, after Mosaic's "Init", one top-level range per task of CTA c's list (`Schedule.sm_lists()[c]`),
    in order; deps_met is the end of the "wait" range nested in it (its start where the task took no wait). The
    pid is 1 + the physical SM the CTA ran on (%smid), which is not the CTA index. A timeline's first event is at
    its CTA's globaltimer (ns, shared by all CTAs); later ones add SM clock cycles, converted here at
    `cycles_per_ns` (the SM clock in GHz: one for all CTAs, or per CTA, e.g. `launch_window`'s measured rates;
    nvidia-smi's figure can be off: it said 1980 MHz where the stamps measured 1835). Raises ValueError where a
    timeline's ranges do not match its list."""
    rates = np.broadcast_to(np.asarray(cycles_per_ns, dtype=float), (len(sm_lists),))
    timelines: dict = {}
    for e in trace["traceEvents"]:
        if e.get("ph") in ("B", "E"):
            timelines.setdefault(e["tid"], {}).setdefault(e["pid"], []).append(e)
    times = {}
    for tid, by_pid in timelines.items():
        if len(by_pid) != 1:
            raise ValueError(f"timeline tid {tid}: recorded on {len(by_pid)} SMs; a CTA runs on one")
        events = next(iter(by_pid.values()))
        t0, rate = events[0]["ts"], rates[tid - 1] if 0 < tid <= len(sm_lists) else rates[0]
        stack, ranges = [], []  # ranges: [start, deps_met, end] of each top-level range other than "Init"
        for e in events:
            t = t0 * 1e3 + (e["ts"] - t0) * 1e3 / rate
            if e["ph"] == "B":
                if not stack and e["name"] != "Init":
                    ranges.append([t, None, None])
                stack.append(e["name"])
                continue
            name = stack.pop()
            if not stack and name != "Init":  # a task's range ends (a bare "wait": a task without a body)
                r = ranges[-1]
                r[2] = t
                r[1] = t if name == WAIT else (r[0] if r[1] is None else r[1])
            elif len(stack) == 1 and name == WAIT and stack[0] != "Init":  # the task's dependency wait
                ranges[-1][1] = t
        ids = sm_lists[tid - 1] if 0 < tid <= len(sm_lists) else None
        if ids is None or len(ids) != len(ranges):
            raise ValueError(f"timeline tid {tid}: {len(ranges)} task ranges, but CTA {tid - 1}'s list has "
                             f"{None if ids is None else len(ids)} tasks: a trace of another schedule?")
        times.update(zip(ids, map(tuple, ranges)))
    return times


def stamped_task_times(stamps, sm_lists: list[list[int]]) -> dict[int, tuple[float, float, float]]:
    """task id -> (start, deps_met, end) in ns since the launch's first task start, from
    `persistent_step(task_stamps=True)`'s int32 [CTAs, 6 * rows]: the globaltimer (shared by all SMs) of each
    task's three events, by list position (`kernel.TASK_STAMPS`); the clock columns are not used. Without the
    profiler's records and dump, whose cost moves the launch (`task_times` reads a profiled launch). The
    globaltimer wraps at 2^32 ns: times are taken modulo 2^32 around the first CTA's first start. Raises
    ValueError for another shape or a task whose events are out of order."""
    a = np.asarray(stamps).astype(np.int64) & 0xFFFFFFFF
    longest = max(map(len, sm_lists), default=0)
    if a.ndim != 2 or a.shape[0] != len(sm_lists) or a.shape[1] % 6 or a.shape[1] < 6 * longest:
        raise ValueError(f"stamped_task_times: stamps of shape {a.shape}; want [{len(sm_lists)}, 6 * rows >= "
                         f"{6 * longest}] from persistent_step(task_stamps=True)")
    wrap = 1 << 32
    ref = next((a[cta, 0] for cta, ids in enumerate(sm_lists) if ids), 0)  # a first task's start
    times = {}
    for cta, ids in enumerate(sm_lists):
        for pos, tid in enumerate(ids):
            t = (a[cta, 6 * pos:6 * pos + 6:2] - ref + wrap // 2) % wrap - wrap // 2
            if not t[0] <= t[1] <= t[2]:
                raise ValueError(f"stamped_task_times: task {tid} (CTA {cta}, position {pos}) has events "
                                 f"{t.tolist()} out of order")
            times[tid] = tuple(float(x) for x in t)
    t0 = min((x[0] for x in times.values()), default=0.0)
    return {tid: tuple(x - t0 for x in v) for tid, v in times.items()}


def critical_path(times: dict, schedule, top: int = 10) -> dict:
    """The launch's critical path from `task_times`: from the task that ends last, walk back to whichever bound
    each task's work -- the previous task of its SM list (it started when that one ended) or the last-ending task
    of the counter it waited on longest (its dependencies were met then) -- whichever ended later.

    Returns length_ns (first path task's start to the last end), tasks (on the path), ops_ns (the path tasks' time
    from deps met to end, per op), sync_ns (from a binding dependency's end -- its "signal" range, the release, is
    inside it -- to the wait's end: the counter's trip through L2 and the poll), walk_ns (from the SM's previous
    task's end to the next's end of wait: the table walk, dispatch and prefetch issue), and per_layer_ns (ops_ns per
    layer, -1 for no layer): these sum to length_ns. path: [task id, op, layer, start, deps_met, end] per path task,
    in order (ns since the path's start). slowest_syncs: the `top` longest of the path's sync links, longest first,
    as [ns, producer id, its op, its layer, waiter id, its op, its layer]: which counters reach their waiters late
    (on the H200 a signal takes ~0.4 us and most links 1-7 us; the "critical" assignment's schedules showed links
    of 15-29 us in every run, experiments/results/bench_persistent_glm5_slice_{signal,stride}_critical.json and
    assign_ab_session15/)."""
    tasks = {i: schedule.task(i) for i in times}
    last_of = {}  # counter -> the id of its signalling task that ended last
    for i, t in tasks.items():
        if t.signal >= 0 and (t.signal not in last_of or times[i][2] > times[last_of[t.signal]][2]):
            last_of[t.signal] = i
    prev = {}
    for ids in schedule.sm_lists():
        prev.update(zip(ids[1:], ids[:-1]))
    cur, path = max(times, key=lambda i: times[i][2]), []
    ops, per_layer, sync, walk, links = {}, {}, 0.0, 0.0, []
    while cur is not None:
        start, met, end = times[cur]
        t = tasks[cur]
        path.append(cur)
        ops[t.op.name] = ops.get(t.op.name, 0.0) + end - met
        per_layer[t.layer] = per_layer.get(t.layer, 0.0) + end - met
        deps = [last_of[c] for c, _ in t.waits if c in last_of]
        dep = max(deps, key=lambda i: times[i][2], default=None)
        before = prev.get(cur)
        if dep is not None and (before is None or times[dep][2] > times[before][2]):
            sync += met - times[dep][2]
            links.append([met - times[dep][2], dep, tasks[dep].op.name, tasks[dep].layer, cur, t.op.name, t.layer])
            cur = dep
        elif before is not None:
            walk += met - times[before][2]
            cur = before
        else:
            walk += met - start
            cur = None
    path.reverse()
    t0 = times[path[0]][0]
    return {"length_ns": times[path[-1]][2] - t0, "tasks": len(path),
            "ops_ns": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "sync_ns": sync, "walk_ns": walk,
            "per_layer_ns": dict(sorted(per_layer.items())),
            "slowest_syncs": sorted(links, key=lambda x: -x[0])[:top],
            "path": [[i, tasks[i].op.name, tasks[i].layer, *(x - t0 for x in times[i])] for i in path]}


def launch_window(stamps) -> dict:
    """A launch's window from `persistent_step(stamps=True)`'s int32 [CTAs, 4]: per CTA (globaltimer's low 32 bits
    in ns, SM clock cycles) as its body starts, then as its task walk ends. The globaltimer is one clock for all
    SMs, so this places every CTA on the launch's timeline without the profiler (whose own stores and dump add to
    the kernel's time), to set against the kernel's device time (`glm_fast.device_trace`): what the two do not
    share is the launch's start-up and tear-down outside the CTAs' bodies.

    Returns window_us (first body start to last walk end), start_skew_us / end_skew_us (last minus first CTA's
    start / end), body_us (per CTA, start to end: min, median, max) and clock_mhz (per CTA, clock cycles per
    globaltimer ns between its two stamps, x 1e3: min, median, max; the rate to convert profiler cycles at) and
    cta_clock_mhz (that rate per CTA, for `task_times`).
    Both counters wrap (at 2^32 ns = 4.3 s, 2^32 cycles): differences are taken modulo 2^32 from CTA 0's start.
    Raises ValueError for another shape or a CTA whose end is not after its start."""
    a = np.asarray(stamps).astype(np.int64) & 0xFFFFFFFF
    if a.ndim != 2 or a.shape[1] != 4 or not len(a):
        raise ValueError(f"launch_window: stamps of shape {a.shape}; want [CTAs, 4] from persistent_step(stamps=True)")
    wrap = 1 << 32
    start, end = [(a[:, k] - a[0, 0] + wrap // 2) % wrap - wrap // 2 for k in (0, 2)]  # ns since CTA 0's start
    ns, cycles = (a[:, 2] - a[:, 0]) % wrap, (a[:, 3] - a[:, 1]) % wrap
    bad = np.flatnonzero((ns == 0) | (end <= start))
    if len(bad):
        raise ValueError(f"launch_window: CTA {int(bad[0])} ends at or before its start (stamps {a[bad[0]].tolist()})")

    def spread(x):
        return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max())}

    mhz = cycles / ns * 1e3
    return {"window_us": float(end.max() - start.min()) / 1e3, "start_skew_us": float(np.ptp(start)) / 1e3,
            "end_skew_us": float(np.ptp(end)) / 1e3, "body_us": spread(ns / 1e3), "clock_mhz": spread(mhz),
            "cta_clock_mhz": [round(float(x), 3) for x in mhz]}
