"""Subprocess half of tests/test_glm5_8gpu.py: the FP8-expert, on-device-initialised role layouts against the
single-device engine on the same (dequantized FP8) weights, one JSON line per case.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/glm5_8gpu_check.py hetero,homogeneous

Cases: `random` = RolesEngine(abstract model, init_key=key, expert_format="fp8") (weights drawn per device,
`glm_fast.parallel.init`) vs Engine(reference_model(cfg, key, "fp8")); `sliced` (first layout only) =
RolesEngine(model, expert_format="fp8") (a real model's experts quantized per shard) vs Engine on the model
with `fp8_roundtrip_params`. Model: parallel_check's cut of `tiny` (bfloat16 here, the dtype FP8 serves).
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from parallel_check import NEW_TOKENS, DEPTH, CHUNK, MAX_LEN, OVERRIDES, run  # noqa: E402

from glm_fast import Engine, Model, load_config  # noqa: E402
from glm_fast.parallel import RolesEngine, abstract_model, reference_model  # noqa: E402
from glm_fast.parallel.fp8 import Fp8Weight, fp8_roundtrip_params  # noqa: E402

DTYPE = "bfloat16"
STD = 0.3  # larger than the default 0.02 so random weights give varied tokens and accepted drafts


def compare(ref: dict, got: dict) -> dict:
    scale = float(np.abs(ref["logits"]).max())
    return {"tokens_equal": {d: got[d]["tokens"] == ref[d]["tokens"] for d in (0, DEPTH)},
            "tokens": got[0]["tokens"], "ref_tokens": ref[0]["tokens"],
            "accepted": got[DEPTH]["accepted"], "ref_accepted": ref[DEPTH]["accepted"],
            "finite": bool(np.isfinite(got["logits"]).all()),
            "logits_rel_err": float(np.abs(got["logits"] - ref["logits"]).max()) / scale}


def main() -> None:
    layouts = sys.argv[1].split(",")
    n = len(jax.devices())
    cfg = load_config("tiny", {**OVERRIDES, "model.dtype": DTYPE, "model.initializer_range": STD}).model
    key = jax.random.key(7)
    kw = dict(max_len=MAX_LEN, prefill_chunk=CHUNK, compilation_cache=False)
    ref = run(Engine(reference_model(cfg, key, "fp8"), **kw))
    for layout in layouts:
        engine = RolesEngine(abstract_model(cfg), layout, n, init_key=key, expert_format="fp8", **kw)
        fp8_leaves = sum(isinstance(x, Fp8Weight) for x in jax.tree.leaves(
            engine.params, is_leaf=lambda x: isinstance(x, Fp8Weight)))
        print(json.dumps({"case": "random", "layout": layout, "num_devices": n, "fp8_stacks": fp8_leaves,
                          **compare(ref, run(engine))}), flush=True)
    model = Model(cfg, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    sliced_ref = run(Engine(nnx.merge(graphdef, fp8_roundtrip_params(params)), **kw))
    engine = RolesEngine(model, layouts[0], n, expert_format="fp8", **kw)
    print(json.dumps({"case": "sliced", "layout": layouts[0], "num_devices": n,
                      **compare(sliced_ref, run(engine))}), flush=True)
    assert NEW_TOKENS > 0


if __name__ == "__main__":
    main()
