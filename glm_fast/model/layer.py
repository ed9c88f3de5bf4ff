"""One GLM-5 decoder layer: pre-norm MLA with DSA sparse selection, then pre-norm dense MLP or MoE."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from glm_fast.config import ModelConfig
from glm_fast.model.indexer import Indexer
from glm_fast.model.mla import MLA
from glm_fast.model.mlp import MLP
from glm_fast.model.moe import MoE
from glm_fast.model.norms import RMSNorm


def selection_mask(idx, valid, num_keys: int):
    """Top-k choice (idx/valid [B, T, K]) -> bool mask [B, T, S] of the rows each query may attend."""
    b, t, _ = idx.shape
    bi, ti = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
    return jnp.zeros((b, t, num_keys), bool).at[bi, ti, idx].max(valid)


class DecoderLayer(nnx.Module):
    """`indexer_type` "full" owns an indexer; "shared" reuses the previous layer's top-k (HF `skip_topk`)."""

    def __init__(self, cfg: ModelConfig, mlp_type: str, indexer_type: str, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, dtype, rngs)
        self.indexer = Indexer(cfg, dtype, rngs) if indexer_type == "full" else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.is_moe = mlp_type == "sparse"
        self.mlp = (MoE(cfg, dtype, rngs) if self.is_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, cfg.initializer_range, rngs))

    def __call__(self, x, cos, sin, positions, prev_topk=None):
        """Full-sequence forward (training, prefill). x [B, S, D], positions [B, S].

        Returns (x, topk, aux): topk = (idx, valid) [B, S, K] for the next "shared" layer; aux holds this
        layer's cache entries (c_kv, k_pe, index keys) and MoE balance statistics.
        """
        h = self.input_layernorm(x)
        q_nope, q_pe, q_resid = self.self_attn.queries(h, cos, sin)
        c_kv, k_pe = self.self_attn.latents(h, cos, sin)
        aux = {"c_kv": c_kv, "k_pe": k_pe}
        if self.indexer is not None:
            q_idx, w_idx = self.indexer.queries(q_resid, h, cos, sin)
            aux["index_k"] = self.indexer.keys(h, cos, sin)
            aux["index_scores"] = self.indexer.scores(q_idx, w_idx, aux["index_k"], positions)
            topk = self.indexer.topk(aux["index_scores"])
        else:
            if prev_topk is None:
                raise ValueError("a 'shared' indexer layer needs the previous layer's top-k")
            topk = prev_topk
        causal = positions[:, :, None] >= positions[:, None, :]
        aux["topk"] = topk
        mask = selection_mask(*topk, x.shape[1]) & causal
        x = x + self.self_attn.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux["moe"] = self.mlp(h)
        else:
            y = self.mlp(h)
        return x + y, topk, aux
