"""Per-device memory plan of a role layout: weights, decode state and step workspace, from shapes alone.

    plan = memory_plan(cfg, build_roles("hetero", 8, cfg), max_len=131072 + 256, depth=3, expert_format="fp8")
    print(format_plan(plan)); check_fits(plan, capacity_bytes)   # MemoryError naming what to change

Exact for what is allocated: every role-split weight is a [num_devices, width, ...] array, so each device holds
`width` units of it (zero padding for uneven splits, zero shards on devices without the role; `shard.py`),
replicated weights whole; every device holds one slot of each cache (`RolesEngine` state) and the replicated
MTP buffers. The step's workspace is an estimate: the routed experts one step gathers (and dequantizes, FP8)
on a device, twice over for intermediates, plus `base_workspace` for activations, logits and collectives.
Parameter totals come from `glm_fast.accounting` (HF-exact counts) as a cross-check of the shapes.
"""
from __future__ import annotations

import dataclasses
import math

import jax

from glm_fast import accounting
from glm_fast.config import ModelConfig
from glm_fast.engine.cache import new_state
from glm_fast.model.transformer import DTYPES
from glm_fast.parallel import fp8
from glm_fast.parallel.init import _leaves, abstract_model
from glm_fast.parallel.roles import RoleTable
from glm_fast.parallel.shard import _rule
from pallas_kernels import fp8 as fp8_format

GIB = 2 ** 30
H200_BYTES = 143771 * 2 ** 20   # nvidia-smi's memory.total of one H200 (KINDS.md)
BASE_WORKSPACE = 2 * GIB


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device (the same on every device: the arrays are uniform over the mesh)."""

    layout: str
    num_devices: int
    max_len: int
    depth: int
    expert_format: str
    weights: dict          # component -> bytes allocated per device
    zero_fill: dict        # device -> bytes of its weights that are zero (padding, shards of roles it lacks)
    state: dict            # "caches", "mtp_caches", "buffers"
    workspace: int
    params_total: int      # accounting.param_counts total + MTP (the model, unsharded)
    params_stored: int     # parameters in the shapes (unsharded), to cross-check against accounting

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def total(self) -> int:
        return self.weight_bytes + self.state_bytes + self.workspace


def _component(names: tuple[str, ...], rule) -> str:
    if rule is None:
        return "replicated (embedding, q_a/kv_a, indexer, router, norms, eh_proj)"
    return {"heads": "attention heads (q_b, kv_b, o_proj)", "experts": "routed experts",
            "hidden": "dense MLP + shared expert slices", "vocab": "output head slice"}[rule[3]]


def _fp8_bytes(shape) -> int:
    """Bytes of an [E, K, N] stack stored as `fp8.Fp8Weight` (q + float32 block scales)."""
    *lead, k, n = shape
    return math.prod(lead) * (k * n + 4 * math.ceil(n / fp8_format.BLOCK) * math.ceil(k / fp8_format.BLOCK))


def memory_plan(cfg: ModelConfig, table: RoleTable, max_len: int, depth: int, batch: int = 1,
                expert_format: str = "bf16", base_workspace: int = BASE_WORKSPACE, model=None) -> MemoryPlan:
    """The per-device plan of `table` for a decode state of `max_len` rows and MTP depth `depth`; `model`: the
    abstract model (`init.abstract_model(cfg)`, ~30 s for the full GLM-5; made here when not given)."""
    fp8.check_expert_format(expert_format)
    _, leaves = _leaves(model if model is not None else abstract_model(cfg))
    n = table.num_devices
    weights: dict = {}
    zero = {d: 0 for d in range(n)}
    stored = 0
    for names, x in leaves:
        rule = _rule(names, len(x.shape), cfg)
        itemsize = x.dtype.itemsize
        stored += math.prod(x.shape)
        shape = list(x.shape)
        if rule is not None:
            role, axis, unit, _ = rule
            split = table.split(role, x.shape[axis] // unit, "/".join(names))
            shape[axis] = split.width * unit
        quantized = expert_format == "fp8" and fp8.is_expert_leaf(names, len(x.shape))
        nbytes = _fp8_bytes(shape) if quantized else math.prod(shape) * itemsize
        key = _component(names, rule)
        weights[key] = weights.get(key, 0) + nbytes
        if rule is not None:
            for d in range(n):
                zero[d] += nbytes * (split.width - split.counts[d]) // split.width
    state = jax.eval_shape(lambda: new_state(cfg, batch, max_len, depth, DTYPES[cfg.dtype]))
    size = lambda tree: sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    buffers = size((state.hidden, state.tokens, state.draft_probs, state.pending))
    rows = batch * max(1 + depth, 2 * depth)          # verify rows, or the drafts' 2D-row window
    experts_width = table.split("ffn", cfg.n_routed_experts, "experts").width if cfg.has_moe else 0
    gathered = min(experts_width, rows * cfg.num_experts_per_tok)
    dequant = 3 * cfg.hidden_size * cfg.moe_intermediate_size * DTYPES[cfg.dtype].dtype.itemsize
    workspace = 2 * gathered * dequant + base_workspace
    counts = accounting.param_counts(cfg)
    return MemoryPlan(table.layout, n, max_len, depth, expert_format, weights, zero,
                      {"caches": size(state.layers), "mtp_caches": size(state.mtp), "buffers": buffers},
                      workspace, counts["total"] + counts["mtp"], stored)


def format_plan(plan: MemoryPlan, capacity: int | None = None) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"memory per device: layout {plan.layout} on {plan.num_devices} devices, cache rows {plan.max_len}, "
             f"MTP D={plan.depth}, experts {plan.expert_format}; model {plan.params_total / 1e9:.1f}B parameters "
             f"(accounting; shapes hold {plan.params_stored / 1e9:.1f}B)"]
    lines += [f"  {k:<62}{g(v)}" for k, v in plan.weights.items()]
    lines.append(f"  {'weights':<62}{g(plan.weight_bytes)}")
    lines += [f"  {k:<62}{g(v)}" for k, v in plan.state.items()]
    lines.append(f"  {'step workspace (estimate)':<62}{g(plan.workspace)}")
    lines.append(f"  {'total':<62}{g(plan.total)}" + (f"   of {capacity / GIB:.2f} GiB usable "
                                                       f"({100 * plan.total / capacity:.0f}%)" if capacity else ""))
    worst = max(plan.zero_fill.values())
    lines.append(f"  (zeros held for uneven splits / roles a device lacks: up to {worst / GIB:.2f} GiB on a device)")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, capacity: int) -> None:
    """Raises MemoryError, naming the plan and what to change, when plan.total exceeds `capacity` bytes."""
    if plan.total > capacity:
        raise MemoryError(
            f"layout {plan.layout!r} with {plan.max_len} cache rows, MTP D={plan.depth}, experts "
            f"{plan.expert_format}: {plan.total / GIB:.1f} GiB per device > {capacity / GIB:.1f} GiB usable "
            f"(weights {plan.weight_bytes / GIB:.1f}, state {plan.state_bytes / GIB:.1f}, workspace "
            f"{plan.workspace / GIB:.1f}): use expert_format='fp8', a shorter context, or more devices")


def device_capacity(default: int = int(0.95 * H200_BYTES)) -> tuple[int, str]:
    """(usable bytes per device, where the number comes from): the allocator's limit on a GPU, else `default`."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU backends may not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} allocator bytes_limit"
    return default, f"assumed: {default / H200_BYTES:.2f} x an H200's 143771 MiB"
