"""FP8 routed experts for the role-sharded decode path: the stored form of an expert stack and its conversions.

Under `expert_format="fp8"` the routed-expert weights w_gate/w_up [E, D, I] and w_down [E, I, D] (the
reference layout of `glm_fast.model.moe.MoE`) are stored as `Fp8Weight(q, scale)`: DeepSeek-V3's e4m3
block-scaled format of `pallas_kernels.fp8` (q [E, N, K] float8_e4m3fn, transposed; scale [E, N/128, K/128]
float32), quantized one expert at a time, so an expert's bytes do not depend on which device or shard holds it.
The MoE op then is `ops.moe_experts_fp8` (`glm_fast.engine.ops`; XLA: gather + dequantize the chosen experts;
pallas: `pallas_kernels.moe.moe_experts_fp8`). Attention, dense MLPs, the shared expert, embedding and head stay in the
model dtype. Half the expert bytes is what makes the 744B-parameter GLM-5 fit 8 x 141 GB.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax

from pallas_kernels import fp8 as fp8_format

EXPERT_FORMATS = ("bf16", "fp8")  # "bf16": the model dtype (bf16 or f32), unquantized
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


class Fp8Weight(NamedTuple):
    """An expert stack W [E, K, N] stored as q [E, N, K] float8_e4m3fn + scale [E, ceil(N/128), ceil(K/128)]
    float32 (`pallas_kernels.fp8` format); a pytree, and the (q, scale) pair the FP8 ops take."""

    q: jax.Array
    scale: jax.Array


def check_expert_format(expert_format: str) -> str:
    if expert_format not in EXPERT_FORMATS:
        raise ValueError(f"expert_format={expert_format!r}: choose one of {EXPERT_FORMATS} ('fp8': routed experts "
                         "as e4m3 with 128 x 128 float32 block scales)")
    return expert_format


def is_expert_leaf(names: tuple[str, ...], ndim: int) -> bool:
    """True for a stacked routed-expert weight ([E, ...] under .../mlp/{gate,up,down}_proj)."""
    return len(names) >= 2 and names[-2] == "mlp" and names[-1] in EXPERT_NAMES and ndim == 3


def quantize_experts(w, chunk: int = 1) -> Fp8Weight:
    """W [E, K, N] -> Fp8Weight, `chunk` experts at a time (bounds the float32 temporaries)."""
    q, s = lax.map(fp8_format.quantize_fp8_blockwise, w, batch_size=chunk)
    return Fp8Weight(q, s)


def dequantize_experts(w: Fp8Weight, dtype) -> jax.Array:
    """Fp8Weight -> W [E, K, N] in `dtype` (what the FP8 ops compute with)."""
    return fp8_format.dequantize_fp8_blockwise(w.q, w.scale, dtype=dtype)


def stored(var):
    """The value of an nnx Variable as stored: an array, or an `Fp8Weight` (which `var[...]` cannot index)."""
    get = getattr(var, "get_value", None)
    return get() if get is not None else var.value


def fp8_roundtrip_params(params):
    """A model's nnx state with every routed-expert stack replaced by dequantize(quantize(W)) in its own dtype:
    the weights an `expert_format="fp8"` engine computes with, for a single-device reference."""
    from glm_fast.parallel.shard import _names

    def one(path, x):
        if is_expert_leaf(_names(path), x.ndim):
            return jax.jit(lambda w: dequantize_experts(quantize_experts(w), w.dtype))(x)
        return x

    return jax.tree_util.tree_map_with_path(one, params)

