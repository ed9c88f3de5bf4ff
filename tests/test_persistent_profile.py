"""`profile.trace_breakdown` on hand-built traces in the format of Mosaic GPU's profiler dump (ts = (start ns +
cycles) / 1e3 per timeline), and `persistent_step(profile_dir=...)` refusing interpret mode."""
import jax
import pytest

from pallas_kernels.persistent.profile import trace_breakdown


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
    """INDEX_TOPK [0, 100) with phases select [5, 60) (a wait [10, 20) inside) and compact [60, 95) (a nested
    row [70, 80)): parts at any depth, the wait counted as wait only."""
    out = trace_breakdown({"traceEvents": _events(1, 0, [
        ("INDEX_TOPK", "B", 0), ("select", "B", 5), ("wait", "B", 10), ("wait", "E", 20), ("select", "E", 60),
        ("compact", "B", 60), ("row", "B", 70), ("row", "E", 80), ("compact", "E", 95), ("INDEX_TOPK", "E", 100)])},
        cycles_per_ms=10.0)
    op = out["ops"]["INDEX_TOPK"]
    assert op["parts_cycles"] == {"select": 55, "compact": 35, "row": 10} and op["wait_cycles"] == 10
    assert op["parts_ms"] == {"select": 5.5, "compact": 3.5, "row": 1.0}
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
