"""Experiment entry points on the CPU: the tiny sweep end to end (results.jsonl, table.md, PNGs), resuming it,
a bad sweep file's error, every shipped sweep file validating, and an mtp_acceptance smoke run.

All runs use a 2-layer `tiny` with 1 MTP depth so they share small compiled programs (< 90 s on 2 cores).
"""
import importlib.util
import json
import pathlib

import pytest

from glm_fast.sweep import SWEEP_DIR, SweepError, load_sweep, read_results, run_sweep, sweep_from_dict

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["model.num_hidden_layers=2", "model.indexer_types=[full,shared]", "model.mtp_depth=1"]


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
