"""Config loading, overrides and validation: every preset loads; every bad value fails naming field and fix."""
import pathlib

import pytest

from glm_fast.config import CONFIG_DIR, ConfigError, load_config

PRESETS = sorted(p.stem for p in pathlib.Path(CONFIG_DIR).glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert len(cfg.model.layer_mlp_types) == len(cfg.model.layer_indexer_types) == cfg.model.num_hidden_layers


def test_glm5_matches_design_table():
    m = load_config("glm5").model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.vocab_size) == (6144, 78, 64, 154880)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        2048, 512, 192, 64, 256)
    assert (m.index_n_heads, m.index_head_dim, m.index_topk) == (32, 128, 2048)
    assert (m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts, m.moe_intermediate_size) == (256, 8, 1, 2048)
    assert m.layer_mlp_types[:4] == ("dense", "dense", "dense", "sparse")
    assert m.routed_scaling_factor == 2.5 and m.rope_parameters.rope_theta == 1e6 and not m.tie_word_embeddings


def test_tiny_turns_every_feature_on():
    m = load_config("tiny").model
    assert m.layer_mlp_types.count("sparse") >= 2 and m.n_group > 1 and m.topk_group < m.n_group
    assert "shared" in m.layer_indexer_types and m.index_topk < 64 and m.mtp_depth >= 2


def test_dotted_overrides_dict_and_strings():
    assert load_config("tiny", {"model.index_topk": 8}).model.index_topk == 8
    cfg = load_config("tiny", ["model.index_topk=12", "train.lr=1e-4", "decode.backend=pallas"])
    assert (cfg.model.index_topk, cfg.train.lr, cfg.decode.backend) == (12, 1e-4, "pallas")
    assert load_config("tiny", {"model.rope_parameters.rope_theta": 5.0}).model.rope_parameters.rope_theta == 5.0


def test_load_from_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {hidden_size: 64, num_hidden_layers: 2}\n")
    cfg = load_config(path)
    assert cfg.name == "mine" and cfg.model.hidden_size == 64
    with pytest.raises(ConfigError, match="no config named 'nope'"):
        load_config("nope")


BAD = [
    ({"model.hidden_sise": 8}, r"unknown config key model\.'hidden_sise'.*did you mean 'hidden_size'"),
    ({"modle.hidden_size": 8}, r"unknown config key section 'modle'"),
    ({"train.bogus": 1}, r"unknown config key train\.'bogus'"),
    ({"model.hidden_size": 0}, r"model\.hidden_size=0: must be a positive"),
    ({"model.num_attention_heads": -4}, r"model\.num_attention_heads=-4"),
    ({"model.num_experts_per_tok": 9}, r"num_experts_per_tok=9 > model\.n_routed_experts=8"),
    ({"model.n_group": 3}, r"n_routed_experts=8 is not divisible by model\.n_group=3"),
    ({"model.topk_group": 5}, r"topk_group=5 > model\.n_group=4"),
    ({"model.qk_rope_head_dim": 32}, r"qk_rope_head_dim=32 > model\.index_head_dim=16"),
    ({"model.qk_rope_head_dim": 7}, r"qk_rope_head_dim=7: RoPE rotates pairs"),
    ({"model.indexer_types": ["shared", "full", "full", "full"]}, r"indexer_types\[0\]='shared'"),
    ({"model.indexer_types": ["full", "shared"]}, r"indexer_types has 2 entries"),
    ({"model.indexer_types": ["full", "sparse", "full", "full"]}, r"must be 'full' or 'shared'"),
    ({"model.mlp_layer_types": ["dense", "moe", "dense", "dense"]}, r"must be 'dense' or 'sparse'"),
    ({"model.n_group": 8, "model.topk_group": 1}, r"every group needs >= 2 experts"),
    ({"model.num_experts_per_tok": 5, "model.topk_group": 2}, r"raise topk_group"),
    ({"model.dtype": "float16"}, r"model\.dtype='float16'"),
    ({"model.rope_parameters": {"rope_type": "linear"}}, r"rope_type='linear'"),
    ({"model.rope_parameters": {"rope_type": "yarn"}}, r"yarn needs a positive scaling factor"),
    ({"model.mtp_depth": -1}, r"model\.mtp_depth=-1: must be >= 0"),
    ({"decode.top_p": 0.0}, r"decode\.top_p=0\.0"),
    ({"train.warmup_steps": 10000}, r"train\.warmup_steps=10000"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_values_raise_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_malformed_override_string():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["model.index_topk"])


def test_types_are_coerced_or_rejected():
    assert load_config("tiny", ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(ConfigError, match=r"model\.hidden_size='big': expected int"):
        load_config("tiny", {"model.hidden_size": "big"})
