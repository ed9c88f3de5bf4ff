"""The schedule's data format: opcodes, the int32 task record, and the tables a persistent kernel allocates from.

A schedule is a set of tile-level tasks in one global topological order (task id = position) and, per SM, the
increasing list of the task ids that SM runs. Everything a GPU kernel needs is integers:

Task record: int32 [RECORD_WIDTH = 32] (128 bytes, one TMA box row). Unused slots hold -1.
    0 op        `Op` code (0 = NOP: padding at the end of a short SM list)
    1 layer     decoder layer, -1 for the embedding and the LM head
    2 tile      index of the task within its op group (its counter's producers are tiles 0..target-1)
    3 signal    counter to bump when done (one counter per op group)
    4 nbytes    HBM bytes the task streams (weights + cache rows + activations): the balancing weight
    5..7        weights[3]   ids into `Schedule.weights` (the kernel's weight refs, in table order; an FP8
                             weight is named by its q, whose block scales are the next weight: `schedule.fp8_scale_id`)
    8..13       inputs[6]    ids into `Schedule.buffers` (positional per op, see below)
    14..15      outputs[2]   ids into `Schedule.buffers`
    16..20      args[5]      op-specific integers (below)
    21 n_waits  number of (counter, target) pairs that follow
    22..29      waits[4]     (counter id, target) pairs: run only when counter >= target (all producers done)
    30 id       the task id (its position in the global topological order)
    31          reserved (0)

Per op: weights / inputs / outputs / args (buffers are row-major; T = query tokens, one sequence):
    EMBED          [embedding] / [tokens] / [h] / -             h[t] = embedding[tokens[t]]
    GEMV           [W, norm_w] / [x, residual] / [y] / [col0, ncols, eps, transposed, part]
                   y[:, c] = residual[:, c] + rmsnorm?(x) @ W[:, c] for c in [col0, col0 + ncols); f32
                   accumulate, cast to y's dtype; eps = constant id (-1: no norm); transposed: W stored [N, K].
                   Split-K when y is [P, T, N] (the router's logits): y[part][:, c] = rmsnorm?(x)[:, ks] @
                   W[ks, c] over the K / P rows ks = [part K / P, (part + 1) K / P), the norm over all of x;
                   the consumer sums the P partials in order (`simulate.sum_parts`). part = 0 otherwise
    KV_WRITE       [kv_norm_w] / [kva, pos, cos, sin] / [c_kv, k_pe] / [eps]
                   cache rows pos[t]: c_kv = rmsnorm(kva[:, :C]), k_pe = rope(kva[:, C:])
    IK_WRITE       [ln_w, ln_b] / [ik, pos, cos, sin] / [index_k] / [eps]
                   cache rows pos[t]: rope on the first R dims of LayerNorm(ik)
    INDEX_SCORE    - / [iq, iw, index_k, pos, cos, sin] / [cand_val, cand_idx] / [chunk, n_chunks, align]
                   rows [chunk*cs, (chunk+1)*cs) of the S = max(pos)+1 visible rows, cs = roundup(ceil(S /
                   n_chunks), align); causal DSA scores (consts INDEX_SCALE, INDEX_WSCALE), local top-K
                   candidates (-inf / row 0 where fewer), written to cand_*[chunk]
    INDEX_TOPK     - / [cand_val, cand_idx] / [topk_idx, topk_valid] / [part, parts, token]
                   top-K of token's candidates (ties to the lower flattened (chunk, slot)), listed in flattened
                   order = ascending row, valid ones first; this task writes token's slots [part*K/parts,
                   (part+1)*K/parts)
    ABSORB         [kv_b] / [qb, cos, sin] / [q_lat, q_pe] / [head]
                   q_lat[:, head] = q_nope . W_uk[head]; q_pe[:, head] = rope(qb's rope part)
    ATTN           - / [q_lat, q_pe, c_kv, k_pe, topk_idx, topk_valid] / [o_part, lse_part] /
                   [head0, nheads, split, n_splits]   absorbed sparse MLA (const ATTN_SCALE) of heads
                   [head0, head0 + nheads) over top-K slots [split*ks, (split+1)*ks), ks = ceil(K / n_splits):
                   normalised partial output o_part[split] and its log-sum-exp (0 / -inf with no valid slot)
    UV             [kv_b] / [o_part, lse_part] / [v] / [head]   merges the splits: o = sum_s exp(lse_s - lse)
                   o_s (lse = logsumexp_s lse_s), cast, v[:, head] = o . W_uv[head]
    ROUTER_SELECT  [bias] / [router_logits] / [slot_expert, slot_coef] / [top_k, n_group, topk_group, norm]
                   logits = the sum of router_logits' [P, T, E] split-K partials (in order), sigmoid + bias choice,
                   group-limited top-k, normalised weights x ROUTED_SCALE; distinct experts sorted into U slots (-1 =
                   unused), coef[u, t] = token t's weight of slot u
    SWIGLU_UP      [w_gate, w_up, norm_w] / [x, slot_expert] / [act] / [col0, ncols, slot, eps]
                   act[(slot,) :, c] = silu(x_n @ Wg[:, c]) * (x_n @ Wu[:, c]); slot >= 0: W = stacked
                   [E, D, I] weights at expert slot_expert[slot] (zeros when the slot is unused)
    SWIGLU_DOWN    [w_down] / [act, residual, slot_expert, slot_coef] / [y] / [col0, ncols, slot, out_slot]
                   slot -1: act [T, I] (dense / shared), else act[slot] of expert slot_expert[slot] times
                   coef[slot]; out_slot -1: y[:, c] = residual + cast(.), else y[out_slot][:, c] (f32 partial)
    MOE_COMBINE    - / [part, h_mid] / [h] / [col0, ncols]     h[:, c] = h_mid + cast(sum over slots of part);
                   h_mid -1: h[:, c] = cast(sum over slots of part) (a split-K GEMV's parts, `_Lowering.gemv`)

Counters: one per op group, or one for several op groups that share it (the routed experts' down tiles of all
slots, `schedule._counters`); target = their task count; `waiters` = how many tasks wait on it (after the
schedule compiler dropped the waits an earlier task of the same SM list already made; statistics).
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

RECORD_WIDTH = 32
MAX_WEIGHTS, MAX_INPUTS, MAX_OUTPUTS, NUM_ARGS, MAX_WAITS = 3, 6, 2, 5, 4
F_OP, F_LAYER, F_TILE, F_SIGNAL, F_BYTES = 0, 1, 2, 3, 4
F_WEIGHTS, F_INPUTS, F_OUTPUTS, F_ARGS, F_NWAITS, F_WAITS, F_ID = 5, 8, 14, 16, 21, 22, 30


class Op(enum.IntEnum):
    NOP = 0
    EMBED = 1
    GEMV = 2
    KV_WRITE = 3
    IK_WRITE = 4
    INDEX_SCORE = 5
    INDEX_TOPK = 6
    ABSORB = 7
    ATTN = 8
    UV = 9
    ROUTER_SELECT = 10
    SWIGLU_UP = 11
    SWIGLU_DOWN = 12
    MOE_COMBINE = 13


class Kind(enum.IntEnum):
    """Buffer kinds: INPUT (the launcher fills it), SCRATCH (GMEM activations, written exactly once per step),
    CACHE (the caller's per-layer cache, rows written at `pos`; dim 0 is the runtime max_len, stored as -1),
    OUTPUT (the logits)."""
    INPUT = 0
    SCRATCH = 1
    CACHE = 2
    OUTPUT = 3


DTYPES = ("float32", "bfloat16", "int32")  # dtype code = index

# (weights, inputs, outputs) per op: the positional slots of the table above (-1 marks an unused optional one).
ARITY = {Op.NOP: (0, 0, 0), Op.EMBED: (1, 1, 1), Op.GEMV: (2, 2, 1), Op.KV_WRITE: (1, 4, 2),
         Op.IK_WRITE: (2, 4, 1), Op.INDEX_SCORE: (0, 6, 2), Op.INDEX_TOPK: (0, 2, 2), Op.ABSORB: (1, 3, 2),
         Op.ATTN: (0, 6, 2), Op.UV: (1, 2, 1), Op.ROUTER_SELECT: (1, 1, 2), Op.SWIGLU_UP: (3, 2, 1),
         Op.SWIGLU_DOWN: (1, 4, 1), Op.MOE_COMBINE: (0, 2, 1)}

# Float constants (`Schedule.constants`), referenced by id from records.
C_RMS_EPS, C_EPS6, C_ATTN_SCALE, C_INDEX_SCALE, C_INDEX_WSCALE, C_ROUTED_SCALE = range(6)


@dataclasses.dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: Kind

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.dtype != "bfloat16" else 2) if self.kind != Kind.CACHE else 0


@dataclasses.dataclass(frozen=True)
class Weight:
    """A parameter array, named by its path in the nnx model ("layers/3/self_attn/q_a_proj/kernel")."""
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class Counter:
    name: str
    target: int
    waiters: int


@dataclasses.dataclass(frozen=True)
class Task:
    """The readable form of one record (see the module docstring); weights/inputs/outputs have the op's
    `ARITY`, -1 marking an unused optional slot."""
    id: int
    op: Op
    layer: int
    tile: int
    signal: int
    nbytes: int
    weights: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    args: tuple[int, ...]
    waits: tuple[tuple[int, int], ...]

    def encode(self) -> np.ndarray:
        """-> int32 [RECORD_WIDTH]."""
        if (len(self.weights), len(self.inputs), len(self.outputs)) != ARITY[self.op]:
            raise ValueError(f"task {self.id} ({self.op.name}): arity != {ARITY[self.op]}")
        rec = np.full(RECORD_WIDTH, -1, np.int32)
        rec[[F_OP, F_LAYER, F_TILE, F_SIGNAL, F_BYTES, F_NWAITS, F_ID]] = (
            self.op, self.layer, self.tile, self.signal, self.nbytes, len(self.waits), self.id)
        for start, values, width in ((F_WEIGHTS, self.weights, MAX_WEIGHTS), (F_INPUTS, self.inputs, MAX_INPUTS),
                                     (F_OUTPUTS, self.outputs, MAX_OUTPUTS), (F_ARGS, self.args, NUM_ARGS)):
            if len(values) > width:
                raise ValueError(f"task {self.id} ({self.op.name}): {len(values)} entries > {width=}")
            rec[start:start + len(values)] = values
        if len(self.waits) > MAX_WAITS:
            raise ValueError(f"task {self.id} ({self.op.name}): {len(self.waits)} waits > {MAX_WAITS=}")
        rec[F_WAITS:F_WAITS + 2 * len(self.waits)] = np.asarray(self.waits, np.int32).reshape(-1)
        rec[F_ID + 1:] = 0
        return rec

    @classmethod
    def decode(cls, rec: np.ndarray) -> "Task":
        op = Op(int(rec[F_OP]))
        n_w, n_in, n_out = ARITY[op]
        n_waits = int(rec[F_NWAITS])
        waits = tuple((int(rec[F_WAITS + 2 * i]), int(rec[F_WAITS + 2 * i + 1])) for i in range(n_waits))
        return cls(id=int(rec[F_ID]), op=op, layer=int(rec[F_LAYER]), tile=int(rec[F_TILE]),
                   signal=int(rec[F_SIGNAL]), nbytes=int(rec[F_BYTES]),
                   weights=tuple(int(v) for v in rec[F_WEIGHTS:F_WEIGHTS + n_w]),
                   inputs=tuple(int(v) for v in rec[F_INPUTS:F_INPUTS + n_in]),
                   outputs=tuple(int(v) for v in rec[F_OUTPUTS:F_OUTPUTS + n_out]),
                   args=tuple(int(v) for v in rec[F_ARGS:F_ARGS + NUM_ARGS]), waits=waits)


def written_region(task: Task, buffers: list[Buffer]) -> list[tuple[int, tuple[slice, ...]]]:
    """The (buffer id, index) regions a task writes, derived from its op and args; cache rows (dynamic, at
    `pos`) are left out. Shared by the exactly-once test and the simulator."""
    out = task.outputs
    a = task.args
    op = task.op
    full = slice(None)
    if op in (Op.EMBED, Op.ROUTER_SELECT):
        return [(b, (full,)) for b in out]
    if op == Op.INDEX_TOPK:  # part a[0] of a[1]: its 1/a[1] of token a[2]'s K selected-row slots
        n = buffers[out[0]].shape[-1] // a[1]
        return [(b, (slice(a[2], a[2] + 1), slice(a[0] * n, (a[0] + 1) * n))) for b in out]
    if op == Op.GEMV and len(buffers[out[0]].shape) == 3:  # a split-K part
        return [(out[0], (a[4], full, slice(a[0], a[0] + a[1])))]
    if op in (Op.GEMV, Op.MOE_COMBINE):
        return [(out[0], (full, slice(a[0], a[0] + a[1])))]
    if op in (Op.KV_WRITE, Op.IK_WRITE):
        return []
    if op == Op.INDEX_SCORE:
        return [(b, (a[0],)) for b in out]
    if op == Op.ABSORB:
        return [(b, (full, a[0])) for b in out]
    if op == Op.ATTN:
        return [(b, (a[2], full, slice(a[0], a[0] + a[1]))) for b in out]
    if op == Op.UV:
        return [(out[0], (full, a[0]))]
    cols = slice(a[0], a[0] + a[1])
    if op == Op.SWIGLU_UP:
        return [(out[0], (a[2], full, cols) if a[2] >= 0 else (full, cols))]
    if op == Op.SWIGLU_DOWN:
        return [(out[0], (a[3], full, cols) if a[3] >= 0 else (full, cols))]
    raise ValueError(f"task {task.id}: no region rule for {op.name}")
