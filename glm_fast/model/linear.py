"""Bias-free linear layer and token embedding, weights stored [in, out] (HF's transposed)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """y [..., out] = x [..., in] @ kernel [in, out], float32 accumulation, output in x's dtype."""

    def __init__(self, d_in: int, d_out: int, dtype, std: float, rngs: nnx.Rngs):
        self.kernel = nnx.Param((std * jax.random.normal(rngs.params(), (d_in, d_out))).astype(dtype))

    def __call__(self, x):
        return jnp.einsum("...i,io->...o", x, self.kernel[...], preferred_element_type=jnp.float32).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, vocab: int, dim: int, dtype, std: float, rngs: nnx.Rngs):
        self.embedding = nnx.Param((std * jax.random.normal(rngs.params(), (vocab, dim))).astype(dtype))

    def __call__(self, tokens):  # [B, S] int -> [B, S, D]
        return jnp.take(self.embedding[...], tokens, axis=0)
