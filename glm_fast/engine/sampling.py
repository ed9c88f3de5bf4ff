"""Sampling: greedy, temperature and top-p (nucleus, Holtzman et al. 2020), and the speculative-sampling
acceptance rule (Leviathan et al. 2023; Chen et al. 2023) that keeps the target distribution exact."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_probs(logits, temperature: float, top_p: float):
    """logits [..., V] -> the sampling distribution [..., V] float32 after temperature and top-p."""
    probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    if top_p >= 1.0:
        return probs
    sorted_p = -jnp.sort(-probs, axis=-1)
    keep = jnp.cumsum(sorted_p, axis=-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    threshold = jnp.min(jnp.where(keep, sorted_p, jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(probs >= threshold, probs, 0.0)
    return probs / probs.sum(-1, keepdims=True)


def sample(key, probs):
    """One token per row of probs [..., V] -> int32 [...]."""
    return jax.random.categorical(key, jnp.log(probs)).astype(jnp.int32)


def accept_greedy(drafts, target_tokens):
    """drafts [B, D], target argmax tokens [B, D+1] -> accepted count n [B] (longest matching prefix)."""
    match = drafts == target_tokens[:, :-1]
    return jnp.sum(jnp.cumprod(match, axis=-1), axis=-1).astype(jnp.int32)


def accept_sampled(key, drafts, draft_probs, target_probs):
    """Speculative sampling. drafts [B, D], draft_probs q [B, D, V], target_probs p [B, D+1, V] ->
    (n [B] accepted drafts, next token [B]): drafts accepted with prob min(1, p/q); at the first rejection the
    token is drawn from norm(max(0, p - q)), and after D acceptances from p's last row."""
    b, d = drafts.shape
    k_accept, k_resample = jax.random.split(key)
    p_d = jnp.take_along_axis(target_probs[:, :d], drafts[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], -1)[..., 0]
    u = jax.random.uniform(k_accept, (b, d))
    ok = u * q_d < p_d  # u < p/q without dividing by a zero q
    n = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1).astype(jnp.int32)
    p_n = jnp.take_along_axis(target_probs, n[:, None, None], 1)[:, 0]                      # [B, V]
    q_n = jnp.take_along_axis(jnp.pad(draft_probs, ((0, 0), (0, 1), (0, 0))), n[:, None, None], 1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)  # q row D is zero padding: after D acceptances this is p itself
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_n)
    return n, sample(k_resample, residual / residual.sum(-1, keepdims=True))
