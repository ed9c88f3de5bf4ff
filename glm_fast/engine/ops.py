"""Decode backends as op tables with one signature (`pallas_kernels.ref`'s): the engine's step functions call
`ops.indexer_topk`, `ops.sparse_mla_attention`, `ops.moe_experts` and `ops.lm_head`, so a backend is a
name -> table switch. `ops.moe_experts_fp8` is the MoE op on FP8 expert stacks ((q, scale) pairs of
`pallas_kernels.fp8`; the role-sharded engine's expert_format="fp8").

`xla`: the jnp references, jitted with the step. `pallas`: the Mosaic GPU kernels of `pallas_kernels` for the
decode and MTP-verification rows (T <= 8 tokens per step, 16-bit weights). Rows outside a kernel's domain take the
reference, by static shape: prefill chunks (T > 8 rows for the experts and the head, T*heads > 256 for the
indexer), float32 models, and dims off the kernels' tile granularity. Without a GPU the kernels run in Pallas
GPU interpret mode (slow; for tests).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import ref

_KERNEL_ROWS = 8  # gemv / MoE kernels: T <= 8 tokens (the wgmma N of the swap-AB tiles)
_INDEXER_COLS = 256  # indexer scores kernel: T * heads <= 256 and a multiple of 8
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Tuning measured on the H200 (experiments/results/bench_kernels_attention_variants_h200.json): the radix
# select beats lax.top_k on the kernel's scores up to 4K cached rows and loses from 32K on (131K, T=1: 755 vs
# 131 us); the XLA-gathered sparse MLA beats per-row TMA copies everywhere (4K, T=1: 44 vs 94 us).
_RADIX_SELECT_MAX_ROWS = 8192
_MLA_GATHER = "xla"


@dataclasses.dataclass(frozen=True)
class Ops:
    """The decode step's heavy ops (see `pallas_kernels.ref` for shapes). lm_head(x [R, D], w [D, V],
    norm_weight [D], eps) -> logits [R, V] is the final RMSNorm fused with the LM-head GEMV."""

    name: str
    indexer_topk: Callable
    sparse_mla_attention: Callable
    moe_experts: Callable
    lm_head: Callable
    moe_experts_fp8: Callable = None  # None: the XLA one (`xla_moe_experts_fp8`)

    def __post_init__(self):
        if self.moe_experts_fp8 is None:
            object.__setattr__(self, "moe_experts_fp8", xla_moe_experts_fp8)


def xla_moe_experts_fp8(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None):
    """`ref.moe_experts` on FP8 expert stacks (w_gate/w_up/w_down = (q, scale) pairs, as `moe_experts_fp8` takes):
    only the distinct chosen experts (U = min(E, T k)) are gathered and dequantized to x's dtype, then run
    exactly as `ref.moe_experts` runs them, so the result equals `ref.moe_experts` on the dequantized stacks
    (and `fp8.moe_experts_fp8_ref` up to summation order). x [T, D], ids/weights [T, k] -> [T, D]."""
    from pallas_kernels import fp8
    t, k = expert_ids.shape
    uniq = jnp.unique(expert_ids.reshape(-1), size=min(w_gate[0].shape[0], t * k), fill_value=-1)   # [U]
    slot = jnp.argmax(expert_ids[..., None] == uniq, axis=-1).astype(expert_ids.dtype)            # [T, k]
    deq = lambda w: fp8.dequantize_fp8_blockwise(w[0][uniq], w[1][uniq], dtype=x.dtype)  # noqa: E731
    if shared is not None:
        shared = tuple(fp8.dequantize_fp8_blockwise(*w, dtype=x.dtype) for w in shared)
    return ref.moe_experts(x, slot, expert_weights, deq(w_gate), deq(w_up), deq(w_down), shared)


XLA = Ops("xla", ref.indexer_topk, ref.sparse_mla_attention, ref.moe_experts, ref.gemv)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _pallas_indexer_topk(q, head_w, keys, q_pos, scale, k):
    from pallas_kernels.indexer import IndexerConfig, indexer_topk
    t, n, h = q.shape[1:]
    if q.dtype in _HALF and keys.dtype == q.dtype and t * n <= _INDEXER_COLS and (t * n) % 8 == 0 and h % 16 == 0:
        select = "pallas" if keys.shape[1] <= _RADIX_SELECT_MAX_ROWS else "lax"
        return indexer_topk(q, head_w, keys, q_pos, scale, k, config=IndexerConfig(select=select),
                            interpret=_interpret())
    return ref.indexer_topk(q, head_w, keys, q_pos, scale, k)


def _mla_fits(q_lat, q_pe) -> bool:
    n, c = q_lat.shape[2:]
    r = q_pe.shape[-1]
    if q_lat.dtype not in _HALF:
        return False
    if _interpret():
        return (n <= 64 or n % 64 == 0) and c % 16 == 0 and (c < 128 or c % 128 == 0) and r % 8 == 0
    return n % 64 == 0 and c % 128 == 0 and r == 64


def _pallas_sparse_mla(q_lat, q_pe, c_kv, k_pe, idx, valid, scale):
    from pallas_kernels.mla_attention import MLAConfig, sparse_mla_attention
    if not _mla_fits(q_lat, q_pe):
        return ref.sparse_mla_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, scale)
    config = MLAConfig(block_k=16) if _interpret() else MLAConfig(gather=_MLA_GATHER)
    return sparse_mla_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, scale, config=config, interpret=_interpret())


def _moe_fits(x, w_gate_shape) -> bool:
    """The MoE kernels' domain: bf16 tokens, T <= 8 rows, D and I multiples of the weight tiles."""
    from pallas_kernels.moe import MoeConfig
    cfg = MoeConfig()
    d, i = w_gate_shape[1:]  # [E, D, I]
    tiles_ok = all(v % m == 0 for v in (d, i) for m in (cfg.tile_k, cfg.tile_n))
    return x.dtype == jnp.bfloat16 and x.shape[0] <= _KERNEL_ROWS and tiles_ok


def _pallas_moe(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None):
    from pallas_kernels.moe import moe_experts
    if _moe_fits(x, w_gate.shape):
        return moe_experts(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared, interpret=_interpret())
    return ref.moe_experts(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared)


def _pallas_moe_fp8(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared=None):
    from pallas_kernels.moe import moe_experts_fp8
    if _moe_fits(x, w_gate[0].shape):
        return moe_experts_fp8(x, expert_ids, expert_weights, tuple(w_gate), tuple(w_up), tuple(w_down),
                               shared and tuple(tuple(w) for w in shared), interpret=_interpret())
    return xla_moe_experts_fp8(x, expert_ids, expert_weights, w_gate, w_up, w_down, shared)


def _pallas_lm_head(x, w, norm_weight, eps):
    from pallas_kernels.gemv import gemv
    if x.dtype == jnp.bfloat16 and x.shape[0] <= _KERNEL_ROWS:
        return gemv(x, w, norm_weight, eps, interpret=_interpret())
    return ref.gemv(x, w, norm_weight, eps)


PALLAS = Ops("pallas", _pallas_indexer_topk, _pallas_sparse_mla, _pallas_moe, _pallas_lm_head, _pallas_moe_fp8)

# "persistent": the engine runs decode / verification steps' main model through one kernel launch
# (`pallas_kernels.persistent.kernel`); this table serves what stays outside it (prefill, MTP drafting): the
# Pallas kernels. With XLA's a D = 3 step took 18.6 ms on the H200 at glm5_slice, 4K, of which ~13 ms were the
# drafts: each MTP depth runs its MoE block over a 2D-row window, where XLA gathers every chosen expert's weights
# (bench_decode_glm5_slice_persistent_mtp3.json); the pallas backend's whole D = 3 step takes 6.75 ms
# (bench_decode_glm5_slice_pallas.json).
PERSISTENT = dataclasses.replace(PALLAS, name="persistent")

BACKENDS = {"xla": lambda: XLA, "pallas": lambda: PALLAS, "persistent": lambda: PERSISTENT}


OP_FIELDS = ("indexer_topk", "sparse_mla_attention", "moe_experts", "lm_head")


def row_err(got, want, axis):
    """max |got - want| over `axis` / max |want| (float32), per remaining (token-row) index."""
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return jnp.abs(got - want).max(axis=axis) / jnp.abs(want).max()


def checked(backend: Ops, log: list, fields=OP_FIELDS, reference: Ops = XLA) -> Ops:
    """`reference`'s table with `fields` taken from `backend`, each call also checked against `reference` on the
    same in-step inputs: {"op", "call", "rel_err_per_row"} dicts are appended to `log` from inside the jit (via
    `jax.debug.callback`). Errors: the fraction of differing top-k indices (sets compared sorted) for the indexer,
    max |kernel - reference| / max |reference| per token row otherwise. Isolates a kernel's own error from the
    divergence that flipped discrete choices (DSA top-k, MoE routing) cause downstream in a whole step."""
    def wrap(op: str):
        fast, slow = getattr(backend, op), getattr(reference, op)

        def run(*args):
            out, want = fast(*args), slow(*args)
            if op == "indexer_topk":  # kernel order is by index, the reference's by score
                err = (jnp.sort(out[0], -1) != jnp.sort(want[0], -1)).mean(axis=(0, 2))
            else:  # sparse MLA [B, T, N, C] -> per T; experts / head [rows, X] -> per row
                err = row_err(out, want, (0, 2, 3) if op == "sparse_mla_attention" else (1,))
            jax.debug.callback(lambda e: log.append({"op": op, "call": sum(r["op"] == op for r in log),
                                                     "rel_err_per_row": [round(float(v), 5) for v in e]}), err)
            return out
        return run
    return dataclasses.replace(reference, name=f"checked:{backend.name}:{','.join(fields)}",
                               **{f: wrap(f) for f in fields})


class BackendError(ValueError):
    """Unknown or unavailable decode backend."""


def get_ops(name: str) -> Ops:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
