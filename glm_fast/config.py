"""Configs: frozen dataclasses loaded from `configs/*.yaml`, with dotted overrides and validation.

A config has one section per concern. `model` names every architecture field exactly as HF's
`GlmMoeDsaConfig` does (so `glm_fast.convert.config_from_hf` is a field-by-field copy), plus the fields HF
has no notion of (`mtp_depth`, `mtp_share_weights`, `dtype`). Other sections: `train`, `decode`, `parallel`.

    cfg = load_config("tiny", overrides={"model.index_topk": 8})
    cfg.model.qk_head_dim        # derived sizes are properties

Every error names the field and says how to fix it; unknown keys are rejected (with a close-match hint).
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import typing
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
PACKAGED_CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "configs"


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """RoPE settings, as HF's `rope_parameters` dict ("default" or "yarn" as in `_compute_yarn_parameters`)."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def validate(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(f"model.rope_parameters.rope_type={self.rope_type!r}: use 'default' or 'yarn'")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_parameters.rope_theta={self.rope_theta}: must be > 0")
        if self.rope_type == "yarn" and (self.factor is None or self.factor <= 0):
            raise ConfigError("model.rope_parameters.factor: yarn needs a positive scaling factor")

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.rope_type == "default":
            out.pop("truncate")  # a YaRN-only setting (HF warns about it elsewhere)
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """GLM-5 architecture (HF `GlmMoeDsaConfig` names) plus multi-token prediction and dtype."""

    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int = 2048
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 202752
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters = RopeParameters(rope_theta=1e6)
    first_k_dense_replace: int = 3
    mlp_layer_types: tuple[str, ...] | None = None  # "dense" | "sparse"; None: first_k_dense_replace dense
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    indexer_types: tuple[str, ...] | None = None  # "full" | "shared"; None: all "full"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Not in HF: multi-token prediction (DeepSeek-V3 sec. 2.2) and parameter dtype.
    mtp_depth: int = 1
    mtp_share_weights: bool = True  # True: one MTP module applied D times (GLM-5); False: D modules
    dtype: str = "bfloat16"

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def layer_mlp_types(self) -> tuple[str, ...]:
        if self.mlp_layer_types is not None:
            return tuple(self.mlp_layer_types)
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        return ("dense",) * n_dense + ("sparse",) * (self.num_hidden_layers - n_dense)

    @property
    def layer_indexer_types(self) -> tuple[str, ...]:
        if self.indexer_types is not None:
            return tuple(self.indexer_types)
        return ("full",) * self.num_hidden_layers

    @property
    def num_mtp_modules(self) -> int:
        if self.mtp_depth == 0:
            return 0
        return 1 if self.mtp_share_weights else self.mtp_depth

    @property
    def has_moe(self) -> bool:
        return "sparse" in self.layer_mlp_types

    @property
    def mtp_mlp_type(self) -> str:
        """MTP blocks use the model's MoE block when it has one (DeepSeek-V3 / GLM-5 layer 78)."""
        return "sparse" if self.has_moe else "dense"

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_routed_experts", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
            "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok",
            "max_position_embeddings", "index_topk", "index_head_dim", "index_n_heads",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)}: must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "mtp_depth"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)}: must be >= 0")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rms_norm_eps={self.rms_norm_eps}: must be > 0")
        if self.hidden_act != "silu":
            raise ConfigError(f"model.hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is implemented")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: use 'float32' or 'bfloat16'")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim}: RoPE rotates pairs, use an even size")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError(
                f"model.qk_rope_head_dim={self.qk_rope_head_dim} > model.index_head_dim={self.index_head_dim}: "
                "the indexer rotates its first qk_rope_head_dim dims; raise index_head_dim or lower the rope dim")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} > model.n_routed_experts="
                f"{self.n_routed_experts}: a token cannot pick more experts than exist")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"model.n_routed_experts={self.n_routed_experts} is not divisible by model.n_group={self.n_group}: "
                "choose n_group dividing the expert count")
        if self.topk_group > self.n_group:
            raise ConfigError(f"model.topk_group={self.topk_group} > model.n_group={self.n_group}: "
                              "cannot keep more groups than exist")
        per_group = self.n_routed_experts // self.n_group
        if self.has_moe and per_group < 2:
            raise ConfigError(f"model.n_routed_experts/n_group={per_group}: group scores sum each group's top 2, "
                              "so every group needs >= 2 experts; lower n_group")
        if self.has_moe and self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} > topk_group*experts_per_group="
                f"{self.topk_group * per_group}: raise topk_group or lower num_experts_per_tok")
        if self.mlp_layer_types is not None:
            if len(self.mlp_layer_types) != self.num_hidden_layers:
                raise ConfigError(f"model.mlp_layer_types has {len(self.mlp_layer_types)} entries for "
                                  f"num_hidden_layers={self.num_hidden_layers}: give one per layer")
            bad = sorted(set(self.mlp_layer_types) - {"dense", "sparse"})
            if bad:
                raise ConfigError(f"model.mlp_layer_types has {bad}: each entry must be 'dense' or 'sparse'")
        if self.indexer_types is not None:
            if len(self.indexer_types) != self.num_hidden_layers:
                raise ConfigError(f"model.indexer_types has {len(self.indexer_types)} entries for "
                                  f"num_hidden_layers={self.num_hidden_layers}: give one per layer")
            bad = sorted(set(self.indexer_types) - {"full", "shared"})
            if bad:
                raise ConfigError(f"model.indexer_types has {bad}: each entry must be 'full' or 'shared'")
            if self.indexer_types[0] == "shared":
                raise ConfigError("model.indexer_types[0]='shared': the first layer has no previous top-k to "
                                  "reuse; make it 'full'")
        self.rope_parameters.validate()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training run settings (`experiments/train_mtp.py`)."""

    seq_len: int = 256
    batch_size: int = 8
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    mtp_lambda: float = 0.3
    compute_dtype: str = "bfloat16"
    router_bias_update_rate: float = 1e-3  # DeepSeek-V3 aux-loss-free balancing speed (gamma)
    seq_aux_loss_weight: float = 0.0       # optional sequence-wise balance loss (alpha)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    val_fraction: float = 0.05
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE, `tokenizers`) or "bytes"

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}: must be in [0, train.steps={self.steps}]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.compute_dtype={self.compute_dtype!r}: use 'float32' or 'bfloat16'")
        if self.tokenizer not in ("bpe", "bytes"):
            raise ConfigError(f"train.tokenizer={self.tokenizer!r}: use 'bpe' or 'bytes'")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decode engine defaults (`glm_fast.Engine`, `glm-fast generate`)."""

    backend: str = "xla"
    max_len: int = 4096
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    speculative_depth: int = 0
    seed: int = 0

    def validate(self) -> None:
        if self.max_len <= 0 or self.max_new_tokens <= 0:
            raise ConfigError("decode.max_len and decode.max_new_tokens must be positive")
        if self.temperature < 0:
            raise ConfigError(f"decode.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"decode.top_p={self.top_p}: must be in (0, 1]")
        if self.speculative_depth < 0:
            raise ConfigError(f"decode.speculative_depth={self.speculative_depth}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Multi-device role layout (`glm_fast.parallel`)."""

    layout: str = "hetero"  # "hetero" (index worker + MLA workers) | "homogeneous" (TP attention + EP experts)
    num_devices: int = 0    # 0: all local devices

    def validate(self) -> None:
        if self.num_devices < 0:
            raise ConfigError(f"parallel.num_devices={self.num_devices}: must be >= 0 (0 = all devices)")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run's config: one section per concern, plus the preset name it came from."""

    name: str = "custom"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()
    parallel: ParallelConfig = ParallelConfig()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"]["rope_parameters"] = self.model.rope_parameters.to_dict()
        for key in ("mlp_layer_types", "indexer_types"):
            if out["model"][key] is not None:
                out["model"][key] = list(out["model"][key])
        return out


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "decode": DecodeConfig, "parallel": ParallelConfig}


def _unknown(key: str, where: str, valid: Sequence[str]) -> ConfigError:
    hint = difflib.get_close_matches(key, valid, n=1)
    fix = f"did you mean {hint[0]!r}?" if hint else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {where}{key!r}: {fix}")


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """YAML reads `1e-4` as a string and `3` as an int: coerce to the field's scalar type or fail clearly."""
    options = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name}=null: a value is required")
    for kind in (bool, int, float, str):
        if kind in options:
            break
    else:
        return tuple(value) if isinstance(value, list) else value
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, str):
            return int(value)
    except ValueError:
        pass
    raise ConfigError(f"{name}={value!r}: expected {kind.__name__}")


def _build(cls: type, raw: Mapping[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(key, where, list(fields))
        if key == "rope_parameters":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}rope_parameters: expected a mapping like {{rope_theta: 10000.0}}")
            value = _build(RopeParameters, value, f"{where}rope_parameters.")
        else:
            value = _coerce(f"{where}{key}", hints[key], value)
        kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if parts[0] not in _SECTIONS and parts[0] != "name":
        raise _unknown(parts[0], "section ", list(_SECTIONS))
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`'model.index_topk=512'` -> `('model.index_topk', 512)`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. model.index_topk=512")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def resolve_config_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """A bare name like `tiny` resolves to `configs/tiny.yaml`; anything else is a path."""
    path = pathlib.Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    for folder in (CONFIG_DIR, PACKAGED_CONFIG_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named {str(name_or_path)!r}: use one of {known} or a path to a .yaml file")


def config_from_dict(raw: Mapping[str, Any], name: str = "custom",
                     overrides: Mapping[str, Any] | None = None) -> Config:
    """Builds and validates a `Config` from a nested dict (as read from YAML) plus dotted overrides."""
    raw = yaml.safe_load(yaml.safe_dump(dict(raw)))  # deep copy into plain containers
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    name = raw.pop("name", name)
    sections = {}
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise _unknown(key, "section ", list(_SECTIONS))
        sections[key] = _build(_SECTIONS[key], value or {}, f"{key}.")
    cfg = Config(name=name, **sections)
    for section in _SECTIONS:
        getattr(cfg, section).validate()
    return cfg


def load_config(name_or_path: str | pathlib.Path | Config,
                overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Config:
    """Loads a preset (`"tiny"`) or YAML file, applies dotted overrides, validates, returns a frozen `Config`.

    `overrides` is `{"model.index_topk": 512}` or a list of `"model.index_topk=512"` strings (the CLI's `--set`).
    """
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    if isinstance(name_or_path, Config):
        return config_from_dict(name_or_path.to_dict(), name_or_path.name, overrides)
    path = resolve_config_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, train, ...)")
    return config_from_dict(raw, raw.get("name", path.stem), overrides)
