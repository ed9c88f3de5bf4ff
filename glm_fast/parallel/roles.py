"""Role tables: which device does which part of a decode step (DESIGN.md section 5).

Three roles cover a GLM-5 layer:
- "index": the DSA lightning indexer and its top-k (index-key cache), and the MoE routing decision;
- "attention": absorbed MLA over the selected latent rows for a slice of the heads (latent KV cache, the
  heads' q_b / W_uk / W_uv / o_proj slices);
- "ffn": the matrix work after attention: routed experts (expert parallel), the shared expert and dense MLPs
  (split along the hidden dimension) and the output head (split along the vocabulary).

A layout maps a device count to a role set per device:

| layout | device 0 | devices 1..N-1 |
|---|---|---|
| hetero | index | attention + ffn |
| homogeneous | index + attention + ffn | the same (TP attention, EP experts, replicated indexer) |

Work a role owns is split as evenly as possible over its devices (64 heads over 7 devices: 10, 9, ..., 9);
every device of a role must get at least one unit, otherwise the table is refused with a `RoleError`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from glm_fast.config import ModelConfig

ROLES = ("index", "attention", "ffn")


class RoleError(ValueError):
    """A layout that cannot run: unknown name, too few devices, or work that cannot be placed."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named way to give roles to devices: `roles(n)` -> one frozenset of roles per device."""

    name: str
    min_devices: int
    roles: Callable[[int], tuple[frozenset, ...]]
    doc: str


def _hetero(n: int) -> tuple[frozenset, ...]:
    return (frozenset({"index"}),) + (frozenset({"attention", "ffn"}),) * (n - 1)


def _homogeneous(n: int) -> tuple[frozenset, ...]:
    return (frozenset(ROLES),) * n


LAYOUTS = {
    "hetero": Layout("hetero", 2, _hetero, "device 0 = index worker, devices 1..N-1 = MLA + expert workers"),
    "homogeneous": Layout("homogeneous", 1, _homogeneous,
                          "every device: replicated indexer, tensor-parallel heads, expert-parallel MoE"),
}


@dataclasses.dataclass(frozen=True)
class Split:
    """`n` units (heads, experts, hidden columns, vocabulary entries) over devices: device d holds units
    [starts[d], starts[d] + counts[d]) in slots 0..counts[d]-1 of a `width`-slot shard (zero-padded)."""

    n: int
    starts: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(self.counts)

    def owner_slot(self) -> tuple[np.ndarray, np.ndarray]:
        """(owner device [n], slot on that device [n]) of every unit, int32."""
        owner = np.zeros(self.n, np.int32)
        slot = np.zeros(self.n, np.int32)
        for d, (s, c) in enumerate(zip(self.starts, self.counts)):
            owner[s:s + c] = d
            slot[s:s + c] = np.arange(c)
        return owner, slot

    def gather_order(self) -> np.ndarray:
        """Positions of units 0..n-1 in the concatenation of all devices' shards ([num_devices * width])."""
        owner, slot = self.owner_slot()
        return owner * self.width + slot


@dataclasses.dataclass(frozen=True)
class RoleTable:
    """device -> roles, for one layout and device count (build with `build_roles`)."""

    layout: str
    roles: tuple[frozenset, ...]

    @property
    def num_devices(self) -> int:
        return len(self.roles)

    def devices(self, role: str) -> tuple[int, ...]:
        if role not in ROLES:
            raise RoleError(f"unknown role {role!r}: roles are {ROLES}")
        return tuple(d for d, r in enumerate(self.roles) if role in r)

    def everywhere(self, role: str) -> bool:
        """True when every device holds `role` (its work is replicated or split over all, no hand-off)."""
        return len(self.devices(role)) == self.num_devices

    def split(self, role: str, n: int, what: str) -> Split:
        """`n` units of `what` split as evenly as possible over the devices holding `role` (others get 0)."""
        devices = self.devices(role)
        if n < len(devices):
            raise RoleError(
                f"layout {self.layout!r} on {self.num_devices} devices puts {role!r} work on {len(devices)} devices, "
                f"but {what}={n} cannot give each at least one: use at most {n} {role} devices (fewer devices or "
                "another layout)")
        base, extra = divmod(n, len(devices))
        counts, starts, start = [0] * self.num_devices, [0] * self.num_devices, 0
        for i, d in enumerate(devices):
            counts[d], starts[d] = base + (i < extra), start
            start += counts[d]
        return Split(n, tuple(starts), tuple(counts))

    def describe(self) -> str:
        return "\n".join(f"device {d}: {', '.join(r for r in ROLES if r in roles)}"
                         for d, roles in enumerate(self.roles))


def build_roles(layout: str, num_devices: int, cfg: ModelConfig) -> RoleTable:
    """The role table of `layout` on `num_devices` devices, checked against the model's heads and experts."""
    if layout not in LAYOUTS:
        raise RoleError(f"unknown layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    spec = LAYOUTS[layout]
    if num_devices < spec.min_devices:
        raise RoleError(f"layout {layout!r} ({spec.doc}) needs at least {spec.min_devices} devices, got "
                        f"{num_devices}: use more devices or the 'homogeneous' layout")
    table = RoleTable(layout, spec.roles(num_devices))
    missing = [r for r in ROLES if not table.devices(r)]
    if missing:
        raise RoleError(f"layout {layout!r} on {num_devices} devices leaves roles {missing} on no device")
    table.split("attention", cfg.num_attention_heads, "model.num_attention_heads")
    table.split("ffn", cfg.vocab_size, "model.vocab_size")
    if cfg.has_moe:
        table.split("ffn", cfg.n_routed_experts, "model.n_routed_experts")
        if cfg.n_shared_experts:
            table.split("ffn", cfg.moe_intermediate_size * cfg.n_shared_experts, "shared expert hidden size")
    if "dense" in cfg.layer_mlp_types or not cfg.has_moe:
        table.split("ffn", cfg.intermediate_size, "model.intermediate_size")
    return table
