"""Runs a sweep file from configs/sweeps/ (DSA top-k, indexer sharing, MTP depth, backend, layout, batch, context):
one JSON line per run in <out>/results.jsonl, then table.md and one PNG per (metric, swept axis) beside it.

    python experiments/sweep.py configs/sweeps/tiny_smoke.yaml --out experiments/results/sweeps/tiny_smoke
    python experiments/sweep.py index_topk                  # by name; rerun to resume (finished points skip)
    python experiments/sweep.py mtp_depth --dry-run         # list the points without running them

The sweep format and the run kinds (decode, train, acceptance) are documented in `glm_fast.sweep`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT))

from glm_fast import results  # noqa: E402
from glm_fast.sweep import SweepError, load_sweep, run_sweep  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="a sweep name (configs/sweeps/<name>.yaml) or a path to a sweep YAML")
    p.add_argument("--out", default=None, help="output directory (default experiments/results/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="validate the file and list its points")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing run (default: record it "
                                                            "as an error line, go on, retry it on the next call)")
    args = p.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.dry_run:
        for pt in sweep.points:
            print(f"{pt.values} seed {pt.seed}")
        print(f"{len(sweep.points)} points, kind {sweep.kind}, base {sweep.base}")
        return []
    out = pathlib.Path(args.out) if args.out else results.RESULTS_DIR / "sweeps" / sweep.name
    lines = run_sweep(sweep, out, fail_fast=args.fail_fast)
    print((out / "table.md").read_text())
    failed = [ln for ln in lines if ln.get("status") != "ok"]
    print(f"{len(lines) - len(failed)}/{len(sweep.points)} points done; results in {out}")
    if failed:
        raise SystemExit(f"{len(failed)} runs failed (see 'error' in {out / 'results.jsonl'}); rerun to retry them")
    return lines


if __name__ == "__main__":
    try:
        main()
    except SweepError as err:
        sys.exit(f"error: {err}")
