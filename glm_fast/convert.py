"""HF `GlmMoeDsaForCausalLM` <-> glm_fast parameters, both ways, exactly.

    cfg = config_from_hf(hf_model.config)            # our Config (model section filled from HF's fields)
    model = from_hf(hf_model, cfg)                   # or from a state dict of torch tensors / numpy arrays
    state_dict = to_hf(model)                        # {hf_key: torch.Tensor}, loadable with load_state_dict

HF keeps Linear weights as [out, in]; we keep [in, out]. HF packs each expert's gate and up projections into
`gate_up_proj` [E, 2I, D]; we keep `gate_proj`/`up_proj` [E, D, I] and `down_proj` [E, I, D]. HF has no MTP
weights; GLM-5 checkpoints store its MTP layer after the last decoder layer (`model.layers.{L}.enorm`, ...), and
we read/write that layout when asked (`include_mtp`). torch is imported lazily: only conversion needs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_fast.config import Config, ConfigError, ModelConfig, RopeParameters, config_from_dict
from glm_fast.model import DTYPES, Model

_T = lambda w: np.swapaxes(w, -1, -2)  # noqa: E731  [out, in] <-> [in, out] (also per expert)
_ID = lambda w: w  # noqa: E731


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor <-> one or more of our variables (several when HF packs them)."""

    hf_key: str
    ours: tuple[str, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _plain(hf_key: str, ours: str, transpose: bool) -> _Entry:
    f = _T if transpose else _ID
    return _Entry(hf_key, (ours,), lambda w: (f(w),), f)


def _split_gate_up(w):  # [E, 2I, D] -> gate, up [E, D, I]
    i = w.shape[1] // 2
    return _T(w[:, :i]), _T(w[:, i:])


def _layer_entries(cfg: ModelConfig, hf: str, ours: str, mlp_type: str, indexer_type: str) -> Iterator[_Entry]:
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        yield _plain(f"{hf}.self_attn.{name}.weight", f"{ours}.self_attn.{name}.kernel", True)
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        yield _plain(f"{hf}.self_attn.{name}.weight", f"{ours}.self_attn.{name}.weight", False)
    if indexer_type == "full":
        for name in ("wq_b", "wk", "weights_proj"):
            yield _plain(f"{hf}.self_attn.indexer.{name}.weight", f"{ours}.indexer.{name}.kernel", True)
        for name in ("weight", "bias"):
            yield _plain(f"{hf}.self_attn.indexer.k_norm.{name}", f"{ours}.indexer.k_norm.{name}", False)
    for name in ("input_layernorm", "post_attention_layernorm"):
        yield _plain(f"{hf}.{name}.weight", f"{ours}.{name}.weight", False)
    if mlp_type == "dense":
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield _plain(f"{hf}.mlp.{name}.weight", f"{ours}.mlp.{name}.kernel", True)
        return
    yield _plain(f"{hf}.mlp.gate.weight", f"{ours}.mlp.gate.weight", True)
    yield _plain(f"{hf}.mlp.gate.e_score_correction_bias", f"{ours}.mlp.gate.e_score_correction_bias", False)
    yield _Entry(f"{hf}.mlp.experts.gate_up_proj", (f"{ours}.mlp.gate_proj", f"{ours}.mlp.up_proj"),
                 _split_gate_up, lambda g, u: np.concatenate([_T(g), _T(u)], axis=1))
    yield _plain(f"{hf}.mlp.experts.down_proj", f"{ours}.mlp.down_proj", True)
    if cfg.n_shared_experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield _plain(f"{hf}.mlp.shared_experts.{name}.weight", f"{ours}.mlp.shared_experts.{name}.kernel", True)


def entries(cfg: ModelConfig, include_mtp: bool = False) -> list[_Entry]:
    """The complete HF <-> ours key map for a config (MTP modules as GLM-5 checkpoint layers when asked)."""
    out = [_plain("model.embed_tokens.weight", "embed_tokens.embedding", False),
           _plain("model.norm.weight", "norm.weight", False)]
    if not cfg.tie_word_embeddings:
        out.append(_plain("lm_head.weight", "lm_head.kernel", True))
    for i, (mlp, idx) in enumerate(zip(cfg.layer_mlp_types, cfg.layer_indexer_types)):
        out += _layer_entries(cfg, f"model.layers.{i}", f"layers.{i}", mlp, idx)
    if include_mtp:
        for j in range(cfg.num_mtp_modules):
            hf, ours = f"model.layers.{cfg.num_hidden_layers + j}", f"mtp.{j}"
            out += [_plain(f"{hf}.enorm.weight", f"{ours}.enorm.weight", False),
                    _plain(f"{hf}.hnorm.weight", f"{ours}.hnorm.weight", False),
                    _plain(f"{hf}.eh_proj.weight", f"{ours}.eh_proj.kernel", True),
                    _plain(f"{hf}.shared_head.norm.weight", f"{ours}.norm.weight", False)]
            out += _layer_entries(cfg, hf, f"{ours}.block", cfg.mtp_mlp_type, "full")
    return out


def _variable(model: Model, path: str) -> nnx.Variable:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch tensor; bf16 goes through float32 losslessly
        t = t.detach().cpu()
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
    return np.asarray(t)


# ---- configs -------------------------------------------------------------------------------------------------


def config_from_hf(hf_config, mtp_depth: int = 0, overrides: Mapping[str, Any] | None = None) -> Config:
    """Our `Config` from a `GlmMoeDsaConfig` (same field names); HF has no MTP, so `mtp_depth` defaults to 0."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = {name: getattr(hf_config, name) for name in fields if hasattr(hf_config, name)}
    rope = dict(getattr(hf_config, "rope_parameters", None) or {"rope_theta": 10000.0})
    rope.setdefault("rope_type", "default")
    raw["rope_parameters"] = {k: v for k, v in rope.items()
                              if k in {f.name for f in dataclasses.fields(RopeParameters)}}
    raw["mlp_layer_types"] = list(hf_config.mlp_layer_types)
    raw["indexer_types"] = list(hf_config.indexer_types)
    if hf_config.num_key_value_heads != hf_config.num_attention_heads:
        raise ConfigError("HF config: MLA needs num_key_value_heads == num_attention_heads")
    hf_dtype = str(getattr(hf_config, "dtype", None) or "float32").replace("torch.", "")
    raw["dtype"] = hf_dtype if hf_dtype in DTYPES else "float32"
    raw["mtp_depth"] = mtp_depth
    return config_from_dict({"model": raw}, name="hf", overrides=overrides)


def hf_config(cfg: Config | ModelConfig):
    """A `GlmMoeDsaConfig` for our config (eager attention: the numerical reference)."""
    from transformers import GlmMoeDsaConfig

    m = cfg.model if isinstance(cfg, Config) else cfg
    skip = {"mtp_depth", "mtp_share_weights", "dtype", "rope_parameters", "mlp_layer_types", "indexer_types"}
    kwargs = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in skip}
    return GlmMoeDsaConfig(**kwargs, num_key_value_heads=m.num_attention_heads,
                           rope_parameters=m.rope_parameters.to_dict(), mlp_layer_types=list(m.layer_mlp_types),
                           indexer_types=list(m.layer_indexer_types), attn_implementation="eager")


# ---- weights -------------------------------------------------------------------------------------------------
def from_hf(hf_model_or_state_dict, cfg: Config | ModelConfig, seed: int = 0) -> Model:
    """A `Model` holding HF's weights (cast to cfg.model.dtype). MTP weights load when the state dict has them
    (GLM-5 checkpoint layout); otherwise the MTP modules keep their random init from `seed`."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    sd = hf_model_or_state_dict
    if hasattr(sd, "state_dict"):
        sd = sd.state_dict()
    model = Model(m, rngs=nnx.Rngs(seed))
    has_mtp = m.num_mtp_modules > 0 and f"model.layers.{m.num_hidden_layers}.eh_proj.weight" in sd
    missing = [e.hf_key for e in entries(m, has_mtp) if e.hf_key not in sd]
    if missing:
        raise ConfigError(f"HF state dict does not match the config: {len(missing)} keys missing, e.g. "
                          f"{missing[:3]}; build the config with config_from_hf(hf_model.config)")
    for e in entries(m, has_mtp):
        for path, value in zip(e.ours, e.to_ours(_to_numpy(sd[e.hf_key]))):
            var = _variable(model, path)
            if tuple(var.shape) != value.shape:
                raise ConfigError(f"{e.hf_key}: HF shape {value.shape} != ours {tuple(var.shape)} for {path}; "
                                  "the checkpoint was made for another config")
            var.value = jnp.asarray(value, dtype=var.dtype)
    return model


def to_hf(model: Model, include_mtp: bool = False) -> dict:
    """{HF key: torch.Tensor} in the model's dtype (MTP modules as GLM-5's extra layers if `include_mtp`)."""
    import torch

    out = {}
    for e in entries(model.cfg, include_mtp):
        variables = [_variable(model, p) for p in e.ours]
        arrays = [np.array(v.value.astype(jnp.float32)) for v in variables]
        tensor = torch.from_numpy(np.ascontiguousarray(e.to_hf(*arrays)))
        dtype = torch.float32 if variables[0].dtype == jnp.float32 else torch.bfloat16
        out[e.hf_key] = tensor.to(dtype)
    return out


def to_hf_model(model: Model):
    """An HF `GlmMoeDsaForCausalLM` (eager attention) holding this model's weights, in its dtype."""
    import torch
    from transformers import GlmMoeDsaForCausalLM

    hf = GlmMoeDsaForCausalLM(hf_config(model.cfg)).eval()
    sd = to_hf(model)
    hf.load_state_dict(sd, strict=True)
    if model.cfg.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
        for i, layer in enumerate(hf.model.layers):  # HF keeps the router bias in float32
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.data = sd[
                    f"model.layers.{i}.mlp.gate.e_score_correction_bias"].float()
    return hf
