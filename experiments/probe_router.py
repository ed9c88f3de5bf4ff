"""The persistent kernel's ROUTER_SELECT body (`tiles.router_body`) alone in a one-CTA kernel, against
`simulate._route`: on the H200 the whole kernel wrote slot_expert = -1 / coef = 0 for every slot
(experiments/results/bench_persistent_glm5_slice_s6.json). The body's SMEM scratch is copied out after it ran,
so a wrong value shows which step went wrong; `minimal_repro` is the failing pattern of the scalar loops the body
then had, in a dozen lines (on the H200 with jax 0.11.2, `plain` reads back the -1s; a `commit_smem` between
fixes it). GPU interpret mode with --interpret (the CPU).

    python experiments/probe_router.py --experts 64 --top-k 8 --tokens 1 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(experts: int, top_k: int, tokens: int, n_group: int, topk_group: int, seed: int, interpret: bool,
        parts: int = 1) -> dict:
    """ROUTER_SELECT on random split-K logits [parts, T, E] and bias [E] (normalised weights, scale 2.5) vs
    `simulate._route`:
    the U = min(E, T * top_k) slots, their coefficients, and the body's SMEM scratch after it ran."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.gemv import interpret_params
    from pallas_kernels.persistent import tiles as tl
    from pallas_kernels.persistent.format import C_ROUTED_SCALE, Op
    from pallas_kernels.persistent.simulate import _route

    u = min(experts, tokens * top_k)
    scale = 2.5
    consts = [0.0] * (C_ROUTED_SCALE + 1)
    consts[C_ROUTED_SCALE] = scale
    cfg = tl.TileConfig()
    scratch = tl.scratch_types(jnp.bfloat16, 64, 0, 0, 0, ((u,), (u, tokens)), cfg, interpret,
                               router=(experts, top_k, n_group, u, parts))
    key = (Op.ROUTER_SELECT, (top_k, n_group, topk_group, True), (0,), (("stack", 0),), (("stack", 1), ("stack", 2)))
    dumps = ("t_rv", "t_pres", "t_rcw", "t_rx")

    class R:
        pass

    def body(lg, bias, sel, coef, *rest, **s):
        dump = dict(zip(dumps, rest))
        r = R()
        r.stacks, r.weights = (lg, sel, coef), (bias,)
        r.tiles = tl.Tiles(s, cfg, interpret, jax.lax.axis_index("x") * 0)
        fn = tl.router_body(r, key, consts)
        if fn is None:
            raise ValueError(f"router_body does not fit E={experts}, top_k={top_k}, n_group={n_group}")
        zero = r.tiles.c(0)
        fn(tl.TaskView(w=lambda j: zero, inp=lambda j: zero, out=lambda j: zero, arg=lambda a: zero))
        plgpu.commit_smem()
        for name, ref in dump.items():
            plgpu.copy_smem_to_gmem(s[name], ref)
        plgpu.wait_smem_to_gmem(0)

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (1, parts, tokens, experts)).astype(np.float32)
    bias = rng.normal(0, 0.1, (1, experts)).astype(np.float32)
    out_type = (jax.ShapeDtypeStruct((1, u), jnp.int32), jax.ShapeDtypeStruct((1, u, tokens), jnp.float32),
                *(jax.ShapeDtypeStruct(scratch[k].shape, scratch[k].dtype) for k in dumps))
    kernel = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(1,), grid_names=("x",),
                          interpret=interpret_params(interpret))
    got = jax.jit(kernel)(jnp.asarray(logits), jnp.asarray(bias))
    sel, coef = np.asarray(got[0][0]), np.asarray(got[1][0])
    ids, w = _route(jnp.asarray(logits[0]), jnp.asarray(bias[0]), top_k, n_group, topk_group, True, scale)
    uniq = np.asarray(jnp.unique(ids.reshape(-1), size=u, fill_value=-1))
    hit = (np.asarray(ids)[:, :, None] == uniq[None, None]).astype(np.float32)  # [T, k, U]
    want_coef = np.einsum("tk,tku->ut", np.asarray(w), hit)
    return {"experts": experts, "top_k": top_k, "tokens": tokens, "n_group": n_group, "topk_group": topk_group,
            "seed": seed, "interpret": interpret, "parts": parts,
            "slot_expert_equal": bool((sel == uniq).all()),
            "coef_err": float(np.abs(coef - want_coef).max()),
            "kernel_slot_expert": sel.tolist(), "want_slot_expert": uniq.tolist(),
            "kernel_coef": coef.ravel()[:16].tolist(), "want_coef": want_coef.ravel()[:16].tolist(),
            "want_ids": np.asarray(ids).tolist(),
            "smem": {k: np.asarray(v).ravel()[:3 * experts].tolist() for k, v in zip(dumps, got[2:])}}


def minimal_repro(interpret: bool) -> dict:
    """The pattern behind the wrong slots, alone: int32 SMEM slots set to -1, a loop storing i into slot n under
    a condition (n counts the stores), then the slots read back as scalars. Variants: `plain` reads right after
    the loop; `commit` puts a `plgpu.commit_smem()` (proxy fence + warpgroup barrier) between; `tma` commits
    and copies the slots out by TMA. Every variant should give the hit experts in increasing order."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.gemv import interpret_params

    e, u = 64, 8
    hits = np.zeros(e, np.int32)
    hits[[2, 6, 7, 21, 46, 47, 48, 49]] = 1

    def make(variant):
        def body(pres_g, out, pres, sel, bar):
            zero = lax.axis_index("x") * 0
            plgpu.copy_gmem_to_smem(pres_g, pres, bar)
            plgpu.barrier_wait(bar)
            for j in range(u):
                sel[zero + j] = jnp.int32(-1)

            def place(i, n):
                hit = pres[i] > 0

                @pl.when(hit)
                def _():
                    sel[n] = i
                return n + hit.astype(jnp.int32)
            n = lax.fori_loop(0, e, place, zero)
            if variant != "plain":
                plgpu.commit_smem()
            if variant == "tma":
                plgpu.copy_smem_to_gmem(sel, out.at[0])
                plgpu.wait_smem_to_gmem(0)
            else:
                for j in range(u):
                    out[zero, zero + j] = sel[zero + j]
            out[zero + 1, zero] = n
        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((2, u), jnp.int32),
                            scratch_types=[plgpu.SMEM((e,), jnp.int32), plgpu.SMEM((u,), jnp.int32),
                                           plgpu.Barrier(num_arrivals=1)],
                            grid=(1,), grid_names=("x",), interpret=interpret_params(interpret))

    want = np.flatnonzero(hits).tolist()
    res = {}
    for variant in ("plain", "commit", "tma"):
        got = np.asarray(jax.jit(make(variant))(jnp.asarray(hits)))
        res[variant] = {"slots": got[0].tolist(), "count": int(got[1, 0]), "right": got[0].tolist() == want}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--n-group", type=int, default=1)
    p.add_argument("--topk-group", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", type=int, default=1, help="the logits' split-K partials (ScheduleOptions.router_splits)")
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    a = p.parse_args(argv)
    res = run(a.experts, a.top_k, a.tokens, a.n_group, a.topk_group, a.seed, a.interpret, a.parts)
    res["minimal_repro"] = minimal_repro(a.interpret)
    print(json.dumps({k: v for k, v in res.items() if k != "smem"}))
    from glm_fast import results
    stem = "probe_router"
    record = results.result(stem, {k: v for k, v in vars(a).items() if k != "out"}, [res])
    print("wrote", results.write(record, a.out, stem))
    return record


if __name__ == "__main__":
    main()
