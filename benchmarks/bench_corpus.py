"""Change detection that costs what the changes cost, not what the corpus costs (issue 17 item 5).

For each corpus size (100k and 1M chunks by default), a project directory is seeded (chunks
written two days ago) and embedded once (the backfill, cached in `benchmarks/.data/corpus-<n>`
and reused by later runs of this script; 16 dimensions keep Milvus Lite small). Then, as a user
runs it (`batchyard embed --engine local --json`, a fresh process each time):

1. a no-op embed, reading changes only (the default: `mongo.fields.updated_at`);
2. the same with `--full-scan` (the full reconcile, the path of a source without a change field);
3. 100 chunks edited, then an embed reading changes only;
4. 100 more chunks edited, then an embed with `--full-scan`.

Each row gives the wall time of the command and the run's own snapshot time (detection,
selection, pruning); the ratios 1M / 100k are the targets: a no-op within 1.5x, 100 changes
within 3x. Writes `results/corpus-latest.md`.

    python benchmarks/bench_corpus.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
ENV = {"BATCHYARD_EMBEDDING__DIMENSIONS": "16", "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT",
       "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.5"}


def env_for(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    return {**env, **ENV, "PREFECT_HOME": str(cwd / ".prefect")}


def cli(cwd: Path, *args: str) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "batchyard.cli", *args], cwd=cwd, env=env_for(cwd),
                         capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"batchyard {' '.join(args)} exited {out.returncode}: {out.stderr[-3000:]}")
    return (json.loads(out.stdout) if "--json" in args else {}), seconds


def backfilled(n: int) -> Path:
    """A project directory with `n` chunks seeded two days ago and embedded once (cached)."""
    cached = DATA / f"corpus-{n}"
    if (cached / "done").exists():
        return cached
    shutil.rmtree(cached, ignore_errors=True)
    cached.mkdir(parents=True)
    code = (
        "from datetime import UTC, datetime, timedelta\n"
        "from batchyard.context import RunContext\n"
        "from batchyard.seed import seed_store, targets_for\n"
        "from batchyard.settings import load_settings\n"
        "from batchyard.targets import write_targets\n"
        "with RunContext(load_settings()) as ctx:\n"
        f"    report = seed_store(ctx.store, {n}, fields=ctx.settings.mongo.fields, seed=7,\n"
        "                        updated_at=datetime.now(UTC) - timedelta(days=2))\n"
        "    ctx.store.save()\n"
        "write_targets('targets.yaml', targets_for(report, all_documents=True))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=cached, env=env_for(cached), check=True, timeout=7200)
    info, seconds = cli(cached, "embed", "--targets", "targets.yaml", "--engine", "local", "--json")
    assert info["final"]["results"] == n, info["final"]
    (cached / "backfill.json").write_text(json.dumps({"seconds": round(seconds, 1), "timings": info["timings"]}))
    (cached / "done").write_text("ok")
    return cached


def edit(cwd: Path, k: int, seed: int) -> None:
    code = (
        "from batchyard.context import RunContext\n"
        "from batchyard.seed_changes import edit_chunks\n"
        "from batchyard.settings import load_settings\n"
        "with RunContext(load_settings()) as ctx:\n"
        f"    edit_chunks(ctx.store.chunks, {k}, fields=ctx.settings.mongo.fields, seed={seed})\n"
        "    ctx.store.save()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env_for(cwd), check=True, timeout=3600)


def measure(n: int) -> list[dict[str, Any]]:
    work = backfilled(n)  # each case leaves it embedded and consistent again: the next run starts alike
    rows = []
    embed = ("embed", "--targets", "targets.yaml", "--engine", "local", "--json")
    for name, changes, extra in (("no-op, changes only", 0, ()), ("no-op, --full-scan", 0, ("--full-scan",)),
                                 ("100 edits, changes only", 100, ()), ("100 edits, --full-scan", 100, ("--full-scan",))):
        if changes:
            edit(work, changes, seed=len(rows))
        info, seconds = cli(work, *embed, *extra)
        rows.append({"size": n, "case": name, "seconds": round(seconds, 2),
                     "snapshot_s": info["timings"].get("snapshot", 0.0), "read": info["snapshot"].get("read"),
                     "chunks": info["snapshot"].get("chunks", 0), "results": info["final"]["results"],
                     "candidates": sum(info["detection"]["candidates"].values())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [r for n in sizes for r in measure(n)]
    by = {(r["size"], r["case"]): r for r in rows}
    lines = [f"# Corpus: change detection against the full scan ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", "",
             f"`python benchmarks/bench_corpus.py --sizes {args.sizes}` (`embed --engine local`, a fresh process "
             "each, after a backfill of the seeded corpus; 16 dimensions)", "",
             "| chunks | case | wall | snapshot stage | read | chunks read as candidates | embedded |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']:,} | {r['case']} | {r['seconds']:.2f} s | {r['snapshot_s']:.2f} s | {r['read']} | "
                     f"{r['candidates']:,} | {r['results']:,} |")
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        lines += ["", f"| case | {large:,} / {small:,} (wall) | target |", "|---|---:|---|"]
        for case, target in (("no-op, changes only", "<= 1.5x"), ("100 edits, changes only", "<= 3x"),
                             ("no-op, --full-scan", "(baseline)"), ("100 edits, --full-scan", "(baseline)")):
            ratio = by[(large, case)]["seconds"] / by[(small, case)]["seconds"]
            lines.append(f"| {case} | {ratio:.2f}x | {target} |")
    for n in sizes:
        backfill = json.loads((DATA / f"corpus-{n}" / "backfill.json").read_text())
        lines.append(f"\nBackfill of {n:,} chunks (cached, measured once): {backfill['seconds']} s.")
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "corpus-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
