"""Warm start for the persistent kernel: the lowered decode step, serialized.

JAX's persistent compilation cache is keyed by the *lowered* module, so every new process still traces the step
and runs Pallas's Mosaic GPU lowering before it can hit that cache; for this kernel that lowering is the cost
(glm5_slice, all 13 bodies: 5.0 s with jax 0.10.2 on a 2-core CPU host,
experiments/results/persistent_lowering_glm5_slice_cpu_groups.json; on the H200 hosts with jax 0.11.2 18-25 s with
the lane semantics the kernel lowers with, 150-470 s with jax 0.11's warpgroup default: `kernel._LOWERING`), then
~60 s of XLA compile. Measured cold / warm start on the H200: 109 s / 16.4 s from process start to the first token,
13 s of both building the random model (bench_decode_glm5_slice_persistent.json).
`exported_step` lowers once with `jax.export` (StableHLO with the Mosaic GPU kernel inside), writes it
atomically next to the cached schedules, and on later starts deserializes it; `Exported.call` then only
compiles, which the compilation cache serves.

The file name hashes everything the lowered module depends on: the schedule's own key hash, the tile config,
the argument shapes and dtypes, the target platform, the jax / jaxlib versions and the source of the kernel
modules. A file that does not deserialize is rebuilt with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import time
import warnings

import jax

_SOURCES = ("persistent/kernel.py", "persistent/tiles.py", "persistent/attn_tiles.py", "persistent/index_tiles.py",
            "gemv.py", "mla_attention.py", "indexer.py", "_compat.py")


def _source_hash() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    return hashlib.sha256(b"".join((root / f).read_bytes() for f in _SOURCES)).hexdigest()[:16]


def step_key(plan, args, tiles, platform: str) -> dict:
    """Everything the lowered step depends on (its cache key). args: the flat step arguments (arrays or
    ShapeDtypeStructs)."""
    leaves = jax.tree.leaves(args)
    return {"schedule": plan.schedule.meta["hash"], "tiles": None if tiles is None else dataclasses.asdict(tiles),
            "args": [[list(a.shape), str(a.dtype)] for a in leaves], "platform": platform,
            "jax": jax.__version__, "jaxlib": jax.lib.__version__, "sources": _source_hash()}


def _write(path: pathlib.Path, blob: bytes) -> None:
    """Atomic: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def exported_step(fn, plan, args, *, tiles, cache_dir, platform: str = "cuda"):
    """(Exported, info): `fn(*args)` (the flat persistent step: weight stacks, caches, tokens, pos, cos, sin) lowered
    for `platform`, loaded from `cache_dir` or exported and saved there. info = {path, source: "loaded" |
    "exported", seconds}."""
    from jax import export
    key = step_key(plan, args, tiles, platform)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = pathlib.Path(cache_dir) / f"step-{digest}.jax_exported"
    start = time.perf_counter()
    if path.exists():
        try:
            exp = export.deserialize(bytearray(path.read_bytes()))
            return exp, {"path": str(path), "source": "loaded", "seconds": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001 -- any unreadable file is rebuilt
            warnings.warn(f"re-exporting the persistent step: {path} does not deserialize ({err})", RuntimeWarning,
                          stacklevel=2)
    exp = export.export(jax.jit(fn), platforms=(platform,))(*args)
    try:
        blob = exp.serialize()
    except ImportError as err:  # serialization needs `flatbuffers` (a glm_fast dependency; absent on bare images)
        warnings.warn(f"the persistent step is not cached: {err}", RuntimeWarning, stacklevel=2)
        return exp, {"path": None, "source": "exported", "seconds": time.perf_counter() - start}
    _write(path, blob)
    return exp, {"path": str(path), "source": "exported", "seconds": time.perf_counter() - start}
