"""glm_fast: a JAX/Flax/Pallas research reimplementation of GLM-5's fast batch-1 decode stack."""
from setuptools import find_packages, setup

setup(
    name="glm_fast",
    version="0.1.0",
    description="GLM-5 (MLA + DSA + MoE + MTP) in Flax nnx with a fast decode engine and Pallas GPU kernels",
    packages=find_packages(include=["glm_fast", "glm_fast.*", "pallas_kernels", "pallas_kernels.*"]),
    package_data={"glm_fast": ["assets/*", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12",
        "optax",
        "numpy",
        "orbax-checkpoint",
        "pyyaml",
        "grain",
        "tokenizers",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "flatbuffers",  # jax.export serialization: the persistent kernel's lowered-step cache
    ],
    extras_require={
        # Reference implementations for parity tests only: HF's GlmMoeDsaForCausalLM (CPU torch).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers>=5.2"],
    },
    entry_points={"console_scripts": ["glm-fast=glm_fast.cli:main"]},
)
