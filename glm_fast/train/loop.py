"""The training loop: data -> jitted steps -> logs, evals, checkpoints; resumable to the same loss curve.

A run directory holds everything about one run:

    config.yaml          the resolved config
    metrics.jsonl        one JSON object per log step ("kind": "train") and per eval ("kind": "eval")
    tb/                  TensorBoard scalars (train/*, val/*)
    checkpoints/         orbax steps + config.yaml + tokenizer/ (see `glm_fast.train.checkpoint`)

Resuming restores parameters, router biases, optimiser state, step, RNG key and the data iterator's position,
so the resumed run takes exactly the batches and updates the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Iterable

import jax
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_fast.config import Config
from glm_fast.train.checkpoint import (CHECKPOINT_SUBDIR, CONFIG_FILE, TOKENIZER_DIR, CheckpointError, Checkpointer,
                                       load_tokenizer)
from glm_fast.train.step import (DATA_AXIS, TrainState, abstract_train_state, data_mesh, eval_step,
                                 init_train_state, model_graphdef, step_settings, train_step)
from glm_fast.train.writers import JsonlWriter, TensorBoardWriter, flatten_metrics

DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/glm_fast").expanduser()


@dataclasses.dataclass
class TrainResult:
    """What a `train` call did. `history`/`evals` are the records it appended to metrics.jsonl."""

    run_dir: pathlib.Path
    start_step: int
    step: int
    history: list[dict]
    evals: list[dict]
    tokens_per_s: float   # steady state: excludes the first (compiling) step, evals and saves
    compile_s: float      # wall time of the first step (trace + compile + run)
    wall_s: float
    devices: int          # size of the data-parallel mesh

    @property
    def final_train(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def final_val(self) -> dict:
        return self.evals[-1] if self.evals else {}


def global_batch(tokens: np.ndarray, mesh: Mesh):
    """This process's rows [b, S+1] -> the global batch sharded over the mesh's "data" axis."""
    n = mesh.shape[DATA_AXIS]
    if (tokens.shape[0] * jax.process_count()) % n:
        raise ValueError(f"train.batch_size={tokens.shape[0] * jax.process_count()} is not divisible by the {n} "
                         f"devices of the data mesh: use a multiple of {n}")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)), np.asarray(tokens, np.int32))


def evaluate(state: TrainState, graphdef, cfg: Config, batches: Iterable[dict], mesh: Mesh) -> dict:
    """Mean over `batches` of the eval metrics, flattened as {"val/loss", "val/mtp_loss_k1", ...}."""
    tcfg = step_settings(cfg.train)
    results = [eval_step(state, global_batch(b["tokens"], mesh), graphdef=graphdef, tcfg=tcfg)
               for b in batches]
    if not results:
        raise ValueError("the validation iterator yielded no batch: raise train.val_fraction or lower "
                         "train.batch_size / train.seq_len")
    results = jax.device_get(results)
    mean = {k: np.mean([r[k] for r in results], axis=0) for k in results[0]}
    return flatten_metrics(mean, "val")


def _mean_metrics(pending: list[dict]) -> dict:
    """Window means of step metrics (already on host); the learning rate is the last step's."""
    out = {k: np.mean([m[k] for m in pending], axis=0) for k in pending[0]}
    out["lr"] = pending[-1]["lr"]
    return out


class _Clock:
    """Training-only wall time (evals, saves and the compiling first step excluded) for tokens/s."""

    def __init__(self):
        self.mark, self.window_s, self.total_s = None, 0.0, 0.0
        self.window_tokens = self.total_tokens = 0

    def start(self):
        self.mark = time.perf_counter()

    def pause(self):
        if self.mark is not None:
            dt = time.perf_counter() - self.mark
            self.window_s += dt
            self.total_s += dt
            self.mark = None

    def count(self, tokens: int):
        self.window_tokens += tokens
        self.total_tokens += tokens

    def window_rate(self) -> float:
        rate = self.window_tokens / self.window_s if self.window_s > 0 and self.window_tokens else math.nan
        self.window_s, self.window_tokens = 0.0, 0
        return rate

    def total_rate(self) -> float:
        return self.total_tokens / self.total_s if self.total_s > 0 and self.total_tokens else math.nan


def _open_checkpoints(cfg: Config, run_dir: pathlib.Path, resume: bool, async_save: bool) -> tuple[Checkpointer, bool]:
    """The run's checkpointer and whether it resumes; refuses to overwrite or to resume a different config."""
    ckpt = Checkpointer(run_dir / CHECKPOINT_SUBDIR, cfg.train.keep_checkpoints, create=True, async_save=async_save)
    try:
        steps = ckpt.steps()
        if steps and not resume:
            raise CheckpointError(f"run directory {str(run_dir)!r} already has checkpoints (steps {steps}): pass "
                                  "resume=True (--resume) to continue that run, or choose a new run directory")
        if steps:
            ckpt.check_config(cfg)
    except Exception:
        ckpt.close()
        raise
    return ckpt, bool(steps)


def train(cfg: Config, run_dir: str | pathlib.Path, *, resume: bool = False, corpus=None,
          cache_dir: str | pathlib.Path | None = None, stop_at: int | None = None, progress: bool = True,
          mesh: Mesh | None = None, async_checkpoint: bool = True) -> TrainResult:
    """Trains `cfg` for `cfg.train.steps` steps (or continues a run), writing everything into `run_dir`.

    Args:
      cfg: the run's config (model, train).
      run_dir: the run directory (created).
      resume: continue from the latest checkpoint in `run_dir` (the stored config must match `cfg`; a run dir
        without checkpoints just starts). Without it, a run dir that has checkpoints is an error.
      corpus: a `glm_fast.data.CorpusSplit` to train on instead of the whole stdlib (tests).
      cache_dir: where the tokenizer and token streams are cached (default ~/.cache/glm_fast).
      stop_at: stop after this step as if the process were killed (no extra checkpoint): for tests.
      progress: show a tqdm bar.
      mesh: the data-parallel mesh (default: all devices).
      async_checkpoint: write checkpoints in the background (orbax async); the loop waits before exiting.
    """
    from glm_fast.data import build_pipeline

    t0 = time.perf_counter()
    run_dir = pathlib.Path(run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else data_mesh()
    ckpt, resuming = _open_checkpoints(cfg, run_dir, resume, async_checkpoint)
    try:
        data = build_pipeline(cfg, cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR, corpus=corpus)
        if resuming:
            stored_tok = load_tokenizer(ckpt.directory)
            if stored_tok.fingerprint != data.tokenizer.fingerprint:
                raise CheckpointError(
                    f"the tokenizer built for this run differs from the one saved in {str(ckpt.directory)!r} "
                    "(a different Python standard library or corpus?): resume on the machine/Python that started "
                    "the run, or start a fresh run directory")
            graphdef = model_graphdef(cfg.model)
            state, data_state, _ = ckpt.restore(abstract_train_state(cfg, mesh))
        else:
            graphdef, state = init_train_state(cfg, mesh)
            data_state = None
            data.tokenizer.save(ckpt.directory / TOKENIZER_DIR)
            ckpt.write_config(cfg)
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return _run(cfg, run_dir, ckpt, data, graphdef, state, data_state, mesh, stop_at, progress, t0)
    finally:
        ckpt.close()


def _run(cfg: Config, run_dir: pathlib.Path, ckpt: Checkpointer, data, graphdef, state: TrainState,
         data_state: Any, mesh: Mesh, stop_at: int | None, progress: bool, t0: float) -> TrainResult:
    from tqdm.auto import tqdm

    tcfg = cfg.train
    start = int(jax.device_get(state.step))
    end = tcfg.steps if stop_at is None else min(tcfg.steps, stop_at)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    step_tcfg = step_settings(tcfg)
    train_it = data.train_iterator(data_state)
    jsonl = JsonlWriter(run_dir / "metrics.jsonl")
    jsonl.truncate_after(start)
    tb = TensorBoardWriter(run_dir / "tb")
    history, evals, pending = [], [], []
    clock, compile_s = _Clock(), math.nan
    bar = tqdm(total=end, initial=start, disable=not progress, desc=f"train {cfg.name}", dynamic_ncols=True)

    def run_eval(step: int) -> None:
        record = {"kind": "eval", "step": step, **evaluate(state, graphdef, cfg,
                                                           data.val_iterator(tcfg.eval_batches), mesh)}
        record["time_s"] = time.perf_counter() - t0
        evals.append(record)
        jsonl.write(record)
        tb.scalars({k: v for k, v in record.items() if k.startswith("val/")}, step)
        tb.flush()

    try:
        for step in range(start + 1, end + 1):
            batch = next(train_it)["tokens"]
            t_step = time.perf_counter()
            state, metrics = train_step(state, global_batch(batch, mesh), graphdef=graphdef, tcfg=step_tcfg)
            pending.append(metrics)
            if step == start + 1:  # the compiling step: time it apart from the steady state
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - t_step
                clock.start()
            else:
                clock.count(tokens_per_step)
            bar.update(1)
            if step % tcfg.log_every == 0 or step == end:
                pending = jax.device_get(pending)
                clock.pause()
                record = {"kind": "train", "step": step, **flatten_metrics(_mean_metrics(pending), "train")}
                record["train/tokens_per_s"] = clock.window_rate()
                record["time_s"] = time.perf_counter() - t0
                history.append(record)
                jsonl.write(record)
                tb.scalars({k: v for k, v in record.items() if k.startswith("train/")}, step)
                tb.flush()
                bar.set_postfix(loss=f"{record['train/loss']:.3f}", tok_s=f"{record['train/tokens_per_s']:.0f}")
                pending = []
                clock.start()
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                jax.block_until_ready(state)
                clock.pause()
                run_eval(step)
                clock.start()
            if step % tcfg.save_every == 0 or step == tcfg.steps:
                jax.block_until_ready(state)
                clock.pause()
                ckpt.save(step, state, train_it.get_state(), {
                    "config": cfg.to_dict(), "tokens_seen": step * tokens_per_step,
                    "tokenizer_fingerprint": data.tokenizer.fingerprint})
                clock.start()
        clock.pause()
    finally:
        bar.close()
        tb.close()
    return TrainResult(run_dir=run_dir, start_step=start, step=end, history=history, evals=evals,
                       tokens_per_s=clock.total_rate(), compile_s=compile_s, wall_s=time.perf_counter() - t0,
                       devices=mesh.size)
