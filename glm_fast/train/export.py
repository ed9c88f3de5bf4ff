"""Inference exports: a trained model's parameters as one msgpack file (bf16 by default) beside its config and
tokenizer. Small enough to ship inside the package (the demo model) and loadable by `load_model`."""
from __future__ import annotations

import pathlib
import shutil
import tempfile

from glm_fast.train.checkpoint import CONFIG_FILE, TOKENIZER_DIR, CheckpointError

EXPORT_FILE = "params.msgpack"


def is_export(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / EXPORT_FILE).is_file()


def export_model(checkpoint_dir: str | pathlib.Path, out_dir: str | pathlib.Path, dtype: str = "bfloat16"):
    """Writes `out_dir/{params.msgpack, config.yaml, tokenizer/}` from the latest checkpoint, atomically
    (a temp dir renamed into place, so a crash never leaves a half-written export)."""
    from flax import nnx, serialization

    from glm_fast.train.checkpoint import load_model

    model, cfg, tokenizer = load_model(checkpoint_dir, dtype=dtype)
    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    (tmp / EXPORT_FILE).write_bytes(serialization.msgpack_serialize(nnx.state(model).to_pure_dict()))
    import yaml
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tokenizer.save(tmp / TOKENIZER_DIR)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_export(path: str | pathlib.Path):
    """(model, cfg, tokenizer) from an export directory; a corrupt file raises `CheckpointError`."""
    from flax import nnx, serialization

    from glm_fast.config import load_config
    from glm_fast.data import Tokenizer
    from glm_fast.model import Model

    path = pathlib.Path(path)
    cfg = load_config(path / CONFIG_FILE)
    model = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    try:
        state.replace_by_pure_dict(serialization.msgpack_restore((path / EXPORT_FILE).read_bytes()))
    except Exception as e:  # msgpack and tree errors alike mean the file is not a matching export
        raise CheckpointError(f"{str(path / EXPORT_FILE)!r} is corrupt or not made for its config.yaml ({e}); "
                              "re-export it with glm_fast.train.export_model") from e
    nnx.update(model, state)
    return model, cfg, Tokenizer.load(path / TOKENIZER_DIR)
