"""Sweeps (DESIGN.md sec. 6): a YAML file of config overrides -> one run per point, results.jsonl, table, plots.

    sweep = load_sweep("configs/sweeps/index_topk.yaml")
    run_sweep(sweep, "experiments/results/sweeps/index_topk")    # resumable: finished points are skipped

A sweep file:

    name: index_topk
    base: tiny                      # a preset name or a YAML path
    kind: decode                    # decode | train | acceptance (see RUN_KINDS)
    overrides: {model.mtp_depth: 1} # fixed dotted overrides, applied to every point
    grid: {model.index_topk: [8, 16], run.prompt_len: [64, 256]}   # cartesian product, or
    points: [{model.index_topk: 8}, {model.index_topk: 16}]        # a list of points
    seeds: [0]
    run: {batch: 1, max_new_tokens: 16}                             # the kind's settings

Axis and override keys are dotted config fields (`model.index_topk`, `train.mtp_lambda`, `decode.backend`,
`parallel.layout`, ...) or `run.<setting>` for the kind's own settings (`run.prompt_len`, `run.batch`); an
unknown key fails before any run with an error that names it. Each finished run appends one JSON line (config
name + overrides, point, seed, metrics, versions, machine, git commit); a point whose key (overrides + seed)
already has an "ok" line is skipped, so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import pathlib
import time
import traceback
import typing
from typing import Any, Callable

import yaml

from glm_fast import config as config_lib
from glm_fast import results

SWEEP_DIR = config_lib.CONFIG_DIR / "sweeps"
RESULTS_FILE = "results.jsonl"


class SweepError(ValueError):
    """A sweep file is malformed; the message names the file, the key and the fix."""


# ---- run kinds -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecodeRun:
    """Random-init model from the config; `Engine.generate` on random prompts. Backend, temperature, top_p and
    speculative depth come from the config's `decode` section (depth capped at `model.mtp_depth`)."""

    batch: int = 1
    prompt_len: int = 32
    max_new_tokens: int = 16
    repeats: int = 1   # generate calls after the first; the metrics are their medians (0: the first call only)


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """`glm_fast.train.train` for `train.steps` steps into `<out>/runs/<run id>`; records the final losses.
    `acceptance_prompts` > 0 then measures greedy MTP acceptance at depth `model.mtp_depth` on held-out prompts."""

    corpus_root: str | None = None   # a directory of .py files (relative: under the stdlib); None: the stdlib
    cache_dir: str | None = None     # tokenizer/token-stream cache; None: ~/.cache/glm_fast
    acceptance_prompts: int = 0
    acceptance_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class AcceptanceRun:
    """MTP acceptance of a trained checkpoint (or a random-init model) on held-out prompts, at depth
    `decode.speculative_depth` (0: `model.mtp_depth`) and temperature `decode.temperature`. With a checkpoint
    the model comes from it, so only `decode.*` overrides apply."""

    checkpoint: str | None = None
    num_prompts: int = 8
    num_lines: int = 4
    max_new_tokens: int = 32
    corpus_root: str | None = None


def _engine_max_len(prompt_len: int, new_tokens: int, depth: int) -> int:
    return prompt_len + new_tokens + depth + 2


def run_decode(cfg, run: DecodeRun, seed: int, run_dir: pathlib.Path) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from glm_fast import Engine, Model

    del run_dir
    depth = min(cfg.decode.speculative_depth, cfg.model.mtp_depth)
    model = Model(cfg.model, rngs=nnx.Rngs(seed))
    jax.block_until_ready(nnx.state(model))
    rng = np.random.default_rng(seed)
    low = 3 if cfg.model.vocab_size > 3 else 0  # skip bos/eos/pad ids
    prompts = rng.integers(low, cfg.model.vocab_size, (run.batch, run.prompt_len)).tolist()
    engine = Engine(model, backend=cfg.decode.backend,
                    max_len=_engine_max_len(run.prompt_len, run.max_new_tokens, depth), compilation_cache=False)
    stats = []
    for i in range(1 + run.repeats):
        out = engine.generate(prompts, run.max_new_tokens, temperature=cfg.decode.temperature,
                              top_p=cfg.decode.top_p, speculative_depth=depth, seed=seed + i)
        stats.append(out.stats)
    timed = stats[1:] or stats

    def med(key):
        return float(np.median([s[key] for s in timed]))

    return {"backend": cfg.decode.backend, "batch": run.batch, "context_len": run.prompt_len,
            "mtp_depth": depth, "tokens_per_s": med("tokens_per_s"), "ms_per_step": med("ms_per_step"),
            "accepted_per_step": med("accepted_per_step"),
            "acceptance_by_depth": np.mean([s["acceptance_by_depth"] for s in timed], 0).tolist() if depth else [],
            "time_to_first_token_s": stats[0]["time_to_first_token_s"], "step_compile_s": stats[0]["step_compile_s"],
            "new_tokens": stats[-1]["new_tokens"]}


def _corpus(cfg, corpus_root: str | None):
    from glm_fast.data import load_corpus, stdlib_root

    if corpus_root is None:
        return load_corpus(cfg.train.val_fraction)
    root = pathlib.Path(corpus_root).expanduser()
    return load_corpus(cfg.train.val_fraction, root if root.is_absolute() else stdlib_root() / root)


def acceptance_rows(model, cfg, prompts: list[list[int]], depths, temperatures, max_new_tokens: int,
                    backend: str = "xla", top_p: float = 1.0, seed: int = 0, log: Callable | None = None
                    ) -> list[dict]:
    """One row per (depth, temperature): acceptance, tokens/s, and step speedup over plain decoding (depth 0).

    All prompts go in one batched `generate` call per setting, without stop tokens, so each sequence makes
    exactly `max_new_tokens` tokens. Steps are counted per sequence (a sequence's callback fires once per step
    it takes part in, plus once for the prefill token), so `speedup_steps` = plain steps / speculative steps.
    """
    from glm_fast import Engine

    depths = sorted({0, *(min(d, cfg.model.mtp_depth) for d in depths)})
    engine = Engine(model, backend=backend, compilation_cache=False,
                    max_len=_engine_max_len(max(map(len, prompts)), max_new_tokens, max(depths)))
    rows = []
    for temperature in temperatures:
        base = None
        for depth in depths:
            calls = [0] * len(prompts)

            def count(i, _new, calls=calls):
                calls[i] += 1

            out = engine.generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                                  speculative_depth=depth, seed=seed, callback=count)
            s = out.stats
            steps = sum(calls) - len(prompts)
            row = {"backend": backend, "layout": "single", "batch": len(prompts),
                   "context_len": max(map(len, prompts)), "mtp_depth": depth,
                   "mode": "greedy" if temperature == 0 else "sampled", "temperature": temperature,
                   "top_p": top_p, "accepted_per_step": s["accepted_per_step"] if depth else 1.0,
                   "acceptance_by_depth": s["acceptance_by_depth"], "tokens_per_s": s["tokens_per_s"],
                   "ms_per_step": s["ms_per_step"], "decode_steps": s["decode_steps"], "sequence_steps": steps,
                   "new_tokens": s["new_tokens"]}
            if depth == 0:
                base = row
            row["speedup_steps"] = base["sequence_steps"] / steps if steps else math.nan
            row["speedup_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
            rows.append(row)
            if log:
                log(row)
    return rows


def encode_prompts(tokenizer, cfg, texts: list[str]) -> list[list[int]]:
    bos = [cfg.model.bos_token_id] if cfg.model.bos_token_id is not None else []
    return [bos + tokenizer.encode(t) for t in texts]


def held_out_ids(cfg, tokenizer, num_prompts: int, num_lines: int, corpus_root: str | None = None):
    from glm_fast.data import held_out_prompts

    texts = held_out_prompts(_corpus(cfg, corpus_root).validation, num_prompts, num_lines)
    return encode_prompts(tokenizer, cfg, texts)


def add_model_source_args(p) -> None:
    """The model-source flags of the scripts that decode held-out prompts (experiments/mtp_acceptance.py,
    persistent_trained.py): a checkpoint, or random weights from a preset; the prompts' corpus."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training run dir (or its checkpoints/ dir)")
    src.add_argument("--random-init", action="store_true", help="random weights from --config (smoke runs)")
    p.add_argument("--config", default="tiny", help="preset for --random-init")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="dotted override of the --random-init config, repeatable")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-root", default=None,
                   help="prompts from this directory's .py files (relative: under the stdlib) instead of the stdlib")


def load_model_source(args, dtype: str | None = None):
    """(model, cfg, tokenizer) from `add_model_source_args`' flags: the checkpoint (parameters cast to `dtype`,
    default its stored model.dtype), or random weights (seed --seed) from --config + --set (+ model.dtype) with
    the bytes tokenizer."""
    if args.checkpoint:
        from glm_fast.train import load_model

        return load_model(args.checkpoint, step=args.step, dtype=dtype)
    from flax import nnx

    from glm_fast.data import bytes_tokenizer
    from glm_fast.model import Model

    cfg = config_lib.load_config(args.config, overrides=[*args.set, *([f"model.dtype={dtype}"] if dtype else [])])
    tokenizer = bytes_tokenizer()
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config {cfg.name} has vocab_size={cfg.model.vocab_size} < the bytes tokenizer's "
                         f"{tokenizer.vocab_size}: raise model.vocab_size")
    return Model(cfg.model, rngs=nnx.Rngs(args.seed)), cfg, tokenizer


def run_train(cfg, run: TrainRun, seed: int, run_dir: pathlib.Path) -> dict:
    from glm_fast.train import load_model, train

    del seed  # already in cfg.train.seed
    corpus = _corpus(cfg, run.corpus_root) if run.corpus_root else None
    result = train(cfg, run_dir, resume=True, corpus=corpus, cache_dir=run.cache_dir, progress=False)
    last, val = result.final_train, result.final_val
    d = cfg.model.mtp_depth
    metrics = {"steps": result.step, "final_loss": last.get("train/loss"),
               "final_main_loss": last.get("train/main_loss"),
               "final_mtp_losses": [last.get(f"train/mtp_loss_k{k}") for k in range(1, d + 1)],
               "val_loss": val.get("val/loss"), "val_main_loss": val.get("val/main_loss"),
               "val_mtp_losses": [val.get(f"val/mtp_loss_k{k}") for k in range(1, d + 1)],
               "val_mtp_accs": [val.get(f"val/mtp_acc_k{k}") for k in range(1, d + 1)],
               "train_tokens_per_s": result.tokens_per_s, "run_dir": str(run_dir)}
    if run.acceptance_prompts and d:
        model, mcfg, tokenizer = load_model(run_dir)
        prompts = held_out_ids(mcfg, tokenizer, run.acceptance_prompts, 4, run.corpus_root)
        row = acceptance_rows(model, mcfg, prompts, [d], [0.0], run.acceptance_new_tokens)[-1]
        metrics.update(accepted_per_step=row["accepted_per_step"], acceptance_by_depth=row["acceptance_by_depth"],
                       speedup_steps=row["speedup_steps"])
    return metrics


def run_acceptance(cfg, run: AcceptanceRun, seed: int, run_dir: pathlib.Path) -> dict:
    from flax import nnx

    from glm_fast import Model
    from glm_fast.data import bytes_tokenizer

    del run_dir
    if run.checkpoint:
        from glm_fast.train import load_model

        model, stored, tokenizer = load_model(run.checkpoint)
        cfg = dataclasses.replace(stored, decode=cfg.decode)
    else:
        model, tokenizer = Model(cfg.model, rngs=nnx.Rngs(seed)), bytes_tokenizer()
    depth = cfg.decode.speculative_depth or cfg.model.mtp_depth
    prompts = held_out_ids(cfg, tokenizer, run.num_prompts, run.num_lines, run.corpus_root)
    prompts = [[t % cfg.model.vocab_size for t in p] for p in prompts]
    row = acceptance_rows(model, cfg, prompts, [depth], [cfg.decode.temperature], run.max_new_tokens,
                          cfg.decode.backend, cfg.decode.top_p, seed)[-1]
    return {k: row[k] for k in ("mtp_depth", "mode", "accepted_per_step", "acceptance_by_depth", "tokens_per_s",
                                "ms_per_step", "speedup_steps", "speedup_tokens_per_s")}


@dataclasses.dataclass(frozen=True)
class RunKind:
    settings: type
    run: Callable
    metrics: tuple[str, ...]  # headline metrics: table columns and plots


RUN_KINDS = {
    "decode": RunKind(DecodeRun, run_decode, ("tokens_per_s", "ms_per_step", "accepted_per_step")),
    "train": RunKind(TrainRun, run_train, ("final_loss", "val_loss", "accepted_per_step")),
    "acceptance": RunKind(AcceptanceRun, run_acceptance, ("accepted_per_step", "speedup_steps", "tokens_per_s")),
}


# ---- sweep files -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    """One run: its swept values, all overrides (fixed + swept, config and `run.*`), and the seed."""

    values: dict
    overrides: dict
    seed: int

    @property
    def key(self) -> str:
        return json.dumps({"overrides": self.overrides, "seed": self.seed}, sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: str
    kind: str
    axes: tuple[str, ...]
    points: tuple[Point, ...]
    path: str = ""

    def config(self, point: Point):
        return config_lib.load_config(self.base, {k: v for k, v in point.overrides.items()
                                                  if not k.startswith("run.")})

    def settings(self, point: Point):
        cls = RUN_KINDS[self.kind].settings
        raw = {k[4:]: v for k, v in point.overrides.items() if k.startswith("run.")}
        hints = typing.get_type_hints(cls)
        return cls(**{k: config_lib._coerce(f"run.{k}", hints[k], v) for k, v in raw.items()})


_TOP_KEYS = ("name", "base", "kind", "overrides", "grid", "points", "seeds", "run", "description")


def _check_key(key: str, kind: str, where: str) -> None:
    """`key` must be a dotted config field or `run.<setting of kind>`."""
    if not isinstance(key, str):
        raise SweepError(f"{where}: key {key!r} must be a dotted string like 'model.index_topk'")
    section, _, field = key.partition(".")
    if section == "run":
        valid = [f.name for f in dataclasses.fields(RUN_KINDS[kind].settings)]
        prefix = "run."
    elif section in config_lib._SECTIONS:
        valid = [f.name for f in dataclasses.fields(config_lib._SECTIONS[section])]
        prefix = section + "."
        if field.startswith("rope_parameters."):
            valid = [f.name for f in dataclasses.fields(config_lib.RopeParameters)]
            prefix, field = "model.rope_parameters.", field.split(".", 1)[1]
    else:
        choices = [*config_lib._SECTIONS, "run"]
        hint = difflib.get_close_matches(section, choices, n=1)
        raise SweepError(f"{where}: unknown key {key!r}: {section!r} is not a config section "
                         f"({', '.join(choices)})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if field not in valid:
        hint = difflib.get_close_matches(field, valid, n=1)
        fix = f"did you mean {prefix + hint[0]!r}?" if hint else f"valid: {', '.join(prefix + v for v in valid)}"
        raise SweepError(f"{where}: unknown key {key!r} for a {kind!r} sweep: {fix}")


def sweep_from_dict(raw: dict, path: str = "<dict>") -> Sweep:
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping (name, base, kind, grid/points, ...)")
    for key in raw:
        if key not in _TOP_KEYS:
            hint = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            raise SweepError(f"{path}: unknown top-level key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint
                                                                         else f"; valid: {', '.join(_TOP_KEYS)}"))
    kind = raw.get("kind", "decode")
    if kind not in RUN_KINDS:
        raise SweepError(f"{path}: kind={kind!r}: use one of {sorted(RUN_KINDS)}")
    if ("grid" in raw) == ("points" in raw):
        raise SweepError(f"{path}: give exactly one of 'grid' (cartesian axes) or 'points' (a list of overrides)")
    fixed = dict(raw.get("overrides") or {})
    fixed.update({f"run.{k}": v for k, v in (raw.get("run") or {}).items()})
    for key in fixed:
        _check_key(key, kind, f"{path} overrides")
    if "grid" in raw:
        grid = raw["grid"]
        if not isinstance(grid, dict) or not grid:
            raise SweepError(f"{path}: grid must map axis keys to lists of values")
        for key, values in grid.items():
            _check_key(key, kind, f"{path} grid")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path} grid: axis {key!r} must list at least one value, got {values!r}")
        axes = tuple(grid)
        combos = [dict(zip(axes, vals)) for vals in itertools.product(*grid.values())]
    else:
        combos = raw["points"]
        if not isinstance(combos, list) or not combos or not all(isinstance(p, dict) for p in combos):
            raise SweepError(f"{path}: points must be a non-empty list of mappings of dotted overrides")
        axes = tuple(dict.fromkeys(k for p in combos for k in p))
        for i, p in enumerate(combos):
            for key in p:
                _check_key(key, kind, f"{path} points[{i}]")
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{path}: seeds must be an integer or a list of integers, got {seeds!r}")
    points = []
    for values in combos:
        for seed in seeds:
            overrides = {**fixed, **values}
            if kind == "train":
                overrides.setdefault("train.seed", seed)
            points.append(Point(dict(values), overrides, seed))
    sweep = Sweep(str(raw.get("name", pathlib.Path(path).stem)), str(raw.get("base", "tiny")), kind, axes,
                  tuple(points), path)
    for p in sweep.points:  # every point must make a valid config before anything runs
        try:
            sweep.config(p)
            sweep.settings(p)
        except (config_lib.ConfigError, TypeError) as e:
            raise SweepError(f"{path}: point {p.values} (seed {p.seed}) is not a valid config: {e}") from e
    return sweep


def load_sweep(name_or_path: str | pathlib.Path) -> Sweep:
    """A sweep by name (`configs/sweeps/<name>.yaml`) or path, validated (every point builds its config)."""
    path = pathlib.Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SWEEP_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
        raise SweepError(f"no sweep file {str(path)!r}: use one of {known} or a path to a .yaml file")
    return sweep_from_dict(yaml.safe_load(path.read_text()), str(path))


# ---- running ---------------------------------------------------------------------------------------------
def read_results(out_dir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: that run is redone
                continue
    return lines


def _run_id(index: int, point: Point) -> str:
    vals = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.values.items())
    safe = "".join(c if c.isalnum() or c in "=_-." else "-" for c in vals)[:80]
    return f"{index:03d}_{safe}_seed{point.seed}"


def run_sweep(sweep: Sweep, out_dir: str | pathlib.Path, log: Callable[[str], None] = print,
              fail_fast: bool = False) -> list[dict]:
    """Runs every point not yet in `<out_dir>/results.jsonl`, appending a line per run; then writes table.md
    and the plots. Returns all result lines of this sweep's points."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in read_results(out_dir) if r.get("status") == "ok"}
    kind = RUN_KINDS[sweep.kind]
    commit, versions, machine = results.git_commit(), results.versions(), results.machine()
    for i, point in enumerate(sweep.points):
        if point.key in done:
            log(f"[{i + 1}/{len(sweep.points)}] skip (done): {point.values} seed {point.seed}")
            continue
        log(f"[{i + 1}/{len(sweep.points)}] run: {point.values} seed {point.seed}")
        t0 = time.perf_counter()
        line = {"sweep": sweep.name, "kind": sweep.kind, "key": point.key, "point": point.values,
                "seed": point.seed, "config": {"name": sweep.base, "overrides": point.overrides},
                "git_commit": commit, "versions": versions, "machine": machine}
        try:
            metrics = kind.run(sweep.config(point), sweep.settings(point), point.seed,
                               out_dir / "runs" / _run_id(i, point))
            line.update(status="ok", metrics=metrics)
        except Exception as e:  # noqa: BLE001  (recorded, and retried on the next invocation)
            if fail_fast:
                raise
            line.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
            log(f"  failed: {line['error']}")
        line["wall_s"] = time.perf_counter() - t0
        with open(out_dir / RESULTS_FILE, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")
        if line["status"] == "ok":
            log("  " + ", ".join(f"{m}={_fmt(line['metrics'].get(m))}" for m in kind.metrics
                                 if m in line["metrics"]))
    keys = {p.key for p in sweep.points}
    latest = {}
    for r in read_results(out_dir):
        if r.get("key") in keys and (r.get("status") == "ok" or r["key"] not in latest):
            latest[r["key"]] = r
    lines = [latest[p.key] for p in sweep.points if p.key in latest]
    write_table(sweep, lines, out_dir / "table.md")
    plot(sweep, lines, out_dir)
    return lines


# ---- reporting -------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "-" if v is None else str(v)


def write_table(sweep: Sweep, lines: list[dict], path: pathlib.Path) -> None:
    metrics = RUN_KINDS[sweep.kind].metrics
    head = [*sweep.axes, "seed", *metrics, "wall_s", "status"]
    out = [f"# sweep {sweep.name} ({sweep.kind}, base {sweep.base})", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lines:
        m = r.get("metrics", {})
        cells = [*(_fmt(r["point"].get(a)) for a in sweep.axes), str(r["seed"]),
                 *(_fmt(m.get(k)) for k in metrics), _fmt(r.get("wall_s")), r.get("status", "?")]
        out.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(out) + "\n")


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot(sweep: Sweep, lines: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """One PNG per (metric, swept axis): the metric (mean over seeds) against the axis, one line per combination
    of the other axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in lines if r.get("status") == "ok"]
    written = []
    for metric in RUN_KINDS[sweep.kind].metrics:
        rows = [r for r in ok if isinstance(r["metrics"].get(metric), (int, float))]
        if not rows:
            continue
        for axis in sweep.axes:
            xs_all = list(dict.fromkeys(json.dumps(r["point"].get(axis), default=str) for r in rows))
            xvals = [json.loads(x) for x in xs_all]
            numeric = _numeric(xvals)
            others = [a for a in sweep.axes if a != axis]
            groups: dict[str, dict[str, list[float]]] = {}
            for r in rows:
                g = ", ".join(f"{a.split('.')[-1]}={_fmt(r['point'].get(a))}" for a in others) or metric
                x = json.dumps(r["point"].get(axis), default=str)
                groups.setdefault(g, {}).setdefault(x, []).append(float(r["metrics"][metric]))
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for g, by_x in groups.items():
                xs = [x for x in xs_all if x in by_x]
                pos = [json.loads(x) if numeric else xs_all.index(x) for x in xs]
                ax.plot(pos, [sum(by_x[x]) / len(by_x[x]) for x in xs], "o-", label=g)
            if not numeric:
                ax.set_xticks(range(len(xs_all)), [_fmt(v) for v in xvals], rotation=20, fontsize=8)
            ax.set_xlabel(axis)
            ax.set_ylabel(metric)
            ax.set_title(f"{sweep.name}: {metric} vs {axis}")
            ax.grid(alpha=0.3)
            if len(groups) > 1:
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{metric}_vs_{axis.replace('.', '_')}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written
