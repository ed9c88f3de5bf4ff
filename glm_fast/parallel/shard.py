"""One device's view of a role layout inside `shard_map`, and the role-sharded parameters.

A `shard_map` body is one SPMD program: every device traces the same code. Roles therefore become
- role-dependent work: `Shard.run(role, fn)` runs `fn` on the role's devices only (`lax.cond` on
  `lax.axis_index`; branch="mask" computes everywhere and masks instead, with no conditional), and
- hand-offs by collectives that every device executes: `broadcast` (the role's first device's value, as a
  psum of a masked value packed into one int32 message), `psum` of partial outputs, `all_gather`.
Every collective is recorded (op, what, bytes) at trace time, so benchmarks and the performance model count
the same messages the program sends. comms="none" turns the collectives into local no-ops: a timing variant
that measures compute alone (its results are wrong).

Parameters: weights a role splits live only on its devices, as [num_devices, ...] arrays sharded along the
mesh axis (zero shards on devices without the role, zero padding for uneven splits: a zero head, hidden
column or vocabulary entry contributes exactly nothing); everything else is replicated. With
expert_format="fp8" each device's routed-expert shard is stored as `fp8.Fp8Weight` (e4m3 + block scales).
`glm_fast.parallel.init` builds the same sharded tree from random weights generated on the devices.
"""
from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_fast.config import ModelConfig
from glm_fast.parallel import fp8
from glm_fast.parallel.roles import RoleTable

AXIS = "d"


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` (jax >= 0.7) or `jax.experimental.shard_map.shard_map`, without the replication check
    (roles make per-device values differ on purpose; the argument is check_vma or check_rep by version)."""
    sm = getattr(jax, "shard_map", None)
    if sm is None:
        from jax.experimental.shard_map import shard_map as sm
    params = inspect.signature(sm).parameters
    check = {name: False for name in ("check_vma", "check_rep") if name in params}
    return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Role predicates, role-gated work and logged collectives of the current device (inside shard_map)."""

    table: RoleTable
    branch: str = "cond"   # "cond": skip other roles' work; "mask": compute it and discard it
    comms: str = "real"    # "real" | "none" (timing variant: collectives are local no-ops)
    log: list | None = None

    @property
    def device(self):
        return lax.axis_index(AXIS)

    def has(self, role: str):
        """bool scalar: does this device hold `role`?"""
        return jnp.any(self.device == jnp.asarray(self.table.devices(role)))

    def run(self, role: str, fn, *args):
        """fn(*args) on the devices holding `role`; zeros of the same shapes elsewhere."""
        if self.table.everywhere(role):
            return fn(*args)
        if self.branch == "mask":
            has = self.has(role)
            return jax.tree.map(lambda o: jnp.where(has, o, jnp.zeros_like(o)), fn(*args))

        def zeros(*a):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *a))

        return lax.cond(self.has(role), fn, zeros, *args)

    def _record(self, op: str, what: str, x) -> None:
        if self.log is not None:
            self.log.append({"op": op, "what": what, "bytes": int(x.size * x.dtype.itemsize),
                             "shape": list(x.shape), "dtype": str(x.dtype)})

    def psum(self, x, what: str):
        self._record("psum", what, x)
        return x if self.comms == "none" else lax.psum(x, AXIS)

    def all_gather(self, x, what: str):
        """[...] -> [num_devices, ...]: every device's x."""
        self._record("all_gather", what, x)
        if self.comms == "none":
            return jnp.broadcast_to(x, (self.table.num_devices, *x.shape))
        return lax.all_gather(x, AXIS)

    def broadcast(self, role: str, tree, what: str):
        """The value of `tree` on the role's first device, on every device (identity when the role is
        everywhere: then every device computed it). One message: leaves packed into int32 bit patterns."""
        if self.table.everywhere(role):
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        packed = jnp.concatenate([_to_int32(x).reshape(-1) for x in leaves])
        src = self.table.devices(role)[0]
        packed = self.psum(jnp.where(self.device == src, packed, 0), what)  # the others add zeros: exact
        out, start = [], 0
        for x in leaves:
            out.append(_from_int32(packed[start:start + x.size].reshape(x.shape), x.dtype))
            start += x.size
        return jax.tree.unflatten(treedef, out)


def _int_of(dtype):
    return {1: jnp.int8, 2: jnp.int16, 4: jnp.int32}[jnp.dtype(dtype).itemsize]


def _to_int32(x):
    if x.dtype == jnp.bool_:
        return x.astype(jnp.int32)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = lax.bitcast_convert_type(x, _int_of(x.dtype))
    return x.astype(jnp.int32)


def _from_int32(x, dtype):
    if dtype == jnp.bool_:
        return x.astype(jnp.bool_)
    if jnp.issubdtype(dtype, jnp.floating):
        return lax.bitcast_convert_type(x.astype(_int_of(dtype)), dtype)
    return x.astype(dtype)


# ---- role-sharded parameters -------------------------------------------------------------------------------


def _names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name != "value":
            out.append(str(name))
    return tuple(out)


def _rule(names: tuple[str, ...], ndim: int, cfg: ModelConfig):
    """(role, axis, unit size, what) for a weight a role splits, else None (replicated).

    Heads: q_b_proj columns [Q, N (H_n + R)], kv_b_proj columns [C, N (H_n + H_v)], o_proj rows [N H_v, D];
    experts: the leading axis of the stacked [E, ...] weights; dense MLP / shared expert: the hidden axis
    (gate/up columns, down rows); output head: the vocabulary columns.
    """
    tail = names[-3:]
    if tail == ("self_attn", "q_b_proj", "kernel"):
        return "attention", 1, cfg.qk_head_dim, "heads"
    if tail == ("self_attn", "kv_b_proj", "kernel"):
        return "attention", 1, cfg.qk_nope_head_dim + cfg.v_head_dim, "heads"
    if tail == ("self_attn", "o_proj", "kernel"):
        return "attention", 0, cfg.v_head_dim, "heads"
    if fp8.is_expert_leaf(names, ndim):
        return "ffn", 0, 1, "experts"
    if names[-1] == "kernel" and len(names) >= 3 and names[-3] in ("mlp", "shared_experts"):
        if names[-2] in ("gate_proj", "up_proj"):
            return "ffn", 1, 1, "hidden"
        if names[-2] == "down_proj":
            return "ffn", 0, 1, "hidden"
    if tail[-2:] == ("lm_head", "kernel"):
        return "ffn", 1, 1, "vocab"
    return None


def _shards(w, axis: int, unit: int, split) -> list:
    """Per-device shards of w along `axis` (units of `unit` elements), zero-padded to split.width units; sliced
    where w lives (no host round trip for multi-GB expert stacks)."""
    shape = w.shape
    units = w.reshape(*shape[:axis], split.n, unit, *shape[axis + 1:])
    out = []
    for start, count in zip(split.starts, split.counts):
        part = lax.slice_in_dim(units, start, start + count, axis=axis)
        pad = [(0, 0)] * units.ndim
        pad[axis] = (0, split.width - count)
        out.append(jnp.pad(part, pad).reshape(*shape[:axis], split.width * unit, *shape[axis + 1:]))
    return out


def _global(parts: list, mesh: Mesh):
    """Per-device arrays [1, ...] (in mesh order) -> one [num_devices, ...] array sharded over the mesh."""
    shape = (len(parts), *parts[0].shape[1:])
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, P(AXIS)), parts)


def shard_params(params, table: RoleTable, cfg: ModelConfig, mesh: Mesh, expert_format: str = "bf16"):
    """nnx parameter state -> (the same tree with role-split weights as [num_devices, ...] arrays sharded over
    the mesh and the rest replicated, the matching tree of PartitionSpecs). expert_format="fp8": routed-expert
    shards quantized on their device (`fp8.Fp8Weight` leaves)."""
    fp8.check_expert_format(expert_format)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    devices = list(mesh.devices.flat)
    quantize = jax.jit(fp8.quantize_experts)
    out, specs = [], []
    for path, x in leaves:
        names = _names(path)
        rule = _rule(names, x.ndim, cfg)
        if rule is None:
            out.append(jax.device_put(x, NamedSharding(mesh, P())))
            specs.append(P())
            continue
        role, axis, unit, _ = rule
        split = table.split(role, x.shape[axis] // unit, "/".join(names))
        parts = [jax.device_put(s[None], d) for s, d in zip(_shards(x, axis, unit, split), devices)]
        if expert_format == "fp8" and fp8.is_expert_leaf(names, x.ndim):
            qs = [quantize(p) for p in parts]
            out.append(fp8.Fp8Weight(*(_global([q[i] for q in qs], mesh) for i in range(2))))
            specs.append(fp8.Fp8Weight(P(AXIS), P(AXIS)))
            continue
        out.append(_global(parts, mesh))
        specs.append(P(AXIS))
    # an Fp8Weight in a leaf's place becomes a subtree of two leaves (q, scale), in params and specs alike
    return jax.tree_util.tree_unflatten(treedef, out), jax.tree_util.tree_unflatten(treedef, specs)


def local_params(params, specs):
    """Inside shard_map: drop the leading device axis (size 1) of the role-split weights."""
    return jax.tree.map(lambda s, x: x[0] if s == P(AXIS) else x, specs, params,
                        is_leaf=lambda s: isinstance(s, P))
