"""Which kernel makes a backend's logits differ from XLA's? Swaps one op of the XLA table at a time for the
backend's (then all of them) in the jitted cached forward, and checks every call of each op inside that same
jitted step against its reference (the in-step inputs, not re-created ones). Writes JSON.

    python experiments/diagnose_backend.py --config glm5_slice --context 3000 --rows 4 --seed 3004

Output rows: {"swap": op or "all", "rel_err_per_row": [...]} (max |logit - xla| / max |xla| per token row) and
{"op": name, "call": i, "rel_err_per_row": [...]} (kernel vs reference on that call's inputs, in-step).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_fast import Model, load_config
from glm_fast.engine.cache import new_state
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import XLA, get_ops

OPS = ("indexer_topk", "sparse_mla_attention", "moe_experts", "lm_head")


def _row_err(got, want, axis):
    """max |got - want| over `axis` / max |want|, float32, per remaining (token-row) index."""
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return jnp.abs(got - want).max(axis=axis) / jnp.abs(want).max()


def _checked(op: str, fast, slow, log: list):
    """An op that returns `fast(*args)` and logs its per-row error against `slow(*args)` from inside the jit."""
    def run(*args):
        out, want = fast(*args), slow(*args)
        if op == "indexer_topk":  # index sets: compare sorted indices (kernel order is by index, not score)
            out_s, want_s = jnp.sort(out[0], -1), jnp.sort(want[0], -1)
            err = (out_s != want_s).mean(axis=(0, 2))
        else:  # sparse MLA: [B, T, N, C] -> per T; experts / head: [rows, X] -> per row
            err = _row_err(out, want, (0, 2, 3) if op == "sparse_mla_attention" else (1,))
        jax.debug.callback(lambda e: log.append({"op": op, "call": sum(r["op"] == op for r in log),
                                                 "rel_err_per_row": np.asarray(e).round(5).tolist()}), err)
        return out
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="glm5_slice")
    p.add_argument("--set", action="append", default=[], help="config override a.b=c (repeatable)")
    p.add_argument("--backend", default="pallas")
    p.add_argument("--context", type=int, default=3000)
    p.add_argument("--rows", type=int, default=4, help="new tokens in the step (1 = decode, 1 + D = verify)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set).model
    model = Model(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda prm, c, tok, pos, ops: main_cached(nnx.merge(graphdef, prm), c, tok, pos,
                                                              jnp.ones_like(pos, bool), ops), static_argnums=(4,))
    ctx, t = args.context, args.rows
    tokens = jax.random.randint(jax.random.key(args.seed), (1, ctx + t), 0, cfg.vocab_size)
    state = new_state(cfg, 1, ctx + t + 8, 0, model.dtype)
    _, _, caches = run(params, state.layers, tokens[:, :ctx], jnp.arange(ctx)[None], XLA)
    pos = (ctx + jnp.arange(t))[None]
    want = run(params, caches, tokens[:, ctx:], pos, XLA)[0]
    backend = get_ops(args.backend)
    rows, log = [], []
    for swap in (*OPS, "all"):
        fields = OPS if swap == "all" else (swap,)
        ops = dataclasses.replace(XLA, name=f"{args.backend}:{swap}",
                                  **{f: getattr(backend, f) for f in fields})
        got = run(params, caches, tokens[:, ctx:], pos, ops)[0]
        rows.append({"swap": swap, "rel_err_per_row": np.asarray(_row_err(got, want, (0, 2))).round(5).tolist(),
                     "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all()),
                     "finite": bool(jnp.isfinite(got).all())})
        print(rows[-1], flush=True)
    checked = dataclasses.replace(XLA, name="checked", **{f: _checked(f, getattr(backend, f), getattr(XLA, f), log)
                                                          for f in OPS})
    jax.block_until_ready(run(params, caches, tokens[:, ctx:], pos, checked))
    for r in log:
        print(r, flush=True)
    result = {"experiment": "diagnose_backend", "args": vars(args), "jax": jax.__version__,
              "device": jax.devices()[0].device_kind, "swaps": rows, "in_step_checks": log}
    out = args.out or os.path.join("experiments", "results", f"diagnose_{args.backend}_{args.config}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
