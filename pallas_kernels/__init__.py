"""Pallas (Mosaic GPU, Hopper) kernels for the GLM-5 decode step; pure-jnp references in `ref`."""
