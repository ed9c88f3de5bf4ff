"""Training objective: next-token cross entropy plus DeepSeek-V3's multi-token-prediction loss (sec. 2.2,
eq. 24-25), L = L_main + lambda / D * sum_k L_MTP^k, and an optional sequence-wise balance loss (sec. 2.1.2,
eq. 17-20) summed over the MoE layers.

Alignment. A batch row holds S + 1 tokens t_0 .. t_S; the model reads t_0 .. t_{S-1}. Position i of the main
head predicts t_{i+1}; position i of MTP depth k (mtp_logits[k-1]) predicts t_{i+k+1}, which exists only for
i <= S - k - 1: the last k positions of depth k have no target and are masked (they also saw padding as their
"token k ahead", see `glm_fast.model.transformer`). Axis letters: K = depth (0 = main head), B, S, V.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def shifted_targets(tokens, depth: int):
    """tokens [B, S+1] int -> (targets [K, B, S] int32, valid [K, S] bool) for K = depth + 1 heads.

    targets[k, :, i] = tokens[:, i + k + 1] where that exists (valid), else 0 (masked).
    """
    b, s1 = tokens.shape
    s = s1 - 1
    padded = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, depth)))
    targets = jnp.stack([padded[:, k + 1: k + 1 + s] for k in range(depth + 1)])
    valid = jnp.arange(s)[None, :] < (s - jnp.arange(depth + 1))[:, None]
    return targets, valid


def _masked_ce(logits, targets, valid):
    """logits [B, S, V], targets [B, S], valid [S] -> (mean CE, accuracy) over valid rows, float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    w = jnp.broadcast_to(valid[None, :], targets.shape).astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    ce = jnp.sum((lse - picked) * w) / count
    acc = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * w) / count
    return ce, acc


def mtp_loss(logits, mtp_logits, tokens, mtp_lambda: float) -> tuple[Any, dict]:
    """Main + MTP cross entropy.

    Args:
      logits: [B, S, V] main-head logits for inputs tokens[:, :S].
      mtp_logits: [D, B, S, V]; mtp_logits[k-1, :, i] predicts tokens[:, i + k + 1].
      tokens: [B, S+1] the batch (inputs and targets).
      mtp_lambda: weight lambda of the MTP term, divided by D.

    Returns:
      (loss, metrics): scalar float32 L_main + lambda/D sum_k L_k; metrics has "main_loss", "main_acc"
      (scalars) and "mtp_loss", "mtp_acc" ([D] float32, index k-1 for depth k).
    """
    d = mtp_logits.shape[0]
    if logits.shape[:2] != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(f"logits {logits.shape} need tokens [B, S+1] = [{logits.shape[0]}, {logits.shape[1] + 1}]"
                         f", got {tokens.shape}: pass the whole batch (inputs plus the final target)")
    targets, valid = shifted_targets(tokens, d)
    main_loss, main_acc = _masked_ce(logits, targets[0], valid[0])
    per_depth = [_masked_ce(mtp_logits[k], targets[k + 1], valid[k + 1]) for k in range(d)]
    mtp_losses = jnp.stack([l for l, _ in per_depth]) if d else jnp.zeros((0,), jnp.float32)
    mtp_accs = jnp.stack([a for _, a in per_depth]) if d else jnp.zeros((0,), jnp.float32)
    loss = main_loss + (mtp_lambda / d) * mtp_losses.sum() if d else main_loss
    return loss, {"main_loss": main_loss, "main_acc": main_acc, "mtp_loss": mtp_losses, "mtp_acc": mtp_accs}


def moe_aux(aux: dict) -> list[dict]:
    """The MoE statistics of every routed layer, main layers first then MTP depths 1..D (model `aux` order)."""
    blocks = list(aux.get("layers", [])) + list(aux.get("mtp", []))
    return [b["moe"] for b in blocks if "moe" in b]


def balance_loss(aux: dict):
    """Sum over MoE layers (main and MTP blocks) of the sequence-wise balance loss (DeepSeek-V3 eq. 17)."""
    stats = moe_aux(aux)
    if not stats:
        return jnp.zeros((), jnp.float32)
    return sum(s["seq_aux_loss"] for s in stats).astype(jnp.float32)


def load_imbalance(aux: dict) -> dict:
    """Expert-load imbalance max_e(load_e) / mean_e(load_e) (1 = perfectly balanced): mean and max over routers."""
    stats = moe_aux(aux)
    if not stats:
        return {"load_imbalance": jnp.ones((), jnp.float32), "load_imbalance_max": jnp.ones((), jnp.float32)}
    ratios = jnp.stack([s["expert_load"].max() / jnp.maximum(s["expert_load"].mean(), 1e-9) for s in stats])
    return {"load_imbalance": ratios.mean(), "load_imbalance_max": ratios.max()}
