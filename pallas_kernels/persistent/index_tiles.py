"""Tile bodies of the persistent kernel's lightning indexer (DESIGN.md sec. 4, level 3): INDEX_SCORE and INDEX_TOPK.

INDEX_SCORE (one task per chunk of the visible index-key rows, see format.py) -- `index_score_body`:
  1. q: each token's N indexer heads (iq [T, N*H]) are staged up to Q_GROUPS x 8 heads at a time into SMEM (32
     at glm5_slice: one round; row TMAs into both `t_ixq` and `t_ixqo` [32, H], issued from the warpgroup's 4
     warps on the GPU; the head weights likewise into `t_ixhw`, in flight with the RoPE's cos / sin rows:
     activations that another CTA stored by TMA are read through TMA and SMEM, never as GMEM loads),
     RoPE'd on their first R dims from t_ixq into t_ixqo (`tiles.rope_rows`, as `Tiles.rope`: the round's pairs
     spread over the warpgroup's threads, rounding where `apply_rope` does), TMA'd
     from t_ixqo to the CTA's GMEM staging rows
     (the kernel's per-CTA GMEM scratch, `gmem_shape`) and TMA'd back into the wgmma B operand: the first
     ceil(T*N / TK) slots of the weight rings t_w0 / t_w1 (H/TN = 1 or 2 parts of TN dims; TK rows = TK/N
     tokens per slot). The head weights iw * INDEX_WSCALE * INDEX_SCALE go to `t_ixw` (the softmax scale folded
     through the ReLU, as indexer.py does).
  2. Scores: the chunk's cached key rows stream in [TK, TN] boxes through the remaining ring slots (barrier
     `t_ixkb`); per block one swap-AB wgmma per (q slot, part) and indexer.py's epilogue `score_rows` (ReLU, head
     weights, per-query head sums, causal mask start + i <= min(pos[t], r1 - 1)). This step's new rows
     (IK_WRITE's `rows` output; the cache still holds stale rows there) are scored once per task into `t_ixn`
     and patched over the positions pos[t'] (scalar stores, visible to query t iff pos[t'] <= pos[t]).
     Scores collect in `t_ixs` [T, SB] (SB = 128 key rows per super-block).
  3. Candidates. Fast path, n_rows = r1 - r0 <= K (always at glm5 contexts <= index_chunks * K = 64K): every
     row is a candidate -- the super-block's scores and rows (0 where the score is -inf) are TMA'd to
     cand_val / cand_idx[chunk] in row order, the slots past the chunk filled with -inf / 0. Slow path, n_rows >
     K: an exact radix select over the chunk (indexer.py's `_float_key` and `count_tile`, `TileConfig.topk_bits`
     per pass down to the exact K-th key -- at 2 bits, 3 counts per token and pass: with 4 bits' 15 the T = 4
     body's lowering took 133 s instead of 19 s with warpgroup semantics, jax 0.10.2 on the CPU,
     persistent_lowering_glm5_slice_cpu_wg_t4_bits{4,2}.json; every pass
     re-streams the keys and recomputes the scores, nothing of the chunk is kept), then a compaction pass (scalar
     loop, GMEM scalar stores): keys above the K-th, then the first `need` keys equal to it in row order. Either way
     the candidates are in ascending row order and -inf values
     carry row 0.
INDEX_TOPK -- `index_topk_body`: for the task's one token (the schedule splits a layer's merge per token and
  part: at T = 4 the tokens' merges run on different SMs at once, where one task per part had looped over the T
  tokens, 182 us per task on the H200 against 58 at T = 1, bench_persistent_glm5_slice_chunked{,_t4}.json), the
  same exact radix select (but `TileConfig.topk_bits` key bits per
  pass: at most 32 / b passes of 2^b - 1 counts; `_radix_select` stops once exactly K keys are >= its bin's low
  end) over the nc * K candidate slots, streamed
  from GMEM in [8, TN] f32 boxes (one row TMA each, barrier `t_ixcb`) through the candidate ring `t_ixr`
  (CAND_SLOTS slots, one more view of the SMEM union on the GPU). When the step's candidates fit the ring (up to
  256 TN-rows: contexts up to ~16K at glm5_slice) they are loaded once and stay resident for every radix pass and
  the compaction: up to REG_SLOTS = 16 slots (contexts up to ~8K) the select counts their keys from registers,
  computed once; past that the passes after the first count GROUP = 8 ring slots per loop step. Else each pass
  streams them again. Only the first `rpc` TN-rows of each chunk are streamed: a
  chunk holds at most min(chunk size, K) candidates at this step (INDEX_SCORE's run-time geometry, from pos), the
  slots after them are -inf padding, and dropping -inf slots changes neither the K-th largest key nor the
  selection while at least K slots remain (rpc is kept >= K / (nc * TN)); at glm5_slice's 4K context that is 3 of
  32 rows per chunk.
  Then a compaction pass. The selected rows are listed in flattened (chunk, slot) order = ascending row order,
  finite selections first, the rest idx 0 / valid 0, and the token's INDEX_TOPK tasks split that list: part p of
  P (64 by default at T = 1, `ScheduleOptions.index_topk_parts` / `index_topk_tasks`) writes its slots
  [p K / P, (p + 1) K / P) (each part repeats the select; the compaction's scalar loop on one SM was the step's
  critical path, 0.41 ms per layer on the H200 at 4K, bench_persistent_glm5_slice_phases.json).
  Per ring slot, each row's two counts (keys > the K-th key; keys equal to it, of which the first `need` in
  flattened order are taken; each <= TN < 256) are packed as byte fields into TP / 2 int32 sums -- 4 cross-warp
  reductions per slot -- and give the row's output slots [n, n'). The slot's totals (the sum of its rows' fields)
  decide first whether the slot meets the part's range at all: at 4K only 1-2 of a part's ~12 slots do, and only
  those walk their TN-rows (a scalar loop over TP rows was ~1.1 us per slot; with the totals first the compaction's
  row walk went from 13.5 to 9.2 us per task and the task from 58 to 54 us on the H200,
  bench_persistent_glm5_slice_{chunked,slot_skip}.json). When the select counted from registers, every slot's
  totals come from those keys in one round after it (`slot_tab`: keys > lo and keys == lo packed in the half-words
  of one sum per slot), so a slot that misses the part's range costs a few scalar ops instead of its row counts
  (~0.9 us each; kernel 2.137 -> 2.102 ms in one H200 lease, experiments/results/session20/). Only a row that
  meets the part's range is
  scanned by a scalar loop (up to TN candidates: it stops once the part's last slot is written), which writes the
  part's rows (GMEM scalar stores). When every chunk took
  INDEX_SCORE's fast path (chunk size <= K) a candidate's row is computed (chunk * size + slot); only after a slow
  path is it loaded from
  cand_idx (a dependent GMEM load per selected row: 0.67 ms per layer before the arithmetic rows,
  experiments/results/bench_persistent_glm5_slice_profile.json). `topk_reference` is the jnp reference of a part.

Exactness and ties. The selected set equals `lax.top_k`'s over the same scores: the K largest, ties at the K-th
value to the lower row (candidates are in row order within a chunk and chunks ascend, so "first in flattened
order" is "lowest row", which is also what the jnp bodies' chunk-then-merge `lax.top_k` picks), and the slot
order is the jnp reference's too (ascending row). The consumer ATTN is order-independent (softmax over the K
slots, split into ranges whose partial results UV merges by LSE): only float summation order would change.
Scores are not bit-identical to the jnp body (wgmma summation order, scale folded into the head weights), so
near-ties can differ against the XLA backend; the tests compare the selection exactly against `lax.top_k` of the
kernel's own candidate values, and with exact ties (duplicate keys, zero q).

SMEM (glm5_slice: N = 32, H = 128, K = 2048, T = 1 / 4): q and the key ring live in the existing weight rings
t_w0 / t_w1 (`TileConfig.slots` slots of 64 x 64 bf16 each: q takes ceil(T*N / 64) of them per ring, the keys the
rest), INDEX_TOPK's candidate ring t_ixr [32, 8, 64] f32 = 64 KB in the SMEM union. The bodies' own buffers:
t_ixw [ceil(T*N/64)*64] f32, t_ixs / t_ixi [T, 128] f32 / int32, t_ixn [T, 64] f32, t_ixq / t_ixqo [32, H] bf16,
t_ixc [128] int32, t_ixk [8, 64] int32 (20-24 KB) are one more group of the union, placed past t_w0 / t_w1 (no other
body runs at the same time); only the two barrier arrays are SMEM of their own.

Counts to scalars. The radix passes' totals (and INDEX_TOPK's per-slot counts of keys above / at the K-th) are full
reductions of register arrays; they become scalars through SMEM (`_smem_scalars`: one vector store into t_ixc,
then scalar loads), never by using the 0-d reduction itself as a loop carry or trip count (jax 0.11.2 represents
it as a 0-d vector, which Mosaic GPU rejects as a scalar).

What only the GPU exercises: the wgmma (interpret mode multiplies with jnp.dot on plain SMEM), the register layouts
(WG_STRIDED loads/stores of the 128-wide score rows), TMA zero-fill of the key boxes past the cache end / of the
new-rows box past row T (interpret mode reads NaN there, which the masks / unused rows absorb). Performance
(H200, glm5_slice at 4K, on-device profiles in experiments/results/): INDEX_SCORE takes 31-34 us per chunk task,
spread over the SMs. INDEX_TOPK, while every attention task waits for it, per layer: one task, 0.53 ms (radix
select 0.12 ms, compaction 0.41 ms: 6,144 streamed candidates, ~130 cycles each; bench_persistent_glm5_slice_phases
.json); 8 parts, 0.23 ms each (select 0.12, compaction 0.11; ..._topk_parts.json); 16 parts with the resident
ring, 0.18 ms each (select 0.10, compaction 0.08; ..._topk_resident.json); 2 bits per pass and the per-row
compaction, 114 us per layer on the critical path (select ~65 us, compaction ~47 us; ..._topk_rows.json). The
select's time was its count loop over the ring slots (~2 us per pass plus ~0.5 us per threshold counted: the
indexer-only probes ..._topk_bits{1,2,4}.json); with the keys in registers and the early stop it went from 60 to
22 us per task (..._regs_router.json), which leaves the compaction (~29 us, 18 of them the scalar scan of the rows
that meet the part's range) the larger half.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, ref
from pallas_kernels.gemv import TP
from pallas_kernels.indexer import _float_key, count_tile, score_rows
from pallas_kernels.persistent.format import C_INDEX_SCALE, C_INDEX_WSCALE, Op
from pallas_kernels.persistent.tiles import (TaskView, _stack, lane_iota, load_vec, phase, rope_rows,
                                             rows_per_copy, smem_row)

NEG_INF = float("-inf")
RADIX_BITS = 4  # `_radix_select`'s default bits per pass (2^4 - 1 thresholds counted per pass, 8 passes); the
# bodies take TileConfig.topk_bits
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_BIG = 2**30  # "no causal limit"
_KEY_NEG_INF = -2139095041  # indexer._float_key(-inf): the least key of any score
_LANES = 128  # t_ixc: at most this many reduced counts per round trip
_EQ_UNIT = 1 << 16  # INDEX_TOPK's slot totals: keys == lo counted in the high half-word (a slot holds TP * TN < 2^15)
GROUP = 8  # ring slots INDEX_TOPK's resident radix passes count per loop step (at most; divides CAND_SLOTS)
Q_GROUPS = 4  # INDEX_SCORE stages (and RoPEs) up to this many groups of TP q heads per round: one round at glm5_slice's
# T = 1. (With a scalar RoPE run by every thread the q staging took ~24 us per task either way, one round or 4 of 8
# heads, bench_persistent_glm5_slice_{priority,q32}.json; spread over the threads, `tiles.rope_rows`, 6 us.)
REG_SLOTS = 16  # INDEX_TOPK: up to this many candidate ring slots are counted from registers (4 keys per thread
# each), loaded once for every radix pass (glm5_slice at 4K context: 12 slots)
CAND_SLOTS = 32  # INDEX_TOPK's candidate ring t_ixr: [8, TN] f32 slots (64 KB on the GPU; Mosaic's barrier
# groups hold <= 32 barriers). Up to this many slots the candidates stay resident for every radix pass


def super_block(k: int, interpret: bool) -> int | None:
    """Key rows per score super-block: 128 (one WG_STRIDED row of f32 per query) when K allows it; interpret mode
    also takes K itself (the CPU tests' K = 16)."""
    if k % 128 == 0:
        return 128
    return k if interpret else None


def plan_shape(plan, interpret: bool):
    """(T, N, SB) of the INDEX_SCORE scratch for `tiles.scratch_types(index=...)`, None without indexer tasks."""
    bufs = plan.schedule.buffers
    cand = [b.shape for b in bufs if b.name.endswith("/index_cand_val")]
    heads = [b.shape[-1] for b in bufs if b.name.endswith("/index_w")]
    if not cand or not heads:
        return None
    sb = super_block(cand[0][-1], interpret)
    return None if sb is None else (plan.tokens, heads[0], sb)


def gmem_shape(plan, cfg):
    """(rows, H) of each CTA's GMEM staging of the RoPE'd indexer q (`prepare_q`): whole TK-row q slots; None
    without indexer tasks. (The scratch `kernel._gmem_shape` allocates also holds UV's.)"""
    bufs = plan.schedule.buffers
    heads = [b.shape[-1] for b in bufs if b.name.endswith("/index_w")]
    dims = [b.shape[-1] for b in bufs if b.name.endswith("/index_k")]
    if not heads or not dims:
        return None
    return cfg.tile_k * math.ceil(plan.tokens * heads[0] / cfg.tile_k), dims[0]


def add_scratch(out: dict, index, index_dim: int, dtype, cfg, interpret: bool) -> dict:
    """The indexer bodies' own SMEM (see the module docstring); index = `plan_shape`."""
    tokens, heads, sb = index
    qcols = cfg.tile_k * math.ceil(tokens * heads / cfg.tile_k)
    qrows = TP * math.gcd(heads // TP, Q_GROUPS) if heads % TP == 0 else TP  # (the body rejects heads % TP)
    own = dict(
        t_ixw=plgpu.SMEM((qcols,), jnp.float32),
        t_ixs=plgpu.SMEM((tokens, sb), jnp.float32),
        t_ixi=plgpu.SMEM((tokens, sb), jnp.int32),
        t_ixn=plgpu.SMEM((tokens, cfg.tile_k), jnp.float32),
        t_ixc=plgpu.SMEM((_LANES,), jnp.int32),  # reduced counts -> scalars (`_smem_scalars`)
        t_ixk=plgpu.SMEM((TP, cfg.tile_n), jnp.int32),  # INDEX_TOPK: one ring slot's keys, read as scalars
        t_ixq=plgpu.SMEM((qrows, index_dim), dtype),  # q staging, up to 32 heads x H, as read
        t_ixqo=plgpu.SMEM((qrows, index_dim), dtype),  # ... and RoPE'd (then TMA'd to GMEM)
        # the head weights iw [T, N], read as scalars (whole 128-byte TMAs: `rows_per_copy` stack rows)
        t_ixhw=plgpu.SMEM((rows_per_copy((tokens, heads), jnp.dtype(dtype).itemsize), tokens, heads), dtype),
    )
    out.update(
        t_ixkb=plgpu.Barrier(num_arrivals=max(1, index_dim // cfg.tile_n), num_barriers=cfg.slots),
        t_ixcb=plgpu.Barrier(num_arrivals=TP, num_barriers=max(CAND_SLOTS, 2 * qrows // TP)),  # INDEX_SCORE's q
    )
    ring = dict(t_ixr=plgpu.SMEM((CAND_SLOTS, TP, cfg.tile_n), jnp.float32))  # INDEX_TOPK's candidates
    if "t_alias" in out:
        # GPU: two more views of the big rings' SMEM (both bodies drain it before they return): the candidate
        # ring, and the bodies' own buffers past the weight rings t_w = t_w0 | t_w1, which INDEX_SCORE streams
        # through (they may overlap the x / norm-weight rings after t_w, which the indexer does not use)
        from pallas_kernels.persistent.attn_tiles import _group_bytes
        refs = out["t_alias"].refs
        rings = next(g for g in refs if "t_w" in g)
        own["t_a_pad_ix"] = plgpu.SMEM((_group_bytes({"t_w": rings["t_w"]}),), jnp.int8)  # (sorts first)
        out["t_alias"] = plgpu.RefUnion(*refs, ring, own)
    else:
        out.update(ring)
        out.update(own)
    return out


# ---- helpers ----------------------------------------------------------------------------------------------------


def _cdiv(a, b):
    return lax.div(a + (b - 1), b)


def _chunk_rows(pos: list, n_chunks: int, align: int):
    """(visible rows, rows per chunk) at this step: INDEX_SCORE's run-time split of the visible index-key rows
    (max(pos) + 1) into n_chunks chunks of a multiple of `align` rows. pos: the T positions (int32 scalars)."""
    top = pos[0]
    for p in pos[1:]:
        top = jnp.maximum(top, p)
    visible = top + 1
    return visible, lax.div(_cdiv(visible, n_chunks) + (align - 1), align) * align


def _smem_scalars(tiles, vals, ref):
    """`smem_row`, then the int32 scalars back."""
    smem_row(tiles, vals, ref)
    return [ref[tiles.c(j)] for j in range(len(vals))]


def _radix_select(k: int, count_pass, ntok: int, zero, bits: int = RADIX_BITS):
    """Exact top-K threshold per token: (lo [T], need [T]) such that the top K keys are all keys > lo and the
    first `need` keys equal to lo. count_pass(p, cands) -> totals [T][2^b - 1] of count(key >= cand) over the
    whole set as int32 scalars (`_smem_scalars`), cands [T][2^b - 1] int32 scalars; p = the pass (traced).
    bits (b): key bits decided per pass (b = 1: a binary search). Each pass keeps the bin [lo, lo + 2^shift)
    that holds the K-th largest key; once exactly K keys are >= lo (ge == K) the top K are the keys >= lo, and
    the token is done early with (lo - 1, 0) -- lo > INT32_MIN then, so lo - 1 does not wrap. Else after 32 / b
    passes lo is the K-th largest key and need = K - count(key > lo). The passes stop when every token is done:
    with distinct scores after ~log2(#keys) mantissa bits past the exponent's, not 32 / b passes."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"radix select: bits per pass must divide 32 and be at most 8, got {bits}")
    n_cand = 2**bits - 1
    passes = 32 // bits

    def body(state):
        p, los, his, ges = state[0], state[1:1 + ntok], state[1 + ntok:1 + 2 * ntok], state[1 + 2 * ntok:]
        shift = (32 - bits) - p * bits
        cands = [[lo + lax.shift_left(zero + j, shift) for j in range(1, n_cand + 1)] for lo in los]
        totals = count_pass(p, cands)
        out = ([], [], [])
        for lo, hi, ge, counts in zip(los, his, ges, totals):
            # counts[j - 1] = count(key >= lo + j << shift), non-increasing in j: m = the largest j with >= K
            m = sum(jnp.where(cnt >= k, 1, 0) for cnt in counts)
            ext = [ge, *counts, hi]  # ext[j] = count(key >= lo + j << shift), j = 0 .. 2^b
            done = ge == k
            new = (lo + lax.shift_left(m, shift), sum(jnp.where(m + 1 == j, ext[j], 0) for j in range(1, n_cand + 2)),
                   sum(jnp.where(m == j, ext[j], 0) for j in range(n_cand + 1)))
            for acc, old, nw in zip(out, (lo, hi, ge), new):
                acc.append(jnp.where(done, old, nw))
        return (p + 1, *out[0], *out[1], *out[2])

    def cond(state):
        live = state[1 + 2 * ntok] != k
        for ge in state[2 + 2 * ntok:]:
            live = live | (ge != k)
        return (state[0] < passes) & live

    # ge starts at -1 (never K): until a pass moves lo off INT32_MIN, count(key >= lo) is not tracked
    init = (zero, *(zero + _INT32_MIN for _ in range(ntok)), *(zero for _ in range(ntok)),
            *(zero - 1 for _ in range(ntok)))
    state = lax.while_loop(cond, body, init)
    los, his, ges = state[1:1 + ntok], state[1 + ntok:1 + 2 * ntok], state[1 + 2 * ntok:]
    return ([jnp.where(ge == k, lo - 1, lo) for lo, ge in zip(los, ges)],
            [jnp.where(ge == k, 0, k - hi) for hi, ge in zip(his, ges)])


def topk_reference(vals, idx, part, parts: int, token):
    """INDEX_TOPK's part `part` of `parts` for `token` in jnp (the simulator's and the interpret-mode v1 body's):
    the top-K of the token's candidates in vals / idx [nc, T, K] (ties to the lower flattened (chunk, slot)),
    listed in flattened order (ascending row, as `index_topk_body` writes them), valid ones first -> this part's
    slots [part * K / parts, (part + 1) * K / parts): (rows int32 [1, K / parts], 0 where invalid; valid int32
    [1, K / parts])."""
    vals, idx = (lax.dynamic_slice_in_dim(a, token, 1, axis=1) for a in (vals, idx))
    nc, nt, k = vals.shape
    flat_v, flat_i = (a.transpose(1, 0, 2).reshape(nt, nc * k) for a in (vals, idx))
    sel, valid = (a[0] for a in ref.select_topk(flat_v[None], k))
    order = jnp.argsort(jnp.where(valid, sel, nc * k), axis=-1)
    sel, valid = jnp.take_along_axis(sel, order, -1), jnp.take_along_axis(valid, order, -1)
    rows = jnp.where(valid, jnp.take_along_axis(flat_i, sel, -1), 0).astype(jnp.int32)
    n = k // parts
    return tuple(lax.dynamic_slice_in_dim(a, part * n, n, axis=1) for a in (rows, valid.astype(jnp.int32)))


# ---- INDEX_SCORE ------------------------------------------------------------------------------------------------


def index_score_body(r, key, consts):
    """INDEX_SCORE of one chunk (see the module docstring), or None when the shapes do not fit the tiles."""
    _, (n_chunks, align), _, islots, oslots = key
    tiles = r.tiles
    if tiles is None or "t_ixs" not in tiles.s or "t_pe" not in tiles.s:
        return None
    iq_ref, iw_ref, val_ref, idx_ref = (_stack(r, sl) for sl in (islots[0], islots[1], oslots[0], oslots[1]))
    if any(a is None for a in (iq_ref, iw_ref, val_ref, idx_ref)) or islots[2][0] != "cache":
        return None
    if any(sl[0] != "in" for sl in islots[3:6]):
        return None
    s, c, dt = tiles.s, tiles.c, tiles.dtype
    group = islots[2][1]  # the index-key cache group: every layer's ref, picked per task (`with_caches`)
    cache, new_rows = r.caches[group][0], r.rows[group]
    pos_ref, cos_ref, sin_ref = (r.inputs[sl[1]] for sl in islots[3:6])
    nt, heads = iw_ref.shape[1:]
    hd = iq_ref.shape[-1] // heads
    kk = val_ref.shape[-1]
    tk, tn, slots = tiles.tk, tiles.tn, tiles.cfg.slots
    rr = s["t_pe"].shape[1]
    sb = s["t_ixs"].shape[1]
    parts = hd // tn if hd % tn == 0 else 0
    tpg = tk // heads if tk % heads == 0 else 0  # tokens per q slot
    qrows = s["t_ixq"].shape[0]  # q rows staged (and RoPE'd) per round
    if (parts not in (1, 2) or not tpg or heads % qrows or qrows % TP or s["t_ixq"].shape[1] != hd or rr > hd
            or rr % 2
            or s["t_ixs"].shape[0] != nt or kk % sb or sb % tk or s["t_ixw"].shape[0] < tk * math.ceil(nt / tpg)
            or any(a.dtype != dt for a in (iq_ref, cache, new_rows)) or cache.shape[-1] != hd
            or nt * (2**tiles.cfg.topk_bits - 1) > _LANES):
        return None
    q_slots = math.ceil(nt / tpg)
    ks = slots - q_slots  # key ring depth
    if ks < 1:
        return None
    rings = [s["t_w0"], s["t_w1"]][:parts]
    kbar = s["t_ixkb"]
    w_s, sc, si, nsc, stage, stage_out = (s[k] for k in ("t_ixw", "t_ixs", "t_ixi", "t_ixn", "t_ixq", "t_ixqo"))
    scale = float(consts[C_INDEX_SCALE]) * float(consts[C_INDEX_WSCALE])
    nsub = sb // tk

    def dots(slot, g):
        """keys [TK, H] (ring slot) @ q slot g^T -> f32 [TK, TK]."""
        if tiles.interpret:
            return sum(jnp.dot(ring[slot].astype(jnp.float32), ring[c(g)].astype(jnp.float32).T,
                               preferred_element_type=jnp.float32) for ring in rings)

        def compute(acc):
            for ring in rings:
                plgpu.wgmma(acc, ring.at[slot], _compat.transpose_ref(ring.at[c(g)], (1, 0)))
            return acc[...]
        return pl.run_scoped(compute, plgpu.ACC((tk, tk), jnp.float32))

    def block_scores(slot, start, limits):
        """Score vectors [TK] of the key block in `slot` (rows start ..), one per token."""
        out = []
        for g in range(q_slots):
            toks = list(range(g * tpg, min(nt, (g + 1) * tpg)))
            lim = [limits[t] for t in toks] + [limits[0]] * (tpg - len(toks))
            rows = score_rows(dots(slot, g), w_s.at[pl.ds(c(g * tk), tk)], start=start, limits=lim,
                              num_heads=heads, interpret=tiles.interpret)
            out += rows[:len(toks)]
        return out

    def prepare_q(xi, wi):
        """q (RoPE'd) into the first q_slots ring slots, head weights into t_ixw. The RoPE'd rows go from the
        plain SMEM stage to the CTA's GMEM staging rows and back by TMA into the swizzled ring slots: no register
        copy between the two SMEM layouts lowers on both jax versions (0.10's layout inference rejects the bank
        conflicts of rows a multiple of 128 bytes apart, 0.11's transposed SMEM transfer requires exactly that)."""
        # [q_slots * TK, H] of the CTA's scratch (which UV shares, `kernel._gmem_shape`): row t * N + n = head n
        # of token t
        q_gmem = r.gmem.at[r.cta, pl.ds(c(0), q_slots * tk), pl.ds(c(0), hd)]
        small = s["t_bar3"].at[c(0)]  # cos, sin and the head weights in flight together (one round trip)
        plgpu.copy_gmem_to_smem(cos_ref.at[pl.ds(c(0), TP)], s["t_cos"], small)
        plgpu.copy_gmem_to_smem(sin_ref.at[pl.ds(c(0), TP)], s["t_sin"], small)
        plgpu.copy_gmem_to_smem(iw_ref.at[pl.ds(wi, s["t_ixhw"].shape[0])], s["t_ixhw"], small)
        plgpu.barrier_wait(small)
        bars = s["t_ixcb"]  # TP arrivals: barriers 2j / 2j + 1 take group j's row copies into each stage

        @pl.loop(0, nt * heads)
        def _(j):
            w_s[j] = s["t_ixhw"][c(0), lax.div(j, heads), lax.rem(j, heads)].astype(jnp.float32) * scale

        for t in range(nt):  # static: the RoPE's cos / sin row
            @pl.loop(0, heads // qrows)
            def _(rnd):  # qrows heads of token t per round, in groups of TP rows
                h0 = rnd * qrows
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous round's store has read the stage

                def row(i):  # by TMA, not GMEM loads: iq is another CTA's TMA store; the rows go to both stages
                    src = iq_ref.at[xi, pl.ds(c(t), 1), pl.ds((h0 + i) * hd, hd)]  # (dims >= R kept)
                    for k, stg in enumerate((stage, stage_out)):
                        plgpu.copy_gmem_to_smem(src, stg.at[pl.ds(i, 1)], bars.at[2 * lax.div(i, TP) + k])
                if tiles.interpret:
                    for i in range(qrows):
                        row(c(i))
                else:  # from the 4 warps, a quarter of the rows each (`mla_attention.gather_rows`' warps=True)
                    @plgpu.warp_map
                    def _(w):
                        for j in range(qrows // 4):
                            row(w * (qrows // 4) + j)
                for j in range(2 * qrows // TP):
                    plgpu.barrier_wait(bars.at[c(j)])
                rope_rows(stage, stage_out, qrows, s["t_cos"], s["t_sin"], rr, dt, t=t, interpret=tiles.interpret)
                plgpu.commit_smem()  # generic-proxy stores -> the TMA that reads the stage
                plgpu.copy_smem_to_gmem(stage_out, q_gmem.at[pl.ds(c(t * heads) + h0, qrows)])
        plgpu.wait_smem_to_gmem(0)  # the staging rows are written before the TMA loads below read them
        for g in range(q_slots):
            for p, ring in enumerate(rings):
                plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(c(g * tk), tk), pl.ds(c(p * tn), tn)], ring.at[c(g)],
                                        kbar.at[c(g)])
        for g in range(q_slots):
            plgpu.barrier_wait(kbar.at[c(g)])

    def fn(t: TaskView):
        chunk, oi_v, oi_i = t.arg(0), t.out(0), t.out(1)
        pos = [pos_ref[c(q)] for q in range(nt)]
        visible, size = _chunk_rows(pos, n_chunks, align)
        r0 = chunk * size
        r1 = jnp.minimum(visible, r0 + size)
        n_rows = jnp.maximum(r1 - r0, 0)
        limits = [jnp.minimum(p, r1 - 1) for p in pos]
        nblk = _cdiv(n_rows, tk)
        n_sb = _cdiv(n_rows, sb)

        layer = t.inp(2)  # member index in the index-key cache group
        with phase("q"):  # profiler phases (`persistent_step(profile_dir=...)`)
            prepare_q(t.inp(0), t.inp(1))

        # This step's new rows: scored once, patched over their (stale) cache positions below.
        nslot = c(q_slots)
        for p, ring in enumerate(rings):
            plgpu.copy_gmem_to_smem(new_rows.at[layer, pl.ds(c(0), tk), pl.ds(c(p * tn), tn)], ring.at[nslot],
                                    kbar.at[nslot])
        plgpu.barrier_wait(kbar.at[nslot])
        for q, row in enumerate(block_scores(nslot, c(0), [c(_BIG)] * nt)):
            nsc[c(q), pl.ds(c(0), tk)] = row

        def issue(b):
            slot = q_slots + lax.rem(b, ks)

            def copy(keys):
                for p, ring in enumerate(rings):
                    plgpu.copy_gmem_to_smem(keys.at[pl.ds(r0 + b * tk, tk), pl.ds(c(p * tn), tn)], ring.at[slot],
                                            kbar.at[slot])
            r.with_caches((group,), layer, copy)

        def scan(on_sb, carry, peel=False):
            """Scores of the chunk, one super-block at a time into t_ixs, then carry = on_sb(sb, carry)."""
            for b in range(ks):
                pl.when(b < nblk)(lambda b=b: issue(c(b)))

            def step(sbi, carry):
                @pl.when((sbi + 1) * nsub > nblk)  # a partial super-block: -inf past the chunk
                def _():
                    for q in range(nt):
                        sc[c(q), pl.ds(c(0), sb)] = jnp.full((sb,), NEG_INF, jnp.float32)

                for jj in range(nsub):
                    b = sbi * nsub + jj

                    @pl.when(b < nblk)
                    def _():
                        slot = q_slots + lax.rem(b, ks)
                        plgpu.barrier_wait(kbar.at[slot])
                        rows = block_scores(slot, r0 + b * tk, limits)
                        for q in range(nt):
                            sc[c(q), pl.ds(c(jj * tk), tk)] = rows[q]
                        pl.when(b + ks < nblk)(lambda: issue(b + ks))
                base = r0 + sbi * sb
                for tq in range(nt):
                    i = pos[tq] - base

                    @pl.when((i >= 0) & (i < sb) & (pos[tq] < r1))
                    def _():
                        for q in range(nt):
                            sc[c(q), i] = jnp.where(pos[tq] <= pos[q], nsc[c(q), c(tq)], NEG_INF)
                return on_sb(sbi, carry)

            if peel:  # the first super-block outside the loop: the carry then has the registers' layout
                carry = step(c(0), carry)
                return lax.fori_loop(1, n_sb, step, carry)
            return lax.fori_loop(0, n_sb, step, carry)

        def write_out(sbi, wait=True):
            cols = pl.ds(sbi * sb, sb)
            for q in range(nt):
                plgpu.copy_smem_to_gmem(sc.at[pl.ds(c(q), 1)], val_ref.at[oi_v, chunk, pl.ds(c(q), 1), cols])
                plgpu.copy_smem_to_gmem(si.at[pl.ds(c(q), 1)], idx_ref.at[oi_i, chunk, pl.ds(c(q), 1), cols])
            if wait:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # t_ixs / t_ixi are rewritten next

        @pl.when(n_rows <= kk)
        @phase("fast")
        def _fast():
            def on_sb(sbi, carry):
                rows = lane_iota(tiles, sb) + (r0 + sbi * sb)
                for q in range(nt):
                    v = load_vec(tiles, sc.at[c(q)])
                    si[c(q), pl.ds(c(0), sb)] = jnp.where(v > NEG_INF, rows, 0)
                plgpu.commit_smem()
                write_out(sbi)
                return carry

            scan(on_sb, c(0))
            for q in range(nt):
                sc[c(q), pl.ds(c(0), sb)] = jnp.full((sb,), NEG_INF, jnp.float32)
                si[c(q), pl.ds(c(0), sb)] = jnp.zeros((sb,), jnp.int32)
            plgpu.commit_smem()

            @pl.loop(n_sb, kk // sb)
            def _(sbi):  # the same padding rows every time: no wait between the stores (one at the end)
                write_out(sbi, wait=False)

        @pl.when(n_rows > kk)
        def _slow():
            def count_pass(_, cands):
                def on_sb(sbi, counts):
                    return tuple(tuple(count_tile(sc.at[pl.ds(c(q), 1)], cands[q], None if counts is None
                                                  else list(counts[q]))) for q in range(nt))
                counts = scan(on_sb, None, peel=True)
                tot = _smem_scalars(tiles, [jnp.sum(x) for per_q in counts for x in per_q], s["t_ixc"])
                n_cand = len(counts[0])
                return [tot[q * n_cand:(q + 1) * n_cand] for q in range(nt)]

            los, needs = _radix_select(kk, count_pass, nt, c(0), bits=tiles.cfg.topk_bits)

            def on_sb(sbi, carry):
                # The keys as a vector op into t_ixi (free on this path), read back as scalars: jax 0.11.2
                # lowers a bitcast of a scalar to a vector, which a scalar loop cannot use.
                plgpu.commit_smem()  # the previous super-block's scalar reads of t_ixi are done
                for q in range(nt):
                    si[c(q), pl.ds(c(0), sb)] = _float_key(load_vec(tiles, sc.at[c(q)]))
                plgpu.commit_smem()
                out = []
                for q in range(nt):
                    def one(i, st, q=q):
                        n, eq = st
                        v = sc[c(q), i]
                        kv = si[c(q), i]
                        is_eq = kv == los[q]
                        take = (kv > los[q]) | (is_eq & (eq < needs[q]))

                        @pl.when(take)
                        def _():
                            val_ref[oi_v, chunk, c(q), n] = v
                            idx_ref[oi_i, chunk, c(q), n] = jnp.where(v > NEG_INF, r0 + sbi * sb + i, 0)
                        return n + take.astype(jnp.int32), eq + (take & is_eq).astype(jnp.int32)
                    out.append(lax.fori_loop(0, sb, one, carry[q]))
                return tuple(out)

            scan(on_sb, tuple((c(0), c(0)) for _ in range(nt)))

        plgpu.wait_smem_to_gmem(0)
    return fn


# ---- INDEX_TOPK -------------------------------------------------------------------------------------------------


def index_topk_body(r, key, consts):
    """INDEX_TOPK: exact top-K of all chunks' candidates per token (see the module docstring), or None."""
    _, (parts,), _, islots, oslots = key
    tiles = r.tiles
    if tiles is None or "t_ixr" not in tiles.s:  # (t_ixr and its barriers t_ixcb come together)
        return None
    val_ref, cid_ref, out_idx, out_valid = (_stack(r, sl) for sl in (*islots[:2], *oslots[:2]))
    if any(a is None for a in (val_ref, cid_ref, out_idx, out_valid)):
        return None
    s, c = tiles.s, tiles.c
    ring, bar, cnt, keys = s["t_ixr"], s["t_ixcb"], s["t_ixc"], s["t_ixk"]
    nc, _, kk = val_ref.shape[1:]  # (one token per task)
    width = ring.shape[2]  # candidates per row of a ring slot (TN)
    stages = ring.shape[0]
    if (ring.shape[1] != TP or kk % width or (nc * kk // width) % TP or keys.shape != (TP, width)
            or width > 255 or TP % 2):  # (a row's counts are byte fields of the compaction's packed sums)
        return None
    row_per_chunk = kk // width
    span = kk // parts  # output slots per part
    geometry = {k[1] for k in r.plan.branches if Op(k[0]) == Op.INDEX_SCORE}  # INDEX_SCORE's {(n_chunks, align)}
    (n_chunks, chunk_align), = geometry if len(geometry) == 1 else ((None, None),)
    pos_ref = r.inputs[r.plan.inputs.index("pos")]
    rpc_min = -(-kk // (nc * width))  # streamed slots >= K
    rpc_step = TP // math.gcd(nc, TP)  # nc * rpc a whole number of ring slots
    per_step = min(GROUP, nc * row_per_chunk // TP)  # no more than the step can ever have (tiny's CPU tests: 1-2)
    n_regs = min(REG_SLOTS, stages, nc * row_per_chunk // TP)  # slots whose keys the select can keep in registers
    # the register-resident slots' packed totals (keys > lo) + (keys == lo) * _EQ_UNIT, in a row of INDEX_SCORE's
    # t_ixi (idle while INDEX_TOPK runs); 0: none (a row too short), every slot walked
    slot_tab = s["t_ixi"].at[0]
    n_tab = n_regs if n_regs <= slot_tab.shape[0] else 0

    def geometry_now():
        """(TN-rows of each chunk that can hold candidates at this step, rows per chunk when every chunk took
        INDEX_SCORE's fast path -- candidate slot j of chunk ch is then key row ch * size + j -- else -1); see the
        module docstring."""
        if n_chunks != nc:  # no single INDEX_SCORE geometry: every row, candidate rows from cand_idx
            return c(row_per_chunk), c(-1)
        _, size = _chunk_rows([pos_ref[c(j)] for j in range(pos_ref.shape[0])], nc, chunk_align)
        rpc = jnp.maximum(_cdiv(jnp.minimum(size, kk), width), rpc_min)
        return (jnp.minimum(lax.div(rpc + (rpc_step - 1), rpc_step) * rpc_step, row_per_chunk),
                jnp.where(size <= kk, size, -1))

    def fn(t: TaskView):
        vi, ii, oi, ov = t.inp(0), t.inp(1), t.out(0), t.out(1)
        rpc, dense = geometry_now()
        n_slot = lax.div(rpc * nc, TP)  # ring slots of the token
        q = t.arg(2)  # this task's token (`schedule` splits the merge per token and part)

        def where(g, i):  # (chunk, first candidate) of row i of the g-th ring slot
            row = g * TP + i
            return lax.div(row, rpc), lax.rem(row, rpc) * width

        def src(g, i, ref, idx):
            ch, off = where(g, i)
            return ref.at[idx, ch, pl.ds(q, 1), pl.ds(off, width)]

        def issue(g):
            st = lax.rem(g, stages)
            for i in range(TP):
                plgpu.copy_gmem_to_smem(src(g, i, val_ref, vi), ring.at[st, pl.ds(c(i), 1)], bar.at[st])

        def stream(on_slot, carry, load, peel=False):
            """on_slot over the n_slot ring slots of candidates; they are TMA'd in when `load` (a traced
            bool) or when they do not all fit the ring (else the ring still holds them: `resident`)."""
            load = load | (n_slot > stages)
            for g in range(stages):
                pl.when(load & (g < n_slot))(lambda g=g: issue(c(g)))

            def step(g, carry):
                st = lax.rem(g, stages)
                pl.when(load)(lambda: plgpu.barrier_wait(bar.at[st]))
                carry = on_slot(g, st, carry)
                pl.when(load & (g + stages < n_slot))(lambda: issue(g + stages))
                return carry

            if peel:
                carry = step(c(0), carry)
                return lax.fori_loop(1, n_slot, step, carry)
            return lax.fori_loop(0, n_slot, step, carry)

        def slot_keys(g):  # ring slot g's candidates as keys [TP, TN] int32
            x = ring[g] if tiles.interpret else plgpu.load(ring.at[g], (), layout=plgpu.Layout.WG_STRIDED(
                (TP, width), vec_size=1))
            return _float_key(x)

        def tally(counts, key, cands, live=1):
            """counts (None: none yet) + per-thread counts of key >= each threshold (times `live`)."""
            new = [jnp.where(key >= cand, live, 0) for cand in cands]
            return new if counts is None else [a + b for a, b in zip(counts, new)]

        def totals(counts):  # per-thread partial counts -> `cnt` -> int32 scalars
            with phase("reduce"):
                smem_row(tiles, [jnp.sum(x) for x in counts], cnt)

        def count_pass(p, cands):
            """The first pass loads the candidates (`stream`, counting each slot as it lands), as does every
            pass when they do not fit the ring; later passes over a resident ring count GROUP slots per loop
            step (the loop's own cost was most of a pass). Totals -> `cnt` -> scalars."""
            def on_slot(g, st, counts):
                return tuple(count_tile(ring.at[st], cands[0], None if counts is None else list(counts)))

            def group(gi, counts):
                for j in range(per_step):
                    g = gi * per_step + j  # past n_slot: slot n_slot - 1 again, not counted
                    counts = tally(counts, slot_keys(jnp.minimum(g, n_slot - 1)), cands[0],
                                   (g < n_slot).astype(jnp.int32))
                return counts

            grouped = (p > 0) & (n_slot <= stages)
            with phase("count"):
                @pl.when(grouped)
                def _():
                    totals(lax.fori_loop(1, _cdiv(n_slot, per_step), lambda gi, cs: tuple(group(gi, list(cs))),
                                         tuple(group(c(0), None))))

                @pl.when(~grouped)
                def _():
                    totals(stream(on_slot, None, p == 0, peel=True))
            return [[cnt[c(j)] for j in range(len(cands[0]))]]

        def select(count):  # the radix select -> the last two lanes of `cnt`, read after either select
            with phase("select"):  # profiler phases (`persistent_step(profile_dir=...)`)
                (lo,), (need,) = _radix_select(kk, count, 1, c(0), bits=tiles.cfg.topk_bits)
            plgpu.commit_smem()  # every thread has read the last pass's counts
            cnt[c(_LANES - 2)] = lo
            cnt[c(_LANES - 1)] = need

        def threshold():
            """(lo, need) back from `cnt` after a select and a commit. An early exit below -inf's key (every finite
            key and some -inf ones are the top K) selects the finite keys, as lo = -inf's key does: the counts
            below never count -inf candidates."""
            return jnp.maximum(cnt[c(_LANES - 2)], _KEY_NEG_INF), cnt[c(_LANES - 1)]

        in_regs = n_slot <= n_regs

        @pl.when(in_regs)
        def _():
            """Up to REG_SLOTS slots: loaded once, their keys kept in registers for every pass (slots past
            n_slot read as INT32_MIN, which no threshold counts: thresholds are > INT32_MIN)."""
            @pl.loop(0, n_slot)
            def _(g):
                issue(g)

            @pl.loop(0, n_slot)
            def _(g):
                plgpu.barrier_wait(bar.at[g])
            keys = [jnp.minimum(slot_keys(c(g)), jnp.where(g < n_slot, _INT32_MAX, _INT32_MIN))
                    for g in range(n_regs)]

            def count_regs(_, cands):
                with phase("count"):
                    counts = None
                    for key in keys:
                        counts = tally(counts, key, cands[0])
                    totals(counts)
                return [[cnt[c(j)] for j in range(len(cands[0]))]]
            select(count_regs)
            if n_tab:
                with phase("slot_totals"):  # every slot's (keys > lo, keys == lo) at once, for the compaction
                    plgpu.commit_smem()
                    lo, _ = threshold()
                    smem_row(tiles, [jnp.sum(jnp.where(key > lo, 1, 0) + jnp.where(key == lo, _EQ_UNIT, 0))
                                     for key in keys], slot_tab)

        pl.when(~in_regs)(lambda: select(count_pass))

        plgpu.commit_smem()
        lo, need = threshold()

        r_lo = t.arg(0) * span  # this part's output slots [r_lo, r_lo + span)
        r_hi = r_lo + span

        def advance(n, eq, gt, n_eq):
            """(n, eq) past `gt` keys above lo and `n_eq` equal to it, and whether their output slots
            [n, n_next) meet this part's. Keys equal to -inf's are -inf candidates: they count as ties, never
            as selected rows. (eq <= need throughout, so a slot's totals advance as its rows one by one do.)"""
            n_next = n + gt + jnp.where(lo != _KEY_NEG_INF, jnp.clip(need - eq, 0, n_eq), 0)
            return n_next, jnp.minimum(eq + n_eq, need), (n < r_hi) & (n_next > r_lo)

        def walk_slot(g, st, carry):
            """The slot's selected count per row from packed vector counts (keys > lo; keys == lo, of which
            the first `need` in flattened order are taken): a row is scanned by scalars only when its output
            slots [n, n_next) meet this part's."""
            n, eq = carry
            x = ring[st] if tiles.interpret else plgpu.load(ring.at[st], (), layout=plgpu.Layout.WG_STRIDED(
                (TP, width), vec_size=1))
            kx = _float_key(x)
            plgpu.commit_smem()  # the previous slot's scalar reads of `keys` are done
            keys[...] = kx  # read back as scalars below (see INDEX_SCORE's slow path)
            with phase("row_counts"):
                # row i's two counts (each <= TN < 256) in byte fields 2 (i % 2) and 2 (i % 2) + 1 of word i // 2
                row = (lax.broadcasted_iota(jnp.int32, (TP, width), 0) if tiles.interpret else
                       plgpu.broadcasted_iota(jnp.int32, (TP, width), 0, layout=plgpu.Layout.WG_STRIDED(
                           (TP, width), vec_size=1)))
                field = lax.shift_left(jnp.where(kx > lo, 1, 0) + jnp.where(kx == lo, 256, 0),
                                       lax.shift_left(row & 1, 4))
                word = lax.shift_right_logical(row, 1)
                smem_row(tiles, [jnp.sum(jnp.where(word == w, field, 0)) for w in range(TP // 2)], cnt)

            def row_counts(i):  # (keys > lo, keys == lo) in row i of the slot, from `cnt`
                word = lax.shift_right_logical(cnt[lax.div(i, 2)], lax.rem(i, 2) * 16)
                return word & 255, lax.shift_right_logical(word, 8) & 255

            def scan_row(i, carry):
                """Row i of the slot (TN candidates) by scalars, until the part's last output slot is written (the
                row's counts, not the scan, carry n on): its chunk and first slot computed once per row (a dynamic
                division), not per candidate."""
                ch, off = where(g, i)
                unroll = math.gcd(width, 8)

                def scan(key_row):
                    def one(col, st2):
                        n, eq = st2
                        v = ring[st, i, col]
                        kv = keys[i, col]
                        is_eq = kv == lo
                        take = (kv > lo) | (is_eq & (eq < need))
                        sel = take & (v > NEG_INF)
                        mine = sel & (n >= r_lo) & (n < r_hi)

                        @pl.when(mine)
                        def _():
                            out_valid[ov, q, n] = c(1)
                            out_idx[oi, q, n] = key_row(col)
                        return n + sel.astype(jnp.int32), eq + (take & is_eq).astype(jnp.int32)

                    def group(st3):  # `unroll` candidates unrolled: their loads do not wait for the stores
                        col0, *st2 = st3
                        for k in range(unroll):
                            st2 = one(col0 + k, st2)
                        return col0 + unroll, *st2
                    lax.while_loop(lambda st3: (st3[0] < width) & (st3[1] < r_hi), group, (c(0), *carry))

                # the key row: by arithmetic after the fast path (no dependent GMEM load per selection), else
                # cand_idx's; one loop per case, not a branch per candidate
                pl.when(dense >= 0)(lambda: scan(lambda col: ch * dense + off + col))
                pl.when(dense < 0)(lambda: scan(lambda col: cid_ref[ii, ch, q, off + col]))

            def each_row(i, carry):
                n, eq = carry
                n_next, eq_next, meets = advance(n, eq, *row_counts(i))
                pl.when(meets)(lambda: scan_row(i, carry))
                return n_next, eq_next

            with phase("scan"):
                # the slot's totals first: only a slot that meets the part's range walks its rows (at 4K, 1-2
                # of the ~12 slots per part); the others advance by their totals alone
                words = [cnt[c(w)] for w in range(TP // 2)]
                gt = sum((w & 255) + (lax.shift_right_logical(w, 16) & 255) for w in words)
                n_eq = sum((lax.shift_right_logical(w, 8) & 255) + lax.shift_right_logical(w, 24) for w in words)
                n_next, eq_next, meets = advance(n, eq, gt, n_eq)
                n_row, eq_row = lax.fori_loop(0, jnp.where(meets, TP, 0), each_row, (n, eq))
                return jnp.where(meets, n_row, n_next), jnp.where(meets, eq_row, eq_next)

        def on_slot(g, st, carry):
            """walk_slot, or, with the slots' totals at hand (`slot_tab`), only where the slot meets this part's
            output slots (at 4K, 1-2 of the ~12 slots per part): the others advance by their totals alone."""
            if not n_tab:
                return walk_slot(g, st, carry)
            word = slot_tab[jnp.minimum(g, n_tab - 1)]
            n_next, eq_next, meets = advance(*carry, word & (_EQ_UNIT - 1), lax.shift_right_logical(word, 16))
            skip = in_regs & ~meets
            n_w, eq_w = lax.fori_loop(0, jnp.where(skip, 0, 1), lambda _, cr: walk_slot(g, st, cr), carry)
            return jnp.where(skip, n_next, n_w), jnp.where(skip, eq_next, eq_w)

        with phase("compact"):
            n, _ = stream(on_slot, (c(0), c(0)), False)

            @pl.loop(jnp.clip(n, r_lo, r_hi), r_hi)
            def _(j):
                out_idx[oi, q, j] = c(0)
                out_valid[ov, q, j] = c(0)
    return fn
