"""Checkpoints with orbax: atomic, resumable, self-describing; and `load_model` for inference.

Layout of a checkpoint directory (`<run-dir>/checkpoints`):

    config.yaml            the run's full config (also stored per step, in meta)
    tokenizer/             the tokenizer the run trained with (`glm_fast.data.Tokenizer.save`)
    <step>/params/         float32 master weights + router biases (all `load_model` reads)
    <step>/train/          optimiser state, step counter, RNG key
    <step>/data/           the training data iterator's position (JSON)
    <step>/meta/           config dict, step, tokens seen (JSON)

Atomicity is orbax's: a step is written into `<step>.orbax-checkpoint-tmp-*` and renamed to `<step>` only
once every item is on disk (plus `commit_success.txt`), so a crash mid-save leaves the previous steps intact and
the partial one invisible. `CheckpointManager(max_to_keep=...)` deletes old steps only after a newer one is
committed.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import orbax.checkpoint as ocp
import yaml

from glm_fast.config import Config, ConfigError, config_from_dict

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_SUBDIR = "checkpoints"
# Train fields that fix the data stream / parameter init: a resumed run must keep them to continue the same run.
RESUME_TRAIN_FIELDS = ("seq_len", "batch_size", "seed", "val_fraction", "tokenizer")


class CheckpointError(ValueError):
    """A checkpoint is missing, partial/corrupt, or does not match the requested config; the message says why
    and what to do."""


def resolve_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A run dir (holding `checkpoints/`) or a checkpoint dir -> the checkpoint dir; a clear error if missing."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint directory {str(p)!r} does not exist: pass a run directory written by "
                              "experiments/train_mtp.py (or its checkpoints/ folder)")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} is a file: pass the run's directory instead")
    if (p / CHECKPOINT_SUBDIR).is_dir():
        p = p / CHECKPOINT_SUBDIR
    return p.resolve()


def _json_ready(value: Any) -> Any:
    """Round-trips through JSON so stored and requested configs compare alike (tuples -> lists, ...)."""
    return json.loads(json.dumps(value))


def config_mismatches(stored: dict, requested: Config, train_fields=RESUME_TRAIN_FIELDS) -> list[str]:
    """Human-readable differences `section.field: checkpoint X, requested Y` that make a checkpoint unusable
    for `requested` (all model fields except the inference dtype; the data-stream train fields)."""
    want = _json_ready(requested.to_dict())
    diffs = []
    for key in sorted(set(stored.get("model", {})) | set(want["model"])):
        if key == "dtype":  # master weights are float32 whatever the inference dtype
            continue
        a, b = stored.get("model", {}).get(key, "<absent>"), want["model"].get(key, "<absent>")
        if a != b:
            diffs.append(f"model.{key}: checkpoint {a!r}, requested {b!r}")
    for key in train_fields:
        a, b = stored.get("train", {}).get(key, "<absent>"), want["train"].get(key, "<absent>")
        if a != b:
            diffs.append(f"train.{key}: checkpoint {a!r}, requested {b!r}")
    return diffs


def _encode_data_state(state: Any) -> dict:
    if state is None:
        return {"kind": "none"}
    if isinstance(state, bytes):  # grain DataLoaderIterator: JSON bytes
        return {"kind": "bytes", "value": state.decode("utf-8")}
    return {"kind": "json", "value": _json_ready(state)}


def _decode_data_state(stored: dict) -> Any:
    kind = stored.get("kind")
    if kind == "none":
        return None
    if kind == "bytes":
        return stored["value"].encode("utf-8")
    return stored["value"]


class Checkpointer:
    """One run's checkpoint directory: save/restore train states, read stored configs.

    Args:
      directory: the checkpoint dir (created if `create`).
      keep: how many most recent steps to keep (`train.keep_checkpoints`).
      create: make the directory if absent (the training run, which also clears its own unfinished saves);
        otherwise a missing one is a `CheckpointError`.
      async_save: write in a background thread after the arrays are copied off the devices.
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, *, create: bool = False,
                 async_save: bool = True):
        path = pathlib.Path(directory).expanduser()
        if create:
            path.mkdir(parents=True, exist_ok=True)
        self.directory = resolve_checkpoint_dir(path)
        # Only the writer removes unfinished saves: a reader (load_model during training) must not delete the
        # temporary directory of a save in flight.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False, cleanup_tmp_directories=create,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries ---------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending (partial saves are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _pick(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            partial = sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)
            found = f" (only unfinished saves: {partial})" if partial else ""
            raise CheckpointError(f"no complete checkpoint in {str(self.directory)!r}{found}: no run finished a "
                                  "save there; train one (experiments/train_mtp.py --run-dir ...) or pass the "
                                  "directory of a run that saved at least once")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"checkpoint step {step} not in {str(self.directory)!r}: available steps {steps}")
        return step

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default latest): {"config", "step", "tokens_seen", ...}."""
        step = self._pick(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001  (orbax raises many kinds; all mean "unreadable")
            raise self._corrupt(step, e) from e
        if not isinstance(meta, dict) or "config" not in meta:
            raise self._corrupt(step, ValueError("meta item without a config"))
        return meta

    def stored_config(self, step: int | None = None) -> Config:
        meta = self.read_meta(step)
        try:
            return config_from_dict(meta["config"], meta["config"].get("name", "custom"))
        except ConfigError as e:
            raise CheckpointError(f"checkpoint step {meta.get('step')} in {str(self.directory)!r} stores a config "
                                  f"this version of glm_fast rejects ({e})") from e

    def check_config(self, requested: Config, step: int | None = None) -> dict:
        """Raises `CheckpointError` naming every mismatching field; returns the stored meta."""
        meta = self.read_meta(step)
        diffs = config_mismatches(meta["config"], requested)
        if diffs:
            raise CheckpointError(
                f"checkpoint {str(self.directory)!r} (step {meta['step']}) was trained with a different config: "
                + "; ".join(diffs) + ". Fix: resume with the original settings (same --config and --set values, "
                f"or --config {self.directory / CONFIG_FILE}), or start a fresh --run-dir for the new config")
        return meta

    def _corrupt(self, step: int, err: Exception) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        fallback = (f"delete {str(self.directory / str(step))!r} to fall back to step {others[-1]}" if others
                    else "no other step to fall back to: start the run again")
        return CheckpointError(f"checkpoint step {step} in {str(self.directory)!r} is corrupt or incomplete "
                               f"({type(err).__name__}: {str(err)[:300]}); {fallback}")

    # ---- save / restore --------------------------------------------------------------------------------
    def save(self, step: int, state, data_state: Any, meta: dict) -> None:
        """Saves `state` (a `TrainState`), the data iterator state and `meta` (must hold "config") as `step`."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave({"params": state.params, "router_bias": state.router_bias}),
            train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            meta=ocp.args.JsonSave(_json_ready({**meta, "step": int(step)})),
        ))

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, Any, dict]:
        """-> (state, data iterator state, meta) of `step` (default latest), arrays laid out as `abstract_state`."""
        step = self._pick(step)
        meta = self.read_meta(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore({"params": abstract_state.params,
                                                 "router_bias": abstract_state.router_bias}),
                train=ocp.args.StandardRestore({"opt_state": abstract_state.opt_state,
                                                "step": abstract_state.step, "rng": abstract_state.rng}),
                data=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        state = abstract_state.replace(params=out.params["params"], router_bias=out.params["router_bias"],
                                       opt_state=out.train["opt_state"], step=out.train["step"],
                                       rng=out.train["rng"])
        return state, _decode_data_state(out.data), meta

    def restore_params(self, abstract_params, abstract_bias, step: int | None = None) -> tuple[Any, Any]:
        """Only the weights and router biases (what inference needs)."""
        step = self._pick(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(
                {"params": abstract_params, "router_bias": abstract_bias})))
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        return out.params["params"], out.params["router_bias"]

    def write_config(self, cfg: Config) -> None:
        (self.directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def wait(self) -> None:
        """Blocks until a background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_model(checkpoint_dir: str | pathlib.Path, step: int | None = None, dtype: str | None = None,
               expect: Config | None = None):
    """A trained model for inference: -> (model, cfg, tokenizer).

    Args:
      checkpoint_dir: a run dir, its `checkpoints/` dir, or an inference export (`glm_fast.train.export`).
      step: which step (default: the latest committed one).
      dtype: parameter dtype ("float32" / "bfloat16"); default the stored `model.dtype`.
      expect: a config the caller requires: a `CheckpointError` names every model field that differs.
    """
    from flax import nnx

    from glm_fast.model import DTYPES, Model
    from glm_fast.train.export import is_export, load_export
    from glm_fast.train.step import cast_floating, master_config, split_model

    if is_export(checkpoint_dir):
        return load_export(checkpoint_dir)
    ckpt = Checkpointer(checkpoint_dir, create=False, async_save=False)
    try:
        cfg = ckpt.stored_config(step)
        if expect is not None:
            diffs = config_mismatches(cfg.to_dict(), expect, train_fields=())
            if diffs:
                raise CheckpointError(
                    f"checkpoint {str(ckpt.directory)!r} holds a different model than requested: " + "; ".join(diffs)
                    + ". Fix: load it without overrides (its config is in "
                    f"{str(ckpt.directory / CONFIG_FILE)!r}), or point at a checkpoint trained with this config")
        if dtype is not None:
            cfg = config_from_dict(cfg.to_dict(), cfg.name, {"model.dtype": dtype})
        _, abstract_params, abstract_bias = split_model(
            nnx.eval_shape(lambda: Model(master_config(cfg.model), rngs=nnx.Rngs(0))))
        params, bias = ckpt.restore_params(abstract_params, abstract_bias, step)
    finally:
        ckpt.close()
    graphdef = split_model(nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0))))[0]
    model = nnx.merge(graphdef, cast_floating(params, DTYPES[cfg.model.dtype]), bias)
    return model, cfg, load_tokenizer(ckpt.directory)


def load_tokenizer(checkpoint_dir: str | pathlib.Path):
    """The tokenizer saved beside the checkpoints (`<checkpoint dir>/tokenizer/`)."""
    from glm_fast.data import Tokenizer

    path = resolve_checkpoint_dir(checkpoint_dir) / TOKENIZER_DIR
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer saved beside the checkpoints ({e}); the training run "
                              f"writes it to {str(path)!r} before its first checkpoint: copy it there from the "
                              "run that made the checkpoint") from e
