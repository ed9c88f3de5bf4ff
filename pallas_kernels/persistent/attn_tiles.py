"""The ATTN op body of the persistent kernel (format.py's ATTN record): absorbed sparse MLA of one head group over
one split of the top-K slots, per query token, built from `pallas_kernels.mla_attention`'s tiles.

What one task does (heads [h0, h0 + nh), slots [split * ks, (split + 1) * ks), ks = ceil(K / n_splits)), for
each token t (`tiles.per_token`: a loop, not unrolled; every token has its own top-K list):
  * one TMA each for q_lat[t, h0:h0+nh] and q_pe[t, h0:h0+nh] into the first nh rows of a [M = 64, C] / [64, R]
    q tile (the wgmma M is 64; rows nh.. hold stale data, are computed row-independently and never stored), and
    the split's index and valid lists as [block_k] chunks (TMA reads past K zero-fill on the GPU; slots past the
    split's end are masked by an iota in any case);
  * the selected rows, `block_k` per ring slot, by per-row TMAs issued from the 4 warps on the GPU
    (`mla_attention.gather_rows`, indices clamped to the cache) -- rows equal to this step's pos[t'] come from
    the KV_WRITE `rows` outputs instead of the cache (gather_rows' overlay; `_Refs.cache`'s semantics);
  * per block: logits [64, block_k] = `qk_logits` over the C/64 latent segments and the rope segment, masked by
    a column bias (0 valid / -inf), then `online_softmax_pv` into an f32 accumulator [64, C / n_pass];
  * `_finish`, then o_part[split, t, h0:h0+nh] (rounded to q_lat's dtype, as the jnp body's
    `ref.sparse_mla_attention` returns it) through a [2, 64, 32] f32 staging tile, and lse_part (natural log:
    the log2-domain lse x ln 2; 0 / -inf for a split without a valid slot, as the jnp body).
The kernel runs one warpgroup, so a [64, C] f32 accumulator (256 registers per thread at C = 512) cannot stay in
registers: C is covered in n_pass = C / 256 column passes, each recomputing the logits over all rows (the second
pass gathers the split's rows again, mostly from L2, unless they are resident) and accumulating its half of C (128
registers per thread).

Resident rows. When the ring holds every block of the split (`AttnShape.resident`), the passes after the first
reuse its rows instead of gathering them again, and the output staging gets its own SMEM (else it aliases the
drained ring). glm5_slice on the GPU takes 64 heads x 32 splits per task (`kernel.gpu_candidates`): one gather of
the split's 64 rows serves all 64 heads and both column passes.

SMEM at glm5_slice (64 heads, C = 512, R = 64, K = 2048; 64 heads x 32 splits per task: ks = 64 = one block):
q 64 KB + q_pe 8 KB, one ring stage of 64 rows (C + R) bf16 = 72 KB, index + valid lists 512 B, lse 256 B, the
output staging [2, 64, 32] f32 = 16 KB: ~161 KB. On the GPU these share one
`plgpu.RefUnion` ("t_alias", see `add_scratch`) with the tile bodies' big rings t_w = t_w0 | t_w1 (weights, 8 slots
of 8 KB each, or one ring of 16 for a single-weight stream) and the x / norm-weight rings after them, t_op, t_uvs,
t_uvx and t_lse (UV's split partials, merged o and split LSEs; these start past t_w0, which UV
streams through while it reads t_uvx), t_part (MOE_COMBINE's partials), and with INDEX_TOPK's candidate ring, so
ATTN adds no SMEM beyond its barriers. That aliasing is safe because every body drains its SMEM (TMA loads
waited, wgmmas retired, TMA stores waited) before it returns and tasks of one CTA run one after the other; a
future cross-task prefetch that fills t_w0 / t_w1 while an ATTN task runs must exclude them from the union. A
second ring stage (overlapping the next block's row gathers with this block's wgmmas) is taken when it fits
`SMEM_BUDGET` -- not at glm5_slice, where the body issues a block's 576 row TMAs, waits, then computes.
Measured (H200, glm5_slice at 4K; the phases are profiler ranges: `persistent_step(profile_dir=...)`): with 8 heads
x 16 splits (bench_persistent_glm5_slice_phases.json) 128 us per task, 98 us of it issuing row TMAs (one thread,
~84 cycles each: 2 blocks x 2 passes x 576), 18 us of math -- every 8-head group gathered the same rows again, and
the second pass gathered them a second time; with 64 heads x 32 splits and the resident ring
(bench_persistent_glm5_slice_attn64x32.json) 48 us per task (23 us issuing, 12.5 us math), 32 tasks per layer
instead of 128. UV then merges 32 partials per head with a one-slot ring (t_op: `tiles.UV_BYTES`): 43 us per
task instead of 22, until it merged once per head instead of once per column tile, and since session 27 only
the step's token rows, ~13.5 us per task (`tiles.uv_body`). The row
copies now go out from the warpgroup's 4 warps (`gather_rows(warps=True)`, GPU only): 16 -> 11.5 us issuing and 40
-> 34 us per task, critical path 2.14 -> 2.11 ms at T = 1 (bench_persistent_glm5_slice_{slot_skip,warp_gather}
.json; alone, 64 rows of 9 copies took 13.5 us from one thread, 3.3 us from 4 warps, 6.3 us with the overlay of
a new row: experiments/results/probe_tma_issue_h200.json). The price is code: the warps' rows are unrolled, and
lowering the step took 30 s instead of 17-22 s.

Interpret mode (CPU): the same code with block_k = 8, a plain allocation per ref (jax 0.10's interpreter has no
RefUnion), the wgmma products as jnp.dot (`qk_logits` / `online_softmax_pv`'s interpret paths) and the per-row
copies straight into the (untiled) ring. Only exercised on the GPU: the union aliasing and its swizzle-only copy
view of the ring (a one-row slice of an (8, 64)-tiled ref is not tile-aligned), the 128-byte swizzled tiles,
the wgmma paths, TMA zero-fill past K, and register pressure / spills of the two-pass accumulator; the lowering
for the H200 at glm5_slice is tested on any host (tests/test_persistent_attn_tiles.py).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mla_attention as mla
from pallas_kernels.indexer import col_vector, mma_transforms
from pallas_kernels.persistent.format import C_ATTN_SCALE
from pallas_kernels.persistent.tiles import TaskView, _stack, per_token, phase

SEG = 64  # latent segment width on the GPU: one 128-byte swizzle row of bf16
M = 64  # the wgmma M: q rows per tile (a task's nh <= 64 heads in the first rows)
ACC_COLS = 256  # accumulator columns per pass: [64, 256] f32 = 128 registers per thread of one warpgroup
OUT_TILE = 32  # f32 staging tile width (128 bytes)
SMEM_BUDGET = 200 * 1024  # the kernel's scratch with ATTN's (a second ring stage only if it fits)
RINGS = ("t_w", "t_x", "t_wn")  # the weight rings, one union group (SWIGLU_UP and INDEX_SCORE use both at once) ...
STAGED = ("t_op", "t_uvs", "t_uvx", "t_lse")  # ... UV's split partials, merged o (staged, then x tiles) and
# split LSEs: a group placed past t_w0, which UV streams its W_uv tiles through while it reads t_uvx ...
OWN = ("t_part", "t_rl", "t_rcw")  # ... and MOE_COMBINE's partials and ROUTER_SELECT's split-K logits and
# weights rows, a group of their own (those bodies use no ring; t_rl is 16 KB at glm5_slice T = 4) ...
FP8 = ("t_q0", "t_q1", "t_qs0", "t_qs1", "t_x8", "t_wn8", "t_xf")  # ... and the FP8 experts' rings
# (`tiles.scratch_types`; those bodies use neither t_w0 nor t_w1): all share SMEM with ATTN's on the GPU
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class AttnShape:
    """The ATTN branches' shapes (the largest head group and split over all branches): C, R, K (top-K slots),
    ks (slots per split), nh (heads per task), dtype (q_lat's)."""
    c: int
    r: int
    k: int
    ks: int
    nh: int
    dtype: object

    def geometry(self, interpret: bool):
        """(block_k, n_blocks, seg, n_pass, m) of the scratch: rows per ring slot, blocks per split, latent
        segment width, accumulator column passes, q tile rows."""
        bk = 8 if interpret else 64
        seg = SEG if self.c % SEG == 0 else self.c
        n_seg = self.c // seg
        n_pass = min(max(1, math.ceil(self.c / ACC_COLS)), n_seg)
        while n_seg % n_pass:
            n_pass += 1
        m = -(-self.nh // 8) * 8 if interpret else M
        return bk, -(-self.ks // bk), seg, n_pass, m

    def fits_gpu(self) -> bool:
        bk, _, seg, n_pass, _ = self.geometry(False)
        return (jnp.dtype(self.dtype).itemsize == 2 and seg == SEG and self.r == SEG and self.nh <= M
                and self.nh % 8 == 0 and self.ks % 4 == 0 and self.k % 4 == 0 and (self.c // n_pass) % OUT_TILE == 0)

    def resident(self, stages: int, interpret: bool) -> bool:
        """Whether a ring of `stages` slots holds the whole split, so that the column passes after the first
        reuse its rows instead of gathering them again (and the output staging must not alias the ring)."""
        return self.geometry(interpret)[1] <= stages

    def groups(self, stages: int, interpret: bool) -> tuple[dict, dict, dict]:
        """(tiled views, per-row copy views, output staging): the three views of ATTN's SMEM. Keys sort so that
        the ring (a0_kv, a1_pe) comes first in every group (a RefUnion lays a group out in tree order). The
        staging a7_o aliases the drained ring, except when the ring is resident (`resident`): then it is a
        member of the tiled group (the staging group is empty)."""
        bk, n_blocks, seg, _, m = self.geometry(interpret)
        dt = self.dtype
        sw = mma_transforms(None if interpret else 128, dt)
        tiled = dict(
            a0_kv=plgpu.SMEM((stages * (self.c // seg), bk, seg), dt, transforms=sw),
            a1_pe=plgpu.SMEM((stages, bk, self.r), dt, transforms=sw),
            a2_q=plgpu.SMEM((m, self.c), dt, transforms=sw),
            a3_qpe=plgpu.SMEM((m, self.r), dt, transforms=sw),
            a4_idx=plgpu.SMEM((n_blocks, bk), jnp.int32),
            a5_valid=plgpu.SMEM((n_blocks, bk), jnp.int32),
            a6_lse=plgpu.SMEM((m,), jnp.float32),
        )
        swz = () if interpret else (plgpu.SwizzleTransform(128),)
        copy = dict(a0_kvc=plgpu.SMEM(tiled["a0_kv"].shape, dt, transforms=swz),
                    a1_pec=plgpu.SMEM(tiled["a1_pe"].shape, dt, transforms=swz))
        width = math.gcd(OUT_TILE, self.c // self.geometry(interpret)[3])  # divides a pass's columns
        stage = dict(a7_o=plgpu.SMEM((2, m, width), jnp.float32,
                                     transforms=mma_transforms(None if interpret else 128, jnp.float32)))
        if self.resident(stages, interpret):
            tiled.update(stage)
            stage = {}
        return tiled, copy, stage

    def add_scratch(self, out: dict, interpret: bool) -> dict:
        """`out` (tiles.scratch_types' dict) with ATTN's SMEM and barriers added. GPU: ATTN's views and the
        ALIASED rings become one RefUnion "t_alias" (unpacked by `unalias`); interpret mode: plain entries."""
        bk, n_blocks, seg, _, _ = self.geometry(interpret)
        out = dict(out)
        rings, staged, own, fp8 = ({k: out.pop(k) for k in names if k in out and not interpret}
                                   for names in (RINGS, STAGED, OWN, FP8))
        if staged:  # t_op .. t_uvx start where t_w1 (t_w's second half) does: they may overlap t_w1, never t_w0
            staged["t_a_pad"] = plgpu.SMEM((_nbytes(rings["t_w"]) // 2,), jnp.int8)  # (sorts first)
        stages = 2 if n_blocks > 1 else 1
        if not interpret:
            rest = sum(_nbytes(v) for v in out.values())
            while stages > 1 and rest + max(_group_bytes(rings), _group_bytes(staged), _group_bytes(own),
                                            _group_bytes(fp8), _group_bytes(self.groups(stages, False)[0])
                                            ) > SMEM_BUDGET:
                stages -= 1
        tiled, copy, stage = self.groups(stages, interpret)
        if interpret:
            out.update(tiled)
            out.update(stage)
        else:
            if not self.fits_gpu():  # (the output staging, 16 KB, then also fits in the ring it may alias)
                raise ValueError(f"ATTN's GPU body does not take {self}: it takes GLM-5-like shapes (bf16, C a "
                                 f"multiple of 64, R = 64, <= 64 heads per task; AttnShape.fits_gpu); run this "
                                 f"config in GPU interpret mode")
            out["t_alias"] = plgpu.RefUnion(rings, *([staged] if staged else []), *([own] if own else []),
                                            *([fp8] if fp8 else []), tiled, copy, *([stage] if stage else []))
        out["a_full"] = plgpu.Barrier(num_arrivals=(self.c // seg + 1) * bk, num_barriers=stages)
        out["a_meta"] = plgpu.Barrier(num_arrivals=2 + 2 * n_blocks)
        return out


def _nbytes(t) -> int:
    if isinstance(t, plgpu.RefUnion):
        return t.shape[0]
    if isinstance(t, plgpu.Barrier) or not hasattr(t, "dtype"):
        return 0
    return math.prod(t.shape) * jnp.dtype(t.dtype).itemsize


def _group_bytes(group: dict) -> int:
    return sum(-(-_nbytes(v) // 128) * 128 for v in group.values())


def unalias(scratch: dict) -> dict:
    """The scratch dict with the "t_alias" RefUnion (GPU) replaced by its views, by name."""
    if "t_alias" not in scratch:
        return scratch
    scratch = dict(scratch)
    for group in scratch.pop("t_alias"):
        scratch.update(group)
    return scratch


def plan_shape(plan) -> AttnShape | None:
    """The AttnShape of a KernelPlan's ATTN branches (None without attention)."""
    from pallas_kernels.persistent.format import Op
    shapes = []
    for op, static, _, islots, _ in plan.branches:
        if op != Op.ATTN:
            continue
        nh, n_splits = static
        (q_shape, q_dt), _ = plan.buffer_stacks[islots[0][1]]
        (pe_shape, _), _ = plan.buffer_stacks[islots[1][1]]
        (idx_shape, _), _ = plan.buffer_stacks[islots[4][1]]
        k = idx_shape[-1]
        shapes.append((q_shape[-1], pe_shape[-1], k, -(-k // n_splits), nh, q_dt))
    if not shapes:
        return None
    from pallas_kernels.persistent.kernel import _JNP
    c, r, k = shapes[0][:3]
    if any(s[:3] != (c, r, k) or s[5] != shapes[0][5] for s in shapes):
        return None
    return AttnShape(c, r, k, max(s[3] for s in shapes), max(s[4] for s in shapes), _JNP[shapes[0][5]])


def attn_body(r, key, consts):
    """ATTN for one (head group, split): see the module docstring. None when the shapes do not fit the scratch."""
    _, (nh, n_splits), _, islots, oslots = key
    tiles = r.tiles
    if tiles is None or "a2_q" not in tiles.s or any(islots[j][0] != "cache" for j in (2, 3)):
        return None
    q_ref, qpe_ref, idx_ref, valid_ref = (_stack(r, islots[j]) for j in (0, 1, 4, 5))
    o_ref, lse_ref = _stack(r, oslots[0]), _stack(r, oslots[1])
    if any(a is None for a in (q_ref, qpe_ref, idx_ref, valid_ref, o_ref, lse_ref)):
        return None
    g_kv, g_pe = islots[2][1], islots[3][1]  # cache groups: every layer's refs, picked per task (`with_caches`)
    ckv, kpe, new_ckv, new_kpe = r.caches[g_kv][0], r.caches[g_pe][0], r.rows[g_kv], r.rows[g_pe]
    tokens, _, c_dim = q_ref.shape[1:]
    rr, kk = qpe_ref.shape[-1], idx_ref.shape[-1]
    ks = -(-kk // n_splits)
    s, c, interpret = tiles.s, tiles.c, tiles.interpret
    shape = AttnShape(c_dim, rr, kk, ks, nh, q_ref.dtype)
    bk, n_blocks, seg, n_pass, m = shape.geometry(interpret)
    kv, pe, q, qpe = s["a0_kv"], s["a1_pe"], s["a2_q"], s["a3_qpe"]
    idx_s, val_s, lse_s, stage = s["a4_idx"], s["a5_valid"], s["a6_lse"], s["a7_o"]
    kv_copy, pe_copy = s.get("a0_kvc", kv), s.get("a1_pec", pe)
    stages = pe.shape[0]
    n_seg = c_dim // seg
    if (kv.shape[1:] != (bk, seg) or kv.shape[0] != stages * n_seg or pe.shape[2] != rr or q.shape != (m, c_dim)
            or idx_s.shape != (n_blocks, bk) or nh > q.shape[0] or (not interpret and not shape.fits_gpu())
            or any(a.dtype != q_ref.dtype for a in (qpe_ref, ckv, kpe, kv))):
        return None
    half = n_seg // n_pass  # latent segments per pass
    width = stage.shape[-1]
    scale_log2 = float(consts[C_ATTN_SCALE]) * mla._LOG2E
    pos_ref = r.inputs[r.plan.inputs.index("pos")]
    full, meta = s["a_full"], s["a_meta"]
    seq_len = ckv.shape[0]

    def fn(t: TaskView):
        h0, split = t.arg(0), t.arg(2)
        qi, pi, ii, vi, oi, li = t.inp(0), t.inp(1), t.inp(4), t.inp(5), t.out(0), t.out(1)
        base = split * ks
        n_here = jnp.clip(kk - base, 0, ks)  # valid slot positions of this split
        pos = tuple(pos_ref[c(j)] for j in range(tokens))  # GMEM scalars (the step's input)
        heads = pl.ds(c(0), nh)

        layer = t.inp(2)  # the member index of this layer's c_kv (and k_pe: the plan checks they agree)

        def fill(slot, j):
            r.with_caches((g_kv, g_pe), layer, lambda ckv_l, kpe_l: mla.gather_rows(
                ckv_l, kpe_l, idx_s.at[j], kv_copy, pe_copy.at[slot], full.at[slot], b=None, seg0=slot * n_seg,
                n_seg=n_seg, num_rows=bk, seq_len=seq_len, overlay=(new_ckv, new_kpe, pos, layer),
                warps=not interpret))

        def block_bias(j):
            """0 for a valid slot of this split, -inf else; the column-vector layout of the logits."""
            v = col_vector(val_s.at[j], interpret)
            if interpret:
                col = lax.broadcasted_iota(jnp.int32, (bk,), 0)
            else:
                col = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=plgpu.Layout.WGMMA.reduce(0))
            ok = jnp.logical_and(v != 0, col + j * bk < n_here)
            return jnp.where(ok, 0.0, mla.NEG_INF).astype(jnp.float32)

        resident = shape.resident(stages, interpret)

        def run_pass(w: int, tt):
            gather = w == 0 or not resident  # a resident ring still holds the split's rows from pass 0
            if gather:
                with phase("rows_issue"):
                    for j in range(min(stages, n_blocks)):
                        fill(c(j), c(j))
            q_segs = [q.at[:, pl.ds(cc * seg, seg)] for cc in range(n_seg)] + [qpe]

            def block(j, carry):
                slot = lax.rem(j, stages)
                if gather:
                    with phase("rows_wait"):  # profiler phases (`persistent_step(profile_dir=...)`)
                        plgpu.barrier_wait(full.at[slot])
                with phase("math"):
                    kv_segs = [kv.at[slot * n_seg + cc] for cc in range(n_seg)] + [pe.at[slot]]
                    logits = mla.qk_logits(q_segs, kv_segs, interpret)
                    carry = mla.online_softmax_pv(logits, block_bias(j), kv_segs[w * half:(w + 1) * half], carry,
                                                  scale_log2=scale_log2, interpret=interpret)
                    if not interpret:
                        plgpu.wgmma_wait(0)  # the slot is free once the wgmmas that read it retired
                with phase("rows_issue"):
                    pl.when(j + stages < n_blocks)(lambda: fill(slot, j + stages))
                return carry

            init = (mla._full((m, half * seg), 0.0, interpret), mla._full((m,), mla.NEG_INF, interpret),
                    mla._full((m,), 0.0, interpret))
            out, lse = mla._finish(lax.fori_loop(0, n_blocks, block, init))
            out = out.astype(q_ref.dtype).astype(jnp.float32)  # the jnp body's o_part: q_lat's dtype
            # The staging tile aliases the ring (GPU; unless resident), drained now: every block's wgmmas retired.
            for i in range(half * seg // width):
                slot = stage.at[c(i % 2)]
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                slot[...] = out[:, i * width:(i + 1) * width]
                plgpu.commit_smem()
                col0 = c(w * half * seg + i * width)
                plgpu.copy_smem_to_gmem(slot.at[heads], o_ref.at[oi, split, tt, pl.ds(h0, nh), pl.ds(col0, width)])
            if w == 0:
                lse_s[...] = lse * _LN2
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(lse_s.at[heads], lse_ref.at[li, split, tt, pl.ds(h0, nh)])
            plgpu.wait_smem_to_gmem(0)  # the ring is refilled next

        @per_token(tokens, c)
        def _(tt):
            plgpu.copy_gmem_to_smem(q_ref.at[qi, tt, pl.ds(h0, nh)], q.at[heads], meta)
            plgpu.copy_gmem_to_smem(qpe_ref.at[pi, tt, pl.ds(h0, nh)], qpe.at[heads], meta)
            for j in range(n_blocks):
                first = pl.ds(base + j * bk, bk)
                plgpu.copy_gmem_to_smem(idx_ref.at[ii, tt, first], idx_s.at[c(j)], meta)
                plgpu.copy_gmem_to_smem(valid_ref.at[vi, tt, first], val_s.at[c(j)], meta)
            plgpu.barrier_wait(meta)
            for w in range(n_pass):
                run_pass(w, tt)
    return fn
