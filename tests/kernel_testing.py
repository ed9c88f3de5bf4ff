"""Helpers shared by the kernel test files: per-case random keys and lowering the kernels for the H200."""
import inspect
import zlib

import jax
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
