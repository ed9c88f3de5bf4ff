"""Random weights generated on the devices, directly in the role-sharded form (no host round trip, no device
holding the whole model): how a 744B-parameter GLM-5 gets onto 8 GPUs for benchmarks.

    model = abstract_model(cfg)                      # nnx.eval_shape: shapes only, nothing allocated
    params, specs = random_params(model, table, cfg, mesh, jax.random.key(0), expert_format="fp8")
    engine = RolesEngine(model, layout, params=(params, specs), ...)   # or RolesEngine(..., init_key=key)

Every weight is defined unit by unit, so any device can make its own part alone: a weight that a role splits
(heads, experts, hidden columns, vocabulary entries; `shard._rule`) is a stack of units, unit u drawn with
key fold_in(leaf key, u); device d draws only the units it owns ([start_d, start_d + count_d), zero padding
past them, zeros on devices without the role), inside `shard_map`. Replicated weights are drawn whole with
the leaf key, by a jit whose output is replicated. `reference_params` draws the same values unsharded (FP8
experts dequantized) on one device: the single-device reference of the tests, for small configs.

Values follow the model's initialisation: N(0, initializer_range) for matrices, ones for norm weights, zeros
for biases (LayerNorm bias, router correction bias). Generation runs one leaf at a time (one compile per
distinct leaf shape), experts a few at a time under `lax.map`, so temporaries stay small.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_fast.config import ModelConfig
from glm_fast.model import Model
from glm_fast.parallel import fp8
from glm_fast.parallel.roles import RoleTable
from glm_fast.parallel.shard import AXIS, _names, _rule, shard_map

_CHUNK_ELEMS = 1 << 26  # float32 elements drawn per lax.map step (256 MiB)


def abstract_model(cfg: ModelConfig) -> Model:
    """The model with `jax.ShapeDtypeStruct` leaves (nothing allocated; works for the full GLM-5)."""
    return nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))


def _draw(names: tuple[str, ...], key, shape, cfg: ModelConfig):
    """One weight (or one unit of it) in float32, as the model initialises it."""
    if len(shape) == 1:
        return jnp.ones(shape, jnp.float32) if names[-1] == "weight" else jnp.zeros(shape, jnp.float32)
    return cfg.initializer_range * jax.random.normal(key, shape, jnp.float32)


def _unit_shape(shape, axis: int, unit: int) -> tuple[int, ...]:
    return (*shape[:axis], unit, *shape[axis + 1:])


def _assemble(g, shape, axis: int, units: int, unit: int):
    """Units stacked first [units, *unit_shape] -> the weight layout [..., units * unit, ...] along `axis`."""
    return jnp.moveaxis(g, 0, axis).reshape(*shape[:axis], units * unit, *shape[axis + 1:])


def _leaves(model: Model):
    """(treedef, [(names, ShapeDtypeStruct)]) of the model's nnx state, in a fixed order (leaf index = key)."""
    _, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return treedef, [(_names(path), x) for path, x in leaves]


def _split_fn(names, shape, dtype, axis: int, unit: int, split, cfg: ModelConfig, mesh: Mesh, quantize: bool):
    """jit(key -> this leaf's [num_devices, ...] shards, each device drawing its own units)."""
    starts, counts = jnp.asarray(split.starts, jnp.int32), jnp.asarray(split.counts, jnp.int32)
    ushape = _unit_shape(shape, axis, unit)
    per_unit = max(1, math.prod(ushape))
    chunk = 1 if quantize else max(1, _CHUNK_ELEMS // per_unit)

    def body(key):
        d = lax.axis_index(AXIS)

        def one(j):
            w = _draw(names, jax.random.fold_in(key, starts[d] + j), ushape, cfg)
            w = jnp.where(j < counts[d], w, 0.0)
            if quantize:   # one expert: [1, K, N] -> (q [N, K], scale)
                return tuple(fp8.quantize_experts(w))
            return w.astype(dtype)

        g = lax.map(one, jnp.arange(split.width, dtype=jnp.int32), batch_size=chunk)
        if quantize:
            return fp8.Fp8Weight(g[0][:, 0][None], g[1][:, 0][None])
        return _assemble(g, shape, axis, split.width, unit)[None]

    return jax.jit(shard_map(body, mesh, (P(),), P(AXIS)))


def random_params(model: Model, table: RoleTable, cfg: ModelConfig, mesh: Mesh, key,
                  expert_format: str = "bf16"):
    """Random role-sharded parameters, drawn on the devices: (params, specs) as `shard.shard_params` returns
    them for a real model (same tree, shardings and padding); `model` may be abstract (`abstract_model`)."""
    fp8.check_expert_format(expert_format)
    treedef, leaves = _leaves(model)
    fns: dict = {}
    out, specs = [], []
    for i, (names, x) in enumerate(leaves):
        leaf_key = jax.random.fold_in(key, i)
        rule = _rule(names, len(x.shape), cfg)
        if rule is None:
            sig = ("rep", names[-1], x.shape, x.dtype)
            if sig not in fns:
                fns[sig] = jax.jit(lambda k, n=names, s=x.shape, t=x.dtype: _draw(n, k, s, cfg).astype(t),
                                   out_shardings=NamedSharding(mesh, P()))
            out.append(fns[sig](leaf_key))
            specs.append(P())
            continue
        role, axis, unit, _ = rule
        split = table.split(role, x.shape[axis] // unit, "/".join(names))
        quantize = expert_format == "fp8" and fp8.is_expert_leaf(names, len(x.shape))
        sig = ("split", x.shape, x.dtype, axis, unit, split, quantize)
        if sig not in fns:
            fns[sig] = _split_fn(names, x.shape, x.dtype, axis, unit, split, cfg, mesh, quantize)
        out.append(fns[sig](leaf_key))
        specs.append(fp8.Fp8Weight(P(AXIS), P(AXIS)) if quantize else P(AXIS))
    return jax.tree_util.tree_unflatten(treedef, out), jax.tree_util.tree_unflatten(treedef, specs)


def reference_params(model: Model, cfg: ModelConfig, key, expert_format: str = "bf16"):
    """The unsharded weights `random_params` draws (same key), on the default device: FP8 experts as
    dequantize(quantize(W)) in the model dtype, i.e. what an expert_format="fp8" engine computes with.
    Small configs only: the whole model is materialised."""
    fp8.check_expert_format(expert_format)
    treedef, leaves = _leaves(model)
    out = []
    for i, (names, x) in enumerate(leaves):
        leaf_key = jax.random.fold_in(key, i)
        rule = _rule(names, len(x.shape), cfg)
        if rule is None:
            out.append(_draw(names, leaf_key, x.shape, cfg).astype(x.dtype))
            continue
        _, axis, unit, _ = rule
        units = x.shape[axis] // unit
        ushape = _unit_shape(x.shape, axis, unit)
        g = jax.vmap(lambda u: _draw(names, jax.random.fold_in(leaf_key, u), ushape, cfg))(jnp.arange(units))
        w = _assemble(g, x.shape, axis, units, unit)
        if expert_format == "fp8" and fp8.is_expert_leaf(names, len(x.shape)):
            w = fp8.dequantize_experts(fp8.quantize_experts(w), jnp.float32)
        out.append(w.astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def reference_model(cfg: ModelConfig, key, expert_format: str = "bf16") -> Model:
    """A concrete single-device `Model` holding `reference_params`."""
    graphdef, _ = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, reference_params(abstract_model(cfg), cfg, key, expert_format))
