"""The decode engine: prefill, decode steps and MTP self-speculative decoding over the latent cache.

    engine = Engine(model, backend="xla", max_len=2048)
    out = engine.generate(prompt_ids, max_new_tokens=64, speculative_depth=2)
    out.tokens, out.stats

A step with depth D verifies the pending token plus D drafts in one main-model pass (T = 1 + D), accepts the
longest prefix the main model agrees with (greedy) or applies the speculative-sampling rule (temperature > 0),
rolls the caches back past the accepted point, and lets the MTP modules draft the next D tokens. D = 0 is
plain decoding. All of it runs in one jitted function per step; the host only reads the emitted tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_fast.engine import sampling
from glm_fast.engine.cache import DecodeState, new_state
from glm_fast.engine.forward import main_cached, mtp_cached
from glm_fast.engine.ops import get_ops
from glm_fast.model import Model


class GenerationError(ValueError):
    """A request the engine cannot serve (prompt too long, bad token ids, depth beyond the MTP heads)."""


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache (default `~/.cache/glm_fast/jax`, or $GLM_FAST_CACHE_DIR)
    so a warm start skips XLA compilation."""
    path = pathlib.Path(path or os.environ.get("GLM_FAST_CACHE_DIR") or
                        pathlib.Path.home() / ".cache" / "glm_fast" / "jax").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@dataclasses.dataclass
class GenerateResult:
    """`tokens`: the new tokens (a list, or a list per sequence for a batch); `stats`: timings and acceptance;
    `state`: the final `DecodeState` (caches and buffers), for inspection."""

    tokens: list
    stats: dict
    state: DecodeState | None = None


@dataclasses.dataclass(frozen=True)
class _Mode:
    """Static settings of one compiled step function."""

    depth: int
    greedy: bool
    temperature: float
    top_p: float


class Engine:
    """Batch >= 1 generation with a latent KV cache; `backend` names the op table ("xla", ...).
    persistent_options: the `ScheduleOptions` of backend="persistent"'s kernel at every step width (None: its
    decoder picks one layout that fits the widest step, `PersistentDecoder.plan`)."""

    def __init__(self, model: Model, backend: str = "xla", max_len: int | None = None, prefill_chunk: int = 256,
                 compilation_cache: str | os.PathLike | None | bool = None, persistent_options=None):
        self.cfg = model.cfg
        self.ops = get_ops(backend)
        self.backend = backend
        self.max_len = int(max_len or min(self.cfg.max_position_embeddings, 4096))
        if self.max_len > self.cfg.max_position_embeddings:
            raise GenerationError(f"max_len={self.max_len} > model max_position_embeddings="
                                  f"{self.cfg.max_position_embeddings}: lower max_len")
        self.prefill_chunk = min(prefill_chunk, self.max_len)
        if compilation_cache is not False:
            enable_compilation_cache(compilation_cache or None)
        self.graphdef, self.params = nnx.split(model)
        self.dtype = model.dtype
        self._jitted: dict = {}
        self._persistent = None
        if backend == "persistent":  # decode / verification steps in one kernel launch; prefill and MTP on XLA
            from pallas_kernels.persistent.kernel import PersistentDecoder
            self._persistent = PersistentDecoder(model, persistent_options)
            self.params = (self.params, self._persistent.weights(1))

    # ---- compiled pieces ---------------------------------------------------------------------------------
    def _fn(self, name: str, mode: _Mode, chunk: int = 0) -> Callable:
        key = (name, mode, chunk)
        if key not in self._jitted:
            impl = {"prefill": self._prefill_impl, "mtp_prefill": self._mtp_prefill_impl,
                    "step": self._step_impl}[name]
            self._jitted[key] = self._compile(key, functools.partial(impl, mode=mode, chunk=chunk))
        return self._jitted[key]

    # ---- hooks a multi-device engine replaces (`glm_fast.parallel.RolesEngine`) -------------------------
    def _compile(self, key, impl: Callable) -> Callable:
        """impl(params, state, ...) -> its compiled form; the state (argument 1) is donated."""
        del key
        return jax.jit(impl, donate_argnums=(1,))

    def _new_state(self, batch: int, depth: int) -> DecodeState:
        return new_state(self.cfg, batch, self.max_len, depth, self.dtype)

    def _main(self, model: Model, caches: list, tokens, pos, ok):
        return main_cached(model, caches, tokens, pos, ok, self.ops)

    def _mtp(self, model: Model, depth: int, cache, h_prev, ahead, pos, ok):
        return mtp_cached(model, depth, cache, h_prev, ahead, pos, ok, self.ops)

    def _model(self, params) -> Model:
        return nnx.merge(self.graphdef, params[0] if self._persistent is not None else params)

    def _main_step(self, params, model: Model, caches: list, tokens, pos, ok):
        """The main-model pass of a decode / verification step (`_main`, or the persistent kernel)."""
        if self._persistent is not None:
            return self._persistent(model, params[1], caches, tokens, pos, ok)
        return self._main(model, caches, tokens, pos, ok)

    def _pick(self, logits, key, mode: _Mode):
        """Next token and its distribution from logits [B, V]."""
        if mode.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32), None
        probs = sampling.filtered_probs(logits, mode.temperature, mode.top_p)
        return sampling.sample(key, probs), probs

    def _prefill_impl(self, params, state: DecodeState, start, lengths, last_logits, *, mode: _Mode, chunk: int):
        """Prompt rows [start, start + chunk): cache writes, h^0 rows for MTP, logits of each last prompt row."""
        model = self._model(params)
        b = lengths.shape[0]
        pos = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        ok = pos < lengths[:, None]
        tokens = jax.lax.dynamic_slice_in_dim(state.tokens, start, chunk, axis=1)
        logits, h, layers = self._main(model, state.layers, tokens, pos, ok)
        state = state.replace(layers=layers)
        if mode.depth:
            state = state.replace(hidden=_write_rows(state.hidden, 0, pos, ok, h))
        is_last = pos == (lengths - 1)[:, None]  # [B, chunk]
        here = jnp.einsum("bt,btv->bv", is_last.astype(jnp.float32), logits.astype(jnp.float32))
        return state, jnp.where(is_last.any(-1, keepdims=True), here, last_logits)

    def _draft(self, model: Model, state: DecodeState, pos, ok, key, mode: _Mode):
        """MTP depths 1..D over rows pos [B, W]; the drafts come from each sequence's row pending - 1."""
        b = pos.shape[0]
        bi = jnp.arange(b)
        row_last = (pos == (state.pending - 1)[:, None]).astype(jnp.float32)  # [B, W] one-hot of the draft row
        mtp, hidden, tokens, probs = list(state.mtp), state.hidden, state.tokens, state.draft_probs
        keys = jax.random.split(key, mode.depth)
        for k in range(1, mode.depth + 1):
            h_prev = hidden[k - 1][bi[:, None], jnp.clip(pos, 0)]
            ahead = tokens[bi[:, None], jnp.clip(pos + k, 0)]
            logits, h, mtp[k - 1] = self._mtp(model, k, mtp[k - 1], h_prev, ahead, pos, ok)
            if k < mode.depth:
                hidden = _write_rows(hidden, k, pos, ok, h)
            draft, q = self._pick(jnp.einsum("bw,bwv->bv", row_last, logits.astype(jnp.float32)), keys[k - 1], mode)
            has_row = row_last.any(-1)
            tokens = tokens.at[bi, jnp.where(has_row, state.pending + k, tokens.shape[1])].set(draft, mode="drop")
            if q is not None:
                probs = probs.at[:, k - 1].set(jnp.where(has_row[:, None], q, probs[:, k - 1]))
        return state.replace(mtp=mtp, hidden=hidden, tokens=tokens, draft_probs=probs)

    def _mtp_prefill_impl(self, params, state: DecodeState, start, key, *, mode: _Mode, chunk: int):
        """MTP caches over prompt rows [start, start + chunk); drafts the first D tokens from the last row."""
        b = state.pending.shape[0]
        pos = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        return self._draft(self._model(params), state, pos, pos < state.pending[:, None], key, mode)

    def _step_impl(self, params, state: DecodeState, key, *, mode: _Mode, chunk: int):
        """Verify pending + D drafts, accept, roll back, draft again -> (state, emitted [B, D+1] (-1 pad), n [B])."""
        del chunk
        model = self._model(params)
        d, b = mode.depth, state.pending.shape[0]
        bi = jnp.arange(b)
        pos = state.pending[:, None] + jnp.arange(d + 1, dtype=jnp.int32)[None]           # [B, 1+D]
        ok = pos < self.max_len
        tokens = state.tokens[bi[:, None], pos]
        k_accept, k_draft = jax.random.split(key)
        logits, h, layers = self._main_step(params, model, state.layers, tokens, pos, ok)
        if mode.greedy:
            target = jnp.argmax(logits, -1).astype(jnp.int32)                               # [B, 1+D]
            n = sampling.accept_greedy(tokens[:, 1:], target)
            nxt = target[bi, n]
        elif d:
            target_probs = sampling.filtered_probs(logits, mode.temperature, mode.top_p)
            n, nxt = sampling.accept_sampled(k_accept, tokens[:, 1:], state.draft_probs, target_probs)
        else:
            n = jnp.zeros((b,), jnp.int32)
            nxt, _ = self._pick(logits[:, 0], k_accept, mode)
        j = jnp.arange(d + 1)[None]
        drafts = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        emitted = jnp.where(j < n[:, None], drafts, jnp.where(j == n[:, None], nxt[:, None], -1))
        pending = state.pending + n + 1
        if d:  # rejected draft rows leave no trace (at D = 0 the step wrote only row pos, now accepted)
            layers = [c.clear_from(pending, d + 1) for c in layers]
        state = state.replace(layers=layers, pending=pending,
                              tokens=state.tokens.at[bi, pending].set(nxt))
        if d:
            state = state.replace(hidden=_write_rows(state.hidden, 0, pos, ok, h))
            window = pending[:, None] - 2 * d + jnp.arange(2 * d, dtype=jnp.int32)[None]  # rows redone: <= 2D
            state = self._draft(model, state, window, window >= 0, k_draft, mode)
        return state, emitted, n

    # ---- the public entry point ----------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, speculative_depth: int = 0, seed: int = 0,
                 stop_tokens: Sequence[int] = (), callback: Callable[[int, list[int]], None] | None = None
                 ) -> GenerateResult:
        """Generates up to `max_new_tokens` per prompt (a list of ids, or a list of such lists for a batch).

        `callback(sequence_index, new_tokens)` streams tokens as steps produce them. Generation of a sequence
        ends at a stop token (kept in the output) or at `max_new_tokens`.
        """
        batched = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (int, np.integer))
        prompts = [list(map(int, p)) for p in (prompt_ids if batched else [prompt_ids])]
        mode = self._check(prompts, max_new_tokens, temperature, top_p, speculative_depth)
        b, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
        state = self._new_state(b, mode.depth)
        padded = np.zeros((b, state.tokens.shape[1]), np.int32)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        state = state.replace(tokens=jnp.asarray(padded))
        key = jax.random.key(seed)

        t0 = time.perf_counter()
        chunk = self.prefill_chunk
        last = jnp.zeros((b, self.cfg.vocab_size), jnp.float32)
        starts = range(0, int(lengths.max()), chunk)
        for start in starts:
            state, last = self._fn("prefill", mode, chunk)(self.params, state, jnp.int32(start),
                                                            jnp.asarray(lengths), last)
        key, k_first, k_draft = jax.random.split(key, 3)
        first, _ = self._pick(last, k_first, mode)
        state = state.replace(pending=jnp.asarray(lengths), tokens=state.tokens.at[jnp.arange(b), lengths].set(first))
        for start in starts if mode.depth else ():
            k_draft, sub = jax.random.split(k_draft)
            state = self._fn("mtp_prefill", mode, chunk)(self.params, state, jnp.int32(start), sub)
        first = np.asarray(first)
        ttft = time.perf_counter() - t0

        outputs = [[int(t)] for t in first]
        done = [len(o) >= max_new_tokens or o[-1] in stop_tokens for o in outputs]
        if callback:
            for i, o in enumerate(outputs):
                callback(i, list(o))
        steps, emitted_total, step_times = 0, 0, []
        active_rows, accepted_sum, depth_hits = 0, 0, np.zeros(mode.depth, np.int64)
        key, k_compile = jax.random.split(key)
        tc = time.perf_counter()
        step = self._fn("step", mode).lower(self.params, state, k_compile).compile()  # compile outside the timing
        compile_s = time.perf_counter() - tc
        while not all(done):
            key, sub = jax.random.split(key)
            ts = time.perf_counter()
            state, emitted, n = step(self.params, state, sub)
            emitted, n = np.asarray(emitted), np.asarray(n)
            step_times.append(time.perf_counter() - ts)
            steps += 1
            for i in range(b):
                if done[i]:
                    continue
                active_rows += 1
                accepted_sum += int(n[i]) + 1
                depth_hits += n[i] >= np.arange(1, mode.depth + 1)
                new = [int(t) for t in emitted[i] if t >= 0]
                stop = next((j for j, t in enumerate(new) if t in stop_tokens), None)
                new = new[: (len(new) if stop is None else stop + 1)][: max_new_tokens - len(outputs[i])]
                outputs[i] += new
                emitted_total += len(new)
                done[i] = stop is not None or len(outputs[i]) >= max_new_tokens
                if callback and new:
                    callback(i, new)
        decode_s = sum(step_times)
        rows = max(active_rows, 1)
        stats = {
            "backend": self.backend, "batch": b, "prompt_tokens": int(lengths.sum()),
            "new_tokens": sum(len(o) for o in outputs), "speculative_depth": mode.depth,
            "prefill_s": ttft, "time_to_first_token_s": ttft, "step_compile_s": compile_s, "decode_steps": steps,
            "ms_per_step": 1e3 * decode_s / max(steps, 1),
            "tokens_per_s": emitted_total / decode_s if decode_s > 0 else float("nan"),
            # tokens a sequence gains per verification step (1 + accepted drafts), before max_new_tokens cuts
            "accepted_per_step": accepted_sum / rows if active_rows else float("nan"),
            # P(draft k accepted) per step: k = 1..D
            "acceptance_by_depth": (depth_hits / rows).tolist(),
        }
        return GenerateResult(outputs if batched else outputs[0], stats, state)

    def _check(self, prompts, max_new_tokens, temperature, top_p, depth) -> _Mode:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("empty prompt: give at least one token id")
        if self._persistent is not None and len(prompts) > 1:
            raise GenerationError(f"backend 'persistent' decodes one sequence; got a batch of {len(prompts)}")
        vocab = self.cfg.vocab_size
        bad = [t for p in prompts for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if depth < 0 or depth > self.cfg.mtp_depth:
            raise GenerationError(f"speculative_depth={depth}: this model has {self.cfg.mtp_depth} MTP depths "
                                  f"(0 turns speculation off)")
        need = max(map(len, prompts)) + max_new_tokens + depth + 1
        if need > self.max_len:
            raise GenerationError(
                f"prompt of {max(map(len, prompts))} tokens + max_new_tokens={max_new_tokens} (+{depth + 1} "
                f"speculative rows) needs {need} positions > the context max_len={self.max_len}: shorten the "
                "prompt, lower max_new_tokens, or raise max_len")
        if temperature < 0 or not 0 < top_p <= 1:
            raise GenerationError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        return _Mode(depth, temperature == 0, float(temperature), float(top_p))


def _write_rows(hidden, index: int, pos, ok, rows):
    """hidden[index][b, pos[b, t]] = rows[b, t] where ok (others dropped)."""
    bi = jnp.arange(pos.shape[0])[:, None]
    where = jnp.where(ok, pos, hidden.shape[2])
    return hidden.at[index, bi, where].set(rows.astype(hidden.dtype), mode="drop")
