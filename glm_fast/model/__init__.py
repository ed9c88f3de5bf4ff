"""The GLM-5 model in flax.nnx, one concept per module (see each module's docstring for its paper section)."""
from glm_fast.model.transformer import DTYPES, Model, to_float32

__all__ = ["DTYPES", "Model", "to_float32"]
