"""Run every benchmark, save the results, print one summary table.

- full (default): plan on 1,000,000 chunks, join on 200,000 inputs x 256 dims (about 2 minutes
  on 2 cores, plus about 1 minute to build the cached data the first time); also rewrites
  `benchmarks/results/latest.md`.
- `--quick`: plan on 20,000 chunks, join on 20,000 inputs (well under a minute); checks the
  scripts work and leaves `latest.md` alone.

Each benchmark writes `benchmarks/results/<name>-<UTC timestamp>.json` (git-ignored).

Usage:
    python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from typing import Any

import bench_join
import bench_plan
from harness import (
    RESULTS_DIR,
    comparison_markdown,
    comparison_table,
    console,
    machine,
    write_result,
)

FULL = {"chunks": 1_000_000, "inputs": 200_000}
QUICK = {"chunks": 20_000, "inputs": 20_000}
DIMS = 256
PER_REQUEST = 1_000
SEED = 0


def stages_markdown(name: str, runs: dict[str, dict[str, Any]]) -> str:
    """Per-stage seconds and peak RSS so far, as Markdown."""
    out = f"\n**{name} stages** (seconds; peak RSS so far, MB)\n\n| variant | stage | s | peak RSS MB |\n|---|---|---:|---:|\n"
    for variant, res in runs.items():
        for s in res["stages"]:
            out += f"| {variant} | {s['stage']} | {s['seconds']:.2f} | {s['peak_rss_mb']:,.0f} |\n"
    return out


def latest_markdown(plan: dict[str, Any], join: dict[str, Any], sizes: dict[str, int]) -> str:
    m = machine()
    load = plan["runs"]["load"]
    p = plan["rows"][-1]["pipeline"]
    b = plan["rows"][-1]["baseline"]
    fb = join["file_bytes"]
    return (
        f"# Latest benchmark figures\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python benchmarks/run_all.py` "
        f"(plan {sizes['chunks']:,} chunks; join {sizes['inputs']:,} inputs x {DIMS} dims, "
        f"{PER_REQUEST:,} inputs per request) on {m['cpus']} CPUs, Python {m['python']}, "
        f"Polars {m['polars']}. Load average at the start: plan {plan['load_at_start']}, "
        f"join {join['load_at_start']} (other work on the machine inflates timings).\n\n"
        + comparison_markdown(plan["rows"] + join["rows"])
        + f"\nPeak RSS is each variant's whole process (interpreter, libraries, data). Reading the plan "
        f"input alone: {load['seconds']:.2f} s, {load['peak_rss_mb']:,.0f} MB.\n\n"
        f"Plan output: pipeline {p['requests']:,} requests in {p['shards']} shards, baseline "
        f"{b['requests']:,} requests in {b['shards']} shards; {p['shard_bytes'] / 2**20:,.0f} MiB of "
        f"request lines and {p['tokens']:,} tokens in both.\n\n"
        f"Join output files: base64 {fb['base64.jsonl'] / 2**20:,.1f} MiB, float "
        f"{fb['float.jsonl'] / 2**20:,.1f} MiB ({fb['float.jsonl'] / fb['base64.jsonl']:.2f}x).\n"
        + stages_markdown("plan", {k: v for k, v in plan["runs"].items() if k != "load"})
        + stages_markdown("join", join["runs"])
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (< 1 minute)")
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL
    suffix = "-quick" if args.quick else ""

    plan = bench_plan.bench(sizes["chunks"], None, SEED)
    bench_plan.report(plan)
    console.print(f"results: {write_result('plan' + suffix, plan)}")

    join = bench_join.bench(sizes["inputs"], DIMS, PER_REQUEST, SEED)
    bench_join.report(join)
    console.print(f"results: {write_result('join' + suffix, join)}")

    console.print(comparison_table("summary: pipeline vs baseline", plan["rows"] + join["rows"]))
    console.print(f"load average now: {[round(x, 2) for x in os.getloadavg()]}")
    if not args.quick:
        path = RESULTS_DIR / "latest.md"
        path.write_text(latest_markdown(plan, join, sizes))
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
