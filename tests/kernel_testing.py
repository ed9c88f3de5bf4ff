"""Helpers shared by the kernel test files: per-case random keys, the interpret/GPU runner base class, and
lowering the kernels for the H200."""
import inspect
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels.persistent.kernel import kernel_chars


def case_key(*parts):
    """A fresh PRNG key per test case, stable across runs and xdist workers."""
    return jax.random.key(zlib.crc32(repr(parts).encode()))


def lowered_for_h200(fn, *args):
    """Lowers `fn` for CUDA on any host (abstract H200 mesh), checks a Mosaic GPU kernel is in it and returns the
    jax Lowered."""
    with _compat.interpret_mesh("NVIDIA H200", 132):
        traced = jax.jit(fn).trace(*args)
        if "lowering_platforms" not in inspect.signature(traced.lower).parameters:  # the hook moved: not an error
            pytest.skip("cannot lower for CUDA on this jax: Traced.lower has no lowering_platforms")
        lowered = traced.lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    return lowered


def lower_for_h200(fn, *args) -> int:
    """`lowered_for_h200`, then the length of its Mosaic GPU custom call (the serialized kernel module: a measure
    of its code)."""
    return kernel_chars(lowered_for_h200(fn, *args))


class KernelRunner:
    """Base of the kernel test classes: `INTERPRET` picks Pallas GPU interpret mode (CPU) or the compiled kernel.

    On the GPU, `run` first frees a NaN-filled 256 MB block so the kernel's outputs land in NaN memory: an
    output element the kernel never writes stays NaN and fails the comparison."""
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _fresh_interpreter(self):
        if self.INTERPRET:
            _compat.reset_interpret_state()  # GPU interpret mode keeps process-wide state
        yield

    def run(self, fn, *args, **kwargs):
        if not self.INTERPRET:
            poison = jnp.full((64 * 1024 * 1024,), jnp.nan, jnp.float32).block_until_ready()
            del poison  # the next allocations reuse this NaN-filled memory
        return jax.block_until_ready(fn(*args, interpret=self.INTERPRET, **kwargs))


def assert_rel_close(out, want, tol_rel: float, tol_max: float, what: str = ""):
    """Every output finite (unwritten outputs are NaN-poisoned on the GPU), then the norm-relative error < tol_rel
    and max |error| / max |want| < tol_max."""
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert out.shape == want.shape, (out.shape, want.shape)
    bad = ~np.isfinite(out)
    assert not bad.any(), f"{bad.sum()} of {out.size} outputs non-finite (unwritten/poisoned or NaN)"
    rel = np.linalg.norm(out - want) / np.linalg.norm(want)
    mx = np.abs(out - want).max() / np.abs(want).max()
    assert rel < tol_rel and mx < tol_max, f"{what}relative error {rel:.3g} (< {tol_rel}), max {mx:.3g} (< {tol_max})"


def prefilled(model_or_cfg, seed: int, context: int, t: int):
    """(model, caches, tokens [1, T], pos [1, T]): a model (fresh random from `seed` when given a config), its
    per-layer caches after an XLA prefill of `context` random prompt tokens (batch 1), and the next step's T
    random tokens at positions context .. context + T - 1."""
    from flax import nnx

    from glm_fast import Model
    from glm_fast.engine.cache import new_state
    model = model_or_cfg if isinstance(model_or_cfg, Model) else Model(model_or_cfg, rngs=nnx.Rngs(seed))
    cfg = model.cfg
    tokens = jax.random.randint(case_key("prefilled", seed, context, t), (1, context + t), 0, cfg.vocab_size)
    pos = jnp.arange(context)[None]
    state = new_state(cfg, 1, context + 64, 0, model.dtype)
    _, _, caches = _jit_main_cached(model, state.layers, tokens[:, :context], pos)  # (op by op: ~5x the time)
    return model, caches, tokens[:, context:], context + jnp.arange(t)[None]


def at_context(caches, full: int, context: int, seed: int, t: int, vocab: int):
    """(caches, tokens [1, T], pos [1, T]) as after an XLA prefill of the first `context` of the `full` prompt
    tokens that gave `caches`, then T fresh random tokens: by causality the longer prefill's rows below `context`
    are the shorter one's (rows from there on cleared, as `new_state` leaves them); the cache length stays."""
    caches = [c.clear_from(jnp.array([context]), full - context) for c in caches]
    tokens = jax.random.randint(case_key("at_context", seed, context, t), (1, t), 0, vocab)
    return caches, tokens, context + jnp.arange(t)[None]


TWO_LAYERS = {"model.num_hidden_layers": 2, "model.indexer_types": ["full", "shared"]}  # tiny's first dense +
# first MoE layer, one full and one shared indexer: half the interpreted step


def _jit_main_cached(model, caches, tokens, pos):
    """The XLA backend's `main_cached` (every token valid) as one jitted program."""
    from flax import nnx

    from glm_fast.engine.forward import main_cached
    from glm_fast.engine.ops import XLA
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, c, x, q: main_cached(nnx.merge(graphdef, p), c, x, q, jnp.ones(q.shape, bool), XLA))(
        params, caches, tokens, pos)


def float32_model(model):
    """The same model with float32 weights (the rounding-free reference)."""
    from flax import nnx

    from glm_fast.model import to_float32
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, to_float32(params))


def _rel_rows(got, want):
    """Per leading-axis row: max |got - want| / max |want| (float32 numpy)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    axes = tuple(range(1, got.ndim))
    return np.abs(got - want).max(axes) / np.maximum(np.abs(want).max(axes), 1e-30)


def assert_step_matches_xla(model, caches, tokens, pos, logits, h, tol: float, new_caches=None):
    """A kernel decode step's logits [1, T, V], hidden state [1, T, D] (and updated caches) against the XLA
    backend's from the same state (tokens, pos [1, T]; every output finite).

    float32 models: within `tol` x max |XLA value| (caches: atol 1e-5). bf16 models: per token row (per written
    cache row), no further from a float32 XLA step than bf16 XLA itself is (x1.25 + tol). Past index_topk, bf16
    rounding flips DSA top-k rows and MoE experts, so bf16 XLA alone can sit tens of percent from float32
    (measured: 0.33 of max |logit| on tiny, T = 3, seed 0) and a direct kernel-vs-XLA bound would test that chaos.
    Cache rows the step did not write must equal the input's exactly."""
    from glm_fast.engine.forward import main_cached
    from glm_fast.engine.ops import XLA
    ok = jnp.ones(tokens.shape, bool)
    # float32: one jitted program; bf16 op by op (its rounding after every op is the floor the bound scales)
    xla = (_jit_main_cached if model.dtype == jnp.float32 else
           lambda *a: main_cached(*a, ok, XLA))(model, caches, tokens, pos)
    got = (logits, h, new_caches)
    for x, what in zip(got[:2], ("logits", "hidden")):
        assert np.isfinite(np.asarray(x, np.float32)).all(), f"{what}: not finite"
    f32 = None
    if model.dtype != jnp.float32:
        from glm_fast.model import to_float32
        f32 = _jit_main_cached(float32_model(model), to_float32(caches), tokens, pos)

    def check(g, x, ref, what):
        if f32 is None:
            assert _rel_rows(g[None], x[None]).max() < tol, f"{what}: {_rel_rows(g[None], x[None]).max():.3g}"
            return
        mine, floor = _rel_rows(g, ref), _rel_rows(x, ref)
        assert (mine <= 1.25 * floor + tol).all(), f"{what}: vs float32 {mine}, bf16 XLA's {floor}"

    for i, what in ((0, "logits"), (1, "hidden")):
        check(np.asarray(got[i], np.float32)[0], np.asarray(xla[i], np.float32)[0],
              None if f32 is None else np.asarray(f32[i], np.float32)[0], what)
    if new_caches is None:
        return
    rows = np.asarray(pos[0])
    for layer, (g, x, before) in enumerate(zip(new_caches, xla[2], caches)):
        for field in ("c_kv", "k_pe", "index_k"):
            gv, xv, bv = (getattr(c, field) for c in (g, x, before))
            assert (gv is None) == (xv is None)
            if gv is None:
                continue
            gv, xv, bv = (np.asarray(v, np.float32)[0] for v in (gv, xv, bv))
            untouched = np.setdiff1d(np.arange(gv.shape[0]), rows)
            np.testing.assert_array_equal(gv[untouched], bv[untouched], err_msg=f"{layer} {field}")
            assert np.isfinite(gv[rows]).all() and np.abs(xv[rows]).max() > 0, f"{layer} {field}"
            if f32 is None:
                np.testing.assert_allclose(gv[rows], xv[rows], atol=1e-5, err_msg=f"{layer} {field}")
            else:
                ref = np.asarray(getattr(f32[2][layer], field), np.float32)[0, rows]
                check(gv[rows], xv[rows], ref, f"layer {layer} {field}")
