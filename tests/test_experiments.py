"""Experiment entry points on the CPU: the tiny sweep end to end (results.jsonl, table.md, PNGs), resuming it,
a bad sweep file's error, every shipped sweep file validating, an mtp_acceptance smoke run, and the GPU
diagnostics (diagnose_backend, bench_persistent) on `tiny` with the kernels in GPU interpret mode; on the GPU
only, the persistent kernel on a freshly trained small_glm5.

All runs use a 2-layer `tiny` with 1 MTP depth so they share small compiled programs (< 90 s on 2 cores).
"""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import yaml

from glm_fast import accounting, load_config
from glm_fast.config import parse_override
from glm_fast.sweep import SWEEP_DIR, SweepError, load_sweep, read_results, run_sweep, sweep_from_dict

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["model.num_hidden_layers=2", "model.indexer_types=[full,shared]", "model.mtp_depth=1"]


def _small_tiny(tmp_path) -> str:
    """configs/tiny.yaml with SMALL's overrides, as a config file (for bench_persistent, whose --config takes a
    preset or a path and which has no --set)."""
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for key, value in (parse_override(o) for o in SMALL):
        section, field = key.split(".")
        raw[section][field] = value
    path = tmp_path / "tiny.yaml"  # (its `name` stays tiny)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _entry_point(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_sweep_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    lines = _entry_point("sweep").main([str(SWEEP_DIR / "tiny_smoke.yaml"), "--out", str(out)])
    assert len(lines) == 2 and all(ln["status"] == "ok" for ln in lines)
    stored = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(stored) == 2
    assert [s["point"] for s in stored] == [{"model.index_topk": 4}, {"model.index_topk": 8}]
    for s in stored:
        assert s["config"]["name"] == "tiny" and s["config"]["overrides"]["model.num_hidden_layers"] == 2
        assert s["seed"] == 0 and "jax" in s["versions"] and "git_commit" in s
        assert s["metrics"]["tokens_per_s"] > 0 and s["metrics"]["accepted_per_step"] >= 1
    table = (out / "table.md").read_text()
    assert "model.index_topk" in table and table.count("| ok |") == 2
    assert list(out.glob("*.png"))

    log = []
    again = run_sweep(load_sweep("tiny_smoke"), out, log=log.append)
    assert sum("skip" in m for m in log) == 2 and not any(" run:" in m for m in log)
    assert len(read_results(out)) == 2 and [a["key"] for a in again] == [s["key"] for s in stored]


def test_bad_sweep_key_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nkind: decode\ngrid:\n  model.index_topkk: [4, 8]\n")
    with pytest.raises(SweepError, match=r"model\.index_topkk.*did you mean 'model\.index_topk'"):
        load_sweep(bad)
    with pytest.raises(SweepError, match=r"run\.prompt_lenn"):
        sweep_from_dict({"kind": "decode", "points": [{"run.prompt_lenn": 3}]})
    with pytest.raises(SweepError, match=r"'modle\.mtp_depth'.*did you mean 'model'"):
        sweep_from_dict({"kind": "train", "grid": {"modle.mtp_depth": [1]}})
    with pytest.raises(SweepError, match="exactly one of 'grid'"):
        sweep_from_dict({"kind": "decode"})
    with pytest.raises(SweepError, match="model.indexer_types"):  # a valid key with a value the config rejects
        sweep_from_dict({"kind": "decode", "points": [{"model.indexer_types": ["shared"]}]})
    with pytest.raises(SweepError, match=r"model\.index_topkk"):  # the entry point fails before running
        _entry_point("sweep").main([str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(SWEEP_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_validate(path):
    sweep = load_sweep(path)
    assert sweep.points and sweep.axes


def test_mtp_acceptance_random_init_smoke(tmp_path):
    argv = ["--random-init", "--config", "tiny", *sum((["--set", s] for s in SMALL), []),
            "--set", "train.val_fraction=0.5", "--corpus-root", "json", "--depths", "1,2", "--num-prompts", "2",
            "--num-lines", "2", "--max-new-tokens", "6", "--out", str(tmp_path), "--name", "acc"]
    record = _entry_point("mtp_acceptance").main(argv)
    stored = json.loads((tmp_path / "acc.json").read_text())
    assert stored["experiment"] == "mtp_acceptance" and stored["rows"] == json.loads(json.dumps(record["rows"]))
    rows = {(r["mtp_depth"], r["mode"]): r for r in stored["rows"]}
    assert set(rows) == {(0, "greedy"), (1, "greedy"), (0, "sampled"), (1, "sampled")}  # depth 2 capped at 1
    for (d, mode), r in rows.items():
        assert r["batch"] == 2 and r["new_tokens"] == 2 * 6 and r["tokens_per_s"] > 0
        assert len(r["acceptance_by_depth"]) == d and 1 <= r["accepted_per_step"] <= 1 + d
        assert r["speedup_steps"] >= 1 - 1e-9 and (d or r["speedup_steps"] == 1)
    assert rows[(0, "greedy")]["sequence_steps"] == 2 * (6 - 1)
    assert stored["config"]["resolved"]["model"]["mtp_depth"] == 1 and stored["prompts"]["split"] == "validation"


def test_diagnose_backend_smoke(tmp_path):
    """Per-op swaps, in-step kernel checks (every op called, kernels within 2e-2 of their references, identical
    top-k sets) and the float32 floor, on a bf16 tiny on the kernels' tile granularity."""
    out = tmp_path / "diag.json"
    rec = _entry_point("diagnose_backend").main(
        ["--config", "tiny", *sum((["--set", s] for s in SMALL), []), "--set", "model.dtype=bfloat16",
         "--set", "model.moe_intermediate_size=128", "--context", "40", "--rows", "3", "--out", str(out)])
    assert json.loads(out.read_text())["swaps"] == rec["swaps"]
    assert [r["swap"] for r in rec["swaps"]] == ["indexer_topk", "sparse_mla_attention", "moe_experts", "lm_head",
                                                 "all"]
    assert all(r["finite"] for r in rec["swaps"])
    ops = {r["op"] for r in rec["in_step_checks"]}
    assert ops == {"indexer_topk", "sparse_mla_attention", "moe_experts", "lm_head"}
    for r in rec["in_step_checks"]:
        assert len(r["rel_err_per_row"]) == 3
        assert max(r["rel_err_per_row"]) == 0.0 if r["op"] == "indexer_topk" else max(r["rel_err_per_row"]) < 2e-2
    assert set(rec["float32_floor"]) == {"xla", "pallas"}


def test_bench_decode_protocol_smoke(tmp_path):
    """The issue's protocol script on tiny (CPU; the persistent kernel in GPU interpret mode): one row per
    (backend, depth, batch) except the persistent backend's batches > 1, roofline fractions from the HBM rate it
    measured, projected tokens/s on the MTP rows, a traced step per row, the JSON written with its ceilings."""
    _entry_point("bench_decode").main(
        ["--config", "tiny", *sum((["--set", s] for s in SMALL), []), "--backends", "xla,persistent",
         "--contexts", "32", "--batches", "1,2", "--mtp-depths", "0,1", "--steps", "1", "--warmup", "0",
         "--hbm-gib", "0.01", "--out", str(tmp_path), "--name", "bd", "--trace-steps", "1"])
    rec = json.loads((tmp_path / "bd.json").read_text())
    rows = {(r["backend"], r["mtp_depth"], r["batch"]): r for r in rec["rows"]}
    assert set(rows) == {("xla", d, b) for d in (0, 1) for b in (1, 2)} | {("persistent", d, 1) for d in (0, 1)}
    assert rec["ceilings"]["hbm_tb_s"] > 0
    for (_, depth, batch), r in rows.items():
        assert r["ms_per_step"] > 0 and 0 < r["roofline_fraction"] < 1, r
        assert r["bytes_per_step"] > 0 and np.isclose(r["roofline_ms"], 1e3 * r["bytes_per_step"] / (
            rec["ceilings"]["hbm_tb_s"] * 1e12)), r
        assert ("projected_tokens_per_s" in r) == (depth > 0), r
        assert r["device_trace"]["steps"] == 1 and r["device_trace"]["idle_us"] >= 0, r  # (no GPU track here)
    assert rows[("xla", 1, 1)]["bytes_per_step"] > rows[("xla", 0, 1)]["bytes_per_step"]  # drafts + verify rows


def test_bench_decode_fp8_rows_count_routed_experts_at_one_byte():
    """`--backends persistent:fp8`: the entry parses, another backend with a format is refused by name, and the
    FP8 row's roofline bytes halve the routed experts only (the persistent kernel's shared experts stay bf16)."""
    bd = _entry_point("bench_decode")
    assert bd._backend("persistent:fp8") == ("persistent", "fp8") and bd._backend("xla") == ("xla", "bf16")
    with pytest.raises(SystemExit, match="persistent:fp8"):
        bd._backend("xla:fp8")
    cfg = load_config("glm5_slice")
    routed = accounting.decode_step_breakdown(cfg, 4096)["routed_experts"]
    saved = bd._step_bytes(cfg, 4096, 1, 1, "bf16") - bd._step_bytes(cfg, 4096, 1, 1, "fp8")
    assert bd._step_bytes(cfg, 4096, 1, 1, "bf16") == accounting.bytes_per_decode_step(cfg, 4096)
    assert routed / 2 * 0.999 < saved < routed / 2  # half the routed bytes, less the block scales (1 / 4096)


def test_probe_tma_issue_smoke(tmp_path):
    """The gather probe in GPU interpret mode (one-thread issue; the warps' variant needs the GPU): the gathered
    rows equal the table's, a finite time per gather (a difference of two interpreted launches' times: noise on
    the CPU, negative under load), the record written; the warps' variant refuses the CPU."""
    probe = _entry_point("probe_tma_issue")
    rec = probe.main(["--interpret", "--modes", "thread", "--rows", "8", "--segments", "3", "--ctas", "2",
                      "--reps", "2", "--trials", "1", "--seq", "64", "--out", str(tmp_path), "--name", "pt"])
    (row,) = json.loads((tmp_path / "pt.json").read_text())["rows"]
    assert row == rec["rows"][0] and row["correct"] and np.isfinite(row["us_per_gather"]), row
    with pytest.raises(ValueError, match="warps"):
        probe.gather_kernel("warps", 8, 3, 2, 2, interpret=True)


@pytest.mark.parametrize("flags, message", [({"stamps": True}, "needs the GPU"),
                                            ({"task_stamps": True}, "needs the GPU")])
def test_bench_persistent_stamps_say_they_need_the_gpu(flags, message):
    """The globaltimer stamps (launch window, per task) have no interpret mode: a clear exit, not a failed launch."""
    with pytest.raises(SystemExit, match=message):
        _entry_point("bench_persistent").run_variant("tiny", 40, ["EMBED"], 1, **flags)


def test_bench_persistent_smoke(tmp_path):
    """Each variant runs in its own subprocess (GPU interpret mode here). `dense`: the layer-0 cache rows (no
    attention upstream) equal the XLA step's. `full` (tiny is float32): logits, hidden state and cache rows equal
    the XLA step's, and every task of layers 0-1 and every scratch buffer equal the simulator's. A probe
    (opcodes joined by +) checks its own tasks, skipping those downstream of no-op bodies. --trace-launches: each
    persistent variant's traced launch (no device track on the CPU)."""
    probe = "EMBED+GEMV+MOE_COMBINE+IK_WRITE+INDEX_SCORE"  # MOE_COMBINE: the split-K projections' sums
    rec = _entry_point("bench_persistent").main(
        ["--config", _small_tiny(tmp_path), "--context", "40", "--reps", "1", "--variants",
         f"xla,skeleton,dense,full,{probe}",
         "--trace-launches", "1", "--out", str(tmp_path), "--name", "bp"])
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bp.json").read_text())["rows"]}
    assert rows == {r["variant"]: r for r in rec["rows"]}
    assert set(rows) == {"xla", "skeleton", "dense", "full", probe}
    assert all("error" not in r and r["median_ms"] > 0 for r in rows.values()), rows
    assert rows["skeleton"]["bytes_of_ops"] == 0 < rows["dense"]["bytes_of_ops"] < rows["full"]["bytes_of_ops"]
    assert "device_trace" not in rows["xla"]
    assert all(rows[v]["device_trace"]["steps"] == 1 for v in ("skeleton", "dense", "full", probe)), rows
    errs = rows["dense"]["layer0_rows_vs_xla"]
    assert set(errs) == {"c_kv", "k_pe", "index_k"}
    assert all(e["finite"] and e["rel_err"] < 1e-5 for e in errs.values()), errs
    check = rows["full"]["check"]
    assert check["finite"] and check["argmax_equal_xla"], check
    assert max(check[k]["vs_xla"] for k in ("logits", "hidden", "cache_rows_worst")) < 1e-4, check
    tasks = dict(rows["full"]["tasks_vs_simulator"])
    assert tasks.pop("skipped") == 0
    assert {k.split(":")[0] for k in tasks} >= {"ATTN", "INDEX_SCORE", "INDEX_TOPK", "ROUTER_SELECT", "UV"}, tasks
    assert all(v["err"] < 1e-4 for v in tasks.values()), tasks
    assert tasks["INDEX_SCORE:index_cand_val@0"]["rows_only_one_side"] == 0, tasks  # scores compared per key row
    probed = dict(rows[probe]["tasks_vs_simulator"])
    assert probed.pop("skipped") > 0, probed
    assert {k.split(":")[0] for k in probed} == {"GEMV", "MOE_COMBINE", "INDEX_SCORE"}, probed
    assert all(v["err"] < 1e-4 for v in probed.values()), probed
    bufs = rows["full"]["buffers_vs_simulator"]
    assert len(bufs) > 20 and all(b.get("rel_err", 0) < 1e-4 and b.get("differ_fraction", 0) == 0
                              and b.get("missed_fraction", 0) == 0 for b in bufs), bufs
    assert any("missed_fraction" in b for b in bufs), bufs
    flips = rows["full"]["flips_vs_simulator"]
    assert flips["forced_tasks"] > 0 and max(flips["logits"], flips["hidden"]) < 1e-4, flips


def test_persistent_lowering_reports_each_opcode(tmp_path):
    """On a CPU host the script lowers for CUDA (abstract H200): the bodiless kernel and EMBED's TMA body lower;
    a config the GPU tile bodies do not take (tiny: ATTN's shapes are not GLM-5-like, AttnShape.fits_gpu) is
    reported as a failure, not raised."""
    rec = _entry_point("persistent_lowering").main(
        ["--config", "glm5_slice", "--ops", "skeleton,EMBED", "--out", str(tmp_path), "--name", "pl"])
    rows = {r["ops"]: r for r in rec["rows"]}
    assert rows["skeleton"]["ok"] and rows["EMBED"]["ok"], rows
    bad = _entry_point("persistent_lowering").main(
        ["--config", "tiny", "--sms", "8", "--ops", "MOE_COMBINE", "--out", str(tmp_path), "--name", "bad"])
    row = bad["rows"][0]
    assert not row["ok"] and "interpret mode" in row["error"], row


@pytest.mark.parametrize("seed,parts", [(3, 1), (11, 3)])
def test_router_probe_matches_route(seed, parts):
    """probe_router (the ROUTER_SELECT body alone, GPU interpret mode here) on fresh logits: the U slots and
    their coefficients equal `simulate._route`'s, with group-limited routing, T > 1 (shared experts) and the
    logits as one or three split-K partials (summed in order by both)."""
    res = _entry_point("probe_router").run(experts=32, top_k=4, tokens=3, n_group=4, topk_group=2, seed=seed,
                                           interpret=True, parts=parts)
    assert res["slot_expert_equal"] and res["coef_err"] < 1e-6, res
    assert sum(e >= 0 for e in res["kernel_slot_expert"]) >= 4
    assert all(v["right"] for v in _entry_point("probe_router").minimal_repro(interpret=True).values())


@pytest.mark.parametrize("context,k", [(200, 16), (100, 64)])  # chunks above K (radix select), and at most K
def test_index_probe_matches_indexer_scores(context, k):
    """probe_index (INDEX_SCORE alone over every chunk) on fresh random q / keys: each chunk's candidate rows
    are the reference's top-K set and their scores match `ref.indexer_scores` (bf16 inputs, 1e-2 of max);
    the staged RoPE'd q rows match `apply_rope`."""
    res = _entry_point("probe_index").run(context=context, tokens=2, heads=8, dim=32, rope=16, k=k, n_chunks=4,
                                          seed=context, interpret=True)
    assert res["staged_q_err"] < 2e-2 and not res["staged_q_bad_rows"], res
    assert all(c["rows_only_one_side"] == 0 and c["err"] < 1e-2 for c in res["chunks"]), res["chunks"]
    assert any(c["rows"][1] - c["rows"][0] > k for c in res["chunks"]) == (context == 200)


def test_bench_persistent_verification_step(tmp_path):
    """--tokens 3 (an MTP verification step, T = 1 + 2): `full`'s logits, hidden state and cache rows (all T of
    each) equal the XLA step's, and every task of layers 0-1 the simulator's."""
    rec = _entry_point("bench_persistent").main(
        ["--config", _small_tiny(tmp_path), "--context", "40", "--tokens", "3", "--reps", "1", "--variants", "full",
         "--checks", "tasks", "--out", str(tmp_path), "--name", "bp3"])
    assert rec["config"]["tokens"] == 3
    rows = {r["variant"]: r for r in rec["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    check = rows["full"]["check"]
    assert check["finite"] and check["argmax_equal_xla"], check
    assert max(check[k]["vs_xla"] for k in ("logits", "hidden", "cache_rows_worst")) < 1e-4, check
    tasks = dict(rows["full"]["tasks_vs_simulator"])
    assert tasks.pop("skipped") == 0 and all(v["err"] < 1e-4 for v in tasks.values()), tasks


def test_bench_persistent_fp8_experts(tmp_path):
    """--expert-format fp8: `full`'s tasks (routed experts included) equal the simulator's, which dequantizes as the
    XLA backend's FP8 MoE does; the row stays finite."""
    rec = _entry_point("bench_persistent").main(
        ["--config", _small_tiny(tmp_path), "--context", "40", "--reps", "1", "--variants", "full",
         "--expert-format", "fp8", "--checks", "tasks", "--out", str(tmp_path), "--name", "bp8"])
    assert rec["config"]["expert_format"] == "fp8"
    row = rec["rows"][0]
    assert "error" not in row and row["check"]["finite"], row
    tasks = dict(row["tasks_vs_simulator"])
    assert tasks.pop("skipped") == 0 and any(k.startswith("SWIGLU") for k in tasks), tasks
    assert all(v["err"] < 1e-4 for v in tasks.values()), tasks


def test_bench_persistent_set_metrics():
    """The selection metric counts each missed member once (a sorted elementwise compare would count every slot
    after a flip), ignores empty (-1) slots and order; the score compare pairs scores by key row."""
    bp = _entry_point("bench_persistent")
    assert bp._missed(np.array([[9, 1, 2, 3]]), np.array([[1, 2, 3, 4]])) == 0.25
    assert bp._missed(np.array([4, 3, -1]), np.array([3, 4, -1])) == 0.0
    rng = np.random.default_rng(5)
    val = rng.normal(size=(2, 6)).astype(np.float32)
    idx = np.stack([rng.permutation(6) for _ in range(2)]).astype(np.int32)
    order = np.argsort(-val, axis=-1)
    err, extra = bp._scores_by_row(val, np.take_along_axis(val, order, -1), idx, np.take_along_axis(idx, order, -1))
    assert err == 0.0 and extra["rows_only_one_side"] == 0
    bad = val.copy()
    bad[1, 2] += 1.0
    err, extra = bp._scores_by_row(bad, val, idx, idx)
    assert err > 0.1 and extra["worst_rows"][0][:2] == [1, int(idx[1, 2])]


def test_persistent_trained_helpers_and_input_errors(tmp_path):
    """experiments/persistent_trained.py's pieces on the CPU (the whole run, a trained model through the kernel,
    is the H200's: experiments/results/persistent_trained_*.json): where two token lists part, the teacher-forced
    statistics, and the errors that name the fix."""
    pt = _entry_point("persistent_trained")
    assert pt.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert pt.first_difference([1, 2, 3], [1, 5, 3]) == 1 and pt.first_difference([1, 2], [1, 2, 3]) == 2
    rng = np.random.default_rng(0)
    want32 = rng.normal(size=(6, 10)).astype(np.float32)
    forced = want32 + 0.01 * rng.normal(size=want32.shape).astype(np.float32)
    forced[2] = -want32[2]  # one step whose argmax moves
    stats = pt.forced_stats(forced, want32, want32.argmax(-1).tolist())
    assert stats["forced_agrees_with_xla"] == stats["forced_agrees_with_float32"] == 5 / 6
    want_err = np.mean(np.abs(forced - want32).max(-1) / np.abs(want32).max(-1))
    assert np.isclose(stats["forced_rel_err_vs_float32"], want_err)
    with pytest.raises(ValueError, match="give 'persistent'"):
        pt.main(["--random-init", "--backends", "pallas", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="longer than index_topk"):
        pt.main(["--random-init", *sum((["--set", s] for s in SMALL), []), "--set", "model.index_topk=1024",
                 "--set", "train.val_fraction=0.5", "--corpus-root", "json", "--num-prompts", "1", "--num-lines",
                 "1", "--out", str(tmp_path)])


def _trained_model_check(config: str, overrides: dict, run_dir, prompts: int, new_tokens: int, lines: int = 40):
    """Trains `config` (+ overrides) into run_dir, then runs experiments/persistent_trained.py on it (persistent
    only, MTP D = 3 capped at the model's depth, prompts of `lines` lines): its summary row."""
    from glm_fast.train import train
    train(load_config(config, overrides), run_dir / "run", progress=False, async_checkpoint=False)
    rec = _entry_point("persistent_trained").main(
        ["--checkpoint", str(run_dir / "run"), "--num-prompts", str(prompts), "--num-lines", str(lines),
         "--new-tokens", str(new_tokens), "--backends", "persistent", "--out", str(run_dir), "--name", "trained"])
    return rec["rows"][-1]["summary"]


@pytest.mark.gpu
def test_persistent_kernel_on_a_trained_model(tmp_path, monkeypatch):
    """On the H200: small_glm5 trained 300 steps (~1 min), 4 held-out prompts x 64 greedy tokens through the kernel.
    MTP D = 3 through it is lossless on every prompt; teacher-forced on XLA's tokens, its argmax agrees with the
    float32 model's as often as bf16 XLA's does (to two standard errors of the difference of two rates) and its
    logits are no further from float32's than XLA's are (x1.25 + 5e-3). Greedy identity with XLA is not asserted:
    two bf16 implementations part at near-ties (experiments/results/persistent_trained_small_glm5_forced.json:
    2 of 8 prompts identical over 256 tokens for the kernel, 3 of 8 for pallas, the float32 model preferring the
    kernel's token at 4 of its 6 partings). Needs grain on the GPU host (carry its wheel, README's device notes)."""
    pytest.importorskip("grain", reason="training reads the corpus through grain: carry its wheel to the GPU host")
    monkeypatch.setenv("GLM_FAST_SCHEDULE_DIR", str(tmp_path / "schedules"))
    s = _trained_model_check("small_glm5", {"train.steps": 300, "train.eval_every": 300, "train.save_every": 300},
                             tmp_path, prompts=4, new_tokens=64)
    print(s)
    assert s["mtp_equals_plain_persistent"] == s["prompts"] > 0, s
    p = s["xla_forced_agrees_with_float32"]
    margin = 2 * np.sqrt(2 * p * (1 - p) / (s["prompts"] * 63))
    assert s["persistent_forced_agrees_with_float32"] >= p - margin, s
    assert s["persistent_forced_rel_err_vs_float32"] <= 1.25 * s["xla_forced_rel_err_vs_float32"] + 5e-3, s
