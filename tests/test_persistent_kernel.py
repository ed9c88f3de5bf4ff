"""The persistent decode kernel (`pallas_kernels.persistent.kernel`): its body in Pallas GPU interpret mode on `tiny`
(the cross-CTA semaphore seam replaced by dependency-ordered execution, DESIGN.md sec. 8) against the XLA backend's
`main_cached` -- logits, the last hidden state and the cache rows, T = 1 and 3, context past index_topk --
greedy tokens of `Engine(backend="persistent")` (with and without MTP drafts), the CUDA lowering at glm5_slice
shapes (lowering only), and the H200 test (marked `gpu`: MTP decoding through the kernel is lossless). Run the GPU
test with `GLM_FAST_TEST_PLATFORMS=cuda pytest -m gpu tests/test_persistent_kernel.py`; the GPU end-to-end tests
against XLA are tests/test_pallas_backend.py's `persistent` cases.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_fast import Engine, Model, load_config
from pallas_kernels import _compat
from pallas_kernels.persistent import Op, ScheduleOptions, attn_tiles, compile_schedule
from pallas_kernels.persistent import kernel as kernel_mod
from pallas_kernels.persistent import tiles as tiles_mod
from pallas_kernels.persistent.kernel import KernelPlan, PersistentDecoder
from pallas_kernels.persistent.tiles import TileConfig
from tests.kernel_testing import TWO_LAYERS, assert_step_matches_xla, lowered_for_h200, prefilled

# Odd tiles (ragged last GEMV / attention tiles), 3 index chunks, 7 SM lists (the GPU path's; interpret mode walks
# the global order).
OPTIONS = ScheduleOptions(tile_n=24, attn_heads=3, attn_splits=3, index_chunks=3, index_align=8, num_sms=7)
SMALL_TILES = TileConfig(tile_n=32, tile_k=16)  # interpret mode only: tiny's heads are 16 wide
# 8-deep contractions: every ring wraps (UV's single k-tiles: 4 steps over tiny's 32-wide latent through its 2-slot
# ring; the bulk streams' 16 k-tiles over the 128-wide hidden state: 8 steps of 2 tiles through 2 ring steps, the
# single-weight streams too: no solo ring here, which the other cases take; UV's partials: T = 3 units through a
# ring of 2, tiles.UV_BYTES patched)
DEEP_TILES = TileConfig(tile_n=32, tile_k=8, slots=4, solo_ring=False)
CONTEXT = 40  # > index_topk (16): DSA really selects
BF16 = {"model.dtype": "bfloat16", "model.moe_intermediate_size": 128}  # the Pallas backend's tiny variant
# Tolerance on max |logit error| / max |logit|: float32 is exact up to summation order; bf16 rounds the
# activations at different points than XLA's fused graph (fused norms, dense-MLP silu*u rounding, see simulate.py).
TOL = {"float32": 1e-5, "bfloat16": 3e-2}


@pytest.mark.parametrize("dtype,t,seed,sms,tiles,layers", [("float32", 1, 0, 7, None, 4),
                                                           ("bfloat16", 3, 0, 7, None, 2),
                                                           ("float32", 3, 2, 1, DEEP_TILES, 2),
                                                           ("bfloat16", 1, 2, 7, SMALL_TILES, 4)])
def test_kernel_step_matches_xla_backend_in_interpret_mode(dtype, t, seed, sms, tiles, layers, monkeypatch):
    """sms = 7: one CTA walks the global order from GMEM; sms = 1: the GPU path's walk (the CTA's dispatch table
    TMA'd into SMEM, padding rows skipped) over a 1-SM schedule, whose list is the global order. tiles: the GPU's
    64 x 64 weight tiles (None; tiny's 16-wide heads / 32-wide latent then keep o_proj, ABSORB, UV and KV_WRITE on
    the jnp bodies), 32 x 16 tiles, with which every branch of tiny's tiled opcodes runs the tile bodies (GEMV and
    the down projections through the 2 x 8-slot solo ring), or 32 x 8 tiles through 4-slot rings (UV: 2), where
    every ring refills its slots (UV's ring of split partials too: 2 units for T = 3). layers: tiny's 4 (the cache
    groups' later members) or its first 2 (`TWO_LAYERS`: a dense and a MoE layer, one full and one shared
    indexer; the T = 3 steps, half the interpreted step)."""
    cfg = load_config("tiny", {**(BF16 if dtype == "bfloat16" else {}), **(TWO_LAYERS if layers == 2 else {})}).model
    if tiles is DEEP_TILES:
        unit = tiles_mod.uv_geometry(cfg.kv_lora_rank)[0]  # UV's ring: 2 units of [splits, unit] f32
        monkeypatch.setattr(tiles_mod, "UV_BYTES", 2 * OPTIONS.attn_splits * unit * 4)
    model, caches, tokens, pos = prefilled(cfg, seed, CONTEXT, t)
    ok = jnp.ones((1, t), bool)
    dec = PersistentDecoder(model, dataclasses.replace(OPTIONS, num_sms=sms), interpret=True, cache_dir=False,
                            tiles=tiles)
    logits, h, got_caches = jax.jit(lambda w, c: dec(model, w, c, tokens, pos, ok))(dec.weights(t), caches)
    assert_step_matches_xla(model, caches, tokens, pos, logits, h, TOL[dtype], got_caches)


def test_plan_covers_every_op_and_dispatch_table_is_consistent():
    cfg = load_config("tiny").model
    s = compile_schedule(cfg, 3, OPTIONS)
    plan = KernelPlan.build(s)
    ops = {Op(k[0]) for k in plan.branches}
    assert ops == set(Op) - {Op.NOP}
    assert plan.aux.shape[0] == len(s.records)
    assert plan.aux[:, 0].max() == len(plan.branches) - 1
    # every weight and scratch buffer lands in exactly one stack slot
    assert sorted(m for _, ms in plan.weight_stacks for m in ms) == list(range(len(s.weights)))


@pytest.mark.parametrize("config", ["tiny", "glm5_slice"])
def test_cache_groups_give_one_code_path_for_all_layers(config):
    """Per-layer caches of one field form a group: the cache readers / writers have one branch per static shape
    (ragged head groups give ATTN two), not one per layer, and a task's aux entry for a cache is its layer's
    member index."""
    s = compile_schedule(load_config(config).model, 1, OPTIONS)
    plan = KernelPlan.build(s)
    for op in (Op.ATTN, Op.INDEX_SCORE, Op.KV_WRITE, Op.IK_WRITE):
        keys = [k for k in plan.branches if Op(k[0]) == op]
        assert len(keys) == len({k[1] for k in keys}), keys
    assert sorted(k for m in plan.cache_groups for k in m) == list(range(len(plan.caches)))
    for t in s.tasks:
        for base, ids in ((kernel_mod.A_IN, t.inputs), (kernel_mod.A_OUT, t.outputs)):
            for j, b in enumerate(ids):
                if b >= 0 and plan.buffer_slot[b][0] == "cache":
                    g, member = plan.buffer_slot[b][1:]
                    assert plan.aux[t.id, base + j] == member
                    assert s.buffers[plan.caches[plan.cache_groups[g][member]]].name == s.buffers[b].name
                    assert s.buffers[b].name.split("/")[1] == str(t.layer)


def _engine_tokens(model, backend, depth, steps=4):
    prompt = np.asarray(jax.random.randint(jax.random.key(7), (CONTEXT,), 0, model.cfg.vocab_size)).tolist()
    engine = Engine(model, backend=backend, max_len=CONTEXT + 16, compilation_cache=False)
    return engine.generate(prompt, steps, speculative_depth=depth).tokens


def test_decoder_takes_one_attention_layout_that_fits_smem_at_every_width(monkeypatch):
    """glm5_slice on the GPU path: 64 heads x 32 splits with an 8-slot weight ring fits SMEM at T = 1 and at T = 4
    (1 + its MTP depth 3; the dispatch table is walked in fixed chunks, so its SMEM does not grow with T) and is
    taken at both (one layout: lossless MTP). Where the widest step does not fit the first choice (a kernel whose
    SMEM grew with T, given less than T = 4's need but not T = 1's), the next choice is taken at every width.
    Given options are kept at every width; interpret mode keeps the defaults."""
    model = type("M", (), {"cfg": load_config("glm5_slice").model})()
    assert model.cfg.mtp_depth == 3

    def layout(dec, tokens):  # (heads per ATTN task, split-KV factor: o_part [splits, T, heads, C])
        plan = dec.plan(tokens)
        return (attn_tiles.plan_shape(plan).nh,
                next(b.shape[0] for b in plan.schedule.buffers if b.name.endswith("/o_part")))
    dec = PersistentDecoder(model, interpret=False, cache_dir=False)
    assert (layout(dec, 1), layout(dec, 4)) == ((64, 32), (64, 32))
    assert (dec.tiles_for(1).slots, dec.tiles_for(4).slots) == (8, 8)
    for t in (1, 4):
        assert kernel_mod.smem_bytes(dec.plan(t), dec.tiles_for(t)) + kernel_mod._MOSAIC_SMEM <= 227 * 1024

    # a kernel whose SMEM grew with T (1 KB per token past the first), given SMEM between T = 1's need and T = 4's
    real = kernel_mod.smem_bytes
    monkeypatch.setattr(kernel_mod, "smem_bytes", lambda plan, tiles: real(plan, tiles) + 1024 * (plan.tokens - 1))
    need = {t: kernel_mod.smem_bytes(dec.plan(t), dataclasses.replace(dec.tiles, slots=kernel_mod.MIN_SLOTS))
            + kernel_mod._MOSAIC_SMEM for t in (1, 4)}
    monkeypatch.setattr(kernel_mod.gemv_mod, "SMEM_BYTES", need[4] - 1)  # 64 x 32 fits at T = 1 only
    narrow = PersistentDecoder(model, interpret=False, cache_dir=False)
    assert (layout(narrow, 1), layout(narrow, 4)) == ((8, 16), (8, 16))
    monkeypatch.undo()

    given = PersistentDecoder(model, ScheduleOptions(attn_heads=8, attn_splits=4), interpret=False, cache_dir=False)
    assert (layout(given, 1), layout(given, 4)) == ((8, 4), (8, 4))
    assert layout(PersistentDecoder(model, interpret=True, cache_dir=False), 1)[1] == ScheduleOptions().attn_splits


@pytest.mark.parametrize("depth", [0, 1])
def test_engine_persistent_greedy_tokens_equal_xla(depth, monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_FAST_SCHEDULE_DIR", str(tmp_path))
    model = Model(load_config("tiny").model, rngs=nnx.Rngs(3))
    assert _engine_tokens(model, "persistent", depth) == _engine_tokens(model, "xla", depth)


@pytest.mark.gpu
def test_engine_persistent_mtp_greedy_is_lossless_on_glm5_slice(monkeypatch, tmp_path):
    """On the H200: greedy decoding with D = 3 MTP drafts through the kernel (T = 4 verification launches) emits
    exactly plain greedy decoding's tokens (T = 1 launches), 64 new tokens after a 300-token prompt, random
    weights. Speculation is lossless only if the T = 4 kernel's row for a position equals the T = 1 kernel's
    bit for bit: each token's GEMV column, attention, routing and expert sums must not depend on the others
    (a random model's near-flat logits turn any rounding difference into a different token within a few steps).
    Hence `PersistentDecoder.plan`'s one attention layout at every width: with 32 attention splits at T = 1 and 16
    at T = 4 the tokens parted at the 20th (experiments/results/gpu_tests_h200_persistent.log)."""
    monkeypatch.setenv("GLM_FAST_SCHEDULE_DIR", str(tmp_path))
    model = Model(load_config("glm5_slice").model, rngs=nnx.Rngs(0))
    engine = Engine(model, backend="persistent", max_len=512, compilation_cache=False)
    prompt = np.random.RandomState(0).randint(0, model.cfg.vocab_size, 300).tolist()
    plain = engine.generate(prompt, 64).tokens
    spec = engine.generate(prompt, 64, speculative_depth=3)
    print(f"plain {plain[:16]}, speculative {spec.tokens[:16]}, stats {spec.stats}")
    assert spec.tokens == plain


def test_engine_persistent_rejects_a_batch(monkeypatch, tmp_path):
    from glm_fast.engine.engine import GenerationError
    monkeypatch.setenv("GLM_FAST_SCHEDULE_DIR", str(tmp_path))
    engine = Engine(Model(load_config("tiny").model, rngs=nnx.Rngs(0)), backend="persistent", max_len=64,
                    compilation_cache=False)
    with pytest.raises(GenerationError, match="one sequence"):
        engine.generate([[1, 2], [3, 4]], 2)


# -- CUDA lowering at glm5_slice shapes (no GPU needed) -------------------------------------------------------------


def _lower_glm5_slice(ops, tokens: int = 1, **kwargs):
    """Lowers the kernel with the bodies `ops` for the H200 at glm5_slice, on the plan PersistentDecoder picks
    (kwargs: more `persistent_step` options); returns the kernel's length (`kernel_chars`)."""
    from pallas_kernels.persistent.kernel import (abstract_step_args, fit_tiles, gpu_candidates, persistent_step,
                                                  pick_plan)
    from tests.kernel_testing import lower_for_h200
    plan = pick_plan(load_config("glm5_slice").model, tokens, gpu_candidates(num_sms=132), TileConfig(), False)
    tiles = fit_tiles(plan, TileConfig())
    return lower_for_h200(lambda *a: persistent_step(plan, *a, interpret=False, ops=ops, tiles=tiles, **kwargs),
                          *abstract_step_args(plan, 4352))


def test_kernel_skeleton_lowers_for_cuda_at_glm5_slice():
    """The persistent loop over 132 CTAs, each CTA's dispatch table TMA'd to SMEM, the grid-wide semaphore seam
    (waits with decrement, W signals per completion) and the lax.switch over every branch lower for the H200;
    the op bodies are compiled out (`ops=()`). With stamps=True the kernel holds the globaltimer / clock stores
    (tiny's skeleton, lowered both ways; the serialized kernel's length is no measure of that: it came out 427
    characters shorter with the stores at glm5_slice) and returns them last, [CTAs, 4] int32; with task_stamps=True
    too, each task's three stamps after them, [CTAs, TASK_STAMPS * table rows] int32."""
    assert _lower_glm5_slice(frozenset()) > 0
    from pallas_kernels.persistent.kernel import TABLE_CHUNK, TASK_STAMPS, abstract_step_args, persistent_step
    plan = KernelPlan.build(compile_schedule(load_config("tiny").model, 1, ScheduleOptions(num_sms=4)))
    texts = {flags: lowered_for_h200(lambda *a, flags=flags: persistent_step(
        plan, *a, interpret=False, tiles=None, ops=frozenset(), stamps=flags[0], task_stamps=flags[1]),
        *abstract_step_args(plan, 64)).as_text() for flags in ((False, False), (True, False), (False, True))}
    assert "globaltimer" in texts[True, False] and "globaltimer" not in texts[False, False]
    assert "globaltimer" in texts[False, True]
    rows = -(-plan.schedule.sm_tasks.shape[1] // TABLE_CHUNK) * TABLE_CHUNK
    with _compat.interpret_mesh("NVIDIA H200", 132):
        for task_stamps in (False, True):
            out = jax.eval_shape(lambda *a, ts=task_stamps: persistent_step(
                plan, *a, interpret=False, tiles=None, stamps=True, task_stamps=ts), *abstract_step_args(plan, 64))
            got = [(o.shape, o.dtype) for o in out[3:]]
            assert got == [((4, 4), jnp.int32)] + ([((4, TASK_STAMPS * rows), jnp.int32)] if task_stamps else [])
    for flags in ({"stamps": True}, {"task_stamps": True}):
        with pytest.raises(ValueError, match="stamps: .* need the GPU"):
            jax.eval_shape(lambda *a: persistent_step(plan, *a, interpret=True, **flags), *abstract_step_args(plan, 64))


LOWERING = (Op.GEMV, Op.SWIGLU_UP, Op.SWIGLU_DOWN, Op.ABSORB, Op.UV, Op.MOE_COMBINE, Op.EMBED, Op.KV_WRITE,
            Op.IK_WRITE, Op.ROUTER_SELECT, Op.ATTN, Op.INDEX_SCORE, Op.INDEX_TOPK)


@pytest.mark.parametrize("op", LOWERING)
def test_tile_bodies_lower_for_cuda(op):
    """GEMV (fused norm, residual, f32 router output), SWIGLU_UP / SWIGLU_DOWN (dense, shared, routed): TMA weight
    tiles through the SMEM ring + swap-AB wgmma (tiles.py); ABSORB (W_uk tiles K-major, RoPE spread over the
    threads, `tiles.rope_rows`); UV (split-KV merge into the x tiles in registers, then W_uv tiles); KV_WRITE (norm
    on x tiles, RoPE); IK_WRITE (row LayerNorm, RoPE); MOE_COMBINE on [8, 64] SMEM tiles; EMBED as per-token row TMAs;
    ROUTER_SELECT as vector reductions; ATTN (attn_tiles.py); INDEX_SCORE / INDEX_TOPK (index_tiles.py): they
    lower for the H200 at glm5_slice (lowering only, jax 0.10.2; jax 0.11.2's stricter layout inference is
    checked on the GPU host by experiments/persistent_lowering.py)."""
    _lower_glm5_slice(frozenset([op]))


def test_tile_bodies_lower_together_for_cuda():
    """All lowering bodies in one kernel (one lax.switch, the shared SMEM scratch and barriers), for decode (T = 1)
    and MTP verification (T = 4: column slices of several rows go out row by row, `Tiles.copy_rows`; the SMEM,
    with 4 x 8 routed-expert partial slots, still fits Mosaic's limit). The per-token work is loops, not unrolled
    code (`tiles.per_token`): T = 4's kernel is at most 1.5x T = 1's (measured 1.2x; unrolled it was 2.7x, and
    Mosaic's lowering time on jax 0.11.2 grows with the code: experiments/results/persistent_lowering_*_t4_*.json)."""
    sizes = [_lower_glm5_slice(frozenset(LOWERING), tokens) for tokens in (1, 4)]
    assert sizes[1] < 1.5 * sizes[0], sizes


# The H200 acceptance of the persistent kernel (distance to float32 vs bf16 XLA's, teacher-forced greedy agreement
# over 256 steps) is parametrized with the pallas backend's in tests/test_pallas_backend.py.


def test_threaded_rope_bodies_lower_with_both_semantics():
    """INDEX_SCORE and IK_WRITE, whose RoPE is inline Mosaic GPU code (`tiles.rope_rows`: pair p on thread p mod
    128), lower for the H200 with warpgroup semantics (jax 0.11's default, `_compat.warpgroup_lowering`) as well as
    with the kernel's lane semantics (test_tile_bodies_lower_for_cuda); an unknown lowering is a clear error."""
    from pallas_kernels import _compat
    with _compat.warpgroup_lowering():
        _lower_glm5_slice(frozenset([Op.INDEX_SCORE, Op.IK_WRITE]))
    with pytest.raises(ValueError, match="lowering='thread'"):
        kernel_mod.persistent_step(None, None, None, None, None, None, None, lowering="thread")
