"""glm_fast: GLM-5 (MLA + DSA + MoE + MTP) in JAX/Flax with a fast batch-1 decode engine.

Public API: `load_config`, `Model`, `Engine`, `convert` (HF <-> ours), `accounting`.
"""
from glm_fast.config import Config, ConfigError, load_config
from glm_fast.engine import Engine
from glm_fast.model import Model

__all__ = ["Config", "ConfigError", "Engine", "Model", "load_config"]
