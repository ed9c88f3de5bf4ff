"""Dense SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)); GLM-5's dense layers and shared expert."""
from __future__ import annotations

import jax
from flax import nnx

from glm_fast.model.linear import Linear


class MLP(nnx.Module):
    """x [..., D] -> [..., D] through hidden size I."""

    def __init__(self, dim: int, hidden: int, dtype, std: float, rngs: nnx.Rngs):
        self.gate_proj = Linear(dim, hidden, dtype, std, rngs)
        self.up_proj = Linear(dim, hidden, dtype, std, rngs)
        self.down_proj = Linear(hidden, dim, dtype, std, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

    def weights(self):
        """(gate [D, I], up [D, I], down [I, D]) for the decode ops."""
        return self.gate_proj.kernel[...], self.up_proj.kernel[...], self.down_proj.kernel[...]
