"""The persistent kernel's ATTN tile body (`pallas_kernels.persistent.attn_tiles`): in Pallas GPU interpret mode on
`tiny` the kernel with the body (every ATTN branch takes it; counted) matches the XLA backend's `main_cached` --
fresh random models and prompts, context past index_topk, T = 1 and 3, float32 and bfloat16, one and several row
blocks per split, ragged head groups, and a short context (invalid slots, empty splits) -- and it lowers for the
H200 at glm5_slice (lowering only: no GPU here) within the SMEM budget.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from glm_fast import load_config
from pallas_kernels.persistent import Op, attn_tiles
from pallas_kernels.persistent import kernel as kernel_mod
from pallas_kernels.persistent.kernel import PersistentDecoder
from tests.kernel_testing import TWO_LAYERS, assert_step_matches_xla, at_context, prefilled
from tests.test_persistent_kernel import BF16, LOWERING, OPTIONS, TOL, _lower_glm5_slice


@pytest.fixture
def attn_calls(monkeypatch):
    """Records, per ATTN branch built, whether `attn_body` returned a body (True) or fell back (False)."""
    calls = []
    orig = attn_tiles.attn_body

    def counted(r, key, consts):
        body = orig(r, key, consts)
        calls.append(body is not None)
        return body
    monkeypatch.setitem(kernel_mod._TILED, Op.ATTN, counted)
    return calls


# attn_splits 3 -> 6 slots per split (one 8-row block, the last split half past K); 1 -> 16 slots (two blocks, a
# two-stage ring with refills). context 9 < index_topk 16: invalid slots and (T = 1) an empty last split.
# (dtype, T, layers, seed, splits, contexts): one kernel per entry, compiled once and launched at each context (the
# shorter ones from the longest one's prefill, `at_context`); layers: tiny's 4 (each cache group's later members) or
# its first 2 (`TWO_LAYERS`: one full and one shared indexer layer, half the interpreted step).
KERNELS = [("float32", 1, 4, 11, 3, (40, 9)), ("bfloat16", 3, 2, 12, 3, (40,)), ("float32", 3, 2, 13, 1, (40,)),
           ("bfloat16", 1, 4, 14, 1, (40,))]


@pytest.mark.parametrize("dtype,t,layers,seed,splits,contexts", KERNELS)
def test_attn_body_matches_xla_backend_in_interpret_mode(dtype, t, layers, seed, splits, contexts, attn_calls):
    cfg = load_config("tiny", {**(BF16 if dtype == "bfloat16" else {}), **(TWO_LAYERS if layers == 2 else {})}).model
    full = max(contexts)
    model, prefill_caches, prefill_tokens, prefill_pos = prefilled(cfg, seed, full, t)
    ok = jnp.ones((1, t), bool)
    options = dataclasses.replace(OPTIONS, attn_splits=splits)
    dec = PersistentDecoder(model, options, interpret=True, cache_dir=False)
    step = jax.jit(lambda w, c, x, p: dec(model, w, c, x, p, ok)[:2])
    for context in contexts:
        caches, tokens, pos = prefill_caches, prefill_tokens, prefill_pos
        if context < full:
            caches, tokens, pos = at_context(caches, full, context, seed, t, cfg.vocab_size)
        logits, h = step(dec.weights(t), caches, tokens, pos)
        assert_step_matches_xla(model, caches, tokens, pos, logits, h, TOL[dtype])
    n_attn = sum(Op(k[0]) == Op.ATTN for k in dec.plan(t).branches)
    assert n_attn > 0 and attn_calls == [True] * n_attn  # every ATTN branch ran the tile body (traced once)


@pytest.mark.parametrize("splits", [3, 1])
def test_attn_body_column_passes_in_interpret_mode(splits, attn_calls, monkeypatch):
    """Several column passes (as C = 512 takes on the GPU), here by 16-wide segments and accumulators over
    tiny's C = 32: 2 passes. index_topk 32: 3 splits -> 11 slots (two blocks in a two-stage ring: resident, the
    second pass reuses the rows); 1 split -> 32 slots (four blocks: the second pass gathers them again)."""
    monkeypatch.setattr(attn_tiles, "SEG", 16)
    monkeypatch.setattr(attn_tiles, "ACC_COLS", 16)
    cfg = load_config("tiny", {"model.index_topk": 32}).model
    model, caches, tokens, pos = prefilled(cfg, 20 + splits, 48, 1)
    dec = PersistentDecoder(model, dataclasses.replace(OPTIONS, attn_splits=splits), interpret=True,
                            cache_dir=False)
    shape = attn_tiles.plan_shape(dec.plan(1))
    assert shape.geometry(True)[3] == 2 and shape.resident(2, True) == (splits == 3)
    logits, h, _ = jax.jit(lambda w, c: dec(model, w, c, tokens, pos, jnp.ones((1, 1), bool)))(dec.weights(1),
                                                                                                caches)
    assert attn_calls and all(attn_calls)
    assert_step_matches_xla(model, caches, tokens, pos, logits, h, TOL["float32"])


def _glm5_plan():
    return kernel_mod.pick_plan(load_config("glm5_slice").model, 1, kernel_mod.gpu_candidates(num_sms=132),
                                kernel_mod.tl.TileConfig(), False)


def test_attn_scratch_fits_smem_at_glm5_slice():
    """ATTN's SMEM shares a RefUnion with the big rings: the kernel's whole scratch stays under 220 KB."""
    plan = _glm5_plan()
    shape = attn_tiles.plan_shape(plan)
    assert shape is not None and shape.fits_gpu()
    scratch = kernel_mod._scratch_types(plan, kernel_mod.tl.TileConfig(), False)
    assert "t_alias" in scratch and "a2_q" not in scratch
    assert kernel_mod.smem_bytes(plan, kernel_mod.tl.TileConfig()) < 220 * 1024
    # UV reads t_op while it streams W_uv through t_w0 (t_w's first half): t_op's group starts with a pad as large
    # as t_w0; the indexer's own buffers start past t_w (both rings); the x ring sits in t_w's group, after it
    groups = scratch["t_alias"].refs
    rings = next(g for g in groups if "t_w" in g)
    assert sorted(rings) == ["t_w", "t_wn", "t_x"] and rings["t_x"].shape[0] == rings["t_w"].shape[0]
    staged = next(g for g in groups if "t_op" in g)
    assert sorted(staged)[0] == "t_a_pad" and "t_w" not in staged
    assert attn_tiles._nbytes(staged["t_a_pad"]) == attn_tiles._nbytes(rings["t_w"]) // 2
    index_own = next(g for g in groups if "t_a_pad_ix" in g)
    assert attn_tiles._nbytes(index_own["t_a_pad_ix"]) == attn_tiles._group_bytes({"t_w": rings["t_w"]})


def test_attn_body_lowers_for_cuda_at_glm5_slice(attn_calls):
    """The ATTN tile body lowers for the H200 at glm5_slice (every ATTN branch takes it)."""
    _lower_glm5_slice(frozenset([Op.ATTN]))
    assert attn_calls and all(attn_calls)


def test_attn_body_lowers_with_the_other_tile_bodies_for_cuda(attn_calls):
    """ATTN with the other tile bodies in one kernel: the SMEM union with their rings, one lax.switch."""
    _lower_glm5_slice(frozenset(LOWERING))
    assert attn_calls and all(attn_calls)
