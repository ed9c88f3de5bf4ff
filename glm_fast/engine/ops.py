"""Decode backends as op tables with one signature (`pallas_kernels.ref`'s): the engine's step functions call
`ops.indexer_topk`, `ops.sparse_mla_attention` and `ops.moe_experts`, so a backend is a name -> table switch."""
from __future__ import annotations

import dataclasses
from typing import Callable

from pallas_kernels import ref


@dataclasses.dataclass(frozen=True)
class Ops:
    """The decode step's heavy ops (see `pallas_kernels.ref` for shapes)."""

    name: str
    indexer_topk: Callable
    sparse_mla_attention: Callable
    moe_experts: Callable


XLA = Ops("xla", ref.indexer_topk, ref.sparse_mla_attention, ref.moe_experts)

BACKENDS = {"xla": lambda: XLA}


class BackendError(ValueError):
    """Unknown or unavailable decode backend."""


def get_ops(name: str) -> Ops:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
