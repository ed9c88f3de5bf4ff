"""The one JSON schema of every experiment result (DESIGN.md section 6): provenance + config + rows."""
from __future__ import annotations

import datetime
import hashlib
import json
import pathlib
import platform
import shlex
import subprocess
import sys
from importlib import metadata

RESULTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "results"


def versions(extra: tuple[str, ...] = ()) -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy") + tuple(extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """GPU name/count and driver (via nvidia-smi when present), CPU model, host."""
    info = {"cpu": platform.processor() or platform.machine(), "host": platform.node()}
    try:
        query = "--query-gpu=name,driver_version,memory.total"
        lines = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=10).stdout.strip().splitlines()
        if lines:
            name, driver, mem = (x.strip() for x in lines[0].split(","))
            info.update(gpu=name, gpu_count=len(lines), driver=driver, gpu_memory=mem)
    except (OSError, subprocess.SubprocessError):
        info.update(gpu=None, gpu_count=0)
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_hash() -> str:
    """sha256 of the Python sources (glm_fast, pallas_kernels, experiments): identifies the code that ran even
    where the checkout's git metadata is stale (the device machine gets a working-tree copy). Check a commit with
    `python -c "from glm_fast.results import source_hash; print(source_hash())"`."""
    root = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(p for d in ("glm_fast", "pallas_kernels", "experiments") for p in (root / d).rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def result(experiment: str, config: dict, rows: list[dict], ceilings: dict | None = None,
           extra_versions: tuple[str, ...] = (), **fields) -> dict:
    """A result record; `command` is this process's exact command line."""
    return {"experiment": experiment, "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
            "git_commit": git_commit(), "source_hash": source_hash(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": machine(), "versions": versions(extra_versions), "config": config,
            "ceilings": ceilings or {}, "rows": rows, **fields}


def write(record: dict, out_dir: str | pathlib.Path | None = None, name: str | None = None) -> pathlib.Path:
    """Writes `record` as `<out_dir>/<name or experiment_date>.json` atomically; returns the path."""
    out_dir = pathlib.Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name or record['experiment'] + '_' + stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    tmp.replace(path)
    return path
