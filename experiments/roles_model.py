"""Performance model of the role layouts (`glm_fast.parallel`): per-layer bytes, FLOPs and messages of each
layout as functions of devices N, context S, top-k K, batch B and MTP depth D, turned into a step time and
tokens/s, calibrated with measured single-GPU rates and a measured (or default) interconnect.

    python3 experiments/roles_model.py                                     # glm5 on 8 H200, 4K..200K: JSON + PNG
    python3 experiments/roles_model.py --compare experiments/results/roles_h200x2.json   # vs a bench_roles run

The program modelled is the one `glm_fast.parallel.forward` runs. Per layer, phases in dependency order; a
phase costs the slowest device's max(bytes / (HBM x efficiency), FLOPs / peak), and each message
latency + wire bytes / bus bandwidth (ring all-reduce: 2 (N-1)/N of the payload per device, all-gather:
(N-1) x the payload). Phases of different roles in the same step run side by side (hetero: the index worker's
indexer next to the MLA workers' queries; router next to the shared expert).
  all       RMSNorm, q_a_proj (both roles need q_resid)
  index     indexer weights, index-key read S x 128 and write, top-k  | attention: W_qb, W_uk slices, W_kva
  msg       top-k broadcast (hetero, "full" layers): B T K x 2 int32
  attention latent rows min(S, T K) x (C + R), W_uv and o_proj slices  -> msg psum B T D float32
  index     router (MoE)                                              | ffn: shared-expert slice
  msg       routing broadcast (hetero): B T k x 2 x 4 bytes
  ffn       local routed experts (dense layers: MLP slice)            -> msg psum B T D float32
  head      vocabulary slice on the ffn devices                       -> msg all_gather B T V/N_ffn bf16
MTP: the verify step runs T = 1 + D tokens; each of the D draft depths runs eh_proj, one MoE block over the
engine's 2D-row window and the head. tokens/s = B x accepted / step time.

Assumptions (stated, not measured): weights are read once per step and every device streams at the same
fraction of HBM bandwidth as our single-GPU XLA step (`hbm_efficiency`, from
bench_decode_glm5_slice_xla.json); routed experts touched per step are the expected number of distinct
experts, E (1 - (1 - 1/E)^(B T k)), spread evenly over the expert devices (no load imbalance); element-wise
work and kernel launch gaps are inside the efficiency; a role conditional costs `cond_us` (default 0); the
interconnect default is H200 NVLink, 450 GB/s per direction and 5 us per collective, until a bench_roles run
measures it; GLM-5 accepts 2.76 tokens per MTP step at D = 3 (DESIGN.md sec. 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from glm_fast import load_config, results  # noqa: E402
from glm_fast.config import ModelConfig  # noqa: E402
from glm_fast.parallel.roles import build_roles  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BENCH_DECODE = RESULTS / "bench_decode_glm5_slice_xla.json"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device rates and the interconnect. Defaults: H200 (DESIGN.md sec. 7) and NVLink."""

    hbm_tb_s: float = 4.28          # torch device copy, DESIGN.md sec. 7
    hbm_efficiency: float = 0.44    # our XLA step's roofline fraction at batch 1 (bench_decode, 4K context)
    tflop_s: float = 694.0          # XLA bf16 matmul, DESIGN.md sec. 7
    link_gb_s: float = 450.0        # NVLink per direction per GPU (H200)
    collective_us: float = 5.0      # latency of one small collective
    cond_us: float = 0.0            # one role conditional (lax.cond), unmeasured: 0
    source: str = "defaults"

    def busy(self, nbytes: float, flops: float) -> float:
        """Seconds a device needs to stream `nbytes` and compute `flops`."""
        return max(nbytes / (self.hbm_tb_s * 1e12 * self.hbm_efficiency), flops / (self.tflop_s * 1e12))

    def message(self, op: str, payload: float, n: int) -> float:
        """Seconds of one collective with a per-device `payload` (bytes) over n devices."""
        if n == 1:
            return 0.0
        wire = payload * (2 * (n - 1) / n if op == "psum" else (n - 1))
        return self.collective_us * 1e-6 + wire / (self.link_gb_s * 1e9)


def calibrated(bench_decode: pathlib.Path | None = BENCH_DECODE, bench_roles: dict | None = None) -> Hardware:
    """Hardware with the single-GPU efficiency from a bench_decode JSON (batch 1, D = 0 rows, median) and,
    when given, HBM ceiling, efficiency and interconnect from a bench_roles record."""
    hw, notes = Hardware(), []
    if bench_decode is not None and pathlib.Path(bench_decode).exists():
        rec = json.loads(pathlib.Path(bench_decode).read_text())
        fr = [r["roofline_fraction"] for r in rec["rows"]
              if r.get("layout") == "single" and r["batch"] == 1 and r["mtp_depth"] == 0 and r["backend"] == "xla"]
        if fr:
            hw = dataclasses.replace(hw, hbm_tb_s=rec["ceilings"]["hbm_tb_s"], hbm_efficiency=float(np.median(fr)))
            notes.append(f"HBM and efficiency from {pathlib.Path(bench_decode).name}")
    if bench_roles is not None:
        ic = bench_roles["ceilings"].get("interconnect", {})
        single = [r["roofline_fraction"] for r in bench_roles["rows"]
                  if r["layout"] == "single" and r["mtp_depth"] == 0]
        hw = dataclasses.replace(hw, hbm_tb_s=bench_roles["ceilings"]["hbm_tb_s"],
                                 hbm_efficiency=float(np.median(single)) if single else hw.hbm_efficiency,
                                 collective_us=ic.get("psum_latency_us") or hw.collective_us,
                                 link_gb_s=ic.get("psum_bus_gb_s") or hw.link_gb_s)
        notes.append("HBM, efficiency and interconnect from the bench_roles record")
    return dataclasses.replace(hw, source="; ".join(notes) or "defaults")


def _experts_touched(m: ModelConfig, tokens: int) -> float:
    e = m.n_routed_experts
    return e * (1 - (1 - 1 / e) ** (tokens * m.num_experts_per_tok))


def layer_phases(m: ModelConfig, layout: str, n: int, context: int, tokens: int, batch: int, mlp: str,
                 indexer: str, elem: int = 2, expert_elem: float | None = None) -> tuple[list, list]:
    """One layer: (phases, messages). A phase is {device group: (bytes, flops)} (groups run side by side);
    a message is (op, per-device payload bytes). Groups: "index" and "mla" (hetero) or "all" (homogeneous).
    expert_elem: bytes per routed-expert weight (default elem; FP8 e4m3 with 128 x 128 f32 scales: 1 + 4/128^2)."""
    table = build_roles(layout, n, m)
    n_attn, n_ffn = len(table.devices("attention")), len(table.devices("ffn"))
    hetero = not table.everywhere("index")
    bt = batch * tokens
    d, q, c, r = m.hidden_size, m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
    hp = math.ceil(m.num_attention_heads / n_attn)                     # padded heads per attention device
    k_rows = min(context, tokens * m.index_topk)
    ih, idim = m.index_n_heads, m.index_head_dim

    def mm(params, rows=bt):  # bytes and FLOPs of a weight read once and applied to `rows` tokens
        return params * elem, 2 * params * rows

    def add(*parts):
        return tuple(map(sum, zip(*parts)))

    common = mm(d * q)
    idx = (add(mm(q * ih * idim + d * idim + d * ih),
               (batch * context * idim * elem + bt * idim * elem, 2 * bt * context * ih * (idim + 1)))
           if indexer == "full" else (0, 0))
    queries = add(mm(q * hp * m.qk_head_dim), mm(c * hp * m.qk_nope_head_dim), mm(d * (c + r)))
    attend = add((batch * k_rows * (c + r) * elem, 2 * bt * hp * min(context, m.index_topk) * (2 * c + r)),
                 mm(c * hp * m.v_head_dim), mm(hp * m.v_head_dim * d))
    if mlp == "sparse":
        router = mm(d * m.n_routed_experts)
        shared = mm(3 * d * m.moe_intermediate_size * m.n_shared_experts // n_ffn)
        experts = (_experts_touched(m, bt) / n_ffn * 3 * d * m.moe_intermediate_size * (expert_elem or elem),
                   2 * bt * m.num_experts_per_tok / n_ffn * 3 * d * m.moe_intermediate_size)
    else:
        router, shared, experts = (0, 0), (0, 0), mm(3 * d * m.intermediate_size // n_ffn)
    out_psum = ("psum", bt * d * 4)
    if hetero:
        phases = [{"all": common}, {"index": idx, "mla": queries}, {"mla": attend},
                  {"index": router, "mla": shared}, {"mla": experts}]
        messages = ([("psum", bt * m.index_topk * 2 * 4)] if indexer == "full" else []) + [out_psum]
        messages += [("psum", bt * m.num_experts_per_tok * 2 * 4)] if mlp == "sparse" else []
        messages += [out_psum]
    else:
        phases = [{"all": add(common, idx, queries)}, {"all": attend}, {"all": add(router, shared, experts)}]
        messages = [out_psum, out_psum]
    return phases, messages


def head_phases(m: ModelConfig, layout: str, n: int, tokens: int, batch: int, elem: int = 2):
    table = build_roles(layout, n, m)
    n_ffn = len(table.devices("ffn"))
    v = math.ceil(m.vocab_size / n_ffn)
    group = "mla" if not table.everywhere("index") else "all"
    return ([{group: (v * m.hidden_size * elem, 2 * batch * tokens * v * m.hidden_size)}],
            [("all_gather", batch * tokens * v * elem)])


def step_time(m: ModelConfig, layout: str, n: int, context: int, depth: int, batch: int, hw: Hardware,
              expert_elem: float | None = None) -> dict:
    """Modelled seconds of one decode step (verify 1 + D tokens, then D draft depths): total and parts."""
    parts = []  # (phases, messages) of every pass in order
    tokens = 1 + depth
    for mlp, idx in zip(m.layer_mlp_types, m.layer_indexer_types):
        parts.append(layer_phases(m, layout, n, context, tokens, batch, mlp, idx, expert_elem=expert_elem))
    parts.append(head_phases(m, layout, n, tokens, batch))
    for _ in range(depth):  # draft depths: eh_proj (replicated), one MTP block over the 2D-row window, head
        w = 2 * depth
        parts.append(([{"all": (2 * m.hidden_size ** 2 * 2, 4 * batch * w * m.hidden_size ** 2)}], []))
        parts.append(layer_phases(m, layout, n, context, w, batch, m.mtp_mlp_type, "full", expert_elem=expert_elem))
        parts.append(head_phases(m, layout, n, w, batch))
    compute = comm = 0.0
    messages = conds = 0
    for phases, msgs in parts:
        for phase in phases:
            compute += max(hw.busy(*work) for work in phase.values())
            conds += sum(group != "all" for group in phase)  # ~ one lax.cond per role-gated piece of work
        comm += sum(hw.message(op, payload, n) for op, payload in msgs)
        messages += len(msgs)
    cond = conds * hw.cond_us * 1e-6
    return {"s": compute + comm + cond, "compute_s": compute, "comm_s": comm, "cond_s": cond,
            "messages": messages}


def project(cfg, layouts, n: int, contexts, depths, batch: int, hw: Hardware, accepted: dict) -> list[dict]:
    m = cfg.model
    rows = []
    for layout in layouts:
        for depth in depths:
            for context in contexts:
                t = step_time(m, layout, n, context, depth, batch, hw)
                acc = accepted.get(depth, 1.0)
                rows.append({"backend": "model", "layout": layout, "num_devices": n, "batch": batch,
                             "context_len": context, "mtp_depth": depth, "ms_per_step": 1e3 * t["s"],
                             "ms_compute": 1e3 * t["compute_s"], "ms_comm": 1e3 * t["comm_s"],
                             "ms_cond": 1e3 * t["cond_s"], "collectives_per_step": t["messages"],
                             "accepted_per_step": acc, "tokens_per_s": batch * acc / t["s"]})
    return rows


def compare(bench: dict, hw: Hardware) -> list[dict]:
    """Model vs a bench_roles record: same config, layouts, devices, contexts and depths (accepted as measured)."""
    cfg = load_config(bench["config"]["name"], overrides=bench["config"].get("overrides") or [])
    out = []
    for r in bench["rows"]:
        if r["layout"] == "single":
            continue
        t = step_time(cfg.model, r["layout"], r["num_devices"], r["context_len"], r["mtp_depth"], r["batch"], hw)
        out.append({"layout": r["layout"], "branch": r.get("branch"), "num_devices": r["num_devices"],
                    "context_len": r["context_len"], "mtp_depth": r["mtp_depth"],
                    "measured_ms": r["ms_per_step"], "model_ms": 1e3 * t["s"],
                    "measured_compute_ms": r.get("ms_compute"), "model_compute_ms": 1e3 * t["compute_s"],
                    "measured_comm_ms": r.get("ms_comm"), "model_comm_ms": 1e3 * t["comm_s"],
                    "measured_collectives": r.get("collectives_per_step"), "model_collectives": t["messages"],
                    "ratio": r["ms_per_step"] / (1e3 * t["s"])})
    return out


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layout, style in (("hetero", "-"), ("homogeneous", "--")):
        for depth, color in zip(sorted({r["mtp_depth"] for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
            pts = sorted((r["context_len"], r["tokens_per_s"]) for r in rows
                         if r["layout"] == layout and r["mtp_depth"] == depth)
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker="o", ms=3, label=f"{layout}, MTP D={depth}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("tokens/s (batch 1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="glm5")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--layouts", nargs="+", default=["hetero", "homogeneous"])
    p.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072,200000")
    p.add_argument("--mtp-depths", default="0,3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--accepted", default="3:2.76", help="depth:accepted tokens per step (GLM-5 reported)")
    p.add_argument("--bench-decode", default=str(BENCH_DECODE), help="single-GPU calibration (bench_decode JSON)")
    p.add_argument("--interconnect", default=None, help="bench_roles JSON whose measured interconnect to use")
    p.add_argument("--compare", default=None, help="bench_roles JSON: print and record model vs measured")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)

    accepted = {0: 1.0, **{int(k): float(v) for k, v in (a.split(":") for a in args.accepted.split(",") if a)}}
    out = pathlib.Path(args.out)
    if args.compare:
        bench = json.loads(pathlib.Path(args.compare).read_text())
        hw = calibrated(args.bench_decode, bench)
        rows = compare(bench, hw)
        print(f"{'layout':>12} {'N':>2} {'ctx':>6} {'D':>2} {'measured':>9} {'model':>8} {'ratio':>6}  ({hw.source})")
        for r in rows:
            print(f"{r['layout']:>12} {r['num_devices']:>2} {r['context_len']:>6} {r['mtp_depth']:>2} "
                  f"{r['measured_ms']:9.3f} {r['model_ms']:8.3f} {r['ratio']:6.2f}")
        record = results.result("roles_model_vs_bench", bench["config"], rows, dataclasses.asdict(hw),
                                bench=args.compare)
        print("wrote", results.write(record, out, args.name or f"roles_model_vs_{pathlib.Path(args.compare).stem}"))
        return
    cfg = load_config(args.config, overrides=args.set)
    bench = json.loads(pathlib.Path(args.interconnect).read_text()) if args.interconnect else None
    hw = calibrated(args.bench_decode, bench)
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [int(d) for d in args.mtp_depths.split(",")]
    rows = project(cfg, args.layouts, args.devices, contexts, depths, args.batch, hw, accepted)
    name = args.name or f"roles_model_{cfg.name}_{args.devices}dev"
    record = results.result("roles_model", {"name": cfg.name, "overrides": args.set}, rows, dataclasses.asdict(hw),
                            assumptions=__doc__.split("Assumptions")[1].strip())
    path = results.write(record, out, name)
    plot(rows, out / f"{name}.png", f"{cfg.name} on {args.devices} devices (model; {hw.source})")
    print(f"{'layout':>12} {'D':>2} " + " ".join(f"{c // 1024:>6}K" for c in contexts))
    for layout in args.layouts:
        for depth in depths:
            tps = [r["tokens_per_s"] for r in rows if r["layout"] == layout and r["mtp_depth"] == depth]
            print(f"{layout:>12} {depth:>2} " + " ".join(f"{t:7.0f}" for t in tps))
    print("wrote", path, "and", out / f"{name}.png")


if __name__ == "__main__":
    main()
