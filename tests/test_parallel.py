"""Device roles (glm_fast.parallel): role tables and their errors in-process; every layout on N = 2, 3, 5, 8
simulated CPU devices gives the single-device engine's greedy tokens (with and without MTP), logits and caches.

The multi-device cases run in subprocesses (`tests/parallel_check.py`): the simulated device count
(XLA_FLAGS=--xla_force_host_platform_device_count=8) must be set before jax initialises, and setting it for the
whole suite would put the training tests' data parallelism and every default-device jit on an 8-device host.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx

from glm_fast import Model, load_config
from glm_fast.parallel import RoleError, RolesEngine, build_roles

REPO = pathlib.Path(__file__).resolve().parent.parent


def _cfg(**overrides):
    return load_config("tiny", overrides).model


def test_role_tables():
    hetero = build_roles("hetero", 8, _cfg(**{"model.num_attention_heads": 64}))
    assert hetero.devices("index") == (0,) and hetero.devices("attention") == tuple(range(1, 8))
    heads = hetero.split("attention", 64, "heads")
    assert heads.counts == (0, 10, 9, 9, 9, 9, 9, 9) and heads.width == 10 and sum(heads.counts) == 64
    owner, slot = heads.owner_slot()
    assert owner[0] == 1 and slot[9] == 9 and owner[10] == 2 and slot[10] == 0 and owner[63] == 7
    homo = build_roles("homogeneous", 3, _cfg())
    assert homo.everywhere("index") and homo.split("ffn", 8, "experts").counts == (3, 3, 2)
    vocab = build_roles("hetero", 3, _cfg()).split("ffn", 5, "vocab")  # shards [0 0 0 | a b c | d e 0]
    assert vocab.counts == (0, 3, 2) and list(vocab.gather_order()) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("layout, n, overrides, match", [
    ("ring", 4, {}, "unknown layout 'ring': choose one of"),
    ("hetero", 1, {}, "'hetero' .* needs at least 2 devices, got 1"),
    ("hetero", 6, {}, "on 5 devices, but model.num_attention_heads=4 cannot give each at least one"),
    ("homogeneous", 5, {"model.num_attention_heads": 8, "model.n_routed_experts": 4, "model.n_group": 2,
                        "model.topk_group": 1}, "model.n_routed_experts=4 cannot give each at least one"),
])
def test_bad_layouts_fail_clearly(layout, n, overrides, match):
    with pytest.raises(RoleError, match=match):
        build_roles(layout, n, _cfg(**overrides))


def test_more_devices_than_available_fails_clearly():
    model = Model(load_config("tiny").model, rngs=nnx.Rngs(0))
    with pytest.raises(RoleError, match="num_devices=64 > the 1 available devices"):
        RolesEngine(model, layout="homogeneous", num_devices=64, compilation_cache=False)


# Compile-time flags: XLA's CPU backend at -O0 compiles these programs ~3x faster; reference and layouts are
# compared within one process, under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _subprocess(args, devices=8, timeout=600):
    flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": flags}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("layout, cases", [("hetero", "cond:2,cond:3,cond:5,cond:8,mask:3"),
                                           ("homogeneous", "cond:2,cond:3,cond:5,cond:8")])
def test_layouts_match_single_device(layout, cases):
    """Greedy tokens with D = 0 and D = 2 identical; teacher-forced logits at every generated position within
    1e-5 of max |logit| (float32; only the summation order of partial outputs differs); cache rows on each
    role's devices within 1e-5; nothing NaN. hetero also runs branch="mask" (no lax.cond) on N = 3."""
    out = _subprocess([str(REPO / "tests" / "parallel_check.py"), layout, cases])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == len(cases.split(",")), out
    for case in lines:
        where = f"{case['layout']} N={case['num_devices']} {case['branch']}"
        assert all(case["tokens_equal"].values()), (where, case)
        assert case["accepted"] == case["ref_accepted"] > 1.0, (where, case)  # drafts accepted and rolled back
        assert case["finite"], where
        assert case["logits_rel_err"] < 1e-5, (where, case["logits_rel_err"])
        assert case["cache_err"] < 1e-5, (where, case["cache_err"])


def test_bench_roles_smoke_and_model_comparison(tmp_path):
    """bench_roles on 2 simulated devices (tiny, one layout, one step) writes the results schema with the
    compute / communication / waiting split and the interconnect; roles_model reads it back and compares."""
    out = tmp_path / "roles_smoke.json"
    _subprocess([str(REPO / "experiments" / "bench_roles.py"), "--config", "tiny", "--layouts", "hetero",
                 "--contexts", "32", "--mtp-depths", "0", "--steps", "1", "--warmup", "1", "--no-single",
                 "--hbm-gib", "0.001", "--comm-max-mib", "0.001", "--out", str(out)], devices=2)
    record = json.loads(out.read_text())
    assert record["experiment"] == "bench_roles" and record["config"]["name"] == "tiny"
    (row,) = record["rows"]
    assert row["layout"] == "hetero" and row["num_devices"] == 2 and row["ms_per_step"] > 0
    assert row["collectives_per_step"] == len(row["messages"]) > 0
    assert abs(row["ms_compute"] + row["ms_comm"] + row["ms_wait"] - row["ms_per_step"]) < 1e-6
    assert record["ceilings"]["interconnect"]["psum_latency_us"] > 0

    sys.path.insert(0, str(REPO / "experiments"))
    import roles_model
    roles_model.main(["--compare", str(out), "--out", str(tmp_path), "--name", "cmp"])
    (cmp,) = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert cmp["model_collectives"] == row["collectives_per_step"]  # the model counts the program's messages
    assert cmp["model_ms"] > 0 and cmp["measured_ms"] == row["ms_per_step"]
    roles_model.main(["--contexts", "4096,131072", "--out", str(tmp_path), "--name", "proj"])
    rows = json.loads((tmp_path / "proj.json").read_text())["rows"]
    assert {r["layout"] for r in rows} == {"hetero", "homogeneous"} and (tmp_path / "proj.png").stat().st_size > 0
    assert all(r["tokens_per_s"] > 0 for r in rows)
