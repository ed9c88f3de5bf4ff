"""`backend="pallas"`: the engine's decode step through the Pallas kernels gives the XLA backend's greedy tokens
and logits. CPU: a bf16 `tiny` variant on the kernels' tile granularity, kernels in GPU interpret mode, checking
that every kernel really ran. GPU (`gpu` mark): `glm5_slice` with random weights, 256 greedy steps."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glm_fast import Engine, Model, load_config
from glm_fast.engine.cache import new_state
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import PALLAS, XLA
from pallas_kernels import gemv, indexer, mla_attention, moe

# The kernels each backend op should reach at decode shapes (module, function name).
KERNELS = [(indexer, "indexer_topk"), (mla_attention, "sparse_mla_attention"), (moe, "moe_experts"),
           (gemv, "gemv")]


def _counting(monkeypatch):
    """Wrap each kernel entry point with a trace-time call counter."""
    calls = {}
    for module, name in KERNELS:
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def _step_logits(model, ops, tokens, ctx: int, rows: int):
    """Prefill `ctx` prompt tokens with XLA, then `rows` new tokens through `ops`: logits [B, rows, V] f32."""
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, caches, tok, pos, o: main_cached(nnx.merge(graphdef, p), caches, tok, pos,
                                                              jnp.ones_like(pos, bool), o), static_argnums=(4,))
    b = tokens.shape[0]
    state = new_state(model.cfg, b, ctx + rows + 8, 0, model.dtype)
    _, _, caches = run(params, state.layers, tokens[:, :ctx], jnp.broadcast_to(jnp.arange(ctx), (b, ctx)), XLA)
    pos = jnp.broadcast_to(ctx + jnp.arange(rows), (b, rows))
    logits, _, _ = run(params, caches, tokens[:, ctx:ctx + rows], pos, ops)
    return np.asarray(logits, np.float32)


def _compare_logits(model, ctx: int, rows: int, tol: float):
    tokens = jax.random.randint(jax.random.key(ctx + rows), (1, ctx + rows), 0, model.cfg.vocab_size)
    want, got = (_step_logits(model, ops, tokens, ctx, rows) for ops in (XLA, PALLAS))
    assert np.isfinite(got).all() and np.isfinite(want).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"max |pallas - xla| / max |xla| = {err:.3g} >= {tol}"


def _assert_same_greedy(model, prompt, steps: int):
    kw = dict(max_len=len(prompt) + steps + 16, prefill_chunk=256, compilation_cache=False)
    runs = {b: Engine(model, backend=b, **kw).generate(prompt, steps).tokens for b in ("xla", "pallas")}
    same = next((i for i, (a, b) in enumerate(zip(runs["xla"], runs["pallas"])) if a != b), steps)
    assert runs["xla"] == runs["pallas"], f"first divergence at step {same} of {steps}"


TINY = {"model.dtype": "bfloat16", "model.moe_intermediate_size": 128}  # MoE kernel tiles: I % 128 == 0


def test_pallas_backend_matches_xla_in_interpret_mode(monkeypatch):
    """Greedy tokens identical over 6 steps past index_topk, and every kernel ran (not the XLA fallback).
    bf16 logits within 2e-2 of max |logit| (the kernels round partial sums differently from XLA)."""
    calls = _counting(monkeypatch)
    model = Model(load_config("tiny", TINY).model, rngs=nnx.Rngs(0))
    prompt = list(np.random.RandomState(0).randint(0, model.cfg.vocab_size, 40))  # > 2 x index_topk
    _assert_same_greedy(model, prompt, 6)
    assert {name for _, name in KERNELS} <= set(calls), calls
    _compare_logits(model, ctx=40, rows=3, tol=2e-2)


@pytest.mark.gpu
def test_pallas_backend_matches_xla_on_glm5_slice():
    """glm5_slice, random bf16 weights, 4K-row cache: 256 greedy steps identical; decode (T=1) and MTP
    verification (T=4) logits within 2e-2 of max |logit|."""
    model = Model(load_config("glm5_slice").model, rngs=nnx.Rngs(0))
    for rows in (1, 4):
        _compare_logits(model, ctx=3000, rows=rows, tol=2e-2)
    prompt = list(np.random.RandomState(1).randint(0, model.cfg.vocab_size, 2500))
    _assert_same_greedy(model, prompt, 256)
