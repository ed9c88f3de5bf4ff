"""Full-size GLM-5 decode on 8 GPUs: both role layouts, FP8 routed experts, random weights drawn on the devices.

    NCCL_NVLS_ENABLE=0 python3 experiments/bench_glm5_8gpu.py --out $OUT             # 8 x H200, ~10 min
    python3 experiments/bench_glm5_8gpu.py --plan-only                               # memory plan, any machine
    python3 experiments/bench_glm5_8gpu.py --merge a.json b.json --out merged.json   # runs split over commands

Per layout (hetero: 1 index worker + 7 MLA/expert workers; homogeneous), backend, context (4K, 32K, 128K) and MTP
depth (0, 3): the back-to-back ms per decode step at batch 1 (`bench_decode.time_step`), bytes per step
(`glm_fast.accounting`: weights once, FP8 experts, cache traffic; D > 0 adds the D MTP draft passes), roofline
fraction = bytes / (N x HBM bandwidth measured in this run) / time, and `roles_model`'s prediction of the same
step beside it. Random weights accept no drafts, so tokens/s with MTP is projected with the acceptance measured
on the trained `small` model (experiments/results/mtp_acceptance_small.json, greedy) - an ASSUMPTION, recorded
as such in every row (`accepted_source`), next to the measured (random-weight) acceptance.

Memory: the plan of every row (`glm_fast.parallel.memory`) is printed before anything is allocated; if the
weights do not fit, the run stops there. Rows whose caches do not fit are skipped and recorded (--on-unfit fail:
stop instead). Weights are drawn per device (`glm_fast.parallel.init`): no host copy, no device holds the model.

Multicast: NCCL's NVLink SHARP/multicast (NVLS) can take a shared host's GPUs down; it is switched off here
before jax initialises (NCCL_NVLS_ENABLE=0 and friends, forced, whatever the caller set).
Robustness for a one-command session: JSON + PNG are rewritten after every row, a row that fails is recorded
with its error and the run goes on, and no row starts after --time-budget-s.
"""
from __future__ import annotations

import os
import sys

# Before jax (and NCCL) initialise. Forced: a caller's NCCL_NVLS_ENABLE=1 must not switch multicast on.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "NCCL_NVLSTREE_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
                 "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
if "jax" in sys.modules:
    raise RuntimeError("bench_glm5_8gpu must set NCCL's multicast switches before jax is imported")
os.environ.update(MULTICAST_OFF)
# The FP8 model takes ~110 GiB of a 140 GiB H200: grow the pool on demand (torch measures HBM first) up to 97%.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import roles_model  # noqa: E402
from bench_decode import measure_hbm, synthetic_state, time_step  # noqa: E402
from bench_roles import measure_interconnect  # noqa: E402

from glm_fast import accounting, load_config, results  # noqa: E402
from glm_fast.engine.cache import new_state  # noqa: E402
from glm_fast.engine.ops import BACKENDS  # noqa: E402
from glm_fast.parallel import RolesEngine, abstract_model, build_roles, random_params  # noqa: E402
from glm_fast.parallel.engine import _map_caches, state_specs  # noqa: E402
from glm_fast.parallel.memory import GIB, H200_BYTES, check_fits, device_capacity, format_plan, memory_plan  # noqa: E402
from glm_fast.parallel.shard import AXIS, shard_map  # noqa: E402

ACCEPTANCE = HERE / "results" / "mtp_acceptance_small.json"
FP8_ELEM = 1 + 4 / 128 ** 2
# The persistent kernel (`Engine(backend="persistent")`) is one device's whole-step kernel: RolesEngine has no
# sharded form of it yet, so its rows are recorded as skipped rather than tried.
SINGLE_DEVICE_BACKENDS = ("persistent",)  # bytes per FP8 expert weight with its float32 128 x 128 block scale


def assumed_acceptance(path: pathlib.Path, depths) -> tuple[dict, str]:
    """{D: accepted tokens per step} from the small model's greedy MTP acceptance run (D = 0: 1)."""
    out = {0: 1.0}
    try:
        rec = json.loads(pathlib.Path(path).read_text())
        for r in rec["rows"]:
            if r.get("mode", "greedy") == "greedy" and r["mtp_depth"] in depths and r["mtp_depth"]:
                out[r["mtp_depth"]] = float(r["accepted_per_step"])
        source = f"assumed: {pathlib.Path(path).name} (trained small model, greedy, {rec['config']['name']})"
    except (OSError, KeyError, ValueError) as err:
        source = f"assumed: none ({path}: {err}); D > 0 rows project 1 token per step"
    return {d: out.get(d, 1.0) for d in depths}, source


def sharded_state(engine: RolesEngine, batch: int, context: int, depth: int, key):
    """`synthetic_state` made by every device for its own cache slot (no device builds the others')."""
    cfg = engine.cfg
    specs = state_specs(jax.eval_shape(lambda: new_state(cfg, batch, engine.max_len, depth, engine.dtype)))

    def body(k):
        s = synthetic_state(cfg, batch, context, engine.max_len, depth, engine.dtype, k)
        return _map_caches(s, lambda x: x[None])

    return jax.jit(shard_map(body, engine.mesh, (P(),), specs))(key)


def step_bytes(m, context: int, depth: int, expert_format: str) -> int:
    """Bytes one step must move: the verify pass over 1 + D tokens plus D MTP draft passes."""
    edt = "float8_e4m3fn" if expert_format == "fp8" else None
    total = accounting.bytes_per_decode_step(m, context, m.dtype, tokens=1 + depth, expert_dtype=edt)
    if depth:
        total += depth * accounting.bytes_per_mtp_draft_step(m, context, m.dtype, expert_dtype=edt)
    return total


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"hetero": "tab:blue", "homogeneous": "tab:orange"}
    for ax, key, label in ((axes[0], "projected_tokens_per_s", "tokens/s (MTP acceptance assumed)"),
                           (axes[1], "ms_per_step", "ms per step")):
        for layout, color in colors.items():
            for depth, style in ((0, "-"), (3, "--")):
                for backend, marker in (("xla", "o"), ("pallas", "s"), ("persistent", "^")):
                    pts = sorted((r["context_len"], r[key]) for r in rows if r.get(key) and r["layout"] == layout
                                 and r["mtp_depth"] == depth and r["backend"] == backend)
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, marker=marker, ms=5,
                                label=f"{layout} {backend} D={depth}")
                model_key = {"projected_tokens_per_s": "model_tokens_per_s", "ms_per_step": "model_ms"}[key]
                pts = sorted({(r["context_len"], r[model_key]) for r in rows if r.get(model_key)
                              and r["layout"] == layout and r["mtp_depth"] == depth})
                if pts:
                    ax.plot(*zip(*pts), style, color=color, alpha=0.35, lw=4, label=f"{layout} D={depth} model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(record: dict, out: pathlib.Path) -> pathlib.Path:
    path = results.write(record, out.parent, out.stem) if out.suffix == ".json" else results.write(
        record, out, "bench_glm5_8gpu")
    plot(record["rows"], path.with_suffix(".png"),
         f"{record['config']['name']} decode, batch 1, {record.get('devices', {}).get('count', '?')} x "
         f"{record.get('devices', {}).get('kind', '?')}, experts {record.get('expert_format')} (random weights)")
    return path


def merge(paths: list[str], out: pathlib.Path) -> None:
    records = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    record = {**records[0], "rows": [r for rec in records for r in rec["rows"]],
              "merged_from": [{"path": p, "command": rec["command"], "git_commit": rec["git_commit"]}
                              for p, rec in zip(paths, records)]}
    print("wrote", write(record, out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="glm5", help="preset or YAML (smoke tests: tiny + --set overrides)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--layouts", nargs="+", default=["hetero", "homogeneous"])
    p.add_argument("--backends", default="xla,pallas,persistent",
                   help=f"comma list, tried in order (known now: {sorted(BACKENDS)}; others are recorded as skipped)")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--mtp-depths", default="0,3")
    p.add_argument("--expert-format", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--num-devices", type=int, default=8, help="devices of the mesh (0: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hbm-gib", type=float, default=4.0, help="HBM bandwidth probe size (0: skip, model default)")
    p.add_argument("--comm-max-mib", type=float, default=16.0, help="interconnect sweep (0: skip, model default)")
    p.add_argument("--capacity-gib", type=float, default=None, help="usable memory per device (default: the "
                   "allocator's limit on a GPU, else XLA_PYTHON_CLIENT_MEM_FRACTION x an H200)")
    p.add_argument("--on-unfit", choices=["skip", "fail"], default="skip", help="rows whose plan does not fit")
    p.add_argument("--time-budget-s", type=float, default=540.0, help="start no row after this many seconds")
    p.add_argument("--acceptance", default=str(ACCEPTANCE))
    p.add_argument("--plan-only", action="store_true", help="print the memory plan and exit")
    p.add_argument("--merge", nargs="+", default=None, help="JSON files of earlier runs to merge into --out")
    p.add_argument("--out", default=None, help="a .json file or a directory (default experiments/results)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = pathlib.Path(args.out) if args.out else results.RESULTS_DIR
    if args.merge:
        return merge(args.merge, out if out.suffix == ".json" else out / "bench_glm5_8gpu.json")

    cfg = load_config(args.config, overrides=args.set)
    m = cfg.model
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [int(d) for d in args.mtp_depths.split(",")]
    backends = args.backends.split(",")
    devices = jax.devices()[: args.num_devices or None]
    n = len(devices)
    if args.num_devices and n < args.num_devices:
        raise SystemExit(f"--num-devices={args.num_devices} but only {n} devices here ({devices[0].device_kind}); "
                         "CPU smoke test: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    margin = (args.warmup + args.steps + 2) * (1 + max(depths)) + 64
    max_len = {c: c + margin for c in contexts}
    capacity, cap_source = ((int(args.capacity_gib * GIB), "--capacity-gib") if args.capacity_gib
                            else device_capacity(int(float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]) * H200_BYTES)))
    print(f"{n} x {devices[0].device_kind}; env " + " ".join(f"{k}={os.environ[k]}" for k in MULTICAST_OFF),
          flush=True)
    t = time.perf_counter()
    model = abstract_model(m)
    print(f"abstract model in {time.perf_counter() - t:.1f} s; usable per device {capacity / GIB:.2f} GiB "
          f"({cap_source})", flush=True)

    # ---- memory plan of every row, before anything is allocated
    plans, fits = {}, {}
    for layout in args.layouts:
        table = build_roles(layout, n, m)
        for c in contexts:
            for d in depths:
                plan = memory_plan(m, table, max_len[c], d, expert_format=args.expert_format, model=model)
                plans[layout, c, d] = plan
                fits[layout, c, d] = plan.total <= capacity
        print(format_plan(plans[layout, max(contexts), max(depths)], capacity), flush=True)
        for c in contexts:
            print(f"  {layout} context {c}: " + ", ".join(
                f"D={d} {plans[layout, c, d].total / GIB:.1f} GiB {'fits' if fits[layout, c, d] else 'DOES NOT FIT'}"
                for d in depths), flush=True)
        smallest = min((plans[layout, c, d] for c in contexts for d in depths), key=lambda x: x.total)
        check_fits(smallest, capacity)  # not even the smallest row fits: nothing of this layout can run
    unfit = [k for k, ok in fits.items() if not ok]
    if unfit and args.on_unfit == "fail":
        check_fits(plans[unfit[0]], capacity)
    if args.plan_only:
        return

    ceilings = measure_hbm(args.hbm_gib) if args.hbm_gib else {"hbm_tb_s": roles_model.Hardware().hbm_tb_s}
    if "torch" in sys.modules:  # hand torch's probe buffers back before the weights arrive
        sys.modules["torch"].cuda.empty_cache()
    accepted, acc_source = assumed_acceptance(pathlib.Path(args.acceptance), depths)
    hw = roles_model.calibrated(roles_model.BENCH_DECODE)
    hw = roles_model.dataclasses.replace(hw, hbm_tb_s=ceilings["hbm_tb_s"],
                                         source=hw.source + "; HBM measured in this run")
    print(f"HBM {ceilings['hbm_tb_s']:.2f} TB/s per device; acceptance {accepted} ({acc_source})", flush=True)
    record = results.result(
        "bench_glm5_8gpu", {"name": cfg.name, "overrides": args.set}, [], ceilings, weights="random (on device)",
        cache="synthetic random rows", expert_format=args.expert_format, acceptance_source=acc_source,
        devices={"count": n, "kind": devices[0].device_kind, "platform": devices[0].platform},
        env={k: os.environ.get(k) for k in (*MULTICAST_OFF, "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                              "XLA_PYTHON_CLIENT_PREALLOCATE")},
        memory_plans=[{"layout": k[0], "context_len": k[1], "mtp_depth": k[2], "max_len": v.max_len,
                       "total_gib": v.total / GIB, "weights_gib": v.weight_bytes / GIB,
                       "state_gib": v.state_bytes / GIB, "workspace_gib": v.workspace / GIB,
                       "capacity_gib": capacity / GIB, "fits": fits[k]} for k, v in plans.items()],
        model_hardware=roles_model.dataclasses.asdict(hw))
    path = None

    def add(row):
        nonlocal path
        record["rows"].append(row)
        path = write(record, out)
        print(json.dumps({k: v for k, v in row.items() if k != "error_trace"}), flush=True)

    mesh = None
    for layout in args.layouts:
        if time.perf_counter() - t0 > args.time_budget_s:
            break
        table = build_roles(layout, n, m)
        print(table.describe(), flush=True)
        t = time.perf_counter()
        try:
            mesh_ = jax.sharding.Mesh(np.array(devices), (AXIS,))
            params = random_params(model, table, m, mesh_, jax.random.key(args.seed), args.expert_format)
            jax.block_until_ready(params)
        except Exception as err:  # noqa: BLE001 - record and go on with the next layout
            add({"layout": layout, "status": f"weights failed: {type(err).__name__}: {str(err)[:500]}"})
            continue
        init_s = time.perf_counter() - t
        print(f"{layout}: weights drawn on the devices in {init_s:.1f} s", flush=True)
        for backend in backends:
            for c in contexts:
                engine = None
                for d in depths:
                    base = {"backend": backend, "layout": layout, "num_devices": n, "batch": 1, "context_len": c,
                            "mtp_depth": d, "expert_format": args.expert_format, "weights_init_s": init_s,
                            "memory_plan_gib": plans[layout, c, d].total / GIB}
                    if backend not in BACKENDS or backend in SINGLE_DEVICE_BACKENDS:
                        add({**base, "status": f"skipped: backend {backend!r} has no role-sharded (RolesEngine) path"})
                        continue
                    if not fits[layout, c, d]:
                        add({**base, "status": f"skipped: memory plan {plans[layout, c, d].total / GIB:.1f} GiB > "
                                               f"{capacity / GIB:.1f} GiB"})
                        continue
                    if time.perf_counter() - t0 > args.time_budget_s:
                        add({**base, "status": f"skipped: time budget {args.time_budget_s:.0f} s spent"})
                        continue
                    try:
                        if engine is None:
                            engine = RolesEngine(model, layout, n, backend, max_len[c], compilation_cache=False,
                                                 devices=devices, expert_format=args.expert_format,
                                                 params=params)
                            mesh = engine.mesh
                        state = sharded_state(engine, 1, c, d, jax.random.key(1))
                        r = time_step(engine, state, d, args.steps, args.warmup)
                        del state
                    except Exception as err:  # noqa: BLE001 - one failing row must not end a one-command run
                        add({**base, "status": f"failed: {type(err).__name__}: {str(err)[:500]}",
                             "error_trace": traceback.format_exc()[-3000:]})
                        continue
                    nbytes = step_bytes(m, c, d, args.expert_format)
                    pred = roles_model.step_time(m, layout, n, c, d, 1, hw,
                                                 FP8_ELEM if args.expert_format == "fp8" else None)
                    sec = r["ms_per_step"] / 1e3
                    add({**base, "status": "ok", **r,
                         "tokens_per_s": r["measured_accepted_per_step"] / sec,
                         "accepted_per_step": accepted[d], "accepted_source": acc_source,
                         "projected_tokens_per_s": accepted[d] / sec,
                         "bytes_per_step": nbytes,
                         "roofline_fraction": nbytes / (n * ceilings["hbm_tb_s"] * 1e12) / sec,
                         "model_ms": 1e3 * pred["s"], "model_compute_ms": 1e3 * pred["compute_s"],
                         "model_comm_ms": 1e3 * pred["comm_s"], "model_tokens_per_s": accepted[d] / pred["s"],
                         "measured_over_model": r["ms_per_step"] / (1e3 * pred["s"])})
                del engine
        del params
    if mesh is not None and args.comm_max_mib and time.perf_counter() - t0 < args.time_budget_s + 30:
        record["ceilings"]["interconnect"] = measure_interconnect(mesh, args.comm_max_mib)
        path = write(record, out)
    if path is None:
        path = write(record, out)
    print(f"\n{'layout':>12} {'backend':>8} {'ctx':>7} {'D':>2} {'ms/step':>8} {'model':>7} {'tok/s*':>7} "
          f"{'roofline':>8}  status   (* MTP acceptance assumed: {acc_source})")
    for r in record["rows"]:
        if r.get("status") == "ok":
            print(f"{r['layout']:>12} {r['backend']:>8} {r['context_len']:>7} {r['mtp_depth']:>2} "
                  f"{r['ms_per_step']:8.2f} {r['model_ms']:7.2f} {r['projected_tokens_per_s']:7.1f} "
                  f"{r['roofline_fraction']:8.3f}  ok")
        else:
            print(f"{r['layout']:>12} {r.get('backend', '-'):>8} {r.get('context_len', '-'):>7} "
                  f"{r.get('mtp_depth', '-'):>2} {'':>8} {'':>7} {'':>7} {'':>8}  {r['status']}")
    print(f"wrote {path} and {path.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
