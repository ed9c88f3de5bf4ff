"""Decode engine: latent KV cache, absorbed MLA, DSA decode, MTP self-speculative decoding."""
from glm_fast.engine.engine import Engine, GenerateResult, GenerationError, enable_compilation_cache
from glm_fast.engine.ops import BACKENDS, BackendError, get_ops

__all__ = ["BACKENDS", "BackendError", "Engine", "GenerateResult", "GenerationError", "enable_compilation_cache",
           "get_ops"]
