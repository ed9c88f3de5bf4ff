"""Teacher-forced decoding through any backend: the per-step logits a backend gives when fed given tokens.

Free-running greedy runs of two bf16 implementations part at the first near-tie and then compare different texts;
fed the same tokens (XLA's greedy ones, say) every backend's step logits stay comparable at every step: argmax
agreement and distance from a float32 model (tests/test_pallas_backend.py, experiments/persistent_trained.py).
The prompt is prefilled with XLA into fresh caches; then one jitted decode step per token (T = 1) through the
backend's op table, or through the persistent kernel (`pallas_kernels.persistent`, batch 1; GPU interpret mode
off the GPU). Weights go in as arguments, never as captured constants (glm5_slice's are 19 GB).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_fast.engine.cache import new_state
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import XLA, Ops, get_ops

PERSISTENT = "persistent"  # the one-launch kernel, in place of an Ops table


@functools.lru_cache(maxsize=8)
def cached_forward(graphdef, ops: Ops):
    """Jitted cached forward of the model `graphdef` through `ops`: (params, caches, tokens [B, T], pos [B, T])
    -> (logits [B, T, V], caches). One jitted function per (graphdef, ops): prefills of every prompt and backend
    share its compilations."""
    return jax.jit(lambda p, caches, tok, pos: main_cached(nnx.merge(graphdef, p), caches, tok, pos,
                                                            jnp.ones_like(pos, bool), ops)[::2])


def stepper(model, ops, rows: int, cache_dir=False):
    """(step, weights): the jitted cached step(weights, caches, tokens [B, rows], pos [B, rows]) -> (logits
    [B, rows, V], caches) through `ops` (an Ops table or a backend name), or PERSISTENT's kernel (cache_dir: its
    schedule and lowered-step caches, `PersistentDecoder`'s; False: none)."""
    if ops == PERSISTENT:
        from pallas_kernels.persistent.kernel import PersistentDecoder
        dec = PersistentDecoder(model, interpret=jax.default_backend() != "gpu", cache_dir=cache_dir)
        step = jax.jit(lambda w, caches, tok, pos: dec(model, w, caches, tok, pos, jnp.ones_like(pos, bool))[::2])
        return step, dec.weights(rows)
    graphdef, params = nnx.split(model)
    return cached_forward(graphdef, get_ops(ops) if isinstance(ops, str) else ops), params


def prefill(model, tokens, max_len: int):
    """XLA prefill of tokens [B, P] into fresh caches of `max_len` rows: (logits [B, P, V], caches)."""
    graphdef, params = nnx.split(model)
    b, n = tokens.shape
    state = new_state(model.cfg, b, max_len, 0, model.dtype)
    return cached_forward(graphdef, XLA)(params, state.layers, tokens, jnp.broadcast_to(jnp.arange(n), (b, n)))


def forced_logits(model, step, prompt, tokens, max_len: int) -> np.ndarray:
    """Logits [n, V] (float32) of the n steps that chose `tokens` after `prompt` (lists of ids): row 0 from the
    XLA prefill, row i from the decode step fed tokens[i - 1] at position len(prompt) + i - 1. step: `stepper`'s
    (step, weights) at rows = 1; max_len: the caches' rows (one for every prompt: one compiled step)."""
    p, n = len(prompt), len(tokens)
    if p + n > max_len:
        raise ValueError(f"forced_logits: {p} prompt + {n} tokens exceed max_len={max_len}")
    logits, caches = prefill(model, jnp.asarray([prompt], jnp.int32), max_len)
    step, weights = step
    out = [np.asarray(logits[0, -1], np.float32)]
    for i, tok in enumerate(tokens[:-1]):
        logits, caches = step(weights, caches, jnp.full((1, 1), tok, jnp.int32), jnp.full((1, 1), p + i, jnp.int32))
        out.append(np.asarray(logits[0, 0], np.float32))
    return np.stack(out)
