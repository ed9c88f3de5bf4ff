"""Normalisation layers: RMSNorm (every norm of GLM-5) and the LayerNorm of the DSA indexer's keys."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import ref


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019), HF's numerics: normalise in float32, cast, then scale."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):  # [..., dim]
        return ref.rmsnorm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with bias (torch's `nn.LayerNorm`), used on the indexer keys (eps 1e-6 as HF)."""

    def __init__(self, dim: int, dtype, eps: float = 1e-6):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):  # [..., dim]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
