"""Kernel-vs-reference tests of `pallas_kernels.gemv` (fused RMSNorm + GEMV), `.moe` (routed + shared experts)
and their FP8 variants (`.fp8`), on fresh random inputs.

Classes: `_Cases` holds the tests; `TestKernelsGPU` (marked `gpu`, GLM-5 shapes, compiled kernels) and
`TestKernelsInterpret` (Pallas GPU interpret mode on the CPU, tiny shapes) run them. The GPU class is not the
interpret class's base because pytest inherits marks along the MRO. `TestLowering` lowers the kernels for CUDA
at GLM-5 shapes on any host (Mosaic's lowering runs in Python: layouts, wgmma shapes and TMA rules are checked
without a GPU). Run the GPU tests with `GLM_FAST_TEST_PLATFORMS=cuda pytest -m gpu tests/test_kernels_gemv_moe.py`.

Tolerances, keyed by weight format, on the relative error ||out - ref|| / ||ref|| (and max|out - ref| / max|ref|):
  bf16 1e-2 (5e-2): kernel and reference both accumulate in f32 and round once to bf16 (<= 2^-9 relative per
    element); the fused norm rounds bf16(x * w_norm) where HF rounds bf16(x * r), and the MoE does not round each
    expert's output to bf16 before the weighted sum: observed ~3e-3. A wrong or missing tile gives >= 1/sqrt(#tiles)
    (>= 2e-2 even for the 2420 tiles of the LM head), a wrong element shows in the max criterion.
  fp8 1e-2 (5e-2) against the dequantized reference (`fp8.*_ref`); the kernel rounds q * scale to bf16 (2^-9).
NaN never passes (outputs must be finite; NaN fails every comparison), and every output element must have
been written: the interpreter fills fresh buffers with NaN, and on the GPU the allocator is handed NaN-filled
memory just before the call (best effort).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import KernelRunner, assert_rel_close, case_key, lower_for_h200

from pallas_kernels import fp8, ref
from pallas_kernels import gemv as gemv_mod
from pallas_kernels import moe as moe_mod
from pallas_kernels.gemv import GemvConfig, gemv, gemv_fp8
from pallas_kernels.moe import MoeConfig, moe_experts, moe_experts_fp8

TOL = {"bf16": (1e-2, 5e-2), "fp8": (1e-2, 5e-2)}  # (relative Frobenius, max-abs / max|ref|)

# name -> (K, N, fused norm). GLM-5: level-1 q_a+kv_a (norm), q_b (q_a_layernorm), o_proj, LM head (final norm).
GEMV_GLM5 = {"qkv_a": (6144, 2048 + 576, True), "q_b": (2048, 64 * 256, True), "o_proj": (16384, 6144, False),
             "lm_head": (6144, 154880, True)}
GEMV_TINY = {"qkv_a": (256, 192, True), "q_b": (128, 256, True), "o_proj": (512, 128, False),
             "lm_head": (256, 320, True)}
# (E, k, D, I, shared I). GLM-5 dims with 64 instead of 256 experts (E only sets the table the ids index).
MOE_GLM5 = {"shared": (64, 8, 6144, 2048, 2048), "no_shared": (64, 8, 6144, 2048, None)}
MOE_TINY = {"shared": (8, 2, 128, 128, 256), "no_shared": (6, 2, 128, 128, None)}


def _rnd(key, shape, scale=1.0, dtype=jnp.bfloat16):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def assert_close(out, want, fmt: str):
    assert_rel_close(out, want, *TOL[fmt], what=f"{fmt}: ")


def _moe_inputs(key, t, e, k, d, i, si):
    ks = jax.random.split(key, 9)
    x = _rnd(ks[0], (t, d))
    scores = jax.random.uniform(ks[1], (t, e))
    ids = jnp.argsort(scores, axis=-1)[:, :k].astype(jnp.int32)
    if t > 1:  # token 1 also picks token 0's first expert (last position), so deduplication matters
        row = jnp.argsort(scores[1].at[ids[0, 0]].set(2.0))[:k - 1].astype(jnp.int32)
        ids = ids.at[1].set(jnp.concatenate([row, ids[0, :1]]))
    wts = jax.nn.softmax(jax.random.normal(ks[2], (t, k)), axis=-1) * 2.5
    w = (_rnd(ks[3], (e, d, i), d ** -0.5), _rnd(ks[4], (e, d, i), d ** -0.5), _rnd(ks[5], (e, i, d), i ** -0.5))
    shared = None if si is None else (_rnd(ks[6], (d, si), d ** -0.5), _rnd(ks[7], (d, si), d ** -0.5),
                                      _rnd(ks[8], (si, d), si ** -0.5))
    return x, ids, wts, w, shared


def _grid(cases, tokens=(1, 3, 8)):
    return [(c, t) for c in cases for t in tokens]


FULL_GRID = {"test_gemv": _grid(GEMV_GLM5), "test_gemv_fp8": _grid(GEMV_GLM5), "test_moe": _grid(MOE_GLM5),
             "test_moe_fp8": _grid(MOE_GLM5)}
# Interpret mode: each new shape costs seconds of tracing, so the CPU grid is thinner where the code paths repeat.
INTERPRET_GRID = {"test_gemv": _grid(GEMV_TINY), "test_gemv_fp8": _grid(["qkv_a", "o_proj"]),
                  "test_moe": _grid(["shared"]) + [("no_shared", 3)],
                  "test_moe_fp8": _grid(["shared"], (1, 8)) + [("no_shared", 3)]}


def pytest_generate_tests(metafunc):
    """(case, T) grids per class: GLM-5 shapes on the GPU, a thinner tiny-shape grid in interpret mode."""
    grid = getattr(metafunc.cls, "GRID", {}).get(metafunc.function.__name__)
    if grid is not None:
        metafunc.parametrize("case,t", grid, ids=[f"{c}-T{t}" for c, t in grid])


class _Cases(KernelRunner):
    INTERPRET = False
    GEMV = GEMV_GLM5
    MOE = MOE_GLM5
    GRID = FULL_GRID

    # -- GEMV --------------------------------------------------------------------------------------------------

    def test_gemv(self, case, t):
        k, n, norm = self.GEMV[case]
        kx, kw, kn = jax.random.split(case_key(case, t), 3)
        x, w = _rnd(kx, (t, k)), _rnd(kw, (k, n), k ** -0.5)
        nw = (1.0 + _rnd(kn, (k,), 0.2)).astype(jnp.bfloat16) if norm else None
        assert_close(self.run(gemv, x, w, nw, 1e-5), ref.gemv(x, w, nw, 1e-5), "bf16")

    def test_gemv_fp8(self, case, t):
        k, n, norm = self.GEMV[case]
        kx, kw, kn = jax.random.split(case_key(case, t, "fp8"), 3)
        x, w = _rnd(kx, (t, k)), fp8.quantize_fp8_blockwise(_rnd(kw, (k, n), k ** -0.5))
        nw = (1.0 + _rnd(kn, (k,), 0.2)).astype(jnp.bfloat16) if norm else None
        assert_close(self.run(gemv_fp8, x, w, nw, 1e-5), fp8.gemv_fp8_ref(x, w, nw, 1e-5), "fp8")

    @pytest.mark.parametrize("config", [GemvConfig(tile_n=128, tile_k=128), GemvConfig(k_splits=2,
                                        max_concurrent_steps=2), GemvConfig(tile_k=64, num_ctas=1)])
    def test_gemv_configs(self, config):
        k, n, _ = self.GEMV["o_proj"]
        kx, kw, kn = jax.random.split(jax.random.key(7), 3)
        x, w, nw = _rnd(kx, (3, k)), _rnd(kw, (k, n), k ** -0.5), (1.0 + _rnd(kn, (k,), 0.2)).astype(jnp.bfloat16)
        assert_close(self.run(gemv, x, w, nw, 1e-5, config=config), ref.gemv(x, w, nw, 1e-5), "bf16")

    def test_gemv_unaligned_shape_is_padded(self):
        k, n = (1000, 1000) if not self.INTERPRET else (200, 100)
        kx, kw, kn = jax.random.split(jax.random.key(11), 3)
        x, w, nw = _rnd(kx, (2, k)), _rnd(kw, (k, n), k ** -0.5), (1.0 + _rnd(kn, (k,), 0.2)).astype(jnp.bfloat16)
        assert_close(self.run(gemv, x, w), ref.gemv(x, w), "bf16")
        assert_close(self.run(gemv, x, w, nw, 1e-5), ref.gemv(x, w, nw, 1e-5), "bf16")

    # -- MoE ---------------------------------------------------------------------------------------------------

    def test_moe(self, case, t):
        e, k, d, i, si = self.MOE[case]
        x, ids, wts, w, shared = _moe_inputs(case_key(case, t, "moe"), t, e, k, d, i, si)
        assert_close(self.run(moe_experts, x, ids, wts, *w, shared), ref.moe_experts(x, ids, wts, *w, shared),
                     "bf16")

    def test_moe_fp8(self, case, t):
        e, k, d, i, si = self.MOE[case]
        x, ids, wts, w, shared = _moe_inputs(case_key(case, t, "moe_fp8"), t, e, k, d, i, si)
        wq = tuple(fp8.quantize_fp8_blockwise(a) for a in w)
        sq = None if shared is None else tuple(fp8.quantize_fp8_blockwise(a) for a in shared)
        assert_close(self.run(moe_experts_fp8, x, ids, wts, *wq, sq), fp8.moe_experts_fp8_ref(x, ids, wts, *wq, sq),
                     "fp8")

    def test_moe_split_and_unsplit_gate_up_agree(self):
        e, k, d, i, si = self.MOE["shared"]
        x, ids, wts, w, shared = _moe_inputs(jax.random.key(5), 3, e, k, d, i, si)
        want = ref.moe_experts(x, ids, wts, *w, shared)
        for splits in (1, 2):
            config = MoeConfig(tile_k=64, gate_up_k_splits=splits, max_concurrent_steps=2)
            assert_close(self.run(moe_experts, x, ids, wts, *w, shared, config=config), want, "bf16")


@pytest.mark.gpu
class TestKernelsGPU(_Cases):
    INTERPRET = False


class TestKernelsInterpret(_Cases):
    INTERPRET = True
    GEMV = GEMV_TINY
    MOE = MOE_TINY
    GRID = INTERPRET_GRID


# -- Pure-jnp pieces, input checks, lowering (any host) ------------------------------------------------------------


def test_route_slots_dedupes_and_appends_shared():
    ids = jnp.array([[3, 1], [1, 4], [3, 3]], jnp.int32)
    wts = jnp.array([[0.5, 0.25], [1.0, 2.0], [0.125, 0.375]], jnp.float32)
    slots = moe_mod.route_slots(ids, wts, num_experts=6, shared_chunks=2)
    n = int(slots.n_slots)
    assert n == 3 + 2  # experts {1, 3, 4} read once each, then the two shared chunks
    u_pad = slots.coef.shape[0]
    expert = np.asarray(slots.meta[1:1 + u_pad])
    shared = np.asarray(slots.meta[1 + u_pad:1 + 2 * u_pad])
    assert int(slots.meta[0]) == n and slots.meta.shape[0] % 32 == 0
    np.testing.assert_array_equal(expert[:n], [1, 3, 4, 0, 1])
    np.testing.assert_array_equal(shared[:n], [0, 0, 0, 1, 1])
    coef = np.asarray(slots.coef)
    np.testing.assert_allclose(coef[0, :3], [0.25, 1.0, 0.0])  # expert 1
    np.testing.assert_allclose(coef[1, :3], [0.5, 0.0, 0.5])  # expert 3, picked twice by token 2
    np.testing.assert_allclose(coef[2, :3], [0.0, 2.0, 0.0])  # expert 4
    np.testing.assert_allclose(coef[3:5, :3], 1.0)  # shared chunks
    assert not coef[:, 3:].any() and not coef[n:].any()  # padding tokens and padding slots contribute nothing


def test_fp8_quantize_roundtrip_and_partial_blocks():
    w = _rnd(jax.random.key(0), (384, 192 + 64), 0.05, jnp.float32)  # N = 256: two blocks, the second partial
    q, s = fp8.quantize_fp8_blockwise(w)
    assert q.shape == (256, 384) and q.dtype == jnp.float8_e4m3fn and s.shape == (2, 3)
    back = fp8.dequantize_fp8_blockwise(q, s)
    assert back.shape == w.shape
    rel = float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w))
    assert 0 < rel < 0.05  # e4m3 keeps 3 mantissa bits: <= 2^-4 relative per element
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == pytest.approx(448.0)  # blocks use the full range


@pytest.mark.parametrize("kwargs, match", [
    (dict(tile_n=96), "tile_n"), (dict(tile_k=100), "tile_k"), (dict(max_concurrent_steps=1), "max_concurrent"),
    (dict(k_splits=0), "k_splits"), (dict(num_ctas=0), "num_ctas")])
def test_gemv_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemvConfig(**kwargs)


def test_input_checks():
    x, w = jnp.zeros((9, 256), jnp.bfloat16), jnp.zeros((256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="T=9"):
        gemv(x, w, interpret=True)
    with pytest.raises(ValueError, match="K=128"):
        gemv(x[:2, :128], w, interpret=True)
    with pytest.raises(ValueError, match="bfloat16"):
        gemv(x[:2].astype(jnp.float32), w, interpret=True)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(x[:2], w, jnp.ones((128,), jnp.bfloat16), interpret=True)
    q, s = fp8.quantize_fp8_blockwise(jnp.ones((256, 128), jnp.float32))
    with pytest.raises(ValueError, match="scale"):
        gemv_fp8(x[:2], (q, s[:, :1]), interpret=True)
    with pytest.raises(ValueError, match="tile_k"):
        gemv_fp8(x[:2], (q, s), config=GemvConfig(tile_k=256), interpret=True)
    ids, wts = jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2), jnp.float32)
    wg = jnp.zeros((4, 256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of"):
        moe_experts(x[:2], ids, wts, wg[:, :, :96], wg[:, :, :96], jnp.zeros((4, 96, 256), jnp.bfloat16),
                    interpret=True)
    with pytest.raises(ValueError, match="expert_weights"):
        moe_experts(x[:2], ids, wts[:, :1], wg, wg, jnp.zeros((4, 128, 256), jnp.bfloat16), interpret=True)


def test_pick_k_splits_fills_the_sms():
    assert gemv_mod.pick_k_splits(41, 24, 132) == 3  # K=6144, N=2624 with 64x256 tiles
    assert gemv_mod.pick_k_splits(96, 64, 132) == 4  # o_proj K=16384, N=6144
    assert gemv_mod.pick_k_splits(2420, 24, 132) == 1  # LM head
    assert gemv_mod.pick_k_splits(9 * 32, 48, 132) == 4  # MoE gate/up at T = 1: 9 slots x 32 tiles of I=2048


class TestLowering:
    """The compiled (non-interpret) kernels lower for the H200 at GLM-5 shapes, on any host."""

    @pytest.mark.parametrize("case", list(GEMV_GLM5))
    def test_gemv(self, case):
        k, n, norm = GEMV_GLM5[case]
        sds = jax.ShapeDtypeStruct
        x, w = sds((3, k), jnp.bfloat16), sds((k, n), jnp.bfloat16)
        nw = sds((k,), jnp.bfloat16) if norm else None
        q = (sds((n, k), jnp.float8_e4m3fn), sds((-(-n // 128), k // 128), jnp.float32))
        lower_for_h200(functools.partial(gemv, eps=1e-5), x, w, nw)
        lower_for_h200(functools.partial(gemv_fp8, eps=1e-5), x, q, nw)

    @pytest.mark.parametrize("t", [1, 8])
    def test_moe(self, t):
        e, k, d, i, si = MOE_GLM5["shared"]
        sds = jax.ShapeDtypeStruct
        x, ids, wts = sds((t, d), jnp.bfloat16), sds((t, k), jnp.int32), sds((t, k), jnp.float32)
        w = (sds((e, d, i), jnp.bfloat16), sds((e, d, i), jnp.bfloat16), sds((e, i, d), jnp.bfloat16))
        shared = (sds((d, si), jnp.bfloat16), sds((d, si), jnp.bfloat16), sds((si, d), jnp.bfloat16))
        lower_for_h200(moe_experts, x, ids, wts, *w, shared)
        qs = lambda *shape: (sds(shape, jnp.float8_e4m3fn), sds((*shape[:-2], shape[-2] // 128, shape[-1] // 128),
                                                                  jnp.float32))
        lower_for_h200(moe_experts_fp8, x, ids, wts, qs(e, i, d), qs(e, i, d), qs(e, d, i),
                        (qs(si, d), qs(si, d), qs(d, si)))
