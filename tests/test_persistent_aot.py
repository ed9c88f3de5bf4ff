"""The persistent kernel's lowered-step cache (`pallas_kernels.persistent.aot`): exported for CUDA on this CPU host
at glm5_slice (lowering only), written once, loaded by a later call without tracing, rebuilt when corrupt, and
keyed by what the lowered module depends on; the CPU (interpret-mode) decoder never uses it."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import pytest

from glm_fast import load_config
from pallas_kernels import _compat
from pallas_kernels.persistent import ScheduleOptions, aot, compile_schedule
from pallas_kernels.persistent.kernel import KernelPlan, PersistentWeights, abstract_step_args, persistent_step
from pallas_kernels.persistent.tiles import TileConfig

TILES = TileConfig()


@pytest.fixture(scope="module")
def glm5_step():
    """(fn, plan, flat abstract args) of the glm5_slice step, T = 1."""
    plan = KernelPlan.build(compile_schedule(load_config("glm5_slice").model, 1, ScheduleOptions(num_sms=132)))
    weights, *rest = abstract_step_args(plan, 4352)

    def fn(stacks, *args):
        return persistent_step(plan, PersistentWeights(tuple(stacks)), *args, interpret=False, tiles=TILES)
    return fn, plan, [list(weights.stacks), *rest]


def _export(fn, plan, args, cache_dir):
    with _compat.interpret_mesh("NVIDIA H200", 132):
        return aot.exported_step(fn, plan, args, tiles=TILES, cache_dir=cache_dir)


def test_exported_once_then_loaded_without_tracing(glm5_step, tmp_path):
    fn, plan, args = glm5_step
    exp, info = _export(fn, plan, args, tmp_path)
    assert info["source"] == "exported" and pathlib.Path(info["path"]).stat().st_size > 1e6
    assert exp.platforms == ("cuda",) and "mosaic_gpu" in exp.mlir_module()
    assert [a.shape for a in exp.in_avals] == [a.shape for a in jax.tree.leaves(args)]

    def untraceable(*_):
        raise AssertionError("a cache hit must not trace the step")
    loaded, again = _export(untraceable, plan, args, tmp_path)
    assert (again["source"], again["path"]) == ("loaded", info["path"])
    assert loaded.mlir_module() == exp.mlir_module()
    assert [p.name for p in tmp_path.iterdir()] == [pathlib.Path(info["path"]).name]  # no temp files left


def test_a_corrupt_file_is_rebuilt_with_a_warning(glm5_step, tmp_path):
    fn, plan, args = glm5_step
    _, info = _export(fn, plan, args, tmp_path)
    path = pathlib.Path(info["path"])
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.warns(RuntimeWarning, match="does not deserialize"):
        exp, again = _export(fn, plan, args, tmp_path)
    assert again["source"] == "exported" and "mosaic_gpu" in exp.mlir_module()
    assert aot.exported_step(fn, plan, args, tiles=TILES, cache_dir=tmp_path)[1]["source"] == "loaded"


def test_the_key_covers_shapes_tiles_platform_and_schedule(glm5_step):
    _, plan, args = glm5_step
    base = aot.step_key(plan, args, TILES, "cuda")
    longer = [*args[:1], [jax.ShapeDtypeStruct((8704, c.shape[1]), c.dtype) for c in args[1]], *args[2:]]
    other_plan = KernelPlan.build(compile_schedule(load_config("glm5_slice").model, 1, ScheduleOptions(num_sms=66)))
    variants = [aot.step_key(plan, longer, TILES, "cuda"),
                aot.step_key(plan, args, dataclasses.replace(TILES, slots=TILES.slots - 2), "cuda"),
                aot.step_key(plan, args, TILES, "rocm"),
                aot.step_key(other_plan, args, TILES, "cuda")]
    assert all(v != base for v in variants) and len({str(v) for v in variants}) == 4
    assert base["jax"] == jax.__version__ and len(base["sources"]) == 16


def test_the_interpret_mode_decoder_never_uses_the_cache(tmp_path):
    from pallas_kernels.persistent.kernel import PersistentDecoder
    from tests.kernel_testing import prefilled
    cfg = load_config("tiny").model
    model, caches, tokens, pos = prefilled(cfg, 0, 20, 1)
    dec = PersistentDecoder(model, interpret=True, cache_dir=tmp_path)
    logits, _, _ = jax.jit(lambda w, c: dec(model, w, c, tokens, pos, jnp.ones((1, 1), bool)))(dec.weights(1), caches)
    assert jnp.isfinite(logits).all()
    assert not list(tmp_path.glob("step-*")) and list(tmp_path.glob("*.npz"))  # the schedule only
