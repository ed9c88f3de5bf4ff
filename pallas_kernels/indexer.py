"""DSA lightning indexer (DeepSeek-V3.2 sec. 2.1) in Pallas Mosaic GPU for Hopper: scores and an exact top-k.

Same signatures as `ref.indexer_scores` / `ref.indexer_topk`. Axis legend as in `ref`: B batch, T query tokens,
S cached tokens, N indexer heads, H head dim, K selected rows.

Scores (`scores_tile`, the reusable tile body; `indexer_scores` is its `plgpu.kernel` wrapper):
  grid (CTAs per batch, B). Each CTA keeps q_b^T [H, T*N] (bf16) and the head weights [T*N] (f32, `scale` folded
  in: w * relu(scale * x) == (scale * w) * relu(x) for scale > 0) resident in SMEM and streams chunks of the key
  cache [block_s, H] through a `num_stages`-deep TMA ring, chunk c, c + G, c + 2G, ... One wgmma per chunk
  computes dots [block_s, T*N] = keys [block_s, H] @ q^T [H, T*N] (swap-AB: the keys fill wgmma's M >= 64 slot, the
  T*N <= 256 query heads its N slot). Epilogue in registers: ReLU, times the head weights broadcast along rows
  (a WGMMA column vector), per-query sums over that query's N columns (row reductions), causal mask
  s <= q_pos[b, t] and s < S, then [T, block_s] f32 to SMEM and a TMA store. The last chunk may run past S: on
  the GPU the TMA zero-fills those key rows and the mask gives them -inf (jax 0.10's interpreter raises on
  out-of-bounds TMA reads, so in interpret mode the wrapper pads the keys instead).

Top-k (`indexer_topk`): EXACT, in three steps, two of them Pallas.
  1. The scores kernel above writes [B, T, S_pad] (padding -inf).
  2. `_select_kernel` (Pallas, one CTA = one warpgroup per (b, t) row) finds the K-th largest score exactly by a
     radix select over the order-preserving int32 key of the float bits (`_float_key`): `radix_bits` bits per
     pass, each pass counts count(key >= lo + j * 2^shift) for the 2^radix_bits - 1 candidates j at once
     (elementwise compares and adds in registers, one reduction per candidate per pass), keeps the largest j
     whose count is >= K, and stops early once count(key >= lo) == K (then every key in the final bin is taken).
     It returns per row the bin [lo, lo + 2^shift) that holds the K-th largest key and `need`, how many keys of
     that bin belong to the top-k (all keys above the bin do). At most 32 / radix_bits passes over the row.
  3. Compaction in XLA (cumsum + scatter, `_collect`): keys above the bin, plus the first `need` keys of the bin
     in index order. Pallas Mosaic GPU has no per-lane scatter, ballot or prefix-scan, so writing the selected
     indices contiguously is done outside the kernel.
  Exactness: the returned set equals `jax.lax.top_k`'s. Ties are broken like `lax.top_k` (lower index first), so
  even with equal scores the sets agree; the ORDER differs (ascending index, not descending score). `valid` is
  score > -inf, as in the reference. Scores must be NaN-free.
  Rows of up to `select_resident_bytes` (48K scores) are loaded into SMEM once; longer rows are re-streamed from
  L2 every pass. `select="lax"` swaps steps 2-3 for `jax.lax.top_k` on the kernel's scores (a baseline).
  Limits (estimates, not yet measured): the selection is one CTA = one warpgroup per (b, t) row, B*T CTAs in all,
  so it is bound by a single SM. Per pass it costs ~3 * (2^radix_bits - 1) lane-instructions per score plus
  2^radix_bits - 1 warpgroup reductions, over up to 32 / radix_bits passes (fewer with the early exit); one bit
  per pass (the default) is the cheapest per resolved bit: ~5 us at S = 4K, ~15 us at 32K (row in SMEM), ~100 us
  at 128K (row re-read from L2 every pass). One warpgroup because Mosaic GPU's full reductions of strided arrays
  do not support several Pallas threads; splitting a row over CTAs needs a cross-CTA count reduction per pass
  (grid semaphores, DESIGN 4), which GPU interpret mode cannot run. That, or a per-lane histogram primitive, is
  the next step for long contexts; until then `select="lax"` may well be faster there (compare with `main()`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat

NEG_INF = float("-inf")
_INT32_MIN = -(2**31)


# --------------------------------------------------------------------------------------------- shared helpers
def num_sms() -> int:
    """SM count of the target: the abstract mesh's device (interpret mode on a CPU host) or the default GPU."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    if device is not None:
        return device.num_cores
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or 132


def mma_swizzle(minor_dims: tuple[int, ...], dtype) -> int | None:
    """Largest wgmma swizzle (bytes) that every operand's minor dim (in elements) is a multiple of, else None."""
    itemsize = jnp.dtype(dtype).itemsize
    for swizzle in (128, 64, 32):
        if all((d * itemsize) % swizzle == 0 for d in minor_dims):
            return swizzle
    return None


def mma_transforms(swizzle: int | None, dtype) -> tuple:
    """SMEM transforms of a wgmma operand: (8, swizzle/itemsize) tiles, swizzled. () when `swizzle` is None,
    which only interpret mode accepts (it ignores layouts; callers reject it on the GPU)."""
    if swizzle is None:
        return ()
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def col_vector(ref, interpret: bool):
    """Load a [n] SMEM vector in the layout of a WGMMA tile's column vector, ready for broadcast_in_dim(.., [1]).

    jax 0.10's GPU interpreter has no `plgpu.load` (layouts are meaningless there), hence the plain read."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))


def wgmma_iota(shape: tuple[int, int], dim: int, interpret: bool):
    """int32 iota in the WGMMA register layout (plain iota in interpret mode, which has no layout_cast)."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def mma(a_ref, b_ref):
    """a [M, K] @ b [K, N] -> float32 [M, N] with one wgmma; both operands in SMEM, not transposed."""
    def compute(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]
    return pl.run_scoped(compute, plgpu.ACC((a_ref.shape[0], b_ref.shape[1]), jnp.float32))


# ------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class IndexerConfig:
    """Tuning of the indexer kernels.

    block_s: keys per chunk, the wgmma M (multiple of 64). With T*N = 256 query heads the f32 accumulator is
      block_s * 256 / 128 registers per thread: keep block_s * T * N <= 16384.
    num_stages: depth of the key-chunk TMA ring (>= 2); block_s * H * 2 bytes each.
    ctas_per_batch: scores CTAs per batch element; None -> 2 per SM shared by the batch, at most one per chunk.
    select_chunk: scores per TMA chunk in the selection kernel (a multiple of 128 and of block_s: the padded
      row length is a multiple of it).
    select_resident_bytes: a row of at most this many bytes of scores is loaded into SMEM once and kept there
      for all passes (48K scores by default); longer rows are streamed from L2 every pass through a
      `select_stages`-deep ring.
    select: "pallas" (the exact radix select below) or "lax" (`jax.lax.top_k` on the kernel's scores, the
      last-resort baseline to compare against).
    radix_bits: bits resolved per selection pass (1, 2, 4 or 8): 2^radix_bits - 1 candidate thresholds per pass,
      32 / radix_bits passes at most. Fewer passes cost more compares and reductions per resolved bit; 1 is the
      cheapest unless the row is streamed from L2 (longer than select_resident_bytes).
    """
    block_s: int = 64
    num_stages: int = 4
    ctas_per_batch: int | None = None
    select_chunk: int = 512
    select_stages: int = 4
    select_resident_bytes: int = 192 * 1024
    select: str = "pallas"
    radix_bits: int = 1

    def __post_init__(self):
        if self.block_s <= 0 or self.block_s % 64 or self.block_s > 256:
            raise ValueError(f"{self.block_s=} must be a multiple of 64 (the wgmma M) in [64, 256] (a TMA box)")
        if not 2 <= self.num_stages <= 32:
            raise ValueError(f"{self.num_stages=} must be in [2, 32] (double buffering; Mosaic barrier groups)")
        if self.ctas_per_batch is not None and self.ctas_per_batch < 1:
            raise ValueError(f"{self.ctas_per_batch=} must be >= 1 or None (auto)")
        if self.select_chunk <= 0 or self.select_chunk % 128 or self.select_chunk % self.block_s:
            raise ValueError(f"{self.select_chunk=} must be a positive multiple of 128 and of {self.block_s=}")
        if not 1 <= self.select_stages <= 32:
            raise ValueError(f"{self.select_stages=} must be in [1, 32] (Mosaic barrier groups)")
        if self.select_resident_bytes < 0:
            raise ValueError(f"{self.select_resident_bytes=} must be >= 0")
        if self.select not in ("pallas", "lax"):
            raise ValueError(f"{self.select=} must be 'pallas' or 'lax'")
        if self.radix_bits not in (1, 2, 4, 8):
            raise ValueError(f"{self.radix_bits=} must be 1, 2, 4 or 8 (a divisor of 32)")


# ------------------------------------------------------------------------------------------------------- scores
def score_rows(dots, w_smem, *, start, limits, num_heads: int, interpret: bool):
    """The scores epilogue on dots [block_s, Q*N] f32 (key rows x query heads, column q*N + n is query q's head n):
    [block_s] score vectors, one per query q < Q: sum_n w[q, n] * relu(dots[:, q*N + n]) where start + i <=
    limits[q], else -inf. w_smem [Q*N] f32 head weights (scale folded in); limits: Q int32 scalars."""
    block_s = dots.shape[0]
    num_q = dots.shape[1] // num_heads
    w = col_vector(w_smem, interpret)
    x = jnp.maximum(dots, 0.0) * lax.broadcast_in_dim(w, dots.shape, [1])
    # Row positions as a row vector: an iota in the tile layout, reduced along the columns.
    rows = wgmma_iota((block_s, num_heads), 0, interpret).astype(jnp.float32)
    pos = jnp.max(rows, axis=1) + start.astype(jnp.float32)  # exact below 2^24 keys
    return [jnp.where(pos <= limits[t].astype(jnp.float32), jnp.sum(x[:, t * num_heads:(t + 1) * num_heads], axis=1),
                      NEG_INF) for t in range(num_q)]


def scores_tile(keys_smem, qt_smem, w_smem, out_smem, *, start, limits, num_heads: int, interpret: bool):
    """Indexer scores of one chunk of keys (the reusable tile body).

    keys_smem [block_s, H] bf16 (wgmma operand transforms); qt_smem [H, T*N] bf16, q transposed, column t*N + n is
    query t's head n; w_smem [T*N] f32 head weights with the softmax scale folded in; out_smem [T, block_s] f32
    receives score[t, i] = sum_n w[t, n] * relu(k_{start+i} . q[t, n]) where start + i <= limits[t], else -inf.
    start: int32 scalar, position of the chunk's first key; limits: T int32 scalars, min(q_pos[t], S - 1).
    The epilogue is `score_rows` (shared with the persistent kernel's INDEX_SCORE body).
    """
    dots = mma(keys_smem, qt_smem)  # [block_s, T*N] float32
    rows = score_rows(dots, w_smem, start=start, limits=limits, num_heads=num_heads, interpret=interpret)
    for t, row in enumerate(rows):
        out_smem[t] = row


def _scores_kernel(qt_ref, w_ref, keys_ref, qpos_ref, out_ref, qt_smem, w_smem, k_smem, o_smem, q_bar, k_bars, *,
                   cfg: IndexerConfig, num_heads: int, seq_len: int, n_chunks: int, grid_c: int, interpret: bool):
    c0 = lax.axis_index("c")
    b = lax.axis_index("b")
    n_my = lax.div(n_chunks - c0 + grid_c - 1, grid_c)  # this CTA's chunks: c0, c0 + G, c0 + 2G, ...
    num_q = qt_ref.shape[2] // num_heads
    block_s, stages = cfg.block_s, cfg.num_stages

    def fetch(i, slot):
        chunk = c0 + i * grid_c
        plgpu.copy_gmem_to_smem(keys_ref.at[b, pl.ds(chunk * block_s, block_s)], k_smem.at[slot], k_bars.at[slot])

    plgpu.copy_gmem_to_smem(qt_ref.at[b], qt_smem, q_bar)
    plgpu.copy_gmem_to_smem(w_ref.at[b], w_smem, q_bar)
    for s in range(stages):
        pl.when(s < n_my)(functools.partial(fetch, s, s))
    limits = [jnp.minimum(qpos_ref[b, t], seq_len - 1) for t in range(num_q)]
    plgpu.barrier_wait(q_bar)

    @pl.loop(0, n_my)
    def _chunk(i):
        slot = lax.rem(i, stages)
        out_slot = lax.rem(i, 2)
        chunk = c0 + i * grid_c
        plgpu.barrier_wait(k_bars.at[slot])
        scores_tile(k_smem.at[slot], qt_smem, w_smem, o_smem.at[out_slot], start=chunk * block_s, limits=limits,
                    num_heads=num_heads, interpret=interpret)
        # The wgmma has been awaited inside the tile: the slot can be refilled.
        pl.when(i + stages < n_my)(lambda: fetch(i + stages, slot))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[out_slot], out_ref.at[b, :, pl.ds(chunk * block_s, block_s)])
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the other output slot is free again

    plgpu.wait_smem_to_gmem(0)


def _check_indexer_inputs(q, head_w, keys, q_pos, scale):
    if q.ndim != 4 or keys.ndim != 3 or head_w.ndim != 3 or q_pos.ndim != 2:
        raise ValueError(f"expected q [B,T,N,H], head_w [B,T,N], keys [B,S,H], q_pos [B,T]; got {q.shape=}, "
                         f"{head_w.shape=}, {keys.shape=}, {q_pos.shape=}")
    B, T, N, H = q.shape
    if keys.shape[0] != B or keys.shape[2] != H:
        raise ValueError(f"{keys.shape=} does not match {q.shape=} (need [B, S, H])")
    if head_w.shape != (B, T, N) or q_pos.shape != (B, T):
        raise ValueError(f"{head_w.shape=} / {q_pos.shape=} do not match {q.shape=}")
    if q.dtype != keys.dtype or jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"q and keys must share a 16-bit float dtype (wgmma operands); got {q.dtype}, {keys.dtype}")
    if not jnp.issubdtype(q_pos.dtype, jnp.integer):
        raise ValueError(f"q_pos must be integer, got {q_pos.dtype}")
    if T * N > 256 or (T * N) % 8:
        raise ValueError(f"T*N = {T}*{N} must be a multiple of 8 and <= 256 (the wgmma N)")
    if H % 16:
        raise ValueError(f"{H=} must be a multiple of 16 (the bf16 wgmma K step)")
    if not scale > 0:
        raise ValueError(f"{scale=} must be > 0 (it is folded into the head weights through the ReLU)")
    if keys.shape[1] < 1:
        raise ValueError(f"empty key cache: {keys.shape=}")


def _scores_padded(q, head_w, keys, q_pos, scale, *, padded_len: int, cfg: IndexerConfig, interpret):
    """Run the scores kernel; returns float32 [B, T, padded_len] (positions >= S are -inf)."""
    B, T, N, H = q.shape
    S = keys.shape[1]
    block_s = cfg.block_s
    if padded_len % block_s or padded_len < S:
        raise ValueError(f"internal: {padded_len=} must be a multiple of {block_s=} and >= {S=}")
    n_chunks = padded_len // block_s
    params = _compat.resolve_interpret(interpret)
    swizzle = mma_swizzle((H, T * N), q.dtype)
    if params is None:
        if swizzle is None:
            raise ValueError(f"no wgmma swizzle fits H={H} and T*N={T * N} ({q.dtype}); need multiples of 16 elements")
        if block_s * T * N > 16384:
            raise ValueError(f"{block_s=} x T*N = {T * N} f32 accumulators exceed 128 registers per thread: use "
                             f"block_s={max(64, 16384 // (T * N) // 64 * 64)}")
    if params is not None and n_chunks * block_s > S:
        # jax 0.10's GPU interpreter raises on TMA reads past the end (the GPU zero-fills them).
        keys = jnp.pad(keys, ((0, 0), (0, n_chunks * block_s - S), (0, 0)))
    grid_c = cfg.ctas_per_batch or max(1, (2 * num_sms()) // B)
    grid_c = min(grid_c, n_chunks)
    qt = jnp.swapaxes(q.reshape(B, T * N, H), 1, 2)  # [B, H, T*N]: the wgmma B operand, not transposed
    w = (head_w.astype(jnp.float32) * scale).reshape(B, T * N)
    transforms = mma_transforms(swizzle, q.dtype)
    kernel = plgpu.kernel(
        functools.partial(_scores_kernel, cfg=cfg, num_heads=N, seq_len=S, n_chunks=n_chunks, grid_c=grid_c,
                          interpret=params is not None),
        out_type=jax.ShapeDtypeStruct((B, T, padded_len), jnp.float32),
        scratch_types=[
            plgpu.SMEM((H, T * N), q.dtype, transforms=transforms),
            plgpu.SMEM((T * N,), jnp.float32),
            plgpu.SMEM((cfg.num_stages, block_s, H), keys.dtype, transforms=transforms),
            plgpu.SMEM((2, T, block_s), jnp.float32),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_barriers=cfg.num_stages),
        ],
        grid=(grid_c, B),
        grid_names=("c", "b"),
        interpret=params,
    )
    return kernel(qt, w, keys, q_pos.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def indexer_scores(q, head_w, keys, q_pos, scale: float, *, config: IndexerConfig = IndexerConfig(),
                   interpret=False):
    """Pallas version of `ref.indexer_scores`: float32 [B, T, S], -inf where s > q_pos[b, t]."""
    _check_indexer_inputs(q, head_w, keys, q_pos, scale)
    S = keys.shape[1]
    padded = pl.cdiv(S, config.block_s) * config.block_s
    out = _scores_padded(q, head_w, keys, q_pos, scale, padded_len=padded, cfg=config, interpret=interpret)
    return out[:, :, :S] if padded != S else out


# ------------------------------------------------------------------------------------------------------- top-k
def _float_key(x):
    """Order-preserving int32 key of float32 x: a < b  <=>  key(a) < key(b) (signed), -inf above every -NaN."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def count_tile(x_smem, candidates, counts=None):
    """Per-lane counts of keys >= each candidate over one chunk of scores (the selection's tile body).

    x_smem [chunk / 128, 128] float32 scores; candidates: int32 scalars; counts: per-lane int32 partial counts
    from earlier chunks (arrays shaped like the chunk) or None. Returns the updated partial counts, one array per candidate.
    """
    key = _float_key(x_smem[...])
    new = [jnp.where(key >= c, 1, 0) for c in candidates]  # select, not a bool->int convert
    return new if counts is None else [a + n for a, n in zip(counts, new)]


def _select_kernel(scores_ref, out_ref, x_smem, bars, *, k: int, n_chunks: int, chunk: int, stages: int,
                   radix_bits: int):
    """One (b, t) row per CTA: exact bin of the K-th largest key by radix select (see the module docstring)."""
    r = lax.axis_index("r")
    n_cand = 2**radix_bits - 1
    resident = n_chunks <= stages
    rows = chunk // 128  # scores_ref is [R, L / 128, 128]: a TMA box spans at most 256 elements per dimension

    def chunk_ref(slot):
        return x_smem.at[pl.ds(slot * rows, rows)]

    def fetch(g):  # streaming: the g-th chunk read overall (chunk g % n_chunks) into ring slot g % stages
        slot = lax.rem(g, stages)
        i = lax.rem(g, n_chunks)
        plgpu.copy_gmem_to_smem(scores_ref.at[r, pl.ds(i * rows, rows)], chunk_ref(slot), bars.at[slot])

    if resident:  # the whole row in as few TMA boxes as possible (<= 256 rows of 128 each), one barrier
        total = n_chunks * rows
        for start in range(0, total, 256):
            size = min(256, total - start)
            plgpu.copy_gmem_to_smem(scores_ref.at[r, pl.ds(start, size)], x_smem.at[pl.ds(start, size)], bars)
        plgpu.barrier_wait(bars)
    else:  # the ring keeps streaming across passes: the next pass reads the same row, whatever its thresholds
        for g in range(stages):
            fetch(jnp.int32(g))

    def count_pass(candidates, g0):
        """Totals of count(key >= candidate) over the whole row; g0 = chunks streamed before this pass."""
        def step(i, counts):
            if resident:
                slot = i
            else:
                g = g0 + i
                slot = lax.rem(g, stages)
                plgpu.barrier_wait(bars.at[slot])
            counts = count_tile(chunk_ref(slot), candidates, counts)
            if not resident:
                fetch(g + stages)  # may run one pass ahead of the last: drained after the loop
            return counts

        # The first chunk is peeled so that the loop carries start in the registers' layout.
        counts = step(jnp.int32(0), None)
        counts = lax.fori_loop(1, n_chunks, step, counts)
        return [jnp.sum(c) for c in counts]

    def cond(state):
        _, shift, _, _, done = state
        return jnp.logical_and(shift >= 0, done == 0)

    def body(state):
        lo, shift, cnt_lo, cnt_hi, _ = state
        cands = [lo + lax.shift_left(jnp.int32(j), shift) for j in range(1, n_cand + 1)]
        passes_done = lax.div(32 - radix_bits - shift, radix_bits)
        counts = count_pass(cands, passes_done * n_chunks)
        # counts are non-increasing in j: m = the largest j with count(key >= lo + j*2^shift) >= k.
        m = sum(jnp.where(c >= k, 1, 0) for c in counts)
        ext = [cnt_lo, *counts, cnt_hi]  # ext[j] = count(key >= lo + j * 2^shift), j = 0 .. 2^radix_bits
        new_lo_cnt = sum(jnp.where(m == j, ext[j], 0) for j in range(n_cand + 1))
        new_hi_cnt = sum(jnp.where(m + 1 == j, ext[j], 0) for j in range(1, n_cand + 2))
        new_lo = lo + lax.shift_left(m, shift)
        done = jnp.where(jnp.logical_or(new_lo_cnt == k, shift == 0), 1, 0)
        return new_lo, shift - radix_bits, new_lo_cnt, new_hi_cnt, done

    init = (jnp.int32(_INT32_MIN), jnp.int32(32 - radix_bits), jnp.int32(n_chunks * chunk), jnp.int32(0),
            jnp.int32(0))
    lo, shift, _, cnt_hi, _ = lax.while_loop(cond, body, init)
    if not resident:  # wait for the chunks fetched ahead for a pass that did not happen
        g_end = lax.div(32 - radix_bits - shift, radix_bits) * n_chunks
        for j in range(stages):
            plgpu.barrier_wait(bars.at[lax.rem(g_end + j, stages)])
    out_ref[r, 0] = lo
    out_ref[r, 1] = shift + radix_bits  # log2 of the final bin width
    out_ref[r, 2] = k - cnt_hi  # keys of the bin that belong to the top-k (all keys above it do)
    out_ref[r, 3] = jnp.int32(0)


def select_bins(scores, k: int, *, config: IndexerConfig = IndexerConfig(), interpret=False):
    """Pallas radix select: scores float32 [R, L] (L a multiple of config.select_chunk or <= it) ->
    int32 [R, 4] rows (lo, log2 width, need, 0): the K-th largest key of the row lies in [lo, lo + 2^width)."""
    R, L = scores.shape
    chunk = min(config.select_chunk, L)
    if L % chunk or chunk % 128:
        raise ValueError(f"internal: row length {L} must be a multiple of the select chunk {chunk} (x128)")
    n_chunks = L // chunk
    if n_chunks * chunk * 4 <= config.select_resident_bytes:
        stages = n_chunks  # the whole row stays in SMEM: one load, then every pass reads SMEM
    else:
        stages = min(config.select_stages, n_chunks)
    params = _compat.resolve_interpret(interpret)
    kernel = plgpu.kernel(
        functools.partial(_select_kernel, k=k, n_chunks=n_chunks, chunk=chunk, stages=stages,
                          radix_bits=config.radix_bits),
        out_type=jax.ShapeDtypeStruct((R, 4), jnp.int32),
        scratch_types=[plgpu.SMEM((stages * chunk // 128, 128), jnp.float32),
                       plgpu.Barrier(num_arrivals=pl.cdiv(L // 128, 256)) if stages == n_chunks
                       else plgpu.Barrier(num_barriers=stages)],
        grid=(R,),
        grid_names=("r",),
        interpret=params,
    )
    return kernel(scores.reshape(R, L // 128, 128))


def _collect(scores, bins, k: int):
    """XLA compaction: indices of the keys above the bin plus the first `need` keys inside it, ascending."""
    key = lax.bitcast_convert_type(_float_key(scores), jnp.uint32) ^ jnp.uint32(0x80000000)  # unsigned order
    lo = lax.bitcast_convert_type(bins[:, 0], jnp.uint32)[:, None] ^ jnp.uint32(0x80000000)
    width = jnp.left_shift(jnp.uint32(1), bins[:, 1].astype(jnp.uint32))[:, None]
    need = bins[:, 2][:, None]
    in_bin = (key - lo) < width  # unsigned wrap-around: false below lo
    above = jnp.logical_and(key >= lo, jnp.logical_not(in_bin))
    rank = jnp.cumsum(in_bin.astype(jnp.int32), axis=1) - in_bin.astype(jnp.int32)
    take = jnp.logical_or(above, jnp.logical_and(in_bin, rank < need))
    idx = jax.vmap(lambda row: jnp.nonzero(row, size=k, fill_value=0)[0])(take)
    return idx.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "k", "config", "interpret"))
def indexer_topk(q, head_w, keys, q_pos, scale: float, k: int, *, config: IndexerConfig = IndexerConfig(),
                 interpret=False):
    """Pallas version of `ref.indexer_topk`: (idx int32 [B, T, K], valid bool [B, T, K]), K = min(k, S).

    The valid index set equals `jax.lax.top_k`'s exactly (ties: lower index first, as lax.top_k); the slots are
    in ascending index order rather than descending score. See the module docstring for the three steps.
    """
    _check_indexer_inputs(q, head_w, keys, q_pos, scale)
    if k < 1:
        raise ValueError(f"{k=} must be >= 1")
    B, T = q.shape[:2]
    S = keys.shape[1]
    K = min(k, S)
    unit = math.lcm(config.block_s, 128)  # the select chunk is a multiple of both
    chunk = min(config.select_chunk, pl.cdiv(S, unit) * unit)
    padded = pl.cdiv(S, chunk) * chunk
    scores = _scores_padded(q, head_w, keys, q_pos, scale, padded_len=padded, cfg=config, interpret=interpret)
    flat = scores.reshape(B * T, padded)
    if config.select == "lax":
        _, idx = lax.top_k(flat, K)
        idx = idx.astype(jnp.int32)
        valid = jnp.take_along_axis(flat, idx, axis=1) > NEG_INF
        return idx.reshape(B, T, K), valid.reshape(B, T, K)
    bins = select_bins(flat, K, config=dataclasses.replace(config, select_chunk=chunk), interpret=interpret)
    idx = _collect(flat, bins, K)
    valid = jnp.take_along_axis(flat, idx, axis=1) > NEG_INF
    return idx.reshape(B, T, K), valid.reshape(B, T, K)


def _bench(fn, *args, iters: int = 20) -> float:
    """Median wall time (us) of a jitted call, after a warm-up (GPU benchmark helper)."""
    import time
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def main():
    """Benchmark at GLM-5 shapes on the GPU: Pallas scores / top-k vs the jnp reference (XLA)."""
    N, H, k = 32, 128, 2048
    for B, T, S in [(1, 1, 4096), (1, 4, 32768), (1, 1, 131072), (2, 4, 131072)]:
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
        w = jax.random.normal(ks[1], (B, T, N), jnp.float32) * N ** -0.5
        keys = jax.random.normal(ks[2], (B, S, H), jnp.bfloat16)
        q_pos = jnp.full((B, T), S - 1, jnp.int32)
        scale = H ** -0.5
        from pallas_kernels import ref
        rows = {
            "scores pallas": functools.partial(indexer_scores, scale=scale),
            "scores xla": jax.jit(functools.partial(ref.indexer_scores, scale=scale)),
            "top-k pallas": functools.partial(indexer_topk, scale=scale, k=k),
            "top-k scores+lax": functools.partial(indexer_topk, scale=scale, k=k,
                                                  config=IndexerConfig(select="lax")),
            "top-k xla": jax.jit(functools.partial(ref.indexer_topk, scale=scale, k=k)),
        }
        gb = B * S * H * 2 / 1e9
        for name, fn in rows.items():
            us = _bench(fn, q, w, keys, q_pos)
            print(f"B={B} T={T} S={S:6d} {name:18s} {us:9.1f} us  (key cache {gb * 1e3:.1f} MB: "
                  f"{gb / (us * 1e-6):.2f} GB/s)")


if __name__ == "__main__":
    main()
