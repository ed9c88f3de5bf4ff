"""Which kernel makes a backend's logits differ from XLA's, and is the difference the kernel's? In one jitted cached
step (ctx prompt tokens prefilled by XLA, then `rows` new tokens) it reports:

* swaps: one op of the XLA table at a time replaced by the backend's (then all of them): logits error vs XLA
  per token row;
* in_step_checks: every call of each backend op inside the step against its reference on that call's inputs
  (`glm_fast.engine.ops.checked`): the kernels' own error;
* float32_floor: the bf16 XLA step and the all-backend step against a float32 XLA step on the same weights: the
  divergence that bf16 rounding alone causes. DSA top-k and MoE routing are discrete, so a tiny difference in an
  early layer can flip a selected row or expert later; on random weights past index_topk this moves bf16 XLA itself
  by ~25% of max |logit| from float32 (measured on glm5_slice, ctx 3000). A backend whose in-step checks are tight
  and whose distance from float32 equals bf16 XLA's is exact up to rounding order.

    python experiments/diagnose_backend.py --config glm5_slice --context 3000 --rows 4 --seed 3004
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

from glm_fast import Model, load_config
from glm_fast.model import to_float32
from glm_fast.engine.cache import new_state
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import OP_FIELDS as OPS, XLA, row_err, checked, get_ops

def float32_floor(run, params, cfg, tokens, ctx: int, t: int, bf16_logits: dict) -> dict:
    """Per-row error of each bf16 step's logits against the float32 XLA step on the same (upcast) weights."""
    p32 = to_float32(params)
    state = new_state(cfg, 1, ctx + t + 8, 0, jnp.float32)
    _, _, caches = run(p32, state.layers, tokens[:, :ctx], jnp.arange(ctx)[None], XLA)
    ref = run(p32, caches, tokens[:, ctx:], (ctx + jnp.arange(t))[None], XLA)[0]
    return {name: {"rel_err_per_row": np.asarray(row_err(got, ref, (0, 2))).round(5).tolist(),
                   "argmax_equal_per_row": (got.argmax(-1) == ref.argmax(-1))[0].tolist()}
            for name, got in bf16_logits.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="glm5_slice")
    p.add_argument("--set", action="append", default=[], help="config override a.b=c (repeatable)")
    p.add_argument("--backend", default="pallas")
    p.add_argument("--context", type=int, default=3000)
    p.add_argument("--rows", type=int, default=4, help="new tokens in the step (1 = decode, 1 + D = verify)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float32", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare both bf16 steps with a float32 XLA step (needs 3x the weight memory)")
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
        rows.append({"swap": swap, "rel_err_per_row": np.asarray(row_err(got, want, (0, 2))).round(5).tolist(),
                     "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all()),
                     "finite": bool(jnp.isfinite(got).all())})
        print(rows[-1], flush=True)
    jax.block_until_ready(run(params, caches, tokens[:, ctx:], pos, checked(backend, log)))
    for r in log:
        print(r, flush=True)
    floor = float32_floor(run, params, cfg, tokens, ctx, t, {"xla": want, args.backend: got}) if args.float32 else None
    print("float32_floor", floor, flush=True)
    result = {"experiment": "diagnose_backend", "args": vars(args), "jax": jax.__version__,
              "device": jax.devices()[0].device_kind, "swaps": rows, "in_step_checks": log, "float32_floor": floor}
    out = args.out or os.path.join("experiments", "results", f"diagnose_{args.backend}_{args.config}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)
    return result


if __name__ == "__main__":
    main()
