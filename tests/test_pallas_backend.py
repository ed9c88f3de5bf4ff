"""`backend="pallas"`: the engine's decode step through the Pallas kernels gives the XLA backend's greedy tokens
and logits (the GPU end-to-end criteria also for the persistent kernel). CPU: a bf16 `tiny` variant on the kernels'
tile granularity (its first 2 layers: a dense and a MoE one, a full and a shared indexer), kernels in GPU interpret
mode, checking that every kernel really ran. GPU (`gpu` mark): `glm5_slice` with random weights: each kernel call
against its reference inside the jitted step, whole-step logits against a float32 step (bf16 XLA's own distance is
the bound), 256 greedy steps."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glm_fast import Engine, Model, load_config
from glm_fast.engine.forced import PERSISTENT, forced_logits, prefill, stepper
from glm_fast.engine.ops import PALLAS, XLA, checked
from pallas_kernels import gemv, indexer, mla_attention, moe
from tests.kernel_testing import TWO_LAYERS, float32_model

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
    b = tokens.shape[0]
    _, caches = prefill(model, tokens[:, :ctx], ctx + rows + 8)
    step, weights = stepper(model, ops, rows)
    logits, _ = step(weights, caches, tokens[:, ctx:ctx + rows], jnp.broadcast_to(ctx + jnp.arange(rows), (b, rows)))
    return np.asarray(logits, np.float32)


def _compare_logits(model, ctx: int, rows: int, tol: float):
    tokens = jax.random.randint(jax.random.key(ctx + rows), (1, ctx + rows), 0, model.cfg.vocab_size)
    want, got = (_step_logits(model, ops, tokens, ctx, rows) for ops in (XLA, PALLAS))
    assert np.isfinite(got).all() and np.isfinite(want).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"max |pallas - xla| / max |xla| = {err:.3g} >= {tol}"


def _assert_same_greedy(model, prompt, steps: int, tie: float):
    """The engines' greedy tokens with the xla and pallas backends are identical, except that they may part where
    XLA's own logits of the two tokens are within `tie` of max |logit| (the two backends' logits differ by up to
    that much): a bf16 model can round two candidates' logits equal, and then either choice is right."""
    max_len = len(prompt) + steps + 16
    kw = dict(max_len=max_len, prefill_chunk=256, compilation_cache=False)
    runs = {b: Engine(model, backend=b, **kw).generate(prompt, steps).tokens for b in ("xla", "pallas")}
    same = next((i for i, (a, b) in enumerate(zip(runs["xla"], runs["pallas"])) if a != b), steps)
    if same == steps:
        return
    logits = forced_logits(model, stepper(model, XLA, 1), prompt, runs["xla"][:same + 1], max_len)[same]
    a, b = runs["xla"][same], runs["pallas"][same]
    gap = abs(float(logits[a] - logits[b])) / float(np.abs(logits).max())
    assert gap <= tie, (f"first divergence at step {same} of {steps}: tokens {a} (xla) / {b} (pallas), XLA's logits "
                        f"of them {gap:.3g} of max |logit| apart (> {tie})")


TINY = {"model.dtype": "bfloat16", "model.moe_intermediate_size": 128}  # MoE kernel tiles: I % 128 == 0


def test_pallas_backend_matches_xla_in_interpret_mode(monkeypatch):
    """Greedy tokens identical over 6 steps past index_topk (or parting at a tie of XLA's logits), and every kernel
    ran (not the XLA fallback). bf16 logits within 2e-2 of max |logit| (the kernels round partial sums differently
    from XLA)."""
    calls = _counting(monkeypatch)
    model = Model(load_config("tiny", {**TINY, **TWO_LAYERS}).model, rngs=nnx.Rngs(0))
    prompt = list(np.random.RandomState(0).randint(0, model.cfg.vocab_size, 40))  # > 2 x index_topk
    _assert_same_greedy(model, prompt, 6, tie=2e-2)
    assert {name for _, name in KERNELS} <= set(calls), calls
    _compare_logits(model, ctx=40, rows=3, tol=2e-2)
    worst = _in_step_errors(model, ctx=40, rows=3)
    assert worst.pop("indexer_topk") == 0.0 and all(v < 2e-2 for v in worst.values()), worst


def _in_step_errors(model, ctx: int, rows: int) -> dict:
    """Every backend op's calls inside one jitted step, each against its reference on the same inputs:
    {op: worst error over calls and rows} (`ops.checked`)."""
    log = []
    tokens = jax.random.randint(jax.random.key(ctx + rows), (1, ctx + rows), 0, model.cfg.vocab_size)
    _step_logits(model, checked(PALLAS, log), tokens, ctx, rows)
    worst = {}
    for r in log:
        worst[r["op"]] = max(worst.get(r["op"], 0.0), *r["rel_err_per_row"])
    return worst


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_pallas_kernels_match_references_inside_the_glm5_slice_step(rows):
    """glm5_slice, random bf16 weights, 3000 cached tokens (past index_topk), a decode (T=1) or MTP verification
    (T=4) step: every kernel call within 2e-2 of its reference on the same in-step inputs (measured <= 4e-3),
    the indexer's top-k sets identical."""
    model = Model(load_config("glm5_slice").model, rngs=nnx.Rngs(0))
    worst = _in_step_errors(model, ctx=3000, rows=rows)
    assert set(worst) == {"indexer_topk", "sparse_mla_attention", "moe_experts", "lm_head"}, worst
    assert worst.pop("indexer_topk") == 0.0
    assert all(v < 2e-2 for v in worst.values()), worst


def _decode(model, ops, prompt, steps: int, forced=None) -> np.ndarray:
    """Prefill `prompt` [1, P] with XLA, then `steps` decode steps (T=1) through `ops`, each feeding the previous
    argmax, or forced[i] (teacher forcing) when given: the prefill's argmax, then each step's [1 + steps]."""
    n = prompt.shape[1]
    logits, caches = prefill(model, prompt, n + steps + 8)
    (step, weights), out = stepper(model, ops, 1), [int(logits[0, -1].argmax())]
    for i in range(steps):
        tok = out[-1] if forced is None else int(forced[i])
        logits, caches = step(weights, caches, jnp.full((1, 1), tok), jnp.full((1, 1), n + i))
        out.append(int(logits[0, 0].argmax()))
    return np.array(out)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [PALLAS, PERSISTENT], ids=["pallas", "persistent"])
def test_kernel_backend_is_as_close_to_float32_as_xla_on_glm5_slice(backend):
    """Whole-step logits against a float32 XLA step on the same weights: over the step's 4 token rows, the pallas
    backend (or the persistent kernel) is on average no further from float32 than the bf16 XLA backend (x1.25 +
    5e-3). Past index_topk, bf16 rounding flips DSA top-k rows and MoE experts downstream, so bf16 XLA itself sits
    up to ~34% of max |logit| from float32 (experiments/diagnose_backend.py); a direct pallas-vs-XLA bound at 2e-2
    would test that chaos, not the kernels (their own error is the test above). The mean, not every row: which
    rows a flip hits is chance -- the persistent kernel on the H200 was further than XLA on rows 0-1 (0.29, 0.30
    vs 0.19, 0.17) and nearer on rows 2-3 (0.07, 0.21 vs 0.27, 0.34;
    experiments/results/gpu_tests_h200_persistent_chunked.log)."""
    model = Model(load_config("glm5_slice").model, rngs=nnx.Rngs(0))
    ctx, rows = 3000, 4
    tokens = jax.random.randint(jax.random.key(1), (1, ctx + rows), 0, model.cfg.vocab_size)
    xla, pallas = (_step_logits(model, ops, tokens, ctx, rows)[0] for ops in (XLA, backend))
    model32 = float32_model(model)
    f32 = _step_logits(model32, XLA, tokens, ctx, rows)[0]
    assert np.isfinite(pallas).all() and np.isfinite(xla).all()
    err = lambda got: np.abs(got - f32).max(-1) / np.abs(f32).max(-1)  # noqa: E731  per row
    assert err(pallas).mean() <= 1.25 * err(xla).mean() + 5e-3, (err(pallas), err(xla))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [PALLAS, PERSISTENT], ids=["pallas", "persistent"])
@pytest.mark.parametrize("prompt_len", [1000, 2500])
def test_kernel_backend_greedy_tracks_xla_on_glm5_slice(prompt_len, backend):
    """glm5_slice, random bf16 weights, 256 greedy steps after a 1000-token (DSA selects every row) or 2500-token
    (past index_topk) prompt. XLA's greedy tokens are fed to both backends (teacher forcing); the pallas
    backend's (or the persistent kernel's) argmax must agree with XLA's as often as a float32 XLA step's does, up
    to two standard errors of the difference of two agreement rates over 256 steps (sqrt(2 p (1 - p) / 256),
    p the float32 rate: 6-8 points). The rates are that noisy: XLA's own free-running tokens differ between runs
    on the GPU, and the float32 rate after the 2500-token prompt was 67.6% in one run and 60.9% in another of the
    same code, while the persistent kernel's was 64.5% and 67.2% (experiments/results/
    gpu_tests_h200_persistent_greedy2500.log, ..._persistent_chunked_greedy.log). The rates themselves are 84-90%
    after the 1000-token prompt and 60-68% after the 2500-token one: rounding-level differences.

    Why not free-running identity: a random model's logits are nearly flat (max ~7, top-2 gap ~0.3 and often
    far less over 155K candidates), and bf16 rounding alone moves a logit by ~0.4%, so any two bf16
    implementations with different summation orders part ways within a few steps (measured: step 5 after the
    1000-token prompt); the discrete DSA top-k and MoE routing then amplify it (see the float32 test)."""
    model = Model(load_config("glm5_slice").model, rngs=nnx.Rngs(0))
    prompt = jnp.asarray(np.random.RandomState(prompt_len).randint(0, model.cfg.vocab_size, (1, prompt_len)))
    want = _decode(model, XLA, prompt, 256)  # XLA's free-running greedy tokens
    model32 = float32_model(model)
    label = PERSISTENT if backend == PERSISTENT else "pallas"
    agree = {name: float((_decode(m, ops, prompt, 256, forced=want)[1:] == want[1:]).mean())
             for name, m, ops in [(label, model, backend), ("float32", model32, XLA)]}
    p = agree["float32"]
    margin = 2 * np.sqrt(2 * p * (1 - p) / 256)
    print(f"teacher-forced argmax agreement with XLA bf16, prompt {prompt_len}: {agree}, margin {margin:.3f}")
    assert agree[label] >= p - margin, (agree, margin)
