"""`RolesEngine`: the decode engine (prefill, decode, MTP speculative decoding) on a 1-D device mesh with a
role layout, every compiled step one `shard_map` program.

    engine = RolesEngine(model, layout="hetero", num_devices=8)
    engine.generate(prompt_ids, max_new_tokens=64, speculative_depth=2).tokens   # == Engine(model)'s
    # full GLM-5: random weights drawn on the devices, FP8 routed experts (`glm_fast.parallel.init`)
    engine = RolesEngine(init.abstract_model(cfg), "hetero", 8, init_key=jax.random.key(0), expert_format="fp8")

Everything but the forward pass is the single-device engine's own code (sampling, MTP acceptance, rollback),
run replicated on every device inside the shard_map body: its inputs (logits, tokens) are identical on every
device, so every device takes the same decisions and no extra message is needed. Caches are [num_devices,
...] arrays sharded over the mesh; device d's slot is its role's cache (see `glm_fast.parallel.forward`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_fast.engine.cache import DecodeState
from glm_fast.engine.engine import Engine
from glm_fast.model import Model
from glm_fast.parallel.forward import main_roles, mtp_roles
from glm_fast.parallel.fp8 import check_expert_format
from glm_fast.parallel.init import random_params
from glm_fast.parallel.roles import RoleError, build_roles
from glm_fast.parallel.shard import AXIS, Shard, local_params, shard_map, shard_params

BRANCHES = ("cond", "mask")
COMMS = ("real", "none")


def _map_caches(state: DecodeState, fn) -> DecodeState:
    """fn applied to every cache array (main and MTP layers), the rest of the state unchanged."""
    return state.replace(layers=jax.tree.map(fn, state.layers), mtp=jax.tree.map(fn, state.mtp))


def state_specs(state: DecodeState) -> DecodeState:
    """PartitionSpecs of a role-sharded state: caches split over the mesh axis, the rest replicated."""
    return _map_caches(state, lambda _: P(AXIS)).replace(hidden=P(), tokens=P(), draft_probs=P(), pending=P())


class RolesEngine(Engine):
    """`Engine` over `num_devices` devices (0: all) with the role `layout` ("hetero", "homogeneous").

    branch="cond" skips other roles' work with `lax.cond`; "mask" computes it everywhere and discards it (no
    conditionals). comms="none" is a timing variant whose collectives are local no-ops (wrong results).
    `collectives[key]` lists the messages the compiled function `key` sends per call (op, what, bytes).
    expert_format: "bf16" (routed experts in the model dtype) or "fp8" (e4m3 + block scales, `parallel.fp8`).
    Weights: `model`'s, sliced per role; with `init_key`, random ones drawn on the devices (`init.random_params`;
    `model` may then be abstract); `params=(params, specs)` reuses another engine's on the same mesh and table.
    """

    def __init__(self, model: Model, layout: str = "hetero", num_devices: int = 0, backend: str = "xla",
                 max_len: int | None = None, prefill_chunk: int = 256, compilation_cache=None,
                 branch: str = "cond", comms: str = "real", devices=None, expert_format: str = "bf16",
                 init_key=None, params=None):
        super().__init__(model, backend, max_len, prefill_chunk, compilation_cache)
        available = list(jax.devices() if devices is None else devices)
        n = num_devices or len(available)
        if n > len(available):
            raise RoleError(f"num_devices={n} > the {len(available)} available devices: lower num_devices "
                            "(CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
        if branch not in BRANCHES or comms not in COMMS:
            raise RoleError(f"{branch=}, {comms=}: branch is one of {BRANCHES}, comms one of {COMMS}")
        self.expert_format = check_expert_format(expert_format)
        self.table = build_roles(layout, n, self.cfg)
        self.layout, self.branch, self.comms = layout, branch, comms
        self.mesh = Mesh(np.array(available[:n]), (AXIS,))
        if params is not None:
            self.params, self._param_specs = params
        elif init_key is not None:
            self.params, self._param_specs = random_params(model, self.table, self.cfg, self.mesh, init_key,
                                                           expert_format)
        else:
            self.params, self._param_specs = shard_params(self.params, self.table, self.cfg, self.mesh,
                                                          expert_format)
        self.collectives: dict = {}
        self._shard: Shard | None = None  # the device view of the shard_map body being traced

    def place_state(self, state: DecodeState) -> DecodeState:
        """A single-device state -> the role-sharded one (every device's cache slot holds a copy)."""
        n = self.table.num_devices
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), state_specs(state))
        return jax.jit(lambda s: _map_caches(s, lambda x: jnp.broadcast_to(x, (n, *x.shape))),
                       out_shardings=shardings)(state)

    # ---- Engine hooks ------------------------------------------------------------------------------------
    def _new_state(self, batch: int, depth: int) -> DecodeState:
        return self.place_state(super()._new_state(batch, depth))

    def _compile(self, key, impl):
        def body(params, state, *rest):
            self._shard = Shard(self.table, self.branch, self.comms, self.collectives.setdefault(key, []))
            self.collectives[key].clear()  # a retrace records afresh
            out = impl(local_params(params, self._param_specs), _map_caches(state, lambda x: x[0]), *rest)
            new, *others = out if isinstance(out, tuple) else (out,)
            return _map_caches(new, lambda x: x[None]), tuple(others)

        def run(params, state, *rest):
            specs = state_specs(state)
            fn = shard_map(body, self.mesh, (self._param_specs, specs, *(P(),) * len(rest)), (specs, P()))
            new, others = fn(params, state, *rest)
            return (new, *others) if others else new

        return jax.jit(run, donate_argnums=(1,))

    def _main(self, model, caches, tokens, pos, ok):
        return main_roles(model, caches, tokens, pos, ok, self.ops, self._shard)

    def _mtp(self, model, depth, cache, h_prev, ahead, pos, ok):
        return mtp_roles(model, depth, cache, h_prev, ahead, pos, ok, self.ops, self._shard)
