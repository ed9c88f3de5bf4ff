"""The persistent decode kernel on the GPU, one stage at a time: which opcode sets compile and run across all
SMs, whether the tasks that ran computed the right values, and what each stage costs. Writes JSON.

    python experiments/bench_persistent.py --config glm5_slice --context 4096 --out experiments/results

Variants (`persistent_step(..., ops=...)`: opcodes outside the set compile to no-ops, yet every task still waits
on and signals its dependency counters, so the full cross-CTA schedule runs in each):
* walk: no op bodies and no cross-CTA waits or signals: the per-SM table walk and `lax.switch` dispatch alone;
* skeleton: no op bodies: the walk plus the semaphore chain (46 dependency hops per glm5_slice step);
* dense: the ten dense / MoE / cache-write bodies (no attention or indexer), comparable across runs;
* lowered: dense + ATTN, the bodies that compiled on the H200 with jax 0.11.2 before INDEX_SCORE did;
* full: every body -- the whole decode step. Its logits, hidden state and every layer's new cache rows are
  compared with the bf16 XLA step's and both with a float32 XLA step's (`vs_float32`: bf16 XLA's own distance
  from float32 is the floor that the tests' criterion scales, tests/kernel_testing.assert_step_matches_xla);
  every scratch buffer is compared with the CPU simulator's value of it (`simulate.simulate_step`, the jnp tile
  references on the same inputs), in the order the schedule writes them (`buffers_vs_simulator`: the first
  buffers off name the op to look at; the selected rows / experts report the fraction of the simulator's set the
  kernel missed, other int buffers the fraction of differing entries);
  `tasks_vs_simulator`: each task of the first two layers re-run by the simulator on the kernel's OWN input
  buffers, its outputs compared with the kernel's (per op and layer, the worst; selections by set overlap,
  INDEX_SCORE's candidate scores per key row): this isolates each op from upstream differences (near-tie flips
  in top-k, the slot order that splits ATTN's rows);
  `flips_vs_simulator`: the simulator's step with the kernel's selections (INDEX_TOPK, ROUTER_SELECT) forced in,
  against the kernel's logits: whether the end-to-end gap is selection flips;
  `lowering_profile`: the functions most often on the stack while jax lowered the kernel (a 1 s sampler);
* index: INDEX_SCORE + INDEX_TOPK alone (the lightning indexer's share of the step);
* A+B+...: those opcodes' bodies, with `tasks_vs_simulator` over them (each task's inputs are whatever the
  kernel's buffers hold, the no-op tasks' included): a probe of a few bodies that lowers in a fraction of the
  full kernel's time (e.g. EMBED+GEMV+MOE_COMBINE+IK_WRITE+INDEX_SCORE+ROUTER_SELECT: MOE_COMBINE also sums the
  split-K first projections, `ScheduleOptions.proj_splits`);
* each of those alone (the bytes it streams over its time).
(In experiments/results/bench_persistent_glm5_slice_lowered10.json, written before `dense` existed, `lowered`
was the ten-body set that is now `dense`; each file's source_hash identifies the code.)
For `dense` and `lowered`, the layer-0 rows the step appends to the caches (EMBED -> fused-norm kv_a / indexer-key
GEMV -> KV_WRITE / IK_WRITE: no attention upstream) are compared with the XLA step's. Later layers read no-op
attention outputs, so only timing and completion are meaningful there. Each variant runs in a subprocess with a time
limit: a deadlocked launch is reported as such instead of hanging the run. The XLA step of the same state is timed
side by side (`bench_decode.time_step`'s method: jitted, back to back, one sync).

--tokens T: the step decodes T tokens at positions context .. context + T - 1 (1 + D: an MTP verification step,
on the plan PersistentDecoder picks for that T); the checks compare all T rows.

--profile (GPU only): the persistent variants compile with Mosaic GPU's on-device profiler
(`persistent_step(profile_dir=...)`: per CTA, a range per task named by its op, the dependency wait and the
body's phases -- INDEX_TOPK select / compact, ATTN rows_issue / rows_wait / math -- nested in it). After the
timing runs, one more launch's trace is read back and broken down (`profile.trace_breakdown`: cycles per op, its
wait and phases, the table walk outside the tasks, the SMs' spans) into the row's `profile`, in ms at the SM clock
that the launch's stamps measured (`sm_clock_mhz`; --profile implies --stamps; nvidia-smi's reading right
after the launch, which said 1980 MHz where the stamps measured ~1835, is `smi_clock_mhz`). The profiler's
records and its per-launch trace dump callback cost time, so a profiled row's timing is `median_ms_profiled`, not
comparable with an unprofiled `median_ms`; each timeline's span in the breakdown is the kernel's own time on that SM.
The row's `critical_path` (`profile.critical_path`) walks the same launch back from its last task through whichever
bound each task -- its SM's previous task or the counter it waited on -- and splits the path's length into op time
(per op and per layer), signal trips (`sync_ns`, the longest links in `slowest_syncs`) and table walks (`walk_ns`):
which links of the chain to shorten. --trace-launches N: the kernels' device time per launch (a jax.profiler trace,
`glm_fast.device_trace`), e.g. to compare the kernel's duration with its profiled spans. --stamps (GPU only):
the persistent variants also return each CTA's globaltimer and SM clock at its body's start and its walk's end
(`persistent_step(stamps=True)`), and the row's `launch_windows` give, for STAMP_LAUNCHES more launches, the
CTAs' window on one clock, their start and end skews and the SM clock rate between the stamps
(`profile.launch_window`): against the device trace's kernel time, the launch's cost outside the CTAs' bodies.
--task-stamps (GPU only, not with --profile): every task's start, deps met and end on the globaltimer
(`persistent_step(task_stamps=True)`: three stamps per task, no profiler; the profiler's records
and dump moved the launch 2.10 -> 2.15 ms at glm5_slice, session21/), and the row's `stamped_critical_paths`
give the critical path of STAMP_LAUNCHES more launches (`profile.critical_path` over
`profile.stamped_task_times`; the first with its path): the same analysis as --profile's without the bodies'
phases. The stamps cost the launch ~6 us (2.103 -> 2.108 ms at glm5_slice, experiments/results/session23/).
--ptxas (GPU only): the row's `ptxas` holds the compiler's report on each variant's kernel (`persistent.ptxas.report`:
registers, stack frame, spill bytes, ptxas' warnings and performance notes such as serialized wgmma), from
Mosaic's MOSAIC_GPU_DUMP_PTXAS log: whether a variant changed how the one-function kernel compiles (session 23:
the kernel sits at 255 registers with ~1.3 KB of spills; a one-thread branch between wgmmas serialized them all).
--attn-splits N / --attn-heads H override the attention tasks' split-KV factor and heads per task (default:
PersistentDecoder's choice, `kernel.gpu_candidates`: 64 heads x 32 splits where the SMEM fits; an unset one takes
ScheduleOptions' default). --index-chunks N / --assign / --hoist override the indexer score tasks per layer, the
SM assignment and the ops it hoists on top of the decoder's attention layout.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DENSE = ("GEMV", "SWIGLU_UP", "SWIGLU_DOWN", "ABSORB", "UV", "MOE_COMBINE", "EMBED", "KV_WRITE", "IK_WRITE",
         "ROUTER_SELECT")
LOWERED = DENSE + ("ATTN",)
FULL = LOWERED + ("INDEX_SCORE", "INDEX_TOPK")
STAMP_LAUNCHES = 5  # launches whose stamps --stamps reports
SETS = {"walk": [], "skeleton": [], "dense": list(DENSE), "lowered": list(LOWERED), "full": list(FULL),
        "index": ["INDEX_SCORE", "INDEX_TOPK"]}


def _rel(got, want) -> float:
    """max |got - want| / max |want| over float32 copies, where want is finite (elsewhere got must equal it:
    a mismatch there counts as error 1)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    fin = np.isfinite(want)
    if (got[~fin] != want[~fin]).any() or np.isnan(got[fin]).any():
        return 1.0
    if not fin.any():
        return 0.0
    return float(np.abs(got[fin] - want[fin]).max() / max(np.abs(want[fin]).max(), 1e-30))


_SET_VALUED = ("/index_cand_val", "/index_cand_idx", "/topk_idx", "/topk_valid")
_SELECTIONS = ("topk_idx", "slot_expert")  # selected rows / experts: compared by set overlap


def _missed(got, want) -> float:
    """The mean fraction of each row's selected set (want's distinct values, -1 = an empty slot excluded) that
    got does not hold: a set metric, unlike a sorted elementwise compare, where one flip shifts every later slot."""
    got, want = np.atleast_2d(got), np.atleast_2d(want)
    misses = []
    for g, w in zip(got, want):
        w = np.unique(w[w >= 0])
        misses.append(1 - len(np.intersect1d(g, w)) / max(len(w), 1))
    return float(np.mean(misses))


_SPLIT_ORDER = ("/o_part", "/lse_part")


def _scores_by_row(k_val, s_val, k_idx, s_idx) -> tuple[float, dict]:
    """INDEX_SCORE's candidate scores [T, K] compared per key row (the slot orders differ): the relative error
    over the rows both sides hold, the fraction of those off by > 1% of max |score|, the 8 worst (row, kernel,
    simulator), and rows only one side holds."""
    worst, diffs, scale, only = [], [], 1e-30, 0
    for q in range(k_val.shape[0]):
        kd = {int(i): float(v) for i, v in zip(k_idx[q], k_val[q]) if np.isfinite(v)}
        sd = {int(i): float(v) for i, v in zip(s_idx[q], s_val[q]) if np.isfinite(v)}
        only += len(kd.keys() ^ sd.keys())
        scale = max(scale, max((abs(v) for v in sd.values()), default=0.0))
        for i in kd.keys() & sd.keys():
            diffs.append(abs(kd[i] - sd[i]))
            worst.append((abs(kd[i] - sd[i]), q, i, kd[i], sd[i]))
    diffs = np.asarray(diffs or [0.0])
    worst = sorted(worst, reverse=True)[:8]
    return float(diffs.max() / scale), {"rows_off_fraction": float((diffs > 0.01 * scale).mean()),
                                        "rows_only_one_side": only,
                                        "worst_rows": [[q, i, kv, sv] for _, q, i, kv, sv in worst]}


def _tasks_vs_simulator(plan, model, caches, tokens, pos, got: dict, rows, ops, layers=(0, 1)) -> dict:
    """Per op in `ops`: the worst error of a task's outputs (kernel vs the simulator run on the kernel's inputs),
    with a sample of that task's output: its first values both ways and the kernel's count of non-finite values
    (what a wrong body wrote: garbage, NaN, -inf, a constant). Tasks with a NaN float input (downstream of a
    no-op body in a probe) are counted in `skipped`. INDEX_SCORE's candidates are in ascending row order in the
    kernel, in `lax.top_k`'s in the simulator: selections are compared by set overlap (`_missed`), INDEX_SCORE's
    candidate scores per key row (`_scores_by_row`), other set-valued outputs sorted along their slots."""
    from pallas_kernels.persistent.format import Kind, Op, written_region
    from pallas_kernels.persistent.simulate import _Machine
    s = plan.schedule
    m = _Machine(s, model, caches, np.asarray(tokens[0]), np.asarray(pos[0]))
    for b, v in got.items():
        m.bufs[b] = np.array(v)
    for bid, r in zip(plan.caches, rows):  # this step's rows, as the consumers see them
        m.bufs[bid][np.asarray(pos[0])] = np.asarray(r)
    m.written = [np.ones(b.shape, bool) if b.kind in (Kind.SCRATCH, Kind.OUTPUT) else None for b in s.buffers]
    worst: dict = {}
    skipped = 0
    for t in s.tasks:
        if t.layer not in layers or t.op in (Op.KV_WRITE, Op.IK_WRITE) or t.op not in ops:
            continue
        if any(b >= 0 and s.buffers[b].kind == Kind.SCRATCH and s.buffers[b].dtype != "int32"
               and np.isnan(np.asarray(m.bufs[b], np.float32)).any() for b in t.inputs):
            skipped += 1
            continue
        regions = written_region(t, s.buffers)
        mine = [m.bufs[b][idx].copy() for b, idx in regions]
        for b, idx in regions:
            m.written[b][idx] = False
        m.run(t.id)
        outs = {}
        for (b, idx), k in zip(regions, mine):
            outs[s.buffers[b].name.rsplit("/", 1)[-1]] = (b, k, m.bufs[b][idx].copy())
            m.bufs[b][idx] = k  # the kernel's value again, for the next task's inputs
            m.written[b][idx] = True
        for field, (b, k, ref) in outs.items():
            extra = {}
            if field in _SELECTIONS:
                err = _missed(k, ref)
                k, ref = np.sort(k, axis=-1), np.sort(ref, axis=-1)
            elif field == "index_cand_val" and "index_cand_idx" in outs:
                err, extra = _scores_by_row(k, ref, outs["index_cand_idx"][1], outs["index_cand_idx"][2])
            elif s.buffers[b].name.endswith(_SET_VALUED):  # candidate slot orders differ (see the docstring)
                k, ref = np.sort(k, axis=-1), np.sort(ref, axis=-1)
                err = float((k != ref).mean()) if s.buffers[b].dtype == "int32" else _rel(k, ref)
            elif s.buffers[b].dtype == "int32":
                err = float((k != ref).mean())
            else:
                err = _rel(k, ref)
            key = f"{t.op.name}:{field}@{t.layer}"
            if err > worst.get(key, {"err": -1.0})["err"]:
                kf, rf = np.asarray(k, np.float32).ravel(), np.asarray(ref, np.float32).ravel()
                worst[key] = {"err": err, "task": t.id, "args": [int(a) for a in t.args],
                              "kernel_first": [str(v) for v in kf[:8]], "simulator_first": [str(v) for v in rf[:8]],
                              "kernel_nonfinite": int((~np.isfinite(kf)).sum()),
                              "simulator_nonfinite": int((~np.isfinite(rf)).sum()), "size": int(kf.size), **extra}
    return {"skipped": skipped, **worst}


def _buffers_vs_simulator(plan, model, caches, tokens, pos, got: dict) -> list:
    """Per scratch buffer, in the order of the first task writing it: its error against the simulator's."""
    from pallas_kernels.persistent.simulate import simulate_step
    sim = simulate_step(plan.schedule, model, caches, np.asarray(tokens[0]), np.asarray(pos[0]))
    first = {}
    for t in plan.schedule.tasks:
        for b in t.outputs:
            first.setdefault(b, t)
    out = []
    for b in sorted(got, key=lambda b: first[b].id if b in first else -1):
        want, have = np.asarray(sim.buffers[b]), np.asarray(got[b])
        buf = plan.schedule.buffers[b]
        row = {"buffer": buf.name, "op": first[b].op.name if b in first else None}
        if buf.name.rsplit("/", 1)[-1] in _SELECTIONS:
            row["missed_fraction"] = _missed(have, want)
            out.append(row)
            continue
        if buf.name.endswith(_SET_VALUED):  # candidate slot orders differ: compare as sets
            want, have = np.sort(want, axis=-1), np.sort(have, axis=-1)
        elif buf.name.endswith(_SPLIT_ORDER):
            row["note"] = "depends on which selected rows fall in which split (the top-k slot order)"
        if buf.dtype == "int32":
            row["differ_fraction"] = float((want != have).mean())
        else:
            row["rel_err"] = _rel(have, want)
            row["finite"] = bool(np.isfinite(np.asarray(have, np.float32)).all())
        out.append(row)
    return out


def _flips_vs_simulator(plan, model, caches, tokens, pos, got: dict) -> dict:
    """The simulator's step on the true inputs with its discrete choices -- the indexer's selected rows
    (INDEX_TOPK) and the router's expert slots and weights (ROUTER_SELECT) -- replaced by the kernel's, against
    the kernel's logits and hidden state: near bf16 rounding means the kernel's end-to-end gap to XLA is those
    choices flipping (near-ties decided the other way); a larger error is something else."""
    from pallas_kernels.persistent.format import Op, written_region
    from pallas_kernels.persistent.simulate import _Machine, run_counters
    s = plan.schedule
    m = _Machine(s, model, caches, np.asarray(tokens[0]), np.asarray(pos[0]))
    forced = []

    def run(i):
        m.run(i)
        t = s.task(i)
        if t.op in (Op.INDEX_TOPK, Op.ROUTER_SELECT):
            for b, idx in written_region(t, s.buffers):
                m.bufs[b][idx] = np.asarray(got[b])[idx]
            forced.append(t.id)
    run_counters(s, 0, run)
    return {"forced_tasks": len(forced),
            **{name: _rel(got[b], m.read(b)) for name, b in (("logits", plan.logits_buffer),
                                                             ("hidden", plan.hidden_buffer))}}


class _Sampler:
    """Counts, once per second, each function on the main thread's stack (inclusive): where lowering spends."""

    def __init__(self):
        import threading
        self.counts, self.samples, self._stop = {}, 0, threading.Event()
        self._main = threading.get_ident()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(1.0):
            frame, seen = sys._current_frames().get(self._main), set()
            while frame is not None:
                code = frame.f_code
                seen.add(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                frame = frame.f_back
            for k in seen:
                self.counts[k] = self.counts.get(k, 0) + 1
            self.samples += 1

    def stop(self, top: int = 40) -> dict:
        self._stop.set()
        self._thread.join()
        best = sorted(self.counts.items(), key=lambda kv: -kv[1])[:top]
        return {"samples": self.samples, "top": [[k, v] for k, v in best]}


def _full_check(model, caches, tokens, pos, ok, plan, logits, h, rows, context) -> dict:
    """The whole step against the bf16 and float32 XLA steps of the same state (see the module docstring)."""
    from flax import nnx

    from glm_fast.engine.forward import main_cached
    from glm_fast.engine.ops import XLA
    from glm_fast.model import to_float32
    graphdef, params = nnx.split(model)
    ref16 = main_cached(model, caches, tokens, pos, ok, XLA)
    ref32 = main_cached(nnx.merge(graphdef, to_float32(params)), to_float32(caches), tokens, pos, ok, XLA)
    out = {"finite": bool(np.isfinite(np.asarray(logits, np.float32)).all()
                          and np.isfinite(np.asarray(h, np.float32)).all()),
           "argmax_equal_xla": bool((np.asarray(logits).argmax(-1) == np.asarray(ref16[0][0]).argmax(-1)).all())}
    for name, got, i in (("logits", logits, 0), ("hidden", h, 1)):
        out[name] = {"vs_xla": _rel(got, ref16[i][0]), "vs_float32": _rel(got, ref32[i][0]),
                     "xla_vs_float32": _rel(ref16[i][0], ref32[i][0])}
    worst = {"vs_xla": 0.0, "vs_float32": 0.0, "xla_vs_float32": 0.0}
    for bid, got in zip(plan.caches, rows):  # got [T, X]: this step's rows at positions context .. context + T - 1
        _, layer, field = plan.schedule.buffers[bid].name.split("/")
        x16, x32 = (getattr(ref[2][int(layer)], field)[0, context:context + got.shape[0]] for ref in (ref16, ref32))
        for k, (a, b) in (("vs_xla", (got, x16)), ("vs_float32", (got, x32)), ("xla_vs_float32", (x16, x32))):
            worst[k] = max(worst[k], _rel(a, b))
    out["cache_rows_worst"] = worst
    return out


def _median_ms(fn, args, reps: int) -> float:
    import jax
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _sm_clock_mhz() -> float | None:
    """The first GPU's current SM clock by nvidia-smi (MHz), None where it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _profile(fn, args, profile_dir: str, schedule) -> dict:
    """One more launch of the profiled `fn` (compiled with stamps), its trace broken down
    (`profile.trace_breakdown`) at the SM clock that its stamps measured (`profile.launch_window`: sm_clock_mhz,
    the CTAs' median; nvidia-smi's reading right after the launch is kept as smi_clock_mhz, it can be off), and
    its critical path (`profile.critical_path`, each CTA's cycles at its own measured rate). jax 0.10.2 names the
    trace file once per lowering and never overwrites it (that file holds the first launch's trace), so the
    traces so far are removed first and the newest one is read."""
    import jax

    from pallas_kernels.persistent.profile import critical_path, launch_window, task_times, trace_breakdown
    for path in glob.glob(os.path.join(profile_dir, "*-trace.json")):
        os.remove(path)
    window = launch_window(jax.block_until_ready(fn(*args))[-1])
    jax.effects_barrier()  # the dump is a jax.debug.callback
    with open(max(glob.glob(os.path.join(profile_dir, "*-trace.json")), key=os.path.getmtime)) as f:
        trace = json.load(f)
    mhz = window["clock_mhz"]["median"]
    out = {"sm_clock_mhz": mhz, "smi_clock_mhz": _sm_clock_mhz(), "profile_window": window,
           "profile": trace_breakdown(trace, mhz * 1e3)}
    try:
        rates = np.array(window["cta_clock_mhz"]) / 1e3
        out["critical_path"] = critical_path(task_times(trace, schedule.sm_lists(), rates), schedule)
    except Exception as e:  # noqa: BLE001 -- e.g. a trace that does not map onto the task lists: reported,
        out["critical_path"] = f"{type(e).__name__}: {e}"[:2000]  # the breakdown and timings are kept
    return out


def run_variant(config: str, context: int, ops: list[str] | None, reps: int, sync: bool = True,
                slots: int | None = None, checks: tuple = ("tasks", "buffers", "flips"), probe: bool = False,
                profile: bool = False, attn_splits: int | None = None, attn_heads: int | None = None,
                n_tokens: int = 1, topk_bits: int = 2, step_tiles: int | None = None,
                assign: str | None = None, index_chunks: int | None = None, lowering: str = "lane",
                router_splits: int | None = None,
                trace_launches: int = 0, stamps: bool = False, hoist: tuple[str, ...] | None = None,
                task_stamps: bool = False, expert_format: str | None = None, solo_ring: bool = True) -> dict:
    """One variant in this process: compile, run, check the layer-0 cache rows, time. ops None = XLA step;
    sync=False: no cross-CTA waits or signals; slots: the tile bodies' SMEM ring depth (TMA steps in flight; None:
    the decoder's, `kernel.fit_tiles`);
    profile: a persistent variant with the on-device profiler (GPU only; see the module docstring);
    attn_splits, attn_heads: the attention tasks' split-KV factor and heads per task (ScheduleOptions; both None:
    PersistentDecoder's choice; else the unset one takes ScheduleOptions' default); n_tokens: T, the step's tokens
    at positions context .. context + T - 1 (1 + D: an MTP verification step); topk_bits: INDEX_TOPK's key bits
    per radix pass (TileConfig.topk_bits); step_tiles: weight tiles per ring step of the bulk streams
    (TileConfig.step_tiles; None: its default); solo_ring: TileConfig.solo_ring (False: the single-weight streams
    take one weight ring, `slots` deep, as the others do); assign, index_chunks: the schedule's SM assignment and
    indexer score tasks per layer (ScheduleOptions.assign / .index_chunks; None: their defaults); router_splits: the
    MoE router GEMV's split-K parts (ScheduleOptions.router_splits; None: its default); hoist: the ops that
    the assignment orders with their producers (ScheduleOptions.hoist; None: its default); lowering: Mosaic GPU's
    lowering semantics ("lane", the kernel's default; "warpgroup"; "jax": jax's default); trace_launches: a
    `jax.profiler` trace of that many more back-to-back launches, reduced to the device's kernels per launch
    (`glm_fast.device_trace`): the kernel's own device time, without the host's dispatch in median_ms; stamps:
    the persistent step also returns its CTAs' globaltimer / clock stamps (`persistent_step(stamps=True)`, GPU
    only), and STAMP_LAUNCHES more launches report their windows (`profile.launch_window`); task_stamps: the
    step also returns each task's start / deps met / end on the globaltimer (`persistent_step(task_stamps=True)`,
    GPU only, not with the profiler), and STAMP_LAUNCHES more launches report their critical paths
    (`profile.stamped_task_times` + `profile.critical_path`: `stamped_critical_paths`, the first with its path)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.bench_decode import synthetic_state
    from glm_fast import Model, load_config
    from glm_fast.engine.forward import main_cached
    from glm_fast.engine.ops import XLA
    from pallas_kernels.persistent.format import Op
    from pallas_kernels.persistent.kernel import PersistentDecoder, persistent_step
    from pallas_kernels.persistent.tiles import TileConfig

    cfg = load_config(config).model
    model = Model(cfg, rngs=nnx.Rngs(0))
    state = synthetic_state(cfg, 1, context, context + 64, 0, model.dtype, jax.random.key(1))
    caches = state.layers
    tokens = jax.random.randint(jax.random.key(2), (1, n_tokens), 0, cfg.vocab_size)
    pos = context + jnp.arange(n_tokens, dtype=jnp.int32)[None]
    ok = jnp.ones((1, n_tokens), bool)
    graphdef, params = nnx.split(model)
    xla = jax.jit(lambda p, c: main_cached(nnx.merge(graphdef, p), c, tokens, pos, ok, XLA))
    if ops is None:
        t0 = time.perf_counter()
        jax.block_until_ready(xla(params, caches))
        return {"first_call_s": time.perf_counter() - t0,
                "median_ms": _median_ms(xla, (params, caches), reps)}
    interpret = jax.default_backend() != "gpu"  # CPU: GPU interpret mode, a smoke test of this script
    if profile and interpret:
        raise SystemExit("--profile needs the GPU: Mosaic GPU's on-device profiler does not run in interpret mode")
    stamps = stamps or profile  # a profile's cycles convert at the clock rate its stamps measure
    if (stamps or task_stamps) and interpret:
        raise SystemExit("--stamps needs the GPU: the globaltimer / clock stamps do not run in interpret mode")
    if task_stamps and profile:
        raise SystemExit("--task-stamps replaces the profiler's task ranges: run it without --profile")
    from pallas_kernels.persistent.schedule import ScheduleOptions
    given = {k: v for k, v in (("attn_splits", attn_splits), ("attn_heads", attn_heads)) if v is not None}
    extra = {k: v for k, v in (("assign", assign), ("index_chunks", index_chunks), ("expert_format", expert_format),
                               ("router_splits", router_splits)) if v}
    if hoist is not None:
        extra["hoist"] = hoist
    options = ScheduleOptions(**given, **extra) if given or (extra and interpret) else None  # None: the decoder's
    if extra and options is None:  # the decoder's choice of attention layout, with these options
        from pallas_kernels.persistent.kernel import gpu_candidates, pick_plan
        picked = pick_plan(cfg, n_tokens, gpu_candidates(**extra), TileConfig(), cache_dir=False)
        options = ScheduleOptions(**picked.schedule.meta["key"]["options"])
    dec = PersistentDecoder(model, options, interpret=interpret, cache_dir=False)
    plan, weights = dec.plan(n_tokens), dec.weights(n_tokens)
    arrays = []
    for bid in plan.caches:
        _, layer, field = plan.schedule.buffers[bid].name.split("/")
        arrays.append(getattr(caches[int(layer)], field)[0])
    cos, sin = model.rope(pos)
    op_set = frozenset(Op[o] for o in ops)
    tiles = dataclasses.replace(dec.tiles_for(n_tokens), topk_bits=topk_bits, solo_ring=solo_ring,
                                **({"slots": slots} if slots else {}),  # slots None: the decoder's ring
                                **({"step_tiles": step_tiles} if step_tiles else {}))
    full = set(ops) == set(FULL)
    profile_dir = tempfile.mkdtemp(prefix="persistent_profile_") if profile else None
    step = jax.jit(lambda w, c: persistent_step(plan, w, c, tokens[0], pos[0], cos[0], sin[0], interpret=interpret,
                                                ops=op_set, sync=sync, tiles=tiles, buffers=full or probe,
                                                profile_dir=profile_dir, stamps=stamps, task_stamps=task_stamps,
                                                lowering=None if lowering == "jax" else lowering))
    t0 = time.perf_counter()
    sampler = _Sampler()
    lowered = step.lower(weights, arrays)
    lowering_profile = sampler.stop()
    t1 = time.perf_counter()
    print(f"lowered in {t1 - t0:.1f} s", file=sys.stderr, flush=True)  # a parent that times out keeps these lines
    compiled = lowered.compile()
    t2 = time.perf_counter()
    print(f"compiled in {t2 - t1:.1f} s", file=sys.stderr, flush=True)
    logits, h, rows, *bufs = jax.block_until_ready(compiled(weights, arrays))
    bufs = bufs[:len(bufs) - stamps - task_stamps]
    print(f"first launch returned in {time.perf_counter() - t2:.1f} s", file=sys.stderr, flush=True)
    out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": time.perf_counter() - t0,
           "median_ms_profiled" if profile else "median_ms": _median_ms(compiled, (weights, arrays), reps),
           "bytes_of_ops": int(sum(t.nbytes for t in plan.schedule.tasks if t.op in op_set)),
           "slots": tiles.slots, "topk_bits": tiles.topk_bits, "step_tiles": tiles.step_tiles,
           "solo_ring": tiles.solo_ring, "assign": plan.schedule.meta["key"]["options"]["assign"],
           "lowering": lowering}
    if trace_launches:
        from glm_fast import device_trace
        with tempfile.TemporaryDirectory(prefix="persistent_trace_") as tmp:
            path = device_trace.capture(lambda: compiled(weights, arrays), trace_launches, tmp)
            out["device_trace"] = device_trace.breakdown(path, trace_launches)
    if stamps:
        from pallas_kernels.persistent.profile import launch_window
        out["launch_windows"] = [launch_window(jax.block_until_ready(compiled(weights, arrays))[-1 - task_stamps])
                                 for _ in range(STAMP_LAUNCHES)]
    if task_stamps:
        from pallas_kernels.persistent.profile import critical_path, stamped_task_times
        paths = [critical_path(stamped_task_times(jax.block_until_ready(compiled(weights, arrays))[-1],
                                                  plan.schedule.sm_lists()), plan.schedule)
                 for _ in range(STAMP_LAUNCHES)]
        out["stamped_critical_paths"] = [p if i == 0 else {k: v for k, v in p.items() if k != "path"}
                                         for i, p in enumerate(paths)]
    if profile:
        out.update(_profile(compiled, (weights, arrays), profile_dir, plan.schedule))
        out["profile_note"] = ("median_ms_profiled includes the profiler's records and its per-launch trace dump "
                               "callback: not comparable with an unprofiled median_ms")
        shutil.rmtree(profile_dir)
    if full or probe:
        out["lowering_profile"] = lowering_profile
        if full:
            out["check"] = _full_check(model, caches, tokens, pos, ok, plan, logits, h, rows, context)
        for name, check in (("tasks_vs_simulator", _tasks_vs_simulator),
                            ("buffers_vs_simulator", _buffers_vs_simulator),
                            ("flips_vs_simulator", _flips_vs_simulator)):
            if name.split("_")[0] not in checks or (probe and check is not _tasks_vs_simulator):
                continue
            try:
                args = (rows, op_set) if check is _tasks_vs_simulator else ()
                out[name] = check(plan, model, caches, tokens, pos, bufs[0], *args)
            except Exception as e:  # noqa: BLE001 -- a simulator failure is reported, the timings are kept
                out[name] = f"{type(e).__name__}: {e}"[:2000]
    elif {"EMBED", "GEMV", "KV_WRITE", "IK_WRITE"} <= set(ops):
        _, _, new = xla(params, caches)
        errs = {}
        for bid, got in zip(plan.caches, rows):
            _, layer, field = plan.schedule.buffers[bid].name.split("/")
            if int(layer) != 0:
                continue
            want = getattr(new[0], field)[0, context:context + n_tokens].astype(jnp.float32)
            g = got.astype(jnp.float32)  # [T, X]
            errs[field] = {"rel_err": float(jnp.abs(g - want).max() / jnp.abs(want).max()),
                           "finite": bool(jnp.isfinite(g).all())}
        out["layer0_rows_vs_xla"] = errs
    return out


def main(argv=None):
    from pallas_kernels.persistent.schedule import ASSIGNMENTS, parse_hoist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="glm5_slice")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1, help="T: tokens per step (1 + MTP depth: a verification step)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--variants", default="xla,walk,skeleton,dense,full," + ",".join(FULL),
                   help="comma list of: xla, walk, skeleton, dense, lowered, full, index, an opcode name, or "
                        "opcodes joined by + (a probe)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant (compile + run)")
    p.add_argument("--slots", type=int, default=None,
                   help="SMEM ring depth of the tile bodies (TileConfig.slots; default: the decoder's, "
                        "kernel.fit_tiles)")
    p.add_argument("--attn-splits", type=int, default=None,
                   help="split-KV factor of the attention tasks (ScheduleOptions.attn_splits; default: "
                        "PersistentDecoder's choice)")
    p.add_argument("--attn-heads", type=int, default=None,
                   help="heads per attention task (ScheduleOptions.attn_heads; 64 = one gather of the selected rows "
                        "for all heads)")
    p.add_argument("--topk-bits", type=int, default=2,
                   help="key bits INDEX_TOPK's radix select decides per pass (TileConfig.topk_bits: 1, 2 or 4)")
    p.add_argument("--step-tiles", type=int, default=None,
                   help="weight tiles per ring step of GEMV / SWIGLU streams (TileConfig.step_tiles: 1, 2 or 4; "
                        "default its default)")
    p.add_argument("--no-solo-ring", action="store_true",
                   help="the single-weight streams (GEMV, bf16 SWIGLU_DOWN) take one weight ring, as the others do, "
                        "not both as one ring twice as deep (TileConfig.solo_ring)")
    p.add_argument("--assign", default=None, choices=ASSIGNMENTS,
                   help="the schedule's SM assignment (ScheduleOptions.assign; default its default)")
    p.add_argument("--hoist", default=None,
                   help="comma-separated op names the levels / mixed assignments order with their producers "
                        "(ScheduleOptions.hoist; 'none' for no op; default its default)")
    p.add_argument("--expert-format", choices=("bf16", "fp8"), default=None,
                   help="the routed experts' weights (ScheduleOptions.expert_format; default bf16): fp8 streams "
                        "e4m3 tiles + block scales, half the experts' bytes")
    p.add_argument("--index-chunks", type=int, default=None,
                   help="indexer score tasks per layer (ScheduleOptions.index_chunks; default its default)")
    p.add_argument("--router-splits", type=int, default=None,
                   help="split-K parts of a MoE layer's router GEMV, whose partials ROUTER_SELECT sums "
                        "(ScheduleOptions.router_splits; default its default)")
    p.add_argument("--trace-launches", type=int, default=0,
                   help="per variant, a jax.profiler trace of this many more launches: the kernels' device time "
                        "(glm_fast.device_trace), e.g. the per-launch cost of the bare table walk")
    p.add_argument("--lowering", default="lane", choices=("lane", "warpgroup", "jax"),
                   help="Mosaic GPU lowering semantics of the persistent variants (jax: jax's default)")
    p.add_argument("--checks", default="tasks,buffers,flips", help="the full variant's simulator checks to run")
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    p.add_argument("--name", default=None)
    p.add_argument("--stamps", action="store_true",
                   help="GPU only: each CTA's globaltimer / clock at its start and end, over 5 more launches")
    p.add_argument("--task-stamps", action="store_true",
                   help="GPU only: every task's start / deps met / end on the globaltimer, without the profiler: "
                        "the critical paths of 5 more launches")
    p.add_argument("--ptxas", action="store_true",
                   help="GPU only: each variant's ptxas report (Mosaic's MOSAIC_GPU_DUMP_PTXAS log on the child's "
                        "stdout): registers, stack frame, spills and ptxas' warnings, in the row's `ptxas`")
    p.add_argument("--profile", action="store_true",
                   help="persistent variants with the on-device profiler: a per-op time breakdown (GPU only)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:  # one variant; the parent reads the last stdout line
        ops = None if args.child == "xla" else SETS.get(args.child, args.child.split("+"))
        print(json.dumps(run_variant(args.config, args.context, ops, args.reps, sync=args.child != "walk",
                                     slots=args.slots, checks=tuple(args.checks.split(",")),
                                     probe="+" in args.child, profile=args.profile,
                                     attn_splits=args.attn_splits, attn_heads=args.attn_heads,
                                     n_tokens=args.tokens, topk_bits=args.topk_bits,
                                     step_tiles=args.step_tiles, assign=args.assign,
                                     index_chunks=args.index_chunks, lowering=args.lowering,
                                     router_splits=args.router_splits,
                                     trace_launches=args.trace_launches, stamps=args.stamps,
                                     hoist=None if args.hoist is None else parse_hoist(args.hoist),
                                     task_stamps=args.task_stamps, expert_format=args.expert_format,
                                     solo_ring=not args.no_solo_ring)), flush=True)
        return
    from glm_fast import results
    from pallas_kernels.persistent import ptxas
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--context", str(args.context),
               "--tokens", str(args.tokens),
               "--reps", str(args.reps), *(["--slots", str(args.slots)] if args.slots else []),
               "--topk-bits", str(args.topk_bits),
               *(["--step-tiles", str(args.step_tiles)] if args.step_tiles else []),
               *(["--no-solo-ring"] if args.no_solo_ring else []),
               *(["--assign", args.assign] if args.assign else []),
               *(["--hoist", args.hoist] if args.hoist is not None else []),
               *(["--index-chunks", str(args.index_chunks)] if args.index_chunks else []),
               *(["--router-splits", str(args.router_splits)] if args.router_splits else []),
               *(["--expert-format", args.expert_format] if args.expert_format else []),
               "--checks", args.checks, "--lowering", args.lowering, "--child", v,
               *(["--profile"] if args.profile else []),
               *(["--trace-launches", str(args.trace_launches)] if args.trace_launches else []),
               *(["--stamps"] if args.stamps else []),
               *(["--task-stamps"] if args.task_stamps else []),
               *(["--attn-splits", str(args.attn_splits)] if args.attn_splits else []),
               *(["--attn-heads", str(args.attn_heads)] if args.attn_heads else [])]
        t0 = time.perf_counter()
        # Not MOSAIC_GPU_DUMP_TO: it turns on every dump, ~670 MB of MLIR pass logs for glm5_slice's kernel.
        env = {**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1"} if args.ptxas else None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "error": f"exit {proc.returncode}: " + proc.stderr.strip()[-1500:]}
            if args.ptxas:
                report = ptxas.report(proc.stdout + "\n" + proc.stderr)
                row["ptxas"] = report if report["functions"] else {
                    "error": "no ptxas log in the child's output: the kernel compiles for the GPU only"}
        except subprocess.TimeoutExpired as e:  # the child's progress lines say which stage it was in
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            stages = [ln for ln in err.splitlines() if ln.startswith(("lowered", "compiled", "first launch"))]
            row = {"error": f"no result in {args.timeout} s (compile hang or deadlocked launch)", "stages": stages}
        row = {"variant": v, **row, "wall_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row)[:2000], flush=True)
    record = results.result("bench_persistent", {"config": args.config, "context": args.context, "tokens": args.tokens,
                                                 "reps": args.reps, "slots": args.slots,
                                                 "topk_bits": args.topk_bits, "step_tiles": args.step_tiles,
                                                 "solo_ring": not args.no_solo_ring, "assign": args.assign,
                                                 "index_chunks": args.index_chunks,
                                                 "router_splits": args.router_splits,
                                                 "expert_format": args.expert_format,
                                                 "hoist": args.hoist,
                                                 "lowering": args.lowering,
                                                 "profile": args.profile, "trace_launches": args.trace_launches,
                                                 "stamps": args.stamps, "task_stamps": args.task_stamps,
                                                 "ptxas": args.ptxas,
                                                 "attn_splits": args.attn_splits,
                                                 "attn_heads": args.attn_heads},
                             rows)
    path = results.write(record, args.out, args.name or f"bench_persistent_{args.config}")
    print("wrote", path)
    return record


if __name__ == "__main__":
    main()
