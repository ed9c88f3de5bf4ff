"""Parameter, byte and FLOP accounting of GLM-5 decode, from the config alone (no weights are allocated).

Batch-1 decode is memory-bound, so every benchmark's roofline is (bytes a step must move through HBM) /
(HBM bandwidth). This module is that denominator and the parameter counts behind it:

- `param_counts`: total parameters (equal to HF `GlmMoeDsaForCausalLM(cfg).parameters()` numel; MTP excluded),
  the MTP modules' parameters, the parameters read per token, and a per-component breakdown.
- `decode_step_breakdown` / `bytes_per_decode_step`: weights read once per step plus the KV-cache traffic of
  absorbed sparse MLA (DESIGN.md sec. 4), for T query tokens (MTP verification) and B sequences.
- `mtp_draft_step_breakdown` / `bytes_per_mtp_draft_step`: one MTP draft step, which is separate from the
  main model's step (the draft runs the MTP block and the shared output head, not the main layers).
- `flops_per_decode_step`: the compute floor (2 x multiply-accumulates).

Shapes follow HF's `modeling_glm_moe_dsa.py`. Axis letters: B batch, T query tokens per sequence, S cached
tokens (`context_len`), D model dim, N attention heads, C latent rank (kv_lora_rank), R rope dim, E routed
experts, K experts per token, V vocab. Run `python -m glm_fast.accounting glm5` for the table.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from glm_fast.config import Config, ConfigError, ModelConfig, load_config

# Bytes per element of the weight/cache dtypes we model. FP8 tensors also carry float32 scales: one per
# 128 x 128 block of a weight matrix and one per 128 elements of a cache row (DeepSeek-V3's FP8 recipe). Weight
# scales are ~0.02% of the FP8 bytes, so they are charged per element count rather than per (ragged) matrix edge.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1}
FP8_SCALE_BYTES = 4
FP8_WEIGHT_BLOCK = 128 * 128
FP8_CACHE_GROUP = 128

WEIGHT_TERMS = ("embedding", "attention", "indexer", "dense_mlp", "router", "routed_experts", "shared_experts",
                "norms", "lm_head")
CACHE_TERMS = ("kv_latent_read", "index_key_read", "cache_write")
_EXPERT_TERMS = ("routed_experts", "shared_experts")


def _model(cfg: Config | ModelConfig) -> ModelConfig:
    if isinstance(cfg, Config):
        return cfg.model
    if isinstance(cfg, ModelConfig):
        return cfg
    raise TypeError(f"expected a glm_fast Config or ModelConfig, got {type(cfg).__name__}")


def _check_dtype(name: str, dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{name}={dtype!r}: use one of {sorted(DTYPE_BYTES)}")


def _check_step(context_len: int, tokens: int, batch: int) -> None:
    if context_len < 1 or tokens < 1 or batch < 1:
        raise ValueError(f"{context_len=}, {tokens=}, {batch=}: all must be positive integers")
    if tokens > context_len:
        raise ValueError(f"{tokens=} > {context_len=}: context_len counts the cache including the step's "
                         "new tokens, so it is at least `tokens`")


def _weight_bytes(count: int, dtype: str) -> int:
    """Bytes of `count` weight elements stored in `dtype` (FP8: plus one float32 scale per 128 x 128 block)."""
    scales = math.ceil(count / FP8_WEIGHT_BLOCK) * FP8_SCALE_BYTES if dtype == "float8_e4m3fn" else 0
    return count * DTYPE_BYTES[dtype] + scales


def _cache_row_bytes(elements: int, dtype: str) -> int:
    """Bytes of one cache row of `elements` values (FP8: plus one float32 scale per 128 elements)."""
    scales = math.ceil(elements / FP8_CACHE_GROUP) * FP8_SCALE_BYTES if dtype == "float8_e4m3fn" else 0
    return elements * DTYPE_BYTES[dtype] + scales


# ---- parameters --------------------------------------------------------------------------------------------


def layer_params(cfg: Config | ModelConfig, mlp_type: str, indexer_type: str,
                 routed_experts: int | None = None) -> dict[str, int]:
    """Parameters of one decoder layer by component, counting `routed_experts` experts (default: all E).

    `norms` holds every normalization vector of the layer: input/post-attention RMSNorms (D each), the MLA
    q_a/kv_a RMSNorms (q_lora_rank, C) and, on "full" indexer layers, the indexer's k_norm LayerNorm (weight
    and bias). The router's `e_score_correction_bias` is a buffer in HF, not a parameter, so it is not counted.
    """
    m = _model(cfg)
    if mlp_type not in ("dense", "sparse"):
        raise ValueError(f"{mlp_type=}: use 'dense' or 'sparse'")
    if indexer_type not in ("full", "shared"):
        raise ValueError(f"{indexer_type=}: use 'full' or 'shared'")
    d, n = m.hidden_size, m.num_attention_heads
    out = dict.fromkeys(WEIGHT_TERMS, 0)
    out["attention"] = (d * m.q_lora_rank                                           # q_a_proj [q_lora, D]
                        + m.q_lora_rank * n * m.qk_head_dim                         # q_b_proj [N(nope+R), q_lora]
                        + d * (m.kv_lora_rank + m.qk_rope_head_dim)                 # kv_a_proj_with_mqa [C+R, D]
                        + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)  # kv_b_proj [N(nope+v), C]
                        + n * m.v_head_dim * d)                                     # o_proj [D, N v]
    out["norms"] = 2 * d + m.q_lora_rank + m.kv_lora_rank
    if indexer_type == "full":
        out["indexer"] = (m.q_lora_rank * m.index_n_heads * m.index_head_dim  # wq_b [heads*head_dim, q_lora]
                          + d * m.index_head_dim                               # wk [head_dim, D]
                          + d * m.index_n_heads)                               # weights_proj [heads, D]
        out["norms"] += 2 * m.index_head_dim                                   # k_norm weight + bias
    if mlp_type == "dense":
        out["dense_mlp"] = 3 * d * m.intermediate_size                         # gate, up, down
    else:
        experts = m.n_routed_experts if routed_experts is None else routed_experts
        out["router"] = m.n_routed_experts * d                                 # gate.weight [E, D]
        out["routed_experts"] = experts * 3 * d * m.moe_intermediate_size      # gate_up [E,2I,D] + down [E,D,I]
        out["shared_experts"] = 3 * d * m.moe_intermediate_size * m.n_shared_experts
    return out


def _sum(parts: Sequence[dict[str, int]]) -> dict[str, int]:
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: sum(part.get(k, 0) for part in parts) for k in keys}


def _layers(m: ModelConfig, routed_experts: int | None) -> dict[str, int]:
    return _sum([layer_params(m, mlp, idx, routed_experts)
                 for mlp, idx in zip(m.layer_mlp_types, m.layer_indexer_types)])


def mtp_module_params(cfg: Config | ModelConfig) -> int:
    """Parameters of one MTP module: enorm + hnorm (D each), eh_proj [D, 2D], one decoder layer with a "full"
    indexer and `mtp_mlp_type` MLP, and its own final norm (D). Embedding and output head are the main model's."""
    m = _model(cfg)
    d = m.hidden_size
    return 2 * d + 2 * d * d + sum(layer_params(m, m.mtp_mlp_type, "full").values()) + d


def active_param_counts(cfg: Config | ModelConfig, tokens: int = 1, batch: int = 1) -> dict[str, int]:
    """Distinct main-model parameters one decode step of `tokens` x `batch` query tokens reads, by component.

    Everything except the routed experts and the embedding is read whole. Routed experts: the distinct experts
    touched per MoE layer, taken at its worst case min(E, T*B*K) (no two tokens share an expert); embedding: one
    row per token, min(V, T*B). The output head is read whole even when tied to the embedding.
    """
    m = _model(cfg)
    if tokens < 1 or batch < 1:
        raise ValueError(f"{tokens=}, {batch=}: both must be positive integers")
    n_tokens = tokens * batch
    out = _layers(m, min(m.n_routed_experts, n_tokens * m.num_experts_per_tok))
    out["embedding"] = min(m.vocab_size, n_tokens) * m.hidden_size
    out["norms"] += m.hidden_size                                   # final norm
    out["lm_head"] = m.vocab_size * m.hidden_size
    out["total"] = sum(out[k] for k in WEIGHT_TERMS)
    return out


def param_counts(cfg: Config | ModelConfig) -> dict[str, int]:
    """Parameter counts of the model, by component, plus `total`, `mtp` and `active_per_token`.

    `total` is the main model only (HF's `GlmMoeDsaForCausalLM` has no MTP weights) and equals the numel of
    HF's parameters; with `tie_word_embeddings` the shared matrix is counted once, under `embedding` (lm_head 0).
    `mtp` is `num_mtp_modules` x `mtp_module_params`. `active_per_token` is `active_param_counts(cfg)["total"]`:
    what one token at batch 1 reads (K routed experts per MoE layer, one embedding row, the whole head).
    """
    m = _model(cfg)
    out = _layers(m, None)
    out["embedding"] = m.vocab_size * m.hidden_size
    out["norms"] += m.hidden_size                                   # final norm
    out["lm_head"] = 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size
    out["total"] = sum(out[k] for k in WEIGHT_TERMS)
    out["mtp"] = m.num_mtp_modules * mtp_module_params(m)
    out["active_per_token"] = active_param_counts(m)["total"]
    return out


# ---- bytes per step ----------------------------------------------------------------------------------------


def layer_step_bytes(cfg: Config | ModelConfig, mlp_type: str, indexer_type: str, context_len: int,
                     dtype: str = "bfloat16", tokens: int = 1, batch: int = 1,
                     expert_dtype: str | None = None) -> dict[str, int]:
    """HBM bytes one decoder layer moves in a decode step, by term (WEIGHT_TERMS + CACHE_TERMS).

    Weights: the layer's active parameters, read once for all T*B tokens (`active_param_counts`' rule for the
    routed experts), in `dtype`; routed and shared experts in `expert_dtype` when given. Cache, per sequence,
    `context_len` = S rows cached including this step's T new ones, in `dtype`:
      kv_latent_read: the latent rows absorbed MLA attends, min(S, T * index_topk) rows of C + R elements
        (each query picks its own top-k; worst case disjoint, the experts' convention);
      index_key_read: on "full" indexer layers the whole index-key cache, S x index_head_dim (read once, all
        T queries scored together);
      cache_write: the T new latent rows (C + R) and, on "full" layers, T new index keys.
    Activations are assumed to stay on chip (the persistent kernel's premise), so they are not counted.
    """
    m = _model(cfg)
    _check_dtype("dtype", dtype)
    expert_dtype = expert_dtype or dtype
    _check_dtype("expert_dtype", expert_dtype)
    _check_step(context_len, tokens, batch)
    params = layer_params(m, mlp_type, indexer_type,
                          min(m.n_routed_experts, tokens * batch * m.num_experts_per_tok))
    out = {k: _weight_bytes(v, expert_dtype if k in _EXPERT_TERMS else dtype) for k, v in params.items()}
    latent_row = _cache_row_bytes(m.kv_lora_rank + m.qk_rope_head_dim, dtype)
    index_row = _cache_row_bytes(m.index_head_dim, dtype) if indexer_type == "full" else 0
    out["kv_latent_read"] = batch * min(context_len, tokens * m.index_topk) * latent_row
    out["index_key_read"] = batch * context_len * index_row
    out["cache_write"] = batch * tokens * (latent_row + index_row)
    return out


def _with_total(terms: dict[str, int]) -> dict[str, int]:
    terms["total"] = sum(v for k, v in terms.items() if k != "total")
    return terms


def decode_step_breakdown(cfg: Config | ModelConfig, context_len: int, dtype: str = "bfloat16",
                          tokens: int = 1, batch: int = 1, expert_dtype: str | None = None) -> dict[str, int]:
    """HBM bytes of one main-model decode step by term, plus `total`: every layer's `layer_step_bytes`, the
    T*B embedding rows read, the final norm and the whole output head. MTP drafting is not included (see
    `bytes_per_mtp_draft_step`); logits written back (T*B*V floats, 0.6 MB per token for GLM-5) are not counted."""
    m = _model(cfg)
    step = (context_len, dtype, tokens, batch, expert_dtype)
    out = _sum([layer_step_bytes(m, mlp, idx, *step)
                for mlp, idx in zip(m.layer_mlp_types, m.layer_indexer_types)])
    out["embedding"] = _weight_bytes(min(m.vocab_size, tokens * batch) * m.hidden_size, dtype)
    out["norms"] += _weight_bytes(m.hidden_size, dtype)
    out["lm_head"] = _weight_bytes(m.vocab_size * m.hidden_size, dtype)
    return _with_total(out)


def bytes_per_decode_step(cfg: Config | ModelConfig, context_len: int, dtype: str = "bfloat16",
                          tokens: int = 1, batch: int = 1, expert_dtype: str | None = None) -> int:
    """The fewest bytes one decode step (T tokens per sequence, B sequences, S = `context_len` cached) must move
    through HBM: the roofline denominator. Terms and conventions: `decode_step_breakdown`."""
    return decode_step_breakdown(cfg, context_len, dtype, tokens, batch, expert_dtype)["total"]


def mtp_draft_step_breakdown(cfg: Config | ModelConfig, context_len: int, dtype: str = "bfloat16",
                             batch: int = 1, expert_dtype: str | None = None) -> dict[str, int]:
    """HBM bytes of one MTP draft step (one module, one draft token per sequence), by term, plus `total`.

    The draft reads one embedding row per sequence, enorm/hnorm/eh_proj (term `eh_proj`; its norms under
    `norms`), one decoder layer with a "full" indexer over its own S-row cache, its final norm, and the shared
    output head again (it is a separate pass, and the head does not fit in L2). Recursive drafting of D tokens
    costs D of these steps.
    """
    m = _model(cfg)
    if m.num_mtp_modules == 0:
        raise ValueError("model.mtp_depth=0: this config has no MTP module to draft with")
    out = layer_step_bytes(m, m.mtp_mlp_type, "full", context_len, dtype, 1, batch, expert_dtype)
    d = m.hidden_size
    out["embedding"] = _weight_bytes(min(m.vocab_size, batch) * d, dtype)
    out["eh_proj"] = _weight_bytes(2 * d * d, dtype)
    out["norms"] += _weight_bytes(3 * d, dtype)                     # enorm, hnorm, final norm
    out["lm_head"] = _weight_bytes(m.vocab_size * d, dtype)
    return _with_total(out)


def bytes_per_mtp_draft_step(cfg: Config | ModelConfig, context_len: int, dtype: str = "bfloat16",
                             batch: int = 1, expert_dtype: str | None = None) -> int:
    """Bytes of one MTP draft step; see `mtp_draft_step_breakdown`."""
    return mtp_draft_step_breakdown(cfg, context_len, dtype, batch, expert_dtype)["total"]


# ---- FLOPs -------------------------------------------------------------------------------------------------


def flops_per_decode_step(cfg: Config | ModelConfig, context_len: int, tokens: int = 1, batch: int = 1) -> int:
    """2 x the multiply-accumulates of one decode step of T*B query tokens over S = `context_len` cached rows.

    Per token: every weight matrix it uses (K routed experts per MoE layer, not the distinct union; absorbed
    MLA's W_uk/W_uv have kv_b_proj's element count; the embedding lookup is free), absorbed attention over
    min(S, index_topk) latent rows (N x (C + R) for scores, N x C for the weighted sum), and on "full" layers
    the indexer over all S keys (heads x head_dim per key plus the per-head weighting). Each query is charged
    the whole S (causality within the T new tokens is ignored); element-wise work (norms, RoPE, softmax,
    activations, top-k) is not counted.
    """
    m = _model(cfg)
    _check_step(context_len, tokens, batch)
    per_token = active_param_counts(m)
    macs = per_token["total"] - per_token["norms"] - per_token["embedding"]
    rows = min(context_len, m.index_topk)
    n_full = m.layer_indexer_types.count("full")
    macs += m.num_hidden_layers * rows * m.num_attention_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
    macs += n_full * context_len * m.index_n_heads * (m.index_head_dim + 1)
    return 2 * tokens * batch * macs


# ---- command line ------------------------------------------------------------------------------------------


def _ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _unit(largest: float, units: Sequence[tuple[float, str]]) -> tuple[float, str]:
    """The biggest (divisor, label) of `units` (ascending) that keeps `largest` >= 1, so a column reads well."""
    chosen = units[0]
    for divisor, label in units:
        if largest >= divisor:
            chosen = (divisor, label)
    return chosen


_COUNT_UNITS = ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "B"))
_BYTE_UNITS = ((1.0, "B"), (1e3, "kB"), (1e6, "MB"), (1e9, "GB"))
_TIME_UNITS = ((1e-9, "ns"), (1e-6, "us"), (1e-3, "ms"), (1.0, "s"))


def format_report(cfg: Config, contexts: Sequence[int], hbm_tb_s: float,
                  expert_dtype: str = "float8_e4m3fn") -> str:
    """The human-readable accounting table `main` prints; contexts are clamped to max_position_embeddings."""
    m = cfg.model
    counts = param_counts(m)
    active = active_param_counts(m)
    n_moe = m.layer_mlp_types.count("sparse")
    n_full = m.layer_indexer_types.count("full")
    lines = [
        f"{cfg.name}: {m.num_hidden_layers} layers ({m.num_hidden_layers - n_moe} dense, {n_moe} MoE; "
        f"{n_full} full indexers), {m.n_routed_experts} experts top-{m.num_experts_per_tok} + "
        f"{m.n_shared_experts} shared, D={m.hidden_size}, V={m.vocab_size}",
        "",
    ]
    div, unit = _unit(counts["total"], _COUNT_UNITS)
    lines.append(f"{'parameters (' + (unit or 'count') + ')':<28}{'total':>12}{'read / token':>14}")
    for key in WEIGHT_TERMS:
        lines.append(f"  {key:<26}{counts[key] / div:>12.3f}{active[key] / div:>14.3f}")
    lines += [
        f"  {'total (MTP excluded)':<26}{counts['total'] / div:>12.3f}{counts['active_per_token'] / div:>14.3f}",
        f"  {f'MTP ({m.num_mtp_modules} module(s))':<26}{counts['mtp'] / div:>12.3f}",
    ]

    kept = sorted({min(c, m.max_position_embeddings) for c in contexts})
    if max(contexts) > m.max_position_embeddings:
        lines += ["", f"(contexts clamped to max_position_embeddings={m.max_position_embeddings})"]
    rows = []
    for ctx in kept:
        bf16 = bytes_per_decode_step(m, ctx)
        fp8 = bytes_per_decode_step(m, ctx, expert_dtype=expert_dtype)
        draft = bytes_per_mtp_draft_step(m, ctx) if m.num_mtp_modules else None
        rows.append((ctx, bf16, fp8, draft, flops_per_decode_step(m, ctx)))
    largest = max(r[1] for r in rows)
    bdiv, bunit = _unit(largest, _BYTE_UNITS)
    tdiv, tunit = _unit(largest / (hbm_tb_s * 1e12), _TIME_UNITS)
    fdiv, funit = _unit(max(r[4] for r in rows), ((1.0, "FLOP"), (1e6, "MFLOP"), (1e9, "GFLOP")))
    floor = f"floor {tunit}"
    lines += [
        "",
        f"decode step, batch 1, 1 token: bytes through HBM ({bunit}), time floor at {hbm_tb_s:g} TB/s, compute",
        f"{'context':<10}{'bf16':>10}{floor:>12}{'fp8 experts':>13}{floor:>12}{'MTP draft':>11}{funit:>10}",
    ]
    for ctx, bf16, fp8, draft, flops in rows:
        draft_text = f"{draft / bdiv:>11.3f}" if draft is not None else f"{'-':>11}"
        lines.append(f"{_ctx_label(ctx):<10}{bf16 / bdiv:>10.3f}{bf16 / (hbm_tb_s * 1e12) / tdiv:>12.2f}"
                     f"{fp8 / bdiv:>13.3f}{fp8 / (hbm_tb_s * 1e12) / tdiv:>12.2f}{draft_text}{flops / fdiv:>10.2f}")

    ctx = kept[0]
    terms = decode_step_breakdown(m, ctx)
    lines += ["", f"where the bytes go (bf16, context {_ctx_label(ctx)}, {bunit})"]
    for key in WEIGHT_TERMS + CACHE_TERMS:
        lines.append(f"  {key:<26}{terms[key] / bdiv:>10.4f}{100 * terms[key] / terms['total']:>7.1f} %")
    if n_moe:
        layer = layer_step_bytes(m, "sparse", "full", ctx)
        lines.append(f"  {'one MoE layer (full idx)':<26}{sum(layer.values()) / bdiv:>10.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="preset name (glm5, glm5_slice, small, tiny) or path to a .yaml file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set model.index_topk=1024 (repeatable)")
    parser.add_argument("--hbm-tb-s", type=float, default=4.28,
                        help="HBM bandwidth for the time floor, TB/s (default: H200 device copy, DESIGN.md sec. 7)")
    parser.add_argument("--contexts", default="4096,32768,131072",
                        help="comma-separated cached-token counts (default 4096,32768,131072)")
    args = parser.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        contexts = []
    if not contexts or min(contexts) < 1:
        parser.error(f"--contexts={args.contexts!r}: give comma-separated positive integers, e.g. 4096,32768")
    if args.hbm_tb_s <= 0:
        parser.error(f"--hbm-tb-s={args.hbm_tb_s}: must be > 0")
    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as err:
        parser.error(str(err))
    print(format_report(cfg, contexts, args.hbm_tb_s))


if __name__ == "__main__":
    main()
