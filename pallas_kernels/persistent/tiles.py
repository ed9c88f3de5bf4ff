"""Op bodies of the persistent kernel that lower for Mosaic GPU (DESIGN.md sec. 4): the GEMV family (GEMV,
SWIGLU_UP, SWIGLU_DOWN, ABSORB, UV) as TMA weight tiles + swap-AB wgmma; KV_WRITE, IK_WRITE (norms, RoPE
spread over the warpgroup's threads: `rope_rows`), MOE_COMBINE and EMBED on SMEM tiles; ROUTER_SELECT on one
register vector of scores per token.

The weight bytes of a decode step are GEMV-shaped (o_proj and the experts are ~85% of them), so these bodies
are the ones that must stream at the HBM ceiling. Each task streams its [TK x TN] weight tiles through a ring of
`TileConfig.slots` SMEM slots (2 x slots for a stream of one weight: `TileConfig.solo_ring`, the two weight rings
t_w0 | t_w1 as one) (`plgpu.copy_gmem_to_smem`; the bulk streams fill `TileConfig.step_tiles`
consecutive slots per ring step under one barrier, and a step is refilled once the wgmmas that read it retired)
and multiplies them with the swap-AB wgmma of `pallas_kernels.gemv` (the weight's columns in the wgmma M slot,
the T <= 8 tokens in N; see gemv.py's docstring): acc [TN, TP] += W_tile^T @ x_tile^T, both operands straight from
swizzled SMEM. The tile functions are gemv.py's (`mma_bf16_tile`,
`col_scale`, `store_acc_t`, `swizzle_transforms`). The fused RMSNorm computes 1/rms per token in a prologue
(overlapping the first weight loads) and normalises each x tile in place, rounding where `ref.rmsnorm` does
(`Tiles.norm_x`; gemv.py's diag(r) epilogue flips bf16 router near-ties against the XLA backend).

Shapes (`TileConfig`). On the GPU TK = TN = 64 (one 128-byte swizzle row of bf16 per tile row), so a weight
stored [K, N] (tile [TK, TN], MN-major A operand) and one stored [N, K] (the tied / transposed case and W_uk in
ABSORB: tile [TN, TK], K-major) share one ring. A task's columns [c0, c0 + n) with n <= TN are the first n rows of the
accumulator; the tile past the weight's last column is zero-filled by TMA on the GPU (out-of-bounds reads in interpret
mode, which only reach accumulator rows that are never stored). x rows T..TP-1 likewise.

Which branches use this path: those whose contraction splits into whole TK tiles (`x_tiles_fit`); the CPU test
configs' odd shapes (e.g. tiny's 16-wide heads in o_proj / ABSORB with 64-wide tiles) keep the v1 jnp bodies,
which compute the same function; GPU interpret mode also takes smaller tiles (untiled SMEM) to cover those.
On glm5-sized configs every branch of these opcodes fits.

FP8 routed experts (`ScheduleOptions.expert_format`): SWIGLU_UP / SWIGLU_DOWN stream [TN, FP8_TK = 128] e4m3 tiles
(one 128-byte swizzle row, one block of scales) and each tile's 32-scale row segment through the FP8 rings, with x
and the norm weight in 128-wide rings (`Tiles.stream(tk=...)`, `norm_x(rings=...)`). `norm_x` writes x (normed
for SWIGLU_UP) as f16 into the t_xf ring, and `gemv.mma_fp8_tiles` multiplies a ring step's tiles (two k-tiles, as
bf16's steps; `Tiles.stream(per_step=True)`): e4m3 -> f16 in registers (exact, one cvt per pair), wgmma with A
from registers, one wait per step, each tile's product scaled into the accumulator. A column tile must lie in one
scale block (ScheduleOptions checks that tile_n divides 128).

Weight prefetch (DESIGN.md sec. 4): the dense bodies issue their first ring slots' weight tiles before the task's
dependency wait (`prefetching`, `Tiles.stream`'s issue_w); every task still fills and drains its own ring (no
stream across task boundaries). A split-K GEMV (the router, `ScheduleOptions.router_splits`, each layer's first
projections, `.proj_splits`, and the lm_head's tiles beyond whole rounds of SMs, `.head_splits`) streams only its
part's rows: the router's 768 of 6144 at glm5_slice are 12 k-tiles, most of which the ring prefetches while the
task waits.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat
from pallas_kernels.gemv import (TP, cast_via_f32, cast_x_tile, col_scale, fp8_operand_dtype, mma_bf16_tile,
                                 mma_fp8_tiles, store_acc_t, swizzle_transforms)

ARRIVALS = (1, 2, 3, 4, 6)  # TMA copies per k-tile: weight (+ x) (+ norm weight) (+ second weight); FP8 gate +
# up: two weights and their scale segments, x and the norm weight
FP8_TK = 128  # an FP8 weight tile's contraction width: one 128-byte swizzle row of e4m3 = one block of scales
# Whether the bodies' profiler phases are marked (`phase`). `kernel.persistent_step` turns them off for a
# profiled launch at T > 1: the profiler keeps every range of a CTA in SMEM without a bound, and the bodies' per-token
# phases at T = 4 overflowed it (the launch aborted); task and wait ranges alone are counted exactly.
PHASES = contextvars.ContextVar("persistent_profile_phases", default=True)


@contextlib.contextmanager
def phase(name: str):
    """A profiler range inside a task's body (`persistent_step(profile_dir=...)`; a `jax.named_scope`, which
    Mosaic GPU's profiler records), unless PHASES is off. A context manager, or a decorator of a body function."""
    if PHASES.get():
        with jax.named_scope(name):
            yield
    else:
        yield


UV_UNIT = 128  # UV loads its split partials in units of one token's [splits, 128] f32 columns (16 KB at 32 splits),
# which it merges as [128] register vectors, one element per thread ...
UV_BYTES = 64 * 1024  # ... through a ring of as many units as fit this SMEM: at glm5_slice T = 1 all 4 of a head's
# units in flight at once
UV_LSE_HEADS = 4  # UV's TMA box of the split LSEs: [splits, TP, 4 heads] f32 around its head (16 bytes a row, the
# least a TMA box row moves); the attention's heads must be a multiple of it


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """tile_n (TN): weight columns per tile = the wgmma M granule (swap-AB), 64 on the GPU; tile_k (TK):
    contraction rows per tile, == tile_n on the GPU so that both weight orientations share the ring; smaller
    tiles are for GPU interpret mode only (the CPU tests' tiny heads). slots: the SMEM ring depth (TMA steps in
    flight per CTA), 8 where SMEM allows (`kernel.fit_tiles`). The LM head's tiles streamed at ~25 GB/s per SM on
    the H200 (the HBM peak needs ~36) with 4 slots and with 8 alike (bench_persistent_glm5_slice_topk_rows.json,
    ..._ring8_union.json): one SM's stream was then bound by each ring step's issue latency; since two k-tiles go
    per ring step (`step_tiles`) it is partly bound by its bytes in flight (`solo_ring` below).
    step_tiles: weight tiles per ring step of the bulk streams (GEMV, SWIGLU_UP, SWIGLU_DOWN): consecutive k-tiles in
    consecutive slots under one barrier and one wgmma wait, so that a step's fixed cost (barrier round trip, wgmma
    wait, scalar issue code) is paid once per step_tiles x 8 KB; the ring then holds slots // step_tiles steps.
    topk_bits: key bits INDEX_TOPK's radix select decides per pass (32 / b sequential passes of 2^b - 1 counts
    each): 2 is the fastest on the H200 at glm5_slice, 4K context (select 55 us vs 78 us at 4 bits
    and 80 us at 1; experiments/results/bench_persistent_glm5_slice_topk_bits{1,2,4}.json).
    solo_ring: the streams of one weight (GEMV, bf16 SWIGLU_DOWN) take both weight rings as one ring of
    2 x slots (`Tiles.solo_slots`), twice the bytes in flight; the others (SWIGLU_UP's gate and up, ABSORB, UV,
    the indexer) take `slots`. A stream is partly bound by its bytes in flight: with 6 slots instead of 8 the
    H200 kernel took 2.302 ms instead of 2.108 at glm5_slice, GEMV 0.97 ms on the critical path instead of 0.81
    (experiments/results/session25/)."""
    tile_n: int = 64
    tile_k: int = 64
    slots: int = 8
    topk_bits: int = 2
    step_tiles: int = 2
    solo_ring: bool = True

    def __post_init__(self):
        if not 2 <= self.slots <= 16:
            raise ValueError(f"slots must be in [2, 16], got {self.slots=}")
        if self.step_tiles not in (1, 2, 4):
            raise ValueError(f"step_tiles must be 1, 2 or 4 (weight tiles per ring step), got {self.step_tiles=}")
        if self.topk_bits not in (1, 2, 4):
            raise ValueError(f"topk_bits must be 1, 2 or 4 (bits per radix pass), got {self.topk_bits=}")
        if self.tile_n < 8 or self.tile_k < 8 or self.tile_n % 8 or self.tile_k % 8:
            raise ValueError(f"tile_n and tile_k must be positive multiples of 8, got {self.tile_n=} {self.tile_k=}")

    def check_gpu(self):
        if (self.tile_n, self.tile_k) != (64, 64):
            raise ValueError(f"the GPU tile bodies take tile_n = tile_k = 64 (wgmma M, one 128-byte swizzle row), "
                             f"got {self.tile_n=} {self.tile_k=}; smaller tiles run in interpret mode only")


def uv_geometry(latent: int) -> tuple[int, int]:
    """(unit, chunk): UV's columns per loaded unit of split partials (UV_UNIT, or fewer when C is no multiple of
    it: interpret-mode configs) and per TMA box of its merged o (TMA boxes span <= 256 elements per dim)."""
    return math.gcd(latent, UV_UNIT), math.gcd(latent, 256)


def rows_per_copy(shape, itemsize: int) -> int:
    """Stack rows per TMA of a small buffer: Mosaic (warpgroup semantics) moves multiples of 128 bytes only, so a
    buffer of fewer bytes is copied with the rows after it (past the stack's end: zero-filled)."""
    nbytes = math.prod(shape) * itemsize
    return 128 // math.gcd(128, nbytes)


def scratch_types(dtype, hidden: int, rope: int, index_dim: int, part_slots: int, slot_shapes, cfg: TileConfig,
                  interpret: bool, attn_splits: int = 0, router=None, attn=None, index=None, latent: int = 0,
                  fp8: bool = False) -> dict:
    """The kernel-wide SMEM of the tile bodies (allocated once, reused by every task).

    dtype: the model's activation / weight dtype; hidden: D (one embedding row); rope: R; index_dim: the indexer's
    key width (0 without indexer layers); part_slots: the MoE partial-sum
    slots (U + shared, 0 without MoE layers); slot_shapes: ((U,), (U, T)) of the router's slot tables or None
    when the schedule has no routed experts. fp8: the FP8 expert rings (`swiglu_up_body`'s FP8 path): two rings
    of [TN, 128] e4m3 weight tiles and their 32-scale row segments, x and norm-weight rings 128 wide (on the GPU
    they share the weight rings' SMEM: `attn_tiles.FP8`).
    """
    s = cfg.slots
    sw = () if interpret else swizzle_transforms(dtype)  # the interpreter's jnp.dot reads plain tiles
    if not interpret:
        cfg.check_gpu()
    out = dict(  # t_w: the two weight rings t_w0 | t_w1 (`Tiles` views), one ring of 2s slots for `solo_ring`
        t_w=plgpu.SMEM((2 * s, cfg.tile_k, cfg.tile_n), dtype, transforms=sw),
        t_x=plgpu.SMEM((2 * s, TP, cfg.tile_k), dtype, transforms=sw),
        t_wn=plgpu.SMEM((2 * s, cfg.tile_k), dtype),
        t_o=plgpu.SMEM((TP, cfg.tile_n), dtype),
        t_o32=plgpu.SMEM((TP, cfg.tile_n), jnp.float32),
        t_res=plgpu.SMEM((TP, cfg.tile_n), dtype),
        t_r=plgpu.SMEM((TP,), jnp.float32),
        t_vec=plgpu.SMEM((TP,), jnp.float32),
        t_ebar=plgpu.Barrier(num_arrivals=1),
        t_emb=plgpu.SMEM((1, math.gcd(hidden, 256)), dtype),  # TMA boxes span <= 256 elements per dim
    )
    if part_slots:
        out["t_part"] = plgpu.SMEM((part_slots, TP, cfg.tile_n), jnp.float32)
    if fp8:
        e4m3, kq = jnp.float8_e4m3fn, FP8_TK
        xf = fp8_operand_dtype(dtype)  # t_xf: x as the e4m3 tiles' wgmma operand (f16 for bf16 models)
        sw8, swf = ((), ()) if interpret else (swizzle_transforms(e4m3), swizzle_transforms(xf))
        out.update(t_q0=plgpu.SMEM((s, cfg.tile_n, kq), e4m3, transforms=sw8),
                   t_q1=plgpu.SMEM((s, cfg.tile_n, kq), e4m3, transforms=sw8),
                   t_qs0=plgpu.SMEM((s, 1, 32), jnp.float32), t_qs1=plgpu.SMEM((s, 1, 32), jnp.float32),
                   t_x8=plgpu.SMEM((s, TP, kq), dtype, transforms=sw), t_wn8=plgpu.SMEM((s, kq), dtype),
                   t_xf=plgpu.SMEM((s, TP, kq), xf, transforms=swf))
    for a in sorted({a * g for a in ARRIVALS for g in (1, cfg.step_tiles)}):
        out[f"t_bar{a}"] = plgpu.Barrier(num_arrivals=a, num_barriers=2 * s)
    if cfg.tile_k != cfg.tile_n:  # the [N, K]-stored weights' ring (interpret mode only; else t_w serves)
        out["t_wt"] = plgpu.SMEM((2 * s, cfg.tile_n, cfg.tile_k), dtype, transforms=sw)
    if rope:
        out.update(t_pe=plgpu.SMEM((TP, rope), dtype), t_pe_out=plgpu.SMEM((TP, rope), dtype),
                   t_cos=plgpu.SMEM((TP, rope // 2), dtype), t_sin=plgpu.SMEM((TP, rope // 2), dtype))
    if index_dim:
        out["t_ik"] = plgpu.SMEM((TP, index_dim), dtype)
    if router is not None:  # ROUTER_SELECT: (E, top_k, n_group, U, P: the logits' split-K parts)
        e, k, g, u, parts = router
        tokens = slot_shapes[1][1]
        lanes = 128 * math.ceil(max(e, k, g) / 128)  # t_rv: padded score rows; t_rx / t_rf: reductions -> scalars
        out.update(t_rl=plgpu.SMEM((parts, tokens, lanes), jnp.float32),  # the logits' partials, padded rows
                   t_rcw=plgpu.SMEM((tokens, lanes), jnp.float32),  # per token: its weights at its picks, else 0
                   t_rv=plgpu.SMEM((2, lanes), jnp.float32), t_rx=plgpu.SMEM((lanes,), jnp.int32),
                   t_rf=plgpu.SMEM((lanes,), jnp.float32), t_pres=plgpu.SMEM((lanes,), jnp.int32),
                   t_rbar=plgpu.Barrier(num_arrivals=parts * tokens + 1))
    if attn_splits:  # UV: its ring of split-partial units, the merge weights, the merged o [T, C] staged for its
        # GMEM round trip and as C / TK x tiles (latent: C)
        unit, chunk = uv_geometry(latent)
        depth = max(1, min(2 * s, UV_BYTES // (attn_splits * unit * 4)))  # (t_bar1 holds 2s barriers)
        out["t_op"] = plgpu.SMEM((depth, attn_splits, unit), jnp.float32)
        # the merge weights and split LSEs, their split rows padded so that [rows, TP] is whole warpgroup
        # vectors (`uv_body` computes them as one register array)
        step = 128 // math.gcd(128, TP)
        rows = step * math.ceil(attn_splits / step)
        out["t_mw"] = plgpu.SMEM((rows, TP), jnp.float32)
        out["t_lse"] = plgpu.SMEM((rows, TP, UV_LSE_HEADS), jnp.float32)
        out["t_lbar"] = plgpu.Barrier(num_arrivals=1)
        out["t_uvs"] = plgpu.SMEM((latent // chunk, TP, chunk), dtype)  # TMA store boxes of <= 256 columns
        out["t_uvx"] = plgpu.SMEM((max(1, latent // cfg.tile_k), TP, cfg.tile_k), dtype, transforms=sw)
    if slot_shapes is not None:
        out["t_sel"] = plgpu.SMEM((rows_per_copy(slot_shapes[0], 4), *slot_shapes[0]), jnp.int32)
    if attn is not None:  # ATTN (attn_tiles.AttnShape): its SMEM, sharing the big rings' memory on the GPU
        out = attn.add_scratch(out, interpret)
    if index is not None and index_dim:  # INDEX_SCORE / INDEX_TOPK (index_tiles.plan_shape: (T, N, SB))
        from pallas_kernels.persistent.index_tiles import add_scratch as index_scratch
        out = index_scratch(out, index, index_dim, dtype, cfg, interpret)
    return out


class Tiles:
    """The scratch refs (from `scratch_types`) and the task-level building blocks."""

    def __init__(self, scratch: dict, cfg: TileConfig, interpret: bool, zero):
        from pallas_kernels.persistent.attn_tiles import unalias  # the GPU's SMEM union of ATTN and the rings
        scratch = dict(unalias(scratch))
        n = cfg.slots
        scratch["t_w0"], scratch["t_w1"] = scratch["t_w"].at[0:n], scratch["t_w"].at[n:2 * n]  # the two rings
        self.s, self.cfg, self.interpret, self.zero = scratch, cfg, interpret, zero
        self.dtype = scratch["t_x"].dtype
        self.mode = True if interpret else None  # gemv.py's tile functions take interpret=None for the GPU
        self.tk, self.tn = cfg.tile_k, cfg.tile_n
        self.solo_slots = 2 * n if cfg.solo_ring else n  # the single-weight streams' ring depth
        self.wt_ring = scratch.get("t_wt", scratch["t_w0"])  # ring of [TN, TK] tiles ([N, K]-stored weights)
        self.solo_wt_ring = scratch.get("t_wt", scratch["t_w"])  # the same, 2 x slots deep (`solo_ring`)

    def c(self, value):
        """A traced int32 scalar: Mosaic's TMA lowering takes no literal arrays as indices (jax 0.10.2) and jax
        0.11's run_state lowering rejects Python ints mixed into traced ref indices, so every index is traced."""
        return self.zero + jnp.int32(value)

    # -- streaming ------------------------------------------------------------------------------------------

    def stream(self, ktiles: int, n_acc: int, arrivals: int, issue, compute, prologue=None, issue_w=None,
               wait=None, group: int = 1, prepare=None, tk: int | None = None, per_step: bool = False,
               slots: int | None = None):
        """Streams a task's `ktiles` weight k-tiles through the ring and returns the f32 accumulators [TN, TP].

        issue(k0, slot, barrier): start k-tile k0's TMA copies into ring slot `slot` (`arrivals` of them in all,
        counting issue_w's); compute(slot, accs, kt): the wgmmas of k-tile kt (in `slot`). prologue(): work that
        overlaps the first loads. Weight prefetch: with `wait` (the task's dependency wait) and `issue_w` (the
        k-tile's weight copies, which depend on no other task), the first ring steps' weight tiles are issued
        *before* the wait, so the weight stream runs while the producers of this task's activations finish; `issue`
        then copies only the activations. group: k-tiles per ring step (`step_group`): a step's tiles fill
        consecutive slots and share one barrier (of group x arrivals); prepare(*slots): work on all of a landed
        step's slots before their computes (the fused RMSNorm's `norm_x`). tk: the k-tile's rows (TK; FP8_TK for
        the FP8 rings). per_step: compute(slots, accs, kts) once per ring step, with its slots and k-tiles (the
        FP8 bodies, which issue a step's wgmmas together and wait once). slots: the ring's depth (default
        `TileConfig.slots`; `solo_slots` for a stream of one weight through the whole t_w).
        """
        slots, tk = slots or self.cfg.slots, tk or self.tk
        if ktiles % group or slots < group:
            raise ValueError(f"stream: {ktiles=} k-tiles do not split into steps of {group} in {slots} slots")
        steps, depth = ktiles // group, slots // group  # depth: the ring's steps
        bars = self.s[f"t_bar{arrivals * group}"]

        def fill(step, ring_step, copy):  # the TMAs of `step`'s k-tiles into ring step `ring_step`'s slots
            for u in range(group):
                copy((step * group + u) * tk, ring_step * group + u, bars.at[ring_step])

        first = range(min(depth, steps))
        if issue_w is not None:
            for j in first:
                fill(self.c(j), self.c(j), issue_w)
        if wait is not None:
            wait()
        for j in first:
            fill(self.c(j), self.c(j), issue)
        if prologue is not None:
            prologue()
        if self.interpret:
            acc_types = [plgpu.SMEM((self.tn, TP), jnp.float32) for _ in range(n_acc)]
        else:
            acc_types = [plgpu.ACC((self.tn, TP), jnp.float32) for _ in range(n_acc)]

        # lag 1: a step leaves its last wgmma in flight and refills the ring step before it (retired by then), so
        # the wgmma's latency overlaps the next step's barrier wait and norm; one ring step fewer is in flight
        lag = 1 if depth >= 2 else 0

        def scope(*accs):
            if self.interpret:
                for a in accs:
                    a[...] = jnp.zeros(a.shape, jnp.float32)

            @pl.loop(0, steps)
            def _step(kk):
                rs = kk % depth
                plgpu.barrier_wait(bars.at[rs])
                step_slots = [rs * group + u for u in range(group)]
                if prepare is not None:
                    prepare(*step_slots)
                if per_step:
                    compute(step_slots, accs, [kk * group + u for u in range(group)])
                else:
                    for u, sl in enumerate(step_slots):
                        compute(sl, accs, kk * group + u)
                if not self.interpret:
                    plgpu.wgmma_wait(lag)  # <= 1 wgmma in flight: step kk - lag's retired
                j = kk - lag  # its ring step is free: refill it for step j + depth

                @pl.when((j >= 0) & (j + depth < steps))
                def _():
                    if issue_w is not None:
                        fill(j + depth, j % depth, issue_w)
                    fill(j + depth, j % depth, issue)

            if not self.interpret:
                plgpu.wgmma_wait(0)
            return tuple(a[...] for a in accs)

        return pl.run_scoped(scope, *acc_types)

    def step_group(self, ktiles: int) -> int:
        """k-tiles per ring step for a bulk stream of `ktiles` (`TileConfig.step_tiles` where it divides the
        stream and leaves at least two ring steps, else 1)."""
        g = self.cfg.step_tiles
        return g if ktiles % g == 0 and self.cfg.slots >= 2 * g else 1

    def mma(self, acc, w_tile, x_tile, transposed: bool):
        """acc [TN, TP] += W^T x^T; w_tile [TK, TN] (weight stored [K, N]) or [TN, TK] (stored [N, K])."""
        if not transposed:
            mma_bf16_tile(acc, w_tile, x_tile, None if not self.interpret else True)
        elif self.interpret:
            acc[...] += jnp.dot(w_tile[...], x_tile[...].T, preferred_element_type=jnp.float32)
        else:
            plgpu.wgmma(acc, w_tile, _compat.transpose_ref(x_tile, (1, 0)))

    def norm_x(self, *slots, out=None, rings=("t_x", "t_wn"), out_ring=None):
        """x tiles [TP, TK] of ring `slots` = rmsnorm(x) as `ref.rmsnorm` rounds it: (x * r_t rounded to x's dtype)
        * w rounded again (r = `inv_rms`'s t_r), in place, or (one slot) into `out` (a plain [TP, TK] SMEM ref),
        or into ring `out_ring`'s slots in its dtype (the FP8 path's t_xf).
        Rounding where the reference does keeps the router's top-k choices (near-ties in bf16) equal to the XLA
        backend's; gemv.py's cheaper diag(r) epilogue does not. A ring step's tiles are loaded, scaled and stored
        together under one proxy fence (one SMEM round trip of latency per step, not per tile)."""
        r = self.s["t_r"]
        xs_in = [self.s[rings[0]].at[sl] for sl in slots]
        wns = [self.s[rings[1]].at[sl] for sl in slots]
        outs = ([out] if out is not None else [self.s[out_ring].at[sl] for sl in slots] if out_ring is not None
                else xs_in)
        dt, f32 = xs_in[0].dtype, jnp.float32
        if self.interpret:
            for x_tile, wn_tile, o in zip(xs_in, wns, outs, strict=True):
                xs = (x_tile[...].astype(f32) * r[...][:, None]).astype(dt)
                xs = (xs.astype(f32) * wn_tile[...].astype(f32)[None, :]).astype(dt)
                o[...] = cast_via_f32(xs, o.dtype)
        else:
            lay = plgpu.Layout.WGMMA_TRANSPOSED
            rr = plgpu.load(r, (), layout=lay.reduce(0))
            loaded = [(plgpu.load(_compat.transpose_ref(x, (1, 0)), (), layout=lay),                   # [TK, TP]
                       plgpu.load(wn, (), layout=lay.reduce(1)).astype(f32)) for x, wn in zip(xs_in, wns, strict=True)]
            for (xt, wn), o in zip(loaded, outs, strict=True):
                xt = (xt.astype(f32) * plgpu.layout_cast(lax.broadcast_in_dim(rr, xt.shape, (1,)), lay)).astype(dt)
                xt = (xt.astype(f32) * lax.broadcast_in_dim(wn, xt.shape, (0,))).astype(dt)
                _compat.transpose_ref(o, (1, 0))[...] = plgpu.layout_cast(cast_via_f32(xt, o.dtype), lay)
        plgpu.commit_smem()  # generic-proxy writes -> the wgmma (async proxy) that reads them

    def rope(self, src, cos_ref, sin_ref, tokens: int, x_smem=None):
        """t_pe_out [TP, R] = `apply_rope` (interleaved in, halves out) of the GMEM view src [TP, R] (or of the
        first R columns of the SMEM ref x_smem), rounding to x's dtype where the reference's jnp ops do
        (`rope_rows`)."""
        s, c, dt = self.s, self.c, self.dtype
        rr = s["t_pe"].shape[1]
        if x_smem is None:
            self.load_small(src, "t_pe")
        self.load_small(cos_ref.at[pl.ds(c(0), TP)], "t_cos")
        self.load_small(sin_ref.at[pl.ds(c(0), TP)], "t_sin")
        x = s["t_pe"] if x_smem is None else x_smem
        rope_rows(x, s["t_pe_out"], tokens, s["t_cos"], s["t_sin"], rr, dt, interpret=self.interpret)
        plgpu.commit_smem()

    def inv_rms(self, x_row, k: int, tokens: int, eps: float):
        """t_r[t] = rsqrt(mean(x[t]^2) + eps) for t < T, 0 for the padding rows; x_row(t, c0, n) -> [n] values."""
        chunk = math.gcd(k, 4096)
        r = self.s["t_r"]
        for t in range(TP):
            if t >= tokens:
                r[self.c(t)] = jnp.float32(0.0)
                continue
            ss = jnp.float32(0.0)
            for c in range(k // chunk):
                row = x_row(self.c(t), self.c(c * chunk), chunk).astype(jnp.float32)
                ss = ss + jnp.sum(row * row)
            r[self.c(t)] = lax.rsqrt(ss / k + eps)

    def col_scale(self, acc, vec_name: str):
        return col_scale(acc, self.s[vec_name], self.mode)

    # -- epilogue -------------------------------------------------------------------------------------------

    def load_small(self, src, dst):
        """TMA a small GMEM view into an SMEM scratch (by name, or a view of one) and wait for it."""
        bar = self.s["t_ebar"]
        plgpu.copy_gmem_to_smem(src, self.s[dst] if isinstance(dst, str) else dst, bar)
        plgpu.barrier_wait(bar)

    def load_row(self, stack_ref, idx, dst_name: str):
        """dst[0] = stack_ref[idx] for a small buffer (dst holds `rows_per_copy` stack rows; see there)."""
        rows = self.s[dst_name].shape[0]
        self.load_small(stack_ref.at[pl.ds(idx, rows)], dst_name)

    def store(self, acc, dst, tokens: int, n: int, residual=None):
        """dst [T, n] (a GMEM view) = (residual [TP, TN] view +) acc^T cast to dst's dtype, then wait for the write
        (the task's completion signal follows)."""
        o = self.s["t_o" if dst.dtype == self.dtype else "t_o32"]
        store_acc_t(o, acc, self.mode)
        if residual is not None:
            self.load_small(residual, "t_res")
            o[...] = (o[...] + self.s["t_res"][...].astype(o.dtype)).astype(o.dtype)
            plgpu.commit_smem()
        self.flush(o, dst, tokens, n)

    def load_s(self, ref):
        """A [TP, TN] SMEM tile in one strided register layout whatever its dtype (Mosaic's inferred strided
        layouts differ between f32 and bf16, and it will not add values of different layouts)."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED((TP, self.tn), vec_size=4))

    def store_s(self, o, value):
        """o [TP, TN] SMEM = value (from `load_s` math), then fence for a TMA store."""
        if self.interpret:
            o[...] = value
        else:
            o[...] = plgpu.layout_cast(value, plgpu.Layout.WG_STRIDED((TP, self.tn), vec_size=4))
        plgpu.commit_smem()

    def store_zeros(self, dst, tokens: int, n: int):
        """dst [T, n] (a GMEM view) = 0, through the staging tile of dst's dtype."""
        o = self.s["t_o" if dst.dtype == self.dtype else "t_o32"]
        self.store_s(o, jnp.zeros((TP, self.tn), o.dtype))
        self.flush(o, dst, tokens, n)

    def flush(self, o, dst, tokens: int, n: int):
        """TMA rows [0, T) and columns [0, n) of the [TP, TN] SMEM tile `o` to dst and wait for the write."""
        self.copy_rows(o, tokens, 0, n, dst)
        plgpu.wait_smem_to_gmem(0)

    def copy_rows(self, src, rows: int, col0: int, n: int, dst):
        """TMA src[:rows, col0:col0 + n] (a 2-D SMEM ref) to the GMEM view dst [rows, n], without waiting: one copy
        when those rows are contiguous in SMEM (all of src's columns, or one row), else one per row -- Mosaic's TMA
        takes contiguous SMEM only, and a column slice of several rows (MTP verification's T > 1) is strided."""
        c = self.c
        if n == src.shape[1] or rows == 1:
            view = src if (rows, n) == tuple(src.shape) else src.at[pl.ds(c(0), rows), pl.ds(c(col0), n)]
            plgpu.copy_smem_to_gmem(view, dst)
            return
        for tt in range(rows):
            plgpu.copy_smem_to_gmem(src.at[pl.ds(c(tt), 1), pl.ds(c(col0), n)], dst.at[pl.ds(c(tt), 1)])


def rope_rows(src, dst, n: int, cos, sin, rr: int, dt, t: int | None = None, interpret: bool = False):
    """dst[i, :rr] = `apply_rope` of src[i, :rr] for rows i < n (SMEM refs; interleaved pairs in, the two halves
    out), with the cos / sin [.., rr/2] (SMEM refs) of row t, or of row i when t is None (rows = tokens), rounding
    to dt where the reference's jnp ops do; out of place. Follow it with `plgpu.commit_smem()` before reading dst.

    On the GPU each of the warpgroup's 128 threads rotates its own pairs (`_rope_threads`): n * rr/2 pairs over
    128 threads, e.g. INDEX_SCORE's 32 heads x 32 pairs in 8 per thread. The scalar loop it replaced ran every pair
    on every thread: ~24 us per INDEX_SCORE q staging with jax 0.11's warpgroup lowering, 70 us with lane
    lowering (bench_persistent_glm5_slice_{tidy,lane_profile}.json). Interpret mode runs that scalar loop (GPU
    interpret mode has no threads): the same values."""
    if not interpret:
        _rope_threads(src, dst, n, cos, sin, rr, dt, t)
        return

    def rnd(v):
        return v.astype(dt).astype(jnp.float32)

    @pl.loop(0, rr // 2)
    def _(j):
        for i in range(n):
            ct = i if t is None else t
            even, odd = src[i, 2 * j].astype(jnp.float32), src[i, 2 * j + 1].astype(jnp.float32)
            co, si = cos[ct, j].astype(jnp.float32), sin[ct, j].astype(jnp.float32)
            dst[i, j] = (rnd(even * co) - rnd(odd * si)).astype(dt)
            dst[i, j + rr // 2] = (rnd(odd * co) + rnd(even * si)).astype(dt)


def _rope_threads(src, dst, n: int, cos, sin, rr: int, dt, t: int | None):
    """`rope_rows` on the GPU as Mosaic GPU code (`plgpu.inline_mgpu`, which both lowering semantics take): pair
    p = i * rr/2 + j goes to thread p mod 128 of the warpgroup, in rounds of 128 pairs (the last one guarded)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    half = rr // 2
    total = n * half

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 4)
    def _(_ctx, src_m, dst_m, cos_m, sin_m):
        i32, index, f32 = ir.IntegerType.get_signless(32), ir.IndexType.get(), ir.F32Type.get()
        out_ty = ir.MemRefType(dst_m.type).element_type
        tid = arith.remui(mgpu_utils.thread_idx(), mgpu_utils.c(128, i32))

        def ix(v):
            return arith.index_cast(index, v)

        def load(ref, i, j):
            v = memref.load(ref, [ix(i), ix(j)])
            return v if v.type == f32 else arith.extf(f32, v)

        def rnd(v):  # to dt and back, as the reference's bf16 ops round
            return v if out_ty == f32 else arith.extf(f32, arith.truncf(out_ty, v))

        def store(v, i, j):
            memref.store(v if out_ty == f32 else arith.truncf(out_ty, v), dst_m, [ix(i), ix(j)])

        def pair(p):
            i = arith.divui(p, mgpu_utils.c(half, i32))
            j = arith.remui(p, mgpu_utils.c(half, i32))
            j2 = arith.muli(j, mgpu_utils.c(2, i32))
            even, odd = load(src_m, i, j2), load(src_m, i, arith.addi(j2, mgpu_utils.c(1, i32)))
            ct = i if t is None else mgpu_utils.c(t, i32)
            co, si = load(cos_m, ct, j), load(sin_m, ct, j)
            store(arith.subf(rnd(arith.mulf(even, co)), rnd(arith.mulf(odd, si))), i, j)
            store(arith.addf(rnd(arith.mulf(odd, co)), rnd(arith.mulf(even, si))), i,
                  arith.addi(j, mgpu_utils.c(half, i32)))

        for base in range(0, total, 128):
            p = arith.addi(tid, mgpu_utils.c(base, i32))
            if total - base >= 128:
                pair(p)
            else:
                with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, p, mgpu_utils.c(total, i32))):
                    pair(p)

    _(src, dst, cos, sin)


# ---- branch bodies ------------------------------------------------------------------------------------------


def x_tiles_fit(tiles, x_shape) -> bool:
    """An activation [T, K] or [T, heads, hd] splits into [TP, TK] tiles (heads: TK divides hd)."""
    return x_shape[-1] % tiles.tk == 0


def x_view(tiles, x_ref, idx, k0, x_shape, tk: int | None = None):
    """The [TP, TK] (or [TP, tk]) GMEM view of x (stack index idx) at contraction offset k0."""
    if len(x_shape) == 2:
        return x_ref.at[idx, pl.ds(tiles.c(0), TP), pl.ds(k0, tk or tiles.tk)]
    hd = x_shape[-1]
    return x_ref.at[idx, pl.ds(tiles.c(0), TP), k0 // hd, pl.ds(k0 % hd, tiles.tk)]


def load_vec(tiles, ref):
    """An SMEM ref [n] or [..] of any strides (a multiple of 128 elements on the GPU) as a register array in one
    fixed layout, one element per thread and register (`plgpu.Layout.WG_STRIDED`, vec_size 1: Mosaic loads a
    strided view element by element)."""
    if tiles.interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED(tuple(ref.shape), vec_size=1))


def vec_iota(tiles, shape, dim: int = 0):
    """int32 iota along `dim` of `shape` in `load_vec`'s layout."""
    if tiles.interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WG_STRIDED(shape, vec_size=1))


def lane_iota(tiles, n):
    """int32 [n] 0..n-1 in `load_vec`'s layout."""
    return vec_iota(tiles, (n,))


def smem_row(tiles, vals, ref):
    """0-d register reductions -> SMEM: vals[j] placed at lane j of one [128] row (vector selects), one full-ref
    vector store into `ref` ([128] SMEM of the vals' dtype), readable as scalars ref[j] afterwards (static or
    dynamic j) until the next store. jax 0.11.2 represents a full reduction as a 0-d vector, which Mosaic GPU
    cannot use as a scalar (loop carry, trip count, predicate)."""
    lane = lane_iota(tiles, ref.shape[0])  # [128] int32
    row = jnp.where(lane == 0, vals[0], 0)
    for j, v in enumerate(vals[1:], 1):
        row = jnp.where(lane == j, v, row)
    plgpu.commit_smem()  # (its warpgroup barrier) earlier scalar reads of `ref` are done before the store ...
    ref[...] = row
    plgpu.commit_smem()  # ... and the store is visible to every thread's scalar reads


def unrolled_or_loop(n: int, c, unroll: bool):
    """Decorator running body(i) for i in [0, n): unrolled with static indices c(i), or as one `pl.loop`."""
    def run(body):
        if unroll:
            for i in range(n):
                body(c(i))
        else:
            pl.loop(0, n)(body)
    return run


def per_token(n: int, c):
    """Decorator running body(t) for the step's n tokens: inline with t = c(0) for T = 1, else one `pl.loop`
    (the per-token code is not unrolled: Mosaic GPU's lowering time on jax 0.11.2 grows with the kernel's code,
    and with ATTN / INDEX_TOPK / ROUTER_SELECT unrolled 4x the T = 4 kernel did not lower within 8 minutes on the
    H200; unrolled, their code grew 4-8x from T = 1, as one `pl.loop` 1.0-1.2x)."""
    return unrolled_or_loop(n, c, n == 1)


class TaskView:
    """The dynamic part of one task as the bodies see it: w(j) / inp(j) / out(j) stack indices (for a cache: its
    member index in the cache group, i.e. the layer), arg(a), and
    wait(): the task's dependency wait, which a body marked `prefetching` calls itself (after issuing its first
    weight tiles); the kernel waits before any other body."""

    def __init__(self, w, inp, out, arg, wait=lambda: None):
        self.w, self.inp, self.out, self.arg, self.wait = w, inp, out, arg, wait


def prefetching(fn):
    """Marks a body fn that calls `t.wait()` itself, after issuing weight tiles that depend on no other task."""
    fn.prefetching = True
    return fn


def _silu(g):
    # g * sigmoid(g) without `jax.nn.silu`'s custom_jvp (GPU interpret mode cannot run it)
    return g / (1.0 + jnp.exp(-g))


def _stack(r, slot):
    """The stack ref of a scratch buffer slot, or None for step inputs / caches."""
    return r.stacks[slot[1]] if slot is not None and slot[0] == "stack" else None


def gemv_body(r, key, consts):
    """GEMV (fused RMSNorm, residual, [K, N] or [N, K] weight) or None when the shapes do not fit the tiles. With
    an output [P, T, N] it is split-K: the task streams its part's K / P rows of W and x (the norm's RMS still
    over all of x) and stores its partial at out[part]."""
    _, (n, eps, transposed), wstk, islots, oslots = key
    tiles, x_ref, out_ref = r.tiles, _stack(r, islots[0]), _stack(r, oslots[0])
    if tiles is None or x_ref is None or out_ref is None or n > tiles.tn:
        return None
    wref = r.weights[wstk[0]]
    xs = x_ref.shape[1:]
    norm = eps >= 0
    if not x_tiles_fit(tiles, xs) or wref.dtype != tiles.dtype or x_ref.dtype != tiles.dtype or (norm and len(xs) != 2):
        return None
    tokens, k = xs[0], math.prod(xs[1:])
    parts = out_ref.shape[1] if out_ref.ndim == 4 else 0  # split-K: [stack, P, T, N]
    ks = k // max(parts, 1)  # the rows this task streams
    res_ref = _stack(r, islots[1])
    if (islots[1] is not None and res_ref is None) or ks % tiles.tk or (parts and res_ref is not None):
        return None
    s = tiles.s
    ring = tiles.solo_wt_ring if transposed else s["t_w"]  # one weight: the ring of `solo_slots`

    @prefetching
    def fn(t: TaskView):
        c0, wi, xi = t.arg(0), t.w(0), t.inp(0)
        kb = pl.multiple_of(t.arg(4) * ks, ks & -ks) if parts else 0  # the part's first row (TMA-aligned)

        def issue_w(k0, slot, bar):
            k0 = kb + k0
            src = (wref.at[wi, pl.ds(c0, tiles.tn), pl.ds(k0, tiles.tk)] if transposed
                   else wref.at[wi, pl.ds(k0, tiles.tk), pl.ds(c0, tiles.tn)])
            plgpu.copy_gmem_to_smem(src, ring.at[slot], bar)
            if norm:
                plgpu.copy_gmem_to_smem(r.weights[wstk[1]].at[t.w(1), pl.ds(k0, tiles.tk)], s["t_wn"].at[slot], bar)

        def issue(k0, slot, bar):
            plgpu.copy_gmem_to_smem(x_view(tiles, x_ref, xi, kb + k0, xs), s["t_x"].at[slot], bar)

        def compute(slot, accs, _kt):
            tiles.mma(accs[0], ring.at[slot], s["t_x"].at[slot], transposed)

        prologue = None
        if norm:
            def prologue():
                tiles.inv_rms(lambda tt, c, m: x_ref[xi, tt, pl.ds(c, m)], k, tokens, float(consts[eps]))
        (acc,) = tiles.stream(ks // tiles.tk, 1, 2 + norm, issue, compute, prologue, issue_w, t.wait,
                              group=tiles.step_group(ks // tiles.tk), prepare=tiles.norm_x if norm else None,
                              slots=tiles.solo_slots)
        res = None if res_ref is None else res_ref.at[t.inp(1), pl.ds(tiles.c(0), TP), pl.ds(c0, tiles.tn)]
        rows = (pl.ds(tiles.c(0), tokens), pl.ds(c0, n))
        dst = out_ref.at[(t.out(0), t.arg(4), *rows) if parts else (t.out(0), *rows)]
        tiles.store(acc, dst, tokens, n, residual=res)
    return fn


def _expert(tiles, r, slot_ref, idx, slot):
    """(expert id clamped to >= 0, 1.0 / 0.0 whether the slot is used) of routed slot `slot`."""
    tiles.load_row(slot_ref, idx, "t_sel")
    e = tiles.s["t_sel"][tiles.c(0), slot]
    return jnp.maximum(e, 0), (e >= 0).astype(jnp.float32)


def _unless_unchosen(routed: bool, tokens: int, present, run, zero):
    """run(), except for a routed slot that no token chose (present == 0), possible only with T > 1 (U = min(E, T k)
    slots for fewer distinct experts; at T = 1 all k are chosen): zero() instead, streaming no weights."""
    if routed and tokens > 1:
        pl.when(present > 0)(run)
        pl.when(present == 0)(zero)
    else:
        run()


def _fp8_expert(r, wstk, j, tiles) -> tuple | None:
    """(q [stack, E, N, K] e4m3, scales [stack, E, N/128, K/128 padded]) refs of weight j when it is an FP8 expert
    weight (`ScheduleOptions.expert_format`) whose tiles the FP8 rings take, else None."""
    q = r.weights[wstk[j]]
    if q.dtype != jnp.float8_e4m3fn or "t_q0" not in tiles.s or tiles.tn > FP8_TK or q.shape[-1] % FP8_TK:
        return None
    return q, r.weights[r.plan.fp8_scales[wstk[j]]]


def _fp8_issue(tiles, w, idx, e, c0, k0, ring: str, slot, bar) -> None:
    """TMA of FP8 weight w's [TN, FP8_TK] tile at (c0, k0) of expert e, and of the 32-scale row segment holding its
    block's scale (a 128-byte box, the least Mosaic moves), into ring slot `ring` / its scale ring."""
    q, scales = w
    plgpu.copy_gmem_to_smem(q.at[idx, e, pl.ds(c0, tiles.tn), pl.ds(k0, FP8_TK)], tiles.s[f"t_q{ring}"].at[slot],
                            bar)
    kb = k0 // FP8_TK
    plgpu.copy_gmem_to_smem(scales.at[idx, e, pl.ds(c0 // FP8_TK, 1), pl.ds((kb // 32) * 32, 32)],
                            tiles.s[f"t_qs{ring}"].at[slot], bar)


def _fp8_mma(tiles, accs, rings: str, slots, kts) -> None:
    """For each ring step slot (k-tile kts[i] in slots[i]): accs[j] += (ring rings[j]'s [TN, FP8_TK] tile x its
    block scale) @ t_xf's x tile^T, all in one `gemv.mma_fp8_tiles` (one wgmma wait per ring step)."""
    s = tiles.s
    prods = [(acc, g, sl, kt) for sl, kt in zip(slots, kts, strict=True) for acc, g in zip(accs, rings, strict=True)]
    mma_fp8_tiles([acc for acc, *_ in prods], [s[f"t_q{g}"].at[sl] for _, g, sl, _ in prods],
                  [s[f"t_qs{g}"][sl, 0, lax.rem(kt, 32)] for _, g, sl, kt in prods],
                  [s["t_xf"].at[sl] for _, _, sl, _ in prods], tiles.mode)


def swiglu_up_body(r, key, consts):
    """SWIGLU_UP (gate and up tiles of one x stream, fused RMSNorm, routed or dense) or None. With T > 1 a routed
    slot that no token chose (U = min(E, T k) slots, fewer distinct experts) streams no weights and writes its
    tile as zeros (what the multiply by `present` gives)."""
    _, (n, eps, routed), wstk, islots, oslots = key
    tiles, x_ref, out_ref = r.tiles, _stack(r, islots[0]), _stack(r, oslots[0])
    if tiles is None or x_ref is None or out_ref is None or n > tiles.tn:
        return None
    xs = x_ref.shape[1:]
    wg, wu = r.weights[wstk[0]], r.weights[wstk[1]]
    fp8 = [_fp8_expert(r, wstk, j, tiles) for j in (0, 1)] if routed else [None, None]
    if fp8[0] is not None and fp8[1] is not None and len(xs) == 2 and x_ref.dtype == tiles.dtype:
        return _swiglu_up_fp8(r, key, consts, fp8)
    if (len(xs) != 2 or not x_tiles_fit(tiles, xs) or x_ref.dtype != tiles.dtype
            or any(w.dtype != tiles.dtype for w in (wg, wu))):
        return None
    tokens, k = xs
    s = tiles.s

    @prefetching
    def fn(t: TaskView):
        c0, slot, xi = t.arg(0), t.arg(2), t.inp(0)
        if routed:  # the expert id comes from the router task: wait first, no prefetch
            t.wait()
            e, present = _expert(tiles, r, _stack(r, islots[1]), t.inp(1), slot)

        def wsrc(wref, j, k0):
            if routed:
                return wref.at[t.w(j), e, pl.ds(k0, tiles.tk), pl.ds(c0, tiles.tn)]
            return wref.at[t.w(j), pl.ds(k0, tiles.tk), pl.ds(c0, tiles.tn)]

        def issue_w(k0, sl, bar):
            plgpu.copy_gmem_to_smem(wsrc(wg, 0, k0), s["t_w0"].at[sl], bar)
            plgpu.copy_gmem_to_smem(wsrc(wu, 1, k0), s["t_w1"].at[sl], bar)
            plgpu.copy_gmem_to_smem(r.weights[wstk[2]].at[t.w(2), pl.ds(k0, tiles.tk)], s["t_wn"].at[sl], bar)

        def issue(k0, sl, bar):
            plgpu.copy_gmem_to_smem(x_view(tiles, x_ref, xi, k0, xs), s["t_x"].at[sl], bar)

        def compute(sl, accs, _kt):
            tiles.mma(accs[0], s["t_w0"].at[sl], s["t_x"].at[sl], False)
            tiles.mma(accs[1], s["t_w1"].at[sl], s["t_x"].at[sl], False)

        def prologue():
            tiles.inv_rms(lambda tt, c, m: x_ref[xi, tt, pl.ds(c, m)], k, tokens, float(consts[eps]))

        def dst():
            if routed:
                return out_ref.at[t.out(0), slot, pl.ds(tiles.c(0), tokens), pl.ds(c0, n)]
            return out_ref.at[t.out(0), pl.ds(tiles.c(0), tokens), pl.ds(c0, n)]

        def run():
            g, u = tiles.stream(k // tiles.tk, 2, 4, issue, compute, prologue, issue_w,
                                None if routed else t.wait, group=tiles.step_group(k // tiles.tk),
                                prepare=tiles.norm_x)
            y = _silu(g) * u
            tiles.store(y * present if routed else y, dst(), tokens, n)
        _unless_unchosen(routed, tokens, present if routed else None, run,
                         lambda: tiles.store_zeros(dst(), tokens, n))
    return fn


def _swiglu_up_fp8(r, key, consts, fp8):
    """SWIGLU_UP of a routed expert with FP8 gate / up weights: [TN, 128] e4m3 tiles and their block scales
    through the FP8 rings, x and the norm weight 128 wide; x normed into t_xf as f16, the tiles multiplied by
    `gemv.mma_fp8_tiles`."""
    _, (n, eps, _), wstk, islots, oslots = key
    tiles, x_ref, out_ref = r.tiles, _stack(r, islots[0]), _stack(r, oslots[0])
    tokens, k = x_ref.shape[1:]
    s = tiles.s

    def fn(t: TaskView):
        c0, slot, xi = t.arg(0), t.arg(2), t.inp(0)
        t.wait()  # the expert id comes from the router task
        e, present = _expert(tiles, r, _stack(r, islots[1]), t.inp(1), slot)

        def issue_w(k0, sl, bar):
            for j in (0, 1):
                _fp8_issue(tiles, fp8[j], t.w(j), e, c0, k0, str(j), sl, bar)
            plgpu.copy_gmem_to_smem(r.weights[wstk[2]].at[t.w(2), pl.ds(k0, FP8_TK)], s["t_wn8"].at[sl], bar)

        def issue(k0, sl, bar):
            plgpu.copy_gmem_to_smem(x_view(tiles, x_ref, xi, k0, (tokens, k), FP8_TK), s["t_x8"].at[sl], bar)

        def compute(sls, accs, kts):
            _fp8_mma(tiles, accs, "01", sls, kts)

        def prologue():
            tiles.inv_rms(lambda tt, cc, m: x_ref[xi, tt, pl.ds(cc, m)], k, tokens, float(consts[eps]))

        def dst():
            return out_ref.at[t.out(0), slot, pl.ds(tiles.c(0), tokens), pl.ds(c0, n)]

        def run():
            g, u = tiles.stream(k // FP8_TK, 2, 6, issue, compute, prologue, issue_w, None,
                                group=tiles.step_group(k // FP8_TK), tk=FP8_TK, per_step=True,
                                prepare=lambda *sl: tiles.norm_x(*sl, rings=("t_x8", "t_wn8"), out_ring="t_xf"))
            tiles.store(_silu(g) * u * present, dst(), tokens, n)
        _unless_unchosen(True, tokens, present, run, lambda: tiles.store_zeros(dst(), tokens, n))
    return fn


def swiglu_down_body(r, key, consts):
    """SWIGLU_DOWN (routed slot x coefficient, shared expert into a partial slot, dense + residual) or None. With
    T > 1 a routed slot that no token chose streams nothing and writes its partial tile as zeros."""
    _, (n, routed, to_slot), wstk, islots, oslots = key
    tiles, a_ref, out_ref = r.tiles, _stack(r, islots[0]), _stack(r, oslots[0])
    if tiles is None or a_ref is None or out_ref is None or n > tiles.tn:
        return None
    xs = a_ref.shape[2:] if routed else a_ref.shape[1:]
    wd = r.weights[wstk[0]]
    fp8 = _fp8_expert(r, wstk, 0, tiles) if routed else None  # FP8 weights: [TN, FP8_TK] tiles, 128-wide x
    if fp8 is None and (not x_tiles_fit(tiles, xs) or wd.dtype != tiles.dtype) or a_ref.dtype != tiles.dtype:
        return None
    tk, x_ring = (FP8_TK, "t_x8") if fp8 is not None else (tiles.tk, "t_x")
    res_ref = _stack(r, islots[1])
    if islots[1] is not None and res_ref is None:
        return None
    tokens, k = xs
    s = tiles.s

    @prefetching
    def fn(t: TaskView):
        c0, slot, out_slot, ai = t.arg(0), t.arg(2), t.arg(3), t.inp(0)
        if routed:  # the expert id comes from the router task: wait first, no prefetch
            t.wait()
            e, present = _expert(tiles, r, _stack(r, islots[2]), t.inp(2), slot)

        def issue_w(k0, sl, bar):
            if fp8 is not None:
                return _fp8_issue(tiles, fp8, t.w(0), e, c0, k0, "0", sl, bar)
            wsrc = (wd.at[t.w(0), e, pl.ds(k0, tiles.tk), pl.ds(c0, tiles.tn)] if routed
                    else wd.at[t.w(0), pl.ds(k0, tiles.tk), pl.ds(c0, tiles.tn)])
            plgpu.copy_gmem_to_smem(wsrc, s["t_w"].at[sl], bar)

        def issue(k0, sl, bar):
            xsrc = (a_ref.at[ai, slot, pl.ds(tiles.c(0), TP), pl.ds(k0, tk)] if routed
                    else x_view(tiles, a_ref, ai, k0, xs))
            plgpu.copy_gmem_to_smem(xsrc, s[x_ring].at[sl], bar)

        def compute(sl, accs, kt):
            if fp8 is not None:  # (per_step: sl, kt are the ring step's slots and k-tiles)
                return _fp8_mma(tiles, accs, "0", sl, kt)
            tiles.mma(accs[0], s["t_w"].at[sl], s["t_x"].at[sl], False)

        def to_operand(*slots):  # FP8: the landed x tiles as the e4m3 tiles' wgmma operand (t_xf)
            for sl in slots:
                cast_x_tile(s["t_x8"].at[sl], s["t_xf"].at[sl], tiles.mode)

        def part_dst():
            return out_ref.at[t.out(0), out_slot, pl.ds(tiles.c(0), tokens), pl.ds(c0, n)]

        def run():
            (y,) = tiles.stream(k // tk, 1, 3 if fp8 is not None else 2, issue, compute, None, issue_w,
                                None if routed else t.wait, group=tiles.step_group(k // tk), tk=tk,
                                prepare=None if fp8 is None else to_operand, per_step=fp8 is not None,
                                slots=None if fp8 is not None else tiles.solo_slots)
            if routed:
                # coef [U, T] is read as GMEM scalars: its [U, 1] rows have 4-byte strides, which TMA cannot move
                coef, vec, ci = _stack(r, islots[3]), s["t_vec"], t.inp(3)
                for tt in range(TP):
                    vec[tiles.c(tt)] = coef[ci, slot, tiles.c(tt)] * present if tt < tokens else jnp.float32(0.0)
                y = tiles.col_scale(y, "t_vec")
            elif to_slot:  # shared expert: `ref.swiglu` rounds to the activation dtype before the sum
                y = y.astype(a_ref.dtype).astype(jnp.float32)
            if routed or to_slot:
                tiles.store(y, part_dst(), tokens, n)
            else:
                res = res_ref.at[t.inp(1), pl.ds(tiles.c(0), TP), pl.ds(c0, tiles.tn)]
                tiles.store(y, out_ref.at[t.out(0), pl.ds(tiles.c(0), tokens), pl.ds(c0, n)], tokens, n,
                            residual=res)
        _unless_unchosen(routed, tokens, present if routed else None, run,
                         lambda: tiles.store_zeros(part_dst(), tokens, n))
    return fn


def combine_body(r, key, consts):
    """MOE_COMBINE: h[:, c] = h_mid[:, c] + cast(sum over slots of part[:, :, c]) on [TP, TN] tiles (without h_mid:
    the cast sum, a split-K GEMV's parts), or None."""
    _, (n,), _, islots, oslots = key
    tiles, part_ref, h_ref, out_ref = r.tiles, _stack(r, islots[0]), _stack(r, islots[1]), _stack(r, oslots[0])
    if (tiles is None or part_ref is None or (islots[1] is not None and h_ref is None) or out_ref is None
            or n > tiles.tn or "t_part" not in tiles.s):
        return None
    slots, tokens = part_ref.shape[1:3]
    if ((h_ref is not None and h_ref.dtype != tiles.dtype) or out_ref.dtype != tiles.dtype
            or slots > tiles.s["t_part"].shape[0]):
        return None
    s, c = tiles.s, tiles.c

    def fn(t: TaskView):
        c0 = t.arg(0)
        part, o = s["t_part"].at[pl.ds(c(0), slots)], s["t_o"]
        tiles.load_small(part_ref.at[t.inp(0), pl.ds(c(0), slots), pl.ds(c(0), TP), pl.ds(c0, tiles.tn)], part)
        total = tiles.load_s(part.at[c(0)])
        for j in range(1, slots):
            total = total + tiles.load_s(part.at[c(j)])
        y = total.astype(o.dtype)
        if h_ref is not None:
            tiles.load_small(h_ref.at[t.inp(1), pl.ds(c(0), TP), pl.ds(c0, tiles.tn)], "t_res")
            y = (tiles.load_s(s["t_res"]).astype(jnp.float32) + y.astype(jnp.float32)).astype(o.dtype)
        tiles.store_s(o, y)
        tiles.flush(o, out_ref.at[t.out(0), pl.ds(c(0), tokens), pl.ds(c0, n)], tokens, n)
    return fn


def embed_body(r, key, consts):
    """EMBED: h[t] = embedding[tokens[t]], one row TMA'd through SMEM per token, or None."""
    _, _, wstk, islots, oslots = key
    tiles, out_ref = r.tiles, _stack(r, oslots[0])
    emb = r.weights[wstk[0]]
    if tiles is None or out_ref is None or islots[0][0] != "in" or emb.dtype != tiles.dtype:
        return None
    d, chunk = emb.shape[-1], tiles.s["t_emb"].shape[1]
    if d % chunk or chunk * emb.dtype.itemsize % 128:
        return None
    tok_ref = r.inputs[islots[0][1]]
    s, c = tiles.s, tiles.c

    def fn(t: TaskView):
        for tt in range(out_ref.shape[1]):
            tok = tok_ref[c(tt)]  # a GMEM scalar (the step's input, written by the launcher)

            @pl.loop(0, d // chunk)
            def _(j):
                cols = pl.ds(j * chunk, chunk)
                tiles.load_small(emb.at[t.w(0), pl.ds(tok, 1), cols], "t_emb")
                plgpu.copy_smem_to_gmem(s["t_emb"], out_ref.at[t.out(0), pl.ds(c(tt), 1), cols])
                plgpu.wait_smem_to_gmem(0)  # t_emb is refilled next
    return fn


def absorb_body(r, key, consts):
    """ABSORB for one head: q_lat[:, head] = q_nope @ W_uk[head]^T as [TN, TK] tiles of kv_b (stored [C, ...]:
    K-major A operands) over the C / TN column tiles; q_pe[:, head] = RoPE of qb's rope part, a scalar loop over
    SMEM rounding where `apply_rope` does (x's dtype). None when the shapes do not fit."""
    _, _, wstk, islots, oslots = key
    tiles, qb_ref, lat_ref, pe_ref = r.tiles, _stack(r, islots[0]), _stack(r, oslots[0]), _stack(r, oslots[1])
    if tiles is None or any(a is None for a in (qb_ref, lat_ref, pe_ref)) or "t_pe" not in tiles.s:
        return None
    kv_b = r.weights[wstk[0]]
    tokens, heads, c_dim = lat_ref.shape[1:]
    rr = pe_ref.shape[-1]
    hn = qb_ref.shape[-1] // heads - rr
    hv = kv_b.shape[-1] // heads - hn
    if (hn % tiles.tk or c_dim % tiles.tn or tiles.s["t_pe"].shape[1] != rr
            or any(a.dtype != tiles.dtype for a in (kv_b, qb_ref, lat_ref, pe_ref))):
        return None
    s, c = tiles.s, tiles.c
    cos_ref, sin_ref = (r.inputs[sl[1]] for sl in islots[1:3])

    def fn(t: TaskView):
        head, wi, xi, oi = t.arg(0), t.w(0), t.inp(0), t.out(0)
        q0, w0 = head * (hn + rr), head * (hn + hv)

        @pl.loop(0, c_dim // tiles.tn)
        def _(ct):
            c0 = ct * tiles.tn

            def issue(k0, slot, bar):
                plgpu.copy_gmem_to_smem(kv_b.at[wi, pl.ds(c0, tiles.tn), pl.ds(w0 + k0, tiles.tk)],
                                        tiles.wt_ring.at[slot], bar)
                plgpu.copy_gmem_to_smem(qb_ref.at[xi, pl.ds(c(0), TP), pl.ds(q0 + k0, tiles.tk)], s["t_x"].at[slot],
                                        bar)

            def compute(slot, accs, _kt):
                tiles.mma(accs[0], tiles.wt_ring.at[slot], s["t_x"].at[slot], True)

            (acc,) = tiles.stream(hn // tiles.tk, 1, 2, issue, compute)
            tiles.store(acc, lat_ref.at[oi, pl.ds(c(0), tokens), head, pl.ds(c0, tiles.tn)], tokens, tiles.tn)

        tiles.rope(qb_ref.at[xi, pl.ds(c(0), TP), pl.ds(q0 + hn, rr)], cos_ref, sin_ref, tokens)
        o = s["t_pe_out"]
        plgpu.copy_smem_to_gmem(o.at[pl.ds(c(0), tokens)], pe_ref.at[t.out(1), pl.ds(c(0), tokens), head])
        plgpu.wait_smem_to_gmem(0)
    return fn


def kv_write_body(r, key, consts):
    """KV_WRITE: the step's cache rows c_kv = rmsnorm(kva[:, :C]) (TK-wide tiles normalised by `Tiles.norm_x`)
    and k_pe = RoPE(kva[:, C:]) (`Tiles.rope`), TMA'd to the kernel's row outputs; None when they do not fit."""
    _, (eps,), wstk, islots, oslots = key
    tiles, kva_ref = r.tiles, _stack(r, islots[0])
    if tiles is None or kva_ref is None or "t_pe" not in tiles.s or tiles.tk > tiles.tn:
        return None
    ckv_rows, pe_rows = r.rows[oslots[0][1]], r.rows[oslots[1][1]]  # [layers, T, C] / [layers, T, R]
    tokens, c_dim = ckv_rows.shape[1:]
    rr = pe_rows.shape[2]
    if (c_dim % tiles.tk or rr != tiles.s["t_pe"].shape[1]
            or any(a.dtype != tiles.dtype for a in (kva_ref, ckv_rows, pe_rows, r.weights[wstk[0]]))):
        return None
    s, c = tiles.s, tiles.c
    cos_ref, sin_ref = (r.inputs[sl[1]] for sl in islots[2:4])
    bar = s["t_bar2"].at[c(0)]

    def fn(t: TaskView):
        xi = t.inp(0)
        tiles.inv_rms(lambda tt, c0, m: kva_ref[xi, tt, pl.ds(c0, m)], c_dim, tokens, float(consts[eps]))
        o = s["t_o"].at[:, pl.ds(c(0), tiles.tk)]
        for kk in range(c_dim // tiles.tk):
            k0 = c(kk * tiles.tk)
            plgpu.copy_gmem_to_smem(kva_ref.at[xi, pl.ds(c(0), TP), pl.ds(k0, tiles.tk)], s["t_x"].at[c(0)], bar)
            plgpu.copy_gmem_to_smem(r.weights[wstk[0]].at[t.w(0), pl.ds(k0, tiles.tk)], s["t_wn"].at[c(0)], bar)
            plgpu.barrier_wait(bar)
            tiles.norm_x(c(0), out=o)
            tiles.flush(o, ckv_rows.at[t.out(0), pl.ds(c(0), tokens), pl.ds(k0, tiles.tk)], tokens, tiles.tk)
        tiles.rope(kva_ref.at[xi, pl.ds(c(0), TP), pl.ds(c(c_dim), rr)], cos_ref, sin_ref, tokens)
        plgpu.copy_smem_to_gmem(s["t_pe_out"].at[pl.ds(c(0), tokens)], pe_rows.at[t.out(1), pl.ds(c(0), tokens)])
        plgpu.wait_smem_to_gmem(0)
    return fn


def ik_write_body(r, key, consts):
    """IK_WRITE: the step's indexer-key rows = RoPE on the first R dims of LayerNorm(ik) (`_layernorm`,
    `_rope_front` of simulate.py): per token a row-vector LayerNorm into SMEM, then `Tiles.rope` of its first R
    dims; two TMA stores (rope part, rest). None when the shapes do not fit."""
    _, (eps,), wstk, islots, oslots = key
    tiles, ik_ref = r.tiles, _stack(r, islots[0])
    if tiles is None or ik_ref is None or "t_ik" not in tiles.s or "t_pe" not in tiles.s:
        return None
    rows = r.rows[oslots[0][1]]  # [layers, T, H]
    tokens, hi = rows.shape[1:]
    rr = tiles.s["t_pe"].shape[1]
    ln_w, ln_b = r.weights[wstk[0]], r.weights[wstk[1]]
    if (tiles.s["t_ik"].shape[1] != hi or hi < rr
            or any(a.dtype != tiles.dtype for a in (ik_ref, rows, ln_w, ln_b))):
        return None
    s, c, dt = tiles.s, tiles.c, tiles.dtype
    cos_ref, sin_ref = (r.inputs[sl[1]] for sl in islots[2:4])
    eps_v = float(consts[eps])

    def fn(t: TaskView):
        xi, buf = t.inp(0), s["t_ik"]
        full = pl.ds(c(0), hi)
        w = ln_w[t.w(0), full].astype(jnp.float32)
        b = ln_b[t.w(1), full].astype(jnp.float32)
        for tt in range(tokens):
            x = ik_ref[xi, c(tt), full].astype(jnp.float32)
            d = x - jnp.sum(x) / hi
            y = d * lax.rsqrt(jnp.sum(d * d) / hi + eps_v)
            buf[c(tt), full] = (y * w + b).astype(dt)
        plgpu.commit_smem()
        tiles.rope(None, cos_ref, sin_ref, tokens, x_smem=buf)
        plgpu.copy_smem_to_gmem(s["t_pe_out"].at[pl.ds(c(0), tokens)], rows.at[t.out(0), :, pl.ds(c(0), rr)])
        if hi > rr:
            tiles.copy_rows(buf, tokens, rr, hi - rr, rows.at[t.out(0), :, pl.ds(c(rr), hi - rr)])
        plgpu.wait_smem_to_gmem(0)
    return fn


def uv_body(r, key, consts):
    """UV for one head: merge the split-KV partials (o = sum_s exp(lse_s - logsumexp lse) o_s, the weights t_mw
    [splits, TP] computed in registers) once into the resident x tiles t_uvx [C / TK, TP, TK]; then v[:, head] =
    o . W_uv[head] as swap-AB wgmma, one weight stream of kv_b tiles per TN columns. None when the shapes do not fit.

    The merge reads only the step's T token rows: unit u (token u % T, columns (u // T) * UV_UNIT, +UV_UNIT) is one
    [splits, UV_UNIT] f32 TMA box into a slot of the ring t_op, merged as [UV_UNIT] register vectors (one element
    per thread, a scalar weight per split, summed in split order) into the plain stage t_uvs. The stage goes to the
    CTA's GMEM scratch and back by TMA into the swizzled x tiles (rows >= T zero), the layout change that
    INDEX_SCORE's q makes the same way. At glm5_slice T = 1 the head's 4 units (64 KB) are in flight at once; the
    TP-row boxes this replaced moved 8x the bytes through a one-slot ring of 64 KB, 8 round trips per task (9.7 us
    of 22 on the H200, experiments/results/session26/s26c_router_profile.json); now merge 1.7 us and the round trip
    1.3 (experiments/results/session27/s27c_uv_profile.json), the kernel 1.992 vs 2.020 ms in one lease. (Merging
    inside the weight stream redid the merge for every column tile: 43 us of the critical path per layer,
    bench_persistent_glm5_slice_step2.json.)"""
    _, _, wstk, islots, oslots = key
    tiles, op_ref, lse_ref, v_ref = r.tiles, _stack(r, islots[0]), _stack(r, islots[1]), _stack(r, oslots[0])
    if tiles is None or any(a is None for a in (op_ref, lse_ref, v_ref)) or "t_op" not in tiles.s:
        return None
    kv_b = r.weights[wstk[0]]
    splits, tokens, heads, c_dim = op_ref.shape[1:]
    hv = v_ref.shape[-1]
    hn = kv_b.shape[-1] // heads - hv
    unit, chunk = uv_geometry(c_dim)
    s, c, dt = tiles.s, tiles.c, tiles.dtype
    nk, depth, bars = c_dim // tiles.tk, s["t_op"].shape[0], s["t_bar1"]
    if (s["t_op"].shape[1:] != (splits, unit) or c_dim % tiles.tk or nk != s["t_uvx"].shape[0]
            or s["t_uvs"].shape != (c_dim // chunk, TP, chunk) or (hv > tiles.tn and hv % tiles.tn)
            or kv_b.dtype != dt or v_ref.dtype != dt or heads % UV_LSE_HEADS or nk > 2 * tiles.cfg.slots
            or r.gmem is None or r.gmem.dtype != dt or r.gmem.shape[1] < TP or r.gmem.shape[2] < c_dim
            or not (tiles.interpret or unit % 128 == 0)):  # (the x tiles' loads: one of t_bar1's 2 x slots
        # barriers each, as t_op's slots, which `scratch_types` caps at 2 x slots; a unit: whole vectors)
        return None
    n = min(hv, tiles.tn)
    n_units = tokens * (c_dim // unit)

    def fn(t: TaskView):
        head, wi, pi, li = t.arg(0), t.w(0), t.inp(0), t.inp(1)
        w0 = head * (hn + hv) + hn
        mw, ls_s, ring, stage = s["t_mw"], s["t_lse"], s["t_op"], s["t_uvs"]
        x_gmem = r.gmem.at[r.cta, pl.ds(c(0), TP), pl.ds(c(0), c_dim)]  # the CTA's scratch: o [TP, C] (dt)
        h0 = head - lax.rem(head, UV_LSE_HEADS)  # the LSE box's first head

        def load(u, slot):  # unit u: token u % T's partials of columns (u // T) * unit, +unit -> t_op[slot]
            cols = pl.ds(lax.div(u, tokens) * unit, unit)
            plgpu.copy_gmem_to_smem(op_ref.at[pi, pl.ds(c(0), splits), lax.rem(u, tokens), head, cols],
                                    ring.at[slot], bars.at[slot])

        plgpu.copy_gmem_to_smem(lse_ref.at[li, pl.ds(c(0), splits), pl.ds(c(0), TP), pl.ds(h0, UV_LSE_HEADS)],
                                ls_s.at[pl.ds(c(0), splits)], s["t_lbar"])
        for j in range(min(depth, n_units)):
            load(c(j), c(j))
        if tokens < TP:  # the x rows of tokens >= T: zero (their output columns are never stored)
            for k in range(stage.shape[0]):
                pad = stage.at[c(k), pl.ds(c(tokens), TP - tokens)]
                zero = jnp.zeros(pad.shape, dt)
                pad[...] = zero if tiles.interpret else plgpu.layout_cast(
                    zero, plgpu.Layout.WG_STRIDED(tuple(pad.shape), vec_size=1))
        with phase("lse"):  # profiler phases (`persistent_step(profile_dir=...)`)
            # the merge weights [splits, TP] as one register array of the head's split LSEs (a strided view of
            # the box; its split rows padded to whole warpgroup vectors, the padding masked), each token's max and
            # sum two masked reductions (as SMEM scalar loops: 6.0 us per task on the H200,
            # experiments/results/session26/s26c_router_profile.json); the rows of tokens >= T (the box's zero
            # fill) give finite weights that the merge never reads
            plgpu.barrier_wait(s["t_lbar"])
            shape = mw.shape  # [rows >= splits, TP]
            ls = load_vec(tiles, ls_s.at[pl.ds(c(0), shape[0]), pl.ds(c(0), TP), head - h0])
            row, split = vec_iota(tiles, shape, 1), vec_iota(tiles, shape, 0)  # each element's token, split
            lse = ls * 0.0
            for tt in range(tokens):
                mine = jnp.logical_and(row == tt, split < splits)
                m = jnp.max(jnp.where(mine, ls, -jnp.inf))
                m_safe = jnp.where(m == -jnp.inf, jnp.float32(0.0), m)
                tot = jnp.sum(jnp.where(mine, jnp.exp(ls - m_safe), 0.0))
                lse = jnp.where(mine, m_safe + jnp.log(tot), lse)
            mw[...] = jnp.exp(ls - lse)
            plgpu.commit_smem()  # every thread's weights -> the merge's scalar reads

        with phase("merge"):
            @pl.loop(0, n_units)
            def _(u):
                slot, tt, col = lax.rem(u, depth), lax.rem(u, tokens), lax.div(u, tokens) * unit
                plgpu.barrier_wait(bars.at[slot])
                acc = None
                for j in range(splits):  # in split order, as the simulator sums them
                    term = load_vec(tiles, ring.at[slot, c(j)]) * mw[c(j), tt]
                    acc = term if acc is None else acc + term
                stage.at[lax.div(col, chunk), tt, pl.ds(lax.rem(col, chunk), unit)][...] = acc.astype(dt)
                plgpu.commit_smem()  # every thread has read the slot (refilled next) and stored its x elements

                @pl.when(u + depth < n_units)
                def _():
                    load(u + depth, slot)

        with phase("x"):  # the plain stage -> GMEM -> the swizzled x tiles (the wgmma's B operand)
            for k in range(stage.shape[0]):
                plgpu.copy_smem_to_gmem(stage.at[c(k)], x_gmem.at[:, pl.ds(c(k * chunk), chunk)])
            plgpu.wait_smem_to_gmem(0)  # written before the loads below read it
            for kt in range(nk):
                plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(c(kt * tiles.tk), tiles.tk)], s["t_uvx"].at[c(kt)],
                                        bars.at[c(kt)])
            for kt in range(nk):
                plgpu.barrier_wait(bars.at[c(kt)])

        @pl.loop(0, max(hv // tiles.tn, 1))
        def _(ct):
            c0 = ct * tiles.tn

            def issue(k0, slot, bar):
                plgpu.copy_gmem_to_smem(kv_b.at[wi, pl.ds(k0, tiles.tk), pl.ds(w0 + c0, tiles.tn)],
                                        s["t_w0"].at[slot], bar)

            def compute(slot, accs, kt):
                tiles.mma(accs[0], s["t_w0"].at[slot], s["t_uvx"].at[kt], False)

            with phase("w_uv"):
                (acc,) = tiles.stream(nk, 1, 1, issue, compute, group=tiles.step_group(nk))
            tiles.store(acc, v_ref.at[t.out(0), pl.ds(c(0), tokens), head, pl.ds(c0, n)], tokens, n)
    return fn


def router_body(r, key, consts):
    """ROUTER_SELECT: sigmoid + bias choice, group-limited top-k (ties to the lower index, as `lax.top_k`),
    normalised weights x ROUTED_SCALE (`simulate._route`), the distinct experts in increasing order into the U
    slots and coef[u, t]; outputs stored as GMEM scalars. None when it does not fit.
    All of it is register vectors of E lanes (padded to a multiple of 128; the padding lanes hold whatever SMEM
    held and are masked): each (part, token) row of the split-K logits and the bias come in by one TMA each into
    the padded rows of t_rl / t_rv, and a token's partials are summed in order (`simulate.sum_parts`); each of
    the top_k picks is two warpgroup reductions (max, then the lowest lane holding it), the group scores (top-2
    sums) three per group; a token's weights go to its row of t_rcw (0 off its picks) and its picks into the
    used-expert mask t_pres; slot j is then the lowest used lane above slot j - 1's (one reduction per slot),
    and its coefficients are the weights rows at that lane. Only picks and slots go back to scalars
    (`smem_row`). The H200 profile of the scalar loops this replaced (over E: zeroing, summing the partials,
    placing the slots; then the coefficients over U x T x top_k): 18.9 us per task, 12 of them in those loops
    (experiments/results/session26/)."""
    from pallas_kernels.persistent.format import C_ROUTED_SCALE
    _, (top_k, n_group, topk_group, norm), wstk, islots, oslots = key
    tiles, lg_ref, sel_ref, coef_ref = r.tiles, _stack(r, islots[0]), _stack(r, oslots[0]), _stack(r, oslots[1])
    if tiles is None or any(a is None for a in (lg_ref, sel_ref, coef_ref)) or "t_rv" not in tiles.s:
        return None
    bias = r.weights[wstk[0]]
    parts, tokens, e = lg_ref.shape[1:]
    u = sel_ref.shape[1]
    s, c = tiles.s, tiles.c
    lanes = s["t_rv"].shape[1]
    if (lanes < e or s["t_rf"].shape[0] < n_group or bias.dtype != jnp.float32 or lg_ref.dtype != jnp.float32
            or s["t_rl"].shape != (parts, tokens, lanes) or s["t_rcw"].shape[0] < tokens
            or s["t_rx"].shape[0] < max(top_k, u) or e % 4):  # e % 4: a TMA row is a multiple of 16 bytes
        return None
    gsize = e // n_group
    scale = float(consts[C_ROUTED_SCALE])
    neg = float("-inf")

    def fn(t: TaskView):
        rv, rx, rf, pres, lg, cw = s["t_rv"], s["t_rx"], s["t_rf"], s["t_pres"], s["t_rl"], s["t_rcw"]
        with phase("load"):  # profiler phases (`persistent_step(profile_dir=...)`)
            bar = s["t_rbar"]
            plgpu.copy_gmem_to_smem(bias.at[t.w(0)], rv.at[c(1), pl.ds(c(0), e)], bar)
            for p in range(parts):
                for tt in range(tokens):
                    plgpu.copy_gmem_to_smem(lg_ref.at[t.inp(0), c(p), c(tt)], lg.at[c(p), c(tt), pl.ds(c(0), e)],
                                            bar)
            lane = lane_iota(tiles, lanes)
            pres[...] = lane * 0  # no expert used yet
            plgpu.barrier_wait(bar)

        def in_range(x, lo, hi, other=neg):  # x where lo <= lane < hi, else `other`
            return jnp.where(lane >= lo, jnp.where(lane < hi, x, other), other)

        def first_max(x):
            """(max of x, the lowest lane holding it) as 0-d vectors. The lane is clamped to E - 1: with NaN
            scores (upstream garbage, e.g. a benchmark probe's skipped bodies) no lane equals the max, and the
            pick indexes SMEM rows below (the scalar loops this replaced picked lane 0 there)."""
            m = jnp.max(x)
            return m, jnp.minimum(jnp.min(jnp.where(x == m, lane, lanes)), e - 1)

        @per_token(tokens, c)
        def _(ti):
            with phase("pick"):
                logits = load_vec(tiles, lg.at[c(0), ti])
                for p in range(1, parts):
                    logits = logits + load_vec(tiles, lg.at[c(p), ti])
                sg = 1.0 / (1.0 + jnp.exp(-logits))
                choice = in_range(sg + load_vec(tiles, rv.at[c(1)]), 0, e)
                if topk_group < n_group:  # the topk_group groups of the best top-2 sums, lowest index first on ties
                    gscores = []
                    for g in range(n_group):
                        x = in_range(choice, g * gsize, (g + 1) * gsize)
                        m1, i1 = first_max(x)
                        gscores.append(m1 + jnp.max(jnp.where(lane == i1, neg, x)))
                    smem_row(tiles, gscores, rf)
                    gs = [rf[c(g)] for g in range(n_group)]
                    taken = [c(0) > 0] * n_group  # traced: Mosaic lowers no boolean constants
                    for _ in range(topk_group):
                        best, bidx = jnp.float32(neg), c(-1)
                        for g in range(n_group):
                            better = jnp.logical_and(jnp.logical_not(taken[g]),
                                                     jnp.logical_or(gs[g] > best, bidx < 0))
                            best, bidx = jnp.where(better, gs[g], best), jnp.where(better, c(g), bidx)
                        taken = [jnp.logical_or(taken[g], bidx == g) for g in range(n_group)]
                    for g in range(n_group):  # + -inf over the groups not taken (a scalar added to the vector)
                        dropped = choice + jnp.where(taken[g], jnp.float32(0.0), jnp.float32(neg))
                        choice = in_range(dropped, g * gsize, (g + 1) * gsize, choice)
                picks, picked = [], lane < 0
                for _ in range(top_k):
                    _, i = first_max(choice)
                    picks.append(i)
                    choice = jnp.where(lane == i, neg, choice)
                    picked = jnp.logical_or(picked, lane == i)
            with phase("weights"):
                if tokens > 1:
                    plgpu.commit_smem()  # the previous token's scalar reads of t_rv's sg row are done
                rv[c(0), pl.ds(c(0), lanes)] = sg  # (each thread rewrites its own lanes) read back as scalars below
                smem_row(tiles, picks, rx)  # (its first commit also publishes the sg row)
                total = jnp.float32(0.0)
                for j in range(top_k):  # the normaliser summed in pick order, as `_route`'s weights.sum
                    total = total + rv[c(0), rx[c(j)]]
                w = sg / (total + 1e-20) * scale if norm else sg * scale
                cw[ti, pl.ds(c(0), lanes)] = jnp.where(picked, w, 0.0)
                pres[...] = jnp.where(picked, 1, load_vec(tiles, pres))  # (each thread its own lanes)

        with phase("place"):  # slot j: the lowest used lane above slot j - 1's (`lanes` once none is left)
            used = load_vec(tiles, pres) > 0
            slots, prev = [], c(-1)
            for _ in range(u):
                prev = jnp.min(jnp.where(jnp.logical_and(used, lane > prev), lane, lanes))
                slots.append(prev)
            smem_row(tiles, slots, rx)

        with phase("out"):
            oi, oc = t.out(0), t.out(1)

            @unrolled_or_loop(u, c, tokens == 1)  # T = 1 as measured on the H200; else a loop over the U slots
            def _(j):
                ex = rx[j]
                valid = ex < e
                sel_ref[oi, j] = jnp.where(valid, ex, -1)
                at = jnp.minimum(ex, e - 1)

                @per_token(tokens, c)
                def _(tt):
                    coef_ref[oc, j, tt] = jnp.where(valid, cw[tt, at], jnp.float32(0.0))
    return fn
