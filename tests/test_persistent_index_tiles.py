"""The persistent kernel's indexer tile bodies (`pallas_kernels.persistent.index_tiles`: INDEX_SCORE, INDEX_TOPK):
in Pallas GPU interpret mode on `tiny` the kernel with the bodies (every INDEX_SCORE / INDEX_TOPK branch takes them;
counted) matches the XLA backend's `main_cached` -- float32 and bfloat16, T = 1 and 3, contexts past index_topk
(chunks of <= K rows: every row a candidate; chunks of > K rows: the radix select and compaction) and one shorter
than it (empty chunks, invalid slots) -- and INDEX_TOPK's selection equals `lax.top_k` of the kernel's own candidates;
with every indexer query zeroed (exact K-way ties) it is the K lowest rows. Each kernel is compiled once and launched
on each of its contexts and models.
Both bodies lower for the H200 at glm5_slice, alone and with every other tile body (lowering only: no GPU here).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_fast import Model, load_config
from pallas_kernels.persistent import Op, index_tiles
from pallas_kernels.persistent import kernel as kernel_mod
from pallas_kernels.persistent.kernel import PersistentDecoder, PersistentWeights
from pallas_kernels.persistent.tiles import TileConfig
from tests.kernel_testing import TWO_LAYERS, assert_step_matches_xla, at_context, prefilled
from tests.test_persistent_kernel import BF16, LOWERING, OPTIONS, TOL, _lower_glm5_slice

INDEX_OPS = (Op.INDEX_SCORE, Op.INDEX_TOPK)


@pytest.fixture
def index_calls(monkeypatch):
    """Records, per INDEX_SCORE / INDEX_TOPK branch built, (op, whether the tile body was returned)."""
    calls = []
    for op, orig in ((Op.INDEX_SCORE, index_tiles.index_score_body), (Op.INDEX_TOPK, index_tiles.index_topk_body)):
        def counted(r, key, consts, op=op, orig=orig):
            body = orig(r, key, consts)
            calls.append((op, body is not None))
            return body
        monkeypatch.setitem(kernel_mod._TILED, op, counted)
    return calls


@pytest.fixture
def kernel_outputs(monkeypatch):
    """The persistent kernel's raw outputs (every buffer stack, then the cache rows), one tuple per launch."""
    launches = []
    real = kernel_mod.plgpu

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def kernel(self, *args, **kwargs):
            k = real.kernel(*args, **kwargs)

            def run(*a):
                outs = k(*a)
                launches.append(outs)
                return outs
            return run
    monkeypatch.setattr(kernel_mod, "plgpu", Spy())
    return launches


def _buffer(plan, outs, name):
    """A buffer of the kernel's stacks by schedule name, as numpy."""
    b = next(i for i, buf in enumerate(plan.schedule.buffers) if buf.name == name)
    kind, si, j = plan.buffer_slot[b]
    assert kind == "stack"
    return np.asarray(outs[si][j])


def _check_selection(plan, outs):
    """Per indexer layer and token: INDEX_TOPK's valid rows == the rows of lax.top_k over the flattened (chunk,
    slot) candidates (ties to the lower slot = lower row), the valid slots a prefix."""
    layers = [b.name.rsplit("/", 1)[0] for b in plan.schedule.buffers if b.name.endswith("/topk_idx")]
    assert layers
    for layer in layers:
        val = _buffer(plan, outs, f"{layer}/index_cand_val")  # [nc, T, K]
        cid = _buffer(plan, outs, f"{layer}/index_cand_idx")  # [nc, T, K]
        idx = _buffer(plan, outs, f"{layer}/topk_idx")  # [T, K]
        valid = _buffer(plan, outs, f"{layer}/topk_valid")  # [T, K]
        kk = idx.shape[-1]
        for t in range(idx.shape[0]):
            flat_v, flat_i = val[:, t].reshape(-1), cid[:, t].reshape(-1)
            assert not np.isnan(flat_v).any()
            top_v, top_j = jax.lax.top_k(jnp.asarray(flat_v), kk)
            want = np.sort(flat_i[np.asarray(top_j)][np.asarray(top_v) > -np.inf])
            n = int(valid[t].sum())
            assert (valid[t, :n] == 1).all() and (valid[t, n:] == 0).all(), layer
            np.testing.assert_array_equal(np.sort(idx[t, :n]), want, err_msg=f"{layer} token {t}")


# One kernel per entry, launched on every run of `runs` (one compile: the contexts share the longest one's prefill,
# `at_context`):
# (dtype, T, layers, seed, index_chunks, tile, ring, bits, regs, parts, runs); runs: (context, ties) pairs.
# tile 16 with 8 chunks at context 40 -> chunks of <= 8 rows (every row a candidate; T = 3: 2 tokens per q slot, the
# last one partial; one TN part of the key dims, tile 8 two); tile 8 with 4 chunks at context 72 -> chunks of 24
# rows > K = 16 (radix select + compaction, per token of T = 3) and a 1-3 row last chunk (every row a candidate);
# context 9 < index_topk: chunks past the visible rows are empty, most slots invalid; tile 8 with 8 chunks at
# context 9 or 20 -> chunks of 8 rows < K = 16: INDEX_TOPK streams 1 of each chunk's 2 TN-rows; at context 72 -> 2
# ring slots of candidates counted from registers (regs None: REG_SLOTS); tile 8 with 16 chunks (ring 2, regs 1):
# at context 72 chunks of 8 rows, 2 ring slots resident in INDEX_TOPK's ring and loaded per pass (a group of 4
# slots per loop step, 2 of them past the step's), at context 128 chunks of 16 rows, 4 ring slots streamed again
# per pass through the 2-slot ring. (INDEX_TOPK's body needs chunks * K / tile to be a multiple of 8 ring rows.)
# bits: INDEX_TOPK's key bits per radix pass (TileConfig.topk_bits; 1 = a binary search; every pass is a
# sequential scan of the candidates in interpret mode). parts: INDEX_TOPK tasks per token
# (ScheduleOptions.index_topk_parts; None: the default, 16 at K = 16 -- one output slot each; every part repeats the
# select, the interpreter's largest cost, so the other kernels take 2: parts whose output slots miss a ring slot or
# a row skip it). ties: every indexer query zeroed (`_check_ties`). layers: tiny's 4 (two full indexer layers:
# the index-key cache group's second member) or its first 2 (one full, one shared: half the interpreted step).
KERNELS = [("bfloat16", 3, 2, 22, 8, 16, None, 4, None, 2, ((40, False),)),
           ("float32", 3, 2, 23, 4, 8, None, 4, None, 2, ((72, False), (72, True))),  # (bits 4: the select)
           ("float32", 1, 4, 26, 8, 8, None, 2, None, None, ((9, False), (20, False), (72, False))),
           ("float32", 1, 2, 27, 16, 8, 2, 1, 1, 2, ((72, False), (128, False), (72, True)))]


def _zero_index_queries(model):
    """The model with every indexer query zeroed (wq_b = 0), a copy."""
    from glm_fast.model.indexer import Indexer
    model = nnx.clone(model)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Indexer):
            m.wq_b.kernel[...] = jnp.zeros_like(m.wq_b.kernel[...])
    return model


def _check_ties(plan, outs):
    """Every indexer query zeroed: every visible row scores exactly 0, a K-way tie at the K-th key, so each
    token's selection is the K lowest rows -- as lax.top_k picks, in the XLA backend too. At context 72 > K = 16
    the radix select and the compaction's `need` tie across several rows and ring slots (4 chunks: INDEX_SCORE's
    too)."""
    for layer in [b.name.rsplit("/", 1)[0] for b in plan.schedule.buffers if b.name.endswith("/topk_idx")]:
        idx, valid = _buffer(plan, outs, f"{layer}/topk_idx"), _buffer(plan, outs, f"{layer}/topk_valid")
        kk = idx.shape[-1]
        for t in range(idx.shape[0]):  # the K lowest of the context + t + 1 visible rows
            np.testing.assert_array_equal(idx[t], np.arange(kk), err_msg=f"{layer} token {t}")
            assert (valid[t] == 1).all(), (layer, t)


@pytest.mark.parametrize("dtype,t,layers,seed,chunks,tile,ring,bits,regs,parts,runs", KERNELS)
def test_index_bodies_match_xla_backend_in_interpret_mode(dtype, t, layers, seed, chunks, tile, ring, bits, regs,
                                                          parts, runs, index_calls, kernel_outputs, monkeypatch):
    if ring is not None:
        monkeypatch.setattr(index_tiles, "CAND_SLOTS", ring)
    if regs is not None:
        monkeypatch.setattr(index_tiles, "REG_SLOTS", regs)
    cfg = load_config("tiny", {**(BF16 if dtype == "bfloat16" else {}), **(TWO_LAYERS if layers == 2 else {})}).model
    full = max(c for c, _ in runs)
    options = dataclasses.replace(OPTIONS, index_chunks=chunks,
                                  **({} if parts is None else {"index_topk_parts": parts}))
    ok = jnp.ones((1, t), bool)
    dec = step = None
    for ties in sorted({ties for _, ties in runs}):
        model = Model(cfg, rngs=nnx.Rngs(seed))
        if ties:
            model = _zero_index_queries(model)
        model, prefill_caches, prefill_tokens, prefill_pos = prefilled(model, seed, full, t)
        if dec is None:
            dec = PersistentDecoder(model, options, interpret=True, cache_dir=False,
                                    tiles=TileConfig(tile_n=tile, tile_k=tile, topk_bits=bits))
            rope = model  # the step reads only its RoPE tables (every model's here): the weights are arguments

            @jax.jit
            def step(w, c, tokens, pos):
                logits, h, _ = dec(rope, w, c, tokens, pos, ok)
                return logits, h, kernel_outputs[-1]
        plan = dec.plan(t)
        weights = PersistentWeights.from_model(model, plan)
        for context in [c for c, tie in runs if tie == ties]:
            caches, tokens, pos = prefill_caches, prefill_tokens, prefill_pos
            if context < full:
                caches, tokens, pos = at_context(caches, full, context, seed, t, cfg.vocab_size)
            logits, h, outs = step(weights, caches, tokens, pos)
            assert_step_matches_xla(model, caches, tokens, pos, logits, h, TOL[dtype])
            _check_selection(plan, outs)
            if ties:
                _check_ties(plan, outs)
    n_index = sum(Op(k[0]) in INDEX_OPS for k in plan.branches)
    assert {op for op, _ in index_calls} == set(INDEX_OPS)
    # every branch ran the tile body, traced once: every run launched the one kernel
    assert len(index_calls) == n_index and all(ok for _, ok in index_calls)


def _select_eagerly(keys, k, bits):
    """`_radix_select` over int32 keys [T, n] with an exact jnp count per pass, run eagerly: (lo, need, passes)."""
    passes = []

    def count_pass(p, cands):
        passes.append(int(p))
        return [[jnp.sum(keys[t] >= cand).astype(jnp.int32) for cand in cs] for t, cs in enumerate(cands)]
    with jax.disable_jit():  # the while loop runs in Python: its passes are counted
        lo, need = index_tiles._radix_select(k, count_pass, keys.shape[0], jnp.int32(0), bits=bits)
    return [int(x) for x in lo], [int(x) for x in need], len(passes)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_radix_select_is_exact_and_stops_early(bits, seed):
    """The top K as (keys > lo) + the first `need` keys == lo equals lax.top_k's set (ties to the lower index) for
    distinct scores, heavy ties, and mostly -inf rows with fewer finite scores than K; with distinct scores the
    passes stop early (exactly K keys >= the bin's low end) instead of running all 32 / bits."""
    from pallas_kernels.indexer import _float_key
    rng = np.random.default_rng(seed)
    n, k = 300, 37
    distinct = rng.standard_normal(n).astype(np.float32)
    ties = np.round(rng.standard_normal(n) * 2).astype(np.float32)  # ~10 distinct values
    sparse = np.full(n, -np.inf, np.float32)
    sparse[rng.choice(n, 20, replace=False)] = rng.standard_normal(20)
    vals = jnp.asarray(np.stack([distinct, ties, sparse]))
    keys = _float_key(vals)
    los, needs, _ = _select_eagerly(keys, k, bits)
    for t in range(vals.shape[0]):
        kt = np.asarray(keys[t])
        above, equal = np.flatnonzero(kt > los[t]), np.flatnonzero(kt == los[t])
        assert 0 <= needs[t] <= len(equal) and len(above) + needs[t] == k
        got = np.sort(np.concatenate([above, equal[:needs[t]]]))
        np.testing.assert_array_equal(got, np.sort(np.asarray(jax.lax.top_k(vals[t], k)[1])), err_msg=f"row {t}")
    *_, n_passes = _select_eagerly(keys[:1], k, bits)
    assert n_passes < 32 // bits, n_passes


@pytest.mark.parametrize("op", INDEX_OPS, ids=lambda op: op.name)
def test_index_body_lowers_for_cuda_at_glm5_slice(op, index_calls):
    _lower_glm5_slice(frozenset([op]))
    assert index_calls and all(ok for _, ok in index_calls)


def test_index_bodies_lower_with_the_other_tile_bodies_for_cuda(index_calls):
    """Both indexer bodies with every other tile body in one kernel (one lax.switch, the shared SMEM scratch)."""
    _lower_glm5_slice(frozenset(LOWERING + (Op.INDEX_SCORE,)))
    assert {op for op, _ in index_calls} == set(INDEX_OPS) and all(ok for _, ok in index_calls)


@pytest.mark.parametrize("bits", [0, 3, 8])
def test_topk_bits_must_split_the_key_into_small_passes(bits):
    with pytest.raises(ValueError, match="topk_bits must be 1, 2 or 4"):
        TileConfig(topk_bits=bits)
