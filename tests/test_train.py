"""MTP training: loss alignment, optimiser schedule, router balancing, the loop (loss falls, MTP heads learn),
checkpoints (exact resume, atomic saves, clear errors), load_model, and the experiments/train_mtp.py entry point.

Every training run here uses `tiny` at seq_len 32, batch 4, 24 steps on the stdlib's json/ package with the bytes
tokenizer, so they all share one compiled step (the step's config is a static jit argument).
"""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_fast import Model, load_config
from glm_fast.data import load_corpus, stdlib_root
from glm_fast.model.moe import MoE
from glm_fast.train import (CheckpointError, Checkpointer, TrainState, balance_loss, data_mesh, decay_mask,
                            global_batch, init_train_state, load_imbalance, load_model, lr_schedule, mtp_loss,
                            read_jsonl, router_loads, shifted_targets, step_settings, train, train_step,
                            update_router_bias)
from glm_fast.train.step import split_model

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 24
OVERRIDES = [f"train.steps={STEPS}", "train.warmup_steps=2", "train.seq_len=32", "train.batch_size=4",
             "train.log_every=1", "train.eval_every=8", "train.save_every=8", "train.eval_batches=2",
             "train.tokenizer=bytes", "train.val_fraction=0.5"]
CORPUS_ROOT = stdlib_root() / "json"  # 5 files, ~48 KB; split by path hash: 2 train, 3 validation


def small_cfg(*extra):
    return load_config("tiny", OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def corpus():
    return load_corpus(0.5, CORPUS_ROOT)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, corpus, cache_dir):
    """One uninterrupted 24-step run, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    result = train(small_cfg(), run_dir, corpus=corpus, cache_dir=cache_dir, progress=False)
    return run_dir, result


def copy_run(full_run, tmp_path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(full_run[0], dst)
    return dst


# ---- loss ------------------------------------------------------------------------------------------------
def _peaked_logits(tokens, shift: int, s: int, v: int):
    """Logits [B, S, V] whose row i puts 12 nats on tokens[:, i + shift] (0 where that is past the end)."""
    padded = jnp.pad(tokens, ((0, 0), (0, shift + 1)))
    return 12.0 * jax.nn.one_hot(padded[:, shift: shift + s], v)


def test_mtp_loss_target_alignment_perfect_vs_off_by_one():
    """Depth k at row i must be scored against t_{i+k+1}: perfect logits for that give ~0 loss and accuracy 1;
    the same logits shifted by one (t_{i+k} or t_{i+k+2}) give high loss and accuracy 0."""
    s, v, d = 12, 40, 3
    tokens = (jnp.arange(s + 1)[None, :] + jnp.array([[0], [17]])) % v  # counting: every depth can be perfect
    right_main = _peaked_logits(tokens, 1, s, v)
    right_mtp = jnp.stack([_peaked_logits(tokens, k + 1, s, v) for k in range(1, d + 1)])
    loss, m = mtp_loss(right_main, right_mtp, tokens, mtp_lambda=0.3)
    assert float(m["main_loss"]) < 1e-3 and float(m["main_acc"]) == 1.0
    np.testing.assert_array_less(np.asarray(m["mtp_loss"]), 1e-3)
    np.testing.assert_array_equal(np.asarray(m["mtp_acc"]), np.ones(d))
    np.testing.assert_allclose(float(loss), float(m["main_loss"] + 0.3 / d * m["mtp_loss"].sum()), rtol=1e-6)
    for off in (-1, 1):
        wrong_mtp = jnp.stack([_peaked_logits(tokens, k + 1 + off, s, v) for k in range(1, d + 1)])
        _, m = mtp_loss(right_main, wrong_mtp, tokens, mtp_lambda=0.3)
        assert np.all(np.asarray(m["mtp_loss"]) > 5.0), off
        np.testing.assert_array_equal(np.asarray(m["mtp_acc"]), np.zeros(d))
    _, m = mtp_loss(_peaked_logits(tokens, 0, s, v), right_mtp, tokens, mtp_lambda=0.3)
    assert float(m["main_loss"]) > 5.0 and float(m["main_acc"]) == 0.0


def test_mtp_loss_masks_rows_without_target():
    """Rows i >= S - k of depth k have no target: whatever the logits say there, the loss ignores them."""
    b, s, v, d = 2, 10, 32, 2
    tokens = jax.random.randint(jax.random.PRNGKey(0), (b, s + 1), 0, v)
    targets, valid = shifted_targets(tokens, d)
    assert valid.sum(axis=1).tolist() == [s, s - 1, s - 2]
    np.testing.assert_array_equal(np.asarray(targets[2, :, : s - 2]), np.asarray(tokens[:, 3:]))
    mtp = jnp.stack([_peaked_logits(tokens, k + 1, s, v) for k in range(1, d + 1)])
    garbage = jax.random.normal(jax.random.PRNGKey(1), mtp.shape) * 50.0
    rows = jnp.arange(s)
    masked = jnp.stack([jnp.where((rows >= s - k)[None, :, None], garbage[k - 1], mtp[k - 1])
                        for k in range(1, d + 1)])
    _, clean = mtp_loss(_peaked_logits(tokens, 1, s, v), mtp, tokens, 0.3)
    _, noisy = mtp_loss(_peaked_logits(tokens, 1, s, v), masked, tokens, 0.3)
    np.testing.assert_allclose(np.asarray(noisy["mtp_loss"]), np.asarray(clean["mtp_loss"]), rtol=1e-6)


def test_no_head_sees_its_own_target():
    """Changing token p must leave every row whose target is t_p or earlier untouched: main rows < p and MTP
    depth-k rows <= p - k - 1 (the loss scores row i of depth k against t_{i+k+1})."""
    cfg = small_cfg()
    model = Model(cfg.model, rngs=nnx.Rngs(0))
    s, p = 20, 13
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, s + 1), 3, cfg.model.vocab_size)
    changed = tokens.at[:, p].set((tokens[:, p] + 7) % cfg.model.vocab_size)
    forward = nnx.jit(lambda m, t: m(t))  # one compile, two calls: faster than eager
    (l0, m0), (l1, m1) = forward(model, tokens[:, :-1]), forward(model, changed[:, :-1])
    targets, _ = shifted_targets(changed, cfg.model.mtp_depth)
    for k, (a, b) in enumerate([(l0, l1)] + [(m0[j], m1[j]) for j in range(cfg.model.mtp_depth)]):
        rows = np.abs(np.asarray(a - b)).max(axis=(0, 2)) > 0
        first = int(np.argmax(rows))
        assert first == p - k, (k, first)  # row p - k is the first to read t_p (as its input t_{i+k})
        assert np.all(np.asarray(targets[k, :, first - 1]) == np.asarray(changed[:, p]))  # ... its target was t_p


def test_balance_loss_and_imbalance_sum_over_main_and_mtp_moe_layers():
    moe = lambda loss, load: {"moe": {"seq_aux_loss": jnp.float32(loss), "expert_load": jnp.asarray(load)}}  # noqa
    aux = {"layers": [{}, moe(1.0, [0.5, 0.5]), moe(2.0, [0.75, 0.25])], "mtp": [moe(4.0, [1.0, 0.0]), {}]}
    assert float(balance_loss(aux)) == 7.0
    imb = load_imbalance(aux)
    np.testing.assert_allclose([float(imb["load_imbalance"]), float(imb["load_imbalance_max"])], [1.5, 2.0])


# ---- optimiser ---------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_cosine_floor_and_decay_mask():
    t, t_model = small_cfg().train, small_cfg().model  # lr 3e-3, warmup 2, 24 steps, min_lr_ratio 0.1
    sched = lr_schedule(t)
    np.testing.assert_allclose([float(sched(0)), float(sched(1)), float(sched(2))], [1.5e-3, 3e-3, 3e-3], rtol=1e-6)
    np.testing.assert_allclose(float(sched(STEPS - 1)), 3e-4, rtol=1e-5)
    np.testing.assert_allclose(float(sched(STEPS + 10)), 3e-4, rtol=1e-5)
    lrs = [float(sched(i)) for i in range(2, STEPS)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    _, params, _ = split_model(nnx.eval_shape(lambda: Model(t_model, rngs=nnx.Rngs(0))))
    mask = decay_mask(params)
    assert mask["layers"][0]["self_attn"]["q_a_proj"]["kernel"] and mask["layers"][1]["mlp"]["gate_proj"]
    assert not mask["norm"]["weight"] and not mask["layers"][0]["indexer"]["k_norm"]["bias"]


# ---- router balancing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [False, True])
def test_router_loads_line_up_with_router_biases(share):
    cfg = small_cfg(f"model.mtp_share_weights={share}")
    model = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))
    _, _, bias = split_model(model)
    _, _, aux = nnx.eval_shape(lambda m: m(jnp.zeros((2, 8), jnp.int32), return_aux=True), model)
    loads = jax.eval_shape(lambda a: router_loads(a, cfg.model), aux)
    assert jax.tree.structure(loads) == jax.tree.structure(bias)


def test_router_bias_update_moves_routing_toward_balance():
    """DeepSeek-V3's rule bias_e += gamma * sign(mean - load_e) on a router skewed toward a few experts."""
    cfg = small_cfg().model
    moe = MoE(cfg, jnp.float32, nnx.Rngs(0))
    skew = jnp.zeros((cfg.n_routed_experts,)).at[:2].set(0.3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, cfg.hidden_size)) + skew @ moe.gate.weight[...].T * 30
    moe.gate.weight[...] = moe.gate.weight[...] + 0.05 * skew[None, :]

    def imbalance():
        load = moe(x)[1]["expert_load"]
        return float(load.max() / load.mean()), load

    first, load = imbalance()
    bias = {"b": moe.gate.e_score_correction_bias[...]}
    for _ in range(80):
        new = update_router_bias(bias, {"b": load}, 0.01)
        over = load > load.mean()
        assert np.all(np.asarray(new["b"] - bias["b"])[np.asarray(over)] < 0)  # overloaded experts pushed down
        bias = new
        moe.gate.e_score_correction_bias[...] = bias["b"]
        _, load = imbalance()
    last, _ = imbalance()
    assert first > 2.0 and last < 0.6 * first, (first, last)


# ---- training ----------------------------------------------------------------------------------------------
def test_loss_falls(full_run):
    _, result = full_run
    main = [h["train/main_loss"] for h in result.history]
    assert len(main) == STEPS and np.all(np.isfinite(main))
    assert np.mean(main[-4:]) < main[0] - 1.5, main
    for k in (1, 2):
        mtp = [h[f"train/mtp_loss_k{k}"] for h in result.history]
        assert np.mean(mtp[-4:]) < mtp[0] - 1.0, (k, mtp)
    assert [e["step"] for e in result.evals] == [8, 16, 24]
    assert result.evals[-1]["val/main_loss"] < result.evals[0]["val/main_loss"]
    assert result.tokens_per_s > 0


def test_mtp_heads_learn_a_counting_sequence():
    """On sequences counting up a 61-token cycle every depth can be exact: per-depth accuracy must rise."""
    cfg = small_cfg()
    mesh = data_mesh()
    graphdef, state = init_train_state(cfg, mesh)
    rng = np.random.default_rng(0)
    accs = []
    for _ in range(STEPS):
        starts = rng.integers(0, 61, (4, 1))
        tokens = 3 + (starts + np.arange(33)[None, :]) % 61
        state, m = train_step(state, global_batch(tokens, mesh), graphdef=graphdef, tcfg=step_settings(cfg.train))
        accs.append(np.concatenate([[m["main_acc"]], np.asarray(m["mtp_acc"])]))
    accs = np.asarray(accs)
    assert np.all(accs[0] < 0.2), accs[0]
    assert np.all(accs[-3:].mean(0) > 0.9), accs[-3:]


def test_resume_reproduces_the_uninterrupted_run(full_run, corpus, cache_dir, tmp_path):
    """Train, 'kill' after step 13 (last checkpoint: step 8), drop every object, resume: same losses."""
    run_dir = tmp_path / "interrupted"
    first = train(small_cfg(), run_dir, corpus=corpus, cache_dir=cache_dir, progress=False, stop_at=13)
    assert first.step == 13
    del first
    second = train(small_cfg(), run_dir, resume=True, corpus=corpus, cache_dir=cache_dir, progress=False)
    assert second.start_step == 8 and second.step == STEPS
    ref = read_jsonl(full_run[0] / "metrics.jsonl")
    got = read_jsonl(run_dir / "metrics.jsonl")
    for kind in ("train", "eval"):
        a = [r for r in ref if r["kind"] == kind]
        b = [r for r in got if r["kind"] == kind]
        assert [r["step"] for r in a] == [r["step"] for r in b]  # steps 9..13 logged once, not twice
        for ra, rb in zip(a, b):
            for key in ra:
                if "/" in key and "tokens_per_s" not in key:
                    np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, err_msg=f"{kind} {key} step {ra['step']}")


_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from glm_fast import load_config
    from glm_fast.train import data_mesh, global_batch, init_train_state, step_settings, train_step

    assert len(jax.devices()) == 2, jax.devices()
    cfg = load_config("tiny", ["train.steps=24", "train.warmup_steps=2", "train.compute_dtype=float32"])
    batches = [np.random.default_rng(i).integers(3, 512, (4, 33)) for i in range(3)]
    out = {}
    for n in (1, 2):
        mesh = data_mesh(jax.devices()[:n])
        graphdef, state = init_train_state(cfg, mesh)
        losses = []
        for b in batches:
            tokens = global_batch(b, mesh)
            assert len(tokens.sharding.device_set) == n
            state, m = train_step(state, tokens, graphdef=graphdef, tcfg=step_settings(cfg.train))
            losses.append(float(m["loss"]))
        assert state.params["norm"]["weight"].sharding.is_fully_replicated
        out[n] = losses, jax.device_get(state.router_bias)
    np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), out[2][1], out[1][1])
    print("data parallel == single device", out[2][0])
""")


def test_data_parallel_over_two_devices_matches_one():
    """Batch sharded over a 2-device mesh (simulated CPU devices, fresh process): same losses and router biases."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


# ---- checkpoints ---------------------------------------------------------------------------------------------
_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import jax, jax.numpy as jnp
    import orbax.checkpoint as ocp
    from glm_fast.train import Checkpointer, TrainState

    def state(v):
        return TrainState(params={"w": jnp.full((64, 64), v)}, router_bias={"b": jnp.full((4,), v)},
                          opt_state={"mu": jnp.full((64, 64), -v)}, step=jnp.int32(v), rng=jax.random.PRNGKey(int(v)))

    ckpt = Checkpointer(sys.argv[1], keep=3, create=True)
    ckpt.save(1, state(1.0), {"next_index": 4}, {"config": {"name": "x"}})
    ckpt.wait()

    def die(self, item, directory):  # the process dies while step 2 is being written (no cleanup runs)
        time.sleep(0.5)
        print("dying with", sorted(os.listdir(directory.parent.parent)), flush=True)
        os._exit(17)

    ocp.handlers.JsonCheckpointHandler._save_fn = die
    ckpt.save(2, state(2.0), {"next_index": 8}, {"config": {"name": "x"}})
    ckpt.wait()
    print("save of step 2 finished: the crash did not happen")
""")


def test_crash_mid_save_leaves_previous_checkpoint_restorable(tmp_path):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(directory)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 17, proc.stdout + proc.stderr
    leftovers = sorted(p.name for p in directory.iterdir())
    assert "1" in leftovers and "2" not in leftovers
    assert any(name.startswith("2.") and "tmp" in name for name in leftovers), leftovers  # the partial save

    reader = Checkpointer(directory, keep=3)  # a reader (load_model) sees step 1 and leaves the partial alone
    assert reader.steps() == [1]
    abstract = jax.eval_shape(lambda: TrainState(
        params={"w": jnp.zeros((64, 64))}, router_bias={"b": jnp.zeros((4,))}, opt_state={"mu": jnp.zeros((64, 64))},
        step=jnp.int32(0), rng=jax.random.PRNGKey(0)))
    state, data_state, meta = reader.restore(abstract)
    assert float(state.params["w"][0, 0]) == 1.0 and int(state.step) == 1 and data_state == {"next_index": 4}
    reader.close()
    assert sorted(p.name for p in directory.iterdir()) == leftovers

    writer = Checkpointer(directory, keep=3, create=True)  # the resumed run clears the partial and saves again
    writer.save(2, state.replace(step=jnp.int32(2)), {"next_index": 8}, {"config": {"name": "x"}})
    writer.wait()
    assert writer.steps() == [1, 2]
    writer.close()


def test_missing_and_empty_checkpoint_dirs_fail_clearly(tmp_path):
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path / "empty")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax threads after the failed read
def test_corrupt_checkpoint_fails_clearly(full_run, tmp_path):
    run_dir = copy_run(full_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS) / "params" / "d")
    with pytest.raises(CheckpointError, match=rf"step {STEPS} .* corrupt or incomplete.*fall back to step 16"):
        load_model(run_dir)
    model, _, _ = load_model(run_dir, step=16)  # the older step still loads
    assert isinstance(model, Model)


def test_config_mismatch_names_fields_and_fix(full_run, corpus, cache_dir, tmp_path):
    run_dir = copy_run(full_run, tmp_path)
    cfg = small_cfg("model.hidden_size=64", "model.num_attention_heads=2")
    with pytest.raises(CheckpointError) as err:
        train(cfg, run_dir, resume=True, corpus=corpus, cache_dir=cache_dir, progress=False)
    msg = str(err.value)
    assert "model.hidden_size: checkpoint 128, requested 64" in msg
    assert "model.num_attention_heads: checkpoint 4, requested 2" in msg and "Fix" in msg
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 128, requested 64.*Fix"):
        load_model(run_dir, expect=cfg)
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        train(small_cfg(), run_dir, corpus=corpus, cache_dir=cache_dir, progress=False)


# ---- outputs ------------------------------------------------------------------------------------------------
def test_load_model_for_inference(full_run):
    run_dir, _ = full_run
    model, cfg, tokenizer = load_model(run_dir)
    assert cfg == small_cfg()
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    ckpt = Checkpointer(run_dir)
    params, bias = ckpt.restore_params(*split_model(model)[1:])
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]),
                                  np.asarray(params["embed_tokens"]["embedding"]))
    assert np.abs(np.asarray(model.layers[1].mlp.gate.e_score_correction_bias[...])).max() > 0  # balancing ran
    logits, mtp_logits = model(jnp.asarray([tokenizer.encode("import json\n")]))
    assert mtp_logits.shape[0] == cfg.model.mtp_depth and np.all(np.isfinite(np.asarray(logits)))
    bf16, _, _ = load_model(run_dir, dtype="bfloat16")
    assert bf16.embed_tokens.embedding.dtype == jnp.bfloat16


def test_run_dir_outputs(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = full_run
    assert load_config(run_dir / "config.yaml") == small_cfg()
    assert (run_dir / "checkpoints" / "config.yaml").exists()
    assert Checkpointer(run_dir).steps() == [8, 16, 24]  # keep_checkpoints = 3
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/mtp_loss_k1", "train/mtp_loss_k2", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "train/load_imbalance", "val/loss", "val/mtp_acc_k2"):
        assert tag in tags, tag
    assert len(events.Scalars("train/loss")) == STEPS


def test_train_mtp_entry_point(corpus, cache_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("train_mtp", REPO / "experiments" / "train_mtp.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir = tmp_path / "cli"
    argv = ["--config", "tiny", "--run-dir", str(run_dir), "--corpus-root", str(CORPUS_ROOT),
            "--cache-dir", str(cache_dir), "--no-progress"]
    for o in OVERRIDES:
        argv += ["--set", o]
    record = script.main(argv)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["experiment"] == "train_mtp" and saved["command"].startswith("python experiments/train_mtp.py")
    for key in ("git_commit", "machine", "versions", "config", "rows"):
        assert key in saved, key
    row = saved["rows"][0]
    assert row["steps"] == STEPS and row["mtp_depth"] == 2 and len(row["final_val_mtp_losses"]) == 2
    assert row["final_val_loss"] > 0 and row["final_train_loss"] > 0 and row["tokens_per_s"] > 0
    assert record["rows"][0]["final_val_loss"] == row["final_val_loss"]
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_inference_export_round_trip(full_run, tmp_path):
    """A bf16 export (params.msgpack + config + tokenizer) loads through load_model with the same weights
    (up to the bf16 cast) and gives the same logits as loading the checkpoint in bf16; a corrupt one fails."""
    from glm_fast.train import CheckpointError, export_model

    run_dir, _ = full_run
    out = export_model(run_dir, tmp_path / "export")
    model, cfg, tokenizer = load_model(out)
    ref, _, _ = load_model(run_dir, dtype="bfloat16")
    assert cfg.model.dtype == "bfloat16" and model.embed_tokens.embedding.dtype == jnp.bfloat16
    tokens = jnp.asarray([tokenizer.encode("import json\n")])
    np.testing.assert_array_equal(np.asarray(model(tokens)[0], np.float32), np.asarray(ref(tokens)[0], np.float32))
    (out / "params.msgpack").write_bytes(b"not msgpack")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)
