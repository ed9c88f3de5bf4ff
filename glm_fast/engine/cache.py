"""Decode state: the latent KV cache (c_kv + k_pe per token, never expanded K/V), the DSA index-key cache,
and the MTP drafting buffers, preallocated to `max_len` and updated functionally under jit.

Rows are addressed by absolute position. A sequence's `pending` position holds the newest sampled token,
not yet run through the model; rows 0..pending-1 are valid in the main caches. Rows past that are zero:
writes are masked and rollback clears them, so no stale row survives a rejected draft.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from glm_fast.config import ModelConfig


@struct.dataclass
class LayerCache:
    """One attention layer's cache. c_kv [B, L, C], k_pe [B, L, R], index_k [B, L, H] or None ("shared")."""

    c_kv: jax.Array
    k_pe: jax.Array
    index_k: jax.Array | None

    def write(self, pos, ok, **rows):
        """Writes rows [B, T, X] at positions pos [B, T] where ok [B, T]; others are dropped."""
        length = self.c_kv.shape[1]
        where = jnp.where(ok, pos, length)  # out of range -> dropped
        bi = jnp.arange(pos.shape[0])[:, None]
        return self.replace(**{k: getattr(self, k).at[bi, where].set(v.astype(getattr(self, k).dtype),
                                                                      mode="drop") for k, v in rows.items()})

    def clear_from(self, start, stop: int):
        """Zeroes rows [start[b], start[b] + stop) of every array (rollback of rejected draft rows)."""
        offsets = jnp.arange(stop)
        pos = start[:, None] + offsets[None, :]
        fields = {k: v for k, v in (("c_kv", self.c_kv), ("k_pe", self.k_pe), ("index_k", self.index_k))
                  if v is not None}
        zeros = {k: jnp.zeros((pos.shape[0], stop, v.shape[-1]), v.dtype) for k, v in fields.items()}
        return self.write(pos, jnp.ones_like(pos, bool), **zeros)


ROW_ALIGN = 64  # cache rows are allocated in multiples of this: the Pallas kernels' TMA tiles need it


def new_layer_cache(cfg: ModelConfig, batch: int, max_len: int, has_indexer: bool, dtype) -> LayerCache:
    rows = -(-max_len // ROW_ALIGN) * ROW_ALIGN  # rows past max_len are never written (causal masks skip them)
    z = lambda d: jnp.zeros((batch, rows, d), dtype)  # noqa: E731
    return LayerCache(z(cfg.kv_lora_rank), z(cfg.qk_rope_head_dim), z(cfg.index_head_dim) if has_indexer else None)


@struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes.

    layers: main-model caches; mtp: one cache per draft depth k = 1..D (a shared MTP module still sees a
    different input at every depth); hidden [D, B, L, Dm]: h^{k} rows feeding depth k+1; tokens [B, L + D + 1]:
    real tokens up to `pending`, then the current drafts; draft_probs [B, D, V]: the drafts' sampling
    distributions (speculative sampling); pending [B]: position of the newest token.
    """

    layers: list
    mtp: list
    hidden: jax.Array
    tokens: jax.Array
    draft_probs: jax.Array
    pending: jax.Array


def new_state(cfg: ModelConfig, batch: int, max_len: int, depth: int, dtype) -> DecodeState:
    layers = [new_layer_cache(cfg, batch, max_len, t == "full", dtype) for t in cfg.layer_indexer_types]
    mtp = [new_layer_cache(cfg, batch, max_len, True, dtype) for _ in range(depth)]
    return DecodeState(
        layers=layers, mtp=mtp,
        hidden=jnp.zeros((depth, batch, max_len, cfg.hidden_size), dtype),
        tokens=jnp.zeros((batch, max_len + depth + 1), jnp.int32),
        draft_probs=jnp.zeros((batch, depth, cfg.vocab_size), jnp.float32),
        pending=jnp.zeros((batch,), jnp.int32))
