"""CPU simulator of the persistent kernel: executes a schedule's per-SM task lists in a random interleaving
that respects only the dependency counters, with the jnp tile references of `pallas_kernels.ref`.

`run_counters` is the machine: one head task per SM; at each step a random SM (seeded) whose head has all its
waits satisfied runs it and bumps its counter; when no SM can progress while work remains it raises
`DeadlockError` listing the blocked heads. `simulate_step` runs it with real math on an nnx `Model`'s weights and
the engine's `LayerCache`s (batch 1) and returns the logits and updated caches, to compare with
`glm_fast.engine.forward.main_cached` on the XLA backend. On top of the counters it checks the data flow:
a task may only read scratch buffers that are completely written, and writes each element exactly once.

Numerics follow `main_cached` (float32 accumulation, outputs in the buffer dtype). One deliberate difference
for bf16 models: dense-MLP tiles round silu(g) * u once (as `ref.moe_experts`), not g and u separately as the
`Linear` layers do; float32 models are unaffected. FP8 expert weights (`ScheduleOptions.expert_format`) are
quantized from the model's (`weight_arrays`) and dequantized to the model dtype, as the XLA backend's FP8 MoE
(`xla_moe_experts_fp8`) computes them: the reference of the kernel's FP8 bodies.
"""
from __future__ import annotations

import dataclasses
import math
import random

import jax
import jax.numpy as jnp
import numpy as np

from glm_fast.engine.cache import LayerCache
from glm_fast.model.rope import apply_rope
from pallas_kernels import ref
from pallas_kernels.persistent.format import (
    C_ATTN_SCALE, C_INDEX_SCALE, C_INDEX_WSCALE, C_ROUTED_SCALE, F_NWAITS, F_SIGNAL, F_WAITS, Kind, Task,
    written_region)
from pallas_kernels.persistent.index_tiles import topk_reference
from pallas_kernels.persistent.schedule import FP8_Q, FP8_SCALE, Schedule, fp8_scale_id

_JNP = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int32": jnp.int32, "float8_e4m3fn": jnp.float8_e4m3fn}


class DeadlockError(RuntimeError):
    """No SM can run its head task while work remains."""


class DataflowError(AssertionError):
    """A task read an incompletely written buffer or wrote an element twice."""


def run_counters(schedule: Schedule, seed: int = 0, execute=None, lists=None) -> list[int]:
    """Runs the SM lists (default `schedule.sm_lists()`) in a seeded random interleaving; `execute(task_id)` is
    called for each task when it runs. Returns the task ids in execution order."""
    lists = schedule.sm_lists() if lists is None else lists
    rec = schedule.records
    waits = [list(zip(r[F_WAITS:F_WAITS + 2 * n:2].tolist(), r[F_WAITS + 1:F_WAITS + 2 * n:2].tolist()))
             for r, n in zip(rec, rec[:, F_NWAITS].tolist())]
    signal = rec[:, F_SIGNAL].tolist()
    target = [c.target for c in schedule.counters]
    count = [0] * len(target)
    heads = [0] * len(lists)
    blocked: dict[int, list[int]] = {}
    ready: list[int] = []

    def enqueue(sm):
        if heads[sm] == len(lists[sm]):
            return
        for c, t in waits[lists[sm][heads[sm]]]:
            if count[c] < t:
                blocked.setdefault(c, []).append(sm)
                return
        ready.append(sm)

    for sm in range(len(lists)):
        enqueue(sm)
    rng, order = random.Random(seed), []
    while ready:
        j = rng.randrange(len(ready))
        sm = ready[j]
        ready[j] = ready[-1]
        ready.pop()
        task = lists[sm][heads[sm]]
        if execute is not None:
            execute(task)
        order.append(task)
        heads[sm] += 1
        c = signal[task]
        count[c] += 1
        if count[c] > target[c]:
            raise DeadlockError(f"counter {schedule.counters[c].name} signalled {count[c]} > target {target[c]}")
        if count[c] == target[c]:
            for other in blocked.pop(c, []):
                enqueue(other)
        enqueue(sm)
    total = sum(map(len, lists))
    if len(order) != total:
        stuck = [f"SM {sm}: task {lists[sm][heads[sm]]} ({schedule.task(lists[sm][heads[sm]]).op.name}, "
                 + ", ".join(f"{schedule.counters[c].name} {count[c]}/{t}" for c, t in waits[lists[sm][heads[sm]]]
                             if count[c] < t) + ")"
                 for sm in range(len(lists)) if heads[sm] < len(lists[sm])]
        raise DeadlockError(f"deadlock after {len(order)}/{total} tasks; blocked heads:\n  " + "\n  ".join(stuck))
    return order


@dataclasses.dataclass
class SimResult:
    logits: jax.Array        # [T, V]
    caches: list             # LayerCache per layer, batch 1
    order: list[int]         # task ids in execution order
    buffers: list            # every schedule buffer's final value (numpy), by buffer id


def _resolve(model, name: str):
    obj = model
    for part in name.split("/"):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return jnp.asarray(obj[...])


def weight_arrays(model, weights) -> list:
    """Every schedule weight's array, by id, checked against its declared shape: the model's parameter at the
    weight's path; for an FP8 weight (`ScheduleOptions.expert_format`) its q and TMA-padded block scales
    (`fp8.quantize_fp8_blockwise`, `fp8.tma_scales`) quantized once from the model's reference-layout weight."""
    from pallas_kernels import fp8
    out = []
    for i, w in enumerate(weights):
        if w.name.endswith(FP8_SCALE):
            continue  # appended with its q
        if w.name.endswith(FP8_Q):
            q, scale = fp8.quantize_fp8_blockwise(_resolve(model, w.name[:-len(FP8_Q)]))
            arrs = [(w, q), (weights[fp8_scale_id(weights, i)], fp8.tma_scales(scale))]
        else:
            arrs = [(w, _resolve(model, w.name))]
        for wt, a in arrs:
            if a.shape != wt.shape:
                raise ValueError(f"weight {wt.name}: model has {a.shape}, schedule expects {wt.shape}")
            out.append(a.astype(_JNP[wt.dtype]))
    return out


def dequantized(q, scale_padded, dtype):
    """An FP8 weight's (q [..., N, K], TMA-padded scales) -> W [..., K, N] in `dtype` (the reference layout)."""
    from pallas_kernels import fp8
    return fp8.dequantize_fp8_blockwise(q, scale_padded[..., :-(-q.shape[-1] // fp8.BLOCK)], dtype=dtype)


def _layernorm(x, w, b, eps):
    """torch LayerNorm in float32 (as `glm_fast.model.norms.LayerNorm`), x [..., H]."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def _rope_front(x, cos, sin):
    """RoPE on the first R = 2 * cos.shape[-1] dims of x [T, ..., H] (the indexer's layout)."""
    r = 2 * cos.shape[-1]
    return jnp.concatenate([apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)


def sum_parts(parts):
    """A split-K GEMV's partials [P, ...] summed in order (part 0 + part 1 + ...), as every ROUTER_SELECT body
    sums them, so the bodies agree on the router's near-ties."""
    out = parts[0]
    for p in range(1, parts.shape[0]):
        out = out + parts[p]
    return out


def _route(parts, bias, top_k, n_group, topk_group, norm, scaling):
    """`glm_fast.model.moe.Router` from its split-K logits [P, T, E] -> ids int32 [T, k], weights float32 [T, k]."""
    scores = jax.nn.sigmoid(sum_parts(parts))
    choice = scores + bias
    t, e = choice.shape
    group_scores = jax.lax.top_k(choice.reshape(t, n_group, e // n_group), 2)[0].sum(-1)
    _, keep = jax.lax.top_k(group_scores, topk_group)
    group_mask = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
    choice = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return ids, weights * scaling


class _Machine:
    """GMEM of the simulated GPU: buffers (numpy), written masks, weights; `run(task)` executes one task."""

    def __init__(self, schedule: Schedule, model, caches, tokens, pos):
        self.s = schedule
        # FP8 weights dequantized to the model dtype, as the XLA backend's `xla_moe_experts_fp8` does
        self.weights = weight_arrays(model, schedule.weights)
        dt = jnp.dtype(model.cfg.dtype)
        for i, w in enumerate(schedule.weights):
            if w.name.endswith(FP8_Q):
                self.weights[i] = dequantized(self.weights[i], self.weights[fp8_scale_id(schedule.weights, i)], dt)
        self.consts = schedule.constants
        cos, sin = (np.asarray(a[0]) for a in model.rope(jnp.asarray(pos)[None]))
        inputs = {"tokens": np.asarray(tokens, np.int32), "pos": np.asarray(pos, np.int32),
                  "rope_cos": cos, "rope_sin": sin}
        self.bufs, self.written = [], []
        for b in schedule.buffers:
            if b.kind == Kind.INPUT:
                arr = inputs[b.name]
                if arr.shape != b.shape:
                    raise ValueError(f"input {b.name}: got {arr.shape}, schedule expects {b.shape}")
            elif b.kind == Kind.CACHE:
                _, layer, field = b.name.split("/")
                arr = np.array(getattr(caches[int(layer)], field)[0])
            else:
                arr = np.full(b.shape, np.nan if b.dtype != "int32" else -(2 ** 31), _JNP[b.dtype])
            self.bufs.append(arr)
            self.written.append(np.zeros(b.shape, bool) if b.kind in (Kind.SCRATCH, Kind.OUTPUT) else None)
        self.pos = inputs["pos"]

    def read(self, bid, region=...):
        """Buffer bid, whose `region` (an index; default all of it) must be completely written: a routed down
        task reads only its slot of the experts' activations (its op group waits for that slot's up tiles)."""
        if self.written[bid] is not None and not self.written[bid][region].all():
            raise DataflowError(f"read of {self.s.buffers[bid].name} before it is completely written")
        return jnp.asarray(self.bufs[bid])

    def write(self, task: Task, *values):
        for (bid, idx), value in zip(written_region(task, self.s.buffers), values):
            if self.written[bid][idx].any():
                raise DataflowError(f"task {task.id} ({task.op.name}) rewrites part of {self.s.buffers[bid].name}")
            self.bufs[bid][idx] = np.asarray(value).astype(self.bufs[bid].dtype)
            self.written[bid][idx] = True

    def dtype(self, bid):
        return _JNP[self.s.buffers[bid].dtype]

    def run(self, i: int):
        task = self.s.task(i)
        getattr(self, f"_{task.op.name.lower()}")(task)

    # ---- tile references ---------------------------------------------------------------------------------

    def _embed(self, t):
        self.write(t, self.weights[t.weights[0]][self.read(t.inputs[0])])

    def _gemv(self, t):
        (w, nw), (x, res), (c0, n, eps, transposed, part) = t.weights, t.inputs, t.args
        xv = self.read(x)
        xv = xv.reshape(xv.shape[0], -1)
        if eps >= 0:
            xv = ref.rmsnorm(xv, self.weights[nw], self.consts[eps])
        wt = self.weights[w][c0:c0 + n].T if transposed else self.weights[w][:, c0:c0 + n]
        out = self.s.buffers[t.outputs[0]].shape
        if len(out) == 3:  # split-K part `part` of out[0]: K / P of x's columns and W's rows
            ks = xv.shape[1] // out[0]
            xv, wt = xv[:, part * ks:(part + 1) * ks], wt[part * ks:(part + 1) * ks]
        dt = self.dtype(t.outputs[0])
        y = ref.gemv(xv.astype(dt), wt.astype(dt))
        self.write(t, y if res < 0 else self.read(res)[:, c0:c0 + n] + y)

    def _rope(self, t):
        return self.read(t.inputs[2]), self.read(t.inputs[3])

    def _kv_write(self, t):
        kva, (cos, sin) = self.read(t.inputs[0]), self._rope(t)
        c_kv, k_pe = t.outputs
        c = self.bufs[c_kv].shape[1]
        self.bufs[c_kv][self.pos] = ref.rmsnorm(kva[:, :c], self.weights[t.weights[0]], self.consts[t.args[0]])
        self.bufs[k_pe][self.pos] = apply_rope(kva[:, c:], cos, sin)

    def _ik_write(self, t):
        (cos, sin), (w, b) = self._rope(t), t.weights
        y = _layernorm(self.read(t.inputs[0]), self.weights[w], self.weights[b], self.consts[t.args[0]])
        self.bufs[t.outputs[0]][self.pos] = _rope_front(y, cos, sin)

    def _index_score(self, t):
        iq, iw, keys, _, cos, sin = t.inputs
        chunk, n_chunks, align = t.args[:3]
        nt, heads = self.bufs[iw].shape
        k = self.bufs[t.outputs[0]].shape[2]
        q = _rope_front(self.read(iq).reshape(nt, heads, -1), self.read(cos), self.read(sin))
        w = self.read(iw).astype(jnp.float32) * self.consts[C_INDEX_WSCALE]
        visible = int(self.pos.max()) + 1
        size = math.ceil(math.ceil(visible / n_chunks) / align) * align
        r0, r1 = chunk * size, min(visible, (chunk + 1) * size)
        vals, idx = jnp.full((nt, k), -jnp.inf), jnp.zeros((nt, k), jnp.int32)
        if r1 > r0:
            scores = ref.indexer_scores(q[None], w[None], self.read(keys)[None, r0:r1],
                                        jnp.asarray(self.pos - r0)[None], self.consts[C_INDEX_SCALE])[0]
            top, arg = jax.lax.top_k(scores, min(k, r1 - r0))
            vals, idx = vals.at[:, :top.shape[1]].set(top), idx.at[:, :top.shape[1]].set(arg + r0)
        self.write(t, vals, idx)

    def _index_topk(self, t):
        self.write(t, *topk_reference(*(self.read(b) for b in t.inputs), t.args[0], t.args[1], t.args[2]))

    def _head_dims(self, kv_b, heads, v_dim=None, nope=None):
        """(nope, v) head dims from kv_b [C, N (H_n + H_v)] and one of them."""
        both = self.weights[kv_b].shape[1] // heads
        return (both - v_dim, v_dim) if v_dim is not None else (nope, both - nope)

    def _absorb(self, t):
        (kv_b,), (qb, cos, sin), (_, q_pe), head = t.weights, t.inputs, t.outputs, t.args[0]
        _, heads, r = self.bufs[q_pe].shape
        qbv = self.read(qb)
        nope = qbv.shape[1] // heads - r
        _, hv = self._head_dims(kv_b, heads, nope=nope)
        q = qbv[:, head * (nope + r):(head + 1) * (nope + r)]
        w_uk = self.weights[kv_b][:, head * (nope + hv):head * (nope + hv) + nope]  # [C, H_n]
        self.write(t, ref.gemv(q[:, :nope], w_uk.T), apply_rope(q[:, nope:], self.read(cos), self.read(sin)))

    def _attn(self, t):
        q_lat, q_pe, c_kv, k_pe, idx, valid = (self.read(b) for b in t.inputs)
        h0, nh, split, n_splits = t.args[:4]
        size = math.ceil(idx.shape[1] / n_splits)
        heads, slots = slice(h0, h0 + nh), slice(split * size, (split + 1) * size)
        q_lat, q_pe, idx, valid = q_lat[:, heads], q_pe[:, heads], idx[:, slots], valid[:, slots].astype(bool)
        out = ref.sparse_mla_attention(q_lat[None], q_pe[None], c_kv[None], k_pe[None], idx[None], valid[None],
                                       self.consts[C_ATTN_SCALE])[0]  # [T, nh, C], normalised over the split
        # The split's log-sum-exp, for the merge in the W_uv tasks (the logits as in `ref.sparse_mla_attention`).
        logits = (jnp.einsum("tnc,tkc->tnk", q_lat, c_kv[idx]) + jnp.einsum("tnr,tkr->tnk", q_pe, k_pe[idx]))
        logits = jnp.where(valid[:, None, :], logits * self.consts[C_ATTN_SCALE], -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [T, nh]
        self.write(t, jnp.where(jnp.isfinite(lse)[..., None], out, 0.0), lse)

    def _uv(self, t):
        (kv_b,), (o_part, lse_part), (v,), head = t.weights, t.inputs, t.outputs, t.args[0]
        heads, hv = self.bufs[v].shape[1:]
        nope, _ = self._head_dims(kv_b, heads, v_dim=hv)
        lse = self.read(lse_part)[:, :, head]  # [splits, T]
        o = jnp.einsum("st,stc->tc", jnp.exp(lse - jax.nn.logsumexp(lse, axis=0)), self.read(o_part)[:, :, head])
        w_uv = self.weights[kv_b][:, head * (nope + hv) + nope:(head + 1) * (nope + hv)]  # [C, H_v]
        self.write(t, ref.gemv(o.astype(self.dtype(v)), w_uv))

    def _router_select(self, t):
        top_k, n_group, topk_group, norm = t.args[:4]
        ids, weights = _route(self.read(t.inputs[0]), self.weights[t.weights[0]], top_k, n_group, topk_group,
                              norm, self.consts[C_ROUTED_SCALE])
        u = self.bufs[t.outputs[0]].shape[0]
        uniq = jnp.unique(ids.reshape(-1), size=u, fill_value=-1)  # the slots of `ref.moe_experts`
        coef = jnp.einsum("tk,tku->ut", weights, (ids[:, :, None] == uniq[None, None, :]).astype(jnp.float32))
        self.write(t, uniq, coef)

    def _expert(self, w, slot_expert, slot):
        """Weight w, or its expert slot_expert[slot] when slot >= 0 (None for an unused slot)."""
        if slot < 0:
            return self.weights[w]
        e = int(self.read(slot_expert)[slot])
        return None if e < 0 else self.weights[w][e]

    def _swiglu_up(self, t):
        (wg, wu, nw), (x, slots), (c0, n, slot, eps) = t.weights, t.inputs, t.args[:4]
        g_w, u_w = self._expert(wg, slots, slot), self._expert(wu, slots, slot)
        nt = self.bufs[x].shape[0]
        if g_w is None:
            return self.write(t, jnp.zeros((nt, n)))
        xn = ref.rmsnorm(self.read(x), self.weights[nw], self.consts[eps]).astype(jnp.float32)
        g, u = (ref.gemv(xn, w[:, c0:c0 + n].astype(jnp.float32)) for w in (g_w, u_w))
        self.write(t, (jax.nn.silu(g) * u).astype(self.dtype(t.outputs[0])))

    def _swiglu_down(self, t):
        (wd,), (act, res, slot_expert, coef), (c0, n, slot, out_slot) = t.weights, t.inputs, t.args[:4]
        w = self._expert(wd, slot_expert, slot)
        a = self.read(act, slot if slot >= 0 else ...)
        if w is None:
            return self.write(t, jnp.zeros((a.shape[1], n)))
        y = ref.gemv((a[slot] if slot >= 0 else a).astype(jnp.float32), w[:, c0:c0 + n].astype(jnp.float32))
        if slot >= 0:
            y = y * self.read(coef)[slot][:, None]
        elif out_slot >= 0:  # shared expert: `ref.swiglu` rounds to the activation dtype before the sum
            y = y.astype(a.dtype).astype(jnp.float32)
        else:
            y = self.read(res)[:, c0:c0 + n] + y.astype(a.dtype)
        self.write(t, y)

    def _moe_combine(self, t):
        (part, h_mid), (c0, n) = t.inputs, t.args[:2]
        total = sum_parts(self.read(part)[:, :, c0:c0 + n]).astype(self.dtype(t.outputs[0]))
        self.write(t, total if h_mid < 0 else self.read(h_mid)[:, c0:c0 + n] + total)


def simulate_step(schedule: Schedule, model, caches: list, tokens, pos, seed: int = 0) -> SimResult:
    """One decode step of `model` by the schedule, in a random SM interleaving.

    caches: `LayerCache` per layer with batch 1 (`glm_fast.engine.cache.new_state(...).layers`); tokens, pos:
    int [T]. Returns logits [T, V], the updated caches and the execution order.
    """
    machine = _Machine(schedule, model, caches, tokens, pos)
    order = run_counters(schedule, seed, machine.run)
    out = []
    for layer, cache in enumerate(caches):
        fields = {f: machine.bufs[i][None] for i, b in enumerate(schedule.buffers)
                  if b.kind == Kind.CACHE and b.name.startswith(f"layers/{layer}/")
                  for f in [b.name.split("/")[-1]]}
        out.append(LayerCache(**{f: jnp.asarray(fields[f]) if f in fields else getattr(cache, f)
                                 for f in ("c_kv", "k_pe", "index_k")}))
    logits = next(i for i, b in enumerate(schedule.buffers) if b.kind == Kind.OUTPUT)
    return SimResult(machine.read(logits), out, order, machine.bufs)
