"""Shared test set-up: GPU tests skip with a reason on machines without a CUDA device."""
import os

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("GLM_FAST_TEST_PLATFORMS", "cpu"))

import jax  # noqa: E402  (platform must be chosen before jax initialises)
import pytest  # noqa: E402


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
