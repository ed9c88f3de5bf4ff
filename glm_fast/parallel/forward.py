"""The cached forward pass (`glm_fast.engine.forward`) with device roles, inside `shard_map`.

Per layer, as one SPMD program (`Shard.run` = the role's devices only; arrows are collectives):
1. all: x = RMSNorm(h), q_resid = RMSNorm(W_qa x) (both the indexer and MLA need it).
2. index: indexer queries/keys, write the index key, top-k over the index-key cache;
   attention (meanwhile): its heads' q through W_qb and W_uk, c_kv/k_pe written to its latent cache.
3. -> broadcast top-k (index -> all); "shared" layers reuse the previous layer's top-k without a message.
4. attention: sparse MLA over the selected latent rows for its heads, W_uv, partial o_proj -> psum -> h.
5. MoE: index: router top-k; ffn (meanwhile): its slice of the shared expert -> broadcast (ids, weights);
   ffn: its local experts (`ops.moe_experts`, or `ops.moe_experts_fp8` on `fp8.Fp8Weight` stacks) -> psum -> h.
   Dense layers: ffn: its hidden slice -> psum.
The output head (`ops.lm_head`, norm fused) is split over the vocabulary on the ffn devices -> all_gather ->
logits on every device.
When a role is on every device (homogeneous), its steps run everywhere and its broadcasts vanish.

Caches are per role (`LayerCache` on each device): index keys are written on index devices only, latent
rows on attention devices only (every attention device keeps the whole latent: all heads read the same rows).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from glm_fast.engine.cache import LayerCache
from glm_fast.engine.ops import Ops
from glm_fast.model.layer import DecoderLayer
from glm_fast.model.rope import apply_rope
from glm_fast.model.transformer import Model
from glm_fast.parallel import fp8
from glm_fast.parallel.shard import Shard
from pallas_kernels import ref


def _heads(attn, q_resid, cos, sin):
    """This device's heads: q_resid [B, T, Q] -> q_lat [B, T, n, C] (W_uk folded in), q_pe [B, T, n, R]."""
    w_qb = attn.q_b_proj.kernel[...]                                         # [Q, n (H_n + R)]
    n = w_qb.shape[1] // (attn.nope + attn.rope)
    q = jnp.einsum("btq,qo->bto", q_resid, w_qb, preferred_element_type=jnp.float32).astype(q_resid.dtype)
    q = q.reshape(*q.shape[:2], n, attn.nope + attn.rope)
    w_uk = attn.kv_b_proj.kernel[...].reshape(attn.rank, n, -1)[..., : attn.nope]   # [C, n, H_n]
    q_lat = jnp.einsum("btnh,cnh->btnc", q[..., : attn.nope], w_uk,
                       preferred_element_type=jnp.float32).astype(q.dtype)
    return q_lat, apply_rope(q[..., attn.nope:], cos, sin)


def _attention_out(attn, o_lat):
    """This device's heads' latent output [B, T, n, C] -> W_uv -> partial o_proj [B, T, D] float32."""
    n = o_lat.shape[2]
    w_uv = attn.kv_b_proj.kernel[...].reshape(attn.rank, n, -1)[..., attn.nope:]    # [C, n, H_v]
    v = jnp.einsum("btnc,cnv->btnv", o_lat, w_uv, preferred_element_type=jnp.float32).astype(o_lat.dtype)
    return jnp.einsum("btk,kd->btd", v.reshape(*v.shape[:2], -1), attn.o_proj.kernel[...],
                      preferred_element_type=jnp.float32)


def _local_experts(sh: Shard, ids, weights, num_experts: int):
    """Global expert ids/weights [T, k] -> this device's slot ids and weights (zero for others' experts)."""
    split = sh.table.split("ffn", num_experts, "experts")
    owner, slot = (jnp.asarray(a) for a in split.owner_slot())
    mine = owner[ids] == sh.device
    return jnp.where(mine, slot[ids], 0), jnp.where(mine, weights, 0.0)


def layer_roles(layer: DecoderLayer, h, cos, sin, pos, ok, cache: LayerCache, prev_topk, ops: Ops, sh: Shard):
    """h [B, T, D] at positions pos [B, T] (ok [B, T]: real tokens) -> (h, topk, cache), as `layer_cached`."""
    x = layer.input_layernorm(h)
    attn = layer.self_attn
    q_resid = attn.q_a_layernorm(attn.q_a_proj(x))

    def queries():
        return (*_heads(attn, q_resid, cos, sin), *attn.latents(x, cos, sin))

    q_lat, q_pe, c_kv, k_pe = sh.run("attention", queries)
    cache = cache.write(pos, ok & sh.has("attention"), c_kv=c_kv, k_pe=k_pe)
    if layer.indexer is not None:
        idx = layer.indexer

        def index_inputs():
            return (*idx.queries(q_resid, x, cos, sin), idx.keys(x, cos, sin))

        q_idx, w_idx, keys = sh.run("index", index_inputs)
        cache = cache.write(pos, ok & sh.has("index"), index_k=keys)
        topk = sh.run("index", lambda k: ops.indexer_topk(q_idx, w_idx, k, pos, idx.scale, idx.k), cache.index_k)
        topk = sh.broadcast("index", topk, "top-k indices")
    else:
        topk = prev_topk

    def attend(c_kv, k_pe):
        o_lat = ops.sparse_mla_attention(q_lat, q_pe, c_kv, k_pe, *topk, attn.scale)
        return _attention_out(attn, o_lat)

    h = h + sh.psum(sh.run("attention", attend, cache.c_kv, cache.k_pe), "attention output").astype(h.dtype)
    x = layer.post_attention_layernorm(h)
    if layer.is_moe:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        moe = layer.mlp
        ids, weights = sh.broadcast("index", sh.run("index", lambda: moe.gate(flat)[:2]), "routing")
        shared = (sh.run("ffn", lambda: ref.swiglu(flat, *moe.shared_experts.weights()).astype(jnp.float32))
                  if moe.shared_experts is not None else 0.0)

        def experts():
            local_ids, local_weights = _local_experts(sh, ids, weights, moe.num_experts)
            stacks = [fp8.stored(w) for w in (moe.gate_proj, moe.up_proj, moe.down_proj)]
            moe_op = ops.moe_experts_fp8 if isinstance(stacks[0], fp8.Fp8Weight) else ops.moe_experts
            routed = moe_op(flat, local_ids, local_weights, *stacks)
            return routed.astype(jnp.float32) + shared

        y = sh.psum(sh.run("ffn", experts), "moe output").reshape(b, t, d)
    else:
        y = sh.psum(sh.run("ffn", lambda: layer.mlp(x).astype(jnp.float32)), "mlp output")
    return h + y.astype(h.dtype), topk, cache


def head_roles(model: Model, h, norm, ops: Ops, sh: Shard):
    """Final norm + output head (`ops.lm_head`) split over the vocabulary on the ffn devices:
    h [B, T, D] -> logits [B, T, V] on every device."""
    b, t, d = h.shape
    flat = h.reshape(b * t, d)
    if model.lm_head is None:  # tied to the (replicated) embedding: every device computes the whole head
        return ops.lm_head(flat, model.head_weight(), norm.weight[...], norm.eps).reshape(b, t, -1)
    local = sh.run("ffn", lambda: ops.lm_head(flat, model.lm_head.kernel[...], norm.weight[...], norm.eps))
    every = jnp.moveaxis(sh.all_gather(local, "logits"), 0, 1).reshape(b * t, -1)    # [BT, N_dev * v]
    order = sh.table.split("ffn", model.cfg.vocab_size, "vocab").gather_order()
    return jnp.take(every, jnp.asarray(order, np.int32), axis=-1).reshape(b, t, -1)


def main_roles(model: Model, caches: list, tokens, pos, ok, ops: Ops, sh: Shard):
    """`main_cached` with roles: tokens [B, T] at pos [B, T] -> (logits [B, T, V], h [B, T, D], caches)."""
    cos, sin = model.rope(pos)
    h, topk, out = model.embed_tokens(tokens), None, []
    for layer, cache in zip(model.layers, caches):
        h, topk, cache = layer_roles(layer, h, cos, sin, pos, ok, cache, topk, ops, sh)
        out.append(cache)
    return head_roles(model, h, model.norm, ops, sh), h, out


def mtp_roles(model: Model, depth: int, cache: LayerCache, h_prev, ahead_tokens, pos, ok, ops: Ops, sh: Shard):
    """`mtp_cached` with roles: MTP depth k on rows pos [B, W] -> (logits [B, W, V], h^k [B, W, D], cache)."""
    module = model.mtp_module(depth)
    cos, sin = model.rope(pos)
    x = module.combine(h_prev, model.embed_tokens(ahead_tokens))
    h, _, cache = layer_roles(module.block, x, cos, sin, pos, ok, cache, None, ops, sh)
    return head_roles(model, h, module.norm, ops, sh), h, cache
