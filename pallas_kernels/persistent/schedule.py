"""Ahead-of-time schedule of one decode step for the persistent kernel (DESIGN.md sec. 4): lowering, SM
assignment, statistics and the on-disk cache.

`compile_schedule(cfg, tokens, options)` lowers one step of the main model (embedding, every decoder layer,
final norm + LM head) for T = `tokens` query tokens of one sequence (1 + D for MTP verification) into op groups
of tile-level tasks (`format.Op`): one GEMV task per output column tile, per-head absorb / W_uv tasks, attention
per head group, indexer score chunks + a top-k merge per token in `index_topk_parts` parts, the router's logit
tiles + selection, expert tasks per (routed slot, tile) with the expert id read at run time from the selection's
slot table, and a combine per column tile. RMSNorms are fused into the consuming GEMVs, RoPE into the cache writes /
absorb / score tasks, residual adds into o_proj and the dense down projection. Split-K (a MOE_COMBINE per column tile
sums the parts): the router, each layer's first projections, and the LM head's column tiles beyond whole rounds of
`num_sms` (`ScheduleOptions.router_splits` / `proj_splits` / `head_splits`).

Dependencies: every buffer has a producer op group; an op group waits on the counters of its inputs' producers
(for a routed down tile only its expert slot's up tiles: `_Lowering.swiglu`), minus those already implied by another
wait (transitive reduction). Several op groups may signal one counter (`_counters`). Every scratch buffer is written
exactly once per step (per-layer buffers), so there are no write-after-read hazards.

Assignment (deadlock freedom): tasks are put in one global topological order and dealt in that order
(`ScheduleOptions.assign`):
- "levels": by dependency level (longest path from the step's inputs), largest first within a level, each task to
  the SM with the fewest bytes of that level so far (LPT per level);
- "mixed" (the default): the same order and LPT for the weight-streaming tasks; a latency-bound task (an op with an
  `op_us` entry: indexer, top-k, attention, W_uv, router selection, ...) to the SM that the cost model expects to
  start it first, rather than one still streaming an earlier level's tiles;
- "list": the same order, each task to the SM that a cost model (`sm_gb_s`, `task_us`, `op_us`) expects to be free
  first (list scheduling);
- "critical": by bottom level (the cost model's longest time from a task's start to the end of the step, which
  falls along every dependency, so the order is topological) with the list assignment: the tasks of the longest
  remaining chain go first on every SM, e.g. the indexer's score tasks before the q_b tiles that the levels order
  put ahead of them on their SMs (those feed only the absorb, which waits for the top-k anyway).
Every SM's list is a subsequence of the global order, so at any moment the earliest unfinished task in the global
order is the head of its SM's list and all its producers (earlier in the order) are finished: some SM can always
progress, whatever the interleaving. `simulate.py` checks it anyway.

    sched = load_or_compile(cfg.model, tokens=4, options=ScheduleOptions(num_sms=132), gpu="H200")
    sched.sm_records()      # int32 [num_sms, max_tasks, 32]: what the kernel TMA's in
    python -m pallas_kernels.persistent.schedule glm5_slice     # statistics at T = 1 and 4
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import heapq
import json
import math
import operator
import os
import pathlib
import tempfile
import time
import warnings

import numpy as np

from glm_fast.config import ModelConfig, load_config
from glm_fast.model.rope import attention_scale
from pallas_kernels.persistent.format import (
    C_ATTN_SCALE, C_EPS6, C_INDEX_SCALE, C_INDEX_WSCALE, C_RMS_EPS, C_ROUTED_SCALE, ARITY, F_ARGS, F_BYTES, F_ID,
    F_INPUTS, F_LAYER, F_NWAITS, F_OP, F_OUTPUTS, F_SIGNAL, F_TILE, F_WAITS, F_WEIGHTS, MAX_INPUTS,
    MAX_OUTPUTS, MAX_WAITS, MAX_WEIGHTS, NUM_ARGS, RECORD_WIDTH, Buffer, Counter, Kind, Op, Task, Weight)

FORMAT_VERSION = 3  # 2: INDEX_TOPK tasks per (token, part); 3: 5 args per task (GEMV's split-K part)
ASSIGNMENTS = ("levels", "list", "critical", "mixed")
EXPERT_FORMATS = ("bf16", "fp8")
FP8_Q, FP8_SCALE = "@fp8_q", "@fp8_scale"  # name suffixes of an FP8 weight's q and scale (`_Builder.fp8_weight`)
FP8_BLOCK = 128  # the block of an FP8 weight's scales (== pallas_kernels.fp8.BLOCK; this module imports no jax)
K_ALIGN = 64  # a split-K part's rows: a multiple of the GPU bodies' k tile (TileConfig.tile_k)
# The cost model's time per task (us) of the ops whose time is latency rather than weight bytes, on the H200 at
# glm5_slice, 4K context, T = 1: INDEX_SCORE, ABSORB, ATTN as their tasks' bodies took on the profiled critical
# path of experiments/results/bench_persistent_glm5_slice_ab19_hoist_profile.json (18-20, 13-15, 37-39 us), UV
# its mean body after its dependency wait since its token-row merge (experiments/results/session27/
# s27c_uv_profile.json; 30-31 us before; at glm5_slice, T = 1-4, the schedule is the same with either),
# INDEX_TOPK an estimate: that profile's 40-48 us less session 20's A/B saving of 35 us per step over 4 layers
# (experiments/results/session20/ab20_{base,topkslots}.json; on session 20's profiled path it took 45-56 us);
# the others the mean time per task after its dependency wait in ..._warp_gather.json (profile.ops).
OP_US = (("INDEX_TOPK", 40.0), ("ATTN", 38.0), ("UV", 13.5), ("ROUTER_SELECT", 15.0), ("EMBED", 13.5),
         ("INDEX_SCORE", 19.0), ("ABSORB", 13.0), ("KV_WRITE", 9.0), ("IK_WRITE", 3.0), ("MOE_COMBINE", 2.0))


def fp8_scale_id(weights, q: int) -> int:
    """The id of FP8 weight q's block scales in a schedule's weight table (declared right after q)."""
    name = weights[q].name
    if not name.endswith(FP8_Q) or weights[q + 1].name != name[:-len(FP8_Q)] + FP8_SCALE:
        raise ValueError(f"weight {q} ({name}) is not an FP8 q weight followed by its scales")
    return q + 1


@dataclasses.dataclass(frozen=True)
class ScheduleOptions:
    """Tiling and balancing of a schedule (all part of the cache key).

    tile_n: output columns per GEMV / expert task (the GPU tile kernels take 64 or 128; the CPU tests use odd
    sizes to exercise ragged last tiles). attn_heads, attn_splits: an attention task covers attn_heads heads
    and 1/attn_splits of the top-K slots (split-KV; the W_uv tasks merge the partial softmaxes), so that no
    single SM streams all K selected rows. index_chunks: indexer score
    tasks per full layer (each covers 1/index_chunks of the visible rows at run time); index_align: row
    granularity of a chunk. index_topk_parts: top-K merge tasks per token of a full layer, each writing 1/parts
    of the token's selected rows (the largest divisor of K not above it): the merge's compaction is a scalar loop
    over the candidates around its share of the list, which on one SM was the step's critical path; every part
    repeats the (vector) select, so more parts cost only SMs that wait for the attention anyway.
    index_topk_tasks: at most this many merge tasks per layer over all T tokens (fewer parts per token where
    T * index_topk_parts exceeds it): one task per token and part, so a verification step's tokens merge on
    different SMs at once; about one per SM, since a second round of tasks on an SM is on the critical path.
    proj_splits: split-K parts of a layer's first GEMVs, over its normed input (q_a, kv_a, the indexer's wk and
    weights_proj), at most (`_Lowering.k_parts`): at glm5_slice their 44 column tiles of 0.8 MB each streamed
    through 44 SMs (24 us on the critical path of every layer, bench_persistent_glm5_slice_router_split.json);
    P parts run on P x 44 SMs, then a MOE_COMBINE per column tile (no residual) sums them into the bf16 output.
    router_splits: split-K parts of a MoE layer's router GEMV, at most (`_Lowering.k_parts`): its one column tile (E =
    64 <= tile_n) streamed 0.8 MB through one SM, on the critical path of every MoE layer (21.7 us as profiled at
    nvidia-smi's 1980 MHz, bench_persistent_glm5_slice_stamps_profiled.json); P parts on P SMs prefetch their K / P
    rows whole into their rings while the attention runs, and ROUTER_SELECT sums the partials.
    head_splits: split-K parts, at most, of the lm_head's column tiles beyond whole rounds of num_sms (44 of 2420
    at glm5_slice): in the last round they streamed 0.8 MB each through 44 SMs while the other 88 idled, the CTAs'
    end skew of 27-34 us (bench_persistent_glm5_slice_stamps.json); P parts on P x 44 SMs, then a MOE_COMBINE per
    tile sums them into the logits. (A split covering every tile, fewer tiles than SMs, is not taken.)
    context_hint: cached tokens assumed when weighing the indexer and attention tasks (balancing only).
    num_sms: task lists (one persistent CTA per SM; 132 on H100/H200). assign: "mixed" (`_assign_levels` with the
    latency-bound tasks list-scheduled: on the H200 at glm5_slice the kernel took 2.151 ms against 2.202 / 2.204 ms
    for "levels" without / with `hoist`, one lease, experiments/results/bench_persistent_glm5_slice_ab19_*_stamps
    .json), "levels" (`_assign_levels`), "list"
    (`_assign_list` in level order; on the H200 at glm5_slice its critical path was 2.50 ms against 2.47 ms for
    "levels": experiments/results/bench_persistent_glm5_slice_uv_{list,levels}.json; 2.17 against 2.14 ms:
    ..._assign_list.json, bytes-only costs) or "critical" (`_assign_list` in bottom-level order; three A/B pairs on
    the H200 gave 2.114 / 2.105 / 2.116 ms against 2.108 / 2.114 / 2.118 for "levels": the indexer runs earlier, the
    dense layer and the experts' tail lose it again, assign_ab_session15/,
    ..._{signal,stride}_{critical,levels}.json). sm_gb_s, task_us, op_us: the cost model of a task, task_us + the
    op's entry in op_us (ops whose time is latency, not weight bytes), else task_us + bytes / sm_gb_s (one SM's TMA
    weight stream ran at ~32 GB/s on the H200, ~1 us between tasks on one SM:
    bench_persistent_glm5_slice_step2_norm.json).
    hoist: op names whose tasks the "levels" / "mixed" assignments order and balance one dependency level early,
    with their producers' level (first among its tasks of equal height; weighed by the cost model's time as bytes at
    sm_gb_s): an INDEX_SCORE task then heads its SM's list in the level of the indexer's q and q_b tiles and waits
    there for its inputs, where the per-level balancing had queued it behind two or three q_b tiles (~20 us per
    layer on the critical path; q_b only feeds the absorb, which the attention's wait for the top-K outlasts).
    Under "mixed" a hoisted task's SM takes no weight tiles of that level (`_assign_levels`' clear).
    expert_format: the routed experts' weights, "bf16" (the model dtype) or "fp8": e4m3 with 128 x 128 block
    scales (`pallas_kernels.fp8`, DeepSeek-V3's layout: q [E, N, K], K contiguous), quantized from the model's
    weights by `PersistentWeights.from_model`; each q weight of the schedule is followed by its scale weight
    (`fp8_scale_id`); tile_n must divide 128. The tile bodies stream [TN, 128] e4m3 tiles with one block scale
    each, converted to f16 in registers (`tiles.swiglu_up_body`, `gemv.mma_fp8_tiles`).
    """
    tile_n: int = 64
    attn_heads: int = 8
    attn_splits: int = 8
    index_chunks: int = 32
    index_align: int = 64
    index_topk_parts: int = 64
    index_topk_tasks: int = 128
    proj_splits: int = 3
    router_splits: int = 8
    head_splits: int = 3
    context_hint: int = 4096
    num_sms: int = 132
    assign: str = "mixed"
    sm_gb_s: float = 32.0
    task_us: float = 1.0
    op_us: tuple[tuple[str, float], ...] = OP_US
    hoist: tuple[str, ...] = ("INDEX_SCORE",)
    expert_format: str = "bf16"

    def __post_init__(self):
        for name in ("tile_n", "attn_heads", "index_chunks", "index_align", "index_topk_parts",
                     "index_topk_tasks", "proj_splits", "router_splits", "head_splits", "context_hint",
                     "num_sms"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScheduleOptions.{name}={getattr(self, name)}: must be a positive integer")
        if self.assign not in ASSIGNMENTS:
            raise ValueError(f"ScheduleOptions.assign={self.assign!r}: one of {', '.join(map(repr, ASSIGNMENTS))}")
        if not (self.sm_gb_s > 0 and self.task_us >= 0):
            raise ValueError(f"ScheduleOptions: the cost model needs sm_gb_s > 0 and task_us >= 0, got "
                             f"{self.sm_gb_s=} {self.task_us=}")
        object.__setattr__(self, "op_us", tuple((str(n), float(us)) for n, us in self.op_us))  # from JSON: lists
        for name, us in self.op_us:
            if name not in Op.__members__ or not us >= 0:
                raise ValueError(f"ScheduleOptions.op_us: ({name!r}, {us}) needs an Op name and a time >= 0 (us)")
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"ScheduleOptions.expert_format={self.expert_format!r}: one of "
                             f"{', '.join(map(repr, EXPERT_FORMATS))}")
        if self.expert_format == "fp8" and FP8_BLOCK % self.tile_n:
            raise ValueError(f"ScheduleOptions: expert_format='fp8' needs tile_n dividing {FP8_BLOCK} (a column tile "
                             f"within one block of scales, as the FP8 tile bodies take one scale per tile), got "
                             f"tile_n={self.tile_n}")
        object.__setattr__(self, "hoist", tuple(str(n) for n in self.hoist))
        for name in self.hoist:
            if name not in Op.__members__:
                raise ValueError(f"ScheduleOptions.hoist: {name!r} is not an Op name ({', '.join(Op.__members__)})")


@dataclasses.dataclass
class _OpGroup:
    """Tasks sharing op code, weights, buffers and one counter (which other op groups may share: `counter`);
    per-tile args [n, NUM_ARGS] and bytes [n]."""
    name: str
    op: Op
    layer: int
    weights: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    args: np.ndarray
    nbytes: np.ndarray
    deps: tuple[int, ...] = ()
    waits: tuple[int, ...] = ()
    level: int = 0
    ancestors: int = 0  # bitmask of every op group this one transitively depends on
    counter: str = ""  # the counter it signals: op groups of one counter name share it (`_counters`)


class _Builder:
    """Collects buffers, weights and op groups; an op's dependencies are the producers of its input buffers."""

    def __init__(self):
        self.buffers: list[Buffer] = []
        self.weights: list[Weight] = []
        self._weight_ids: dict[str, int] = {}
        self.ops: list[_OpGroup] = []
        self.producers: dict[int, list[int]] = {}

    def buffer(self, name, shape, dtype, kind=Kind.SCRATCH) -> int:
        self.buffers.append(Buffer(name, tuple(int(s) for s in shape), dtype, kind))
        return len(self.buffers) - 1

    def weight(self, name, shape, dtype) -> int:
        if name not in self._weight_ids:
            self._weight_ids[name] = len(self.weights)
            self.weights.append(Weight(name, tuple(int(s) for s in shape), dtype))
        return self._weight_ids[name]

    def fp8_weight(self, name, shape) -> int:
        """An FP8 weight for the reference-layout [..., K, N] weight `name`: q [..., N, K] float8_e4m3fn, then its
        block scales [..., ceil(N/128), ceil(K/128) padded to 4] float32 (`fp8.tma_scales`) as the next weight;
        returns q's id (`fp8_scale_id` finds the scale's)."""
        *lead, k, n = shape
        q = self.weight(name + FP8_Q, (*lead, n, k), "float8_e4m3fn")
        kb = -(-k // FP8_BLOCK)
        s = self.weight(name + FP8_SCALE, (*lead, -(-n // FP8_BLOCK), kb + (-kb % 4)), "float32")
        assert s == q + 1, f"{name}: declared twice"
        return q

    def op(self, name, op, layer, weights, inputs, outputs, args, nbytes, after=None, counter=None) -> int:
        """A new op group; its dependencies are the producers of its input buffers, or where `after` maps an input
        buffer to op group ids, those producers only (a reader of one slot of a slot-indexed buffer). counter: the
        name of the counter it signals (default its own name); op groups of one name share one counter, which
        reaches its target when all of them are done, so a consumer of all of them waits once."""
        if (len(weights), len(inputs), len(outputs)) != ARITY[op]:
            raise AssertionError(f"{name}: {op.name} takes {ARITY[op]} (weights, inputs, outputs)")
        args = [tuple(a) for a in args]
        if any(len(a) > NUM_ARGS for a in args):
            raise AssertionError(f"{name}: more than {NUM_ARGS} args per task")
        args = np.array([a + (0,) * (NUM_ARGS - len(a)) for a in args], np.int64).reshape(-1, NUM_ARGS)
        nbytes = np.broadcast_to(np.asarray(nbytes, np.int64), (len(args),)).copy()
        after = after or {}
        deps = sorted({p for b in inputs if b >= 0 for p in after.get(b, self.producers.get(b, ()))})
        oid = len(self.ops)
        self.ops.append(_OpGroup(name, op, layer, tuple(weights), tuple(inputs), tuple(outputs), args, nbytes,
                                 tuple(deps), counter=counter or name))
        for b in outputs:
            self.producers.setdefault(b, []).append(oid)
        return oid


def _col_tiles(n: int, tile: int, *extra) -> list[tuple[int, ...]]:
    """Args rows (col0, ncols, *extra) covering n columns in tiles of `tile` (the last one ragged)."""
    rows = [(c, min(tile, n - c), *extra) for c in range(0, n, tile)]
    return [r + (0,) * (NUM_ARGS - len(r)) for r in rows]


class _Lowering:
    """Lowers one decode step of `m` for T tokens into a `_Builder`'s op groups (DESIGN.md sec. 4 levels)."""

    def __init__(self, m: ModelConfig, tokens: int, opt: ScheduleOptions):
        self.m, self.t, self.opt, self.b = m, tokens, opt, _Builder()
        self.dt = m.dtype
        self.elt = 2 if m.dtype == "bfloat16" else 4

    def gemv(self, name, layer, x, k, n, w_name, out, *, norm=None, eps=-1, residual=-1, transposed=False,
             splits=1, first=0, stop=None):
        """y [T, n] = rmsnorm?(x [T, k]) @ W [k, n] (+ residual), one task per column tile of [first, stop);
        with y [P, T, n] split-K as well: P tasks per column tile, part p summing W's rows [p k/P, (p+1) k/P) into
        y[p]. splits > 1 (y [T, n], no residual, first = 0): split-K into a [splits, T, stop] f32 buffer
        `{name}_parts`, then a MOE_COMBINE per column tile (no residual) sums the parts into y."""
        b = self.b
        stop = n if stop is None else stop
        if splits > 1:
            assert first == 0, "split-K parts start at column 0 (a task's column indexes W, parts and y alike)"
            parts = b.buffer(f"{name}_parts", (splits, self.t, stop), "float32")
            self.gemv(name, layer, x, k, n, w_name, parts, norm=norm, eps=eps, transposed=transposed, stop=stop)
            cols = [r_ for r_ in _col_tiles(n, self.opt.tile_n) if r_[0] < stop]
            return b.op(f"{name}_sum", Op.MOE_COMBINE, layer, (), (parts, -1), (out,), cols,
                        [(splits * 4 + self.elt) * self.t * r_[1] for r_ in cols])
        w = b.weight(w_name, (n, k) if transposed else (k, n), self.dt)
        nw = b.weight(norm, (k,), self.dt) if norm else -1
        shape = b.buffers[out].shape
        parts = shape[0] if len(shape) == 3 else 1
        tiles = [r[:4] + (p,) for p in range(parts) for r in _col_tiles(n, self.opt.tile_n, eps if norm else -1,
                                                                          int(transposed))
                 if first <= r[0] < stop]
        nbytes = [(k // parts * r[1] + self.t * k) * self.elt for r in tiles]
        return b.op(name, Op.GEMV, layer, (w, nw), (x, residual), (out,), tiles, nbytes)

    def k_parts(self, most: int) -> int:
        """Split-K parts of a GEMV over the hidden state: the most, up to `most`, whose K / P is a multiple of
        K_ALIGN (the GPU bodies' k tile)."""
        d = self.m.hidden_size
        return max(p for p in range(1, most + 1) if d % (p * K_ALIGN) == 0 or p == 1)

    def lower(self):
        m, t, b, dt = self.m, self.t, self.b, self.dt
        tokens = b.buffer("tokens", (t,), "int32", Kind.INPUT)
        pos = b.buffer("pos", (t,), "int32", Kind.INPUT)
        rope = (b.buffer("rope_cos", (t, m.qk_rope_head_dim // 2), dt, Kind.INPUT),
                b.buffer("rope_sin", (t, m.qk_rope_head_dim // 2), dt, Kind.INPUT))
        h = b.buffer("h_embed", (t, m.hidden_size), dt)
        emb = b.weight("embed_tokens/embedding", (m.vocab_size, m.hidden_size), dt)
        b.op("embed", Op.EMBED, -1, (emb,), (tokens,), (h,), [(0,) * NUM_ARGS], t * m.hidden_size * self.elt)
        topk = None
        for layer, (mlp, idx) in enumerate(zip(m.layer_mlp_types, m.layer_indexer_types)):
            h, topk = self.layer(layer, mlp, idx == "full", h, topk, pos, rope)
        logits = b.buffer("logits", (t, m.vocab_size), dt, Kind.OUTPUT)
        head = "embed_tokens/embedding" if m.tie_word_embeddings else "lm_head/kernel"
        # the column tiles beyond whole rounds of num_sms -- taken from the front, where split-K parts need no
        # column offset -- split-K (`ScheduleOptions.head_splits`)
        n_tiles = -(-m.vocab_size // self.opt.tile_n)
        extra = n_tiles % self.opt.num_sms
        sp = self.k_parts(min(self.opt.head_splits, self.opt.num_sms // extra)) if extra else 1
        split = extra * self.opt.tile_n if sp > 1 and extra < n_tiles else 0
        kw = dict(norm="norm/weight", eps=C_RMS_EPS, transposed=m.tie_word_embeddings)
        if split:
            self.gemv("lm_head_extra", -1, h, m.hidden_size, m.vocab_size, head, logits, splits=sp, stop=split, **kw)
        self.gemv("lm_head", -1, h, m.hidden_size, m.vocab_size, head, logits, first=split, **kw)
        return b

    def layer(self, l, mlp, full, h, topk, pos, rope):
        m, t, b, dt, elt, opt = self.m, self.t, self.b, self.dt, self.elt, self.opt
        d, q, c, r, n = m.hidden_size, m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.num_attention_heads
        hn, hv, ni, hi, kt = m.qk_nope_head_dim, m.v_head_dim, m.index_n_heads, m.index_head_dim, m.index_topk
        p, a = f"layers/{l}", f"layers/{l}/self_attn"
        buf = lambda name, shape, dtype=dt, kind=Kind.SCRATCH: b.buffer(f"{p}/{name}", shape, dtype, kind)  # noqa
        ln1 = f"{p}/input_layernorm/weight"
        # Level 1: RMSNorm(h) fused into the four projections of h.
        qa, kva = buf("q_a", (t, q)), buf("kv_a", (t, c + r))
        sp = self.k_parts(opt.proj_splits)
        self.gemv(f"{p}/q_a", l, h, d, q, f"{a}/q_a_proj/kernel", qa, norm=ln1, eps=C_RMS_EPS, splits=sp)
        self.gemv(f"{p}/kv_a", l, h, d, c + r, f"{a}/kv_a_proj_with_mqa/kernel", kva, norm=ln1, eps=C_RMS_EPS,
                  splits=sp)
        if full:
            ik, iw = buf("index_k_raw", (t, hi)), buf("index_w", (t, ni))
            self.gemv(f"{p}/index_wk", l, h, d, hi, f"{p}/indexer/wk/kernel", ik, norm=ln1, eps=C_RMS_EPS,
                      splits=sp)
            self.gemv(f"{p}/index_wproj", l, h, d, ni, f"{p}/indexer/weights_proj/kernel", iw, norm=ln1,
                      eps=C_RMS_EPS, splits=sp)
        # Level 2: q_b / indexer q (q_a RMSNorm fused), cache writes (norms and RoPE fused).
        qb = buf("q_b", (t, n * (hn + r)))
        qnorm = f"{a}/q_a_layernorm/weight"
        self.gemv(f"{p}/q_b", l, qa, q, n * (hn + r), f"{a}/q_b_proj/kernel", qb, norm=qnorm, eps=C_EPS6)
        c_kv, k_pe = buf("c_kv", (-1, c), kind=Kind.CACHE), buf("k_pe", (-1, r), kind=Kind.CACHE)
        b.op(f"{p}/kv_write", Op.KV_WRITE, l, (b.weight(f"{a}/kv_a_layernorm/weight", (c,), dt),),
             (kva, pos, *rope), (c_kv, k_pe), [(C_EPS6, 0, 0, 0)], 2 * t * (c + r) * elt)
        if full:
            iq = buf("index_q", (t, ni * hi))
            self.gemv(f"{p}/index_q", l, qa, q, ni * hi, f"{p}/indexer/wq_b/kernel", iq, norm=qnorm, eps=C_EPS6)
            index_k = buf("index_k", (-1, hi), kind=Kind.CACHE)
            b.op(f"{p}/ik_write", Op.IK_WRITE, l,
                 (b.weight(f"{p}/indexer/k_norm/weight", (hi,), dt), b.weight(f"{p}/indexer/k_norm/bias", (hi,), dt)),
                 (ik, pos, *rope), (index_k,), [(C_EPS6, 0, 0, 0)], 2 * t * hi * elt)
            # Level 3: score chunks with local top-K, then the merge.
            nc = opt.index_chunks
            cand = buf("index_cand_val", (nc, t, kt), "float32"), buf("index_cand_idx", (nc, t, kt), "int32")
            b.op(f"{p}/index_score", Op.INDEX_SCORE, l, (), (iq, iw, index_k, pos, *rope), cand,
                 [(i, nc, opt.index_align, 0) for i in range(nc)], (math.ceil(opt.context_hint / nc) * hi
                                                                   + t * ni * hi) * elt)
            topk = buf("topk_idx", (t, kt), "int32"), buf("topk_valid", (t, kt), "int32")
            cap = min(opt.index_topk_parts, max(1, opt.index_topk_tasks // t))
            parts = max(d for d in range(1, cap + 1) if kt % d == 0)  # per token
            b.op(f"{p}/index_topk", Op.INDEX_TOPK, l, (), cand, topk,
                 [(j, parts, q, 0) for q in range(t) for j in range(parts)], nc * kt * 8)
        # Level 4: absorb W_uk per head (q_pe RoPE fused), attention per head group over the top-K rows.
        kv_b = b.weight(f"{a}/kv_b_proj/kernel", (c, n * (hn + hv)), dt)
        q_lat, q_pe = buf("q_lat", (t, n, c)), buf("q_pe", (t, n, r))
        b.op(f"{p}/absorb", Op.ABSORB, l, (kv_b,), (qb, *rope), (q_lat, q_pe), [(i, 0, 0, 0) for i in range(n)],
             (c * hn + t * (hn + r)) * elt)
        g, sp = opt.attn_heads, min(opt.attn_splits, kt)
        o_part, lse = buf("o_part", (sp, t, n, c), "float32"), buf("lse_part", (sp, t, n), "float32")
        rows = math.ceil(min(kt, opt.context_hint) / sp)
        b.op(f"{p}/attn", Op.ATTN, l, (), (q_lat, q_pe, c_kv, k_pe, *topk), (o_part, lse),
             [(i, min(g, n - i), j, sp) for i in range(0, n, g) for j in range(sp)],
             (rows * (c + r) + t * g * (c + r)) * elt)
        # Level 5: W_uv per head (merging the split-KV partials), o_proj with the residual fused.
        v = buf("v", (t, n, hv))
        b.op(f"{p}/uv", Op.UV, l, (kv_b,), (o_part, lse), (v,), [(i, 0, 0, 0) for i in range(n)],
             (c * hv + sp * t * (c + 1) * 2) * elt)
        h_mid = buf("h_mid", (t, d))
        self.gemv(f"{p}/o_proj", l, v, n * hv, d, f"{a}/o_proj/kernel", h_mid, residual=h)
        h_out = buf("h_out", (t, d))
        ln2 = f"{p}/post_attention_layernorm/weight"
        if mlp == "dense":
            self.swiglu(f"{p}/mlp", l, h_mid, ln2, d, m.intermediate_size, f"{p}/mlp", h_out, residual=h_mid)
            return h_out, topk
        # Levels 6-7: router tiles + selection, routed slots, shared expert, combine.
        e, k = m.n_routed_experts, m.num_experts_per_tok
        u = min(e, t * k)
        logits = buf("router_logits", (self.k_parts(opt.router_splits), t, e), "float32")
        self.gemv(f"{p}/router", l, h_mid, d, e, f"{p}/mlp/gate/weight", logits, norm=ln2, eps=C_RMS_EPS)
        slots = buf("slot_expert", (u,), "int32"), buf("slot_coef", (u, t), "float32")
        b.op(f"{p}/router_select", Op.ROUTER_SELECT, l,
             (b.weight(f"{p}/mlp/gate/e_score_correction_bias", (e,), "float32"),), (logits,), slots,
             [(k, m.n_group, m.topk_group, int(m.norm_topk_prob))], t * e * 4)
        i = m.moe_intermediate_size
        shared = m.n_shared_experts > 0
        part = buf("moe_part", (u + shared, t, d), "float32")
        self.swiglu(f"{p}/experts", l, h_mid, ln2, d, i, f"{p}/mlp", part, slots=slots)
        if shared:
            self.swiglu(f"{p}/shared", l, h_mid, ln2, d, i * m.n_shared_experts, f"{p}/mlp/shared_experts",
                        part, out_slot=u)
        b.op(f"{p}/combine", Op.MOE_COMBINE, l, (), (part, h_mid), (h_out,), _col_tiles(d, opt.tile_n),
             [(u + shared + 1) * t * r_[1] * 4 for r_ in _col_tiles(d, opt.tile_n)])
        return h_out, topk

    def swiglu(self, name, l, x, norm, d, i, prefix, out, *, residual=-1, slots=None, out_slot=-1):
        """SwiGLU as up tiles (gate and up together, norm fused) then down tiles. slots: routed experts, one
        task per (slot, tile) over the stacked [E, ...] weights; otherwise a plain [D, I] MLP.
        Routed: an up op group per slot, each with its own counter, and a down op group per slot that waits on
        its slot's up counter alone, all slots' down groups sharing one counter (the combine's single wait). A
        slot's down tiles then start as soon as that slot's up tiles are done, instead of after every slot's: on
        the H200 at glm5_slice the kernel took 2.088 ms against 2.113 (one lease; 2.088 again in another,
        experiments/results/session25/)."""
        b, t, dt, elt, tile = self.b, self.t, self.dt, self.elt, self.opt.tile_n
        routed = slots is not None
        u = b.buffers[slots[0]].shape[0] if routed else 0
        fp8_experts = routed and self.opt.expert_format == "fp8"
        if routed:
            e = self.m.n_routed_experts
            declare = (lambda name, shape: b.fp8_weight(name, shape)) if fp8_experts else (
                lambda name, shape: b.weight(name, shape, dt))
            wg, wu = (declare(f"{prefix}/{w}", (e, d, i)) for w in ("gate_proj", "up_proj"))
            wd = declare(f"{prefix}/down_proj", (e, i, d))
        else:
            wg, wu = (b.weight(f"{prefix}/{w}/kernel", (d, i), dt) for w in ("gate_proj", "up_proj"))
            wd = b.weight(f"{prefix}/down_proj/kernel", (i, d), dt)
        act = b.buffer(f"{name}_act", (u, t, i) if routed else (t, i), dt)
        welt = 1 if fp8_experts else elt  # weight bytes per element (the block scales are < 0.02% more)
        norm_w = b.weight(norm, (d,), dt)
        # routed: one up and one down op group per expert slot, so that slot s's down tiles wait for slot s's up
        # tiles only (its own counter), not for every slot's
        down_inputs = (act, residual, *(slots if routed else (-1, -1)))
        for s in (range(u) if routed else (-1,)):
            tag = f"_{s}" if routed else ""
            up = _col_tiles(i, tile, s, C_RMS_EPS)
            up_id = b.op(f"{name}_up{tag}", Op.SWIGLU_UP, l, (wg, wu, norm_w), (x, slots[0] if routed else -1),
                         (act,), up, [2 * d * r[1] * welt + t * d * elt for r in up])
            down = _col_tiles(d, tile, s, s if routed else out_slot)
            b.op(f"{name}_down{tag}", Op.SWIGLU_DOWN, l, (wd,), down_inputs, (out,), down,
                 [i * r[1] * welt + t * i * elt for r in down], after={act: (up_id,)}, counter=f"{name}_down")


def _finish(b: _Builder) -> None:
    """Levels, ancestors and transitively reduced waits of every op group (ops are created in a topological
    order)."""
    for oid, g in enumerate(b.ops):
        if any(d >= oid for d in g.deps):
            raise AssertionError(f"op {g.name} depends on a later op")
        implied = 0
        for d in g.deps:
            implied |= b.ops[d].ancestors
        g.ancestors = implied
        for d in g.deps:
            g.ancestors |= 1 << d
        g.waits = tuple(d for d in g.deps if not (implied >> d) & 1)
        g.level = 1 + max((b.ops[d].level for d in g.deps), default=-1)


@dataclasses.dataclass
class _Counters:
    """The step's counters (`_counters`): per op group its counter (cid) and the counters it waits on (waits); per
    counter its name, member op groups, target (all their tasks) and closure (the bitmask of the counters known
    complete once it is: itself, and those whose op groups are all among its op groups' ancestors)."""
    cid: np.ndarray
    waits: list[tuple[int, ...]]
    names: list[str]
    members: list[list[int]]
    target: list[int]
    closure: list[int]


def _counters(b: _Builder) -> _Counters:
    """Op groups of one `counter` name share a counter. A consumer waits on a shared counter only if every op group
    of it is among its ancestors (the counter's target is all of their tasks)."""
    index: dict[str, int] = {}
    members: list[list[int]] = []
    cid = np.empty(len(b.ops), np.int64)
    for oid, g in enumerate(b.ops):
        if g.counter not in index:
            index[g.counter] = len(members)
            members.append([])
        cid[oid] = index[g.counter]
        members[cid[oid]].append(oid)
    waits = []
    for g in b.ops:
        counters = tuple(dict.fromkeys(int(cid[w]) for w in g.waits))
        for c in counters:
            if any(not (g.ancestors >> m) & 1 for m in members[c]):
                raise AssertionError(f"{g.name} waits on counter {list(index)[c]}, not all of whose op groups it "
                                     "needs")
        waits.append(counters)
    done = [functools.reduce(operator.or_, (b.ops[m].ancestors | (1 << m) for m in ms)) for ms in members]
    closure = [sum(1 << d for d, ds in enumerate(members) if all((done[c] >> m) & 1 for m in ds))
               for c in range(len(members))]
    target = [sum(len(b.ops[m].args) for m in ms) for ms in members]
    return _Counters(cid, waits, list(index), members, target, closure)


def _chain_to_end(b: _Builder, weight: np.ndarray) -> np.ndarray:
    """Per op group, the heaviest dependency chain from it to the end of the step, itself included, where op group
    i weighs weight[i]: with weight 1 the op groups on the longest chain (its height), with its costliest task's
    time the cost model's bottom level (ops are created in a topological order)."""
    out = np.asarray(weight, np.float64).copy()
    for oid in reversed(range(len(b.ops))):
        for d in b.ops[oid].deps:
            out[d] = max(out[d], weight[d] + out[oid])
    return out


@dataclasses.dataclass
class Schedule:
    """A compiled step: tables + task records in global topological order + per-SM lists of task ids.

    records int32 [n_tasks, RECORD_WIDTH] (row i is task i); sm_tasks int32 [num_sms, max_len] (-1 padded);
    constants float64 (ids `format.C_*`); meta: the cache key fields and sizes.
    """
    meta: dict
    buffers: list[Buffer]
    weights: list[Weight]
    counters: list[Counter]
    constants: np.ndarray
    records: np.ndarray
    sm_tasks: np.ndarray

    @property
    def num_sms(self) -> int:
        return self.sm_tasks.shape[0]

    def task(self, i: int) -> Task:
        return Task.decode(self.records[i])

    @property
    def tasks(self) -> list[Task]:
        return [Task.decode(r) for r in self.records]

    def sm_lists(self) -> list[list[int]]:
        return [[int(i) for i in row if i >= 0] for row in self.sm_tasks]

    def sm_records(self) -> np.ndarray:
        """int32 [num_sms, max_len, RECORD_WIDTH]: each SM's records in order, NOP rows (op 0) as padding."""
        out = np.zeros((*self.sm_tasks.shape, RECORD_WIDTH), np.int32)
        mask = self.sm_tasks >= 0
        out[mask] = self.records[self.sm_tasks[mask]]
        return out


def _constants(m: ModelConfig) -> np.ndarray:
    c = np.zeros(6)
    c[[C_RMS_EPS, C_EPS6, C_ATTN_SCALE, C_INDEX_SCALE, C_INDEX_WSCALE, C_ROUTED_SCALE]] = (
        m.rms_norm_eps, 1e-6, attention_scale(m), m.index_head_dim ** -0.5, m.index_n_heads ** -0.5,
        m.routed_scaling_factor)
    return c


def _records(b: _Builder, ctr: _Counters) -> tuple[np.ndarray, np.ndarray]:
    """All tasks' records, op group by op group (F_ID not yet set), and the op id per task."""
    rows, op_of = [], []
    for oid, g in enumerate(b.ops):
        n = len(g.args)
        rec = np.full((n, RECORD_WIDTH), -1, np.int64)
        rec[:, F_OP], rec[:, F_LAYER], rec[:, F_TILE], rec[:, F_SIGNAL] = g.op, g.layer, np.arange(n), ctr.cid[oid]
        rec[:, F_BYTES] = g.nbytes
        for start, values, width in ((F_WEIGHTS, g.weights, MAX_WEIGHTS), (F_INPUTS, g.inputs, MAX_INPUTS),
                                     (F_OUTPUTS, g.outputs, MAX_OUTPUTS)):
            if len(values) > width:
                raise AssertionError(f"{g.name}: {len(values)} > {width}")
            rec[:, start:start + len(values)] = values
        rec[:, F_ARGS:F_ARGS + NUM_ARGS] = g.args
        waits = ctr.waits[oid]
        if len(waits) > MAX_WAITS:
            raise AssertionError(f"{g.name}: {len(waits)} waits > {MAX_WAITS}")
        rec[:, F_NWAITS] = len(waits)
        for j, c in enumerate(waits):
            rec[:, F_WAITS + 2 * j], rec[:, F_WAITS + 2 * j + 1] = c, ctr.target[c]
        rec[:, F_ID + 1:] = 0
        rows.append(rec)
        op_of.append(np.full(n, oid))
    rec = np.concatenate(rows)
    if rec[:, F_BYTES].max() >= 2 ** 31:
        raise AssertionError("a task's byte count overflows int32")
    return rec, np.concatenate(op_of)


def _task_costs(rec: np.ndarray, opt: ScheduleOptions) -> np.ndarray:
    """Each task's time (us) in the cost model: task_us + its op's `op_us` entry, else + bytes / sm_gb_s."""
    fixed = dict(opt.op_us)
    op_us = np.array([fixed.get(op.name, np.nan) for op in Op])[rec[:, F_OP]]
    return opt.task_us + np.where(np.isnan(op_us), rec[:, F_BYTES] / (opt.sm_gb_s * 1e3), op_us)


def _sort_levels(b: _Builder, hoist: tuple[str, ...]) -> np.ndarray:
    """Per op group, the dependency level that the "levels" / "mixed" order and balancing use: its own, or its
    producers' (one less) for a `ScheduleOptions.hoist` op."""
    return np.array([g.level - (g.op.name in hoist and g.level > 0) for g in b.ops])


def _global_order(b: _Builder, rec: np.ndarray, op_of: np.ndarray, cost: np.ndarray, assign: str,
                  hoist: tuple[str, ...] = ()) -> np.ndarray:
    """The permutation of the tasks into the global topological order that the SM lists follow.

    levels / list: (level, -height, -hoisted, -bytes, op, tile), height = the op groups on the longest chain from it
    to the end: within a level the tasks of the op with the longer chain after it come first, so each SM runs them
    first: the indexer's q tiles before q_b's, the router's tile before the shared expert's. level is
    `_sort_levels`' (a hoisted op joins its producers' level, after them: their height is greater), and a hoisted
    op goes before the other ops of its height.
    critical: (-bottom level, level, -bytes, op, tile), the bottom level of an op group being the cost model's
    heaviest chain from it to the end (its costliest task per op group): at least each consumer's, and where equal
    (zero-cost ops) the producer's lower level puts it first."""
    level = np.array([g.level for g in b.ops])
    if assign != "critical":
        height = _chain_to_end(b, np.ones(len(b.ops)))
        hoisted = np.array([g.op.name in hoist for g in b.ops], np.int64)
        return np.lexsort((rec[:, F_TILE], op_of, -rec[:, F_BYTES], -hoisted[op_of], -height[op_of],
                           _sort_levels(b, hoist)[op_of]))
    group_cost = np.zeros(len(b.ops))
    np.maximum.at(group_cost, op_of, cost)
    bottom = _chain_to_end(b, group_cost)
    return np.lexsort((rec[:, F_TILE], op_of, -rec[:, F_BYTES], level[op_of], -bottom[op_of]))


def _assign_levels(nbytes: np.ndarray, levels: np.ndarray, cost: np.ndarray, op_of: np.ndarray, deps: list,
                   num_sms: int, latency: np.ndarray, clear: np.ndarray) -> list[list[int]]:
    """Greedy LPT per dependency level, in the given (topological, level-sorted, largest-first) order: each task
    goes to the SM with the fewest bytes in its level so far, ties to the fewest bytes overall, then the lowest id.
    Levels behave like barriers (a level's consumers wait for all its producers), so each level is balanced on its
    own. Except a latency-bound task (latency[i]; "mixed": an op with an `op_us` entry, "levels": none): it goes
    to the SM that the cost model (cost, op_of, deps) expects to start it first, with the same ties, instead of
    one that may still be streaming an earlier level's tiles when its inputs are ready. An SM that takes a `clear`
    task (a hoisted latency task) takes no weight tiles of that level, so that its successor can follow it at once:
    the INDEX_TOPK tasks, which had waited behind q_b tiles for ~25 us per layer on the H200 after the scores were
    ready (experiments/results/bench_persistent_glm5_slice_ab19_hoist_profile.json), start as the scores end
    (experiments/results/session20/ab20b_clear_profile.json) -- yet the kernel's time stayed the same, 2.098 vs
    2.100 ms in one lease (..._{clear,base}.json). Returns each SM's task ids, increasing."""
    lists: list[list[int]] = [[] for _ in range(num_sms)]
    ids = np.arange(num_sms)
    total, load, free = np.zeros(num_sms), np.zeros(num_sms), np.zeros(num_sms)
    finish = np.zeros(len(deps))
    current = None
    for i, (w, level, c, op, lat) in enumerate(zip(nbytes.tolist(), levels.tolist(), cost.tolist(),
                                                   op_of.tolist(), latency.tolist())):
        if level != current:
            current, load, held = level, np.zeros(num_sms), np.zeros(num_sms, bool)
        ready = max((finish[d] for d in deps[op]), default=0.0)
        first = np.lexsort((ids, total, load, np.maximum(free, ready) if lat else held))[0]
        held[first] |= clear[i]
        lists[first].append(i)
        total[first] += w
        load[first] += w
        free[first] = max(free[first], ready) + c
        finish[op] = max(finish[op], free[first])
    return lists


def _assign_list(cost: np.ndarray, op_of: np.ndarray, deps: list, num_sms: int,
                 nbytes: np.ndarray) -> list[list[int]]:
    """List scheduling in the given (topological) order: each task goes to an SM the cost model expects free by
    the time its op's dependencies (`deps[op]`, op groups) are finished -- among those the one with the fewest
    bytes so far, so that leftover tasks rotate over the SMs -- else to the SM free first; task i takes cost[i] us.
    Unlike balancing each level's bytes on its own (every level a barrier), a task lands behind less queued work:
    a router selection no longer waits behind a shared expert's tiles on a busy SM. Returns each SM's task ids,
    increasing."""
    lists: list[list[int]] = [[] for _ in range(num_sms)]
    finish = np.zeros(len(deps))  # expected end of each op group's last task
    total = [0] * num_sms
    busy = [(0.0, s) for s in range(num_sms)]  # (free at, SM)
    idle: list = []  # (bytes so far, SM, free at): SMs free by an earlier task's ready time
    for i, (c, w, op) in enumerate(zip(cost.tolist(), nbytes.tolist(), op_of.tolist())):
        ready = max((finish[d] for d in deps[op]), default=0.0)
        while busy and busy[0][0] <= ready:
            t, s = heapq.heappop(busy)
            heapq.heappush(idle, (total[s], s, t))
        if idle:
            _, s, t = heapq.heappop(idle)
        else:
            t, s = heapq.heappop(busy)
        end = max(t, ready) + c
        finish[op] = max(finish[op], end)
        lists[s].append(i)
        total[s] += w
        heapq.heappush(busy, (end, s))
    return lists


def _model_us(cost: np.ndarray, op_of: np.ndarray, deps: list, lists: list[list[int]]) -> float:
    """The makespan (us) of per-SM task lists under the cost model (each SM runs its list in order; a task
    starts when its SM is free and its op's dependencies are finished)."""
    sm_of = np.empty(len(cost), np.int64)
    for s, lst in enumerate(lists):
        sm_of[lst] = s
    free, finish = np.zeros(len(lists)), np.zeros(len(deps))
    for c, op, s in zip(cost.tolist(), op_of.tolist(), sm_of.tolist()):  # a topological order
        ready = max((finish[d] for d in deps[op]), default=0.0)
        free[s] = max(free[s], ready) + c
        finish[op] = max(finish[op], free[s])
    return float(finish.max())


def _compiler_hash() -> str:
    """Hash of the compiler's own source, so that editing it invalidates cached schedules."""
    here = pathlib.Path(__file__).parent
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in ("format.py", "schedule.py"))).hexdigest()[:16]


def schedule_key(cfg: ModelConfig, tokens: int, options: ScheduleOptions, gpu: str) -> dict:
    """Everything a schedule depends on (its cache key)."""
    return {"format_version": FORMAT_VERSION, "compiler": _compiler_hash(), "model": dataclasses.asdict(cfg),
            "tokens": tokens, "options": dataclasses.asdict(options), "gpu": gpu}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:24]


def compile_schedule(cfg: ModelConfig, tokens: int, options: ScheduleOptions = ScheduleOptions(),
                     gpu: str = "any") -> Schedule:
    """Lowers one decode step of `cfg` for T = `tokens` query tokens (1 + D with D MTP drafts)."""
    if tokens < 1:
        raise ValueError(f"{tokens=}: a decode step has at least one token")
    cfg.validate()
    b = _Lowering(cfg, tokens, options).lower()
    _finish(b)
    ctr = _counters(b)
    rec, op_of = _records(b, ctr)
    cost = _task_costs(rec, options)
    hoist = options.hoist if options.assign in ("levels", "mixed") else ()
    order = _global_order(b, rec, op_of, cost, options.assign, hoist)
    rec, op_of, cost = rec[order], op_of[order], cost[order]
    rec[:, F_ID] = np.arange(len(rec))
    rec = rec.astype(np.int32)
    key = schedule_key(cfg, tokens, options, gpu)
    deps, levels = [g.deps for g in b.ops], [g.level for g in b.ops]
    if options.assign in ("levels", "mixed"):
        hoisted = np.array([g.op.name in hoist for g in b.ops])[op_of]
        weight = np.where(hoisted, cost * options.sm_gb_s * 1e3, rec[:, F_BYTES])  # the cost model's time as bytes
        latency = np.isin(rec[:, F_OP], [Op[name].value for name, _ in options.op_us] if options.assign == "mixed"
                          else [])
        lists = _assign_levels(weight, _sort_levels(b, hoist)[op_of], cost, op_of, deps, options.num_sms, latency,
                               hoisted & latency)
    else:
        lists = _assign_list(cost, op_of, deps, options.num_sms, rec[:, F_BYTES])
    sm_tasks = np.full((options.num_sms, max(map(len, lists))), -1, np.int32)
    for s, lst in enumerate(lists):
        sm_tasks[s, :len(lst)] = lst
    meta = {"key": key, "hash": key_hash(key), "tokens": tokens,
            "levels": [max(levels[m] for m in ms) for ms in ctr.members],  # per counter
            "model_us": _model_us(cost, op_of, deps, lists)}
    _drop_known_waits(rec, sm_tasks, ctr.closure)
    waits = rec[:, F_WAITS:F_WAITS + 2 * MAX_WAITS:2]
    waiters = np.bincount(waits[waits >= 0], minlength=len(ctr.names))
    counters = [Counter(n, t, int(w)) for n, t, w in zip(ctr.names, ctr.target, waiters)]
    return Schedule(meta, b.buffers, b.weights, counters, _constants(cfg), rec, sm_tasks)


def _drop_known_waits(rec: np.ndarray, sm_tasks: np.ndarray, closure: list[int]) -> None:
    """Removes (in place) each task's waits on counters that an earlier task of the same SM list already waited
    for, directly or through the counters that counter's producers waited for: the SM runs its list in order, so
    those producers are known complete. A counter then has at most one waiter per SM (`schedule_stats`' waits,
    waiters_max): less polling traffic on the hot counters. closure: `_Counters.closure`."""
    for row in sm_tasks:
        known = 0
        for t in row[row >= 0]:
            r = rec[t]
            keep = [(c, target) for c, target in zip(r[F_WAITS:F_WAITS + 2 * MAX_WAITS:2][:r[F_NWAITS]],
                                                    r[F_WAITS + 1:F_WAITS + 2 * MAX_WAITS:2][:r[F_NWAITS]])
                    if not (known >> int(c)) & 1]
            for c, _ in keep:
                known |= closure[int(c)]
            r[F_WAITS:F_WAITS + 2 * MAX_WAITS] = -1
            r[F_NWAITS] = len(keep)
            for j, (c, target) in enumerate(keep):
                r[F_WAITS + 2 * j], r[F_WAITS + 2 * j + 1] = c, target


# ---- statistics ----------------------------------------------------------------------------------------------


def schedule_stats(s: Schedule) -> dict:
    """Tasks, bytes per SM (max / mean = imbalance), critical path in dependency hops, scratch bytes.

    level_imbalance: sum over dependency levels of the busiest SM's bytes in that level, over the sum of the
    means: the slowdown if every level were a barrier (an upper bound of what prefetching across levels hides).
    """
    levels = s.meta["levels"]
    sm_of = np.empty(len(s.records), np.int64)
    mask = s.sm_tasks >= 0
    sm_of[s.sm_tasks[mask]] = np.nonzero(mask)[0]
    task_level = np.asarray(levels)[s.records[:, F_SIGNAL]]
    by_level = np.zeros((max(levels) + 1, s.num_sms))
    np.add.at(by_level, (task_level, sm_of), s.records[:, F_BYTES].astype(np.float64))
    per_sm = by_level.sum(0)
    ops = np.bincount(s.records[:, F_OP], minlength=len(Op))
    layer_hops = {}
    for c, lvl in zip(s.counters, levels):
        layer = c.name.split("/")[1] if c.name.startswith("layers/") else None
        if layer is not None:
            lo, hi = layer_hops.get(layer, (lvl, lvl))
            layer_hops[layer] = (min(lo, lvl), max(hi, lvl))
    return {
        "tasks": int(len(s.records)),
        "tasks_by_op": {Op(i).name: int(n) for i, n in enumerate(ops) if n},
        "counters": len(s.counters),
        "total_bytes": int(per_sm.sum()),
        "bytes_per_sm_max": int(per_sm.max()),
        "bytes_per_sm_mean": float(per_sm.mean()),
        "imbalance": float(per_sm.max() / per_sm.mean()),
        "level_imbalance": float(by_level.max(1).sum() / by_level.mean(1).sum()),
        "tasks_per_sm_max": int((s.sm_tasks >= 0).sum(1).max()),
        "waits": int(sum(c.waiters for c in s.counters)),
        "waiters_max": int(max(c.waiters for c in s.counters)),
        "critical_path_hops": int(max(levels)),
        "model_us": s.meta.get("model_us"),  # the cost model's makespan of the lists (`_model_us`)
        "hops_per_layer_max": int(max(hi - lo + 1 for lo, hi in layer_hops.values())) if layer_hops else 0,
        "scratch_bytes": int(sum(b.nbytes for b in s.buffers if b.kind in (Kind.SCRATCH, Kind.OUTPUT))),
        "record_bytes": int(s.sm_tasks.size * RECORD_WIDTH * 4),
    }


# ---- on-disk cache -------------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GLM_FAST_SCHEDULE_DIR")
                        or pathlib.Path.home() / ".cache" / "glm_fast" / "schedules").expanduser()


def _checksum(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_schedule(s: Schedule, path: str | os.PathLike) -> None:
    """Atomic write (temp file in the same folder + os.replace) of an .npz with the tables as JSON."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = {"meta": s.meta, "checksum": _checksum(s.records, s.sm_tasks, s.constants),
              "buffers": [[b.name, list(b.shape), b.dtype, int(b.kind)] for b in s.buffers],
              "weights": [[w.name, list(w.shape), w.dtype] for w in s.weights],
              "counters": [[c.name, c.target, c.waiters] for c in s.counters]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, records=s.records, sm_tasks=s.sm_tasks, constants=s.constants,
                     tables=np.frombuffer(json.dumps(tables).encode(), np.uint8))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class CorruptScheduleError(ValueError):
    """A cached schedule file is unreadable, truncated or does not match its checksum."""


def read_schedule(path: str | os.PathLike) -> Schedule:
    try:
        with np.load(path) as z:
            records, sm_tasks, constants = z["records"], z["sm_tasks"], z["constants"]
            tables = json.loads(z["tables"].tobytes().decode())
        if tables["checksum"] != _checksum(records, sm_tasks, constants):
            raise CorruptScheduleError(f"{path}: checksum mismatch")
        return Schedule(tables["meta"], [Buffer(n, tuple(s), d, Kind(k)) for n, s, d, k in tables["buffers"]],
                        [Weight(n, tuple(s), d) for n, s, d in tables["weights"]],
                        [Counter(n, t, w) for n, t, w in tables["counters"]], constants, records, sm_tasks)
    except CorruptScheduleError:
        raise
    except Exception as err:  # zip/pickle/json/key errors all mean the same: rebuild
        raise CorruptScheduleError(f"{path}: {type(err).__name__}: {err}") from err


def load_or_compile(cfg: ModelConfig, tokens: int, options: ScheduleOptions = ScheduleOptions(),
                    gpu: str = "any", cache_dir: str | os.PathLike | None = None) -> tuple[Schedule, dict]:
    """The cached schedule for (config, T, options, GPU, format version), compiling and saving it on a miss
    or a corrupt file (with a warning). Returns (schedule, info) with info = {path, source, seconds}."""
    key = schedule_key(cfg, tokens, options, gpu)
    path = pathlib.Path(cache_dir or default_cache_dir()) / f"{key_hash(key)}.npz"
    start = time.perf_counter()
    if path.exists():
        try:
            s = read_schedule(path)
            if s.meta["key"] != json.loads(json.dumps(key, default=list)):
                raise CorruptScheduleError(f"{path}: key mismatch (hash collision or foreign file)")
            return s, {"path": str(path), "source": "loaded", "seconds": time.perf_counter() - start}
        except CorruptScheduleError as err:
            warnings.warn(f"rebuilding the schedule: {err}", RuntimeWarning, stacklevel=2)
    s = compile_schedule(cfg, tokens, options, gpu)
    save_schedule(s, path)
    return s, {"path": str(path), "source": "compiled", "seconds": time.perf_counter() - start}


def parse_hoist(arg: str) -> tuple[str, ...]:
    """A --hoist flag's comma-separated op names ('none': no op) as `ScheduleOptions.hoist`."""
    return tuple(n for n in arg.split(",") if n and n != "none")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile (or load) decode-step schedules and print statistics.")
    parser.add_argument("config", help="preset name or YAML path, e.g. glm5_slice")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="T = 1 + MTP drafts")
    parser.add_argument("--num-sms", type=int, default=132)
    parser.add_argument("--tile-n", type=int, default=64)
    parser.add_argument("--attn", default="8x8", help="HEADSxSPLITS of the attention tasks (the GPU plan: 64x32)")
    parser.add_argument("--assign", default=ScheduleOptions.assign, choices=ASSIGNMENTS)
    parser.add_argument("--hoist", default=",".join(ScheduleOptions.hoist),
                        help="comma-separated op names (ScheduleOptions.hoist); 'none' for no op")
    parser.add_argument("--expert-format", default=ScheduleOptions.expert_format, choices=EXPERT_FORMATS,
                        help="the routed experts' weights (ScheduleOptions.expert_format)")
    parser.add_argument("--gpu", default="H200")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    cfg = load_config(args.config).model
    heads, splits = (int(v) for v in args.attn.lower().split("x"))
    opt = ScheduleOptions(tile_n=args.tile_n, num_sms=args.num_sms, attn_heads=heads, attn_splits=splits,
                          assign=args.assign, hoist=parse_hoist(args.hoist), expert_format=args.expert_format)
    for t in args.tokens:
        start = time.perf_counter()
        s = compile_schedule(cfg, t, opt, args.gpu)
        compile_s = time.perf_counter() - start
        load_or_compile(cfg, t, opt, args.gpu, args.cache_dir)
        _, info = load_or_compile(cfg, t, opt, args.gpu, args.cache_dir)
        stats = schedule_stats(s)
        print(f"{args.config} T={t}: compile {compile_s:.2f} s, cached load {info['seconds']:.3f} s "
              f"({info['path']})")
        for k, v in stats.items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


if __name__ == "__main__":
    main()
