"""Routed + shared SwiGLU experts for T <= 8 tokens (DeepSeek-V3 MoE), Pallas Mosaic GPU (Hopper).

out[t] = sum_j w[t, j] * SwiGLU_{e[t, j]}(x[t]) + SwiGLU_shared(x[t]); reference `pallas_kernels.ref.moe_experts`
(same signature), FP8 variant `moe_experts_fp8` (reference `pallas_kernels.fp8.moe_experts_fp8_ref`). Axis
letters: T tokens, k experts per token, E experts, D model dim, I expert hidden dim, U expert slots.

Expert slots (on device, static shapes): the T*k expert ids are deduplicated with a fixed-size sorted unique
(U = min(T*k, E) entries, padded), so an expert chosen by several tokens is one slot and its weights are read
ONCE; the shared expert follows as Is/I more slots ("chunks" of I hidden units, so every slot has the same
shape). Per slot the kernels read (expert id, is-shared) from a metadata table TMA'd into SMEM, and the task
count n_slots * tiles is a traced scalar: dynamic routing on a static grid of one persistent CTA per SM.
Per-token routing weights become coef[slot, t] (0 where t did not pick the slot, 1 for the shared chunks).

Two kernels, because the down projection needs every hidden unit of a slot (a grid-wide dependency that the
persistent megakernel will express with semaphores instead):
  A (gate/up): tasks (slot, I tile, K split); per step one gate and one up weight tile (TMA) + the x block; two
    swap-AB wgmma accumulators [tile_n, TP]; epilogue h = bf16(silu(g) * u) (the reference's rounding) -> h
    [U_tot, TP, I]. At T = 1 there are only 9 slots * 32 tiles = 288 tasks for 132 SMs (2.2 waves), so the K
    dimension is split (auto: 4) and XLA finishes SwiGLU from the f32 partial sums (<1% extra bytes).
  B (down): tasks (slot, D tile), K = I; the x block is the slot's h rows; epilogue multiplies column t by
    coef[slot, t] and writes f32 partials [U_tot, TP, D]; XLA adds the live slots.
Both reuse the tile functions and the ring/task loop of `pallas_kernels.gemv` (see its docstring for why
swap-AB wgmma, one warpgroup and one ring across tasks).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import fp8 as fp8_format
from pallas_kernels.gemv import (GRID_AXIS, TP, WeightTiles, auto_slots, check_smem, default_ctas,
                                 interpret_params, pick_k_splits, store_acc_t, col_scale, stream_tasks,
                                 swizzle_transforms)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Tuning of `moe_experts` / `moe_experts_fp8`.

    tile_n: weight columns (outputs) per tile = wgmma M; 64 or 128. tile_k: weight rows per step; multiple of
    64 (FP8: 128). max_concurrent_steps: ring depth, None = fill ~192 KB (A holds two weight tiles per step).
    gate_up_k_splits: split-K of kernel A, None = fill the CTAs in whole waves. num_ctas: None = one per SM.
    """
    tile_n: int = 64
    tile_k: int = 128
    max_concurrent_steps: int | None = None
    gate_up_k_splits: int | None = None
    num_ctas: int | None = None

    def __post_init__(self):
        if self.tile_n not in (64, 128):
            raise ValueError(f"tile_n must be 64 or 128 (the wgmma M granule), got {self.tile_n=}")
        if self.tile_k <= 0 or self.tile_k % 64:
            raise ValueError(f"tile_k must be a positive multiple of 64, got {self.tile_k=}")
        if self.max_concurrent_steps is not None and not 2 <= self.max_concurrent_steps <= 16:
            raise ValueError(f"max_concurrent_steps must be in [2, 16] or None, got {self.max_concurrent_steps=}")
        if self.gate_up_k_splits is not None and self.gate_up_k_splits < 1:
            raise ValueError(f"gate_up_k_splits must be >= 1 or None, got {self.gate_up_k_splits=}")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"num_ctas must be >= 1 or None, got {self.num_ctas=}")


class Slots(NamedTuple):
    """Expert-slot tables. meta int32 [M]: [n_slots, expert[U_pad], is_shared[U_pad], 0...] (M % 32 == 0 for a
    128-byte TMA); coef f32 [U_pad, TP]; n_slots int32 scalar. Slots >= n_slots are padding (no work)."""
    meta: jax.Array
    coef: jax.Array
    n_slots: jax.Array


def route_slots(expert_ids, expert_weights, num_experts: int, shared_chunks: int) -> Slots:
    """Deduplicate the routed experts into slots (sorted unique, fixed size) and append the shared chunks."""
    t, k = expert_ids.shape
    u = min(t * k, num_experts)
    u_pad = -(-(u + shared_chunks) // 4) * 4  # coef rows of 32 bytes: 4 per 128-byte TMA granule
    uniq = jnp.unique(expert_ids.reshape(-1), size=u, fill_value=num_experts).astype(jnp.int32)
    uniq = jnp.concatenate([uniq, jnp.full((u_pad - u,), num_experts, jnp.int32)])
    n_unique = jnp.sum(uniq < num_experts).astype(jnp.int32)
    slot = jnp.arange(u_pad, dtype=jnp.int32)
    routed = slot < n_unique
    shared = (slot >= n_unique) & (slot < n_unique + shared_chunks)
    expert = jnp.where(routed, uniq, jnp.where(shared, slot - n_unique, 0))
    picked = expert_ids[None, :, :] == uniq[:, None, None]  # [U_pad, T, k]
    coef = jnp.sum(jnp.where(picked, expert_weights.astype(jnp.float32)[None], 0.0), axis=-1)  # [U_pad, T]
    coef = jnp.where(routed[:, None], coef, jnp.where(shared[:, None], 1.0, 0.0))
    coef = jnp.pad(coef, ((0, 0), (0, TP - t)))
    n_slots = n_unique + shared_chunks
    meta = jnp.concatenate([n_slots[None], expert, shared.astype(jnp.int32)])
    meta = jnp.pad(meta, (0, -meta.shape[0] % 32))
    return Slots(meta, coef, n_slots)


def _slot_info(meta_smem, slot, u_pad: int):
    return meta_smem[1 + slot], meta_smem[1 + u_pad + slot]


def _issue_weight(tiles: WeightTiles, ring, routed_src, shared_src, expert, is_shared, k0, n0, sk0, sn0, slot,
                  barrier):
    """TMA one weight tile of a slot: routed expert `expert` at (k0, n0), or shared chunk at (sk0, sn0)."""
    @pl.when(is_shared == 0)
    def _():
        tiles.issue(ring, tuple(r.at[expert] for r in routed_src), k0, n0, slot, barrier)

    if shared_src is not None:
        @pl.when(is_shared != 0)
        def _():
            tiles.issue(ring, shared_src, sk0, sn0, slot, barrier)


def _load_tables(meta_gmem, meta_smem, bar, coef_gmem=None, coef_smem=None):
    plgpu.copy_gmem_to_smem(meta_gmem, meta_smem, bar)
    if coef_gmem is not None:
        plgpu.copy_gmem_to_smem(coef_gmem, coef_smem, bar)
    plgpu.barrier_wait(bar)


def _gate_up(x, slots: Slots, u_pad: int, max_slots: int, routed, shared, tiles: WeightTiles, d: int, i: int,
             config: MoeConfig, interpret):
    """Kernel A. routed/shared: ((gate refs), (up refs)); returns h [U_pad, TP, I] bf16. max_slots: the most
    slots the routing can produce (exact at T = 1), for the split-K choice."""
    tk, tn = tiles.tile_k, tiles.tile_n
    n_tiles, ksteps_total = i // tn, d // tk
    num_ctas = default_ctas(config.num_ctas, interpret)
    splits = config.gate_up_k_splits or pick_k_splits(max_slots * n_tiles, ksteps_total, num_ctas)
    if ksteps_total % splits:
        raise ValueError(f"gate_up_k_splits={splits} must divide the {ksteps_total} K steps (D={d}, tile_k={tk})")
    ksteps = ksteps_total // splits
    step_bytes = 2 * tiles.step_bytes() + TP * tk * x.dtype.itemsize
    num_slots = auto_slots(step_bytes, config.max_concurrent_steps)
    out_dtype = x.dtype if splits == 1 else jnp.float32
    check_smem("moe gate/up", num_slots * step_bytes + 2 * TP * tn * 4 + slots.meta.size * 4 + 64)
    n_ring = len(tiles.scratch(1))
    has_shared = shared is not None

    def body(meta_gmem, x_gmem, *refs):
        n_w = 2 * n_ring * (1 + has_shared)
        wrefs, out_refs, scr = refs[:n_w], refs[n_w:-1], refs[-1]
        g_src, u_src = wrefs[:n_ring], wrefs[n_ring:2 * n_ring]
        sg_src, su_src = (wrefs[2 * n_ring:3 * n_ring], wrefs[3 * n_ring:]) if has_shared else (None, None)
        ring_g = tuple(scr[f"g{j}"] for j in range(n_ring))
        ring_u = tuple(scr[f"u{j}"] for j in range(n_ring))
        x_ring, bars, o_smem, meta_smem = scr["x_ring"], scr["bars"], scr["o_smem"], scr["meta_smem"]
        _load_tables(meta_gmem, meta_smem, scr["meta_bar"])
        num_tasks = meta_smem[0] * (n_tiles * splits)

        def coords(task, kk):
            slot, rem = task // (n_tiles * splits), task % (n_tiles * splits)
            i0 = (rem // splits) * tn
            k0 = ((rem % splits) * ksteps + kk) * tk
            return slot, i0, k0, rem % splits

        def issue(task, kk, ring_slot):
            slot, i0, k0, _ = coords(task, kk)
            expert, is_shared = _slot_info(meta_smem, slot, u_pad)
            bar = bars.at[ring_slot]
            # (k, n) = (D, I) coordinates whatever the storage layout; shared chunk c = hidden units c*I...
            for ring, src, ssrc in ((ring_g, g_src, sg_src), (ring_u, u_src, su_src)):
                _issue_weight(tiles, ring, src, ssrc, expert, is_shared, k0, i0, k0, expert * i + i0, ring_slot,
                              bar)
            plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(0, TP), pl.ds(k0, tk)], x_ring.at[ring_slot], bar)

        def compute(task, kk, ring_slot, accs):
            _, _, k0, _ = coords(task, kk)
            tiles.mma(accs, [ring_g, ring_u], ring_slot, k0, x_ring.at[ring_slot], scr, interpret)

        def epilogue(task, accs):
            slot, i0, _, split = coords(task, 0)
            g, u = accs
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if splits == 1:
                (h_gmem,) = out_refs
                store_acc_t(o_smem.at[0], g / (1.0 + jnp.exp(-g)) * u, interpret)  # silu(g) * u, then bf16
                plgpu.copy_smem_to_gmem(o_smem.at[0], h_gmem.at[slot, :, pl.ds(i0, tn)])
            else:
                gp_gmem, up_gmem = out_refs
                store_acc_t(o_smem.at[0], g, interpret)
                store_acc_t(o_smem.at[1], u, interpret)
                plgpu.copy_smem_to_gmem(o_smem.at[0], gp_gmem.at[split, slot, :, pl.ds(i0, tn)])
                plgpu.copy_smem_to_gmem(o_smem.at[1], up_gmem.at[split, slot, :, pl.ds(i0, tn)])

        stream_tasks(num_tasks=num_tasks, ksteps=ksteps, num_slots=num_slots, num_ctas=num_ctas, barriers=bars,
                     issue=issue, compute=compute, epilogue=epilogue, acc_shapes=[(tn, TP)] * 2,
                     interpret=interpret)

    scratch = {f"g{j}": s for j, s in enumerate(tiles.scratch(num_slots))}
    scratch.update({f"u{j}": s for j, s in enumerate(tiles.scratch(num_slots))})
    scratch.update(tiles.x_scratch(num_slots, x.dtype))
    scratch.update(
        x_ring=plgpu.SMEM((num_slots, TP, tk), x.dtype, transforms=swizzle_transforms(x.dtype)),
        bars=plgpu.Barrier(num_arrivals=2 * tiles.arrivals + 1, num_barriers=num_slots),
        o_smem=plgpu.SMEM((2, TP, tn), out_dtype),
        meta_smem=plgpu.SMEM(slots.meta.shape, jnp.int32),
        meta_bar=plgpu.Barrier(num_arrivals=1),
    )
    if splits == 1:
        out_type = (jax.ShapeDtypeStruct((u_pad, TP, i), x.dtype),)
    else:
        out_type = (jax.ShapeDtypeStruct((splits, u_pad, TP, i), jnp.float32),) * 2
    kernel = plgpu.kernel(lambda *refs, **scr: body(*refs, scr), out_type=out_type, scratch_types=scratch,
                          grid=(num_ctas,), grid_names=(GRID_AXIS,), interpret=interpret)
    wargs = [*routed[0], *routed[1]] + ([*shared[0], *shared[1]] if has_shared else [])
    outs = kernel(slots.meta, x, *wargs)
    if splits == 1:
        return outs[0]
    g, u = jnp.sum(outs[0], axis=0), jnp.sum(outs[1], axis=0)
    return (jax.nn.silu(g) * u).astype(x.dtype)


def _down(h, slots: Slots, u_pad: int, routed, shared, tiles: WeightTiles, d: int, i: int, config: MoeConfig,
          interpret):
    """Kernel B: partial [U_pad, TP, D] f32 = coef[slot] * (h[slot] @ W_down[slot])."""
    tk, tn = tiles.tile_k, tiles.tile_n
    n_tiles, ksteps = d // tn, i // tk
    num_ctas = default_ctas(config.num_ctas, interpret)
    step_bytes = tiles.step_bytes() + TP * tk * h.dtype.itemsize
    num_slots = auto_slots(step_bytes, config.max_concurrent_steps)
    check_smem("moe down", num_slots * step_bytes + TP * tn * 4 + slots.meta.size * 4 + slots.coef.size * 4 + 64)
    n_ring = len(tiles.scratch(1))
    has_shared = shared is not None

    def body(meta_gmem, coef_gmem, h_gmem, *refs):
        n_w = n_ring * (1 + has_shared)
        wrefs, out_gmem, scr = refs[:n_w], refs[n_w], refs[n_w + 1]
        src, ssrc = wrefs[:n_ring], (wrefs[n_ring:] if has_shared else None)
        ring = tuple(scr[f"w{j}"] for j in range(n_ring))
        x_ring, bars, o_smem = scr["x_ring"], scr["bars"], scr["o_smem"]
        meta_smem, coef_smem = scr["meta_smem"], scr["coef_smem"]
        _load_tables(meta_gmem, meta_smem, scr["meta_bar"], coef_gmem, coef_smem)
        num_tasks = meta_smem[0] * n_tiles

        def issue(task, kk, ring_slot):
            slot, d0, k0 = task // n_tiles, (task % n_tiles) * tn, kk * tk
            expert, is_shared = _slot_info(meta_smem, slot, u_pad)
            bar = bars.at[ring_slot]
            # W_down [I, D]: k = I rows; shared chunk c = rows c*I...
            _issue_weight(tiles, ring, src, ssrc, expert, is_shared, k0, d0, expert * i + k0, d0, ring_slot, bar)
            plgpu.copy_gmem_to_smem(h_gmem.at[slot, :, pl.ds(k0, tk)], x_ring.at[ring_slot], bar)

        def compute(task, kk, ring_slot, accs):
            expert, is_shared = _slot_info(meta_smem, task // n_tiles, u_pad)
            k0 = jnp.where(is_shared != 0, expert * i, 0) + kk * tk  # the weight row the FP8 scale belongs to
            tiles.mma(accs, [ring], ring_slot, k0, x_ring.at[ring_slot], scr, interpret)

        def epilogue(task, accs):
            slot, d0 = task // n_tiles, (task % n_tiles) * tn
            acc = col_scale(accs[0], coef_smem.at[slot], interpret)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            store_acc_t(o_smem, acc, interpret)
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[slot, :, pl.ds(d0, tn)])

        stream_tasks(num_tasks=num_tasks, ksteps=ksteps, num_slots=num_slots, num_ctas=num_ctas, barriers=bars,
                     issue=issue, compute=compute, epilogue=epilogue, acc_shapes=[(tn, TP)], interpret=interpret)

    scratch = {f"w{j}": s for j, s in enumerate(tiles.scratch(num_slots))}
    scratch.update(tiles.x_scratch(num_slots, h.dtype))
    scratch.update(
        x_ring=plgpu.SMEM((num_slots, TP, tk), h.dtype, transforms=swizzle_transforms(h.dtype)),
        bars=plgpu.Barrier(num_arrivals=tiles.arrivals + 1, num_barriers=num_slots),
        o_smem=plgpu.SMEM((TP, tn), jnp.float32),
        meta_smem=plgpu.SMEM(slots.meta.shape, jnp.int32),
        coef_smem=plgpu.SMEM(slots.coef.shape, jnp.float32),
        meta_bar=plgpu.Barrier(num_arrivals=2),
    )
    kernel = plgpu.kernel(lambda *refs, **scr: body(*refs, scr),
                          out_type=jax.ShapeDtypeStruct((u_pad, TP, d), jnp.float32), scratch_types=scratch,
                          grid=(num_ctas,), grid_names=(GRID_AXIS,), interpret=interpret)
    wargs = [*routed] + ([*shared] if has_shared else [])
    return kernel(slots.meta, slots.coef, h, *wargs)


def _moe(x, expert_ids, expert_weights, routed, shared, tiles: WeightTiles, dims, shared_i, config, interpret):
    e, d, i = dims
    if shared_i % i:
        raise ValueError(f"shared expert hidden size {shared_i} must be a multiple of the routed one I={i} "
                         f"(it runs as {shared_i}/{i} expert-sized chunks)")
    chunks = shared_i // i if shared is not None else 0
    slots = route_slots(expert_ids, expert_weights, e, chunks)
    u_pad = slots.coef.shape[0]
    max_slots = min(expert_ids.size, e) + chunks
    h = _gate_up(x, slots, u_pad, max_slots, (routed[0], routed[1]),
                 None if shared is None else (shared[0], shared[1]), tiles, d, i, config, interpret)
    part = _down(h, slots, u_pad, routed[2], None if shared is None else shared[2], tiles, d, i, config,
                 interpret)
    live = jnp.arange(u_pad)[:, None, None] < slots.n_slots  # padding slots were never written
    return jnp.sum(jnp.where(live, part[:, : x.shape[0]], 0.0), axis=0).astype(x.dtype)  # [T, D]


def _check_routing(x, expert_ids, expert_weights, d: int, what: str):
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what}: x must be [T, D={d}], got shape {x.shape}")
    if not 1 <= x.shape[0] <= TP:
        raise ValueError(f"{what}: T={x.shape[0]} tokens, must be in [1, {TP}]")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"{what}: x must be bfloat16, got {x.dtype}")
    if expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: expert_ids must be [T={x.shape[0]}, k], got shape {expert_ids.shape}")
    if expert_weights.shape != expert_ids.shape:
        raise ValueError(f"{what}: expert_weights shape {expert_weights.shape} != expert_ids shape "
                         f"{expert_ids.shape}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"{what}: expert_ids must be integers, got {expert_ids.dtype}")


def _check_tiles(d: int, i: int, config: MoeConfig, what: str):
    for name, v, m in (("D", d, config.tile_k), ("D", d, config.tile_n), ("I", i, config.tile_k),
                       ("I", i, config.tile_n)):
        if v % m:
            raise ValueError(f"{what}: {name}={v} must be a multiple of {m} (tile_k={config.tile_k}, "
                             f"tile_n={config.tile_n}); expert weights are not padded per call")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def moe_experts(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None, *,
                config: MoeConfig | None = None, interpret=False):
    """Routed experts for T tokens plus the shared expert; see `pallas_kernels.ref.moe_experts`.

    x [T, D] bf16 (T <= 8); expert_ids int [T, k]; expert_weights f32 [T, k]; w_gate/w_up [E, D, I],
    w_down [E, I, D] bf16; shared = (gate [D, Is], up [D, Is], down [Is, D]) or None, Is a multiple of I.
    Each distinct chosen expert's weights are read once. Returns [T, D] bf16.
    """
    config = config or MoeConfig()
    e, d, i = w_gate.shape
    _check_routing(x, expert_ids, expert_weights, d, "moe_experts")
    if w_up.shape != (e, d, i) or w_down.shape != (e, i, d):
        raise ValueError(f"moe_experts: w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                         f"[E, D, I], [E, D, I], [E, I, D]")
    for w in (w_gate, w_up, w_down, *(shared or ())):
        if w.dtype != x.dtype:
            raise ValueError(f"moe_experts: weight dtype {w.dtype} != x dtype {x.dtype}")
    shared_i = i
    if shared is not None:
        shared_i = shared[0].shape[1]
        want = ((d, shared_i), (d, shared_i), (shared_i, d))
        if tuple(s.shape for s in shared) != want:
            raise ValueError(f"moe_experts: shared shapes {[s.shape for s in shared]} must be {want}")
    _check_tiles(d, i, config, "moe_experts")
    tiles = WeightTiles("bf16", config.tile_k, config.tile_n, x.dtype)
    routed = ((w_gate,), (w_up,), (w_down,))
    shared_t = None if shared is None else tuple((s,) for s in shared)
    return _moe(x, expert_ids, expert_weights, routed, shared_t, tiles, (e, d, i), shared_i, config,
                interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def moe_experts_fp8(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None, *,
                    config: MoeConfig | None = None, interpret=False):
    """FP8 `moe_experts`: each weight is a (q, scale) pair from `fp8.quantize_fp8_blockwise` of the reference
    weight: w_gate/w_up q [E, I, D], w_down q [E, D, I]; shared q [Is, D], [Is, D], [D, Is]. Reference:
    `pallas_kernels.fp8.moe_experts_fp8_ref`. Needs D and I multiples of 128."""
    config = config or MoeConfig()
    e, i, d = w_gate[0].shape
    _check_routing(x, expert_ids, expert_weights, d, "moe_experts_fp8")
    for name, (q, s), want in (("w_gate", w_gate, (e, i, d)), ("w_up", w_up, (e, i, d)),
                               ("w_down", w_down, (e, d, i))):
        if q.shape != want:
            raise ValueError(f"moe_experts_fp8: {name} q has shape {q.shape}, expected {want}")
        fp8_format.check_fp8_weight(q, s, f"moe_experts_fp8 {name}")
    shared_i = i
    if shared is not None:
        shared_i = shared[0][0].shape[0]
        for name, (q, s), want in zip(("gate", "up", "down"), shared, ((shared_i, d), (shared_i, d),
                                                                        (d, shared_i))):
            if q.shape != want:
                raise ValueError(f"moe_experts_fp8: shared {name} q has shape {q.shape}, expected {want}")
            fp8_format.check_fp8_weight(q, s, f"moe_experts_fp8 shared {name}")
    if config.tile_k != fp8_format.BLOCK:
        raise ValueError(f"moe_experts_fp8: tile_k must equal the scale block {fp8_format.BLOCK}, got "
                         f"{config.tile_k=}")
    _check_tiles(d, i, config, "moe_experts_fp8")
    tiles = WeightTiles("fp8", config.tile_k, config.tile_n, x.dtype)
    tma = lambda w: (w[0], fp8_format.tma_scales(w[1]))
    routed = (tma(w_gate), tma(w_up), tma(w_down))
    shared = None if shared is None else tuple(tma(w) for w in shared)
    return _moe(x, expert_ids, expert_weights, routed, shared, tiles, (e, d, i), shared_i, config,
                interpret_params(interpret))
