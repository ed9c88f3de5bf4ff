"""Cached forward passes in the absorbed-MLA form: T new tokens per sequence against the latent cache.

One code path serves prefill (chunks of the prompt), plain decode (T = 1), MTP verification (T = 1 + D) and
the MTP drafting blocks. Per layer: write this token's c_kv/k_pe/index key, pick top-k rows with the lightning
indexer (or reuse the previous layer's on "shared" layers), attend over those latent rows only with W_uk folded
into the query and W_uv applied after, then the dense MLP or the selected experts only.
"""
from __future__ import annotations

from glm_fast.engine.cache import LayerCache
from glm_fast.engine.ops import Ops
from glm_fast.model.layer import DecoderLayer
from glm_fast.model.transformer import Model


def layer_cached(layer: DecoderLayer, h, cos, sin, pos, ok, cache: LayerCache, prev_topk, ops: Ops):
    """h [B, T, D] at positions pos [B, T] (ok [B, T]: real tokens) -> (h, topk, cache)."""
    x = layer.input_layernorm(h)
    attn = layer.self_attn
    q_nope, q_pe, q_resid = attn.queries(x, cos, sin)
    c_kv, k_pe = attn.latents(x, cos, sin)
    if layer.indexer is not None:
        q_idx, w_idx = layer.indexer.queries(q_resid, x, cos, sin)
        cache = cache.write(pos, ok, c_kv=c_kv, k_pe=k_pe, index_k=layer.indexer.keys(x, cos, sin))
        topk = ops.indexer_topk(q_idx, w_idx, cache.index_k, pos, layer.indexer.scale, layer.indexer.k)
    else:
        cache = cache.write(pos, ok, c_kv=c_kv, k_pe=k_pe)
        topk = prev_topk
    o_lat = ops.sparse_mla_attention(attn.absorb_query(q_nope), q_pe, cache.c_kv, cache.k_pe, *topk, attn.scale)
    h = h + attn.latent_output(o_lat)
    x = layer.post_attention_layernorm(h)
    if layer.is_moe:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        ids, weights, _ = layer.mlp.gate(flat)
        y = ops.moe_experts(flat, ids, weights, *layer.mlp.expert_weights()).reshape(b, t, d)
    else:
        y = layer.mlp(x)
    return h + y, topk, cache


def main_cached(model: Model, caches: list, tokens, pos, ok, ops: Ops):
    """Main model on tokens [B, T] at pos [B, T] -> (logits [B, T, V], h [B, T, D] before the final norm, caches)."""
    cos, sin = model.rope(pos)
    h, topk, out = model.embed_tokens(tokens), None, []
    for layer, cache in zip(model.layers, caches):
        h, topk, cache = layer_cached(layer, h, cos, sin, pos, ok, cache, topk, ops)
        out.append(cache)
    return head_cached(model, h, model.norm, ops), h, out


def head_cached(model: Model, h, norm, ops: Ops):
    """Final norm + LM head through the op table: h [B, T, D] -> logits [B, T, V]."""
    b, t, d = h.shape
    logits = ops.lm_head(h.reshape(b * t, d), model.head_weight(), norm.weight[...], norm.eps)
    return logits.reshape(b, t, -1)


def mtp_cached(model: Model, depth: int, cache: LayerCache, h_prev, ahead_tokens, pos, ok, ops: Ops):
    """MTP depth k on rows pos [B, W]: h^{k-1} rows [B, W, D] and tokens k ahead [B, W] ->
    (logits [B, W, V], h^k [B, W, D], cache)."""
    module = model.mtp_module(depth)
    cos, sin = model.rope(pos)
    x = module.combine(h_prev, model.embed_tokens(ahead_tokens))
    h, _, cache = layer_cached(module.block, x, cos, sin, pos, ok, cache, None, ops)
    return head_cached(model, h, module.norm, ops), h, cache
