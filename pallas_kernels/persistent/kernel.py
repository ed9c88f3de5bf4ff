"""The persistent decode kernel (DESIGN.md sec. 4): one Pallas Mosaic GPU launch executes a compiled `Schedule`.

    plan = KernelPlan.build(schedule)                   # host: ref layout + per-task dispatch table (once)
    weights = PersistentWeights.from_model(model, plan)  # device: weights stacked by (shape, dtype) (once)
    logits, h, rows = persistent_step(plan, weights, caches, tokens, pos, cos, sin, interpret=...)

Layout. The kernel needs static shapes per code path, so every parameter the schedule names is put into a *weight
stack* of all weights of the same (shape, dtype) (e.g. all MoE layers' q_a [L, K, N]; all layers' expert gate
weights [L, E, D, I]), and every scratch buffer into a *buffer stack* of the same (shape, dtype) (e.g. h_embed,
every h_mid and h_out [n, T, D]). A task becomes (branch, dynamic indices): `branch` selects a code path specialised
on the op, its static args (tile widths, head counts, whether a norm / residual / expert slot is present) and the
stacks of its weights and buffers; the dynamic part (index of each weight and buffer in its stack, column / head /
split / chunk / slot numbers) is one int32 row of `KernelPlan.aux`. The kernel dispatches with `lax.switch` over the
branches. Caches are per-layer refs (read-only in the kernel): the KV_WRITE / IK_WRITE tasks write the step's new
rows into small `rows` outputs, readers of the cache (indexer scores, attention) overlay those rows on the cached
ones, and the caller writes the T rows into the caches with an XLA scatter at `pos` -- in place under the engine's
buffer donation, the same O(T)-row write the XLA backend does. The per-layer caches of one field (c_kv, k_pe, index
keys) form a *cache group*: a task names its layer by its member index (a dynamic aux entry, like a stack index),
and a body reads the member's ref through a `lax.switch` around just its TMA issue (`_Refs.with_caches`), so ATTN /
INDEX_SCORE / KV_WRITE / IK_WRITE have one code path for all layers instead of one per layer (glm5_slice: 25
branches instead of 37; compile time grows with the branch count). The `rows` outputs are stacked per group
([members, T, X]). (Aliasing the whole cache into the kernel -- `jax.new_ref` or `input_output_aliases` -- does not
run in GPU interpret mode on jax 0.10.2: closed-over refs have no memory space there, and `pallas_call` scratch
barriers cannot be initialised.)

Synchronisation seam (`_Seam`): on the GPU, grid = one CTA per SM; CTA c walks its list `schedule.sm_tasks[c]`;
before a task it waits on each (counter, target) of its record and after it signals its own counter. Counters are
grid-wide semaphores (`pl.get_global(plgpu.SemaphoreType.REGULAR((n,)))`, verified on the H200 by
shared/probes/xcta_semaphores.py), zeroed by Pallas before every launch (its GMEM scratch is a zero-filled
operand). A task that completes adds 1 to its counter (`red.release.gpu`); a waiter polls until the counter
reaches `target` (the counter's task count) with plain acquire loads and leaves it as it is (`decrement=False`):
one atomic per task and no CAS traffic on hot counters. GPU memory scope (`memory_scope="gpu"`), not the default
system scope: every CTA is on this GPU. Waits already implied by an earlier wait of the same SM list are dropped
by the schedule compiler (`schedule._drop_known_waits`). Measured on the H200 at glm5_slice, bodiless launch:
9.74 ms with W = waiter-count single increments and decrementing CAS waits, 2.20 ms with W added as binary
digits, 1.08 ms with the per-list wait dedup, 0.40 ms with this seam (the table walk alone: 0.28 ms;
experiments/results/bench_persistent_glm5_slice*.json). In GPU interpret mode (no semaphores) the seam is
replaced by dependency-ordered execution: one CTA walks the global topological order (`schedule.records`, task id
= position), and wait / signal are no-ops.

Op bodies. GEMV (fused RMSNorm, residual, [N, K] weights, f32 router logits as split-K partials), SWIGLU_UP and
SWIGLU_DOWN (dense, shared, routed with the expert id read at run time) are TMA weight tiles through an SMEM ring +
swap-AB wgmma (`tiles.py`, reusing `pallas_kernels.gemv`'s tile functions); ABSORB is the same over K-major W_uk
tiles plus RoPE spread over the warpgroup's threads (`tiles.rope_rows`); UV merges the step's token rows of the
split-KV partials in registers and stages them through the CTA's GMEM scratch into its x tiles, then W_uv tiles;
KV_WRITE normalises x tiles (+ RoPE), IK_WRITE is a row LayerNorm + RoPE;
MOE_COMBINE adds [8, 64] SMEM tiles; EMBED moves one row per token by TMA; ROUTER_SELECT is vector reductions over
one row of scores per token; ATTN (`attn_tiles.py`) is absorbed sparse MLA over per-row TMA gathers of the selected
latent rows; INDEX_SCORE / INDEX_TOPK (`index_tiles.py`) are the lightning indexer's wgmma scores and an exact radix
select. All lower for CUDA at glm5_slice with jax 0.10.2 and compile together on the H200 with jax 0.11.2 (README:
status and figures) and run in GPU interpret mode on the CPU tests' configs (with 64 x 64 tiles as on the GPU, and
with smaller tiles that fit tiny's 16-wide heads). Where a branch's shapes do not split into the tiles, the v1 body
runs: plain `jnp` on values loaded from the GMEM refs, the numerics of `simulate.py`'s tile references, in interpret
mode only (Mosaic GPU has no gather, top_k, general dot_general). tests/test_persistent_kernel.py: tiny, float32 and
bf16, T = 1 and 3, context past index_topk; Engine(backend="persistent") greedy == XLA with D = 0 and 1.

FP8 experts (`ScheduleOptions(expert_format="fp8")`): each routed expert weight is a q stack [n, E, N, K] e4m3 and
a parallel stack of its 128 x 128 block scales (`KernelPlan.fp8_scales`: member j's scales are member j of that
stack, so a task's record names only q; `PersistentWeights.from_model` quantizes the model's weights). The tile
bodies stream [TN, 128] e4m3 tiles (`tiles.swiglu_up_body`), the v1 jnp bodies dequantize per row and block.

Weight prefetch. The dense GEMV / SWIGLU bodies are `prefetching`: they issue their first ring slots' weight tiles
(and norm weights), then take the task's dependency wait, then copy the activations, so each SM streams the next
task's weights while the producers of its inputs finish (routed experts wait first: their expert id is the
router's output). Not yet: a producer warpgroup that streams across task boundaries.

Memory model. A task's inputs are GMEM written by other CTAs, through TMA stores (most bodies) or generic stores
(scalar outputs: the router's slots, the indexer's selection). The seam puts a `fence.proxy.async.global` before
each signal and after each wait (`_compat.fence_proxy_async_global`), and bodies read other CTAs' activations
through TMA into SMEM, not as GMEM loads. (The two bodies that computed wrong values on the H200 while they read
GMEM scalars were wrong for other reasons, found later -- SMEM scalar ordering in ROUTER_SELECT, the in-place
RoPE in INDEX_SCORE; whether generic GMEM loads after the fenced wait would also be right is untested.)
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from glm_fast.model.rope import apply_rope
from pallas_kernels import _compat, fp8
from pallas_kernels import gemv as gemv_mod
from pallas_kernels import ref
from pallas_kernels.persistent import attn_tiles
from pallas_kernels.persistent import index_tiles
from pallas_kernels.persistent import tiles as tl
from pallas_kernels.persistent.format import (
    C_ATTN_SCALE, C_INDEX_SCALE, C_INDEX_WSCALE, C_ROUTED_SCALE, MAX_INPUTS,
    MAX_OUTPUTS, MAX_WAITS, MAX_WEIGHTS, NUM_ARGS, Kind, Op)
from pallas_kernels.persistent.schedule import FP8_SCALE, Schedule
from pallas_kernels.persistent.simulate import _JNP, _layernorm, _rope_front, _route, sum_parts

GRID_AXIS = "sm"
# Mosaic GPU lowering semantics (`persistent_step(lowering=...)`): lane semantics, jax 0.10's default, on every
# jax. jax 0.11 defaults to warpgroup semantics, whose Python layout inference made the kernel's lowering on the
# H200 150-250 s at T = 1 and 390-470 s at T = 4 -- and that T = 4 kernel's launch did not return
# (bench_persistent_glm5_slice_t4_time.json). With lane semantics (jax 0.11.2, glm5_slice, 4K context) T = 1
# lowers in 21-23 s with a 2.16 ms critical path (..._rope_lane.json; warpgroup's last was 2.25 ms, ..._tidy.json),
# T = 4 in 22-25 s, and every task of layers 0-1 matches the simulator (..._lane.json, ..._rope_t4.json).
TASK_STAMPS = 6  # int32 columns per task of `persistent_step(task_stamps=True)`: (globaltimer, clock) x 3 events
_LOWERING = {"lane": plgpu.LoweringSemantics.Lane, "warpgroup": plgpu.LoweringSemantics.Warpgroup}

# aux row: [branch, signal, n_waits, (counter, target) x MAX_WAITS, weight idx x 3, input idx x 6, output idx x 2,
#           args x 5]
A_BRANCH, A_SIGNAL, A_NWAITS, A_WAITS = 0, 1, 2, 3
A_W = A_WAITS + 2 * MAX_WAITS
A_IN = A_W + MAX_WEIGHTS
A_OUT = A_IN + MAX_INPUTS
A_ARGS = A_OUT + MAX_OUTPUTS
AUX_WIDTH = 32  # >= A_ARGS + NUM_ARGS (28); 128-byte rows for the TMA of a CTA's table
# Rows of a CTA's dispatch table per SMEM buffer (the walk double-buffers them): 8 KB of SMEM at any list length,
# where the whole table took 18.5 KB at glm5_slice T = 4 (145 tasks per SM) and kept 64 x 32 attention out of it.
TABLE_CHUNK = 32

# Per op: the args that change the code path (part of the branch key); the others are read at run time. An
# expert slot / output slot only enters the key through its sign (present or not).
_STATIC_ARGS = {Op.EMBED: (), Op.GEMV: (1, 2, 3), Op.KV_WRITE: (0,), Op.IK_WRITE: (0,), Op.INDEX_SCORE: (1, 2),
                Op.INDEX_TOPK: (1,), Op.ABSORB: (), Op.ATTN: (1, 3), Op.UV: (), Op.ROUTER_SELECT: (0, 1, 2, 3),
                Op.SWIGLU_UP: (1, 3), Op.SWIGLU_DOWN: (1,), Op.MOE_COMBINE: (1,)}
_SIGN_ARGS = {Op.SWIGLU_UP: (2,), Op.SWIGLU_DOWN: (2, 3)}


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Host-side mapping of a schedule onto the kernel's refs (see the module docstring).

    weight_stacks / buffer_stacks: ((shape, dtype), member ids) per stack; weight_slot / buffer_slot: id ->
    (stack, index) (buffers: ("in", i) for the step's inputs, ("cache", g, m) for member m of cache group g,
    ("stack", s, j) else); branches: the branch keys; aux int32 [n_tasks, AUX_WIDTH]; caches: buffer ids of the
    CACHE buffers (the order of `persistent_step`'s cache arrays); cache_groups: per group, its members' positions
    in `caches` (one field of every layer, in layer order). fp8_scales: per weight stack, the stack of its block
    scales when it holds FP8 q weights (member j's scales are that stack's member j), else -1.
    """
    schedule: Schedule
    weight_stacks: tuple
    weight_slot: tuple
    buffer_stacks: tuple
    buffer_slot: tuple
    caches: tuple
    inputs: tuple
    branches: tuple
    aux: np.ndarray
    logits_buffer: int
    hidden_buffer: int
    cache_groups: tuple = ()
    arg_align: tuple = ()
    fp8_scales: tuple = ()

    @classmethod
    def build(cls, s: Schedule) -> "KernelPlan":
        groups: dict = {}
        for i, w in enumerate(s.weights):  # an FP8 weight's scales: a stack parallel to its q's (same members)
            q = s.weights[i - 1] if w.name.endswith(FP8_SCALE) else None
            groups.setdefault((w.shape, w.dtype) if q is None else (w.shape, w.dtype, q.shape, q.dtype), []).append(i)
        keys = list(groups)
        fp8_scales = tuple(next(j for j, k in enumerate(keys) if k[2:] == key) if key[1] == "float8_e4m3fn" else -1
                           for key in keys)
        weight_stacks = tuple((k[:2], tuple(v)) for k, v in groups.items())
        weight_slot = [None] * len(s.weights)
        for si, (_, members) in enumerate(weight_stacks):
            for j, w in enumerate(members):
                weight_slot[w] = (si, j)
        groups, caches, inputs, cache_groups = {}, [], [], {}
        buffer_slot = [None] * len(s.buffers)
        for i, b in enumerate(s.buffers):
            if b.kind == Kind.INPUT:
                buffer_slot[i] = ("in", len(inputs))
                inputs.append(b.name)
            elif b.kind == Kind.CACHE:  # name "layers/<layer>/<field>"
                gkey = (b.name.split("/")[-1], b.shape[1:], b.dtype)
                members = cache_groups.setdefault(gkey, [])
                buffer_slot[i] = ("cache", list(cache_groups).index(gkey), len(members))
                members.append(len(caches))
                caches.append(i)
            else:
                groups.setdefault((b.shape, b.dtype), []).append(i)
        buffer_stacks = tuple((k, tuple(v)) for k, v in groups.items())
        for si, (_, members) in enumerate(buffer_stacks):
            for j, b in enumerate(members):
                buffer_slot[b] = ("stack", si, j)
        branches: dict = {}
        aux = np.full((len(s.records), AUX_WIDTH), 0, np.int32)
        hidden = None
        for t in s.tasks:
            static = tuple(t.args[a] for a in _STATIC_ARGS[t.op]) + tuple(
                int(t.args[a] >= 0) for a in _SIGN_ARGS.get(t.op, ()))
            key = (int(t.op), static,
                   tuple(weight_slot[w][0] if w >= 0 else -1 for w in t.weights),
                   tuple(buffer_slot[b][:2] if b >= 0 else None for b in t.inputs),
                   tuple(buffer_slot[b][:2] if b >= 0 else None for b in t.outputs))
            row = aux[t.id]
            row[A_BRANCH] = branches.setdefault(key, len(branches))
            row[A_SIGNAL], row[A_NWAITS] = t.signal, len(t.waits)
            for j, (c, target) in enumerate(t.waits):
                row[A_WAITS + 2 * j], row[A_WAITS + 2 * j + 1] = c, target
            for base, ids, table in ((A_W, t.weights, weight_slot), (A_IN, t.inputs, buffer_slot),
                                     (A_OUT, t.outputs, buffer_slot)):
                for j, x in enumerate(ids):
                    row[base + j] = table[x][-1] if x >= 0 and table[x][0] != "in" else 0
            layers = {buffer_slot[b][2] for b in (*t.inputs, *t.outputs) if b >= 0 and buffer_slot[b][0] == "cache"}
            if len(layers) > 1:  # `with_caches` switches over one member index for all of a task's caches
                raise ValueError(f"task {t.id} ({t.op.name}) reads caches of different layers: {sorted(layers)}")
            row[A_ARGS:A_ARGS + NUM_ARGS] = t.args
            if t.layer == -1 and t.op == Op.GEMV:  # the LM head reads the last hidden state
                hidden = t.inputs[0]
        logits = next(i for i, b in enumerate(s.buffers) if b.kind == Kind.OUTPUT)
        return cls(s, weight_stacks, tuple(weight_slot), buffer_stacks, tuple(buffer_slot), tuple(caches),
                   tuple(inputs), tuple(branches), aux, logits, hidden, tuple(map(tuple, cache_groups.values())),
                   _arg_align(aux, len(branches)), fp8_scales)

    def sm_aux(self) -> np.ndarray:
        """int32 [num_sms, rows, AUX_WIDTH]: each SM's aux rows in list order, padded with branch -1 rows to a
        multiple of TABLE_CHUNK rows (the kernel's walk fetches whole chunks)."""
        tasks = self.schedule.sm_tasks
        rows = -(-tasks.shape[1] // TABLE_CHUNK) * TABLE_CHUNK
        out = np.full((tasks.shape[0], rows, AUX_WIDTH), -1, np.int32)
        out[:, :tasks.shape[1]][tasks >= 0] = self.aux[tasks[tasks >= 0]]
        return out

    @property
    def tokens(self) -> int:
        return int(self.schedule.meta["tokens"])


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class PersistentWeights:
    """The schedule's weights stacked per (shape, dtype): `stacks[i]` is [n_i, *shape] (built once per engine)."""
    stacks: tuple

    def tree_flatten(self):
        return (self.stacks,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @classmethod
    def from_model(cls, model, plan: KernelPlan) -> "PersistentWeights":
        """The stacks of `model`'s weights (FP8 ones quantized from the model's: `simulate.weight_arrays`)."""
        from pallas_kernels.persistent.simulate import weight_arrays
        arrays = weight_arrays(model, plan.schedule.weights)
        return cls(tuple(jnp.stack([arrays[m] for m in members]) for _, members in plan.weight_stacks))


# ---- the synchronisation seam -------------------------------------------------------------------------------


class _Seam:
    """wait(aux_row) / signal(aux_row): GMEM semaphores on the GPU, nothing under dependency-ordered execution."""

    def __init__(self, num_counters: int, ordered: bool):
        self.ordered = ordered
        self.sems = None if ordered else pl.get_global(plgpu.SemaphoreType.REGULAR((num_counters,)))

    def wait(self, get):
        """Until each of the task's counters reaches its target (all its producer tasks signalled); then a proxy
        fence, so this task's TMA loads see what the producers wrote with generic stores."""
        if self.ordered:
            return
        with jax.named_scope("wait"):  # a profiler range (`persistent_step(profile_dir=...)`)
            for j in range(MAX_WAITS):
                @pl.when(j < get(A_NWAITS))
                def _():
                    plgpu.semaphore_wait(self.sems.at[get(A_WAITS + 2 * j)], get(A_WAITS + 2 * j + 1),
                                         decrement=False, memory_scope="gpu")
            _compat.fence_proxy_async_global()

    def signal(self, get):
        """+1 on the task's counter, after its writes (release), behind a proxy fence: the release orders the
        task's TMA stores (waited for by the body) too, for consumers that read them with generic loads."""
        if self.ordered:
            return
        _compat.fence_proxy_async_global()
        plgpu.semaphore_signal(self.sems.at[get(A_SIGNAL)], 1, memory_scope="gpu")


# ---- op bodies (jnp on values loaded from the refs) ----------------------------------------------------------


class _Refs:
    """Kernel refs by role, and typed reads / writes of schedule buffers for one branch. caches: per cache group,
    its members' refs [L, X]; rows: per cache group, the stacked new-row output [members, T, X]; gmem: the per-CTA
    GMEM scratch [CTAs, rows, cols] (None when no body needs one), this CTA's part at `cta`."""

    def __init__(self, plan: KernelPlan, inputs, weights, caches, stacks, rows, tiles: tl.Tiles | None = None,
                 gmem=None, cta=None):
        self.plan, self.inputs, self.weights, self.caches, self.stacks, self.rows = (
            plan, inputs, weights, caches, stacks, rows)
        self.consts = plan.schedule.constants
        self.tiles, self.gmem, self.cta = tiles, gmem, cta

    def read(self, slot, idx):
        """The whole buffer at `slot` (static) and stack / cache-group member index `idx` (traced)."""
        if slot[0] == "in":
            return self.inputs[slot[1]][...]
        if slot[0] == "cache":
            return self.cache(slot[1], idx)
        return self.stacks[slot[1]][idx]

    def with_caches(self, groups, member, fn):
        """fn(*refs): the member's ref of each cache group in `groups` (the layer's c_kv and k_pe, say), chosen by
        `lax.switch` on the traced member index: the branch of every layer shares one code path and only fn's
        code (a TMA issue) is repeated per layer."""
        n = len(self.caches[groups[0]])
        branches = [lambda i=i: fn(*(self.caches[g][i] for g in groups)) for i in range(n)]
        return branches[0]() if n == 1 else lax.switch(member, branches)

    def cache(self, g, member):
        """Cache rows [L, X] with this step's new rows (from the KV_WRITE / IK_WRITE outputs) overlaid."""
        cached, new = self.with_caches((g,), member, lambda ref: ref[...]), self.rows[g][member]
        pos = self.inputs[self.plan.inputs.index("pos")][...]
        hit = jnp.arange(cached.shape[0])[:, None] == pos[None, :]          # [L, T]
        src = jnp.argmax(hit, axis=1)
        return jnp.where(hit.any(1)[:, None], new[src].astype(cached.dtype), cached)

    def write(self, slot, idx, value, *index):
        """buffer[index] = value at `slot` / stack index `idx`; index: traced scalars or pl.ds (no Python ints)."""
        ref = self.stacks[slot[1]]
        ref[(idx, *index)] = value.astype(ref.dtype)

    def full(self, slot):
        return tuple(pl.ds(jnp.int32(0), n) for n in self.stacks[slot[1]].shape[1:])


def _indexer_scores(q, head_w, keys, q_pos, scale):
    """`ref.indexer_scores` for one sequence (q [T, N, H], head_w [T, N], keys [S, H], q_pos [T]) -> [T, S], with
    ReLU as `jnp.maximum`: GPU interpret mode cannot run `jax.nn.relu`'s custom_jvp."""
    dots = jnp.einsum("tnh,sh->tns", q.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    scores = jnp.einsum("tn,tns->ts", head_w.astype(jnp.float32), jnp.maximum(dots, 0.0))
    visible = jnp.arange(keys.shape[0])[None, :] <= q_pos[:, None]
    return jnp.where(visible, scores, -jnp.inf)


def _unique_sorted(ids, num_experts: int, size: int):
    """`jnp.unique(ids, size=size, fill_value=-1)` without scatters (GPU interpret mode runs none): the distinct
    expert ids in increasing order, -1 padded."""
    present = (ids.reshape(-1)[:, None] == jnp.arange(num_experts)[None, :]).any(0)        # [E]
    rank = jnp.cumsum(present.astype(jnp.int32)) - 1
    hit = present[None, :] & (rank[None, :] == jnp.arange(size)[:, None])                  # [U, E]
    return jnp.where(hit.any(1), jnp.argmax(hit, axis=1), -1).astype(jnp.int32)


def _i32(x):
    return jnp.asarray(x, jnp.int32)


# Op bodies as TMA weight tiles + swap-AB wgmma (tiles.py); a body returns None where the shapes do not fit its
# tiles, and the jnp body below runs instead (CPU test configs only).
_TILED = {Op.GEMV: tl.gemv_body, Op.SWIGLU_UP: tl.swiglu_up_body, Op.SWIGLU_DOWN: tl.swiglu_down_body,
          Op.MOE_COMBINE: tl.combine_body, Op.EMBED: tl.embed_body, Op.ABSORB: tl.absorb_body,
          Op.KV_WRITE: tl.kv_write_body, Op.IK_WRITE: tl.ik_write_body, Op.UV: tl.uv_body,
          Op.ROUTER_SELECT: tl.router_body, Op.ATTN: attn_tiles.attn_body,
          Op.INDEX_SCORE: index_tiles.index_score_body, Op.INDEX_TOPK: index_tiles.index_topk_body}


def _arg_align(aux: np.ndarray, n_branches: int, cap: int = 1 << 12) -> tuple:
    """Per branch, per task argument: the largest power of two (<= cap) dividing the argument in every task of
    the branch. Told to Mosaic (`pl.multiple_of`): a TMA box whose GMEM offset comes from the dispatch table
    must be known tile-aligned for the SMEM tiling of its destination (jax >= 0.11's layout inference)."""
    out = []
    for b in range(n_branches):
        args = aux[aux[:, A_BRANCH] == b, A_ARGS:A_ARGS + NUM_ARGS].astype(np.int64)
        align = []
        for col in args.T:
            g = int(np.gcd.reduce(np.append(col, cap)))
            align.append(g & -g)  # its largest power-of-two factor
        out.append(tuple(align))
    return tuple(out)


def _branch_fn(key, r: _Refs, align=(1,) * NUM_ARGS):
    """The code path of one branch key: fn(get, wait, signal) with get(j) -> aux[task, j] (a traced int32), wait()
    the task's dependency wait (called first, or by a `prefetching` tile body itself after its first weight tiles)
    and signal() its release. The whole task, signal included, is a `jax.named_scope` of the op's name: a profiler
    range (`persistent_step(profile_dir=...)`), so that a critical path's gap between a producer's end and its
    consumer's end of wait is the poll alone."""
    op = Op(key[0])
    tiled = _TILED.get(op)
    body = tiled(r, key, r.consts) if tiled is not None else None
    if body is None:
        jnp_body = _jnp_body(key, r)

        def run(get, wait, signal):
            with jax.named_scope(op.name):
                wait()
                jnp_body(get)
                with jax.named_scope("signal"):
                    signal()
        return run
    prefetch = getattr(body, "prefetching", False)

    def run(get, wait, signal):
        with jax.named_scope(op.name):
            if not prefetch:
                wait()
            def arg(a):
                v = get(A_ARGS + a)
                return v if align[a] == 1 else pl.multiple_of(v, align[a])
            body(tl.TaskView(lambda j: get(A_W + j), lambda j: get(A_IN + j), lambda j: get(A_OUT + j), arg,
                             wait if prefetch else (lambda: None)))
            with jax.named_scope("signal"):
                signal()
    return run


def _no_body(get, wait, signal):
    """A branch compiled out (`persistent_step(ops=...)`): the task still waits and signals."""
    wait()
    signal()


def _jnp_body(key, r: _Refs):
    """The v1 body of one branch key (GPU interpret mode only): fn(get), plain jnp on values loaded from the refs."""
    op, static, wstk, islots, oslots = key
    op = Op(op)
    consts = r.consts

    def w(get, j):  # the whole weight j of the task
        return r.weights[wstk[j]][get(A_W + j)]

    def inp(get, j):
        return r.read(islots[j], get(A_IN + j))

    def out_dtype(j):
        return r.stacks[oslots[j][1]].dtype

    def arg(get, a):
        return get(A_ARGS + a)

    def cos_sin():
        names = r.plan.inputs
        return r.inputs[names.index("rope_cos")][...], r.inputs[names.index("rope_sin")][...]

    if op == Op.EMBED:
        def fn(get):
            h = jnp.take(w(get, 0), inp(get, 0), axis=0)
            r.write(oslots[0], get(A_OUT), h, *r.full(oslots[0]))
        return fn

    if op == Op.GEMV:
        n, eps, transposed = static

        out_shape = r.stacks[oslots[0][1]].shape[1:]
        parts = out_shape[0] if len(out_shape) == 3 else 0  # split-K: y[part] = K / parts of the product

        def fn(get):
            c0 = arg(get, 0)
            x = inp(get, 0)
            x = x.reshape(x.shape[0], -1)
            if eps >= 0:
                x = ref.rmsnorm(x, w(get, 1), float(consts[eps]))
            wref = r.weights[wstk[0]]
            if transposed:
                wt = wref[get(A_W), pl.ds(c0, n), :].T
            else:
                wt = wref[get(A_W), :, pl.ds(c0, n)]
            if parts:
                ks = x.shape[1] // parts
                k0 = arg(get, 4) * ks
                x, wt = lax.dynamic_slice_in_dim(x, k0, ks, axis=1), lax.dynamic_slice_in_dim(wt, k0, ks, axis=0)
            dt = out_dtype(0)
            y = ref.gemv(x.astype(dt), wt.astype(dt))
            if islots[1] is not None:
                y = lax.dynamic_slice_in_dim(inp(get, 1), c0, n, axis=1) + y
            at = (pl.ds(_i32(0), y.shape[0]), pl.ds(c0, n))
            if parts:
                y, at = y[None], (pl.ds(arg(get, 4), 1), *at)
            r.write(oslots[0], get(A_OUT), y, *at)
        return fn

    if op == Op.KV_WRITE:
        (eps,) = static

        def fn(get):
            kva, (cos, sin) = inp(get, 0), cos_sin()
            g_kv, g_pe = oslots[0][1], oslots[1][1]
            c = r.rows[g_kv].shape[-1]
            kv_rows, pe_rows = r.rows[g_kv], r.rows[g_pe]
            kv_rows[get(A_OUT)] = ref.rmsnorm(kva[:, :c], w(get, 0), float(consts[eps])).astype(kv_rows.dtype)
            pe_rows[get(A_OUT + 1)] = apply_rope(kva[:, c:], cos, sin).astype(pe_rows.dtype)
        return fn

    if op == Op.IK_WRITE:
        (eps,) = static

        def fn(get):
            (cos, sin), rows = cos_sin(), r.rows[oslots[0][1]]
            y = _layernorm(inp(get, 0), w(get, 0), w(get, 1), float(consts[eps]))
            rows[get(A_OUT)] = _rope_front(y, cos, sin).astype(rows.dtype)
        return fn

    if op == Op.INDEX_SCORE:
        n_chunks, align = static

        def fn(get):
            iq, iw, keys, pos, cos, sin = (inp(get, j) for j in range(6))
            chunk = arg(get, 0)
            nt, heads = iw.shape
            k = r.stacks[oslots[0][1]].shape[-1]
            q = _rope_front(iq.reshape(nt, heads, -1), cos, sin)
            wv = iw.astype(jnp.float32) * float(consts[C_INDEX_WSCALE])
            visible = jnp.max(pos) + 1
            size = ((visible + n_chunks - 1) // n_chunks + align - 1) // align * align
            r0 = chunk * size
            r1 = jnp.minimum(visible, r0 + size)
            scores = _indexer_scores(q, wv, keys, pos, float(consts[C_INDEX_SCALE]))
            rows = jnp.arange(keys.shape[0])
            scores = jnp.where((rows >= r0) & (rows < r1), scores, -jnp.inf)       # [T, L]
            if scores.shape[1] < k:
                scores = jnp.pad(scores, ((0, 0), (0, k - scores.shape[1])), constant_values=-jnp.inf)
            vals, idx = lax.top_k(scores, k)
            # Slots past the chunk's rows: -inf / row 0, as the schedule's format says.
            n_rows = jnp.maximum(r1 - r0, 0)
            pad = jnp.arange(k)[None, :] >= n_rows
            vals, idx = jnp.where(pad, -jnp.inf, vals), jnp.where(pad, 0, idx)
            whole = lambda j: (chunk, *r.full(oslots[j])[1:])  # noqa: E731
            r.write(oslots[0], get(A_OUT), vals, *whole(0))
            r.write(oslots[1], get(A_OUT + 1), idx, *whole(1))
        return fn

    if op == Op.INDEX_TOPK:
        parts = key[1][0]

        def fn(get):
            vals = inp(get, 0)
            part, token, k = get(A_ARGS), get(A_ARGS + 2), vals.shape[2]
            out = index_tiles.topk_reference(vals, inp(get, 1), part, parts, token)
            for j, value in enumerate(out):
                r.write(oslots[j], get(A_OUT + j), value, pl.ds(token, 1), pl.ds(part * (k // parts), k // parts))
        return fn

    def head_dims(get, kv_b_cols, heads, nope=None, v_dim=None):
        both = kv_b_cols // heads
        return (both - v_dim, v_dim) if v_dim is not None else (nope, both - nope)

    if op == Op.ABSORB:
        def fn(get):
            head = arg(get, 0)
            qb, (cos, sin) = inp(get, 0), cos_sin()
            _, heads, rr = r.stacks[oslots[1][1]].shape[1:]
            nope = qb.shape[1] // heads - rr
            wref = r.weights[wstk[0]]
            _, hv = head_dims(get, wref.shape[2], heads, nope=nope)
            q = lax.dynamic_slice_in_dim(qb, head * (nope + rr), nope + rr, axis=1)
            w_uk = wref[get(A_W), :, pl.ds(head * (nope + hv), nope)]               # [C, H_n]
            q_lat = ref.gemv(q[:, :nope], w_uk.T)
            q_pe = apply_rope(q[:, nope:], cos, sin)
            for j, val in ((0, q_lat), (1, q_pe)):
                full = r.full(oslots[j])
                r.write(oslots[j], get(A_OUT + j), val[:, None, :], full[0], pl.ds(head, 1), full[2])
        return fn

    if op == Op.ATTN:
        nh, n_splits = static

        def fn(get):
            h0, split = arg(get, 0), arg(get, 2)
            q_lat, q_pe, c_kv, k_pe, idx, valid = (inp(get, j) for j in range(6))
            kk = idx.shape[1]
            size = math.ceil(kk / n_splits)
            q_lat = lax.dynamic_slice_in_dim(q_lat, h0, nh, axis=1)
            q_pe = lax.dynamic_slice_in_dim(q_pe, h0, nh, axis=1)
            slot = jnp.arange(kk)[None, :]
            valid = (valid != 0) & (slot >= split * size) & (slot < (split + 1) * size)
            scale = float(consts[C_ATTN_SCALE])
            out = ref.sparse_mla_attention(q_lat[None], q_pe[None], c_kv[None], k_pe[None], idx[None],
                                           valid[None], scale)[0]
            logits = (jnp.einsum("tnc,tkc->tnk", q_lat, c_kv[idx]) + jnp.einsum("tnr,tkr->tnk", q_pe, k_pe[idx]))
            logits = jnp.where(valid[:, None, :], logits * scale, -jnp.inf)
            lse = jax.nn.logsumexp(logits, axis=-1)                                  # [T, nh]
            out = jnp.where(jnp.isfinite(lse)[..., None], out, 0.0)
            f0, f1 = r.full(oslots[0]), r.full(oslots[1])
            r.write(oslots[0], get(A_OUT), out[None], pl.ds(split, 1), f0[1], pl.ds(h0, nh), f0[3])
            r.write(oslots[1], get(A_OUT + 1), lse[None], pl.ds(split, 1), f1[1], pl.ds(h0, nh))
        return fn

    if op == Op.UV:
        def fn(get):
            head = arg(get, 0)
            o_part, lse_part = inp(get, 0), inp(get, 1)
            heads, hv = r.stacks[oslots[0][1]].shape[2:]
            wref = r.weights[wstk[0]]
            nope, _ = head_dims(get, wref.shape[2], heads, v_dim=hv)
            lse = lax.dynamic_index_in_dim(lse_part, head, axis=2, keepdims=False)      # [S, T]
            o_h = lax.dynamic_index_in_dim(o_part, head, axis=2, keepdims=False)        # [S, T, C]
            o = jnp.einsum("st,stc->tc", jnp.exp(lse - jax.nn.logsumexp(lse, axis=0)), o_h)
            w_uv = wref[get(A_W), :, pl.ds(head * (nope + hv) + nope, hv)]               # [C, H_v]
            v = ref.gemv(o.astype(out_dtype(0)), w_uv)
            full = r.full(oslots[0])
            r.write(oslots[0], get(A_OUT), v[:, None, :], full[0], pl.ds(head, 1), full[2])
        return fn

    if op == Op.ROUTER_SELECT:
        top_k, n_group, topk_group, norm = static

        def fn(get):
            ids, weights = _route(inp(get, 0), w(get, 0), top_k, n_group, topk_group, norm,
                                  float(consts[C_ROUTED_SCALE]))
            u = r.stacks[oslots[0][1]].shape[1]
            uniq = _unique_sorted(ids, r.weights[wstk[0]].shape[1], u)
            coef = jnp.einsum("tk,tku->ut", weights, (ids[:, :, None] == uniq[None, None, :]).astype(jnp.float32))
            r.write(oslots[0], get(A_OUT), uniq, *r.full(oslots[0]))
            r.write(oslots[1], get(A_OUT + 1), coef, *r.full(oslots[1]))
        return fn

    def expert_cols(get, j, slot_expert, slot, routed, c0, n, dtype):
        """Columns [c0, c0 + n) of weight j, at expert slot_expert[slot] when routed; (tile [K, n], present). An
        FP8 expert weight (q [E, N, K] + block scales) is dequantized to `dtype`, the activations' (as the XLA
        backend's `xla_moe_experts_fp8`)."""
        wref = r.weights[wstk[j]]
        if not routed:
            return wref[get(A_W + j), :, pl.ds(c0, n)], jnp.bool_(True)
        e = slot_expert[slot]
        idx, ee = get(A_W + j), jnp.maximum(e, 0)
        if r.plan.fp8_scales[wstk[j]] < 0:
            return wref[idx, ee, :, pl.ds(c0, n)], e >= 0
        scales = r.weights[r.plan.fp8_scales[wstk[j]]][idx, ee]  # [ceil(N / 128), K padded] f32
        per_row = lax.dynamic_slice_in_dim(jnp.repeat(scales, fp8.BLOCK, axis=0), c0, n, axis=0)
        q = wref[idx, ee, pl.ds(c0, n), :]  # [n, K] e4m3
        s = jnp.repeat(per_row, fp8.BLOCK, axis=1)[:, :q.shape[1]]
        return (q.astype(jnp.float32) * s).astype(dtype).T, e >= 0

    if op == Op.SWIGLU_UP:
        n, eps, routed = static

        def fn(get):
            c0, slot = arg(get, 0), arg(get, 2)
            x = inp(get, 0)
            slots = inp(get, 1) if routed else None
            (g_w, present), (u_w, _) = (expert_cols(get, j, slots, slot, routed, c0, n, x.dtype) for j in (0, 1))
            xn = ref.rmsnorm(x, w(get, 2), float(consts[eps])).astype(jnp.float32)
            g, u = (ref.gemv(xn, wt.astype(jnp.float32)) for wt in (g_w, u_w))
            y = jnp.where(present, jax.nn.silu(g) * u, 0.0)
            full = r.full(oslots[0])
            if routed:
                r.write(oslots[0], get(A_OUT), y[None], pl.ds(slot, 1), full[1], pl.ds(c0, n))
            else:
                r.write(oslots[0], get(A_OUT), y, full[0], pl.ds(c0, n))
        return fn

    if op == Op.SWIGLU_DOWN:
        n, routed, to_slot = static

        def fn(get):
            c0, slot, out_slot = arg(get, 0), arg(get, 2), arg(get, 3)
            a = inp(get, 0)
            slots = inp(get, 2) if routed else None
            wt, present = expert_cols(get, 0, slots, slot, routed, c0, n, a.dtype)
            if routed:
                y = ref.gemv(lax.dynamic_index_in_dim(a, slot, 0, keepdims=False).astype(jnp.float32),
                             wt.astype(jnp.float32))
                y = y * lax.dynamic_index_in_dim(inp(get, 3), slot, 0, keepdims=False)[:, None]
                y = jnp.where(present, y, 0.0)
            else:
                y = ref.gemv(a.astype(jnp.float32), wt.astype(jnp.float32))
                if to_slot:  # shared expert: `ref.swiglu` rounds to the activation dtype before the sum
                    y = y.astype(a.dtype).astype(jnp.float32)
                else:
                    y = lax.dynamic_slice_in_dim(inp(get, 1), c0, n, axis=1) + y.astype(a.dtype)
            full = r.full(oslots[0])
            if routed or to_slot:
                r.write(oslots[0], get(A_OUT), y[None], pl.ds(out_slot, 1), full[1], pl.ds(c0, n))
            else:
                r.write(oslots[0], get(A_OUT), y, full[0], pl.ds(c0, n))
        return fn

    if op == Op.MOE_COMBINE:
        (n,) = static

        def fn(get):
            c0 = arg(get, 0)
            part = lax.dynamic_slice_in_dim(inp(get, 0), c0, n, axis=2)
            y = sum_parts(part).astype(out_dtype(0))
            if islots[1] is not None:  # + h_mid (none after a split-K GEMV)
                y = lax.dynamic_slice_in_dim(inp(get, 1), c0, n, axis=1) + y
            r.write(oslots[0], get(A_OUT), y, r.full(oslots[0])[0], pl.ds(c0, n))
        return fn

    raise NotImplementedError(f"no kernel body for {op.name}")


# ---- the kernel ----------------------------------------------------------------------------------------------


def _slot_shapes(plan: KernelPlan):
    """((U,), (U, T)) of the router's slot tables, None without routed experts."""
    for b in plan.schedule.buffers:
        if b.name.endswith("/slot_expert"):
            return b.shape, (b.shape[0], plan.tokens)
    return None


def _router_shape(plan: KernelPlan):
    """(E, top_k, n_group, U, P: the logits' split-K parts) of the ROUTER_SELECT tasks, None without."""
    for key in plan.branches:
        if key[0] == Op.ROUTER_SELECT:
            top_k, n_group = key[1][0], key[1][1]
            p, _, e = next(b.shape for b in plan.schedule.buffers if b.name.endswith("/router_logits"))
            u = next(b.shape[0] for b in plan.schedule.buffers if b.name.endswith("/slot_expert"))
            return e, top_k, n_group, u, p
    return None


def _scratch_types(plan: KernelPlan, tiles: tl.TileConfig | None, interpret: bool) -> dict:
    if tiles is None:
        return {}
    hidden = plan.schedule.buffers[plan.hidden_buffer]
    parts = [b.shape[0] for b in plan.schedule.buffers if b.name.endswith(("/moe_part", "_parts"))]
    rope = 2 * next(b.shape[-1] for b in plan.schedule.buffers if b.name == "rope_cos")
    o_parts = [b.shape for b in plan.schedule.buffers if b.name.endswith("/o_part")]  # [splits, T, N, C]
    index_dim = max((b.shape[-1] for b in plan.schedule.buffers if b.name.endswith("/index_k")), default=0)
    return tl.scratch_types(_JNP[hidden.dtype], hidden.shape[-1], rope, index_dim, max(parts, default=0),
                            _slot_shapes(plan), tiles, interpret, max((o[0] for o in o_parts), default=0),
                            _router_shape(plan),
                            attn=attn_tiles.plan_shape(plan), index=index_tiles.plan_shape(plan, interpret),
                            latent=max((o[-1] for o in o_parts), default=0),
                            fp8=any(k >= 0 for k in plan.fp8_scales))


def _gmem_shape(plan: KernelPlan, tiles: tl.TileConfig) -> tuple[int, int] | None:
    """(rows, cols) of each CTA's GMEM scratch (hidden dtype), None when no body needs one: INDEX_SCORE's RoPE'd
    q (`index_tiles.gmem_shape`) and UV's merged o [TP, C] (`tiles.uv_body`) go through it, each in its corner
    (a CTA runs one task at a time, and each body waits for its copies before it returns)."""
    latent = max((b.shape[-1] for b in plan.schedule.buffers if b.name.endswith("/o_part")), default=0)
    shapes = [sh for sh in (index_tiles.gmem_shape(plan, tiles), (gemv_mod.TP, latent)) if sh and min(sh)]
    return tuple(max(d) for d in zip(*shapes)) if shapes else None


def _body(plan: KernelPlan, ordered: bool, ops: frozenset | None, tiles: tl.TileConfig | None, interpret: bool,
          sync: bool, stamps: bool, task_stamps: bool, *refs, **scratch):
    s = plan.schedule
    n_in, n_w, n_c = len(plan.inputs), len(plan.weight_stacks), len(plan.caches)
    aux_ref, sm_ref, *refs = refs
    if task_stamps:  # [CTAs, TASK_STAMPS * table rows] (`persistent_step(task_stamps=True)`)
        refs, task_ref = refs[:-1], refs[-1]
    if stamps:  # the launch window's output [CTAs, 4] (`persistent_step(stamps=True)`)
        refs, stamp_ref = refs[:-1], refs[-1]
        _compat.stamp(stamp_ref, 0)
    inputs, refs = refs[:n_in], refs[n_in:]
    weights, refs = refs[:n_w], refs[n_w:]
    caches, refs = refs[:n_c], refs[n_c:]
    caches = tuple(tuple(caches[k] for k in members) for members in plan.cache_groups)
    stacks, refs = refs[:len(plan.buffer_stacks)], refs[len(plan.buffer_stacks):]
    rows, gmem = refs[:len(plan.cache_groups)], (refs[len(plan.cache_groups):] or [None])[0]
    cta = lax.axis_index(GRID_AXIS)
    r = _Refs(plan, inputs, weights, caches, stacks, rows,
              tl.Tiles(scratch, tiles, interpret, cta * 0) if tiles is not None else None, gmem, cta)
    fns = []
    for key, align in zip(plan.branches, plan.arg_align):
        if ops is None or Op(key[0]) in ops:
            fns.append(_branch_fn(key, r, align))
        else:
            fns.append(_no_body)
    seam = _Seam(len(s.counters), ordered or not sync)

    def run_task(get, pos=None):
        """The task whose table row `get` reads; pos: its position in this CTA's list (the task stamps' row)."""
        def mark(k):  # event k (start, deps met, end) of the task
            if task_stamps:
                _compat.stamp(task_ref, pos * TASK_STAMPS + 2 * k)

        def wait():  # every body calls it once (a body marked `prefetching` after its first weight tiles)
            seam.wait(get)
            mark(1)
        signal = lambda: seam.signal(get)  # noqa: E731

        mark(0)
        if len(fns) == 1:
            fns[0](get, wait, signal)
        else:
            lax.switch(get(A_BRANCH), [lambda f=f: f(get, wait, signal) for f in fns])
        mark(2)

    if ordered and s.num_sms > 1:  # dependency-ordered execution: the global topological order on one CTA
        @pl.loop(0, len(s.records))
        def _(task):
            run_task(lambda j: aux_ref[task, j])
    else:  # this CTA's rows of the per-SM table, TABLE_CHUNK rows at a time through two SMEM buffers (Mosaic
        # reads scalars from SMEM, not GMEM); a 1-SM schedule in interpret mode takes this path too (its one list
        # is the global order), testing the table walk
        chunks = sm_ref.shape[1] // TABLE_CHUNK

        def walk(table, bars):
            def fetch(c):
                plgpu.copy_gmem_to_smem(sm_ref.at[cta, pl.ds(c * TABLE_CHUNK, TABLE_CHUNK)], table.at[c % 2],
                                        bars.at[c % 2])
            fetch(0)

            @pl.loop(0, chunks)
            def _(c):
                @pl.when(c + 1 < chunks)
                def _():
                    plgpu.commit_smem()  # (its warpgroup barrier) every thread is done with chunk c - 1's buffer
                    fetch(c + 1)
                plgpu.barrier_wait(bars.at[c % 2])

                @pl.loop(0, TABLE_CHUNK)
                def _(i):
                    @pl.when(table[c % 2, i, A_BRANCH] >= 0)
                    def _():
                        run_task(lambda j: table[c % 2, i, j], c * TABLE_CHUNK + i)

        pl.run_scoped(walk, plgpu.SMEM((2, TABLE_CHUNK, AUX_WIDTH), jnp.int32),
                      plgpu.Barrier(num_arrivals=1, num_barriers=2))
    if stamps:
        _compat.stamp(stamp_ref, 2)


_PHASE_RANGES = 512  # profiler ranges per CTA for the bodies' phases at T = 1 (ATTN: 3 per block and pass per task)
_MOSAIC_SMEM = 30 * 1024  # what the H200 run adds to `smem_bytes`: Mosaic's alignment and barriers (+13.8 KB at
# glm5_slice T = 1 by jax 0.10.2's count on the CPU), jax 0.11.2's own buffers and the profiler's (+14.7 KB more:
# 235,520 B on the H200, bench_persistent_glm5_slice_ring8.json, against 220,832 B by 0.10.2's count)


def kernel_chars(lowered) -> int:
    """The length of the Mosaic GPU custom call in a lowered module's StableHLO text (the serialized kernel): a
    measure of the code Mosaic's layout inference works through, whose time dominates lowering on jax 0.11.2."""
    calls = [line for line in lowered.as_text().splitlines() if "mosaic_gpu" in line]
    if not calls:
        raise ValueError("kernel_chars: no Mosaic GPU kernel in the lowered module")
    return max(map(len, calls))


def smem_bytes(plan: KernelPlan, tiles: tl.TileConfig) -> int:
    """The GPU kernel's SMEM per CTA as the scratch declares it: the tile bodies' buffers (ATTN's union with the
    rings counted once) plus the dispatch table's two chunk buffers. A lower bound: Mosaic adds alignment, barriers
    and its own buffers (`_MOSAIC_SMEM`)."""
    table = 2 * TABLE_CHUNK * AUX_WIDTH * 4
    return table + sum(attn_tiles._nbytes(v) for v in _scratch_types(plan, tiles, False).values())


def abstract_step_args(plan: KernelPlan, max_len: int) -> tuple:
    """ShapeDtypeStructs of `persistent_step`'s (weights, caches, tokens, pos, cos, sin) for `plan` with caches of
    `max_len` rows: lowering and compiling the kernel without any arrays."""
    s = plan.schedule
    weights = PersistentWeights(tuple(jax.ShapeDtypeStruct((len(m), *shape), _JNP[dt])
                                      for (shape, dt), m in plan.weight_stacks))
    caches = [jax.ShapeDtypeStruct((max_len, s.buffers[b].shape[1]), _JNP[s.buffers[b].dtype]) for b in plan.caches]
    ids = jax.ShapeDtypeStruct((plan.tokens,), jnp.int32)
    rope = s.buffers[plan.buffer_slot.index(("in", plan.inputs.index("rope_cos")))]
    half = jax.ShapeDtypeStruct((plan.tokens, rope.shape[-1]), _JNP[rope.dtype])
    return weights, caches, ids, ids, half, half


def _step_inputs(plan: KernelPlan, tokens, pos, cos, sin):
    values = {"tokens": tokens.astype(jnp.int32), "pos": pos.astype(jnp.int32), "rope_cos": cos, "rope_sin": sin}
    out = []
    for name in plan.inputs:
        b = plan.schedule.buffers[plan.buffer_slot.index(("in", plan.inputs.index(name)))]
        out.append(values[name].reshape(b.shape).astype(_JNP[b.dtype]))
    return out


def persistent_step(plan: KernelPlan, weights: PersistentWeights, caches, tokens, pos, cos, sin, *,
                    interpret=False, ops=None, tiles: tl.TileConfig | None = tl.TileConfig(), sync: bool = True,
                    buffers: bool = False, profile_dir: str | None = None, lowering: str | None = "lane",
                    stamps: bool = False, task_stamps: bool = False):
    """One decode step in one kernel launch.

    caches: per CACHE buffer of `plan.caches`, its array [L, X] (batch squeezed); tokens, pos int [T];
    cos, sin [T, R/2]. Returns (logits [T, V], h [T, D] (the last layer's output, before the final norm),
    new rows per cache buffer [T, X]). interpret: False (compile for the GPU) or True / InterpretGPUParams
    (GPU interpret mode; the seam is then dependency-ordered execution on one CTA). ops: restrict the compiled
    branches to these opcodes (the others become no-ops; for lowering checks only). tiles: the TMA + wgmma
    bodies' tuning (tiles.py), None for the v1 jnp bodies everywhere. sync=False compiles the cross-CTA waits
    and signals out (a race: for timing the bare table walk only). buffers=True also returns every scratch
    buffer's final value, {buffer id: array} (to locate a wrong op against `simulate.simulate_step`'s).
    profile_dir: turn on Mosaic GPU's on-device profiler (GPU only; 16 bytes of SMEM per range, ~12 KB at
    glm5_slice): every launch records, per CTA, a range per task named by its op with the dependency wait's range
    ("wait") and its release ("signal") nested in it, and at T = 1 the bodies' phases (`tl.phase`; at T > 1 their
    per-token ranges would overflow the profiler's SMEM), in SM clock cycles, and a `jax.debug.callback` dumps them
    to `profile_dir/<name>-<time_ns>-trace.json` (Chrome trace format; jax 0.10.2 names the file once per lowering
    and does not overwrite it: a later launch's trace needs it removed first). `profile.trace_breakdown` reads it.
    lowering: Mosaic GPU's lowering semantics, "lane" (see `_LOWERING`'s note) / "warpgroup" / None (jax's
    default: warpgroup on jax 0.11, lane on 0.10).
    stamps: also return, last, int32 [CTAs, 4]: per CTA (globaltimer's low 32 bits in ns, SM clock) as its body
    starts, then as its task walk ends (`_compat.stamp`; GPU only): the launch's window on one clock for all SMs,
    against the kernel's device time, and the SM clock rate (`profile.launch_window` reads them).
    task_stamps: also return, last, int32 [CTAs, TASK_STAMPS * table rows]: for the task at position p of a CTA's
    list, columns TASK_STAMPS * p + 2 k, + 1 hold (globaltimer, clock) as it starts (k = 0), as its dependency wait
    ends (k = 1) and as its body and signal end (k = 2); columns past the list are not written. Every task's
    times without the profiler (`profile.stamped_task_times` reads them for `profile.critical_path`). GPU only.
    Light: glm5_slice's launch 2.103 -> 2.108 ms with them (experiments/results/session23/), since every thread
    stores (`_compat.stamp`: a one-thread branch made ptxas serialize the kernel's wgmmas, 2.49 ms, session22/).
    """
    if lowering is not None and lowering not in _LOWERING:
        raise ValueError(f"persistent_step: lowering={lowering!r}; use one of {sorted(_LOWERING)} or None "
                         "(jax's default)")
    # Out-of-bounds TMA reads (x rows T..7, the columns past a ragged last tile) zero-fill on the GPU and only
    # reach accumulator rows that are never stored; the interpreter must be told to allow them.
    params = gemv_mod.interpret_params(interpret)
    ordered = params is not None
    if profile_dir is not None and ordered:
        raise ValueError("profile_dir: profiling needs the GPU (Mosaic GPU's on-device profiler), not interpret mode")
    if (stamps or task_stamps) and ordered:
        raise ValueError("stamps: the globaltimer / clock stamps need the GPU, not interpret mode")
    s = plan.schedule
    compiler = {}
    phases = profile_dir is None or plan.tokens == 1  # the bodies' phase ranges (`tl.PHASES`): at T = 1 only
    if profile_dir is not None:  # ranges per CTA: an op, a wait and a signal range per task; Mosaic's "Init"; the
        # dump's header
        space = 3 * int((s.sm_tasks >= 0).sum(1).max()) + 8 + (_PHASE_RANGES if phases else 0)
        compiler.update(profile_space=space, profile_dir=profile_dir)
    if lowering is not None:
        compiler["lowering_semantics"] = _LOWERING[lowering]
    compiler_params = plgpu.CompilerParams(**compiler) if compiler else None
    stack_types = [jax.ShapeDtypeStruct((len(m), *shape), _JNP[dtype]) for (shape, dtype), m in plan.buffer_stacks]
    row_types = [jax.ShapeDtypeStruct((len(m), plan.tokens, s.buffers[plan.caches[m[0]]].shape[1]),
                                      caches[m[0]].dtype) for m in plan.cache_groups]
    gmem = _gmem_shape(plan, tiles) if tiles is not None else None  # per-CTA GMEM scratch
    if gmem is not None:
        hidden = _JNP[s.buffers[plan.hidden_buffer].dtype]
        row_types.append(jax.ShapeDtypeStruct((1 if ordered else s.num_sms, *gmem), hidden))
    stamp_types = [jax.ShapeDtypeStruct((s.num_sms, 4), jnp.int32)] if stamps else []
    if task_stamps:
        stamp_types.append(jax.ShapeDtypeStruct((s.num_sms, TASK_STAMPS * plan.sm_aux().shape[1]), jnp.int32))
    kernel = plgpu.kernel(
        lambda *refs, **scratch: _body(plan, ordered, None if ops is None else frozenset(ops), tiles, ordered,
                                       sync, stamps, task_stamps, *refs, **scratch),
        out_type=(*stack_types, *row_types, *stamp_types),
        scratch_types=_scratch_types(plan, tiles, ordered),
        grid=(1 if ordered else s.num_sms,),
        grid_names=(GRID_AXIS,),
        compiler_params=compiler_params,
        interpret=params,
    )
    marks = tl.PHASES.set(phases)
    try:
        outs = kernel(jnp.asarray(plan.aux), jnp.asarray(plan.sm_aux()), *_step_inputs(plan, tokens, pos, cos, sin),
                      *weights.stacks, *caches)
    finally:
        tl.PHASES.reset(marks)
    stacks, rows = outs[:len(stack_types)], outs[len(stack_types):len(stack_types) + len(row_types)]
    rows = [rows[g][m] for g, m in (plan.buffer_slot[b][1:] for b in plan.caches)]  # (drops the GMEM scratch)

    def buffer(b):
        _, si, j = plan.buffer_slot[b]
        return stacks[si][j]

    result = (buffer(plan.logits_buffer), buffer(plan.hidden_buffer), rows)
    if buffers:
        result += ({b: buffer(b) for b, slot in enumerate(plan.buffer_slot) if slot[0] == "stack"},)
    return result + tuple(outs[len(outs) - stamps - task_stamps:])


GPU_CHOICES = ((64, 32), (8, 16), (8, 8))  # (attn_heads, attn_splits) on the GPU, best first (`gpu_candidates`)


def gpu_candidates(**options) -> list:
    """ScheduleOptions to try on the GPU, best first. ATTN tasks are latency-bound per-row TMA gathers of the
    selected latent rows: every head group gathers the split's rows again, so 64 heads per task gather them once
    for all heads, and 32 splits keep a split's 64 rows resident in SMEM for both column passes (one gather per
    row instead of 16). 16 splits of 8 heads halved ATTN's time against 8 splits on the H200 at glm5_slice, T = 1
    (experiments/results/bench_persistent_glm5_slice_topk_splits16.json vs ..._profile.json). 64 x 32 fits
    glm5_slice at T = 1 and T = 4 since the dispatch table is walked in chunks (`TABLE_CHUNK`); before, T = 4's
    whole table (145 tasks per SM) left it short of SMEM and 8 x 16 was taken at every width."""
    from pallas_kernels.persistent.schedule import ScheduleOptions
    return [ScheduleOptions(attn_heads=h, attn_splits=sp, **options) for h, sp in GPU_CHOICES]


def default_options(cfg, interpret: bool, tiles: tl.TileConfig, cache_dir=None, **options):
    """The ScheduleOptions a `PersistentDecoder` given none takes (`options` fixes fields, e.g. expert_format):
    interpret mode's defaults, else `pick_plan`'s choice among `gpu_candidates` at the widest step the engine
    runs, T = 1 + cfg.mtp_depth."""
    from pallas_kernels.persistent.schedule import ScheduleOptions
    if interpret:
        return ScheduleOptions(**options)
    plan = pick_plan(cfg, 1 + cfg.mtp_depth, gpu_candidates(**options), tiles, cache_dir)
    return ScheduleOptions(**plan.schedule.meta["key"]["options"])


def pick_plan(cfg, tokens: int, candidates: list, tiles: tl.TileConfig, cache_dir=None) -> KernelPlan:
    """The plan of the first candidate ScheduleOptions whose SMEM fits with the shallowest weight ring
    (`smem_bytes` + `_MOSAIC_SMEM`), else the last candidate -- Mosaic's own check is the judge
    (tests/test_persistent_kernel.py lowers the picks for the H200). Schedules come from `load_or_compile`'s disk
    cache (cache_dir=False: compiled, not cached)."""
    from pallas_kernels.persistent.schedule import compile_schedule, load_or_compile
    shallow = dataclasses.replace(tiles, slots=min(tiles.slots, MIN_SLOTS))  # `fit_tiles` may go down to it
    for i, options in enumerate(candidates):
        if cache_dir is False:
            s = compile_schedule(cfg, tokens, options)
        else:
            s, _ = load_or_compile(cfg, tokens, options, cache_dir=cache_dir)
        plan = KernelPlan.build(s)
        if i == len(candidates) - 1:
            return plan
        try:
            if smem_bytes(plan, shallow) + _MOSAIC_SMEM <= gemv_mod.SMEM_BYTES:
                return plan
        except ValueError:  # no GPU scratch for these shapes (a config for interpret mode): the last one decides
            continue
    raise ValueError("pick_plan: no candidate ScheduleOptions given")


MIN_SLOTS = 4  # the shallowest weight ring `fit_tiles` takes


def fit_tiles(plan: KernelPlan, tiles: tl.TileConfig) -> tl.TileConfig:
    """`tiles` with the deepest weight ring, from tiles.slots down to MIN_SLOTS in steps of 2, whose SMEM fits with
    the plan's (`smem_bytes` + `_MOSAIC_SMEM`): glm5_slice takes 8 slots at T = 1 and T = 4. A ring no shallower
    than MIN_SLOTS is returned even where nothing fits, and `tiles` as given for a plan without GPU scratch (a
    config for interpret mode: lowering it says why)."""
    depths = [tiles.slots] + [d for d in range(tiles.slots - 2, MIN_SLOTS - 1, -2)]
    for d in depths:
        cand = dataclasses.replace(tiles, slots=d)
        try:
            if smem_bytes(plan, cand) + _MOSAIC_SMEM <= gemv_mod.SMEM_BYTES:
                return cand
        except ValueError:
            return tiles
    return dataclasses.replace(tiles, slots=min(tiles.slots, MIN_SLOTS))


class PersistentDecoder:
    """The main-model forward of decode / verification steps (batch 1, T = 1 + D) through `persistent_step`:
    schedules and plans per T compiled on first use (`load_or_compile`'s disk cache), weights stacked once. On the
    GPU with a cache (cache_dir not False) the lowered step itself is cached too (`aot.exported_step`): a warm
    start deserializes it instead of tracing and lowering the kernel."""

    def __init__(self, model, options=None, interpret=None, cache_dir=None, tiles: tl.TileConfig | None = None):
        self.tiles = tiles or tl.TileConfig()
        self.cfg = model.cfg
        self.options = options  # None: `plan` picks them once, for the widest T
        self.interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
        self.cache_dir = cache_dir
        self._plans: dict = {}
        self._tiles: dict = {}
        self._weights: dict = {}
        self._exported: dict = {}
        self._model = model

    def plan(self, tokens: int) -> KernelPlan:
        """The plan for T = tokens, of one ScheduleOptions at every T: the given options, else (on the GPU)
        `pick_plan`'s choice at the widest step the engine runs, T = 1 + cfg.mtp_depth, else (interpret mode, no
        GPU SMEM to fit) the defaults. One attention layout at every width is what keeps MTP lossless: a split-KV
        merge over a different split count rounds differently, and on the H200 greedy D = 3 tokens left plain
        greedy's at the 20th of 64 with 32 splits at T = 1 and 16 at T = 4, and matched with one layout at both
        (tests/test_persistent_kernel.py, gpu mark). glm5_slice takes 64 heads x 32 splits, plain decoding's
        fastest (a 2.16 ms critical path vs 8 x 16's 2.34, bench_persistent_glm5_slice_rope_{lane,8x16}.json)."""
        if self.options is None:
            self.options = default_options(self.cfg, self.interpret, self.tiles, self.cache_dir)
        if tokens not in self._plans:
            self._plans[tokens] = pick_plan(self.cfg, tokens, [self.options], self.tiles, self.cache_dir)
        return self._plans[tokens]

    def tiles_for(self, tokens: int) -> tl.TileConfig:
        """The tile config of T = tokens: on the GPU the deepest ring that fits its plan (`fit_tiles`), else the
        given one."""
        if tokens not in self._tiles:
            self._tiles[tokens] = self.tiles if self.interpret else fit_tiles(self.plan(tokens), self.tiles)
        return self._tiles[tokens]

    def _step(self, plan: KernelPlan, *args):
        """persistent_step on flat args (weight stacks, caches, tokens, pos, cos, sin): through the cached
        Exported on the GPU (see the class docstring), else directly."""
        tiles = self.tiles_for(plan.tokens)

        def fn(stacks, *rest):
            return persistent_step(plan, PersistentWeights(tuple(stacks)), *rest, interpret=self.interpret,
                                   tiles=tiles)
        if self.interpret or self.cache_dir is False:
            return fn(*args)
        from pallas_kernels.persistent import aot
        from pallas_kernels.persistent.schedule import default_cache_dir
        specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
        key = (plan.schedule.meta["hash"], str(specs))
        if key not in self._exported:
            self._exported[key], _ = aot.exported_step(fn, plan, specs, tiles=tiles,
                                                       cache_dir=self.cache_dir or default_cache_dir())
        return self._exported[key].call(*args)

    def weights(self, tokens: int) -> PersistentWeights:
        """Stacked weights (the stacking depends only on the weight table, shared by every T)."""
        plan = self.plan(tokens)
        key = tuple((k, len(m)) for k, m in plan.weight_stacks)
        if key not in self._weights:
            self._weights[key] = PersistentWeights.from_model(self._model, plan)
        return self._weights[key]

    def __call__(self, model, weights: PersistentWeights, layer_caches: list, tokens, pos, ok):
        """tokens, pos, ok [1, T] -> (logits [1, T, V], h [1, T, D], caches with the T rows written)."""
        b, t = tokens.shape
        if b != 1:
            raise ValueError(f"the persistent kernel decodes batch 1, got batch {b}")
        plan = self.plan(t)
        cos, sin = model.rope(pos)
        arrays = []
        for bid in plan.caches:
            _, layer, field = plan.schedule.buffers[bid].name.split("/")
            arrays.append(getattr(layer_caches[int(layer)], field)[0])
        logits, h, rows = self._step(plan, list(weights.stacks), arrays, tokens[0], pos[0], cos[0], sin[0])
        new = [dict() for _ in layer_caches]
        for bid, r in zip(plan.caches, rows):
            _, layer, field = plan.schedule.buffers[bid].name.split("/")
            new[int(layer)][field] = r[None]
        caches = [c.write(pos, ok, **rows_) for c, rows_ in zip(layer_caches, new)]
        return logits[None], h[None], caches
