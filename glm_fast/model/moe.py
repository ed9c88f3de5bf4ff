"""DeepSeek-V3 MoE (sec. 2.1.2) as HF's `GlmMoeDsaMoE`: sigmoid router with a selection-only correction bias
("noaux_tc"), group-limited top-k, normalised weights scaled by `routed_scaling_factor`, SwiGLU experts, and
one always-on shared expert.

The correction bias is not a gradient-trained parameter: DeepSeek-V3's auxiliary-loss-free balancing nudges it
after each step by the expert load (`glm_fast.train`), so it lives in its own `RouterBias` variable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_fast.config import ModelConfig
from glm_fast.model.mlp import MLP


class RouterBias(nnx.Variable):
    """Selection-only expert bias (float32), updated outside the optimiser."""


class Router(nnx.Module):
    """x [T, D] -> expert ids [T, k], combine weights [T, k] (float32), sigmoid scores [T, E]."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        e = cfg.n_routed_experts
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nnx.Param((cfg.initializer_range * jax.random.normal(rngs.params(), (cfg.hidden_size, e)))
                                .astype(dtype))
        self.e_score_correction_bias = RouterBias(jnp.zeros((e,), jnp.float32))

    def __call__(self, x):
        scores = jax.nn.sigmoid(jnp.einsum("td,de->te", x.astype(jnp.float32),
                                           self.weight[...].astype(jnp.float32)))
        choice = scores + self.e_score_correction_bias[...]
        t, e = choice.shape
        groups = choice.reshape(t, self.n_group, e // self.n_group)
        group_scores = jax.lax.top_k(groups, 2)[0].sum(-1)  # [T, G]: sum of each group's best two
        _, keep = jax.lax.top_k(group_scores, self.topk_group)
        group_mask = jnp.zeros((t, self.n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // self.n_group, axis=1), choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, self.top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return ids.astype(jnp.int32), weights * self.scaling, scores


class MoE(nnx.Module):
    """Routed experts (stacked [E, ...]) plus shared expert. Training computes all experts densely and
    combines the chosen ones; decode (`pallas_kernels.ref.moe_experts` or its kernel) touches only those."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, i, e, std = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.initializer_range
        self.num_experts, self.top_k = e, cfg.num_experts_per_tok
        self.gate = Router(cfg, dtype, rngs)
        init = lambda shape: nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype))  # noqa: E731
        self.gate_proj, self.up_proj, self.down_proj = init((e, d, i)), init((e, d, i)), init((e, i, d))
        self.shared_experts = (MLP(d, i * cfg.n_shared_experts, dtype, std, rngs)
                               if cfg.n_shared_experts else None)

    def __call__(self, x):
        """x [B, S, D] -> (y [B, S, D], stats) with stats for load balancing (expert load, sequence aux loss)."""
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        ids, weights, scores = self.gate(flat)
        combine = jnp.zeros((b * s, self.num_experts), jnp.float32).at[
            jnp.arange(b * s)[:, None], ids].add(weights)  # [T, E]
        g = jnp.einsum("td,edi->tei", flat, self.gate_proj[...], preferred_element_type=jnp.float32)
        u = jnp.einsum("td,edi->tei", flat, self.up_proj[...], preferred_element_type=jnp.float32)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        y = jnp.einsum("tei,eid,te->td", h, self.down_proj[...], combine.astype(x.dtype),
                       preferred_element_type=jnp.float32)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat).astype(jnp.float32)
        return y.astype(x.dtype).reshape(b, s, d), self._stats(ids, scores, b, s)

    def _stats(self, ids, scores, b, s):
        """Expert load (fraction of routed slots, [E]) and DeepSeek-V3's sequence-wise balance loss (eq. 17-20)."""
        hits = jnp.zeros((b * s, self.num_experts), jnp.float32).at[jnp.arange(b * s)[:, None], ids].add(1.0)
        load = hits.mean(0) / self.top_k
        f = hits.reshape(b, s, -1).mean(1) * self.num_experts / self.top_k            # [B, E]
        p = (scores / scores.sum(-1, keepdims=True)).reshape(b, s, -1).mean(1)        # [B, E]
        return {"expert_load": load, "seq_aux_loss": jnp.mean(jnp.sum(f * p, -1))}

    def expert_weights(self):
        """(w_gate [E, D, I], w_up [E, D, I], w_down [E, I, D], shared (gate, up, down) or None) for decode ops."""
        shared = self.shared_experts.weights() if self.shared_experts is not None else None
        return self.gate_proj[...], self.up_proj[...], self.down_proj[...], shared
