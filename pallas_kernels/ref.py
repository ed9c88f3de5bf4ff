"""Pure-jnp references of every decode kernel, with the kernels' exact signatures.

They are the ground truth of the kernel tests and the op set of the engine's `xla` backend, so a Pallas
backend is a drop-in replacement of these functions. Axis legend: B batch, T query tokens (1 + MTP drafts),
S cached tokens, K top-k rows, N heads, H head dim, C latent rank (kv_lora_rank), R rope dim, D model dim,
I expert hidden dim, E experts, k experts per token. Accumulation is float32; outputs take the input dtype
unless stated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def rmsnorm(x, weight, eps: float):
    """RMSNorm as HF: normalise in float32, cast back to x.dtype, then scale. x [..., D], weight [D]."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def gemv(x, w, norm_weight=None, eps: float = 1e-6):
    """y [T, N] = rmsnorm?(x) [T, K] @ w [K, N]; the norm is fused when `norm_weight` [K] is given."""
    if norm_weight is not None:
        x = rmsnorm(x, norm_weight, eps)
    return jnp.einsum("tk,kn->tn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def indexer_scores(q, head_w, keys, q_pos, scale: float):
    """DSA lightning-indexer scores (DeepSeek-V3.2), causal.

    q [B, T, N, H] (RoPE applied), head_w [B, T, N] (already scaled by N**-0.5), keys [B, S, H],
    q_pos [B, T] int32 position of each query. score[b,t,s] = sum_n head_w * relu(scale * q . k_s) for
    s <= q_pos[b, t], else -inf. Returns float32 [B, T, S].
    """
    dots = jnp.einsum("btnh,bsh->btns", q.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    scores = jnp.einsum("btn,btns->bts", head_w.astype(jnp.float32), jax.nn.relu(dots))
    visible = jnp.arange(keys.shape[1])[None, None, :] <= q_pos[:, :, None]
    return jnp.where(visible, scores, NEG_INF)


def indexer_topk(q, head_w, keys, q_pos, scale: float, k: int):
    """Top-k rows of `indexer_scores` per query: (idx int32 [B, T, K], valid bool [B, T, K]), K = min(k, S).

    `valid` is False where fewer than K keys are visible (those slots hold masked rows); the set of valid
    indices equals `jax.lax.top_k`'s.
    """
    return select_topk(indexer_scores(q, head_w, keys, q_pos, scale), k)


def select_topk(scores, k: int):
    """Exact top-k of masked scores [B, T, S] -> (idx int32 [B, T, K], valid bool [B, T, K]), K = min(k, S)."""
    top, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return idx.astype(jnp.int32), top > NEG_INF


def sparse_mla_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, scale: float):
    """Absorbed MLA decode attention over selected latent rows (DeepSeek-V2 weight absorption).

    q_lat [B, T, N, C] = q_nope folded through W_uk; q_pe [B, T, N, R]; c_kv [B, S, C], k_pe [B, S, R] the
    latent cache; idx/valid [B, T, K] from `indexer_topk`. Softmax in float32 over the valid rows; returns the
    latent-space output [B, T, N, C] (W_uv is applied by the caller) in q_lat's dtype.
    """
    gather = jax.vmap(lambda rows, i: rows[i])  # per batch: [S, X], [T, K] -> [T, K, X]
    kv = gather(c_kv, idx).astype(jnp.float32)  # [B, T, K, C]
    pe = gather(k_pe, idx).astype(jnp.float32)  # [B, T, K, R]
    logits = (jnp.einsum("btnc,btkc->btnk", q_lat.astype(jnp.float32), kv)
              + jnp.einsum("btnr,btkr->btnk", q_pe.astype(jnp.float32), pe)) * scale
    logits = jnp.where(valid[:, :, None, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("btnk,btkc->btnc", probs, kv).astype(q_lat.dtype)


def swiglu(x, w_gate, w_up, w_down):
    """SwiGLU MLP: x [T, D], w_gate/w_up [D, I], w_down [I, D] -> [T, D] (float32 accumulation)."""
    g = jnp.einsum("td,di->ti", x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.einsum("td,di->ti", x, w_up, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    return jnp.einsum("ti,id->td", h, w_down, preferred_element_type=jnp.float32).astype(x.dtype)


def moe_experts(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None):
    """Routed experts for T tokens plus the shared expert (DeepSeek-V3 MoE), computing only chosen experts.

    x [T, D]; expert_ids int32 [T, k]; expert_weights float32 [T, k] (normalised and scaled by the router);
    w_gate/w_up [E, D, I], w_down [E, I, D]; shared = (gate [D, Is], up [D, Is], down [Is, D]) or None.
    Each distinct chosen expert's weights are gathered once (U = min(E, T*k) slots; unused slots hold -1 and
    get zero combine weight), and every token runs through the U gathered experts. Returns [T, D] in x.dtype.
    """
    t, k = expert_ids.shape
    uniq = jnp.unique(expert_ids.reshape(-1), size=min(w_gate.shape[0], t * k), fill_value=-1)  # [U]
    combine = jnp.einsum("tk,tku->tu", expert_weights.astype(jnp.float32),
                         (expert_ids[:, :, None] == uniq[None, None, :]).astype(jnp.float32))  # [T, U]
    g = jnp.einsum("td,udi->tui", x, w_gate[uniq], preferred_element_type=jnp.float32)
    u = jnp.einsum("td,udi->tui", x, w_up[uniq], preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jnp.einsum("tui,uid,tu->td", h, w_down[uniq], combine.astype(x.dtype), preferred_element_type=jnp.float32)
    if shared is not None:
        y = y + swiglu(x, *shared).astype(jnp.float32)
    return y.astype(x.dtype)
