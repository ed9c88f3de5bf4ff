"""glm_fast.device_trace: the per-step reduction of a profiler trace (synthetic device tracks, exact figures) and
a real CPU capture (no device track: nothing counted)."""
import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from glm_fast import device_trace


def _trace(tmp_path, events):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0 (pid 2)"}},
        {"ph": "M", "pid": 2, "tid": 20, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 21, "name": "thread_name", "args": {"name": "Stream #14(MemcpyD2D)"}},
        {"ph": "M", "pid": 2, "tid": 22, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return str(path)


def test_breakdown_counts_stream_kernels_only(tmp_path):
    """Two steps: kernels on two streams (one overlap), a derived XLA Ops event and a host event that must not
    count. Busy = union of the stream intervals; idle = span - busy; kernels ranked by total time."""
    x = lambda tid, ts, dur, name: {"ph": "X", "pid": 2, "tid": tid, "ts": ts, "dur": dur, "name": name}  # noqa
    events = [
        x(20, 0.0, 100.0, "persistent"), x(20, 110.0, 5.0, "argmax"),       # step 1
        x(21, 90.0, 20.0, "copy"),                                          # overlaps the first kernel by 10
        x(20, 200.0, 100.0, "persistent"), x(20, 310.0, 5.0, "argmax"),     # step 2
        x(22, 0.0, 400.0, "derived op"),                                    # XLA Ops: ignored
        {"ph": "X", "pid": 1, "tid": 10, "ts": 0.0, "dur": 1000.0, "name": "host"},
    ]
    out = device_trace.breakdown(_trace(tmp_path, events), steps=2)
    assert out["span_us"] == pytest.approx(315.0 / 2)
    assert out["busy_us"] == pytest.approx((110.0 + 5.0 + 100.0 + 5.0) / 2)  # [0, 110) U [110, 115) U ...
    assert out["idle_us"] == pytest.approx(out["span_us"] - out["busy_us"])
    assert [k["name"] for k in out["kernels"]] == ["persistent", "copy", "argmax"]
    assert out["kernels"][0]["calls"] == 1.0 and out["kernels"][0]["us"] == pytest.approx(100.0)
    assert out["kernel_calls"] == pytest.approx(2.5)
    assert set(out["device_tracks"]) == {"/device:GPU:0 (pid 2) Stream #13(Compute)",
                                         "/device:GPU:0 (pid 2) Stream #14(MemcpyD2D)"}
    with pytest.raises(ValueError, match="steps"):
        device_trace.breakdown(_trace(tmp_path, events), steps=0)


def test_capture_on_this_host(tmp_path):
    """A real trace of a jitted function: written and read back; without an accelerator no device track."""
    f = jax.jit(lambda a: jnp.tanh(a) @ a)
    a = jax.random.normal(jax.random.key(0), (64, 64))
    f(a).block_until_ready()
    path = device_trace.capture(lambda: f(a), 3, str(tmp_path))
    out = device_trace.breakdown(path, 3)
    if jax.default_backend() == "cpu":
        assert out["device_tracks"] == {} and out["busy_us"] == 0.0 and out["kernels"] == []
    else:
        assert out["busy_us"] > 0 and out["kernels"]
