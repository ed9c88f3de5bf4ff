"""`glm-fast` command line: `generate` (the main job) and `accounting`.

    glm-fast generate --prompt "def fibonacci(n):"             # the shipped demo model, CPU is fine
    glm-fast generate --config tiny --random-init --prompt-ids 1,2,3 --speculative 2 --json

Bad input (prompt longer than the context, unknown backend, missing or mismatched checkpoint, bad config values)
ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

DEMO_CHECKPOINT = pathlib.Path(__file__).resolve().parent / "assets" / "demo"


class CLIError(ValueError):
    """A user error the CLI reports in one line."""


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--prompt-ids {text!r}: give integers separated by commas, e.g. 1,2,3") from None


def _load(args):
    """(model, config, tokenizer) from --checkpoint, --random-init, or the shipped demo model."""
    from flax import nnx

    from glm_fast import Model, load_config
    from glm_fast.data import bytes_tokenizer

    if args.random_init:
        cfg = load_config(args.config or "tiny", overrides=args.set)
        tokenizer = bytes_tokenizer() if cfg.model.vocab_size >= bytes_tokenizer().vocab_size else None
        return Model(cfg.model, rngs=nnx.Rngs(args.seed)), cfg, tokenizer
    from glm_fast.train import load_model

    path = pathlib.Path(args.checkpoint) if args.checkpoint else DEMO_CHECKPOINT
    if not args.checkpoint and not path.exists():
        raise CLIError("the shipped demo model is missing from this install: pass --checkpoint DIR or --random-init")
    model, cfg, tokenizer = load_model(path)
    if args.config:
        wanted = load_config(args.config, overrides=args.set).model
        if wanted != cfg.model:
            diff = [f for f in type(wanted).__dataclass_fields__ if getattr(wanted, f) != getattr(cfg.model, f)]
            raise CLIError(f"checkpoint {str(path)!r} does not match --config {args.config} (fields {diff[:5]}): "
                           "drop --config to use the checkpoint's own, or pick the matching checkpoint")
    return model, cfg, tokenizer


def _persistent_options(cfg, backend: str, expert_format: str):
    """The persistent kernel's ScheduleOptions for --expert-format (None: the engine's default, bf16)."""
    if expert_format == "bf16":
        return None
    if backend != "persistent":
        raise CLIError(f"--expert-format {expert_format}: FP8 routed experts run in the persistent backend only: "
                       f"add --backend persistent (got {backend!r})")
    import jax

    from pallas_kernels.persistent.kernel import default_options
    from pallas_kernels.persistent.tiles import TileConfig
    return default_options(cfg.model, jax.default_backend() != "gpu", TileConfig(), expert_format=expert_format)


def cmd_generate(args) -> int:
    from glm_fast import Engine

    model, cfg, tokenizer = _load(args)
    if args.prompt_ids is not None:
        prompt = _parse_ids(args.prompt_ids)
    else:
        if tokenizer is None:
            raise CLIError(f"config {cfg.name} has a {cfg.model.vocab_size}-token vocabulary and no tokenizer: "
                           "use --prompt-ids")
        prompt = [cfg.model.bos_token_id] if cfg.model.bos_token_id is not None else []
        prompt += tokenizer.encode(args.prompt)
    max_len = args.max_len or cfg.decode.max_len
    backend = args.backend or cfg.decode.backend
    engine = Engine(model, backend=backend, max_len=max_len, compilation_cache=args.cache_dir,
                    persistent_options=_persistent_options(cfg, backend, args.expert_format))
    stops = [cfg.model.eos_token_id] if cfg.model.eos_token_id is not None and not args.ignore_eos else []
    generated: list[int] = []
    printed = ""

    def stream(_, new):
        nonlocal printed
        generated.extend(new)
        if tokenizer is None:
            sys.stdout.write(" ".join(map(str, new)) + " ")
        else:
            text = tokenizer.decode([t for t in generated if t not in stops])
            sys.stdout.write(text[len(printed):])
            printed = text
        sys.stdout.flush()

    if not args.json and tokenizer is not None and args.prompt_ids is None:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    out = engine.generate(prompt, args.max_new_tokens or cfg.decode.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, speculative_depth=args.speculative,
                          seed=args.seed, stop_tokens=stops, callback=None if args.json else stream)
    total_s = time.perf_counter() - t0
    s = out.stats
    if args.json:
        text = tokenizer.decode([t for t in out.tokens if t not in stops]) if tokenizer else None
        print(json.dumps({"config": cfg.name, "prompt_ids": prompt, "tokens": out.tokens, "text": text,
                          "stats": s, "total_s": total_s}))
    else:
        print(f"\n[glm-fast] {s['new_tokens']} tokens in {total_s:.2f} s | {s['tokens_per_s']:.1f} tokens/s | "
              f"{s['accepted_per_step']:.2f} accepted/step | TTFT {s['time_to_first_token_s']:.2f} s | "
              f"backend {engine.backend} | {cfg.name}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens with the decode engine")
    g.add_argument("--config", help="preset name (configs/NAME.yaml) or YAML path")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint directory (default: the shipped demo model)")
    src.add_argument("--random-init", action="store_true", help="random weights from --seed")
    g.add_argument("--seed", type=int, default=0)
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="def ", help="text, through the model's tokenizer")
    prompt.add_argument("--prompt-ids", help="token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--speculative", type=int, default=0, metavar="D", help="MTP draft depth (0 = off)")
    g.add_argument("--backend", help="decode backend (xla, ...)")
    g.add_argument("--expert-format", choices=("bf16", "fp8"), default="bf16",
                   help="routed experts' weights in the persistent backend (fp8: e4m3 + 128 x 128 block scales)")
    g.add_argument("--max-len", type=int, help="context length of the cache")
    g.add_argument("--cache-dir", help="JAX compilation cache (default ~/.cache/glm_fast/jax)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)
    a = sub.add_parser("accounting", help="parameter counts and bytes per decode step of a config")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    a.set_defaults(func=lambda args: __import__("glm_fast.accounting", fromlist=["main"]).main(args.rest))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # ConfigError, GenerationError, CheckpointError, ...: clear text
        print(f"glm-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
