"""Which of the persistent kernel's op bodies lower and compile on this jax / GPU, and where the ones that do not
fail (the jaxpr equation or Mosaic op, and the Python line that built it). Writes JSON.

    python experiments/persistent_lowering.py --config glm5_slice --ops all

Each entry compiles the whole persistent kernel with only that opcode's branches (`persistent_step(ops=...)`,
the others no-ops) from abstract arguments: no arrays, no launch. Mosaic GPU's layout inference changed between
jax 0.10 (CI) and 0.11 (the device image): a body that lowers on one can fail on the other, so run this on the
GPU host after touching a body. For a layout-inference failure the failing transfer op is read from the
inference's own frame (its error message is an assertion on jax 0.11.2). The config records the kernel's SMEM per
CTA (`kernel.smem_bytes`) at `--slots`. The plan is the one `PersistentDecoder` picks for `--tokens` T
(`kernel.pick_plan`). Each row records `kernel_chars`, the length of the Mosaic GPU custom call in the lowered
StableHLO text (the serialized kernel module): the code Mosaic's layout inference works through, whose time on jax
0.11.2 dominated the kernel's lowering with warpgroup semantics (bench_persistent.py's `lowering_profile`); the
kernel lowers with lane semantics (`kernel._LOWERING`), which `--warpgroup` overrides.

    python experiments/persistent_lowering.py --tokens 4 --ops GEMV+ATTN+INDEX_TOPK   # several bodies together

`--ptxas` (GPU) adds each entry's compiler report (`pallas_kernels.persistent.ptxas`): registers, spills and
ptxas' notes of the kernel with only that opcode's bodies, i.e. which bodies set the one function's register
pressure.

`--warpgroup` lowers with warpgroup semantics on any jax (`_compat.warpgroup_lowering`): jax 0.11's default, whose
layout inference is most of the device's lowering time, reproduced on a CPU host with jax 0.10.2 for the bodies
its older inference takes (INDEX_SCORE, INDEX_TOPK, ROUTER_SELECT, IK_WRITE, MOE_COMBINE, EMBED; not the
wgmma-swizzled GEMV family or ATTN).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _failure(e: BaseException) -> dict:
    """The exception; the innermost jaxpr equation being lowered (primitive, user source line); the Mosaic op
    under inspection where a layout-inference check raised."""
    info = {"error": f"{type(e).__name__}: {str(e)[:600]}", "traceback_tail": traceback.format_exc()[-800:]}
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        eqn = frame.f_locals.get("eqn")
        if eqn is not None and hasattr(eqn, "primitive"):  # the innermost jaxpr equation being lowered
            from jax._src import source_info_util
            info["primitive"] = str(eqn.primitive)
            info["location"] = source_info_util.summarize(eqn.source_info)
        if frame.f_code.co_name.startswith("_check") and "op" in frame.f_locals:
            op = frame.f_locals["op"]
            info["mosaic_op"] = str(op)[:800]
            info["location"] = str(getattr(op, "location", ""))[:400]
        tb = tb.tb_next
    return info


def check(plan, ops: list[str], max_len: int, tiles, warpgroup: bool = False, with_ptxas: bool = False):
    """Yields, per opcode name ("skeleton" = no bodies), its row: lower + compile times or the failure. On a CPU
    host: lowering for CUDA only (what CI's jax accepts). with_ptxas (GPU): the row's `ptxas` is the compiler's
    report on that kernel (`persistent.ptxas.report`: registers, spills, notes)."""
    import jax

    from pallas_kernels import _compat
    from pallas_kernels.persistent.format import Op
    from pallas_kernels.persistent import ptxas
    from pallas_kernels.persistent.kernel import abstract_step_args, kernel_chars, persistent_step

    on_gpu = jax.default_backend() == "gpu"
    args = abstract_step_args(plan, max_len)
    for name in ops:
        op_set = frozenset() if name == "skeleton" else frozenset(Op[o] for o in name.split("+"))
        row = {"ops": name}
        t0 = time.perf_counter()
        fn = jax.jit(lambda *a: persistent_step(plan, *a, interpret=False, ops=op_set, tiles=tiles))
        semantics = _compat.warpgroup_lowering() if warpgroup else contextlib.nullcontext()
        try:
            with semantics:
                if on_gpu:
                    lowered = fn.lower(*args)
                else:  # a CPU host: lower for CUDA on an abstract H200 (no compile)
                    with _compat.interpret_mesh("NVIDIA H200", plan.schedule.num_sms):
                        lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
            row["lower_s"] = round(time.perf_counter() - t0, 2)
            row["kernel_chars"] = kernel_chars(lowered)
            t1 = time.perf_counter()
            if on_gpu:
                with ptxas.captured() if with_ptxas else contextlib.nullcontext() as log:
                    lowered.compile()
                row["compile_s"] = round(time.perf_counter() - t1, 2)
                if with_ptxas:
                    got = ptxas.report(log.text)
                    row["ptxas"] = got if got["functions"] else {"error": "no ptxas log during compile()"}
            row["ok"] = True
        except Exception as e:  # noqa: BLE001 -- every failure is the result being measured
            row.update(ok=False, **_failure(e))
        print(name, "ok" if row["ok"] else row["error"][:200], row.get("location", ""), flush=True)
        yield row


def main(argv=None):
    from pallas_kernels.persistent.format import Op
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="glm5_slice")
    p.add_argument("--ops", default="all", help="comma list of opcode names (A+B for several in one kernel), "
                                                "'skeleton', or 'all' (each opcode with a body alone)")
    p.add_argument("--max-len", type=int, default=4352, help="cache rows")
    p.add_argument("--tokens", type=int, default=1, help="T: tokens per step (1 + MTP depth)")
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--slots", type=int, default=None,
                   help="SMEM ring depth of the tile bodies (TileConfig.slots; default: PersistentDecoder's, "
                        "`kernel.fit_tiles`)")
    p.add_argument("--topk-bits", type=int, default=None,
                   help="key bits per radix pass of the indexer bodies (TileConfig.topk_bits; default its default)")
    p.add_argument("--step-tiles", type=int, default=None,
                   help="weight tiles per ring step of GEMV / SWIGLU streams (TileConfig.step_tiles; default its "
                        "default)")
    p.add_argument("--warpgroup", action="store_true",
                   help="lower with warpgroup semantics, as jax 0.11 does (see the module docstring)")
    p.add_argument("--ptxas", action="store_true",
                   help="GPU only: each entry's ptxas report (registers, stack frame, spills, notes) in its row's "
                        "`ptxas`: which bodies set the one-function kernel's register pressure")
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    ops = [o.name for o in Op if o != Op.NOP] if args.ops == "all" else args.ops.split(",")
    from glm_fast import load_config, results
    from pallas_kernels.persistent.kernel import fit_tiles, gpu_candidates, pick_plan, smem_bytes
    from pallas_kernels.persistent.tiles import TileConfig
    tiles = TileConfig(**({"slots": args.slots} if args.slots else {}),
                       **({"topk_bits": args.topk_bits} if args.topk_bits else {}),
                       **({"step_tiles": args.step_tiles} if args.step_tiles else {}))
    plan = pick_plan(load_config(args.config).model, args.tokens, gpu_candidates(num_sms=args.sms), tiles, False)
    tiles = tiles if args.slots else fit_tiles(plan, tiles)  # as PersistentDecoder: the deepest ring that fits
    from pallas_kernels.persistent import attn_tiles
    splits = next((b.shape[0] for b in plan.schedule.buffers if b.name.endswith("/o_part")), None)
    attn = attn_tiles.plan_shape(plan)
    config = {"config": args.config, "max_len": args.max_len, "sms": args.sms, "slots": tiles.slots,
              "tokens": args.tokens, "attn_heads": attn.nh if attn else None, "attn_splits": splits,
              "topk_bits": tiles.topk_bits, "step_tiles": tiles.step_tiles, "warpgroup": args.warpgroup}
    try:
        config["smem_bytes"] = smem_bytes(plan, tiles)
    except ValueError as e:  # the GPU scratch does not fit this config (then every row fails the same way)
        config["smem_error"] = str(e)
    rows = []
    config["ptxas"] = args.ptxas
    # the record is rewritten after each entry: a run cut off by a time limit keeps its rows
    for row in check(plan, ops, args.max_len, tiles, args.warpgroup, args.ptxas):
        rows.append(row)
        record = results.result("persistent_lowering", config, rows)
        path = results.write(record, args.out, args.name or f"persistent_lowering_{args.config}")
    print("wrote", path)
    return record


if __name__ == "__main__":
    main()
