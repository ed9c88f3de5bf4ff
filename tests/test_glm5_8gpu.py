"""Full-GLM-5-on-8-GPUs preparation (issue 8), on 8 simulated CPU devices: FP8 routed experts with weights drawn
per device give the single-device engine's greedy tokens on the same dequantized weights (both layouts, and a
real model's experts quantized per shard); the memory plan's arithmetic; bench_glm5_8gpu end to end on a tiny
config. Subprocesses as in tests/test_parallel.py (the device count is fixed before jax initialises)."""
import json
import pathlib

import pytest

from glm_fast import load_config
from glm_fast.parallel import build_roles, memory_plan
from glm_fast.parallel.memory import check_fits
from test_parallel import REPO, _subprocess


def test_fp8_layouts_match_single_device():
    """Greedy tokens with D = 0 and D = 2 identical to Engine on the dequantized FP8 weights; teacher-forced
    logits within 2% of max |logit| (bfloat16: partial sums are added in another order across devices)."""
    out = _subprocess([str(REPO / "tests" / "glm5_8gpu_check.py"), "hetero,homogeneous"])
    cases = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(c["case"], c["layout"]) for c in cases] == [("random", "hetero"), ("random", "homogeneous"),
                                                          ("sliced", "hetero")], out
    for c in cases:
        assert all(c["tokens_equal"].values()), c
        assert c["accepted"] == c["ref_accepted"], c
        assert c["finite"] and c["logits_rel_err"] < 2e-2, c
        assert len(set(c["tokens"])) > 1, c  # not a degenerate constant output
    assert all(c["fp8_stacks"] == 9 for c in cases if c["case"] == "random")  # 3 MoE blocks x gate/up/down


def test_memory_plan_counts_shards_and_fails_clearly():
    cfg = load_config("tiny", {"model.num_attention_heads": 8}).model
    bf16 = memory_plan(cfg, build_roles("hetero", 8, cfg), 256, 2, expert_format="bf16")
    fp8 = memory_plan(cfg, build_roles("hetero", 8, cfg), 256, 2, expert_format="fp8")
    # the shapes hold accounting's parameters (plus the router's correction biases, which accounting leaves out)
    assert 0 <= bf16.params_stored - bf16.params_total <= cfg.n_routed_experts * cfg.num_hidden_layers * 2
    experts = "routed experts"
    assert fp8.weights[experts] < 0.3 * bf16.weights[experts]  # float32 tiny: 1 byte (+scales) instead of 4
    assert fp8.zero_fill[0] > 0 and bf16.state["caches"] == fp8.state["caches"]
    with pytest.raises(MemoryError, match="layout 'hetero' with 256 cache rows, MTP D=2, experts fp8: .* GiB per "
                                          "device > .* GiB usable"):
        check_fits(fp8, fp8.total - 1)


def test_bench_glm5_8gpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    _subprocess([str(REPO / "experiments" / "bench_glm5_8gpu.py"), "--config", "tiny",
                 "--set", "model.num_attention_heads=8", "--set", "model.dtype=bfloat16", "--contexts", "48",
                 "--mtp-depths", "0,2", "--steps", "1", "--warmup", "1", "--hbm-gib", "0.001",
                 "--comm-max-mib", "0.001", "--backends", "xla,persistent", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["experiment"] == "bench_glm5_8gpu" and record["expert_format"] == "fp8"
    assert record["env"]["NCCL_NVLS_ENABLE"] == "0" and "assumed" in record["acceptance_source"]
    ok = [r for r in record["rows"] if r["status"] == "ok"]
    assert {(r["layout"], r["mtp_depth"]) for r in ok} == {(lay, d) for lay in ("hetero", "homogeneous")
                                                          for d in (0, 2)}
    for r in ok:
        assert r["ms_per_step"] > 0 and r["model_ms"] > 0 and 0 < r["roofline_fraction"]
        assert r["bytes_per_step"] > 0 and r["projected_tokens_per_s"] > 0 and r["num_devices"] == 8
    assert all(r["status"].startswith("skipped") for r in record["rows"] if r["backend"] == "persistent")
    assert record["memory_plans"] and all(p["fits"] for p in record["memory_plans"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert pathlib.Path(out).exists()
