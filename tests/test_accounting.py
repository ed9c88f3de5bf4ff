"""glm_fast.accounting: parameter counts equal HF's numel (models built on the meta device, so no memory),
GLM-5's headline sizes, DESIGN.md sec. 4's per-layer byte budget, and how step bytes/FLOPs scale."""
import dataclasses

import pytest
import torch
import transformers

from glm_fast import accounting
from glm_fast.config import load_config

GLM5 = load_config("glm5").model
_NOT_IN_HF = ("mtp_depth", "mtp_share_weights", "dtype")


def _hf_config(m):
    """Our ModelConfig -> HF GlmMoeDsaConfig (same field names; local so this test does not depend on convert)."""
    kwargs = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in _NOT_IN_HF}
    kwargs.update(num_key_value_heads=m.num_attention_heads, rope_parameters=m.rope_parameters.to_dict(),
                  mlp_layer_types=list(m.layer_mlp_types), indexer_types=list(m.layer_indexer_types))
    return transformers.GlmMoeDsaConfig(**kwargs)


def _hf_numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


VARIANTS = {
    "tiny": ("tiny", {}),
    "glm5_slice": ("glm5_slice", {}),
    "glm5": ("glm5", {}),
    "dense_only": ("tiny", {"model.first_k_dense_replace": 4}),
    "interleaved_mlp": ("tiny", {"model.mlp_layer_types": ["sparse", "dense", "sparse", "dense"]}),
    "n_group_8": ("glm5_slice", {"model.n_group": 8, "model.topk_group": 4, "model.num_hidden_layers": 2}),
    "shared_indexers": ("tiny", {"model.indexer_types": ["full", "shared", "shared", "full"]}),
    "tied_embeddings": ("tiny", {"model.tie_word_embeddings": True}),
    "no_shared_expert": ("tiny", {"model.n_shared_experts": 0}),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # n_shared_experts=0 on meta
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_total_equals_hf_numel(variant):
    name, overrides = VARIANTS[variant]
    m = load_config(name, overrides=overrides).model
    with torch.device("meta"):
        hf = transformers.GlmMoeDsaForCausalLM(_hf_config(m))
    counts = accounting.param_counts(m)
    assert counts["total"] == _hf_numel(hf)
    assert counts["total"] == sum(counts[k] for k in accounting.WEIGHT_TERMS)


def test_mtp_module_is_one_hf_layer_plus_projection():
    m = load_config("tiny").model
    # The MTP block is an MoE layer with a "full" indexer: compare with such a layer of HF's.
    layer = list(zip(m.layer_mlp_types, m.layer_indexer_types)).index(("sparse", "full"))
    assert m.mtp_mlp_type == "sparse"
    with torch.device("meta"):
        hf_layer = transformers.models.glm_moe_dsa.modeling_glm_moe_dsa.GlmMoeDsaDecoderLayer(_hf_config(m), layer)
    d = m.hidden_size
    assert accounting.mtp_module_params(m) == _hf_numel(hf_layer) + 3 * d + 2 * d * d
    assert accounting.param_counts(m)["mtp"] == 2 * accounting.mtp_module_params(m)  # 2 separate modules
    assert accounting.param_counts(load_config("tiny", overrides={"model.mtp_depth": 0}).model)["mtp"] == 0


def test_glm5_headline_sizes():
    counts = accounting.param_counts(load_config("glm5"))  # a whole Config is accepted too
    # HF's exact count is 743.91e9, GLM-5's "744B"; with the MTP layer it is 753.9e9.
    assert 743.5e9 <= counts["total"] <= 754e9
    assert 744e9 <= counts["total"] + counts["mtp"] <= 754e9
    assert 38e9 <= counts["active_per_token"] <= 42e9


def test_active_params_rule():
    for m in (GLM5, load_config("tiny").model):
        counts, active = accounting.param_counts(m), accounting.active_param_counts(m)
        n_moe = m.layer_mlp_types.count("sparse")
        expert = 3 * m.hidden_size * m.moe_intermediate_size
        assert active["routed_experts"] == n_moe * m.num_experts_per_tok * expert
        assert active["embedding"] == m.hidden_size
        for key in ("attention", "indexer", "dense_mlp", "router", "shared_experts", "norms", "lm_head"):
            assert active[key] == counts[key]
    tied = load_config("tiny", overrides={"model.tie_word_embeddings": True}).model
    assert accounting.active_param_counts(tied)["lm_head"] == tied.vocab_size * tied.hidden_size


def test_glm5_moe_layer_matches_design_table():
    # DESIGN.md sec. 4: ~1.03 GB per MoE layer in bf16 at batch 1; experts 679 MB, o_proj + W_uv 218 MB.
    layer = accounting.layer_step_bytes(GLM5, "sparse", "full", 4096)
    assert abs(sum(layer.values()) - 1.03e9) <= 0.1 * 1.03e9
    assert abs(layer["routed_experts"] + layer["shared_experts"] - 679e6) <= 0.02 * 679e6
    assert layer["index_key_read"] == 4096 * 256                          # S x 256 B
    assert layer["kv_latent_read"] == 2048 * 576 * 2                      # top-2048 latent rows, 2.4 MB
    # DESIGN.md sec. 7: the glm5_slice HF benchmark's roofline, 5.79 GB/token at 128-token context.
    assert abs(accounting.bytes_per_decode_step(load_config("glm5_slice"), 128) - 5.79e9) <= 0.01 * 5.79e9


def test_bytes_monotonic_in_context():
    for m in (GLM5, load_config("tiny").model):
        contexts = [1, 8, 64, 512, 2048, 4096, 32768, 131072]
        sizes = [accounting.bytes_per_decode_step(m, s) for s in contexts]
        assert all(a < b for a, b in zip(sizes, sizes[1:]))


def test_bytes_scale_with_dtype():
    bf16 = accounting.decode_step_breakdown(GLM5, 4096)
    assert accounting.bytes_per_decode_step(GLM5, 4096, "float32") == 2 * bf16["total"]
    fp8 = accounting.bytes_per_decode_step(GLM5, 4096, "float8_e4m3fn")
    assert bf16["total"] / 2 < fp8 < 1.01 * bf16["total"] / 2                   # + block scales
    mixed = accounting.decode_step_breakdown(GLM5, 4096, expert_dtype="float8_e4m3fn")
    for key, value in bf16.items():
        if key in ("routed_experts", "shared_experts"):
            assert value / 2 < mixed[key] < 1.001 * value / 2
        elif key != "total":
            assert mixed[key] == value
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        accounting.bytes_per_decode_step(GLM5, 4096, "int4")


def test_tokens_and_batch_touch_distinct_experts():
    one = accounting.decode_step_breakdown(GLM5, 4096)
    four = accounting.decode_step_breakdown(GLM5, 4096, tokens=4)           # MTP verification, T = 1 + 3
    assert four["routed_experts"] == 4 * one["routed_experts"]               # 32 of 256 experts, worst case
    assert four["attention"] == one["attention"]                             # dense weights read once
    assert four["index_key_read"] == one["index_key_read"]                   # keys read once for all queries
    assert four["kv_latent_read"] == 2 * one["kv_latent_read"]               # min(4096, 4 x 2048) rows
    assert four["cache_write"] == 4 * one["cache_write"]
    batch = accounting.decode_step_breakdown(GLM5, 4096, batch=64)           # 512 > 256: every expert read
    assert batch["routed_experts"] == accounting.param_counts(GLM5)["routed_experts"] * 2
    assert batch["index_key_read"] == 64 * one["index_key_read"]
    with pytest.raises(ValueError, match="context_len"):
        accounting.bytes_per_decode_step(GLM5, 2, tokens=4)


def test_mtp_draft_step():
    draft = accounting.mtp_draft_step_breakdown(GLM5, 4096)
    layer = accounting.layer_step_bytes(GLM5, "sparse", "full", 4096)
    d = GLM5.hidden_size
    assert draft["total"] == sum(layer.values()) + 2 * (2 * d * d + 3 * d + d + GLM5.vocab_size * d)
    assert accounting.bytes_per_mtp_draft_step(GLM5, 4096) < accounting.bytes_per_decode_step(GLM5, 4096) / 10
    with pytest.raises(ValueError, match="mtp_depth=0"):
        accounting.bytes_per_mtp_draft_step(load_config("tiny", overrides={"model.mtp_depth": 0}), 64)


def test_flops():
    per_token = accounting.active_param_counts(GLM5)
    matmul = per_token["total"] - per_token["norms"] - per_token["embedding"]
    short = accounting.flops_per_decode_step(GLM5, 1)
    assert 2 * matmul < short < 1.001 * 2 * matmul                           # weights dominate at S = 1
    assert accounting.flops_per_decode_step(GLM5, 4096, tokens=4, batch=2) == 8 * accounting.flops_per_decode_step(
        GLM5, 4096)
    assert accounting.flops_per_decode_step(GLM5, 131072) > accounting.flops_per_decode_step(GLM5, 4096)


def test_main_prints_table(capsys):
    accounting.main(["glm5", "--hbm-tb-s", "4.28"])
    out = capsys.readouterr().out
    assert "total (MTP excluded)" in out and "743.911" in out and "128K" in out
    accounting.main(["tiny", "--set", "model.index_topk=8", "--contexts", "256,4096"])
    out = capsys.readouterr().out
    assert "clamped to max_position_embeddings=2048" in out and "fp8 experts" in out
    with pytest.raises(SystemExit):
        accounting.main(["tiny", "--set", "model.no_such_field=1"])
