"""Fused RMSNorm + GEMV for batch-1 decode and MTP verification (T <= 8 tokens), Pallas Mosaic GPU (Hopper).

y [T, N] = rmsnorm?(x) [T, K] @ W [K, N], float32 accumulation; bf16 weights (`gemv`) or FP8 e4m3 weights with
128x128 block scales (`gemv_fp8`, format in `pallas_kernels.fp8`). References: `pallas_kernels.ref.gemv` and
`pallas_kernels.fp8.gemv_fp8_ref`, same signatures. Axis letters: T tokens, K contraction, N outputs; TP = 8 is
T padded to the wgmma N granule.

Why swap-AB wgmma and not FMA on CUDA cores. At T <= 8 the op is a pure weight stream: 2 flops per weight byte
pair, ~20 TFLOP/s at the H200's 4.8 TB/s. The tensor cores need M % 64 == 0, so we put the weight's N in the M
slot: acc [tile_n, TP] += W_tile^T [tile_n, tile_k] @ x_tile^T [tile_k, TP] with both operands read straight from
swizzled SMEM (W^T is an MN-major A operand, which 16-bit wgmma supports) — the weight bytes never pass through
registers, and one m64n8k16 instruction replaces 8192 FMAs. CUDA-core FMA from SMEM would need every weight
loaded to registers, converted to f32 and reduced across threads over K: at T = 8 that is ~1/2 of the SM's FMA
issue rate at the HBM ceiling, and the cross-thread K reduction is not expressible in Mosaic's layout system.
For FP8 the weight tile is dequantized in registers (e4m3 -> f32 * block scale -> bf16) and fed to wgmma as a
register A operand (Hopper's FP8 wgmma would need x in FP8 too).

Kernel design (one CTA per SM, persistent):
  * Tasks are (N tile, K split) pairs; CTA c takes tasks c, c + G, ... Every task is `ksteps` pipeline steps; a
    step is one [tile_k, tile_n] weight tile plus the [TP, tile_k] x block.
  * One TMA ring of `max_concurrent_steps` SMEM slots spans all tasks of a CTA: the refill of a slot is issued as
    soon as the wgmma that read it retired, for the step S ahead, which may belong to the next task, so the
    weight stream never drains at task boundaries.
  * x rows T..7 lie outside x: TMA fills them with zeros (no padding copy); only rows < T reach the output.
  * RMSNorm fused: a CTA prologue computes r_t = rsqrt(mean(x_t^2) + eps) per token (full-warpgroup reductions);
    each step multiplies the x block by the norm weight in registers before the wgmma reads it; r_t scales the
    accumulator's columns in the epilogue (rmsnorm(x) @ W = diag(r) (x * w_norm) @ W).
  * Split-K when there are too few N tiles to fill the SMs (e.g. K=6144, N=2624: 41 tiles of 64): tasks write f32
    partial sums [S, TP, N] and XLA adds them; the persistent megakernel will do that reduction with a
    semaphore-counted last-arriver instead (semaphores do not run in GPU interpret mode).
  * One warpgroup per CTA, no warp specialization: a step's compute is <= 16 m64n8k16 wgmmas (~100s of cycles)
    against ~1 us of weight transfer per 32 KB slot at the per-SM share of HBM bandwidth, so the single warpgroup
    always has S - 1 TMA loads in flight; a separate producer warpgroup would buy nothing and would forbid the
    full-warpgroup reductions of the fused norm (Mosaic lowers them only without a thread axis).

Reusable tile functions (for the persistent megakernel): `WeightTiles.issue` (TMA one weight tile into a ring
slot), `WeightTiles.mma` (swap-AB wgmma of one tile, bf16 or FP8 dequant), `scale_x_tile` (fused-norm weight),
`store_acc_t` (transposed accumulator store), and the ring/task loop `stream_tasks`.

GPU interpret mode (CPU tests): on jax 0.10 its wgmma takes no transposed or register operands and it has no
`layout_cast`, so with `interpret` the tile functions compute the same product with `jnp.dot` on the SMEM tiles
(same orientation, same accumulator shape); TMA, barriers, the ring and the task loop run unchanged.
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
from pallas_kernels import fp8 as fp8_format

TP = 8  # tokens padded to the wgmma N granule; also the largest T supported
GRID_AXIS = "sm"
SMEM_BYTES = 227 * 1024  # dynamic SMEM per CTA on H100/H200
_RING_BUDGET = 192 * 1024  # leave room for outputs, barriers and Mosaic's reduction scratch
_INTERPRET_CTAS = 3  # interpret mode simulates CTAs one by one: few, but > 1 to exercise the task loop


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tuning of `gemv` / `gemv_fp8`.

    tile_n: weight columns per tile = wgmma M (swap-AB); 64 or 128 (FP8: divides the 128-row scale block).
    tile_k: weight rows per pipeline step; multiple of 64 (FP8: exactly the 128-wide scale block).
    max_concurrent_steps: SMEM ring depth (TMA loads in flight); None = as many as fit in ~192 KB.
    k_splits: split-K factor; None = chosen so that the tasks fill the CTAs in whole waves.
    num_ctas: persistent CTAs; None = one per SM (3 in interpret mode).
    """
    tile_n: int = 64
    tile_k: int = 256
    max_concurrent_steps: int | None = None
    k_splits: int | None = None
    num_ctas: int | None = None

    def __post_init__(self):
        if self.tile_n not in (64, 128):
            raise ValueError(f"tile_n must be 64 or 128 (the wgmma M granule), got {self.tile_n=}")
        if self.tile_k <= 0 or self.tile_k % 64:
            raise ValueError(f"tile_k must be a positive multiple of 64 (128-byte swizzle of bf16), got {self.tile_k=}")
        if self.max_concurrent_steps is not None and not 2 <= self.max_concurrent_steps <= 16:
            raise ValueError(f"max_concurrent_steps must be in [2, 16] or None, got {self.max_concurrent_steps=}")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"k_splits must be >= 1 or None, got {self.k_splits=}")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"num_ctas must be >= 1 or None, got {self.num_ctas=}")


# ----------------------------------------------------------------------------------------------------------------
# Small helpers shared with moe.py


def num_sms() -> int:
    """SM count of the target GPU (the abstract mesh's, when tracing for the GPU on a CPU host)."""
    try:
        device = jax.sharding.get_abstract_mesh().abstract_device
    except AttributeError:
        device = None
    if device is not None and getattr(device, "num_cores", None):
        return device.num_cores
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        raise RuntimeError(f"cannot tell the SM count on platform {dev.platform!r}: pass config.num_ctas")
    return dev.core_count


def default_ctas(num_ctas: int | None, interpret) -> int:
    if num_ctas is not None:
        return num_ctas
    return _INTERPRET_CTAS if interpret is not None else num_sms()


def interpret_params(interpret):
    """InterpretGPUParams or None. TMA zero-fills out-of-bounds rows on the GPU (the x rows T..7, the tail of a
    scale row); the interpreter models those as out-of-bounds reads, so they must be allowed there (they read
    NaN, and only feed padding rows that are never stored)."""
    params = _compat.resolve_interpret(interpret)
    if params is not None and params.out_of_bounds_reads == "raise":
        params = dataclasses.replace(params, out_of_bounds_reads="uninitialized")
    return params


def swizzle_transforms(dtype) -> tuple:
    """128-byte swizzle with (8, 128 bytes) tiles: the SMEM layout of every TMA'd wgmma operand here."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def pick_k_splits(n_tiles: int, ksteps_total: int, num_ctas: int) -> int:
    """Smallest-overhead split-K factor that fills the CTAs in (nearly) whole waves.

    Efficiency of d splits = tasks / (waves * CTAs); splitting costs partial-sum traffic and an XLA epilogue,
    hence a small penalty, and is not considered at all with >= 4 waves of N tiles. E.g. 132 SMs, 64 x 256
    tiles: K=6144,N=2624 (41 tiles, 24 steps) -> 3; K=16384,N=6144 (96, 64) -> 4; K=6144,N=154880 -> 1.
    """
    if n_tiles >= 4 * num_ctas:  # the last wave's imbalance is already small next to a split's XLA epilogue
        return 1
    best, best_score = 1, -1.0
    for d in range(1, ksteps_total + 1):
        if ksteps_total % d:
            continue
        tasks = n_tiles * d
        eff = tasks / (math.ceil(tasks / num_ctas) * num_ctas)
        score = eff - (0.02 if d > 1 else 0.0) - 0.005 * d
        if score > best_score + 1e-9:
            best, best_score = d, score
    return best


def auto_slots(step_bytes: int, max_slots: int | None) -> int:
    if max_slots is not None:
        return max_slots
    return int(max(2, min(8, _RING_BUDGET // step_bytes)))


def check_smem(what: str, nbytes: int) -> None:
    if nbytes > SMEM_BYTES:
        raise ValueError(f"{what} needs {nbytes} bytes of SMEM per CTA, more than the {SMEM_BYTES} available: "
                         f"lower max_concurrent_steps or the tile sizes")


# ----------------------------------------------------------------------------------------------------------------
# Tile functions


@dataclasses.dataclass(frozen=True)
class WeightTiles:
    """How one weight matrix is streamed and multiplied, one [tile_k x tile_n] tile per pipeline step.

    fmt "bf16": W [K, N] (N contiguous, the reference layout); a slot holds the [tile_k, tile_n] tile.
    fmt "fp8":  W_q [N, K] e4m3 (K contiguous, DeepSeek-V3 / HF checkpoint layout, which Hopper's FP8 and the
                register path want) + scales [N/128, K/128] f32; a slot holds the [tile_n, tile_k] tile and the
                32-scale row segment that contains its block (a 128-byte TMA, the minimum Mosaic moves).
    """
    fmt: str
    tile_k: int
    tile_n: int
    dtype: object = jnp.bfloat16

    @property
    def arrivals(self) -> int:
        return 1 if self.fmt == "bf16" else 2

    def step_bytes(self) -> int:
        if self.fmt == "bf16":
            return self.tile_k * self.tile_n * jnp.dtype(self.dtype).itemsize
        return self.tile_k * self.tile_n + 32 * 4 + TP * self.tile_k * fp8_operand_dtype(self.dtype).itemsize

    def scratch(self, slots: int) -> tuple:
        if self.fmt == "bf16":
            return (plgpu.SMEM((slots, self.tile_k, self.tile_n), self.dtype,
                               transforms=swizzle_transforms(self.dtype)),)
        return (plgpu.SMEM((slots, self.tile_n, self.tile_k), jnp.float8_e4m3fn,
                           transforms=swizzle_transforms(jnp.float8_e4m3fn)),
                plgpu.SMEM((slots, 1, 32), jnp.float32))

    def issue(self, ring: tuple, src: tuple, k0, n0, slot, barrier) -> None:
        """TMA the tile at (k0, n0) of `src` (refs as passed to the kernel) into ring slot `slot`."""
        if self.fmt == "bf16":
            (w,), (w_ring,) = src, ring
            plgpu.copy_gmem_to_smem(w.at[pl.ds(k0, self.tile_k), pl.ds(n0, self.tile_n)], w_ring.at[slot], barrier)
            return
        (q, scale), (q_ring, s_ring) = src, ring
        block = fp8_format.BLOCK
        plgpu.copy_gmem_to_smem(q.at[pl.ds(n0, self.tile_n), pl.ds(k0, self.tile_k)], q_ring.at[slot], barrier)
        kb = k0 // block
        plgpu.copy_gmem_to_smem(scale.at[pl.ds(n0 // block, 1), pl.ds((kb // 32) * 32, 32)], s_ring.at[slot],
                                barrier)

    def x_scratch(self, slots: int, x_dtype) -> dict:
        """SMEM the x tiles need besides their own ring: fp8's `xf_ring`, x as `mma_fp8_tiles`' operand type."""
        if self.fmt == "bf16":
            return {}
        xf = fp8_operand_dtype(x_dtype)
        return {"xf_ring": plgpu.SMEM((slots, TP, self.tile_k), xf, transforms=swizzle_transforms(xf))}

    def mma(self, accs, rings, slot, k0, x_tile, scratch: dict, interpret) -> None:
        """accs[j] [tile_n, TP] += W_j's tile^T @ x_tile^T, W_j's tiles in ring rings[j], x_tile the [TP, tile_k]
        SMEM block; scratch: the kernel's (fp8: its `xf_ring`, which takes x in the operand type first)."""
        if self.fmt == "bf16":
            for acc, ring in zip(accs, rings, strict=True):
                mma_bf16_tile(acc, ring[0].at[slot], x_tile, interpret)
            return
        xf = scratch["xf_ring"].at[slot]
        cast_x_tile(x_tile, xf, interpret)
        kb = (k0 // fp8_format.BLOCK) % 32
        mma_fp8_tiles(accs, [r[0].at[slot] for r in rings], [r[1][slot, 0, kb] for r in rings], [xf] * len(rings),
                      interpret)


def mma_bf16_tile(acc, w_tile, x_tile, interpret) -> None:
    """Swap-AB: acc [tn, TP] += w_tile^T [tn, tk] @ x_tile^T [tk, TP]; w_tile [tk, tn], x_tile [TP, tk] in SMEM."""
    if interpret is None:
        plgpu.wgmma(acc, _compat.transpose_ref(w_tile, (1, 0)), _compat.transpose_ref(x_tile, (1, 0)))
    else:
        acc[...] += jnp.dot(w_tile[...].T, x_tile[...].T, preferred_element_type=jnp.float32)


def fp8_operand_dtype(dtype):
    """The x operand type of `mma_fp8_tiles` for a model of `dtype`: f16 for bf16 (e4m3 -> f16 is exact and one
    cvt per pair on sm_90, which has no e4m3 -> bf16 cvt), else dtype itself (interpret mode's f32 models)."""
    return jnp.dtype(jnp.float16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def mma_fp8_tiles(accs, q_tiles, scales, x_tiles, interpret) -> None:
    """accs[j] [tn, TP] += scales[j] * (q_tiles[j] [tn, tk] @ x_tiles[j]^T) for every j (an acc may repeat): e4m3
    tiles in SMEM, each inside one block of scales (scales[j] a scalar); x tiles [TP, tk] in SMEM, of
    `fp8_operand_dtype`.

    GPU: each tile is loaded with 32-bit SMEM loads (WGMMA_UPCAST_2X), converted exactly to f16 (one cvt per
    pair) and moved to the wgmma A layout by one warp shuffle, while the previous tiles' wgmmas run; each unscaled
    product goes to a fresh accumulator, and after one wait for all of them each is scaled into its acc: no
    per-element multiply and no f16 range limit on q * scale. (Dequantizing to bf16 instead, e4m3 -> f32 * scale
    -> bf16 after 16-bit loads, ran the FP8 experts at half the bytes rate of the bf16 ones on the H200:
    experiments/persistent_kernel_log.md, session 24.)
    """
    if interpret is not None:
        for acc, q, s, x in zip(accs, q_tiles, scales, x_tiles, strict=True):
            acc[...] += s * jnp.dot(q[...].astype(x.dtype), x[...].T, preferred_element_type=jnp.float32)
        return

    def products(*tmps):  # tile j + 1 is converted while tile j's wgmma runs; one wait for all
        for tmp, q, x in zip(tmps, q_tiles, x_tiles, strict=True):
            w = plgpu.layout_cast(plgpu.load(q, (), layout=plgpu.Layout.WGMMA_UPCAST_2X).astype(x.dtype),
                                  plgpu.Layout.WGMMA)
            plgpu.wgmma(tmp, w, _compat.transpose_ref(x, (1, 0)))
        return tuple(tmp[...] for tmp in tmps)

    ys = pl.run_scoped(products, *[plgpu.ACC(accs[0].shape, jnp.float32) for _ in accs])
    for acc, y, s in zip(accs, ys, scales, strict=True):
        acc[...] = acc[...] + y * s


def cast_via_f32(v, dtype):
    """v in `dtype`, through f32 when it changes (Mosaic converts no 16-bit float type to another directly)."""
    return v if v.dtype == dtype else v.astype(jnp.float32).astype(dtype)


def cast_x_tile(src, dst, interpret) -> None:
    """dst [TP, tk] = src [TP, tk] in dst's dtype (`cast_via_f32`), SMEM to SMEM, fenced for the wgmma that reads
    it."""
    if interpret is None:
        lay = plgpu.Layout.WGMMA_TRANSPOSED
        v = plgpu.load(_compat.transpose_ref(src, (1, 0)), (), layout=lay)
        _compat.transpose_ref(dst, (1, 0))[...] = plgpu.layout_cast(cast_via_f32(v, dst.dtype), lay)
    else:
        dst[...] = cast_via_f32(src[...], dst.dtype)
    plgpu.commit_smem()


def scale_x_tile(x_tile, wn_tile, interpret) -> None:
    """In place: x_tile [TP, tk] (swizzled SMEM) *= norm weight wn_tile [tk] (SMEM), rounded to x's dtype."""
    if interpret is None:
        xt = plgpu.load(_compat.transpose_ref(x_tile, (1, 0)), (), layout=plgpu.Layout.WGMMA_TRANSPOSED)  # [tk, TP]
        wn = plgpu.load(wn_tile, (), layout=plgpu.Layout.WGMMA_TRANSPOSED.reduce(1))
        xs = xt.astype(jnp.float32) * lax.broadcast_in_dim(wn.astype(jnp.float32), xt.shape, (0,))
        _compat.transpose_ref(x_tile, (1, 0))[...] = plgpu.layout_cast(xs.astype(x_tile.dtype),
                                                                     plgpu.Layout.WGMMA_TRANSPOSED)
    else:
        x_tile[...] = (x_tile[...].astype(jnp.float32) * wn_tile[...].astype(jnp.float32)[None, :]).astype(
            x_tile.dtype)
    plgpu.commit_smem()  # generic-proxy writes -> the wgmma (async proxy) that reads them


def col_scale(acc, vec_ref, interpret):
    """acc [tn, TP] * vec [TP] per column (per token); vec_ref an f32 [TP] SMEM ref."""
    if interpret is None:
        v = plgpu.load(vec_ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
        return acc * lax.broadcast_in_dim(v, acc.shape, (1,))
    return acc * vec_ref[...][None, :]


def store_acc_t(o_smem, acc, interpret) -> None:
    """o_smem [TP, tn] (plain SMEM) = acc^T, acc [tn, TP] in the wgmma layout; then fence for the TMA store."""
    if interpret is None:
        _compat.transpose_ref(o_smem, (1, 0))[...] = plgpu.layout_cast(acc.astype(o_smem.dtype),
                                                                     plgpu.Layout.WGMMA_TRANSPOSED)
    else:
        o_smem[...] = acc.astype(o_smem.dtype).T
    plgpu.commit_smem()


def inv_rms_prologue(x_gmem, r_smem, num_tokens: int, eps: float) -> None:
    """r_smem[t] = rsqrt(mean(x[t]^2) + eps) for t < T, 0 for the padding rows (full-warpgroup reductions)."""
    k = x_gmem.shape[1]
    chunk = math.gcd(k, 4096)  # bound the registers per thread; a multiple of 128 as strided layouts need
    for t in range(TP):
        if t >= num_tokens:
            r_smem[t] = jnp.float32(0.0)
            continue
        ss = jnp.float32(0.0)
        for c in range(k // chunk):
            row = x_gmem[t, pl.ds(c * chunk, chunk)].astype(jnp.float32)
            ss = ss + jnp.sum(row * row)
        r_smem[t] = lax.rsqrt(ss / k + eps)


def stream_tasks(*, num_tasks, ksteps: int, num_slots: int, num_ctas: int, barriers, issue, compute, epilogue,
                 acc_shapes, interpret, prologue=None) -> None:
    """Persistent task loop of one CTA with one TMA ring across all its tasks.

    CTA c runs tasks c, c + G, ... (G = num_ctas; `num_tasks` may be a traced scalar: routing-dependent work).
    issue(task, kk, slot): start the TMA copies of step kk of `task` into ring slot `slot`, arriving on
      barriers.at[slot]. compute(task, kk, slot, accs): wgmma the slot into the accumulators.
      epilogue(task, acc_values): store the task's result.
      prologue(): per-CTA set-up that the first compute needs, run while the first TMA loads are in flight.
    The slot read at global step i is refilled with step i + num_slots right after its wgmmas retire.
    """
    cta = lax.axis_index(GRID_AXIS)
    n_local = jnp.maximum(num_tasks - cta + num_ctas - 1, 0) // num_ctas
    total = n_local * ksteps

    def issue_step(step):
        tl, kk = step // ksteps, step % ksteps
        issue(cta + tl * num_ctas, kk, step % num_slots)

    for s in range(num_slots):
        pl.when(s < total)(functools.partial(issue_step, s))
    if prologue is not None:
        prologue()

    if interpret is None:
        acc_types = [plgpu.ACC(shape, jnp.float32) for shape in acc_shapes]
    else:  # the interpreter's wgmma cannot take our operands; a plain f32 SMEM accumulator stands in
        acc_types = [plgpu.SMEM(shape, jnp.float32) for shape in acc_shapes]

    @pl.loop(0, n_local)
    def _task(tl):
        task = cta + tl * num_ctas

        def scope(*accs):
            if interpret is not None:
                for a in accs:
                    a[...] = jnp.zeros(a.shape, jnp.float32)

            @pl.loop(0, ksteps)
            def _step(kk):
                step = tl * ksteps + kk
                slot = step % num_slots
                plgpu.barrier_wait(barriers.at[slot])
                compute(task, kk, slot, accs)
                if interpret is None:
                    plgpu.wgmma_wait(0)  # the slot is free once the wgmmas that read it retired
                pl.when(step + num_slots < total)(functools.partial(issue_step, step + num_slots))

            return tuple(a[...] for a in accs)

        epilogue(task, pl.run_scoped(scope, *acc_types))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# ----------------------------------------------------------------------------------------------------------------
# GEMV kernel


def _gemv_call(x, weights: tuple, norm_weight, eps: float, tiles: WeightTiles, n: int, config: GemvConfig,
               interpret):
    t_tokens, k = x.shape
    tk, tn = tiles.tile_k, tiles.tile_n
    n_tiles, ksteps_total = n // tn, k // tk
    num_ctas = default_ctas(config.num_ctas, interpret)
    splits = config.k_splits or pick_k_splits(n_tiles, ksteps_total, num_ctas)
    if ksteps_total % splits:
        raise ValueError(f"k_splits={splits} must divide the {ksteps_total} K steps (K={k}, tile_k={tk})")
    ksteps = ksteps_total // splits
    num_tasks = n_tiles * splits
    num_ctas = min(num_ctas, num_tasks)
    fused_norm = norm_weight is not None
    step_bytes = tiles.step_bytes() + TP * tk * x.dtype.itemsize + (tk * norm_weight.dtype.itemsize if fused_norm
                                                                    else 0)
    slots = auto_slots(step_bytes, config.max_concurrent_steps)
    out_dtype = x.dtype if splits == 1 else jnp.float32
    check_smem("gemv", slots * step_bytes + TP * tn * 4 + 64)

    def body(*refs):
        n_w = len(weights)
        x_gmem, *rest = refs
        w_src, rest = tuple(rest[:n_w]), rest[n_w:]
        wn_gmem = rest.pop(0) if fused_norm else None
        out_gmem, scratch = rest[0], rest[1]
        ring = tuple(scratch[f"w{i}"] for i in range(len(tiles.scratch(1))))
        x_ring, bars, o_smem = scratch["x_ring"], scratch["bars"], scratch["o_smem"]
        def issue(task, kk, slot):
            k0 = ((task % splits) * ksteps + kk) * tk
            n0 = (task // splits) * tn
            tiles.issue(ring, w_src, k0, n0, slot, bars.at[slot])
            plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(0, TP), pl.ds(k0, tk)], x_ring.at[slot], bars.at[slot])
            if fused_norm:
                plgpu.copy_gmem_to_smem(wn_gmem.at[pl.ds(k0, tk)], scratch["wn_ring"].at[slot], bars.at[slot])

        def compute(task, kk, slot, accs):
            k0 = ((task % splits) * ksteps + kk) * tk
            if fused_norm:
                scale_x_tile(x_ring.at[slot], scratch["wn_ring"].at[slot], interpret)
            tiles.mma(accs, [ring], slot, k0, x_ring.at[slot], scratch, interpret)

        def epilogue(task, accs):
            (acc,) = accs
            if fused_norm:
                acc = col_scale(acc, scratch["r_smem"], interpret)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem free again (previous task's store)
            store_acc_t(o_smem, acc, interpret)
            n0 = (task // splits) * tn
            if splits == 1:
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, t_tokens)], out_gmem.at[:, pl.ds(n0, tn)])
            else:
                plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[task % splits, :, pl.ds(n0, tn)])

        stream_tasks(num_tasks=num_tasks, ksteps=ksteps, num_slots=slots, num_ctas=num_ctas, barriers=bars,
                     issue=issue, compute=compute, epilogue=epilogue, acc_shapes=[(tn, TP)], interpret=interpret,
                     prologue=functools.partial(inv_rms_prologue, x_gmem, scratch.get("r_smem"), t_tokens, eps)
                     if fused_norm else None)

    scratch = {f"w{i}": s for i, s in enumerate(tiles.scratch(slots))} | tiles.x_scratch(slots, x.dtype)
    scratch.update(
        x_ring=plgpu.SMEM((slots, TP, tk), x.dtype, transforms=swizzle_transforms(x.dtype)),
        bars=plgpu.Barrier(num_arrivals=tiles.arrivals + 1 + fused_norm, num_barriers=slots),
        o_smem=plgpu.SMEM((TP, tn), out_dtype),
    )
    if fused_norm:
        scratch.update(wn_ring=plgpu.SMEM((slots, tk), norm_weight.dtype), r_smem=plgpu.SMEM((TP,), jnp.float32))
    out_shape = (t_tokens, n) if splits == 1 else (splits, TP, n)
    kernel = plgpu.kernel(
        lambda *refs, **scr: body(*refs, scr),
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        scratch_types=scratch,
        grid=(num_ctas,),
        grid_names=(GRID_AXIS,),
        interpret=interpret,
    )
    args = (x, *weights) + ((norm_weight,) if fused_norm else ())
    y = kernel(*args)
    if splits > 1:
        y = jnp.sum(y, axis=0)[:t_tokens].astype(x.dtype)
    return y


def _check_x(x, k: int, what: str):
    if x.ndim != 2:
        raise ValueError(f"{what}: x must be [T, K], got shape {x.shape}")
    t, kx = x.shape
    if not 1 <= t <= TP:
        raise ValueError(f"{what}: T={t} tokens, must be in [1, {TP}] (decode + MTP verification)")
    if kx != k:
        raise ValueError(f"{what}: x has K={kx} but the weight has K={k}")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"{what}: x must be bfloat16, got {x.dtype}")


def _check_norm(norm_weight, k: int, what: str):
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"{what}: norm_weight must have shape ({k},), got {norm_weight.shape}")


def _pad_to(a, axis: int, multiple: int):
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def gemv(x, w, norm_weight=None, eps: float = 1e-6, *, config: GemvConfig | None = None, interpret=False):
    """y [T, N] = rmsnorm?(x) [T, K] @ w [K, N] (bf16, f32 accumulation); see `pallas_kernels.ref.gemv`.

    x [T, K] bf16 with 1 <= T <= 8; w [K, N] bf16; norm_weight [K] or None (fused RMSNorm, HF semantics).
    Shapes that are not multiples of the tiles are zero-padded here (K to tile_k, N to tile_n): correct, but it
    copies W every call, so pad weights once offline for speed. `interpret`: False, True or InterpretGPUParams.
    """
    config = config or GemvConfig()
    if w.ndim != 2:
        raise ValueError(f"gemv: w must be [K, N], got shape {w.shape}")
    k, n = w.shape
    _check_x(x, k, "gemv")
    _check_norm(norm_weight, k, "gemv")
    if w.dtype != x.dtype:
        raise ValueError(f"gemv: w dtype {w.dtype} != x dtype {x.dtype}")
    params = interpret_params(interpret)
    if norm_weight is not None and (k % config.tile_k or k % 128):
        # The norm's statistics need the true K (and its in-kernel reduction rows of 128-multiples): normalise in
        # XLA before padding, only on this slow path.
        from pallas_kernels import ref
        x, norm_weight = ref.rmsnorm(x, norm_weight, eps), None
    x_p, w_p = _pad_to(x, 1, config.tile_k), _pad_to(_pad_to(w, 0, config.tile_k), 1, config.tile_n)
    tiles = WeightTiles("bf16", config.tile_k, config.tile_n, w.dtype)
    y = _gemv_call(x_p, (w_p,), norm_weight, eps, tiles, w_p.shape[1], config, params)
    return y[:, :n]


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def gemv_fp8(x, w, norm_weight=None, eps: float = 1e-6, *, config: GemvConfig | None = None, interpret=False):
    """y [T, N] = rmsnorm?(x) @ dequant(w); w = (q [N, K] e4m3, scale [N/128, K/128] f32) from
    `pallas_kernels.fp8.quantize_fp8_blockwise`. Reference: `pallas_kernels.fp8.gemv_fp8_ref`.

    Requires K % 128 == 0 and N % tile_n == 0 (N may end in a partial scale block, e.g. N = 2048 + 576).
    """
    config = config or GemvConfig(tile_k=fp8_format.BLOCK)
    q, scale = w
    n, k = fp8_format.check_fp8_weight(q, scale, "gemv_fp8")
    _check_x(x, k, "gemv_fp8")
    _check_norm(norm_weight, k, "gemv_fp8")  # K % 128 == 0 below, as the fused norm's reduction needs
    if config.tile_k != fp8_format.BLOCK:
        raise ValueError(f"gemv_fp8: tile_k must equal the scale block {fp8_format.BLOCK}, got {config.tile_k=}")
    if n % config.tile_n or k % fp8_format.BLOCK:
        raise ValueError(f"gemv_fp8: N={n} must be a multiple of tile_n={config.tile_n} and K={k} a multiple of "
                         f"{fp8_format.BLOCK}")
    tiles = WeightTiles("fp8", config.tile_k, config.tile_n, x.dtype)
    return _gemv_call(x, (q, fp8_format.tma_scales(scale)), norm_weight, eps, tiles, n, config,
                      interpret_params(interpret))
