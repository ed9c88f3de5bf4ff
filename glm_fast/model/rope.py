"""Rotary position embedding: inverse frequencies (default and YaRN, as HF computes them) and the
interleaved rotation that GLM-5 uses in both MLA and the DSA indexer.

HF's `apply_rotary_pos_emb_interleave` rotates pairs (x0, x1), (x2, x3), ... and writes the result
de-interleaved: [x_even*cos - x_odd*sin, x_odd*cos + x_even*sin]. We do the same, so cached k_pe rows are
laid out exactly as HF's keys (dot products are invariant to the layout as long as q and k agree).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from glm_fast.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [R/2] float32, attention_factor) for RoPE dim R = qk_rope_head_dim (HF `ROPE_INIT_FUNCTIONS`)."""
    rp, dim = cfg.rope_parameters, cfg.qk_rope_head_dim
    pos_freqs = rp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    if rp.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    # YaRN (Peng et al. 2023), transcribed from HF `_compute_yarn_parameters`.
    factor = rp.factor
    original = rp.original_max_position_embeddings or cfg.max_position_embeddings
    attention_factor = rp.attention_factor
    if attention_factor is None:
        if rp.mscale and rp.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rp.mscale) / _yarn_mscale(factor, rp.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = rp.beta_fast or 32, rp.beta_slow or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rp.rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def attention_scale(cfg: ModelConfig) -> float:
    """Softmax scale of MLA: qk_head_dim**-0.5, times mscale_all_dim**2 correction under YaRN (HF)."""
    scale = cfg.qk_head_dim ** -0.5
    rp = cfg.rope_parameters
    if rp.rope_type != "default" and rp.mscale_all_dim:
        m = _yarn_mscale(rp.factor, rp.mscale_all_dim)
        scale *= m * m
    return scale


def rope_tables(cfg: ModelConfig, positions, dtype):
    """cos, sin [..., R/2] for integer positions [...], cast to the compute dtype as HF does."""
    inv_freq, factor = inv_freq_and_scale(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return (jnp.cos(angles) * factor).astype(dtype), (jnp.sin(angles) * factor).astype(dtype)


def apply_rope(x, cos, sin):
    """Interleaved RoPE on x [B, S, ..., R] with cos/sin [B, S, R/2]; output de-interleaved (HF layout)."""
    while cos.ndim < x.ndim:
        cos, sin = cos[..., None, :], sin[..., None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
