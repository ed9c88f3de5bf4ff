"""HF <-> glm_fast conversion: exact round trips, config round trip, shape/key mismatches fail clearly."""
import dataclasses

import numpy as np
import pytest
import torch

from glm_fast import ConfigError, Model, convert, load_config
from flax import nnx

pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(dtype):
    cfg = load_config("tiny", {"model.mtp_depth": 0, "model.dtype": dtype})
    model = Model(cfg.model, rngs=nnx.Rngs(3))
    sd = convert.to_hf(model)
    again = convert.to_hf(convert.from_hf(sd, cfg))
    assert sd.keys() == again.keys()
    for key in sd:
        assert sd[key].dtype == again[key].dtype and torch.equal(sd[key], again[key]), key


def test_hf_state_dict_round_trip_and_keys():
    cfg = load_config("tiny", {"model.mtp_depth": 0})
    torch.manual_seed(0)
    import transformers
    hf = transformers.GlmMoeDsaForCausalLM(convert.hf_config(cfg))
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_()
    theirs = hf.state_dict()
    ours = convert.to_hf(convert.from_hf(hf, cfg))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_mtp_weights_round_trip_in_glm5_checkpoint_layout():
    cfg = load_config("tiny", {"model.mtp_share_weights": True})
    model = Model(cfg.model, rngs=nnx.Rngs(1))
    sd = convert.to_hf(model, include_mtp=True)
    layer = cfg.model.num_hidden_layers
    assert f"model.layers.{layer}.eh_proj.weight" in sd and f"model.layers.{layer}.shared_head.norm.weight" in sd
    back = convert.from_hf(sd, cfg, seed=99)  # another seed: MTP weights must come from the state dict
    again = convert.to_hf(back, include_mtp=True)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_config_from_hf_round_trip():
    cfg = load_config("tiny", {"model.mtp_depth": 0})
    back = convert.config_from_hf(convert.hf_config(cfg), overrides={"model.mtp_share_weights": False})
    assert back.model.layer_mlp_types == cfg.model.layer_mlp_types  # HF always spells the per-layer list out
    assert dataclasses.replace(back.model, mlp_layer_types=None) == cfg.model


def test_mismatched_state_dict_fails_clearly():
    cfg = load_config("tiny", {"model.mtp_depth": 0})
    sd = convert.to_hf(Model(cfg.model, rngs=nnx.Rngs(0)))
    other = load_config("tiny", {"model.mtp_depth": 0, "model.hidden_size": 64})
    with pytest.raises(ConfigError, match="another config"):
        convert.from_hf(sd, other)
    del sd["model.norm.weight"]
    with pytest.raises(ConfigError, match="keys missing"):
        convert.from_hf(sd, cfg)


def test_glm5_shapes_without_allocation():
    """GLM-5 builds abstractly (nnx.eval_shape, no weights allocated) and its parameters are what accounting
    counts (accounting == HF numel for the whole 78-layer model is tested in test_accounting). Five layers
    (3 dense + 2 MoE) keep the trace short; every tensor has its full GLM-5 size."""
    import jax

    from glm_fast import accounting
    cfg = load_config("glm5", {"model.num_hidden_layers": 5})
    abstract = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))
    layer = abstract.layers[4]
    assert layer.mlp.gate_proj.shape == (256, 6144, 2048)
    assert layer.self_attn.kv_b_proj.kernel.shape == (512, 64 * (192 + 256))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    counts = accounting.param_counts(cfg)
    assert n == counts["total"] + counts["mtp"]
