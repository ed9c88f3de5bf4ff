"""Shared test set-up: GPU tests skip with a reason on machines without a CUDA device."""
import os

_platforms = os.environ.get("GLM_FAST_TEST_PLATFORMS", "cpu")
# The first platform is the default backend; the CPU stays listed for host callbacks (`jax.debug.callback`).
os.environ.setdefault("JAX_PLATFORMS", _platforms if "cpu" in _platforms.split(",") else f"{_platforms},cpu")

import jax  # noqa: E402  (platform must be chosen before jax initialises)
import pytest  # noqa: E402


def pytest_configure(config):
    """One on-disk XLA compilation cache for the whole run (shared by xdist workers): identical programs
    compiled by several tests compile once."""
    cache = os.environ.get("GLM_FAST_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "glm_fast",
                                                                 "jax-tests"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `GLM_FAST_TEST_PLATFORMS=cuda pytest -m gpu` on the H200")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
