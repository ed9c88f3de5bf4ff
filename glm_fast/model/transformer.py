"""The GLM-5 causal LM (HF `GlmMoeDsaForCausalLM`) with multi-token-prediction heads, in flax.nnx.

    model = Model(cfg.model, rngs=nnx.Rngs(0))
    logits, mtp_logits = model(tokens)    # [B, S, V], [D, B, S, V]

mtp_logits[k-1, :, i] predicts token i + k + 1 (rows i >= S - k see padding and must be masked by the loss).
The decode engine (`glm_fast.engine`) reuses these modules' projections with a latent KV cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_fast.config import ModelConfig
from glm_fast.model.layer import DecoderLayer
from glm_fast.model.linear import Embed, Linear
from glm_fast.model.mtp import MTPModule
from glm_fast.model.norms import RMSNorm
from glm_fast.model.rope import rope_tables

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_float32(tree):
    """Every floating leaf of a pytree (parameters, caches) cast to float32: the rounding-free reference that
    bf16 backends are measured against."""
    return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


class Model(nnx.Module):
    """Embedding, decoder layers, final norm, LM head, and `cfg.num_mtp_modules` MTP modules."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        std = cfg.initializer_range
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype, std, rngs)
        self.layers = nnx.List([
            DecoderLayer(cfg, mlp, idx, dtype, rngs)
            for mlp, idx in zip(cfg.layer_mlp_types, cfg.layer_indexer_types)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype, std, rngs)
        self.mtp = nnx.List([MTPModule(cfg, dtype, rngs) for _ in range(cfg.num_mtp_modules)])

    @property
    def dtype(self):
        return self.embed_tokens.embedding.dtype

    def rope(self, positions):
        """cos, sin [B, S, R/2] for positions [B, S]."""
        return rope_tables(self.cfg, positions, self.dtype)

    def head(self, h, norm: RMSNorm | None = None):
        """Final norm and LM head: h [..., D] -> logits [..., V] (float32 accumulation, model dtype)."""
        h = (norm or self.norm)(h)
        return jnp.einsum("...d,dv->...v", h, self.head_weight(), preferred_element_type=jnp.float32).astype(h.dtype)

    def head_weight(self):
        """The LM head's [D, V] matrix (the transposed embedding when tied)."""
        return self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def mtp_module(self, depth: int) -> MTPModule:
        """The module for depth k = 1..D (one shared module when `mtp_share_weights`)."""
        return self.mtp[0 if self.cfg.mtp_share_weights else depth - 1]

    def backbone(self, tokens, positions=None):
        """tokens [B, S] -> (h [B, S, D] before the final norm, per-layer aux list, (cos, sin), positions)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = self.rope(positions)
        h, topk, auxes = self.embed_tokens(tokens), None, []
        for layer in self.layers:
            h, topk, aux = layer(h, cos, sin, positions, topk)
            auxes.append(aux)
        return h, auxes, (cos, sin), positions

    def __call__(self, tokens, positions=None, mtp_depth: int | None = None, return_aux: bool = False):
        """Training forward: tokens [B, S] -> (logits [B, S, V], mtp_logits [D, B, S, V]) [, aux].

        `mtp_depth` (default cfg.mtp_depth) may be lowered to skip MTP work (0: mtp_logits is [0, B, S, V]).
        """
        depth = self.cfg.mtp_depth if mtp_depth is None else mtp_depth
        h, auxes, (cos, sin), positions = self.backbone(tokens, positions)
        logits = self.head(h)
        mtp_logits, mtp_aux, h_k = [], [], h
        for k in range(1, depth + 1):
            ahead = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # t_{i+k}; the last k rows see padding
            module = self.mtp_module(k)
            h_k, aux = module(h_k, self.embed_tokens(ahead), cos, sin, positions)
            mtp_logits.append(self.head(h_k, module.norm))
            mtp_aux.append(aux)
        mtp_logits = (jnp.stack(mtp_logits) if mtp_logits
                      else jnp.zeros((0, *logits.shape), logits.dtype))
        if return_aux:
            return logits, mtp_logits, {"layers": auxes, "mtp": mtp_aux}
        return logits, mtp_logits
