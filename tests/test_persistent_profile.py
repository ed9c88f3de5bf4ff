"""`profile.trace_breakdown` on hand-built traces in the format of Mosaic GPU's profiler dump (ts = (start ns +
cycles) / 1e3 per timeline), and `persistent_step(profile_dir=...)` refusing interpret mode."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from glm_fast import load_config
from pallas_kernels.persistent import ScheduleOptions, compile_schedule
from pallas_kernels.persistent.format import Op
from pallas_kernels.persistent.profile import critical_path, stamped_task_times, task_times, trace_breakdown


def _events(pid: int, start_ns: int, ranges: list) -> list:
    """Chrome trace events of one timeline from (name, "B" | "E", cycles since its first event)."""
    return [{"name": n, "ph": ph, "ts": (start_ns + c) / 1e3, "pid": pid, "tid": pid} for n, ph, c in ranges]


# SM 0: GEMV [0, 100) with a wait [10, 40), then ATTN [120, 300): span 300, 20 outside.
# SM 1: GEMV [0, 80) with a wait [5, 55), GEMV [90, 150) without one, ATTN [160, 200): span 200, 20 outside.
TRACE = {"displayTimeUnit": "ns", "traceEvents": [
    *_events(1, 1_000_000_123, [("GEMV", "B", 0), ("wait", "B", 10), ("wait", "E", 40), ("GEMV", "E", 100),
                                ("ATTN", "B", 120), ("ATTN", "E", 300)]),
    *_events(2, 3_000_000_456, [("GEMV", "B", 0), ("wait", "B", 5), ("wait", "E", 55), ("GEMV", "E", 80),
                                ("GEMV", "B", 90), ("GEMV", "E", 150), ("ATTN", "B", 160), ("ATTN", "E", 200)]),
]}


def test_breakdown_sums_ops_waits_and_outside_per_timeline():
    out = trace_breakdown(TRACE, cycles_per_ms=100.0)
    assert out["timelines"] == 2 and out["span_cycles"] == 500
    assert out["max_span_cycles"] == 300 and out["median_span_cycles"] == 250
    assert out["outside_cycles"] == 40 and out["outside_fraction"] == pytest.approx(0.08)
    assert out["wait_cycles"] == 80 and out["wait_fraction"] == pytest.approx(0.16)
    assert list(out["ops"]) == ["GEMV", "ATTN"]  # largest first
    gemv, attn = out["ops"]["GEMV"], out["ops"]["ATTN"]
    assert (gemv["count"], gemv["cycles"], gemv["wait_cycles"], gemv["exclusive_cycles"]) == (3, 240, 80, 160)
    assert gemv["fraction"] == pytest.approx(0.48) and gemv["mean_cycles"] == pytest.approx(80)
    assert (attn["count"], attn["cycles"], attn["wait_cycles"], attn["exclusive_cycles"]) == (2, 220, 0, 220)
    assert attn["fraction"] == pytest.approx(0.44) and attn["mean_cycles"] == pytest.approx(110)
    assert out["max_span_ms"] == pytest.approx(3.0) and out["median_span_ms"] == pytest.approx(2.5)
    assert gemv["ms"] == pytest.approx(2.4) and gemv["wait_ms"] == pytest.approx(0.8)
    assert "ms" not in trace_breakdown(TRACE)["ops"]["GEMV"]


def test_bare_wait_counts_as_wait_and_empty_trace_is_zero():
    out = trace_breakdown({"traceEvents": _events(1, 0, [("wait", "B", 0), ("wait", "E", 30), ("GEMV", "B", 40),
                                                         ("GEMV", "E", 50)])})
    assert out["ops"]["wait"]["wait_cycles"] == 30 == out["wait_cycles"] and out["outside_cycles"] == 10
    assert trace_breakdown({"traceEvents": []})["span_cycles"] == 0


def test_nested_phases_are_parts_of_their_top_level_range():
    """INDEX_TOPK [0, 100) with phases select [5, 60) (a wait [10, 20) inside) and compact [60, 95) (two nested
    rows [70, 80) and [85, 90)): parts at any depth with their counts, the wait counted as wait only."""
    out = trace_breakdown({"traceEvents": _events(1, 0, [
        ("INDEX_TOPK", "B", 0), ("select", "B", 5), ("wait", "B", 10), ("wait", "E", 20), ("select", "E", 60),
        ("compact", "B", 60), ("row", "B", 70), ("row", "E", 80), ("row", "B", 85), ("row", "E", 90),
        ("compact", "E", 95), ("INDEX_TOPK", "E", 100)])},
        cycles_per_ms=10.0)
    op = out["ops"]["INDEX_TOPK"]
    assert op["parts_cycles"] == {"select": 55, "compact": 35, "row": 15} and op["wait_cycles"] == 10
    assert op["parts_count"] == {"select": 1, "compact": 1, "row": 2}
    assert op["parts_ms"] == {"select": 5.5, "compact": 3.5, "row": 1.5}
    assert out["ops"]["INDEX_TOPK"]["exclusive_cycles"] == 90


@pytest.mark.parametrize("ranges,message", [
    ([("GEMV", "B", 0), ("wait", "B", 10), ("GEMV", "E", 20), ("wait", "E", 30)], "end of 'GEMV'"),
    ([("GEMV", "E", 0)], "end of 'GEMV'"),
    ([("GEMV", "B", 0), ("wait", "B", 10), ("wait", "E", 20)], "'GEMV' begun and never ended"),
])
def test_ranges_that_do_not_nest_raise(ranges, message):
    with pytest.raises(ValueError, match=message):
        trace_breakdown({"traceEvents": _events(1, 0, ranges)})


def test_profiling_refuses_interpret_mode(tmp_path):
    from glm_fast import load_config
    from pallas_kernels.persistent import ScheduleOptions, compile_schedule
    from pallas_kernels.persistent.kernel import KernelPlan, abstract_step_args, persistent_step
    plan = KernelPlan.build(compile_schedule(load_config("tiny").model, 1, ScheduleOptions(num_sms=2)))
    with pytest.raises(ValueError, match="profiling needs the GPU"):
        jax.eval_shape(lambda *a: persistent_step(plan, *a, interpret=True, profile_dir=str(tmp_path)),
                       *abstract_step_args(plan, 64))


# -- the critical path (`task_times` + `critical_path`) ----------------------------------------------------------


class _Stub:
    """A schedule's task records and SM lists, by hand: tasks = {id: (op, layer, signal, waited counters)}."""
    def __init__(self, tasks: dict, lists: list):
        self._tasks, self._lists = tasks, lists

    def task(self, i):
        op, layer, signal, waits = self._tasks[i]
        return SimpleNamespace(op=Op[op], layer=layer, signal=signal, waits=tuple((c, 1) for c in waits))

    def sm_lists(self):
        return self._lists


def _timeline(cta: int, sm: int, ranges: list, ghz: float = 2.0) -> list:
    """One CTA's events from (name, "B" | "E", ns), as Mosaic dumps them: tid = 1 + CTA, pid = 1 + the SM it ran
    on; ts = (first event's ns + SM cycles since it) / 1e3."""
    base = ranges[0][2]
    return [{"name": n, "ph": ph, "ts": (base + (t - base) * ghz) / 1e3, "pid": 1 + sm, "tid": 1 + cta}
            for n, ph, t in ranges]


def _task_events(times: dict, lists: list, ghz=2.0) -> dict:
    """A trace of the tasks' (start, deps_met, end) ns: Init, then per task its op range with the wait inside;
    CTA c ran on SM (c + 1) % n (the CTA -> SM mapping is the hardware's, not the identity) at clock ghz (one for
    all CTAs, or per CTA)."""
    rates = np.broadcast_to(np.asarray(ghz, dtype=float), (len(lists),))
    events = []
    for cta, ids in enumerate(lists):
        rs = [("Init", "B", times[ids[0]][0] - 5), ("Init", "E", times[ids[0]][0] - 1)]
        for i in ids:
            start, met, end = times[i]
            rs += [("GEMV", "B", start), ("wait", "B", start), ("wait", "E", met), ("GEMV", "E", end)]
        events += _timeline(cta, (cta + 1) % len(lists), rs, rates[cta])
    return {"traceEvents": events}


@pytest.mark.parametrize("ghz", [2.0, [2.0, 1.5]])
def test_critical_path_takes_the_later_of_the_sm_and_the_dependency(ghz):
    """SM 0 runs GEMV 0 then ATTN 2 (waits on GEMV 1, long done: bound by its SM); SM 1 runs GEMV 1 then UV 3
    (waits on ATTN 2: bound by it). Path 0 -> 2 -> 3; every ns of its 300 is an op, a sync or a walk. The CTAs'
    clocks are one rate or a rate each (`launch_window`'s cta_clock_mhz): task_times converts each at its own."""
    stub = _Stub({0: ("GEMV", 0, 0, ()), 1: ("GEMV", 0, 1, ()), 2: ("ATTN", 1, 2, (1,)), 3: ("UV", 1, 3, (2,))},
                 [[0, 2], [1, 3]])
    want = {0: (1000.0, 1000.0, 1100.0), 1: (1000.0, 1000.0, 1050.0), 2: (1110.0, 1115.0, 1200.0),
            3: (1060.0, 1230.0, 1300.0)}
    times = task_times(_task_events(want, stub.sm_lists(), ghz), stub.sm_lists(), cycles_per_ns=ghz)
    assert set(times) == set(want) and all(times[i] == pytest.approx(want[i]) for i in want), times
    out = critical_path(times, stub)
    assert [p[0] for p in out["path"]] == [0, 2, 3] and out["tasks"] == 3
    assert out["length_ns"] == pytest.approx(300)
    assert out["ops_ns"] == pytest.approx({"GEMV": 100, "ATTN": 85, "UV": 70})
    assert (out["sync_ns"], out["walk_ns"]) == pytest.approx((30, 15))
    assert out["per_layer_ns"] == pytest.approx({0: 100, 1: 155})
    assert out["slowest_syncs"] == [[pytest.approx(30), 2, "ATTN", 1, 3, "UV", 1]]  # ATTN 2's end -> UV 3's wait


def test_task_times_refuses_a_trace_of_another_schedule():
    trace = _task_events({0: (0.0, 0.0, 10.0), 1: (20.0, 20.0, 30.0)}, [[0, 1]])
    with pytest.raises(ValueError, match="list has 1 tasks"):
        task_times(trace, [[0]], cycles_per_ns=2.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_critical_path_of_a_simulated_launch(seed):
    """tiny's schedule on 5 SMs, executed in its topological order with random task times, a fixed walk between an
    SM's tasks and a fixed signal latency: the path ends at the last task, each link is the SM's previous task
    or a counter it waited on, and its ops + syncs + walks are its length (the gaps: the fixed costs)."""
    s = compile_schedule(load_config("tiny").model, 1, ScheduleOptions(tile_n=24, num_sms=5))
    lists = s.sm_lists()
    sm_of = {i: sm for sm, ids in enumerate(lists) for i in ids}
    rng, walk, signal = np.random.default_rng(seed), 7.0, 11.0
    free, done, times = [0.0] * len(lists), {}, {}
    for t in s.tasks:  # records are a topological order, and every SM list follows it
        start = free[sm_of[t.id]] + walk
        met = max([start] + [done[c] + signal for c, _ in t.waits])
        times[t.id] = (start, met, met + float(rng.uniform(10, 100)))
        free[sm_of[t.id]] = times[t.id][2]
        done[t.signal] = max(done.get(t.signal, 0.0), times[t.id][2])
    got = task_times(_task_events(times, lists), lists, cycles_per_ns=2.0)
    out = critical_path(got, s)
    path = [p[0] for p in out["path"]]
    assert times[path[-1]][2] == max(e for _, _, e in times.values())
    for a, b in zip(path, path[1:]):
        tb = s.task(b)
        assert (b in lists[sm_of[a]] and lists[sm_of[a]].index(b) == lists[sm_of[a]].index(a) + 1) \
            or s.task(a).signal in {c for c, _ in tb.waits}
    gaps = out["sync_ns"] + out["walk_ns"]
    assert sum(out["ops_ns"].values()) + gaps == pytest.approx(out["length_ns"])
    syncs = out["slowest_syncs"]
    assert syncs and all(x[0] == pytest.approx(signal) for x in syncs)  # every sync link: the signal latency
    assert all(s.task(x[4]).op.name == x[5] and s.task(x[1]).signal in {c for c, _ in s.task(x[4]).waits}
               for x in syncs)
    assert sum(out["per_layer_ns"].values()) + gaps == pytest.approx(out["length_ns"])
    assert out["length_ns"] == pytest.approx(times[path[-1]][2] - times[path[0]][0])
    # each link's gap is the fixed cost of the constraint that bound it, or of the other when both were close
    links = len(path) - 1
    assert links * min(walk, signal) - 1e-6 <= gaps <= links * (walk + signal) + 1e-6, (gaps, links)
    assert out["sync_ns"] >= 0 and out["walk_ns"] >= 0 and out["sync_ns"] > 0  # tiny's layers chain by counters


def _task_stamps(times: dict, lists: list, rows: int, t0: int, rng) -> np.ndarray:
    """What `persistent_step(task_stamps=True)` returns for these (start, deps_met, end) ns: int32 [CTAs, 6 * rows],
    per list position (globaltimer's low word at t0 + t, a clock count) for the three events; unwritten columns
    past each list hold garbage."""
    out = rng.integers(-(1 << 31), 1 << 31, (len(lists), 6 * rows), dtype=np.int64)
    for cta, ids in enumerate(lists):
        for pos, i in enumerate(ids):
            for k, t in enumerate(times[i]):
                out[cta, 6 * pos + 2 * k] = (t0 + int(t)) % (1 << 32)
    return (out % (1 << 32)).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_stamped_task_times_read_the_globaltimer_across_its_wrap(seed):
    """The task stamps of the two-SM launch above, its first start a few us before globaltimer's low word wraps:
    the same times (from the first start), the same critical path as the profiler's trace gives."""
    stub = _Stub({0: ("GEMV", 0, 0, ()), 1: ("GEMV", 0, 1, ()), 2: ("ATTN", 1, 2, (1,)), 3: ("UV", 1, 3, (2,))},
                 [[0, 2], [1, 3]])
    want = {0: (1000.0, 1000.0, 1100.0), 1: (1000.0, 1000.0, 1050.0), 2: (1110.0, 1115.0, 1200.0),
            3: (1060.0, 1230.0, 1300.0)}
    rng = np.random.default_rng(seed)
    stamps = _task_stamps(want, stub.sm_lists(), 8, (1 << 32) - 1100 - int(rng.integers(0, 200)), rng)
    got = stamped_task_times(stamps, stub.sm_lists())
    assert set(got) == set(want) and all(got[i] == pytest.approx(tuple(x - 1000 for x in want[i])) for i in want)
    a = critical_path(got, stub)
    b = critical_path(task_times(_task_events(want, stub.sm_lists()), stub.sm_lists(), cycles_per_ns=2.0), stub)
    for key in ("length_ns", "sync_ns", "walk_ns", "ops_ns", "per_layer_ns"):
        assert a[key] == pytest.approx(b[key]), key
    assert [p[0] for p in a["path"]] == [0, 2, 3]
    assert a["slowest_syncs"] == [[pytest.approx(30), 2, "ATTN", 1, 3, "UV", 1]]


@pytest.mark.parametrize("shape, lists", [((2, 11), [[0], [1]]), ((2, 6), [[0, 1], [2]]), ((3, 12), [[0], [1]])])
def test_stamped_task_times_refuse_another_shape(shape, lists):
    with pytest.raises(ValueError, match="shape"):
        stamped_task_times(np.zeros(shape, np.int32), lists)


def test_stamped_task_times_refuse_events_out_of_order():
    stamps = _task_stamps({0: (10.0, 30.0, 20.0)}, [[0]], 1, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="task 0 .* out of order"):
        stamped_task_times(stamps, [[0]])


# -- the launch window (`persistent_step(stamps=True)` -> `launch_window`) ----------------------------------------


def test_launch_window_across_the_globaltimer_wrap():
    """Three CTAs on a 1.5 GHz clock, 1 ms before globaltimer's low word wraps: CTA 1 starts 100 ns before CTA 0,
    CTA 2 400 ns after it; their bodies take 2.0, 2.05 and 1.99 ms, across the wrap; the clock counters start at
    random values (some wrap too)."""
    from pallas_kernels.persistent.profile import launch_window
    rng = np.random.default_rng(0)
    t0 = (1 << 32) - 1_000_000  # 1 ms before the low word wraps
    starts = np.array([t0, t0 - 100, t0 + 400])
    ends = starts + np.array([2_000_000, 2_050_000, 1_990_000])
    c0 = rng.integers(0, 1 << 32, 3)
    stamps = np.stack([starts, c0, ends, c0 + 1.5 * (ends - starts)], 1).astype(np.int64) % (1 << 32)
    w = launch_window(stamps.astype(np.uint32).view(np.int32))  # what the kernel returns: int32
    assert w["window_us"] == pytest.approx(2050.0)  # CTA 1's start to its end
    assert w["start_skew_us"] == pytest.approx(0.5)
    assert w["end_skew_us"] == pytest.approx((2_050_000 - 100 - 1_990_400) / 1e3)
    assert w["body_us"] == {"min": 1990.0, "median": 2000.0, "max": 2050.0}
    assert all(v == pytest.approx(1500, rel=1e-6) for v in w["clock_mhz"].values())


@pytest.mark.parametrize("stamps, message", [(np.zeros((3, 3), np.int32), "shape"),
                                             (np.array([[5, 0, 5, 10]], np.int32), "ends at or before")])
def test_launch_window_refuses_bad_stamps(stamps, message):
    from pallas_kernels.persistent.profile import launch_window
    with pytest.raises(ValueError, match=message):
        launch_window(stamps)
