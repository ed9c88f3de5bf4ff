"""The persistent kernel's INDEX_SCORE body (`index_tiles.index_score_body`) alone in a one-CTA kernel, every chunk
of one layer, against `ref.indexer_scores`: on the H200 the whole kernel's candidate rows were right and ~90% of
their scores wrong (experiments/results/bench_persistent_glm5_slice_scores.json). Also compared: the RoPE'd q
rows the body staged in its GMEM scratch (the wgmma B operand's source). GPU interpret mode with --interpret.

    python experiments/probe_index.py --context 4096 --tokens 1 --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(context: int, tokens: int, heads: int, dim: int, rope: int, k: int, n_chunks: int, seed: int,
        interpret: bool) -> dict:
    """INDEX_SCORE of the last `tokens` positions of a `context`-row random index-key cache (this step's rows
    given separately, as IK_WRITE's output), every chunk, vs the reference: per chunk the candidate rows and
    scores (`_scores_by_row`), and the staged RoPE'd q rows vs `apply_rope`."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from experiments.bench_persistent import _scores_by_row
    from glm_fast.model.rope import apply_rope
    from pallas_kernels import ref
    from pallas_kernels.gemv import interpret_params
    from pallas_kernels.persistent import index_tiles as it
    from pallas_kernels.persistent import tiles as tl
    from pallas_kernels.persistent.format import C_INDEX_SCALE, C_INDEX_WSCALE, Op

    dt = jnp.bfloat16
    cfg = tl.TileConfig()
    if interpret:
        cfg = tl.TileConfig(tile_n=16, tile_k=16)  # the CPU tests' small tiles
    sb = it.super_block(k, interpret)
    scratch = tl.scratch_types(dt, 64, rope, dim, 0, None, cfg, interpret, index=(tokens, heads, sb))
    consts = [0.0] * (max(C_INDEX_SCALE, C_INDEX_WSCALE) + 1)
    consts[C_INDEX_SCALE], consts[C_INDEX_WSCALE] = dim ** -0.5, heads ** -0.5
    q_rows = cfg.tile_k * math.ceil(tokens * heads / cfg.tile_k)
    max_len = context + 64
    pos = np.arange(context - tokens, context, dtype=np.int32)
    align = 64
    key = (Op.INDEX_SCORE, (n_chunks, align), (),
           (("stack", 0), ("stack", 1), ("cache", 0), ("in", 0), ("in", 1), ("in", 2)), (("stack", 2), ("stack", 3)))

    class R:
        def with_caches(self, groups, member, fn):
            return fn(*(self.caches[g][0] for g in groups))

    def body(pos_r, cos_r, sin_r, iq, iw, cache, new, val, idx, gmem, **s):
        r = R()
        r.stacks, r.caches, r.rows, r.inputs = (iq, iw, val, idx), ((cache,),), (new,), (pos_r, cos_r, sin_r)
        r.gmem, r.cta = gmem, lax.axis_index("x") * 0
        r.tiles = tl.Tiles(s, cfg, interpret, r.cta)
        fn = it.index_score_body(r, key, consts)
        if fn is None:
            raise ValueError("index_score_body does not fit these shapes")
        zero = r.tiles.c(0)

        @pl.loop(0, n_chunks)
        def _(chunk):
            fn(tl.TaskView(w=lambda j: zero, inp=lambda j: zero, out=lambda j: zero, arg=lambda a: chunk))

    rng = np.random.default_rng(seed)
    iq = rng.normal(0, 1, (1, tokens, heads * dim)).astype(np.float32)
    iw = rng.normal(0, 1, (1, tokens, heads)).astype(np.float32)
    cache = rng.normal(0, 1, (max_len, dim)).astype(np.float32)
    new = rng.normal(0, 1, (1, tokens, dim)).astype(np.float32)
    theta = np.arange(rope // 2, dtype=np.float32)
    ang = pos[:, None] * (10000.0 ** (-2 * theta / rope))[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    args = [jnp.asarray(pos), jnp.asarray(cos, dt), jnp.asarray(sin, dt), jnp.asarray(iq, dt), jnp.asarray(iw, dt),
            jnp.asarray(cache, dt), jnp.asarray(new, dt)]
    out_type = (jax.ShapeDtypeStruct((1, n_chunks, tokens, k), jnp.float32),
                jax.ShapeDtypeStruct((1, n_chunks, tokens, k), jnp.int32),
                jax.ShapeDtypeStruct((1, q_rows, dim), dt))
    kernel = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(1,), grid_names=("x",),
                          interpret=interpret_params(interpret))
    val, idx, staged = (np.asarray(a) for a in jax.jit(kernel)(*args))

    # reference: the keys with this step's rows overlaid, q RoPE'd on its first `rope` dims
    q_read = np.asarray(args[3], np.float32).reshape(tokens, heads, dim)
    c32, s32 = np.asarray(args[1], np.float32), np.asarray(args[2], np.float32)
    q = np.concatenate([np.asarray(apply_rope(jnp.asarray(q_read[..., :rope])[None], jnp.asarray(c32)[None],
                                              jnp.asarray(s32)[None]))[0], q_read[..., rope:]], -1)
    keys = np.asarray(args[5], np.float32).copy()
    keys[pos] = np.asarray(args[6], np.float32)[0]
    w = np.asarray(args[4], np.float32)[0] * consts[C_INDEX_WSCALE]
    scores = np.asarray(ref.indexer_scores(jnp.asarray(q)[None], jnp.asarray(w)[None], jnp.asarray(keys)[None],
                                           jnp.asarray(pos)[None], consts[C_INDEX_SCALE]))[0]  # [T, L]
    staged_q = staged[0, :tokens * heads].astype(np.float32).reshape(tokens, heads, dim)
    q_bf = np.asarray(jnp.asarray(q, dt), np.float32)
    visible = int(pos.max()) + 1
    size = math.ceil(math.ceil(visible / n_chunks) / align) * align
    chunks = []
    for ch in range(n_chunks):
        r0, r1 = ch * size, min(visible, (ch + 1) * size)
        want_val, want_idx = np.full((tokens, k), -np.inf, np.float32), np.zeros((tokens, k), np.int32)
        if r1 > r0:  # the chunk's top-K rows (all of them when it has <= K)
            top, arg = lax.top_k(jnp.asarray(scores[:, r0:r1]), min(k, r1 - r0))
            want_val[:, :top.shape[1]], want_idx[:, :top.shape[1]] = np.asarray(top), np.asarray(arg) + r0
        err, extra = _scores_by_row(val[0, ch], want_val, idx[0, ch], want_idx)
        chunks.append({"chunk": ch, "rows": [r0, r1], "err": err, **extra})
    return {"context": context, "tokens": tokens, "heads": heads, "dim": dim, "rope": rope, "k": k,
            "n_chunks": n_chunks, "seed": seed, "interpret": interpret,
            "staged_q_err": float(np.abs(staged_q - q_bf).max() / np.abs(q_bf).max()),
            "staged_q_err_per_head": np.abs(staged_q - q_bf).max(-1).max(0).tolist(),
            "staged_q_bad_rows": [  # token, head, max error, first 4 dims: kernel / RoPE'd / as read
                [t, h, float(np.abs(staged_q[t, h] - q_bf[t, h]).max()), staged_q[t, h, :4].tolist(),
                 q_bf[t, h, :4].tolist(), q_read[t, h, :4].tolist()]
                for t in range(tokens) for h in range(heads) if np.abs(staged_q[t, h] - q_bf[t, h]).max() > 0.05][:16],
            "worst_chunk_err": max(c["err"] for c in chunks), "chunks": chunks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    a = p.parse_args(argv)
    res = run(a.context, a.tokens, a.heads, a.dim, a.rope, a.k, a.chunks, a.seed, a.interpret)
    print(json.dumps({k: v for k, v in res.items() if k != "chunks"}))
    print(json.dumps([{k: c[k] for k in ("chunk", "rows", "err", "rows_off_fraction")} for c in res["chunks"]]))
    from glm_fast import results
    stem = f"probe_index_t{a.tokens}"
    record = results.result("probe_index", {k: v for k, v in vars(a).items() if k != "out"}, [res])
    print("wrote", results.write(record, a.out, stem))
    return record


if __name__ == "__main__":
    main()
