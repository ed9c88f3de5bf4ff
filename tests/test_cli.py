"""`glm-fast` CLI: the README's main job works on the CPU; every user error is one line on stderr and exit 2."""
import json
import shutil
import subprocess
import sys

import pytest

from glm_fast.cli import DEMO_CHECKPOINT, main


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_generate_random_init_json(capsys):
    assert main(["generate", "--config", "tiny", "--random-init", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                 "--speculative", "2", "--json", "--ignore-eos"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["tokens"]) == 6 and out["stats"]["speculative_depth"] == 2
    assert all(0 <= t < 512 for t in out["tokens"])


def test_shipped_demo_writes_text(capsys):
    assert DEMO_CHECKPOINT.exists()
    assert main(["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "24", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add(a, b):") and len(captured.out) > len("def add(a, b):") + 10
    assert "tokens/s" in captured.err and "accepted/step" in captured.err


@pytest.mark.parametrize("argv,message", [
    (["--prompt-ids", ",".join(["5"] * 1100)], "needs .* positions > the context max_len=1024"),
    (["--backend", "cuda"], "unknown backend 'cuda'"),
    (["--speculative", "7"], "speculative_depth=7: this model has 2 MTP depths"),
    (["--prompt-ids", "1,x"], "give integers separated by commas"),
    (["--set", "model.index_topk=0"], r"model\.index_topk=0: must be a positive integer"),
    (["--config", "nonexistent"], "no config named 'nonexistent'"),
    (["--expert-format", "fp8"], "persistent backend only: add --backend persistent"),
])
def test_random_init_errors_are_one_line(capsys, argv, message):
    import re
    base = ["generate", "--random-init", "--max-new-tokens", "4"]
    if "--config" not in argv:
        base += ["--config", "tiny"]
    assert main(base + argv) == 2
    assert re.search(message, _error_line(capsys))


def test_expert_format_fp8_reaches_the_persistent_engine(monkeypatch):
    """--backend persistent --expert-format fp8 hands the engine FP8 ScheduleOptions (the engine's FP8 decoding
    itself: tests/test_persistent_fp8.py)."""
    import glm_fast

    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(model, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(glm_fast, "Engine", fake_engine)
    with pytest.raises(Stop):
        main(["generate", "--random-init", "--config", "tiny", "--backend", "persistent", "--expert-format", "fp8",
              "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
    assert seen["backend"] == "persistent" and seen["persistent_options"].expert_format == "fp8"


def test_checkpoint_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--max-new-tokens", "2"]) == 2
    assert "missing" in _error_line(capsys)
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_CHECKPOINT, copy)
    assert main(["generate", "--checkpoint", str(copy), "--config", "small", "--max-new-tokens", "2"]) == 2
    assert "does not match --config small" in _error_line(capsys)
    (copy / "params.msgpack").write_bytes(b"\x00garbage")
    assert main(["generate", "--checkpoint", str(copy), "--max-new-tokens", "2"]) == 2
    assert "corrupt" in _error_line(capsys)


def test_console_script_exits_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "glm_fast.cli", "generate", "--config", "tiny", "--random-init",
                           "--backend", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown backend" in proc.stderr
