"""Subprocess half of tests/test_parallel.py: runs role layouts on simulated CPU devices and prints, as one JSON
line per case, how far they are from the single-device engine (tokens, logits, caches).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_check.py hetero cond:2,cond:8,mask:3

The device count must be fixed before jax initialises, which the pytest process has already done, hence the
subprocess. Model: `tiny` cut to one dense and one MoE layer ("full" then "shared" indexer) with 8 heads and a
16-token vocabulary (MTP drafts then get accepted, so rollback runs too) - every feature, a fraction of the
compile time.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_fast import Engine, Model, load_config
from glm_fast.engine.engine import _Mode
from glm_fast.parallel import RolesEngine

OVERRIDES = {"model.num_attention_heads": 8, "model.vocab_size": 16, "model.num_hidden_layers": 2,
             "model.indexer_types": ["full", "shared"]}
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 7, 7, 7, 1, 2, 3, 4, 5, 6, 7]
NEW_TOKENS, DEPTH, CHUNK, MAX_LEN = 10, 2, 32, 64


def prompt_logits(engine: Engine, seq: list[int]) -> np.ndarray:
    """Logits [V] after the last token of `seq`, through the engine's own compiled prefill (greedy, D = 0)."""
    state = engine._new_state(1, 0)
    tokens = np.zeros(state.tokens.shape, np.int32)
    tokens[0, : len(seq)] = seq
    state = state.replace(tokens=jnp.asarray(tokens))
    last = jnp.zeros((1, engine.cfg.vocab_size), jnp.float32)
    prefill = engine._fn("prefill", _Mode(0, True, 0.0, 1.0), engine.prefill_chunk)
    for start in range(0, len(seq), engine.prefill_chunk):
        state, last = prefill(engine.params, state, jnp.int32(start), jnp.asarray([len(seq)], jnp.int32), last)
    return np.asarray(last[0])


def run(engine: Engine) -> dict:
    """Greedy tokens with and without MTP, teacher-forced logits at every generated position, final caches."""
    out = {}
    for depth in (0, DEPTH):
        res = engine.generate(PROMPT, NEW_TOKENS, speculative_depth=depth)
        out[depth] = {"tokens": res.tokens, "state": res.state, "accepted": res.stats["accepted_per_step"]}
    tokens = out[0]["tokens"]
    out["logits"] = np.stack([prompt_logits(engine, PROMPT + tokens[:j]) for j in range(NEW_TOKENS)])
    return out


def cache_error(ref_state, state, engine: RolesEngine) -> float:
    """Max |difference| of the valid cache rows: latent rows on every attention device, index keys on every
    index device, main and MTP layers."""
    n = int(ref_state.pending[0])
    err = 0.0
    for a, b in zip(ref_state.layers + ref_state.mtp, state.layers + state.mtp):
        pairs = [(a.c_kv, b.c_kv, "attention"), (a.k_pe, b.k_pe, "attention"), (a.index_k, b.index_k, "index")]
        for want, got, role in pairs:
            if want is None:
                continue
            for d in engine.table.devices(role):
                err = max(err, float(np.abs(np.asarray(want)[0, :n] - np.asarray(got)[d, 0, :n]).max()))
    return err


def main() -> None:
    layout = sys.argv[1]
    cases = [(branch, int(n)) for branch, n in (case.split(":") for case in sys.argv[2].split(","))]
    assert len(jax.devices()) >= max(n for _, n in cases), (jax.devices(), os.environ.get("XLA_FLAGS"))
    cfg = load_config("tiny", OVERRIDES)
    model = Model(cfg.model, rngs=nnx.Rngs(2))
    ref = run(Engine(model, max_len=MAX_LEN, prefill_chunk=CHUNK, compilation_cache=False))
    scale = float(np.abs(ref["logits"]).max())
    for branch, n in cases:
        engine = RolesEngine(model, layout=layout, num_devices=n, max_len=MAX_LEN, prefill_chunk=CHUNK,
                             compilation_cache=False, branch=branch)
        got = run(engine)
        print(json.dumps({
            "layout": layout, "num_devices": n, "branch": branch,
            "tokens_equal": {d: got[d]["tokens"] == ref[d]["tokens"] for d in (0, DEPTH)},
            "tokens": got[0]["tokens"], "ref_tokens": ref[0]["tokens"],
            "accepted": got[DEPTH]["accepted"], "ref_accepted": ref[DEPTH]["accepted"],
            "finite": bool(np.isfinite(got["logits"]).all()),
            "logits_rel_err": float(np.abs(got["logits"] - ref["logits"]).max()) / scale,
            "cache_err": max(cache_error(ref[d]["state"], got[d]["state"], engine) for d in (0, DEPTH)),
            "collectives_per_step": len(engine.collectives[("step", _Mode(0, True, 0.0, 1.0), 0)]),
        }), flush=True)


if __name__ == "__main__":
    main()
