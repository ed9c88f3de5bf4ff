"""MTP self-speculative decoding on held-out code: mean accepted tokens per step vs depth D (DESIGN.md sec. 6).

    python experiments/mtp_acceptance.py --checkpoint runs/tiny --depths 1,2 --num-prompts 16 --max-new-tokens 64
    python experiments/mtp_acceptance.py --random-init --config tiny --num-prompts 4      # smoke run, no checkpoint

Prompts: the first --num-lines lines of --num-prompts validation-split files (`held_out_prompts`), tokenized with
the checkpoint's tokenizer after a bos token. For greedy and sampled (--temperature) decoding, and each D in
--depths (capped at the model's mtp_depth) plus D = 0 as the baseline, one batched `Engine.generate` call gives:
accepted tokens per step (1 + accepted drafts, averaged over every sequence's steps), P(draft k accepted),
tokens/s, and the speedup in steps (plain steps / speculative steps, summed over the prompts). No stop tokens, so
every sequence makes exactly --max-new-tokens tokens. Writes one JSON (experiment "mtp_acceptance", one row per
(D, mode)) and prints a table.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT))

from glm_fast import results  # noqa: E402
from glm_fast.sweep import acceptance_rows, add_model_source_args, held_out_ids, load_model_source  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_source_args(p)
    p.add_argument("--depths", default="1,2,3", help="comma list of speculative depths (capped at mtp_depth)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--num-lines", type=int, default=4, help="lines of each held-out file in its prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="for the sampled rows (greedy rows: 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--backend", default="xla")
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    p.add_argument("--name", default=None, help="result file name (default mtp_acceptance_<date>)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    depths = sorted({int(d) for d in args.depths.split(",") if d.strip()})
    model, cfg, tokenizer = load_model_source(args)
    if cfg.model.mtp_depth == 0:
        print(f"note: {cfg.name} has no MTP heads (model.mtp_depth=0): only the D=0 baseline runs", flush=True)
    capped = sorted({min(d, cfg.model.mtp_depth) for d in depths} - {0})
    if capped != [d for d in depths if d]:
        print(f"note: depths {depths} capped at model.mtp_depth={cfg.model.mtp_depth} -> {capped}", flush=True)
    prompts = held_out_ids(cfg, tokenizer, args.num_prompts, args.num_lines, args.corpus_root)
    print(f"{len(prompts)} held-out prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens", flush=True)
    rows = acceptance_rows(model, cfg, prompts, capped, [0.0, args.temperature], args.max_new_tokens,
                           args.backend, args.top_p, args.seed,
                           log=lambda r: print(f"  D={r['mtp_depth']} {r['mode']}: {r['accepted_per_step']:.3f} "
                                               f"accepted/step, {r['tokens_per_s']:.1f} tokens/s", flush=True))
    source = ({"checkpoint": str(args.checkpoint), "step": args.step} if args.checkpoint
              else {"random_init": True, "seed": args.seed})
    record = results.result("mtp_acceptance", {"name": cfg.name, "overrides": args.set, "resolved": cfg.to_dict()},
                            rows, weights="checkpoint" if args.checkpoint else "random", **source,
                            prompts={"split": "validation", "num_prompts": len(prompts),
                                     "num_lines": args.num_lines, "corpus": args.corpus_root or "cpython-stdlib",
                                     "tokenizer": tokenizer.kind, "lengths": [len(p) for p in prompts]},
                            max_new_tokens=args.max_new_tokens)
    path = results.write(record, args.out, args.name)
    print(f"\n{'D':>2} {'mode':>8} {'acc/step':>9} {'P(k acc), k=1..D':>24} {'tok/s':>8} {'ms/step':>8} "
          f"{'step x':>7} {'tok/s x':>8}")
    for r in rows:
        by_depth = " ".join(f"{p:.2f}" for p in r["acceptance_by_depth"]) or "-"
        print(f"{r['mtp_depth']:>2} {r['mode']:>8} {r['accepted_per_step']:9.3f} {by_depth:>24} "
              f"{r['tokens_per_s']:8.1f} {r['ms_per_step']:8.2f} {r['speedup_steps']:7.2f} "
              f"{r['speedup_tokens_per_s']:8.2f}")
    print("wrote", path)
    return record


if __name__ == "__main__":
    from glm_fast.config import ConfigError
    from glm_fast.train import CheckpointError

    try:
        main()
    except (ConfigError, CheckpointError, ValueError) as err:  # user errors: the message says what to change
        sys.exit(f"error: {err}")
