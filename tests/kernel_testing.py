"""Helpers shared by the kernel test files: per-case random keys, the interpret/GPU runner base class, and
lowering the kernels for the H200."""
import inspect
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat


def case_key(*parts):
    """A fresh PRNG key per test case, stable across runs and xdist workers."""
    return jax.random.key(zlib.crc32(repr(parts).encode()))


def lower_for_h200(fn, *args):
    """Lowers `fn` for CUDA on any host (abstract H200 mesh) and checks a Mosaic GPU kernel is in it."""
    with _compat.interpret_mesh("NVIDIA H200", 132):
        traced = jax.jit(fn).trace(*args)
        if "lowering_platforms" not in inspect.signature(traced.lower).parameters:  # the hook moved: not an error
            pytest.skip("cannot lower for CUDA on this jax: Traced.lower has no lowering_platforms")
        lowered = traced.lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


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
    from glm_fast.engine.forward import main_cached
    from glm_fast.engine.ops import XLA
    model = model_or_cfg if isinstance(model_or_cfg, Model) else Model(model_or_cfg, rngs=nnx.Rngs(seed))
    cfg = model.cfg
    tokens = jax.random.randint(case_key("prefilled", seed, context, t), (1, context + t), 0, cfg.vocab_size)
    pos = jnp.arange(context)[None]
    state = new_state(cfg, 1, context + 64, 0, model.dtype)
    _, _, caches = main_cached(model, state.layers, tokens[:, :context], pos, jnp.ones_like(pos, bool), XLA)
    return model, caches, tokens[:, context:], context + jnp.arange(t)[None]


def assert_step_close(logits, h, expected, expected_h, tol: float):
    """A decode step's logits and last hidden state vs the reference's: finite, and max |error| below `tol` times
    the reference's max |value| (which must be nonzero)."""
    for got, want, what in ((logits, expected, "logits"), (h, expected_h, "hidden")):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all(), f"{what}: not finite"
        scale = float(np.abs(want).max())
        assert scale > 0, f"{what}: all-zero reference"
        err = float(np.abs(got - want).max()) / scale
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"
