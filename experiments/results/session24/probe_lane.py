"""Session 24 probe: gemv.mma_fp8_tiles inside the component gemv_fp8 under each Mosaic lowering semantics
(the persistent kernel uses lane; jax 0.11's default is warpgroup), and with a plain WGMMA-layout load of the
e4m3 tile instead of WGMMA_UPCAST_2X. Prints the error vs gemv_fp8_ref and whether the output is finite."""
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _compat, fp8, gemv as gemv_mod

sem, load = sys.argv[1], sys.argv[2]
if sem == "lane":
    plgpu.kernel = functools.partial(plgpu.kernel, compiler_params=plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Lane))
if load == "plain":
    def plain(accs, q_tiles, scales, x_tile, interpret):
        ws = [q[...].astype(x_tile.dtype) for q in q_tiles]
        xt = _compat.transpose_ref(x_tile, (1, 0))

        def products(*tmps):
            for tmp, w in zip(tmps, ws):
                plgpu.wgmma(tmp, w, xt)
            return tuple(tmp[...] for tmp in tmps)
        ys = pl.run_scoped(products, *[plgpu.ACC(accs[0].shape, jnp.float32) for _ in accs])
        for acc, y, s in zip(accs, ys, scales):
            acc[...] = acc[...] + y * s
    gemv_mod.mma_fp8_tiles = plain

out = []
for k, n, norm in [(6144, 2048, True), (2048, 6144, False)]:
    for t in (1, 3):
        kx, kw, kn = jax.random.split(jax.random.key(k + t), 3)
        x = jax.random.normal(kx, (t, k), jnp.float32).astype(jnp.bfloat16)
        w = fp8.quantize_fp8_blockwise((jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16))
        nw = (1.0 + 0.2 * jax.random.normal(kn, (k,), jnp.float32)).astype(jnp.bfloat16) if norm else None
        try:
            y = np.asarray(gemv_mod.gemv_fp8(x, w, nw, 1e-5), np.float32)
            r = np.asarray(fp8.gemv_fp8_ref(x, w, nw, 1e-5), np.float32)
            row = dict(k=k, n=n, norm=norm, t=t, err=float(np.abs(y - r).max() / np.abs(r).max()),
                       finite=bool(np.isfinite(y).all()))
        except Exception as e:  # noqa: BLE001
            row = dict(k=k, n=n, norm=norm, t=t, error=repr(e)[:500])
        out.append(row)
        print(sem, load, json.dumps(row), flush=True)
