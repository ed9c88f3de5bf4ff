"""Multi-token prediction module (DeepSeek-V3 sec. 2.2): h'_i = W_eh [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
then one transformer block; the output head and embedding are the main model's.

Depth k at row i predicts t_{i+k+1}. h^0 is the main model's last-layer output before its final norm, and
h^k the block's output (before this module's own final norm), so every depth sees the same kind of input.
GLM-5 ships one module applied recursively; `mtp_share_weights: false` trains D separate modules.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glm_fast.config import ModelConfig
from glm_fast.model.layer import DecoderLayer
from glm_fast.model.linear import Linear
from glm_fast.model.norms import RMSNorm


class MTPModule(nnx.Module):
    """One MTP depth: combine (h^{k-1}, embedding of the token k ahead), run a decoder block, final norm."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * d, d, dtype, cfg.initializer_range, rngs)
        self.block = DecoderLayer(cfg, cfg.mtp_mlp_type, "full", dtype, rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype)

    def combine(self, h_prev, emb):
        """h_prev, emb [B, S, D] -> block input [B, S, D] (checkpoint order: [enorm(emb); hnorm(h)])."""
        return self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))

    def __call__(self, h_prev, emb, cos, sin, positions):
        """Full-sequence forward -> (h^k [B, S, D], aux with the block's cache entries)."""
        h, _, aux = self.block(self.combine(h_prev, emb), cos, sin, positions)
        return h, aux
