"""Trains a GLM-5-style model with D multi-token-prediction heads on the CPython standard library (DESIGN.md sec. 6).

    python experiments/train_mtp.py --config tiny --run-dir runs/tiny --set train.steps=100
    python experiments/train_mtp.py --config tiny --run-dir runs/tiny --resume      # continue after a crash

The run directory gets config.yaml, metrics.jsonl, tb/ (TensorBoard), checkpoints/ (orbax, atomic, resumable;
`glm_fast.train.load_model(run_dir)` loads the latest), and at the end metrics.json (the experiment schema:
provenance, config, one row with final train/val losses, per-depth MTP losses/accuracies, tokens/s) and
loss_curve.png. All logic lives in `glm_fast.train`.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import shlex
import sys

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT))

from glm_fast import load_config, results  # noqa: E402
from glm_fast.train import read_jsonl, train  # noqa: E402
from glm_fast.train.loop import DEFAULT_CACHE_DIR  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="preset name (configs/<name>.yaml) or a YAML path")
    p.add_argument("--run-dir", required=True, help="where config, metrics, TensorBoard and checkpoints go")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set train.steps=100)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--corpus-root", default=None,
                   help="train on the .py files under this directory instead of the standard library")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="tokenizer and token-stream cache")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _median_rate(records: list[dict]):
    """Median logged tokens/s of the whole run (for an invocation that trained no step itself)."""
    rates = sorted(r["train/tokens_per_s"] for r in records if r.get("kind") == "train"
                   and r.get("train/tokens_per_s") is not None)
    return rates[len(rates) // 2] if rates else None


def plot_losses(records: list[dict], path: pathlib.Path) -> None:
    """Train main/MTP losses per log step and validation losses per eval, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_recs = [r for r in records if r.get("kind") == "train"]
    eval_recs = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train_recs:
        steps = [r["step"] for r in train_recs]
        ax.plot(steps, [r["train/main_loss"] for r in train_recs], label="train main", color="C0")
        depth = sum(1 for k in train_recs[0] if k.startswith("train/mtp_loss_k"))
        for k in range(1, depth + 1):
            ax.plot(steps, [r[f"train/mtp_loss_k{k}"] for r in train_recs], label=f"train MTP k={k}",
                    color=f"C{k}", alpha=0.7)
    if eval_recs:
        steps = [r["step"] for r in eval_recs]
        ax.plot(steps, [r["val/main_loss"] for r in eval_recs], "o--", label="val main", color="C0")
        depth = sum(1 for k in eval_recs[0] if k.startswith("val/mtp_loss_k"))
        for k in range(1, depth + 1):
            ax.plot(steps, [r[f"val/mtp_loss_k{k}"] for r in eval_recs], "s--", label=f"val MTP k={k}",
                    color=f"C{k}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_row(cfg, records: list[dict], result) -> dict:
    """The experiment row: final train (last log window) and val losses, per-depth numbers, throughput."""
    train_last = next((r for r in reversed(records) if r.get("kind") == "train"), {})
    val_last = next((r for r in reversed(records) if r.get("kind") == "eval"), {})
    depth = cfg.model.mtp_depth

    def per_depth(rec, key):
        return [rec.get(f"{key}_k{k}") for k in range(1, depth + 1)]

    return {
        "backend": "xla", "layout": f"data_parallel_{result.devices}", "batch": cfg.train.batch_size,
        "context_len": cfg.train.seq_len, "mtp_depth": depth, "steps": result.step,
        "tokens_seen": result.step * cfg.train.batch_size * cfg.train.seq_len,
        "final_train_loss": train_last.get("train/loss"), "final_train_main_loss": train_last.get("train/main_loss"),
        "final_train_mtp_losses": per_depth(train_last, "train/mtp_loss"),
        "final_val_loss": val_last.get("val/loss"), "final_val_main_loss": val_last.get("val/main_loss"),
        "final_val_main_acc": val_last.get("val/main_acc"),
        "final_val_mtp_losses": per_depth(val_last, "val/mtp_loss"),
        "final_val_mtp_accs": per_depth(val_last, "val/mtp_acc"),
        "val_step": val_last.get("step"),
        "tokens_per_s": _finite(result.tokens_per_s) or _median_rate(records),
        "compile_s": _finite(result.compile_s),
        "wall_s": result.wall_s, "resumed_from_step": result.start_step,
    }


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = load_config(args.config, overrides=args.set)
    corpus = None
    if args.corpus_root:
        from glm_fast.data import load_corpus
        corpus = load_corpus(cfg.train.val_fraction, args.corpus_root)
    result = train(cfg, args.run_dir, resume=args.resume, corpus=corpus, cache_dir=args.cache_dir,
                   progress=not args.no_progress)
    run_dir = pathlib.Path(args.run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")  # the whole run, across resumes
    record = results.result("train_mtp", {"name": cfg.name, "overrides": args.set, "resolved": cfg.to_dict()},
                            [summary_row(cfg, records, result)], extra_versions=("orbax-checkpoint", "grain"),
                            run_dir=str(run_dir), corpus=args.corpus_root or "cpython-stdlib")
    record["command"] = shlex.join(["python", "experiments/train_mtp.py", *argv])
    path = results.write(record, run_dir, "metrics")
    plot_losses(records, run_dir / "loss_curve.png")
    row = record["rows"][0]
    print(f"step {row['steps']}: train loss {row['final_train_loss']}, val loss {row['final_val_loss']} "
          f"(main {row['final_val_main_loss']}, MTP {row['final_val_mtp_losses']}), "
          f"{row['tokens_per_s']} tokens/s; wrote {path}", flush=True)
    return record


if __name__ == "__main__":
    from glm_fast.config import ConfigError
    from glm_fast.train import CheckpointError

    try:
        main()
    except (ConfigError, CheckpointError) as err:  # a user error: the message says what to change
        sys.exit(f"error: {err}")
