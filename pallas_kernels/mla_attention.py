"""Absorbed MLA decode attention over DSA-selected latent rows (DeepSeek-V2 weight absorption, DeepSeek-V3.2 DSA)
in Pallas Mosaic GPU for Hopper. Same signature as `ref.sparse_mla_attention`.

Axis legend as in `ref`: B batch, T query tokens, S cached tokens, K selected rows, N heads, C latent rank, R rope.
logits[n, j] = (q_lat[n] . c_kv[idx_j] + q_pe[n] . k_pe[idx_j]) * scale over the K rows idx (masked by valid),
softmax over j, out[n] = sum_j p[n, j] c_kv[idx_j] (the latent "values" are the latent keys).

Design (flash-decoding over the selected rows):
  grid (splits, head groups, B*T). A CTA takes one (b, t), a group of 64 heads (the wgmma M: all heads of a
  GLM-5 query at once) and a contiguous share of the K selected rows (at least `min_rows_per_split`: each split
  writes a [64, C] f32 partial), and returns its share's softmax-normalised output [64, C] and log2-sum-exp [64];
  `_combine` (XLA) merges the splits. Three warpgroups on the GPU:
  * producer (WG 0, `gather_rows`): fills a `num_stages` ring with block_k selected rows per step. A row's C
    latents land as C/64 segments of 64 (one 128-byte swizzle row each) in `kv` [stages * C/64, block_k, 64]
    (slot s holds segments s * C/64 ..: one traced flat index, because jax 0.11's run_state lowering rejects
    static ints mixed into a ref's traced index), its rope part in `pe` [stages, block_k, R]; each [block_k, 64] segment is an (8, 64)-tiled wgmma operand, which is
    laid out row after row, so one row's segment is 128 contiguous (swizzled) bytes. gather="tma": per-row TMA
    copies (TMA gather is Blackwell-only), C/64 + 1 per row, written through a swizzle-only alias of the ring
    (`plgpu.RefUnion`) because a one-row slice of an (8, 64)-tiled ref is not tile-aligned. gather="xla": the
    wrapper gathers the rows with XLA (contiguous [K, C] per query, one extra HBM round trip of the selected
    rows) and the producer copies whole [block_k, 64] tiles (C/64 + 1 TMAs per block instead of per row).
  * two consumers (WG 1 and 2) split C in halves: each owns an f32 accumulator [64, C/2] (128 registers per
    thread), computes the full logits [64, block_k] with wgmma (q segment @ row segment^T over all C/64 + 1
    segments; redundant across the two consumers, because an SMEM exchange of partial logits does not fit next
    to q and a 2-stage ring of 64-row blocks), then `online_softmax_pv`: online softmax in exp2 with the scale
    folded in, masked rows at -inf, and P (bf16, registers) @ its row segments into the accumulator.
  block_k is 64 because the PV wgmma's K (= rows) must be a multiple of the 128-byte swizzle's 64 elements.
  SMEM at GLM-5 shapes (64 heads, C 512, R 64, block_k 64, 2 stages): q 72 KB + ring 144 KB + the split's index
  and bias lists (8 B per row); the output is staged through the ring once it has drained (another RefUnion).
  `gather_rows`, `qk_logits` and `online_softmax_pv` are the per-block tiles a persistent kernel can reuse.

Interpret mode (CPU): jax 0.10's GPU interpreter runs TMA, barriers and wgmma with SMEM operands, but not
transposed wgmma operands, register A operands, RefUnion, layout casts or `plgpu.load`, and its multi-warpgroup
execution can deadlock on a 2-core host (each Pallas thread is an XLA:CPU program; two blocked in barrier waits
starve the third). Under `interpret` the kernel runs one warpgroup that plays the three roles in dependency order
(`sequential`) with the same tiles, the same TMA copies into the same ring and the same barriers; the two wgmma
products become jnp.dot of the same SMEM tiles, the row copies target the tiled ring directly and the output is
staged through its own buffer. The warp-specialised schedule (consumed barriers, register budgets, aliasing) is
only exercised on the GPU; `tests/test_kernels_attention.py` lowers it for the H200 on any host.
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
from pallas_kernels.indexer import col_vector, mma_transforms, num_sms

NEG_INF = float("-inf")
_LOG2E = math.log2(math.e)
_SMEM_BYTES = 227 * 1024 - 4096  # opt-in SMEM per block on H100/H200, less Mosaic scratch, barriers, alignment
_SEG = 64  # latent segment width: one 128-byte swizzle row of bf16
_GATHERS = ("tma", "xla")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Tuning of the sparse MLA kernel.

    block_k: selected rows per pipeline step (the QK wgmma N, the PV wgmma K); a multiple of 64 on the GPU
      (16 in interpret mode).
    num_stages: depth of the gathered-row ring (>= 1); (C + R) * 2 * block_k bytes each.
    num_splits: CTAs sharing one (b, t, head group)'s rows (flash-decoding); None -> enough to fill the SMs,
      but no fewer than min_rows_per_split rows per split (each split writes a [64, C] f32 partial: 128 KB at
      GLM-5 shapes, against ~1.1 KB per gathered row).
    gather: "tma" (per-row TMA copies in the kernel) or "xla" (rows gathered by XLA, block copies in the kernel).
    """
    block_k: int = 64
    num_stages: int = 2
    num_splits: int | None = None
    min_rows_per_split: int = 128
    gather: str = "tma"

    def __post_init__(self):
        if self.block_k <= 0 or self.block_k % 16:
            raise ValueError(f"{self.block_k=} must be a positive multiple of 16 (64 on the GPU)")
        if not 1 <= self.num_stages <= 32:
            raise ValueError(f"{self.num_stages=} must be in [1, 32]")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be >= 1 or None (auto)")
        if self.min_rows_per_split < 1:
            raise ValueError(f"{self.min_rows_per_split=} must be >= 1")
        if self.gather not in _GATHERS:
            raise ValueError(f"{self.gather=} must be one of {_GATHERS}")


# -------------------------------------------------------------------------------------------- register helpers
def _full(shape, value: float, interpret: bool):
    """A float32 constant in the WGMMA layout (2-D) or its row-vector layout (1-D), as loop-carry init."""
    x = jnp.full(shape, value, jnp.float32)
    if interpret:
        return x
    layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
    return plgpu.layout_cast(x, layout)


# ------------------------------------------------------------------------------------------------------ tiles
def gather_rows(ckv_ref, kpe_ref, idx_smem, kv_ring, pe_dst, full_bar, *, b, seg0, n_seg: int, num_rows: int,
                seq_len: int, overlay=None, warps: bool = False):
    """Issue the per-row TMA copies of rows idx_smem[:num_rows] (this block's indices) into one ring slot.

    kv_ring [stages * C/seg, rows, seg] holds the slot's latent segments at seg0 .. seg0 + n_seg - 1 (a traced
    flat index: jax 0.11's run_state lowering rejects static ints mixed into a ref's dynamic index); pe_dst
    [rows, R] is the slot's rope view. Every copy arrives on `full_bar` (which therefore expects
    (C/seg + 1) * num_rows arrivals). Indices are clamped to [0, seq_len).
    b: the batch index of ckv_ref [B, S, C] / kpe_ref [B, S, R], or None for unbatched [S, C] / [S, R] refs.
    overlay: None, or (new_ckv, new_kpe, pos: T traced scalars, nb): a row equal to pos[t] is copied from row t of
    the new rows instead (the first such t; rows written this step but not yet in the cache); new_ckv [T, C] /
    new_kpe [T, R] when nb is None, else [N, T, C] / [N, T, R] at index nb.
    warps: issue from the warpgroup's 4 warps at once (`plgpu.warp_map`, a quarter of the rows each; GPU only,
    num_rows % 4 == 0) instead of one thread: 4x faster on the H200 (3.3 vs 13.5 us for 64 rows of 9 copies; 6.3 us
    when the block holds an overlaid row, experiments/results/probe_tma_issue_h200.json) -- a copy issued by one
    thread of the warpgroup pays a warpgroup barrier and 128 threads' expect-tx arrivals. Warp semantics read no
    SMEM scalars (jax 0.11.2), so the indices (and overlay sources) are read first, unrolled, and each warp picks
    its rows by its warp id.
    """
    seg = kv_ring.shape[-1]

    def copy(ckv, kpe, bb, row, r):
        at = (lambda ref, *i: ref.at[i]) if bb is None else (lambda ref, *i: ref.at[(bb, *i)])
        for c in range(n_seg):
            plgpu.copy_gmem_to_smem(at(ckv, pl.ds(row, 1), pl.ds(c * seg, seg)),
                                    kv_ring.at[seg0 + c, pl.ds(r, 1)], full_bar)
        plgpu.copy_gmem_to_smem(at(kpe, pl.ds(row, 1)), pe_dst.at[pl.ds(r, 1)], full_bar)

    def source(r):
        """(row, which): the clamped cache row of slot r and the new row that overlays it (-1: none)."""
        row = jnp.clip(idx_smem[r], 0, seq_len - 1)
        which = row * 0 - 1
        for t in reversed(range(len(overlay[2]) if overlay is not None else 0)):
            which = jnp.where(row == overlay[2][t], row * 0 + t, which)
        return row, which

    def from_cache(row, which, r):
        if overlay is None:
            copy(ckv_ref, kpe_ref, b, row, r)
        else:
            pl.when(which < 0)(lambda: copy(ckv_ref, kpe_ref, b, row, r))

    def from_new(row, which, r):
        if overlay is not None:
            new_ckv, new_kpe, _, nb = overlay
            pl.when(which >= 0)(lambda: copy(new_ckv, new_kpe, nb, jnp.maximum(which, 0), r))

    if not warps:
        @pl.loop(0, num_rows)
        def _row(r):
            row, which = source(r)
            from_cache(row, which, r)
            from_new(row, which, r)
        return
    if num_rows % 4:
        raise ValueError(f"gather_rows: warps=True issues a quarter of the rows per warp; {num_rows=} is not a "
                         f"multiple of 4")
    quarter = num_rows // 4
    rows = [source(r) for r in range(num_rows)]

    @plgpu.warp_map
    def _(w):
        for j in range(quarter):
            row, which = rows[j]
            for q in range(1, 4):
                row, which = (jnp.where(w == q, v, old) for v, old in zip(rows[q * quarter + j], (row, which)))
            from_cache(row, which, w * quarter + j)

    if overlay is not None:  # the (at most T) overlaid rows, by one thread: only a block that holds one loops
        hit = rows[0][1] >= 0
        for _, which in rows[1:]:
            hit = hit | (which >= 0)

        @pl.when(hit)
        def _():
            @pl.loop(0, num_rows)
            def _(r):
                from_new(*source(r), r)


def copy_rows(ckv_ref, kpe_ref, kv_ring, pe_dst, full_bar, *, b, t, first, seg0, n_seg: int, num_rows: int):
    """Copy pre-gathered rows [first, first + num_rows) (ckv_ref [B, T, K, C], kpe_ref [B, T, K, R]) into one ring
    slot (segments seg0.., as in `gather_rows`) with one TMA per segment; C/seg + 1 arrivals on `full_bar`."""
    seg = kv_ring.shape[-1]
    for c in range(n_seg):
        plgpu.copy_gmem_to_smem(ckv_ref.at[b, t, pl.ds(first, num_rows), pl.ds(c * seg, seg)], kv_ring.at[seg0 + c],
                                full_bar)
    plgpu.copy_gmem_to_smem(kpe_ref.at[b, t, pl.ds(first, num_rows)], pe_dst, full_bar)


def qk_logits(q_segs, kv_segs, interpret: bool):
    """sum_i q_segs[i] [M, D] @ kv_segs[i] [block_k, D]^T -> float32 [M, block_k] (SMEM operands, one wgmma each)."""
    if interpret:  # jax 0.10's interpreter has no transposed wgmma operands
        return sum(jnp.dot(q[...], kv[...].T, preferred_element_type=jnp.float32) for q, kv in zip(q_segs, kv_segs))

    def compute(acc_ref):
        for q, kv in zip(q_segs, kv_segs):
            plgpu.wgmma(acc_ref, q, _compat.transpose_ref(kv, (1, 0)))
        return acc_ref[...]
    return pl.run_scoped(compute, plgpu.ACC((q_segs[0].shape[0], kv_segs[0].shape[0]), jnp.float32))


def _pv(acc, p, kv_segs, interpret: bool):
    """acc [M, n*D] + p [M, block_k] @ concat(kv_segs [block_k, D]), p in registers (the wgmma A operand)."""
    if interpret:  # jax 0.10's interpreter has no register A operands
        rows = jnp.concatenate([kv[...] for kv in kv_segs], axis=1)
        return acc + jnp.dot(p, rows, preferred_element_type=jnp.float32)
    seg = kv_segs[0].shape[1]

    def compute(acc_ref):
        for i, kv in enumerate(kv_segs):
            plgpu.wgmma(acc_ref.at[:, pl.ds(i * seg, seg)], p, kv)
    return pl.run_state(compute)(plgpu.ACC.init(acc))


def online_softmax_pv(logits, bias, kv_segs, carry, *, scale_log2: float, interpret: bool):
    """Online-softmax update with one block of logits [M, block_k].

    bias [block_k]: 0 for valid rows, -inf for masked ones (a column vector); kv_segs: the [block_k, D] row
    segments this accumulator covers; carry (acc [M, n*D] f32, m [M], l [M]) with m in the log2 domain.
    """
    acc, m, l = carry
    s = logits * scale_log2 + lax.broadcast_in_dim(bias, logits.shape, [1])
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)  # nothing valid yet: keep exp2 finite (0, not NaN)
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    acc = _pv(acc, p.astype(kv_segs[0].dtype), kv_segs, interpret)
    return acc, m_new, l


def _finish(carry):
    """Normalised output and log2-sum-exp of a split (zeros / -inf where no row was valid)."""
    acc, m, l = carry
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    out = acc * lax.broadcast_in_dim(jnp.where(has, 1.0 / l_safe, 0.0), acc.shape, [0])
    return out, jnp.where(has, m + jnp.log2(l_safe), NEG_INF)


# ----------------------------------------------------------------------------------------------------- kernel
def _mla_kernel(q_ref, qpe_ref, ckv_ref, kpe_ref, idx_ref, bias_ref, o_ref, lse_ref, *, T: int, S: int, hpc: int,
                C: int, R: int, seg: int, block_k: int, stages: int, n_blocks: int, scale_log2: float,
                gather_mode: str, interpret: bool):
    split = lax.axis_index("s")
    h0 = lax.axis_index("h") * hpc
    bt = lax.axis_index("bt")
    b, t = lax.div(bt, T), lax.rem(bt, T)
    rows_per_split = n_blocks * block_k
    r0 = split * rows_per_split
    n_seg = C // seg
    half = n_seg // 2
    dtype = q_ref.dtype
    sw = mma_transforms(None if interpret else 128, dtype)
    out_sw = mma_transforms(None if interpret else 128, jnp.float32)
    out_tile = 32 if seg % 32 == 0 else seg  # f32 staging tile width (128 bytes)
    kv_type = plgpu.SMEM((stages * n_seg, block_k, seg), dtype, transforms=sw)  # slot s: segments s*n_seg..
    pe_type = plgpu.SMEM((stages, block_k, R), dtype, transforms=sw)
    stage_type = plgpu.SMEM((2, 2, hpc, out_tile), jnp.float32, transforms=out_sw)  # [consumer, slot]
    update = functools.partial(online_softmax_pv, scale_log2=scale_log2, interpret=interpret)

    def fill(slot, j, idx_smem, kv_copy, pe_copy, full):
        if gather_mode == "tma":
            gather_rows(ckv_ref, kpe_ref, idx_smem.at[j], kv_copy, pe_copy.at[slot], full.at[slot], b=b,
                        seg0=slot * n_seg, n_seg=n_seg, num_rows=block_k, seq_len=S)
        else:
            copy_rows(ckv_ref, kpe_ref, kv_copy, pe_copy.at[slot], full.at[slot], b=b, t=t,
                      first=r0 + j * block_k, seg0=slot * n_seg, n_seg=n_seg, num_rows=block_k)

    def operands(slot, w, q_smem, qpe_smem, kv, pe):
        """All QK operand pairs (latent segments and the rope part) and consumer w's PV row segments."""
        q_segs = [q_smem.at[:, pl.ds(c * seg, seg)] for c in range(n_seg)] + [qpe_smem]
        kv_segs = [kv.at[slot * n_seg + c] for c in range(n_seg)] + [pe.at[slot]]
        return (q_segs, kv_segs), kv_segs[w * half:(w + 1) * half]

    def store_out(w, out, stage):
        """Write consumer w's normalised [hpc, C/2] output through two [hpc, out_tile] f32 staging slots."""
        for i in range(half * seg // out_tile):
            slot = stage.at[i % 2]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            slot[...] = out[:, i * out_tile:(i + 1) * out_tile]
            plgpu.commit_smem()
            c0 = w * half * seg + i * out_tile
            plgpu.copy_smem_to_gmem(slot, o_ref.at[b, t, split, pl.ds(h0, hpc), pl.ds(c0, out_tile)])

    def store_lse(lse, lse_smem):
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, t, split, pl.ds(h0, hpc)])

    def init_carry():
        return (_full((hpc, half * seg), 0.0, interpret), _full((hpc,), NEG_INF, interpret),
                _full((hpc,), 0.0, interpret))

    def load_meta_and_q(idx_smem, bias_smem, q_smem, qpe_smem, q_bar, meta_bar):
        # [n_blocks, block_k] boxes: a TMA box spans at most 256 elements per dimension.
        plgpu.copy_gmem_to_smem(idx_ref.at[b, t, pl.ds(split * n_blocks, n_blocks)], idx_smem, meta_bar)
        plgpu.copy_gmem_to_smem(bias_ref.at[b, t, pl.ds(split * n_blocks, n_blocks)], bias_smem, meta_bar)
        plgpu.copy_gmem_to_smem(q_ref.at[b, t, pl.ds(h0, hpc)], q_smem, q_bar)
        plgpu.copy_gmem_to_smem(qpe_ref.at[b, t, pl.ds(h0, hpc)], qpe_smem, q_bar)

    def bias_block(bias_smem, j):
        return col_vector(bias_smem.at[j], interpret)

    def warp_specialized(q_smem, qpe_smem, ring, idx_smem, bias_smem, lse_smem, q_bar, meta_bar, full, consumed,
                         done):
        """GPU: WG 0 fills the ring, WGs 1 and 2 each own half of C (module docstring)."""
        (kv, pe), (kv_copy, pe_copy), stage = ring
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            load_meta_and_q(idx_smem, bias_smem, q_smem, qpe_smem, q_bar, meta_bar)
            plgpu.barrier_wait(meta_bar)

            @pl.loop(0, n_blocks)
            def _block(j):
                slot = lax.rem(j, stages)
                pl.when(j >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
                fill(slot, j, idx_smem, kv_copy, pe_copy, full)

        def consumer(w: int):
            plgpu.set_max_registers(232, action="increase")
            plgpu.barrier_wait(q_bar)
            plgpu.barrier_wait(meta_bar)

            def block(j, carry):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(full.at[slot])
                qk, kv_pv = operands(slot, w, q_smem, qpe_smem, kv, pe)
                carry = update(qk_logits(*qk, interpret), bias_block(bias_smem, j), kv_pv, carry)
                plgpu.barrier_arrive(consumed.at[slot])
                return carry

            out, lse = _finish(lax.fori_loop(0, n_blocks, block, init_carry()))
            # The staging slots alias the ring: wait until the other consumer's last wgmma has read it.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            store_out(w, out, stage.at[w])
            if w == 0:
                store_lse(lse, lse_smem)
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 1)(lambda: consumer(0))
        pl.when(wg == 2)(lambda: consumer(1))

    def sequential(q_smem, qpe_smem, kv, pe, stage, idx_smem, bias_smem, lse_smem, q_bar, meta_bar, full):
        """Interpret mode: one warpgroup plays the three roles in dependency order (module docstring)."""
        load_meta_and_q(idx_smem, bias_smem, q_smem, qpe_smem, q_bar, meta_bar)
        plgpu.barrier_wait(meta_bar)
        plgpu.barrier_wait(q_bar)
        for j in range(min(stages, n_blocks)):
            fill(j, j, idx_smem, kv, pe, full)

        def block(j, carries):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(full.at[slot])
            ops = [operands(slot, w, q_smem, qpe_smem, kv, pe) for w in (0, 1)]
            logits = qk_logits(*ops[0][0], interpret)
            bias = bias_block(bias_smem, j)
            carries = tuple(update(logits, bias, kv_pv, c) for (_, kv_pv), c in zip(ops, carries))
            pl.when(j + stages < n_blocks)(lambda: fill(slot, j + stages, idx_smem, kv, pe, full))
            return carries

        carries = lax.fori_loop(0, n_blocks, block, (init_carry(), init_carry()))
        for w, carry in enumerate(carries):
            out, lse = _finish(carry)
            store_out(w, out, stage.at[w])
            if w == 0:
                store_lse(lse, lse_smem)
        plgpu.wait_smem_to_gmem(0)

    copies_per_fill = (n_seg + 1) * (block_k if gather_mode == "tma" else 1)
    meta = [
        plgpu.SMEM((n_blocks, block_k), jnp.int32),
        plgpu.SMEM((n_blocks, block_k), jnp.float32),
        plgpu.SMEM((hpc,), jnp.float32),
        plgpu.Barrier(num_arrivals=2),  # q_bar
        plgpu.Barrier(num_arrivals=2),  # meta_bar
        plgpu.Barrier(num_arrivals=copies_per_fill, num_barriers=stages),  # full: one arrival per copy
    ]
    q_types = [plgpu.SMEM((hpc, C), dtype, transforms=sw), plgpu.SMEM((hpc, R), dtype, transforms=sw)]
    if interpret:
        pl.run_scoped(sequential, *q_types, kv_type, pe_type, stage_type, *meta)
    else:
        # Three views of the same SMEM: the wgmma operands, the copies' swizzle-only rows, the output staging.
        swz = (plgpu.SwizzleTransform(128),)
        ring = plgpu.RefUnion(
            (kv_type, pe_type),
            (plgpu.SMEM((stages * n_seg, block_k, seg), dtype, transforms=swz) if gather_mode == "tma" else kv_type,
             plgpu.SMEM((stages, block_k, R), dtype, transforms=swz) if gather_mode == "tma" else pe_type),
            stage_type,
        )
        pl.run_scoped(warp_specialized, *q_types, ring, *meta,
                      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # consumed
                      plgpu.Barrier(num_arrivals=2),  # done: both consumers left the ring
                      collective_axes="wg")


def _combine(o_part, lse):
    """Merge split results: o_part [B, T, P, N, C] (each softmax-normalised over its rows), lse [B, T, P, N] log2."""
    m = jnp.max(lse, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse - m)  # masked splits: 0
    den = jnp.sum(w, axis=2)
    num = jnp.einsum("btpn,btpnc->btnc", w, o_part)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def _check_inputs(q_lat, q_pe, c_kv, k_pe, idx, valid, scale, config: MLAConfig, interpret: bool):
    if q_lat.ndim != 4 or q_pe.ndim != 4 or c_kv.ndim != 3 or k_pe.ndim != 3 or idx.ndim != 3:
        raise ValueError(f"expected q_lat [B,T,N,C], q_pe [B,T,N,R], c_kv [B,S,C], k_pe [B,S,R], idx/valid [B,T,K];"
                         f" got {q_lat.shape=}, {q_pe.shape=}, {c_kv.shape=}, {k_pe.shape=}, {idx.shape=}")
    B, T, N, C = q_lat.shape
    R = q_pe.shape[-1]
    S = c_kv.shape[1]
    if q_pe.shape[:3] != (B, T, N) or c_kv.shape != (B, S, C) or k_pe.shape != (B, S, R):
        raise ValueError(f"shape mismatch: {q_lat.shape=}, {q_pe.shape=}, {c_kv.shape=}, {k_pe.shape=}")
    if idx.shape[:2] != (B, T) or valid.shape != idx.shape:
        raise ValueError(f"{idx.shape=} / {valid.shape=} must be [B, T, K] with B, T = {B}, {T}")
    if not jnp.issubdtype(idx.dtype, jnp.integer) or valid.dtype != jnp.bool_:
        raise ValueError(f"idx must be integer and valid bool, got {idx.dtype}, {valid.dtype}")
    dtypes = {jnp.dtype(x.dtype) for x in (q_lat, q_pe, c_kv, k_pe)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"q_lat, q_pe, c_kv, k_pe must share a 16-bit float dtype, got "
                         f"{q_lat.dtype}, {q_pe.dtype}, {c_kv.dtype}, {k_pe.dtype}")
    if idx.shape[2] < 1 or S < 1:
        raise ValueError(f"need at least one selected row and one cached row: {idx.shape=}, {S=}")
    if not scale > 0:
        raise ValueError(f"{scale=} must be > 0")
    if N > 64 and N % 64:
        raise ValueError(f"{N=} must be <= 64 or a multiple of 64 (one CTA takes a group of 64 heads)")
    if interpret:
        if C % 16 or (C >= 2 * _SEG and C % (2 * _SEG)) or R % 8:
            raise ValueError(f"{C=} must be a multiple of 16 (of {2 * _SEG} from {2 * _SEG} on), {R=} of 8")
    else:
        if N % 64:
            raise ValueError(f"{N=} must be a multiple of 64 (wgmma M: one CTA takes 64 heads)")
        if C % (2 * _SEG) or R != _SEG:
            raise ValueError(f"{C=} must be a multiple of {2 * _SEG} and {R=} must be {_SEG} (128-byte swizzle rows)")
        if config.block_k % 64:
            raise ValueError(f"{config.block_k=} must be a multiple of 64 (the PV wgmma K with a 128-byte swizzle)")


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def sparse_mla_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, scale: float, *, config: MLAConfig = MLAConfig(),
                         interpret=False):
    """Pallas version of `ref.sparse_mla_attention`: latent-space output [B, T, N, C] in q_lat's dtype.

    Rows whose `valid` is False are masked; a query with no valid row returns zeros (the reference gives NaN).
    Indices are clamped to [0, S) (out-of-range slots must be marked invalid).
    """
    params = _compat.resolve_interpret(interpret)
    _check_inputs(q_lat, q_pe, c_kv, k_pe, idx, valid, scale, config, params is not None)
    B, T, N, C = q_lat.shape
    R = q_pe.shape[-1]
    S = c_kv.shape[1]
    K = idx.shape[2]
    block_k = config.block_k
    hpc = min(N, 64)
    groups = N // hpc
    seg = _SEG if C % (2 * _SEG) == 0 else C // 2
    n_blocks_total = pl.cdiv(K, block_k)
    fixed_smem = hpc * (C + R) * 2 + config.num_stages * block_k * (C + R) * 2 + hpc * 4
    if config.num_splits is None:
        splits = max(1, min(num_sms() // (B * T * groups), K // config.min_rows_per_split))
        # A split keeps its index and bias lists in SMEM (8 B per row): split further if they do not fit.
        max_blocks = min(256, max(1, (_SMEM_BYTES - fixed_smem) // (8 * block_k)))  # 256: TMA box limit
        splits = max(splits, pl.cdiv(n_blocks_total, max_blocks))
    else:
        splits = config.num_splits
    splits = min(splits, n_blocks_total)
    n_blocks = pl.cdiv(n_blocks_total, splits)
    splits = pl.cdiv(n_blocks_total, n_blocks)
    stages = min(config.num_stages, n_blocks)
    k_pad = splits * n_blocks * block_k
    smem = hpc * (C + R) * 2 + stages * block_k * (C + R) * 2 + n_blocks * block_k * 8 + hpc * 4
    if params is None and smem > _SMEM_BYTES:
        raise ValueError(f"SMEM {smem} B > {_SMEM_BYTES} B: lower {config.num_stages=} or raise num_splits (a "
                         f"split keeps its index and bias lists in SMEM)")
    idx_p = jnp.pad(jnp.clip(idx.astype(jnp.int32), 0, S - 1), ((0, 0), (0, 0), (0, k_pad - K)))
    bias = jnp.pad(jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32), ((0, 0), (0, 0), (0, k_pad - K)),
                   constant_values=NEG_INF)
    if config.gather == "xla":
        rows = jax.vmap(lambda cache, i: cache[i])  # [S, X], [T, K] -> [T, K, X]
        ckv_in, kpe_in = rows(c_kv, idx_p), rows(k_pe, idx_p)
    else:
        ckv_in, kpe_in = c_kv, k_pe
    kernel = plgpu.kernel(
        functools.partial(_mla_kernel, T=T, S=S, hpc=hpc, C=C, R=R, seg=seg, block_k=block_k, stages=stages,
                          n_blocks=n_blocks, scale_log2=scale * _LOG2E, gather_mode=config.gather,
                          interpret=params is not None),
        out_type=(jax.ShapeDtypeStruct((B, T, splits, N, C), jnp.float32),
                  jax.ShapeDtypeStruct((B, T, splits, N), jnp.float32)),
        grid=(splits, groups, B * T),
        grid_names=("s", "h", "bt"),
        num_threads=None if params is not None else 3,
        thread_name=None if params is not None else "wg",
        interpret=params,
    )
    blocks = (B, T, k_pad // block_k, block_k)
    o_part, lse = kernel(q_lat, q_pe, ckv_in, kpe_in, idx_p.reshape(blocks), bias.reshape(blocks))
    out = o_part[:, :, 0] if splits == 1 else _combine(o_part, lse)
    return out.astype(q_lat.dtype)


def main():
    """Benchmark at GLM-5 shapes on the GPU: Pallas sparse MLA (both gathers) vs the jnp reference (XLA)."""
    from pallas_kernels import ref
    from pallas_kernels.indexer import _bench
    N, C, R, K = 64, 512, 64, 2048
    for B, T, S in [(1, 1, 4096), (1, 4, 32768), (2, 4, 131072)]:
        ks = jax.random.split(jax.random.key(0), 6)
        q_lat = jax.random.normal(ks[0], (B, T, N, C), jnp.bfloat16)
        q_pe = jax.random.normal(ks[1], (B, T, N, R), jnp.bfloat16)
        c_kv = jax.random.normal(ks[2], (B, S, C), jnp.bfloat16)
        k_pe = jax.random.normal(ks[3], (B, S, R), jnp.bfloat16)
        idx = jax.random.randint(ks[4], (B, T, K), 0, S).astype(jnp.int32)
        valid = jnp.ones((B, T, K), bool)
        scale = (C + R) ** -0.5
        rows = {
            "pallas tma gather": functools.partial(sparse_mla_attention, scale=scale),
            "pallas xla gather": functools.partial(sparse_mla_attention, scale=scale,
                                                   config=MLAConfig(gather="xla")),
            "xla reference": jax.jit(functools.partial(ref.sparse_mla_attention, scale=scale)),
        }
        mb = B * T * K * (C + R) * 2 / 1e6
        for name, fn in rows.items():
            us = _bench(fn, q_lat, q_pe, c_kv, k_pe, idx, valid)
            print(f"B={B} T={T} S={S:6d} {name:18s} {us:9.1f} us  (selected rows {mb:.1f} MB)")


if __name__ == "__main__":
    main()
