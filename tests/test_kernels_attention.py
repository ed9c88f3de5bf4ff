"""Kernel-vs-reference tests of `pallas_kernels.indexer` (DSA lightning-indexer scores and exact top-k) and
`pallas_kernels.mla_attention` (absorbed sparse MLA decode), on fresh random inputs.

Classes: `_Cases` holds the tests; `TestAttentionKernelsGPU` (marked `gpu`, GLM-5 shapes: 32 x 128 indexer heads,
top-2048, 64 MLA heads, C 512, R 64, S up to 131072) and `TestAttentionKernelsInterpret` (Pallas GPU interpret
mode on the CPU, small shapes) run them. The GPU class is not the interpret class's base because pytest inherits
marks along the MRO. `TestLowering` lowers the compiled kernels for the H200 at GLM-5 shapes on any host (Mosaic
GPU's lowering runs in Python: layouts, wgmma shapes, TMA boxes, register and SMEM rules are checked without a
GPU). Run the GPU tests with `GLM_FAST_TEST_PLATFORMS=cuda pytest -m gpu tests/test_kernels_attention.py`.

Tolerances, keyed by input dtype:
  indexer scores (float32 out): max|out - ref| <= SCORE_TOL * max|ref| over the visible keys; -inf exactly where
    the reference has it. Both accumulate exact bf16/f16 products in f32 in a different order (~1e-6 observed).
  top-k: EXACT. The valid index set equals `jax.lax.top_k`'s on the kernel's own scores (ties included: both
    prefer the lower index), slots hold K distinct in-range indices and `valid` is score > -inf. Against the
    reference's scores the sets may differ only between keys whose reference scores are within the score
    tolerance of the reference's K-th score; with integer-valued inputs (exact arithmetic, many ties) the sets
    must equal the reference's exactly.
  MLA (q_lat dtype out): relative Frobenius error and max-abs / max|ref| below MLA_TOL; the kernel rounds the
    softmax weights to the input dtype for the PV wgmma (as flash attention does) and the output once.
NaN never passes (finite outputs are required), and every output element must have been written: the
interpreter fills fresh buffers with NaN, and on the GPU the allocator is handed NaN-filled memory just before
each call (best effort).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import KernelRunner, assert_rel_close, case_key, lower_for_h200

from pallas_kernels import ref
from pallas_kernels import indexer as indexer_mod
from pallas_kernels.indexer import IndexerConfig, indexer_scores, indexer_topk
from pallas_kernels.mla_attention import MLAConfig, sparse_mla_attention

SCORE_TOL = {jnp.bfloat16: 5e-5, jnp.float16: 5e-5}  # max-abs error / max|ref| of the f32 scores
MLA_TOL = {jnp.bfloat16: (1e-2, 5e-2), jnp.float16: (3e-3, 2e-2)}  # (relative Frobenius, max-abs / max|ref|)

# Shapes: indexer (N heads, H dim, top-k), MLA (N heads, C latent, R rope).
GLM5 = dict(idx_heads=32, idx_dim=128, topk=2048, heads=64, latent=512, rope=64)
SMALL = dict(idx_heads=8, idx_dim=64, topk=64, heads=8, latent=64, rope=16)


def _rnd(key, shape, dtype=jnp.bfloat16, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _indexer_inputs(key, B, T, S, N, H, dtype=jnp.bfloat16, integer=False):
    kq, kw, kk, kp = jax.random.split(key, 4)
    if integer:  # small integers: every product and sum is exact in f32, and many scores tie
        q = jax.random.randint(kq, (B, T, N, H), -2, 3).astype(dtype)
        keys = jax.random.randint(kk, (B, S, H), -1, 2).astype(dtype)
        w = jax.random.randint(kw, (B, T, N), -2, 3).astype(jnp.float32)
    else:
        q, keys = _rnd(kq, (B, T, N, H), dtype), _rnd(kk, (B, S, H), dtype)
        w = _rnd(kw, (B, T, N), jnp.float32, N ** -0.5)
    # Positions: the last token of each query sees the whole cache, the others a random prefix.
    q_pos = jax.random.randint(kp, (B, T), 0, S).at[:, -1].set(S - 1).astype(jnp.int32)
    return q, w, keys, q_pos


def _mla_inputs(key, B, T, S, K, N, C, R, dtype=jnp.bfloat16, valid_rows=None):
    ks = jax.random.split(key, 6)
    q_lat, q_pe = _rnd(ks[0], (B, T, N, C), dtype), _rnd(ks[1], (B, T, N, R), dtype)
    c_kv, k_pe = _rnd(ks[2], (B, S, C), dtype), _rnd(ks[3], (B, S, R), dtype)
    idx = jax.random.randint(ks[4], (B, T, K), 0, S).astype(jnp.int32)
    if valid_rows is None:
        valid = jax.random.uniform(ks[5], (B, T, K)) < 0.85
    else:  # only the first `valid_rows` slots: later splits see no valid row at all
        valid = jnp.broadcast_to(jnp.arange(K) < valid_rows, (B, T, K))
    valid = valid.at[:, :, 0].set(True)  # every query attends to at least one row (the reference would be NaN)
    return q_lat, q_pe, c_kv, k_pe, idx, valid, (C + R) ** -0.5


def assert_scores_close(out, want, dtype):
    out, want = np.asarray(out), np.asarray(want)
    assert out.shape == want.shape and out.dtype == np.float32, (out.shape, out.dtype)
    assert not np.isnan(out).any(), f"{np.isnan(out).sum()} NaN scores (unwritten or poisoned)"
    masked = np.isneginf(want)
    np.testing.assert_array_equal(np.isneginf(out), masked, err_msg="-inf (causal mask) pattern differs")
    err = np.abs(out[~masked] - want[~masked]).max() / np.abs(want[~masked]).max()
    assert err <= SCORE_TOL[dtype], f"max error {err:.3g} of max|ref| (tolerance {SCORE_TOL[dtype]})"


def assert_mla_close(out, want, dtype):
    assert_rel_close(out, want, *MLA_TOL[dtype])


def check_topk(idx, valid, scores, k, ref_scores=None, tol=0.0, exact_ref=False):
    """Exactness of (idx, valid) against `jax.lax.top_k` of `scores` [B, T, L >= S] (see the module docstring)."""
    idx, valid, scores = np.asarray(idx), np.asarray(valid), np.asarray(scores)
    B, T, K = idx.shape
    S = scores.shape[-1] if ref_scores is None else ref_scores.shape[-1]
    assert K == min(k, S) and idx.dtype == np.int32 and valid.dtype == np.bool_
    top_vals, top_idx = (np.asarray(a) for a in jax.lax.top_k(jnp.asarray(scores), K))
    for b in range(B):
        for t in range(T):
            row = idx[b, t]
            assert ((row >= 0) & (row < S)).all(), f"({b},{t}): index out of [0, {S})"
            assert len(set(row.tolist())) == K, f"({b},{t}): duplicate indices"
            np.testing.assert_array_equal(valid[b, t], scores[b, t, row] > -np.inf)
            got = set(row[valid[b, t]].tolist())
            want = set(top_idx[b, t][top_vals[b, t] > -np.inf].tolist())
            assert got == want, f"({b},{t}): {len(got ^ want)} indices differ from lax.top_k of the same scores"
            if ref_scores is None:
                continue
            r = np.asarray(ref_scores[b, t])
            r_vals, r_idx = (np.asarray(a) for a in jax.lax.top_k(jnp.asarray(r), K))
            r_set = set(r_idx[r_vals > -np.inf].tolist())
            assert len(got) == len(r_set), f"({b},{t}): {len(got)} valid slots, reference {len(r_set)}"
            if exact_ref:
                assert got == r_set, f"({b},{t}): {len(got ^ r_set)} indices differ from the reference top-k"
            else:
                kth = r_vals[len(r_set) - 1]
                diff = np.array(sorted(got ^ r_set), dtype=np.int64)
                assert (np.abs(r[diff] - kth) <= tol).all(), f"({b},{t}): non-tie indices differ from the reference"


class _Cases(KernelRunner):
    INTERPRET = False
    SHAPES = GLM5
    SCORE_GRID = [(b, t, s) for b in (1, 2) for t in (1, 4) for s in (4096, 32768, 131072)] + [(2, 4, 4000)]
    TOPK_GRID = SCORE_GRID + [(1, 4, 1000)]  # S < k
    MLA_GRID = [(b, t, s) for b in (1, 2) for t in (1, 4) for s in (4096, 32768, 131072)]
    MLA_K = 2048
    INDEXER_CONFIGS = [IndexerConfig(), IndexerConfig(block_s=128, num_stages=3, select_resident_bytes=0)]
    MLA_CONFIGS = [MLAConfig(), MLAConfig(gather="xla"), MLAConfig(num_splits=1, num_stages=1)]

    def indexer_inputs(self, B, T, S, **kw):
        sh = self.SHAPES
        return _indexer_inputs(case_key("idx", B, T, S, tuple(kw.items())), B, T, S, sh["idx_heads"], sh["idx_dim"],
                               **kw)

    # -- indexer -------------------------------------------------------------------------------------------------

    def test_indexer_scores(self, scores_case):
        B, T, S = scores_case
        q, w, keys, q_pos = self.indexer_inputs(B, T, S)
        scale = self.SHAPES["idx_dim"] ** -0.5
        out = self.run(indexer_scores, q, w, keys, q_pos, scale)
        assert_scores_close(out, ref.indexer_scores(q, w, keys, q_pos, scale), jnp.bfloat16)

    def test_indexer_scores_float16_and_configs(self):
        B, T, S = self.SCORE_GRID[-1]
        q, w, keys, q_pos = self.indexer_inputs(B, T, S, dtype=jnp.float16)
        scale = self.SHAPES["idx_dim"] ** -0.5
        want = ref.indexer_scores(q, w, keys, q_pos, scale)
        for config in self.INDEXER_CONFIGS:
            assert_scores_close(self.run(indexer_scores, q, w, keys, q_pos, scale, config=config), want,
                                jnp.float16)

    def test_indexer_topk(self, topk_case):
        B, T, S = topk_case
        k = self.SHAPES["topk"]
        q, w, keys, q_pos = self.indexer_inputs(B, T, S)
        scale = self.SHAPES["idx_dim"] ** -0.5
        idx, valid = self.run(indexer_topk, q, w, keys, q_pos, scale, k)
        scores = self.run(indexer_scores, q, w, keys, q_pos, scale)
        want = ref.indexer_scores(q, w, keys, q_pos, scale)
        tol = SCORE_TOL[jnp.bfloat16] * float(jnp.max(jnp.where(jnp.isfinite(want), jnp.abs(want), 0.0)))
        check_topk(idx, valid, scores, k, ref_scores=want, tol=tol)

    def test_indexer_topk_ties_match_reference_exactly(self):
        B, T, S = self.TOPK_GRID[-2]
        k = self.SHAPES["topk"]
        q, w, keys, q_pos = self.indexer_inputs(B, T, S, integer=True)
        for config in self.INDEXER_CONFIGS:
            idx, valid = self.run(indexer_topk, q, w, keys, q_pos, 0.5, k, config=config)
            want = ref.indexer_scores(q, w, keys, q_pos, 0.5)
            check_topk(idx, valid, want, k, ref_scores=want, exact_ref=True)
            ref_idx, ref_valid = ref.indexer_topk(q, w, keys, q_pos, 0.5, k)
            np.testing.assert_array_equal(np.sort(np.where(valid, idx, -1), -1),
                                          np.sort(np.where(ref_valid, ref_idx, -1), -1))

    @pytest.mark.parametrize("radix_bits", [1, 4, 8])
    def test_select_kernel_is_exact(self, radix_bits):
        """The radix select alone, on rows with heavy ties, -inf runs, negative and positive scores."""
        R, L = 3, (256 if self.INTERPRET else 65536)
        kv, kk = jax.random.split(case_key("select", radix_bits, L))
        vals = jnp.round(jax.random.normal(kv, (R, L)) * 4) / 4  # many exact ties
        vals = vals.at[1, : L // 2].set(-jnp.inf).at[2].set(jnp.where(jnp.arange(L) % 3 == 0, 7.25, vals[2]))
        k = L // 4
        chunk = 128 if self.INTERPRET else 512
        config = IndexerConfig(select_chunk=chunk, radix_bits=radix_bits, select_stages=2,
                               select_resident_bytes=0 if radix_bits == 4 else 192 * 1024)
        bins = self.run(indexer_mod.select_bins, vals, k, config=config)
        idx = indexer_mod._collect(vals, bins, k)
        valid = jnp.take_along_axis(vals, idx, axis=1) > -jnp.inf
        check_topk(idx[None], valid[None], vals[None], k)

    # -- MLA -----------------------------------------------------------------------------------------------------

    def mla_inputs(self, B, T, S, K, dtype=jnp.bfloat16, valid_rows=None):
        sh = self.SHAPES
        return _mla_inputs(case_key("mla", B, T, S, K, str(dtype), valid_rows), B, T, S, K, sh["heads"], sh["latent"],
                           sh["rope"], dtype, valid_rows)

    def test_sparse_mla(self, mla_case):
        B, T, S = mla_case
        args = self.mla_inputs(B, T, S, min(self.MLA_K, S))
        out = self.run(sparse_mla_attention, *args)
        assert out.dtype == args[0].dtype
        assert_mla_close(out, ref.sparse_mla_attention(*args), jnp.bfloat16)

    @pytest.mark.parametrize("which", range(3))
    def test_sparse_mla_configs(self, which):
        config = self.MLA_CONFIGS[which]
        B, T, S = self.MLA_GRID[-1]
        args = self.mla_inputs(B, T, S, self.MLA_K - 24)  # K not a multiple of block_k
        assert_mla_close(self.run(sparse_mla_attention, *args, config=config), ref.sparse_mla_attention(*args),
                         jnp.bfloat16)

    def test_sparse_mla_float16_and_empty_splits(self):
        """Only the first rows are valid: the other splits return lse = -inf and must not disturb the combine."""
        B, T, S = self.MLA_GRID[0]
        args = self.mla_inputs(B, T, S, self.MLA_K, dtype=jnp.float16, valid_rows=5)
        config = dataclasses.replace(self.MLA_CONFIGS[0], num_splits=4)
        assert_mla_close(self.run(sparse_mla_attention, *args, config=config), ref.sparse_mla_attention(*args),
                         jnp.float16)

    def test_indexer_then_mla_pipeline(self):
        """The decode-step order: top-k rows from the indexer kernel feed the MLA kernel (slots are unordered)."""
        B, T, S = self.TOPK_GRID[-1]
        q, w, keys, q_pos = self.indexer_inputs(B, T, S)
        scale = self.SHAPES["idx_dim"] ** -0.5
        idx, valid = self.run(indexer_topk, q, w, keys, q_pos, scale, self.SHAPES["topk"])
        q_lat, q_pe, c_kv, k_pe, _, _, mla_scale = self.mla_inputs(B, T, S, idx.shape[-1])
        out = self.run(sparse_mla_attention, q_lat, q_pe, c_kv, k_pe, idx, valid, mla_scale)
        assert_mla_close(out, ref.sparse_mla_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, mla_scale),
                         jnp.bfloat16)


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is None or not issubclass(cls, _Cases):
        return
    for name, grid in (("scores_case", cls.SCORE_GRID), ("topk_case", cls.TOPK_GRID), ("mla_case", cls.MLA_GRID)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, grid, ids=[f"B{b}-T{t}-S{s}" for b, t, s in grid])


@pytest.mark.gpu
class TestAttentionKernelsGPU(_Cases):
    INTERPRET = False


class TestAttentionKernelsInterpret(_Cases):
    INTERPRET = True
    SHAPES = SMALL
    SCORE_GRID = [(1, 1, 256), (2, 4, 200)]  # 200: not a multiple of the 64-key chunk
    TOPK_GRID = [(1, 1, 256), (2, 4, 200), (2, 1, 40)]  # 40 < k = 64
    MLA_GRID = [(1, 1, 64), (2, 4, 200)]
    MLA_K = 96
    INDEXER_CONFIGS = [IndexerConfig(select_chunk=128), IndexerConfig(block_s=128, num_stages=2, select_chunk=128,
                                                                      select_stages=1, select_resident_bytes=0)]
    MLA_CONFIGS = [MLAConfig(block_k=16), MLAConfig(block_k=16, gather="xla", num_splits=2),
                   MLAConfig(block_k=32, num_splits=1, num_stages=1)]


# -- Config and input checks (any host) ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_s=96), "block_s"), (dict(block_s=320), "block_s"), (dict(num_stages=1), "num_stages"),
    (dict(ctas_per_batch=0), "ctas_per_batch"),
    (dict(select_chunk=200), "select_chunk"), (dict(radix_bits=3), "radix_bits"), (dict(select="sort"), "select")])
def test_indexer_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IndexerConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_k=24), "block_k"), (dict(num_stages=0), "num_stages"), (dict(num_splits=0), "num_splits"),
    (dict(gather="cp.async"), "gather")])
def test_mla_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLAConfig(**kwargs)


def test_input_checks():
    q, w = jnp.ones((1, 1, 8, 64), jnp.bfloat16), jnp.ones((1, 1, 8), jnp.float32)
    keys, q_pos = jnp.ones((1, 100, 64), jnp.bfloat16), jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="keys.shape"):
        indexer_scores(q, w, keys[..., :32], q_pos, 0.1, interpret=True)
    with pytest.raises(ValueError, match="16-bit"):
        indexer_scores(q.astype(jnp.float32), w, keys.astype(jnp.float32), q_pos, 0.1, interpret=True)
    with pytest.raises(ValueError, match="scale"):
        indexer_scores(q, w, keys, q_pos, -1.0, interpret=True)
    with pytest.raises(ValueError, match="k=0"):
        indexer_topk(q, w, keys, q_pos, 0.1, 0, interpret=True)
    with pytest.raises(ValueError, match="T\\*N"):
        indexer_scores(jnp.ones((1, 9, 32, 64), jnp.bfloat16), jnp.ones((1, 9, 32)), keys,
                       jnp.zeros((1, 9), jnp.int32), 0.1, interpret=True)
    args = _mla_inputs(jax.random.key(0), 1, 1, 64, 32, 8, 64, 16)
    with pytest.raises(ValueError, match="valid"):
        sparse_mla_attention(*args[:5], args[5].astype(jnp.int32), args[6], interpret=True)
    with pytest.raises(ValueError, match="16-bit"):
        sparse_mla_attention(args[0].astype(jnp.float32), *args[1:], interpret=True)
    with pytest.raises(ValueError, match="multiple of 64"):  # the compiled kernel needs 64-head groups
        sparse_mla_attention(*args)


def test_float_key_is_order_preserving():
    x = jnp.array([-jnp.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 3.5, jnp.inf], jnp.float32)
    key = np.asarray(indexer_mod._float_key(x)).astype(np.int64)
    assert (np.diff(key) >= 0).all() and np.diff(key)[3] == 1  # -0.0 just below +0.0


# -- Lowering for the H200 (any host) --------------------------------------------------------------------------


class TestLowering:
    """The compiled (non-interpret) kernels lower for the H200 at GLM-5 shapes, on any host."""

    @pytest.mark.parametrize("b, t, s", [(1, 1, 131072), (2, 4, 4000), (1, 8, 32768)])
    def test_indexer(self, b, t, s):
        sds = jax.ShapeDtypeStruct
        n, h = GLM5["idx_heads"], GLM5["idx_dim"]
        args = (sds((b, t, n, h), jnp.bfloat16), sds((b, t, n), jnp.float32), sds((b, s, h), jnp.bfloat16),
                sds((b, t), jnp.int32))
        lower_for_h200(functools.partial(indexer_scores, scale=h ** -0.5), *args)
        lower_for_h200(functools.partial(indexer_topk, scale=h ** -0.5, k=GLM5["topk"]), *args)

    @pytest.mark.parametrize("gather", ["tma", "xla"])
    @pytest.mark.parametrize("b, t", [(1, 1), (2, 4), (64, 4)])  # B*T = 256: one split no longer fits in SMEM
    def test_sparse_mla(self, b, t, gather):
        sds = jax.ShapeDtypeStruct
        n, c, r, k, s = GLM5["heads"], GLM5["latent"], GLM5["rope"], GLM5["topk"], 32768
        args = (sds((b, t, n, c), jnp.bfloat16), sds((b, t, n, r), jnp.bfloat16), sds((b, s, c), jnp.bfloat16),
                sds((b, s, r), jnp.bfloat16), sds((b, t, k), jnp.int32), sds((b, t, k), jnp.bool_))
        config = MLAConfig(gather=gather)
        lower_for_h200(functools.partial(sparse_mla_attention, scale=(c + r) ** -0.5, config=config), *args)

    def test_sparse_mla_smem_check(self):
        sds = jax.ShapeDtypeStruct
        args = (sds((1, 1, 64, 512), jnp.bfloat16), sds((1, 1, 64, 64), jnp.bfloat16),
                sds((1, 4096, 512), jnp.bfloat16), sds((1, 4096, 64), jnp.bfloat16), sds((1, 1, 2048), jnp.int32),
                sds((1, 1, 2048), jnp.bool_))
        with pytest.raises(ValueError, match="SMEM"):
            lower_for_h200(functools.partial(sparse_mla_attention, scale=0.07,
                                              config=MLAConfig(num_stages=3, num_splits=1)), *args)
