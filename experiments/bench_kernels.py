"""Benchmark the Pallas kernels (GEMV and MoE in bf16 and FP8, lightning indexer + top-k, sparse MLA attention)
against their XLA references at GLM-5 shapes.

For every case: median device time per call (CUDA-synchronised wall time of a jitted batch of R back-to-back
calls on R distinct weight buffers / caches / routings, so the streamed bytes are not L2-resident; warm-ups
first; shared weights enter the jit as arguments, never as captured constants), bytes moved,
achieved bandwidth and its fraction of the HBM ceilings measured in the same run (a large device copy, read +
write bytes; and a large sum, read bytes), next to the jitted reference (`pallas_kernels.ref`, `.fp8`). Each
case also records the kernel's relative error against the reference, and an `error` field instead of timings if
it failed, so one run reports everything. Writes experiments/results/kernels_<date>.json (DESIGN.md section 6).

  python experiments/bench_kernels.py                  # H200, < 5 minutes
  python experiments/bench_kernels.py --tiny           # CPU smoke test of this script (GPU interpret mode)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import pathlib
import statistics
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glm_fast import results  # noqa: E402
from pallas_kernels import fp8, ref  # noqa: E402
from pallas_kernels.gemv import GemvConfig, gemv, gemv_fp8  # noqa: E402
from pallas_kernels.indexer import IndexerConfig, indexer_topk  # noqa: E402
from pallas_kernels.mla_attention import MLAConfig, sparse_mla_attention  # noqa: E402
from pallas_kernels.moe import moe_experts, moe_experts_fp8  # noqa: E402

L2_BYTES = 50 * 2**20  # H200; rotate at least 4x this per timed batch
EPS = 1e-5
# name -> (K, N, fused norm): GLM-5 level-1 q_a+kv_a, q_b, o_proj, LM head.
GEMV_CASES = {"qkv_a": (6144, 2048 + 576, True), "q_b": (2048, 64 * 256, True), "o_proj": (16384, 6144, False),
              "lm_head": (6144, 154880, True)}
MOE_CASE = dict(e=256, k=8, d=6144, i=2048, si=2048)
TINY_GEMV = {"qkv_a": (256, 192, True), "o_proj": (512, 128, False)}
TINY_MOE = dict(e=8, k=2, d=128, i=128, si=128)
# Lightning indexer (heads, head dim, top-k) over these context lengths; sparse MLA (heads, C, R, top-k).
INDEXER_CASE = dict(n=32, h=128, k=2048, contexts=(4096, 32768, 131072))
TINY_INDEXER = dict(n=8, h=64, k=64, contexts=(512,))
MLA_CASE = dict(n=64, c=512, r=64, k=2048, contexts=(4096, 32768))
# Variants timed side by side (the defaults first): where the time goes in the two latency-bound kernels.
INDEXER_VARIANTS = {"radix_select": IndexerConfig(), "lax_select": IndexerConfig(select="lax")}
MLA_VARIANTS = {"tma_gather": MLAConfig(), "tma_gather_32_rows_per_split": MLAConfig(min_rows_per_split=32),
                "xla_gather": MLAConfig(gather="xla"),
                "xla_gather_32_rows_per_split": MLAConfig(gather="xla", min_rows_per_split=32)}
TINY_MLA = dict(n=8, c=64, r=16, k=64, contexts=(256,))
# GEMV ring geometry (tile_k rows per pipeline step, ring depth): is a weight stream of small [64 x 64] steps (the
# persistent kernel's tile bodies) bound by the bytes in flight per SM or by the fixed cost of each step?
GEMV_GEOMETRY = [(64, 4), (64, 7), (64, 12), (64, 16), (128, 4), (128, 8), (256, 2), (256, 4), (256, 6)]
TINY_GEMV_GEOMETRY = [(64, 2), (64, 4)]


def _rnd(key, shape, scale=1.0, dtype=jnp.bfloat16):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _timed(fn, args, reps: int, warmup: int = 2):
    """Median/p10/p90 seconds of one call of `fn(*args)` (a jitted batch), synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[len(times) // 10], times[(9 * len(times)) // 10]


def measure_ceilings(nbytes: int, reps: int) -> dict:
    n = nbytes // 4
    a = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0000001)  # not a no-op copy XLA could elide
    total = jax.jit(jnp.sum)
    t_copy = _timed(copy, (a,), reps)[0]
    t_sum = _timed(total, (a,), reps)[0]
    del a
    return {"hbm_copy_tb_s": 2 * nbytes / t_copy / 1e12, "hbm_read_tb_s": nbytes / t_sum / 1e12,
            "ceiling_bytes": nbytes}


def _batched(op):
    """One jit running `op(*consts, *args)` on each argument tuple back to back (one dispatch, r device calls)."""
    return jax.jit(lambda consts, batch: [op(*consts, *args) for args in batch])


def _rel_err(out, want) -> float:
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - want) / np.linalg.norm(want))


def _run_pair(row: dict, kernel_op, ref_op, batch, nbytes: int, reps: int, ceilings: dict, rows: list,
              consts: tuple = (), compare=None):
    r = len(batch)
    first_out = {}
    for impl, op in (("pallas", kernel_op), ("xla", ref_op)):
        out = dict(row, impl=impl, bytes_per_call=nbytes, calls_per_batch=r)
        try:
            f = _batched(op)
            t0 = time.perf_counter()
            first_out[impl] = jax.block_until_ready(f(consts, batch))[0]
            out["first_call_s"] = time.perf_counter() - t0  # compile + run
            med, p10, p90 = _timed(f, (consts, batch), reps)
            out.update(median_us=med / r * 1e6, p10_us=p10 / r * 1e6, p90_us=p90 / r * 1e6)
            out["tb_s"] = nbytes / (med / r) / 1e12
            out["fraction_of_copy_ceiling"] = out["tb_s"] / ceilings["hbm_copy_tb_s"]
            out["fraction_of_read_ceiling"] = out["tb_s"] / ceilings["hbm_read_tb_s"]
            if impl == "xla" and "pallas" in first_out:
                out["rel_err_pallas_vs_xla"] = (compare or _rel_err)(first_out["pallas"], first_out["xla"])
        except Exception as e:  # noqa: BLE001  (report and go on: one run should show every failure)
            out["error"] = f"{type(e).__name__}: {e}"[:2000]
            out["traceback"] = traceback.format_exc()[-4000:]
        rows.append(out)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items() if k != "traceback"},
              flush=True)
    gc.collect()


def bench_gemv(cases: dict, tokens: list, fmt: str, reps: int, ceilings: dict, rows: list, interpret,
               geometry=(None,)):
    """geometry: (tile_k, ring depth) pairs timed side by side (None: GemvConfig's defaults)."""
    for name, (k, n, norm) in cases.items():
        for t, geo in ((t, g) for t in tokens for g in geometry):
            key = jax.random.key(zlib.crc32(f"{name}/{t}/{fmt}".encode()))
            kx, kw, kn = jax.random.split(key, 3)
            w_bytes = k * n * (2 if fmt == "bf16" else 1)
            r = int(min(8, max(2, -(-4 * L2_BYTES // w_bytes))))
            nw = (1.0 + _rnd(kn, (k,), 0.2)).astype(jnp.bfloat16) if norm else None
            batch = []
            for j in range(r):
                w = _rnd(jax.random.fold_in(kw, j), (k, n), k ** -0.5)
                if fmt == "fp8":
                    w = fp8.quantize_fp8_blockwise(w)
                batch.append((_rnd(jax.random.fold_in(kx, j), (t, k)), w))
            cfg = None if geo is None else GemvConfig(tile_k=geo[0], max_concurrent_steps=geo[1])
            if fmt == "bf16":
                kop = lambda nw, x, w: gemv(x, w, nw, EPS, config=cfg, interpret=interpret)
                rop = lambda nw, x, w: ref.gemv(x, w, nw, EPS)
                nbytes = w_bytes
            else:
                kop = lambda nw, x, w: gemv_fp8(x, w, nw, EPS, config=cfg, interpret=interpret)
                rop = lambda nw, x, w: fp8.gemv_fp8_ref(x, w, nw, EPS)
                nbytes = w_bytes + batch[0][1][1].size * 4
            nbytes += t * k * 2 + t * n * 2 + (k * 2 if norm else 0)
            row = dict(kernel="gemv", case=name, fmt=fmt, T=t, K=k, N=n, fused_norm=norm)
            if geo is not None:
                row.update(tile_k=geo[0], ring_depth=geo[1], step_bytes=geo[0] * 64 * 2)
            _run_pair(row, kop, rop, batch, nbytes, reps, ceilings, rows, consts=(nw,))
            del batch


def bench_moe(case: dict, tokens: list, fmt: str, reps: int, ceilings: dict, rows: list, interpret, r: int):
    e, k, d, i, si = case["e"], case["k"], case["d"], case["i"], case["si"]
    key = jax.random.key(zlib.crc32(f"moe/{fmt}".encode()))
    ks = jax.random.split(key, 7)
    w = (_rnd(ks[0], (e, d, i), d ** -0.5), _rnd(ks[1], (e, d, i), d ** -0.5), _rnd(ks[2], (e, i, d), i ** -0.5))
    shared = (_rnd(ks[3], (d, si), d ** -0.5), _rnd(ks[4], (d, si), d ** -0.5), _rnd(ks[5], (si, d), si ** -0.5))
    itemsize = 2
    if fmt == "fp8":
        w = tuple(fp8.quantize_fp8_blockwise(a) for a in w)
        shared = tuple(fp8.quantize_fp8_blockwise(a) for a in shared)
        itemsize = 1
    kop = (moe_experts if fmt == "bf16" else moe_experts_fp8)
    rop = (ref.moe_experts if fmt == "bf16" else fp8.moe_experts_fp8_ref)
    for t in tokens:
        batch, uniq = [], []
        for j in range(r):
            kj = jax.random.fold_in(ks[6], t * 100 + j)
            ids = jnp.argsort(jax.random.uniform(kj, (t, e)), axis=-1)[:, :k].astype(jnp.int32)
            wts = jax.nn.softmax(jax.random.normal(jax.random.fold_in(kj, 1), (t, k)), axis=-1) * 2.5
            batch.append((_rnd(jax.random.fold_in(kj, 2), (t, d)), ids, wts))
            uniq.append(len(np.unique(np.asarray(ids))))
        experts_read = float(np.mean(uniq)) + si / i
        nbytes = int(experts_read * 3 * d * i * itemsize) + t * d * 4
        row = dict(kernel="moe_experts", fmt=fmt, T=t, E=e, k=k, D=d, I=i, shared_I=si,
                   mean_experts_read=experts_read)
        _run_pair(row, lambda w, shared, x, ids, wts: kop(x, ids, wts, *w, shared, interpret=interpret),
                  lambda w, shared, x, ids, wts: rop(x, ids, wts, *w, shared), batch, nbytes, reps, ceilings, rows,
                  consts=(w, shared))
    del w, shared
    gc.collect()


def _rotation(nbytes: int, cap: int = 8) -> int:
    """Distinct input copies per timed batch so that the batch streams >= 4x L2 (2..cap)."""
    return int(min(cap, max(2, -(-4 * L2_BYTES // max(nbytes, 1)))))


def bench_indexer(case: dict, tokens: list, reps: int, ceilings: dict, rows: list, interpret):
    """Scores over S cached index keys + exact top-k. Bytes: the keys once, plus the f32 score row written by the
    scores kernel and read back by the select kernel (2 x T x S x 4)."""
    n, h, k = case["n"], case["h"], case["k"]
    for s_len in case["contexts"]:
        for t in tokens:
            key = jax.random.key(zlib.crc32(f"indexer/{s_len}/{t}".encode()))
            nbytes = s_len * h * 2 + 2 * t * s_len * 4 + t * n * (h * 2 + 4)
            batch = []
            for j in range(_rotation(nbytes)):
                kq, kw, kk = jax.random.split(jax.random.fold_in(key, j), 3)
                q_pos = jnp.full((1, t), s_len - t, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
                batch.append((_rnd(kq, (1, t, n, h)), jax.random.normal(kw, (1, t, n), jnp.float32),
                              _rnd(kk, (1, s_len, h)), q_pos))
            scale = h ** -0.5
            for variant, config in INDEXER_VARIANTS.items():
                row = dict(kernel="indexer_topk", variant=variant, T=t, S=s_len, heads=n, head_dim=h, k=k)
                _run_pair(row, lambda *a, c=config: indexer_topk(*a, scale, k, config=c, interpret=interpret)[0],
                          lambda *a: ref.indexer_topk(*a, scale, k)[0], batch, nbytes, reps, ceilings, rows,
                          compare=_set_mismatch)


def _set_mismatch(out, want) -> float:
    """Fraction of top-k slots whose index differs once both lists are sorted (0.0: the same index sets; the
    kernel returns them in index order, lax.top_k in score order)."""
    return float(np.mean(np.sort(np.asarray(out), -1) != np.sort(np.asarray(want), -1)))


def bench_mla(case: dict, tokens: list, reps: int, ceilings: dict, rows: list, interpret):
    """Absorbed sparse MLA decode attention over k selected latent rows per token. Bytes: the gathered rows
    (k x (C + R) x 2 per token), the queries and the latent output."""
    n, c, r_dim, k = case["n"], case["c"], case["r"], case["k"]
    for s_len in case["contexts"]:
        for t in tokens:
            key = jax.random.key(zlib.crc32(f"mla/{s_len}/{t}".encode()))
            nbytes = t * k * (c + r_dim) * 2 + 2 * t * n * (c + r_dim) * 2
            batch = []
            for j in range(_rotation(s_len * (c + r_dim) * 2)):
                ks = jax.random.split(jax.random.fold_in(key, j), 5)
                idx = jnp.argsort(jax.random.uniform(ks[4], (1, t, s_len)), axis=-1)[..., :k].astype(jnp.int32)
                batch.append((_rnd(ks[0], (1, t, n, c)), _rnd(ks[1], (1, t, n, r_dim)), _rnd(ks[2], (1, s_len, c)),
                              _rnd(ks[3], (1, s_len, r_dim)), idx, jnp.ones((1, t, k), bool)))
            scale = (c + r_dim) ** -0.5
            for variant, config in MLA_VARIANTS.items():
                if interpret:  # the interpreter's tiles: 16-row blocks
                    config = dataclasses.replace(config, block_k=16)
                row = dict(kernel="sparse_mla_attention", variant=variant, T=t, S=s_len, heads=n, C=c, R=r_dim,
                           k=k)
                _run_pair(row, lambda *a, cf=config: sparse_mla_attention(*a, scale, config=cf, interpret=interpret),
                          lambda *a: ref.sparse_mla_attention(*a, scale), batch, nbytes, reps, ceilings, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes in GPU interpret mode (CPU smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed batches per case (default 20, tiny 2)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="T values (1 = decode, 4 = 1 + 3 MTP)")
    p.add_argument("--only", nargs="+", choices=["gemv", "moe", "indexer", "mla", "gemv_geometry"], default=None)
    p.add_argument("--out", default=None, help="output JSON path")
    args = p.parse_args(argv)
    start = time.time()
    interpret = bool(args.tiny)  # GPU interpret mode: 3 simulated CTAs, timings meaningless
    reps = args.reps or (2 if args.tiny else 20)
    gemv_cases, moe_case = (TINY_GEMV, TINY_MOE) if args.tiny else (GEMV_CASES, MOE_CASE)
    indexer_case, mla_case = (TINY_INDEXER, TINY_MLA) if args.tiny else (INDEXER_CASE, MLA_CASE)
    only = set(args.only or ("gemv", "moe", "indexer", "mla"))  # gemv_geometry: only when named
    ceilings = measure_ceilings(2**20 if args.tiny else 4 * 2**30, reps)
    print("ceilings", ceilings, flush=True)
    rows: list = []
    if "indexer" in only:
        bench_indexer(indexer_case, args.tokens, reps, ceilings, rows, interpret)
    if "mla" in only:
        bench_mla(mla_case, args.tokens, reps, ceilings, rows, interpret)
    if "moe" in only:
        for fmt in ("bf16", "fp8"):
            bench_moe(moe_case, args.tokens, fmt, reps, ceilings, rows, interpret, r=2 if args.tiny else 8)
    if "gemv" in only:
        for fmt in ("bf16", "fp8"):
            bench_gemv(gemv_cases, args.tokens, fmt, reps, ceilings, rows, interpret)
    if "gemv_geometry" in only:  # bf16, T = 1, the (tile_k, depth) sweep (not in the default set)
        geo = TINY_GEMV_GEOMETRY if args.tiny else GEMV_GEOMETRY
        bench_gemv({c: gemv_cases[c] for c in ("qkv_a", "o_proj")}, [1], "bf16", reps, ceilings, rows, interpret,
                   geometry=geo)
    config = {"name": "tiny" if args.tiny else "glm5", "tokens": args.tokens, "reps": reps,
              "l2_rotation_bytes": 4 * L2_BYTES, "interpret": interpret}
    record = results.result("bench_kernels", config, rows, ceilings, wall_s=time.time() - start)
    out = pathlib.Path(args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       f"kernels_{datetime.date.today().isoformat()}{'_tiny' if args.tiny else ''}.json"))
    results.write(record, out.parent, out.stem)
    print(f"wrote {out} ({len(rows)} rows, {record['wall_s']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
