"""Decode engine: cached absorbed decode == training forward; speculative decoding is lossless (greedy) and
distribution-preserving (sampling); batch == per-sequence; rollback leaves no stale rows; clear errors."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glm_fast import Engine, Model, load_config
from glm_fast.engine import BackendError, GenerationError
from glm_fast.engine.cache import new_state
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import XLA


def _model(seed, **overrides):
    cfg = load_config("tiny", {"model.mtp_depth": 3, **overrides})
    return Model(cfg.model, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_cached_decode_logits_equal_training_forward(chunk):
    """Prefill in chunks of `chunk` rows then per-token steps: every position's logits match the full forward,
    including positions past index_topk (DSA selects from the cache). float32 tolerance 2e-4 of max |logit|."""
    model = _model(0)
    s = 3 * model.cfg.index_topk
    tokens = jax.random.randint(jax.random.key(1), (2, s), 0, model.cfg.vocab_size)
    expected, _ = model(tokens)
    state = new_state(model.cfg, 2, s + 8, 0, jnp.float32)
    caches, got = state.layers, []
    for start in range(0, s, chunk):
        t = min(chunk, s - start)
        pos = jnp.broadcast_to(start + jnp.arange(t), (2, t))
        logits, _, caches = main_cached(model, caches, tokens[:, start:start + t], pos, jnp.ones_like(pos, bool), XLA)
        got.append(logits)
    got = jnp.concatenate(got, axis=1)
    assert np.isfinite(np.asarray(got)).all()
    err = float(jnp.abs(got - expected).max() / jnp.abs(expected).max())
    assert err < 2e-4, err


def _tiny_vocab_model(seed):
    # A 16-token vocabulary makes random drafts agree with the main model often enough to exercise acceptance.
    return _model(seed, **{"model.vocab_size": 16})


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_speculative_is_identical_to_plain_greedy(seed):
    model = _tiny_vocab_model(seed)
    engine = Engine(model, max_len=192, prefill_chunk=16, compilation_cache=False)
    rng = np.random.RandomState(seed)
    prompt = list(rng.randint(0, 16, 5 + 13 * seed))
    plain = engine.generate(prompt, 64)
    assert len(plain.tokens) == 64
    for depth in (1, 2, 3):
        spec = engine.generate(prompt, 64, speculative_depth=depth)
        assert spec.tokens == plain.tokens, depth
        assert spec.stats["accepted_per_step"] > 1.0  # drafts were really accepted, not just rejected
        assert spec.stats["decode_steps"] < plain.stats["decode_steps"]


def test_batch_equals_per_sequence():
    model = _tiny_vocab_model(3)
    engine = Engine(model, max_len=128, prefill_chunk=8, compilation_cache=False)
    prompts = [[1, 2, 3], list(range(16)) + [4, 4]]
    for depth in (0, 2):
        batch = engine.generate(prompts, 24, speculative_depth=depth).tokens
        single = [engine.generate(p, 24, speculative_depth=depth).tokens for p in prompts]
        assert batch == single, depth


@pytest.mark.parametrize("depth", [0, 3])
def test_rollback_leaves_no_stale_rows(depth):
    """Every row below `pending` written, none past it: after rejected drafts (D = 3, rolled back) and in plain
    decoding (D = 0, which writes only the accepted row and skips the rollback)."""
    model = _tiny_vocab_model(4)
    engine = Engine(model, max_len=96, prefill_chunk=8, compilation_cache=False)
    out = engine.generate([[3, 1, 4, 1, 5], [9, 2, 6]], 30, speculative_depth=depth)
    if depth:
        assert out.stats["accepted_per_step"] < depth + 1.0  # some drafts were rejected and rolled back
    pending = np.asarray(out.state.pending)
    for cache in out.state.layers:
        for rows in (cache.c_kv, cache.k_pe) + ((cache.index_k,) if cache.index_k is not None else ()):
            rows = np.asarray(rows)
            for b, p in enumerate(pending):
                assert np.abs(rows[b, :p]).sum(-1).min() > 0   # every valid row written
                assert not rows[b, p:].any()                   # nothing past the accepted point


def _exact_marginals(model, prompt, steps, temperature):
    """Exact distribution of each of the first `steps` sampled tokens, by enumerating all prefixes."""
    v = model.cfg.vocab_size
    probs_prefix = {(): 1.0}
    marginals = []
    for _ in range(steps):
        prefixes = list(probs_prefix)
        seqs = jnp.asarray([prompt + list(p) for p in prefixes])
        logits, _ = model(seqs, mtp_depth=0)
        p_next = np.asarray(jax.nn.softmax(logits[:, -1].astype(jnp.float32) / temperature, -1), np.float64)
        marginal = np.zeros(v)
        new = {}
        for prefix, p_row in zip(prefixes, p_next):
            marginal += probs_prefix[prefix] * p_row
            for t in range(v):
                new[prefix + (t,)] = probs_prefix[prefix] * p_row[t]
        probs_prefix = new
        marginals.append(marginal)
    return marginals


def test_speculative_sampling_keeps_the_distribution():
    """Temperature-1 sampling with D = 2 drafts: the empirical law of each of the first 3 tokens over 1024 samples
    matches the exact main-model law (total variation < 0.08; sampling noise alone gives ~0.03-0.04 at n=1024)."""
    model = _model(5, **{"model.vocab_size": 8})
    engine = Engine(model, max_len=32, prefill_chunk=8, compilation_cache=False)
    prompt, n = [1, 5, 2, 7], 1024
    out = engine.generate([prompt] * n, 3, temperature=1.0, speculative_depth=2, seed=11)
    assert out.stats["accepted_per_step"] > 1.2  # drafts were accepted: the acceptance rule really ran
    samples = np.asarray(out.tokens)
    for step, exact in enumerate(_exact_marginals(model, prompt, 3, 1.0)):
        empirical = np.bincount(samples[:, step], minlength=8) / n
        tv = 0.5 * np.abs(empirical - exact).sum()
        assert tv < 0.08, (step, tv)


def test_top_p_restricts_support():
    model = _model(6, **{"model.vocab_size": 8})
    engine = Engine(model, max_len=32, compilation_cache=False)
    prompt = [3, 3, 3]
    logits, _ = model(jnp.asarray([prompt]), mtp_depth=0)
    best = int(jnp.argmax(logits[0, -1]))
    out = engine.generate([prompt] * 64, 1, temperature=1.0, top_p=1e-6, seed=3)
    assert {t[0] for t in out.tokens} == {best}


def test_stop_tokens_and_streaming():
    model = _tiny_vocab_model(7)
    engine = Engine(model, max_len=96, compilation_cache=False)
    full = engine.generate([1, 2, 3], 40).tokens
    stop = full[5]
    streamed = []
    out = engine.generate([1, 2, 3], 40, stop_tokens=[stop], callback=lambda i, toks: streamed.extend(toks))
    assert out.tokens == full[: full.index(stop) + 1] and streamed == out.tokens


def test_errors_are_clear():
    model = _model(0)
    engine = Engine(model, max_len=64, compilation_cache=False)
    with pytest.raises(GenerationError, match="needs .* positions > the context max_len=64"):
        engine.generate(list(range(60)), 10)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.generate([1, 10_000], 4)
    with pytest.raises(GenerationError, match="speculative_depth=5: this model has 3 MTP depths"):
        engine.generate([1, 2], 4, speculative_depth=5)
    with pytest.raises(GenerationError, match="empty prompt"):
        engine.generate([], 4)
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        Engine(model, backend="cuda")


def test_forced_logits_line_up_with_the_engines_greedy_steps():
    """`glm_fast.engine.forced`: fed the engine's own greedy tokens (past index_topk), row i of the teacher-forced
    logits is the step that chose token i -- its argmax is token i at every row (a row shifted by one would pick
    the next token instead) -- and a different token fed at step 3 changes rows 4.. only."""
    from glm_fast.engine.forced import forced_logits, stepper
    model = _model(4)
    prompt = np.random.RandomState(4).randint(0, model.cfg.vocab_size, 2 * model.cfg.index_topk).tolist()
    tokens = Engine(model, max_len=64, compilation_cache=False).generate(prompt, 10).tokens
    step = stepper(model, "xla", 1)
    logits = forced_logits(model, step, prompt, tokens, 64)
    assert logits.shape == (10, model.cfg.vocab_size) and np.isfinite(logits).all()
    assert logits.argmax(-1).tolist() == tokens
    other = tokens[:3] + [(tokens[3] + 1) % model.cfg.vocab_size] + tokens[4:]
    moved = forced_logits(model, step, prompt, other, 64)
    np.testing.assert_array_equal(moved[:4], logits[:4])
    assert np.abs(moved[4:] - logits[4:]).max() > 1e-3
    with pytest.raises(ValueError, match="exceed max_len"):
        forced_logits(model, step, prompt, tokens, len(prompt) + 5)
