"""FP8 routed experts in the persistent decode step (`ScheduleOptions(expert_format="fp8")`): the schedule's q + block
scale weights, the simulator and the kernel in GPU interpret mode (its FP8 tile bodies, and the v1 jnp bodies that
dequantize) against the XLA backend on the same model with its routed experts replaced by dequantize(quantize(W))
-- the function the FP8 weights stand for, as the XLA backend's `xla_moe_experts_fp8` computes it -- the FP8 tile
bodies' CUDA lowering, and (gpu mark) one glm5_slice step on the H200."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_fast import Engine, Model, load_config
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import XLA
from pallas_kernels import fp8
from pallas_kernels.persistent import Op, ScheduleOptions, compile_schedule, simulate_step
from pallas_kernels.persistent import kernel as kernel_mod
from pallas_kernels.persistent.kernel import KernelPlan, PersistentDecoder
from pallas_kernels.persistent.tiles import TileConfig
from pallas_kernels.persistent.schedule import (FP8_BLOCK, FP8_Q, FP8_SCALE, fp8_scale_id, read_schedule,
                                                save_schedule)
from tests.kernel_testing import TWO_LAYERS, assert_step_matches_xla, prefilled

FP8 = ScheduleOptions(tile_n=32, attn_heads=3, attn_splits=3, index_chunks=3, index_align=8, num_sms=7,
                      expert_format="fp8")
CONTEXT = 40  # > index_topk (16): DSA really selects


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


def _param(model, name: str):
    obj = model
    for part in name.split("/"):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _map_experts(model, fn):
    """A copy of `model` with each routed expert weight W [E, K, N] replaced by fn(W, its index)."""
    out = nnx.clone(model)
    for i, w in enumerate(w for w in compile_schedule(model.cfg, 1, FP8).weights if w.name.endswith(FP8_Q)):
        var = _param(out, w.name[:-len(FP8_Q)])
        var.value = fn(var.value, i)
    return out


def dequantized_experts(model):
    """A copy of `model` whose routed experts are dequantize(quantize(W)) in the model dtype."""
    return _map_experts(model, lambda w, _: fp8.dequantize_fp8_blockwise(*fp8.quantize_fp8_blockwise(w),
                                                                         dtype=w.dtype))


def blocky_experts(model, seed: int):
    """A copy of `model` whose routed experts' 128 x 128 blocks are scaled by 2^u, u ~ U(-2, 2) per block: block
    scales that differ 16-fold, so that a tile multiplied by another block's scale shows."""
    def scale(w, i):
        e, k, n = w.shape
        u = jax.random.uniform(jax.random.key(seed * 100 + i), (e, -(-k // 128), -(-n // 128)), minval=-2, maxval=2)
        f = jnp.repeat(jnp.repeat(2.0 ** u, 128, axis=1), 128, axis=2)[:, :k, :n]
        return (w.astype(jnp.float32) * f).astype(w.dtype)
    return _map_experts(model, scale)


def test_fp8_schedule_declares_q_and_scales_for_routed_experts_only(tiny, tmp_path):
    bf16, s = compile_schedule(tiny, 1, dataclasses.replace(FP8, expert_format="bf16")), compile_schedule(tiny, 1, FP8)
    assert FP8_BLOCK == fp8.BLOCK
    qs = [i for i, w in enumerate(s.weights) if w.name.endswith(FP8_Q)]
    assert qs and len(qs) == 3 * tiny.layer_mlp_types.count("sparse")
    for q in qs:
        w, sc = s.weights[q], s.weights[fp8_scale_id(s.weights, q)]
        e, n, k = w.shape
        assert w.dtype == "float8_e4m3fn" and sc.name.endswith(FP8_SCALE) and sc.dtype == "float32"
        assert e == tiny.n_routed_experts and sc.shape[:2] == (e, -(-n // fp8.BLOCK))
        assert sc.shape[2] >= -(-k // fp8.BLOCK) and sc.shape[2] % 4 == 0
    with pytest.raises(ValueError, match="not an FP8 q weight"):
        fp8_scale_id(s.weights, next(i for i, w in enumerate(s.weights) if not w.name.endswith(FP8_Q)))
    # the routed experts' tasks stream 1 byte per weight element; nothing else changes
    def expert_bytes(sched):
        return {(t.op, t.layer, t.tile): t.nbytes for t in sched.tasks if t.op in (Op.SWIGLU_UP, Op.SWIGLU_DOWN)}
    b16, b8 = expert_bytes(bf16), expert_bytes(s)
    assert b16.keys() == b8.keys() and any(b8[k] < b16[k] for k in b8)
    assert sorted(t.nbytes for t in bf16.tasks if t.op not in (Op.SWIGLU_UP, Op.SWIGLU_DOWN)) == sorted(
        t.nbytes for t in s.tasks if t.op not in (Op.SWIGLU_UP, Op.SWIGLU_DOWN))
    path = tmp_path / "fp8.npz"  # the schedule cache keeps the FP8 weights' dtypes and shapes
    save_schedule(s, path)
    assert read_schedule(path).weights == s.weights
    with pytest.raises(ValueError, match="expert_format"):
        ScheduleOptions(expert_format="fp4")
    with pytest.raises(ValueError, match="tile_n dividing 128"):
        ScheduleOptions(expert_format="fp8", tile_n=24)


def test_plan_pairs_every_fp8_stack_with_its_scales(tiny):
    plan = KernelPlan.build(compile_schedule(tiny, 1, FP8))
    names = [w.name for w in plan.schedule.weights]
    paired = [(si, sj) for si, sj in enumerate(plan.fp8_scales) if sj >= 0]
    assert paired and all(plan.weight_stacks[si][0][1] == "float8_e4m3fn" for si, _ in paired)
    for si, sj in paired:
        qs, ss = plan.weight_stacks[si][1], plan.weight_stacks[sj][1]
        assert [names[q][:-len(FP8_Q)] for q in qs] == [names[x][:-len(FP8_SCALE)] for x in ss]


@pytest.mark.parametrize("t,seed", [(1, 0), (3, 1)])
def test_simulated_fp8_step_matches_xla_on_dequantized_experts(tiny, t, seed):
    model, caches, tokens, pos = prefilled(blocky_experts(Model(tiny, rngs=nnx.Rngs(seed)), seed), seed, CONTEXT, t)
    deq = dequantized_experts(model)
    ok = jnp.ones((1, t), bool)
    want = main_cached(deq, caches, tokens, pos, ok, XLA)[0][0]
    plain = main_cached(model, caches, tokens, pos, ok, XLA)[0][0]
    got = simulate_step(compile_schedule(tiny, t, FP8), model, caches, tokens[0], pos[0], seed=seed).logits
    scale = float(jnp.abs(want).max())
    err, quant = (float(jnp.abs(x - want).max()) / scale for x in (got, plain))
    assert np.isfinite(np.asarray(got)).all() and err < 1e-5, err
    assert quant > 100 * max(err, 1e-7), quant  # FP8 really changed the experts: the test can tell them apart


@pytest.mark.parametrize("dtype,dims,t", [("float32", (128, 64), 1), ("float32", (256, 192), 1),
                                          ("bfloat16", (256, 256), 1), ("float32", (256, 256), 3)])
def test_kernel_fp8_step_matches_xla_on_dequantized_experts_in_interpret_mode(dtype, dims, t, monkeypatch):
    """The GPU's 64 x 64 tiles; dims (D, I) of the experts, whose 128 x 128 scale blocks are 16-fold apart. A
    SWIGLU_UP / SWIGLU_DOWN whose contraction (D / I) is a multiple of 128 streams [64, 128] e4m3 tiles and their
    scales through the FP8 rings; one that is not (tiny's I = 64; 192: two blocks, one partial) runs the v1 jnp
    body, which dequantizes per row and block. T = 3: with unchosen expert slots."""
    tiles = TileConfig()
    d, i = dims
    over = {**TWO_LAYERS, **({"model.dtype": "bfloat16"} if dtype == "bfloat16" else {}),
            "model.hidden_size": d, "model.moe_intermediate_size": i}
    cfg = load_config("tiny", over).model
    model, caches, tokens, pos = prefilled(blocky_experts(Model(cfg, rngs=nnx.Rngs(2)), 2), 2, CONTEXT, t)
    jnp_ops = []
    real = kernel_mod._jnp_body
    monkeypatch.setattr(kernel_mod, "_jnp_body", lambda key, r: jnp_ops.append(key) or real(key, r))
    dec = PersistentDecoder(model, FP8, interpret=True, cache_dir=False, tiles=tiles)
    ok = jnp.ones((1, t), bool)
    logits, h, got_caches = jax.jit(lambda w, c: dec(model, w, c, tokens, pos, ok))(dec.weights(t), caches)
    assert any(a.dtype == jnp.float8_e4m3fn for a in dec.weights(t).stacks)
    fp8_jnp = [k for k in jnp_ops if any(dec.plan(t).fp8_scales[w] >= 0 for w in k[2] if w >= 0)]
    assert jnp_ops and [k[0] for k in fp8_jnp] == ([] if i % 128 == 0 else [Op.SWIGLU_DOWN]), fp8_jnp
    if dtype == "float32":  # FP8 really changed the experts (bf16's own rounding would blur the difference)
        plain = main_cached(model, caches, tokens, pos, ok, XLA)[0]
        assert float(jnp.abs(plain - logits).max() / jnp.abs(plain).max()) > 1e-3
    assert_step_matches_xla(dequantized_experts(model), caches, tokens, pos, logits, h,
                            {"float32": 1e-5, "bfloat16": 3e-2}[dtype], got_caches)


def test_engine_persistent_fp8_greedy_equals_xla_on_dequantized_experts(monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_FAST_SCHEDULE_DIR", str(tmp_path))
    model = Model(load_config("tiny").model, rngs=nnx.Rngs(5))
    prompt = np.random.RandomState(5).randint(0, model.cfg.vocab_size, 20).tolist()
    fp8_engine = Engine(model, backend="persistent", max_len=64, compilation_cache=False,
                        persistent_options=dataclasses.replace(FP8, num_sms=132))
    assert any(k >= 0 for k in fp8_engine._persistent.plan(1).fp8_scales)  # the engine really runs FP8 experts
    xla = Engine(dequantized_experts(model), backend="xla", max_len=64, compilation_cache=False)
    assert fp8_engine.generate(prompt, 6).tokens == xla.generate(prompt, 6).tokens


@pytest.mark.gpu
def test_fp8_step_on_the_gpu_is_near_xla_on_dequantized_experts(monkeypatch, tmp_path):
    """On the H200: one glm5_slice decode step with FP8 experts against the XLA backend on the dequantized model,
    after a 300-token prompt. The bf16 kernel's own gap to XLA is up to ~0.2 of max |logit| (selection flips at near-ties, README);
    wrong scales or tiles give O(1)."""
    monkeypatch.setenv("GLM_FAST_SCHEDULE_DIR", str(tmp_path))
    cfg = load_config("glm5_slice").model
    model, caches, tokens, pos = prefilled(Model(cfg, rngs=nnx.Rngs(0)), 0, 300, 1)
    from pallas_kernels.persistent.kernel import default_options
    options = default_options(cfg, False, TileConfig(), False, expert_format="fp8")
    dec = PersistentDecoder(model, options, interpret=False, cache_dir=False)
    ok = jnp.ones((1, 1), bool)
    logits = dec(model, dec.weights(1), caches, tokens, pos, ok)[0]
    want = main_cached(dequantized_experts(model), caches, tokens, pos, ok, XLA)[0]
    err = float(jnp.abs(logits.astype(jnp.float32) - want.astype(jnp.float32)).max() / jnp.abs(want).max())
    print(f"FP8 kernel vs XLA on dequantized experts: {err:.3f} of max |logit|")
    assert np.isfinite(np.asarray(logits, np.float32)).all() and err < 0.3, err


def test_fp8_expert_bodies_lower_for_cuda_at_glm5_slice(monkeypatch):
    """The FP8 SWIGLU_UP / SWIGLU_DOWN tile bodies (with ATTN: the FP8 rings in its SMEM union) lower for the H200
    at glm5_slice with 64 x 64 tiles (lowering only, jax 0.10.2), and every
    routed-expert branch takes them (no v1 jnp body)."""
    from pallas_kernels.persistent.kernel import abstract_step_args, fit_tiles, gpu_candidates, pick_plan
    from pallas_kernels.persistent.kernel import persistent_step
    from tests.kernel_testing import lower_for_h200
    plan = pick_plan(load_config("glm5_slice").model, 1, gpu_candidates(num_sms=132, expert_format="fp8"),
                     TileConfig(), False)
    fp8_stacks = {si for si, sj in enumerate(plan.fp8_scales) if sj >= 0}
    assert fp8_stacks
    jnp_ops = []
    real = kernel_mod._jnp_body
    monkeypatch.setattr(kernel_mod, "_jnp_body", lambda key, r: jnp_ops.append(key) or real(key, r))
    tiles = fit_tiles(plan, TileConfig())
    lower_for_h200(lambda *a: persistent_step(plan, *a, interpret=False, tiles=tiles,
                                              ops=frozenset([Op.SWIGLU_UP, Op.SWIGLU_DOWN, Op.ATTN])),
                   *abstract_step_args(plan, 4352))
    assert not [k for k in jnp_ops if fp8_stacks & set(k[2])], jnp_ops
