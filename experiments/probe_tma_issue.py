"""How fast one CTA issues the sparse-attention row gathers: `mla_attention.gather_rows`, ATTN's per-row TMA copies
(per selected row, one copy per 64-wide latent segment and one for the rope part -- 9 at GLM-5's C = 512, R = 64,
576 per 64-row block), issued by one thread of the warpgroup or by its 4 warps at once (`warps=True`,
`plgpu.warp_map`: each warp issues a quarter of the rows), with or without ATTN's overlay of this step's new row.
On the H200 at glm5_slice the persistent kernel's ATTN tasks spent ~16 of ~40 us issuing these copies with one
thread (experiments/results/bench_persistent_glm5_slice_chunked.json, phase "rows_issue").

Each of `ctas` CTAs gathers `rows` random rows of [S, C] / [S, R] bf16 tables into a swizzled ring slot, `reps`
times in a loop (issue all, wait on the barrier), then stores the slot once; the gathered rows are checked against
the tables. Time per gather = (launch with 2 * reps - launch with reps) / reps, the median over `trials`. The
warps' modes need the GPU (GPU interpret mode has no `core_map`); --interpret runs the thread mode only.

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
MODES = ("thread", "warps", "warps_overlay")


def gather_kernel(mode: str, rows: int, segments: int, reps: int, ctas: int, interpret: bool):
    """(idx [ctas, rows] int32, pos [1] int32, c_kv [S, (segments - 1) * SEG], k_pe [S, SEG], new_ckv [1, C],
    new_kpe [1, SEG], all bf16) -> ([ctas, segments - 1, rows, SEG], [ctas, rows, SEG]): each CTA's rows gathered
    `reps` times by `mla_attention.gather_rows` into a swizzled ring slot, then stored. mode: "thread" (one
    thread issues), "warps" (`warps=True`), "warps_overlay" (also ATTN's overlay: a row equal to pos[0] comes
    from the new rows)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.gemv import interpret_params
    from pallas_kernels.mla_attention import gather_rows

    if mode not in MODES or (mode != "thread" and (interpret or rows % 4)):
        raise ValueError(f"mode {mode!r}: one of {MODES}; the warps' modes need the GPU and rows % 4 == 0 "
                         f"(got {rows=}, {interpret=})")
    n_seg = segments - 1
    swz = () if interpret else (plgpu.SwizzleTransform(128),)

    def body(idx_ref, pos_ref, ckv_ref, kpe_ref, new_ckv, new_kpe, out_kv, out_pe, kv, pe, idx_s, full, meta):
        cta = lax.axis_index("x")
        plgpu.copy_gmem_to_smem(idx_ref.at[cta], idx_s, meta)
        plgpu.barrier_wait(meta)
        overlay = (new_ckv, new_kpe, (pos_ref[0],), None) if mode == "warps_overlay" else None

        @pl.loop(0, reps)
        def _(_i):
            gather_rows(ckv_ref, kpe_ref, idx_s, kv, pe, full, b=None, seg0=cta * 0, n_seg=n_seg, num_rows=rows,
                        seq_len=ckv_ref.shape[0], overlay=overlay, warps=mode != "thread")
            plgpu.barrier_wait(full)
        plgpu.copy_smem_to_gmem(kv, out_kv.at[cta])
        plgpu.copy_smem_to_gmem(pe, out_pe.at[cta])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=(jax.ShapeDtypeStruct((ctas, n_seg, rows, SEG), jnp.bfloat16),
                        jax.ShapeDtypeStruct((ctas, rows, SEG), jnp.bfloat16)),
        scratch_types=[plgpu.SMEM((n_seg, rows, SEG), jnp.bfloat16, transforms=swz),
                       plgpu.SMEM((rows, SEG), jnp.bfloat16, transforms=swz), plgpu.SMEM((rows,), jnp.int32),
                       plgpu.Barrier(num_arrivals=rows * segments), plgpu.Barrier(num_arrivals=1)],
        grid=(ctas,), grid_names=("x",), interpret=interpret_params(interpret))


def measure(mode: str, rows: int, segments: int, ctas: int, reps: int, trials: int, seq: int, interpret: bool,
            seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, seq, (ctas, rows)).astype(np.int32)
    pos = np.array([idx[0, 0]], np.int32)  # CTA 0's first row is this step's new row (overlay mode)
    keys = jax.random.split(jax.random.key(seed), 3)
    table = jax.random.normal(keys[0], (seq, segments * SEG), jnp.float32).astype(jnp.bfloat16)
    new = jax.random.normal(keys[1], (1, segments * SEG), jnp.float32).astype(jnp.bfloat16)
    args = (jnp.asarray(idx), jnp.asarray(pos), table[:, SEG:], table[:, :SEG], new[:, SEG:], new[:, :SEG])
    src = np.array(table)
    if mode == "warps_overlay":
        src[pos[0]] = np.asarray(new)[0]
    gathered = src[idx]  # [ctas, rows, segments * SEG]
    want_kv = gathered[..., SEG:].reshape(ctas, rows, segments - 1, SEG).transpose(0, 2, 1, 3)
    want_pe = gathered[..., :SEG]
    times = {}
    for n in (reps, 2 * reps):
        fn = jax.jit(gather_kernel(mode, rows, segments, n, ctas, interpret))
        out_kv, out_pe = (np.asarray(a) for a in fn(*args))
        if not (np.array_equal(out_kv, want_kv) and np.array_equal(out_pe, want_pe)):
            return {"mode": mode, "error": "gathered rows differ from the tables'"}
        runs = []
        for _ in range(trials):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
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
    p.add_argument("--modes", default=",".join(MODES))
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
