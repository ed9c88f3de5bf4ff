"""FP8 (e4m3) block-scaled weights, DeepSeek-V3 style, and the pure-jnp references of the FP8 kernels.

Format (DeepSeek-V3 `weight_dequant`, the layout of HF FP8 checkpoints): a weight W [..., K, N] of the reference
layout is stored transposed and quantized, q [..., N, K] float8_e4m3fn (K contiguous), with one float32 scale per
128 x 128 block, scale [..., ceil(N/128), ceil(K/128)] (the last block row/column may be partial, as for
DeepSeek-V3's 576-wide kv_a projection), so that W^T ~= q * scale (broadcast over each block). The transposed,
K-major layout is what the kernels want: the weight tile is read row by row into registers for dequantization.
Scales are amax / 448 per block (448 = largest e4m3 value), so every block uses the full e4m3 range.

References, with the kernels' signatures (weights are `(q, scale)` pairs):
  gemv_fp8_ref(x, w, norm_weight=None, eps)   ~ pallas_kernels.gemv.gemv_fp8
  moe_experts_fp8_ref(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None) ~ moe.moe_experts_fp8
They dequantize to x's dtype (as DeepSeek-V3's `weight_dequant` returns bf16) and call `pallas_kernels.ref`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import ref

BLOCK = 128
E4M3_MAX = 448.0


def quantize_fp8_blockwise(w, block: int = BLOCK):
    """W [..., K, N] -> (q [..., N, K] float8_e4m3fn, scale [..., ceil(N/block), ceil(K/block)] float32)."""
    *lead, k, n = w.shape
    nb, kb = -(-n // block), -(-k // block)
    wt = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # [..., N, K]
    wt = jnp.pad(wt, [(0, 0)] * len(lead) + [(0, nb * block - n), (0, kb * block - k)])
    blocks = wt.reshape(*lead, nb, block, kb, block)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., N/b, K/b]
    scale = jnp.maximum(amax, 1e-12) / E4M3_MAX
    q = jnp.clip(blocks / scale[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
    q = q.reshape(*lead, nb * block, kb * block)[..., :n, :k].astype(jnp.float8_e4m3fn)
    return q, scale.astype(jnp.float32)


def dequantize_fp8_blockwise(q, scale, dtype=jnp.float32, block: int = BLOCK):
    """(q [..., N, K], scale [..., ceil(N/128), ceil(K/128)]) -> W [..., K, N] in `dtype` (the reference layout)."""
    *lead, n, k = q.shape
    s = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)[..., :n, :k]
    return jnp.swapaxes(q.astype(jnp.float32) * s, -1, -2).astype(dtype)


def check_fp8_weight(q, scale, what: str, block: int = BLOCK) -> tuple[int, int]:
    """Validate one (q [..., N, K], scale [..., ceil(N/block), ceil(K/block)]) pair; returns (N, K)."""
    if q.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"{what}: q must be float8_e4m3fn, got {q.dtype}")
    if scale.dtype != jnp.float32:
        raise ValueError(f"{what}: scale must be float32, got {scale.dtype}")
    *lead, n, k = q.shape
    want = (*lead, -(-n // block), -(-k // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"{what}: scale has shape {scale.shape}, expected {want} for q {q.shape}")
    return n, k


def tma_scales(scale):
    """Scales with the last axis zero-padded to a multiple of 4: TMA needs 16-byte row strides (K % 512 != 0)."""
    extra = -scale.shape[-1] % 4
    return scale if not extra else jnp.pad(scale, [(0, 0)] * (scale.ndim - 1) + [(0, extra)])


def gemv_fp8_ref(x, w, norm_weight=None, eps: float = 1e-6):
    """Reference of `gemv_fp8`: `ref.gemv` on the weight dequantized to x's dtype. w = (q [N, K], scale)."""
    return ref.gemv(x, dequantize_fp8_blockwise(*w, dtype=x.dtype), norm_weight, eps)


def moe_experts_fp8_ref(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None):
    """Reference of `moe_experts_fp8`: `ref.moe_experts` on dequantized weights (only the chosen experts are
    dequantized, per token, so it costs what the bf16 reference costs).

    w_gate/w_up = (q [E, I, D], scale), w_down = (q [E, D, I], scale) — i.e. quantized [E, D, I] / [E, I, D]
    reference weights; shared = ((q [Is, D], s), (q [Is, D], s), (q [D, Is], s)) or None.
    """
    deq = lambda w, e: dequantize_fp8_blockwise(w[0][e], w[1][e], dtype=x.dtype)

    def per_token(xt, ids, wts):  # xt [D], ids/wts [k]
        one = lambda e: ref.swiglu(xt[None], deq(w_gate, e), deq(w_up, e), deq(w_down, e))[0]
        return jnp.einsum("k,kd->d", wts, jax.vmap(one)(ids).astype(jnp.float32))

    y = jax.vmap(per_token)(x, expert_ids, expert_weights)  # [T, D] float32
    if shared is not None:
        y = y + ref.swiglu(x, *(dequantize_fp8_blockwise(*w, dtype=x.dtype) for w in shared)).astype(jnp.float32)
    return y.astype(x.dtype)
