"""Role layouts benchmark: decode-step time of each layout (`glm_fast.parallel`) on the local devices, split into
compute, communication and waiting, plus the interconnect's latency and bandwidth measured in the same run.

    python3 experiments/bench_roles.py --config glm5_slice --layouts hetero homogeneous --out roles_h200x2.json

Method. Weights are random, caches hold `context` random rows (`bench_decode.synthetic_state`), and each
layout's jitted step runs back to back (`--steps` after `--warmup`, one sync at the end): `ms_per_step`.
The breakdown comes from variants of the same program:
- compute: the step with every collective replaced by a local no-op (`RolesEngine(comms="none")`); with no
  hand-offs each device runs its own work, so this is the busiest device's compute (wrong results, same work);
- communication: the step's own messages (recorded at trace time: op, bytes), each timed alone by a
  collective micro-benchmark on the same mesh, summed;
- waiting: the rest, ms_per_step - compute - communication (idle time at hand-offs: one role waiting for
  another, plus anything not modelled; negative when communication overlaps compute).
The interconnect sweep (psum and all_gather from 256 B to `--comm-max-mib`) gives the latency (median time
at <= 4 KiB) and the bus bandwidth at the largest size (ring all-reduce moves 2 (n-1)/n of the bytes per
device, all-gather (n-1)/n of the gathered bytes) that `experiments/roles_model.py` is calibrated with.
A single-device `Engine` row (layout "single") is the reference. On one device or a CPU the script still runs
(collectives are then local): that is its smoke test, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_decode import measure_hbm, synthetic_state, time_step  # noqa: E402

from glm_fast import Engine, Model, accounting, load_config, results  # noqa: E402
from glm_fast.engine.engine import _Mode  # noqa: E402
from glm_fast.parallel import RolesEngine  # noqa: E402
from glm_fast.parallel.shard import AXIS, shard_map  # noqa: E402


def time_collective(mesh, op: str, nbytes: int, dtype: str = "float32", reps: int = 20, trials: int = 5) -> float:
    """Seconds per `op` ("psum" | "all_gather") of an `nbytes` per-device payload on `mesh` (chained `reps`
    times inside one program so launch costs are amortised; median over `trials`)."""
    n = mesh.devices.size
    dt = jnp.dtype(dtype)
    elems = max(1, nbytes // dt.itemsize)
    x = jax.device_put(jnp.ones((n, elems), dt), NamedSharding(mesh, P(AXIS)))

    def body(v):
        def one(_, v):
            if op == "psum":
                return lax.psum(v, AXIS) * jnp.asarray(1, dt)
            return lax.all_gather(v, AXIS)[lax.axis_index(AXIS)]
        return lax.fori_loop(0, reps, one, v)

    fn = jax.jit(shard_map(body, mesh, P(AXIS), P(AXIS)))
    fn(x).block_until_ready()
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        fn(x).block_until_ready()
        times.append((time.perf_counter() - t) / reps)
    return float(np.median(times))


def measure_interconnect(mesh, max_mib: float) -> dict:
    """Latency and bus bandwidth of psum and all_gather over the mesh, from a size sweep."""
    n = mesh.devices.size
    sizes = [256 * 4 ** i for i in range(20) if 256 * 4 ** i <= max_mib * 2 ** 20]
    out = {"num_devices": n, "points": []}
    for op in ("psum", "all_gather"):
        pts = [(s, time_collective(mesh, op, s)) for s in sizes]
        out["points"] += [{"op": op, "bytes": s, "us": 1e6 * t} for s, t in pts]
        factor = 2 * (n - 1) / n if op == "psum" else (n - 1)  # bytes each device sends per payload byte
        big, t_big = pts[-1]
        out[f"{op}_latency_us"] = 1e6 * float(np.median([t for s, t in pts if s <= 4096]))
        out[f"{op}_bus_gb_s"] = factor * big / t_big / 1e9 if n > 1 else None
    return out


def comm_time(mesh, messages: list[dict], cache: dict) -> float:
    """Seconds the step's recorded messages take one after another, each timed alone (cached by op/size)."""
    total = 0.0
    for m in messages:
        key = (m["op"], m["bytes"], m["dtype"])
        if key not in cache:
            cache[key] = time_collective(mesh, m["op"], m["bytes"], m["dtype"])
        total += cache[key]
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="glm5_slice")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--layouts", nargs="+", default=["hetero", "homogeneous"])
    p.add_argument("--num-devices", type=int, default=0, help="devices of the mesh (0: all)")
    p.add_argument("--branches", default="cond", help="comma list for hetero: cond (lax.cond), mask (no cond)")
    p.add_argument("--backend", default="xla")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mtp-depths", default="0,3")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-single", action="store_true", help="skip the single-device reference rows")
    p.add_argument("--hbm-gib", type=float, default=4.0)
    p.add_argument("--comm-max-mib", type=float, default=64.0)
    p.add_argument("--out", default=None, help="a .json file, or a results directory (default experiments/results)")
    args = p.parse_args(argv)

    cfg = load_config(args.config, overrides=args.set)
    m = cfg.model
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [int(d) for d in args.mtp_depths.split(",")]
    devices = jax.devices()[: args.num_devices or None]
    n = len(devices)
    ceilings = measure_hbm(args.hbm_gib)
    t = time.perf_counter()
    model = Model(m, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    print(f"{n} x {devices[0].device_kind}; HBM {ceilings['hbm_tb_s']:.2f} TB/s; model built in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    max_len = max(contexts) + (args.warmup + args.steps) * (1 + max(depths)) + 16
    plans = [("single", "-")] if not args.no_single else []
    plans += [(layout, branch) for layout in args.layouts
              for branch in (args.branches.split(",") if layout == "hetero" else ["cond"])]
    rows, comm_cache, mesh = [], {}, None
    for layout, branch in plans:
        if layout == "single":
            engines = {"real": Engine(model, args.backend, max_len, compilation_cache=False)}
        else:
            engines = {c: RolesEngine(model, layout, n, args.backend, max_len, compilation_cache=False,
                                      branch=branch, comms=c, devices=devices) for c in ("real", "none")}
            engines["none"].params = engines["real"].params  # same table and mesh: one copy of the weights
            mesh = engines["real"].mesh
            print(engines["real"].table.describe(), flush=True)
        for context in contexts:
            for depth in depths:
                timings = {}
                for comms, engine in engines.items():
                    state = synthetic_state(m, args.batch, context, max_len, depth, engine.dtype,
                                            jax.random.key(1))
                    if isinstance(engine, RolesEngine):
                        state = engine.place_state(state)
                    timings[comms] = time_step(engine, state, depth, args.steps, args.warmup)
                r = timings["real"]
                nbytes = accounting.bytes_per_decode_step(m, context, m.dtype, tokens=1 + depth, batch=args.batch)
                devs = 1 if layout == "single" else n
                row = {"backend": args.backend, "layout": layout, "num_devices": devs, "branch": branch,
                       "batch": args.batch, "context_len": context, "mtp_depth": depth, **r,
                       "tokens_per_s": args.batch * r["measured_accepted_per_step"] / (r["ms_per_step"] / 1e3),
                       "bytes_per_step": nbytes,
                       # against the aggregate HBM bandwidth of the devices used
                       "roofline_fraction": nbytes / (devs * ceilings["hbm_tb_s"] * 1e12) / (r["ms_per_step"] / 1e3)}
                if layout != "single":
                    messages = engines["real"].collectives[("step", _Mode(depth, True, 0.0, 1.0), 0)]
                    comm_ms = 1e3 * comm_time(mesh, messages, comm_cache)
                    compute_ms = timings["none"]["ms_per_step"]
                    row.update(collectives_per_step=len(messages),
                               comm_bytes_per_step=sum(x["bytes"] for x in messages),
                               ms_compute=compute_ms, ms_comm=comm_ms,
                               ms_wait=r["ms_per_step"] - compute_ms - comm_ms,
                               messages=[{k: x[k] for k in ("op", "what", "bytes")} for x in messages])
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "messages"}), flush=True)
        del engines
    if mesh is not None:
        ceilings["interconnect"] = measure_interconnect(mesh, args.comm_max_mib)
        print("interconnect:", json.dumps({k: v for k, v in ceilings["interconnect"].items() if k != "points"}))
    record = results.result("bench_roles", {"name": cfg.name, "overrides": args.set}, rows, ceilings,
                            cache="synthetic random rows", weights="random",
                            devices={"count": n, "kind": devices[0].device_kind, "platform": devices[0].platform})
    out = pathlib.Path(args.out) if args.out else None
    if out is not None and out.suffix == ".json":
        path = results.write(record, out.parent, out.stem)
    else:
        path = results.write(record, out, None)
    print(f"\n{'layout':>12} {'branch':>6} {'N':>2} {'ctx':>6} {'D':>2} {'ms/step':>8} {'compute':>8} {'comm':>7} "
          f"{'wait':>7} {'tok/s':>8}")
    for r in rows:
        extra = (f"{r['ms_compute']:8.3f} {r['ms_comm']:7.3f} {r['ms_wait']:7.3f}" if "ms_comm" in r
                 else f"{'':>8} {'':>7} {'':>7}")
        print(f"{r['layout']:>12} {r['branch']:>6} {r['num_devices']:>2} {r['context_len']:>6} {r['mtp_depth']:>2} "
              f"{r['ms_per_step']:8.3f} {extra} {r['tokens_per_s']:8.1f}")
    print("wrote", path)


if __name__ == "__main__":
    main()
