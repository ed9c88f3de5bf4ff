"""Pallas (Mosaic GPU, Hopper) kernels for the GLM-5 decode step; pure-jnp references in `ref`."""
from pallas_kernels import _layout_names

_layout_names.install()  # jax >= 0.11: Mosaic's layout inference without its O(module^2) naming (see the module)
