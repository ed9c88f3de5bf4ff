"""DSA lightning indexer (DeepSeek-V3.2 sec. 2.1), as HF's `GlmMoeDsaIndexer`.

Per query token t and cached token s: score = sum_h w_h * ReLU(q_h . k_s / sqrt(H)), with w = W_w x / sqrt(N),
q = W_qI q_resid (N heads x H), k = LayerNorm(W_kI x) (one H-dim key per token, cached at decode), interleaved
RoPE on the first R dims of q and k (GLM-5's layout; DeepSeek-V3.2's half-split RoPE gives gibberish here).
The top-k scores choose the rows MLA attends to; "shared" layers reuse the previous layer's choice.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glm_fast.config import ModelConfig
from glm_fast.model.linear import Linear
from glm_fast.model.norms import LayerNorm
from glm_fast.model.rope import apply_rope
from pallas_kernels import ref


class Indexer(nnx.Module):
    """Indexer projections; scores and top-k come from `pallas_kernels.ref` (the kernels' references)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.num_heads, self.head_dim, self.rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.k = cfg.index_topk
        self.scale = self.head_dim ** -0.5
        self.wq_b = Linear(cfg.q_lora_rank, self.num_heads * self.head_dim, dtype, std, rngs)
        self.wk = Linear(cfg.hidden_size, self.head_dim, dtype, std, rngs)
        self.k_norm = LayerNorm(self.head_dim, dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.num_heads, dtype, std, rngs)

    def _rope_front(self, x, cos, sin):
        return jnp.concatenate([apply_rope(x[..., : self.rope], cos, sin), x[..., self.rope:]], axis=-1)

    def queries(self, q_resid, x, cos, sin):
        """q_resid [B, T, Q], x [B, T, D] -> q [B, T, N, H], head weights [B, T, N] float32 (scaled by N^-1/2)."""
        q = self.wq_b(q_resid).reshape(*q_resid.shape[:-1], self.num_heads, self.head_dim)
        w = self.weights_proj(x).astype(jnp.float32) * self.num_heads ** -0.5
        return self._rope_front(q, cos, sin), w

    def keys(self, x, cos, sin):
        """x [B, S, D] -> index keys [B, S, H] (what the decode index cache holds)."""
        return self._rope_front(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, q, w, keys, q_pos):
        """Causal index scores [B, T, S] float32 (-inf where s > q_pos)."""
        return ref.indexer_scores(q, w, keys, q_pos, self.scale)

    def topk(self, scores):
        """Top-k cached rows per query: (idx int32 [B, T, K], valid bool [B, T, K])."""
        return ref.select_topk(scores, self.k)
