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
