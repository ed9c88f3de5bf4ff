"""Multi-head latent attention (DeepSeek-V2 sec. 2.1; DeepSeek-V3 eq. 1-11), as HF's `GlmMoeDsaAttention`.

Queries go through a low-rank bottleneck: q = W_qb RMSNorm(W_qa x). Keys and values are compressed into one
latent per token: [c_kv ; k_pe] = W_kva x, c_kv normalised, k_pe rotated (interleaved RoPE, shared by all heads).
Two ways to attend, side by side:
- expanded (training, prefill): K/V = W_kvb c_kv per head, ordinary masked attention;
- absorbed (decode): W_uk folded into the query (q_lat = q_nope W_uk, [N, C]) and W_uv applied after the
  weighted sum over latent rows, so the cache holds only c_kv (C) + k_pe (R) per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_fast.config import ModelConfig
from glm_fast.model.linear import Linear
from glm_fast.model.norms import RMSNorm
from glm_fast.model.rope import apply_rope, attention_scale


class MLA(nnx.Module):
    """MLA projections and both attention forms. N heads, H_n nope dim, H_v value dim, R rope dim, C latent."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, n, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        self.num_heads, self.nope, self.rope, self.v_dim = n, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = attention_scale(cfg)
        self.q_a_proj = Linear(d, cfg.q_lora_rank, dtype, std, rngs)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype)  # HF builds it with the default eps
        self.q_b_proj = Linear(cfg.q_lora_rank, n * cfg.qk_head_dim, dtype, std, rngs)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.rope, dtype, std, rngs)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6, dtype)
        self.kv_b_proj = Linear(self.rank, n * (self.nope + self.v_dim), dtype, std, rngs)
        self.o_proj = Linear(n * self.v_dim, d, dtype, std, rngs)

    def queries(self, x, cos, sin):
        """x [B, S, D] -> q_nope [B, S, N, H_n], q_pe [B, S, N, R] (rotated), q_resid [B, S, Q] (for the indexer)."""
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).reshape(*x.shape[:-1], self.num_heads, self.nope + self.rope)
        return q[..., : self.nope], apply_rope(q[..., self.nope:], cos, sin), q_resid

    def latents(self, x, cos, sin):
        """x [B, S, D] -> c_kv [B, S, C] (normalised), k_pe [B, S, R] (rotated): what the decode cache holds."""
        ckv = self.kv_a_proj_with_mqa(x)
        return self.kv_a_layernorm(ckv[..., : self.rank]), apply_rope(ckv[..., self.rank:], cos, sin)

    def _w_kvb(self):
        return self.kv_b_proj.kernel[...].reshape(self.rank, self.num_heads, self.nope + self.v_dim)  # [C, N, H_n+H_v]

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Masked attention with per-head K/V expanded from the latent; mask [B, S_q, S_k] bool -> [B, S_q, D]."""
        kv = self.kv_b_proj(c_kv).reshape(*c_kv.shape[:-1], self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        logits = (jnp.einsum("bqnh,bknh->bnqk", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bqnr,bkr->bnqk", q_pe, k_pe, preferred_element_type=jnp.float32)) * self.scale
        logits = jnp.where(mask[:, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknv->bqnv", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
        return self.o_proj(out.reshape(*out.shape[:2], -1))

    def absorb_query(self, q_nope):
        """q_nope [B, T, N, H_n] -> q_lat [B, T, N, C] = q_nope . W_uk: the query in the latent space."""
        w_uk = self._w_kvb()[..., : self.nope]
        return jnp.einsum("btnh,cnh->btnc", q_nope, w_uk, preferred_element_type=jnp.float32).astype(q_nope.dtype)

    def latent_output(self, o_lat):
        """Latent attention output [B, T, N, C] -> W_uv per head -> o_proj -> [B, T, D]."""
        w_uv = self._w_kvb()[..., self.nope:]
        v = jnp.einsum("btnc,cnv->btnv", o_lat, w_uv, preferred_element_type=jnp.float32).astype(o_lat.dtype)
        return self.o_proj(v.reshape(*v.shape[:2], -1))
