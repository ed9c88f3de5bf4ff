"""Optimiser: AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay to `min_lr_ratio * lr`,
global-norm gradient clipping, and no weight decay on vectors (norm scales, LayerNorm biases).

The router's correction bias is not in the optimised tree at all (it is a `RouterBias`, not an `nnx.Param`):
`glm_fast.train.step.update_router_bias` moves it by the expert load instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from glm_fast.config import TrainConfig


def lr_schedule(tcfg: TrainConfig):
    """step (0-based, the update being computed) -> learning rate.

    Warmup: lr * (step + 1) / warmup_steps, so the first update is not wasted at lr 0. Then a half cosine from
    lr at step = warmup_steps down to min_lr_ratio * lr at step = steps - 1, flat afterwards.
    """
    peak, floor = tcfg.lr, tcfg.lr * tcfg.min_lr_ratio
    warmup, total = tcfg.warmup_steps, tcfg.steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total - 1 - warmup, 1), 0.0, 1.0)
        decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def decay_mask(params):
    """True for the tensors AdamW decays: matrices and stacked expert weights (ndim >= 2), not norms/biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(lr_schedule, b1, b2, weight_decay on `decay_mask`).

    `grad_clip <= 0` turns clipping off.
    """
    clip = optax.clip_by_global_norm(tcfg.grad_clip) if tcfg.grad_clip > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(lr_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=1e-8,
                    weight_decay=tcfg.weight_decay, mask=decay_mask),
    )
