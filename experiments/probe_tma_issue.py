"""How fast one CTA issues the sparse-attention row gathers: ATTN's per-row TMA copies (`mla_attention.gather_rows`:
per selected row, one copy per 64-wide latent segment and one for the rope part -- 9 at GLM-5's C = 512, R = 64,
576 per 64-row block) issued by one thread of the warpgroup (today's body) or by its 4 warps at once
(`pl.core_map` over `plgpu.WarpMesh`: each warp issues a quarter of the rows). On the H200 at glm5_slice the
persistent kernel's ATTN tasks spent ~16 of ~40 us issuing these copies
(experiments/results/bench_persistent_glm5_slice_chunked.json, phase "rows_issue").

Each of `ctas` CTAs gathers `rows` random rows of a [S, segments * 64] bf16 table into a swizzled SMEM ring,
`reps` times in a loop (issue all, wait on the barrier), then stores the ring once; the gathered rows are checked
against the table. Time per gather = (launch with 2 * reps - launch with reps) / reps, the median over `trials`.
The warp variant needs the GPU (GPU interpret mode has no `core_map`); --interpret runs the thread variant only.

    python experiments/probe_tma_issue.py --rows 64 --segments 9 --ctas 32 --reps 200 --out DIR
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEG = 64  # bf16 columns per copy: one 128-byte swizzle row


def gather_kernel(mode: str, rows: int, segments: int, reps: int, ctas: int, interpret: bool):
    """idx [ctas, rows] int32, table [S, segments * SEG] bf16 -> out [ctas, segments, rows, SEG]: each CTA's rows,
    gathered `reps` times by `mode` ("thread" or "warps") into SMEM, then stored."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.gemv import interpret_params

    if mode not in ("thread", "warps", "warps_when") or (mode != "thread" and (interpret or rows % 4)):
        raise ValueError(f"mode {mode!r}: 'thread', or 'warps' / 'warps_when' on the GPU with rows % 4 == 0 "
                         f"(got {rows=})")
    swz = () if interpret else (plgpu.SwizzleTransform(128),)

    def body(idx_ref, table_ref, alt_ref, out_ref, ring, idx_s, full, meta):
        cta = lax.axis_index("x")
        plgpu.copy_gmem_to_smem(idx_ref.at[pl.ds(cta, 1)], idx_s, meta)
        plgpu.barrier_wait(meta)

        def copy(row, r, src=table_ref):
            for c in range(segments):
                plgpu.copy_gmem_to_smem(src.at[pl.ds(row, 1), pl.ds(c * SEG, SEG)], ring.at[c, pl.ds(r, 1)], full)

        def copy_either(row, r):  # odd rows from the second table: a per-row choice of source, as ATTN's overlay
            pl.when(row % 2 == 0)(lambda: copy(row, r))
            pl.when(row % 2 == 1)(lambda: copy(row, r, alt_ref))

        @pl.loop(0, reps)
        def _(_i):
            if mode == "thread":
                @pl.loop(0, rows)
                def _(r):
                    copy(idx_s[0, r], r)
            else:  # warp semantics load no SMEM scalars (jax 0.11.2): the indices are read here, picked per warp
                every = [idx_s[0, r] for r in range(rows)]
                quarter = rows // 4

                @pl.core_map(plgpu.WarpMesh(axis_name="w"))
                def _():
                    w = lax.axis_index("w")
                    for j in range(quarter):
                        row = every[j]
                        for q in range(1, 4):
                            row = jnp.where(w == q, every[q * quarter + j], row)
                        (copy_either if mode == "warps_when" else copy)(row, w * quarter + j)
            plgpu.barrier_wait(full)
        plgpu.copy_smem_to_gmem(ring, out_ref.at[cta])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((ctas, segments, rows, SEG), jnp.bfloat16),
        scratch_types=[plgpu.SMEM((segments, rows, SEG), jnp.bfloat16, transforms=swz),
                       plgpu.SMEM((1, rows), jnp.int32), plgpu.Barrier(num_arrivals=rows * segments),
                       plgpu.Barrier(num_arrivals=1)],
        grid=(ctas,), grid_names=("x",), interpret=interpret_params(interpret))


def measure(mode: str, rows: int, segments: int, ctas: int, reps: int, trials: int, seq: int, interpret: bool,
            seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    idx = jnp.asarray(rng.integers(0, seq, (ctas, rows)), jnp.int32)
    table = jax.random.normal(jax.random.key(seed), (seq, segments * SEG), jnp.float32).astype(jnp.bfloat16)
    alt = (table.astype(jnp.float32) + 1.0).astype(jnp.bfloat16)
    src = np.where((np.arange(seq) % 2 == 1)[:, None], np.asarray(alt), np.asarray(table)) if mode == "warps_when" \
        else np.asarray(table)
    want = src.reshape(seq, segments, SEG)[np.asarray(idx)].transpose(0, 2, 1, 3)
    times = {}
    for n in (reps, 2 * reps):
        fn = jax.jit(gather_kernel(mode, rows, segments, n, ctas, interpret))
        out = np.asarray(fn(idx, table, alt))
        if not np.array_equal(out, want):
            return {"mode": mode, "error": f"gathered rows differ from the table's ({(out != want).mean():.3f})"}
        runs = []
        for _ in range(trials):
            t = time.perf_counter()
            fn(idx, table, alt).block_until_ready()
            runs.append(time.perf_counter() - t)
        times[n] = float(np.median(runs))
    per = (times[2 * reps] - times[reps]) / reps
    return {"mode": mode, "rows": rows, "segments": segments, "ctas": ctas, "reps": reps, "correct": True,
            "us_per_gather": 1e6 * per, "ns_per_copy": 1e9 * per / (rows * segments),
            "launch_ms": {str(k): 1e3 * v for k, v in times.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--segments", type=int, default=9, help="copies per row (C / 64 + 1 at GLM-5's C=512, R=64)")
    p.add_argument("--ctas", type=int, default=32)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seq", type=int, default=4096, help="rows of the gathered table")
    p.add_argument("--modes", default="thread,warps")
    p.add_argument("--interpret", action="store_true", help="GPU interpret mode (the CPU; thread only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    from glm_fast import results

    rows = []
    for mode in args.modes.split(","):
        r = measure(mode, args.rows, args.segments, args.ctas, args.reps, args.trials, args.seq, args.interpret,
                    args.seed)
        rows.append(r)
        print(r, flush=True)
    record = results.result("probe_tma_issue", vars(args), rows)
    print("wrote", results.write(record, args.out, args.name))
    return record


if __name__ == "__main__":
    main()
