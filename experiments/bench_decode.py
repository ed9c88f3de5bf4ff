"""Decode-step benchmark: ms/step and tokens/s per backend, batch, context length and MTP depth, against the
HBM roofline measured in the same run, with HF transformers peers side by side.

    python experiments/bench_decode.py --config glm5_slice --contexts 4096,32768 --batches 1,2,4,8 \
        --mtp-depths 0,3 --hf-peers eager,compile

Method. Weights are random (bf16 as the config says). The caches are filled with random latent/index rows up to
the context length (a synthetic context: a decode step's cost does not depend on the cached values), then the
engine's jitted step runs back to back (`steps` times after `warmup`; one device sync at the end) — this is
`ms_per_step`; `ms_per_step_host_loop` adds the per-step host read that `Engine.generate` does.
A `--backends` entry `persistent:fp8` runs the persistent kernel with FP8 routed experts (e4m3 + 128 x 128 block
scales, `ScheduleOptions.expert_format`); its row's `expert_format` says so and its bytes count the routed experts
at one byte per weight plus scales (a different model function: compare its time, not its logits, with bf16 rows).
roofline_fraction = (bytes_per_step / hbm_bytes_per_s) / time, with bytes from `glm_fast.accounting` and the
HBM rate measured here (the best of an XLA read-only sum, an XLA read+write copy and a torch device copy,
over 4 GiB each). MTP verification
steps (D > 0) on random weights accept nothing, so their effective tokens/s is also projected with an assumed
acceptance (`--assume-accepted`, default GLM-5's reported 2.76 tokens/step), stated as such in each row.
Cold/warm time to first token: `glm-fast generate`-style runs in fresh subprocesses sharing an empty
compilation cache and an empty persistent-kernel cache (first = cold, second = warm); the timed persistent
engine then reuses the step the cold child lowered (`cold_warm`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

from glm_fast import Engine, Model, accounting, device_trace, load_config, results
from glm_fast.engine.cache import new_state
from glm_fast.engine.engine import _Mode


def measure_hbm(gib: float = 4.0) -> dict:
    """HBM bandwidth: XLA read-only reduction, XLA read+write copy, torch device copy (bytes / median time)."""
    n = int(gib * 2**30) // 4
    x = jnp.ones((n,), jnp.float32) * 1.5
    read = jax.jit(lambda a: jnp.sum(a))
    copy = jax.jit(lambda a: a * 1.0001)
    out = {}
    for name, fn, nbytes in (("xla_sum_read", read, 4 * n), ("xla_copy_rw", copy, 8 * n)):
        fn(x).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            fn(x).block_until_ready()
            times.append(time.perf_counter() - t)
        out[f"{name}_tb_s"] = nbytes / float(np.median(times)) / 1e12
    try:  # the DESIGN.md reference figure: a torch device copy, read + write
        import torch
        if torch.cuda.is_available():
            a = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                t = time.perf_counter()
                b.copy_(a)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            out["torch_copy_rw_tb_s"] = 8 * n / float(np.median(times)) / 1e12
            del a, b
    except ImportError:
        pass
    out["hbm_tb_s"] = max(out.values())  # the best rate seen is the ceiling (the strictest roofline)
    return out


def synthetic_state(cfg, batch: int, context: int, max_len: int, depth: int, dtype, key):
    """A decode state whose caches hold `context` random rows per sequence (pending token at `context`)."""
    state = new_state(cfg, batch, max_len, depth, dtype)

    def fill(arr, k):
        if arr is None:
            return None
        valid = (jnp.arange(arr.shape[1]) < context)[None, :, None]  # cache rows are padded past max_len
        return jnp.where(valid, jax.random.normal(k, arr.shape, jnp.float32).astype(arr.dtype), 0)

    keys = iter(jax.random.split(key, 3 * (len(state.layers) + len(state.mtp)) + 2))
    layers = [c.replace(c_kv=fill(c.c_kv, next(keys)), k_pe=fill(c.k_pe, next(keys)),
                        index_k=fill(c.index_k, next(keys))) for c in state.layers]
    mtp = [c.replace(c_kv=fill(c.c_kv, next(keys)), k_pe=fill(c.k_pe, next(keys)),
                     index_k=fill(c.index_k, next(keys))) for c in state.mtp]
    tokens = jax.random.randint(next(keys), state.tokens.shape, 0, cfg.vocab_size, jnp.int32)
    return state.replace(layers=layers, mtp=mtp, tokens=tokens, pending=jnp.full((batch,), context, jnp.int32))


def time_step(engine: Engine, state, depth: int, steps: int, warmup: int, host_loop: bool = False,
              trace_steps: int = 0, trace_dir: str | None = None) -> dict:
    """Back-to-back ms per decode step of `engine` from `state` (donated), its compile time and the accepted
    tokens per step; with `host_loop`, also the per-step host read that `Engine.generate` does; with
    `trace_steps`, a `jax.profiler` trace of that many more back-to-back steps reduced to the device's kernels,
    busy time and gaps per step (`glm_fast.device_trace`), the trace kept under `trace_dir` if given."""
    step = engine._fn("step", _Mode(depth, True, 0.0, 1.0))
    key = jax.random.key(0)
    tc = time.perf_counter()
    compiled = step.lower(engine.params, state, key).compile()
    compile_s = time.perf_counter() - tc
    for _ in range(warmup):
        state, emitted, n = compiled(engine.params, state, key)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
        state, emitted, n = compiled(engine.params, state, key)
    jax.block_until_ready((state, emitted))
    out = {"ms_per_step": 1e3 * (time.perf_counter() - t) / steps, "step_compile_s": compile_s,
           "measured_accepted_per_step": 1 + float(np.mean(np.asarray(n)))}
    if host_loop:
        t = time.perf_counter()
        accepted = []
        for _ in range(steps):
            state, emitted, n = compiled(engine.params, state, key)
            accepted.append(np.asarray(n))  # the host read Engine.generate does every step
        out["ms_per_step_host_loop"] = 1e3 * (time.perf_counter() - t) / steps
        out["measured_accepted_per_step"] = 1 + float(np.mean(accepted))
    if trace_steps:
        def one():
            nonlocal state
            state, emitted, _ = compiled(engine.params, state, key)
            return emitted
        with tempfile.TemporaryDirectory(prefix="glm_fast_trace_") as tmp:
            path = device_trace.capture(one, trace_steps, trace_dir or tmp)
            out["device_trace"] = device_trace.breakdown(path, trace_steps)
            if trace_dir:
                out["device_trace"]["path"] = path
    return out


def bench_engine(engine: Engine, batch: int, context: int, depth: int, steps: int, warmup: int,
                 trace_steps: int = 0, trace_dir: str | None = None) -> dict:
    state = synthetic_state(engine.cfg, batch, context, engine.max_len, depth, engine.dtype, jax.random.key(1))
    return time_step(engine, state, depth, steps, warmup, host_loop=True, trace_steps=trace_steps,
                     trace_dir=trace_dir)


def hf_peer(cfg, kind: str, context: int, steps: int, warmup: int) -> dict:
    """HF `GlmMoeDsaForCausalLM` (same config, HF's random init, bf16) decoding one token per step with its cache."""
    import torch
    from transformers import GlmMoeDsaForCausalLM

    from glm_fast.convert import hf_config

    hc = hf_config(cfg)
    decode_experts = "batched_mm" if kind == "eager" else "grouped_mm"
    hc._experts_implementation = "eager"  # prefill: batched_mm would gather every token's experts at once
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GlmMoeDsaForCausalLM(hc).to(torch.bfloat16).eval()
    fwd = model
    compile_s = 0.0
    if kind == "compile":
        fwd = torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=True)
    ids = torch.randint(0, cfg.model.vocab_size, (1, context), device="cuda")
    with torch.no_grad():
        t = time.perf_counter()
        out = fwd(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        past = out.past_key_values
        model.config._experts_implementation = decode_experts  # read at every forward
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            ts = time.perf_counter()
            out = fwd(input_ids=nxt, past_key_values=past, use_cache=True)
            nxt, past = out.logits[:, -1:].argmax(-1), out.past_key_values
            torch.cuda.synchronize()
            if i == 0:
                compile_s = time.perf_counter() - t
            if i >= warmup:
                times.append(time.perf_counter() - ts)
    del model, fwd, past, out
    torch.cuda.empty_cache()
    return {"ms_per_step": 1e3 * float(np.median(times)), "warmup_and_compile_s": compile_s}


def _contexts(args) -> list[int]:
    return [int(c) for c in args.contexts.split(",")]


def _max_len(args, context: int) -> int:
    """Cache rows of the benchmark's engines at `context`. The TTFT children use the first context's, so the
    persistent kernel's lowered step that the cold child exports (pallas_kernels/persistent/aot.py) is the one
    the timed engine loads: one kernel lowering per run instead of two."""
    return context + args.warmup + 2 * args.steps * 4 + 16


def _backend(spec: str) -> tuple[str, str]:
    """A `--backends` entry as (Engine backend, routed experts' format): `persistent:fp8` is the persistent kernel
    with FP8 routed experts; every other entry is bf16."""
    name, _, fmt = spec.partition(":")
    if fmt not in ("", "bf16", "fp8") or (fmt == "fp8" and name != "persistent"):
        raise SystemExit(f"--backends entry {spec!r}: only the persistent backend takes a format (persistent:fp8)")
    return name, fmt or "bf16"


def _persistent_options(args, cfg, expert_format: str = "bf16"):
    """`--persistent-attn HxS` and the experts' format as the persistent kernel's ScheduleOptions (None: the
    decoder's pick; fp8 without HxS: the decoder's pick among FP8 candidates, `kernel.default_options`)."""
    from pallas_kernels.persistent.schedule import ScheduleOptions
    if not args.persistent_attn:
        if expert_format == "bf16":
            return None
        from pallas_kernels.persistent.kernel import default_options
        from pallas_kernels.persistent.tiles import TileConfig
        return default_options(cfg.model, jax.default_backend() != "gpu", TileConfig(), expert_format=expert_format)
    try:
        heads, splits = (int(v) for v in args.persistent_attn.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--persistent-attn {args.persistent_attn!r}: give HEADSxSPLITS, e.g. 64x32") from None
    return ScheduleOptions(attn_heads=heads, attn_splits=splits, expert_format=expert_format)


def _step_bytes(cfg, context: int, tokens: int, batch: int, expert_format: str) -> int:
    """The roofline's bytes of one step (`accounting`): with FP8 routed experts (the persistent kernel's shared
    experts stay bf16), those at one byte per weight plus their block scales."""
    dtype = cfg.model.dtype
    terms = accounting.decode_step_breakdown(cfg, context, dtype, tokens=tokens, batch=batch)
    if expert_format == "bf16":
        return terms["total"]
    fp8 = accounting.decode_step_breakdown(cfg, context, dtype, tokens=tokens, batch=batch,
                                           expert_dtype="float8_e4m3fn")
    return terms["total"] - terms["routed_experts"] + fp8["routed_experts"]


def ttft_child(args) -> None:
    """Child process: build the model, generate 1 token from a short prompt, print TTFT as JSON."""
    t0 = time.perf_counter()
    cfg = load_config(args.config, overrides=args.set)
    from flax import nnx
    model = Model(cfg.model, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    built = time.perf_counter() - t0
    backend, fmt = _backend(args.backends.split(",")[0])
    engine = Engine(model, backend=backend, max_len=_max_len(args, _contexts(args)[0]),
                    compilation_cache=args.ttft_cache, persistent_options=_persistent_options(args, cfg, fmt))
    out = engine.generate(list(range(1, 33)), 2)
    print(json.dumps({"ttft_s": out.stats["time_to_first_token_s"], "model_init_s": built,
                      "process_to_first_token_s": time.perf_counter() - t0 + 0.0}))


def cold_warm(args) -> dict:
    """TTFT of a cold and then a warm child process, which share two empty directories: JAX's compilation cache
    and the persistent kernel's schedules + exported step ($GLM_FAST_SCHEDULE_DIR). This process then points
    $GLM_FAST_SCHEDULE_DIR at the latter too, so its timed persistent engine loads the step the cold child lowered."""
    cache = tempfile.mkdtemp(prefix="glm_fast_cc_")
    sched = tempfile.mkdtemp(prefix="glm_fast_sched_")
    out = {}
    for name in ("cold", "warm"):
        cmd = [sys.executable, __file__, "--ttft-child", "--ttft-cache", cache, "--config", args.config,
               "--backends", args.backends, "--contexts", args.contexts, "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + sum((["--set", s] for s in args.set), []) + (
                   ["--persistent-attn", args.persistent_attn] if args.persistent_attn else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "GLM_FAST_SCHEDULE_DIR": sched})
        wall = time.perf_counter() - t
        if proc.returncode:
            out[name] = {"error": proc.stderr[-2000:]}
            continue
        out[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": wall}
    os.environ["GLM_FAST_SCHEDULE_DIR"] = sched
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="glm5_slice")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--backends", default="xla",
                   help="comma list of: xla, pallas, persistent, persistent:fp8 (FP8 routed experts)")
    p.add_argument("--contexts", default="4096")
    p.add_argument("--batches", default="1")
    p.add_argument("--mtp-depths", default="0")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--hf-peers", default="", help="comma list of: eager, compile (GPU only)")
    p.add_argument("--hf-context", type=int, default=128)
    p.add_argument("--assume-accepted", type=float, default=2.76)
    p.add_argument("--persistent-attn", default=None, metavar="HEADSxSPLITS",
                   help="the persistent kernel's attention layout at every step width, e.g. 64x32 (plain decoding's "
                        "fastest at glm5_slice; too large for T = 4's SMEM). Default: the decoder's lossless pick")
    p.add_argument("--cold-warm", action="store_true", help="measure cold/warm time to first token")
    p.add_argument("--trace-steps", type=int, default=0,
                   help="also trace this many steps per row: device kernels, busy time and gaps per step")
    p.add_argument("--trace-dir", default=None, help="keep the --trace-steps traces here (default: deleted)")
    p.add_argument("--hbm-gib", type=float, default=4.0)
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    p.add_argument("--name", default=None)
    p.add_argument("--ttft-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ttft-cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ttft_child:
        return ttft_child(args)

    cfg = load_config(args.config, overrides=args.set)
    contexts = _contexts(args)
    batches = [int(b) for b in args.batches.split(",")]
    depths = [int(d) for d in args.mtp_depths.split(",")]
    # before this process takes GPU memory, so the child processes can
    extra = {"cold_warm_start": cold_warm(args)} if args.cold_warm else {}
    ceilings = measure_hbm(args.hbm_gib)
    bw = ceilings["hbm_tb_s"] * 1e12
    dtype = cfg.model.dtype
    hf_rows = []  # torch peers first: torch returns its memory before JAX takes the GPU
    for kind in [k for k in args.hf_peers.split(",") if k]:
        r = hf_peer(cfg, kind, args.hf_context, max(args.steps // 2, 10), 3)
        nbytes = accounting.bytes_per_decode_step(cfg, args.hf_context, dtype)
        row = {"backend": f"hf_{kind}", "layout": "single", "batch": 1, "context_len": args.hf_context,
               "mtp_depth": 0, **r, "bytes_per_step": nbytes, "roofline_ms": 1e3 * nbytes / bw,
               "roofline_fraction": (nbytes / bw) / (r["ms_per_step"] / 1e3),
               "tokens_per_s": 1e3 / r["ms_per_step"]}
        hf_rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"HBM ceiling measured: {ceilings}", flush=True)
    from flax import nnx
    t = time.perf_counter()
    model = Model(cfg.model, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    print(f"model built in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for spec in args.backends.split(","):
        backend, fmt = _backend(spec)
        for context in contexts:
            engine = Engine(model, backend=backend, max_len=_max_len(args, context), compilation_cache=False,
                            persistent_options=_persistent_options(args, cfg, fmt))
            for depth in depths:
                for batch in batches:
                    if backend == "persistent" and batch > 1:  # the persistent kernel decodes one sequence
                        print(f"skip: backend persistent at batch {batch}", flush=True)
                        continue
                    where = args.trace_dir and os.path.join(args.trace_dir, f"{backend}_{context}_{depth}_{batch}")
                    r = bench_engine(engine, batch, context, depth, args.steps, args.warmup, args.trace_steps, where)
                    nbytes = _step_bytes(cfg, context, 1 + depth, batch, fmt)
                    row = {"backend": backend, "expert_format": fmt, "layout": "single", "batch": batch,
                           "context_len": context,
                           "mtp_depth": depth, **r, "bytes_per_step": nbytes,
                           "roofline_ms": 1e3 * nbytes / bw,
                           "roofline_fraction": (nbytes / bw) / (r["ms_per_step"] / 1e3),
                           "tokens_per_s": batch * r["measured_accepted_per_step"] / (r["ms_per_step"] / 1e3)}
                    if depth:
                        row["assumed_accepted_per_step"] = args.assume_accepted
                        row["projected_tokens_per_s"] = batch * args.assume_accepted / (r["ms_per_step"] / 1e3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del engine
    rows += hf_rows
    record = results.result("bench_decode", {"name": cfg.name, "overrides": args.set,
                                             "persistent_attn": args.persistent_attn}, rows, ceilings,
                            extra_versions=("torch", "transformers"), cache="synthetic random rows",
                            weights="random", **extra)
    path = results.write(record, args.out, args.name)
    print(f"\n{'backend':>15} {'B':>2} {'ctx':>6} {'D':>2} {'ms/step':>8} {'roof ms':>8} {'roof %':>7} {'tok/s':>8}")
    for r in rows:
        label = r["backend"] + (":fp8" if r.get("expert_format") == "fp8" else "")
        print(f"{label:>15} {r['batch']:>2} {r['context_len']:>6} {r['mtp_depth']:>2} "
              f"{r['ms_per_step']:8.3f} {r['roofline_ms']:8.3f} {100 * r['roofline_fraction']:6.1f}% "
              f"{r['tokens_per_s']:8.1f}")
    if extra:
        print("cold/warm start:", json.dumps(extra["cold_warm_start"]))
    print("wrote", path)


if __name__ == "__main__":
    main()
