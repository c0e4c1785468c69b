"""Shared plumbing of the benchmarks: isolated worker processes, peak RSS, results, tables.

Every measured variant (pipeline, baseline, load-only reference) runs in its own Python process:

- the parent starts `python <script> --worker <variant> ...` and reaps it with `os.wait4`, which
  returns that one child's resource usage (`ru_maxrss`: its peak resident set size); nothing is
  subtracted, so each figure includes the interpreter and imported libraries;
- the worker times its stages with `Stopwatch`, records its own peak RSS (`getrusage(RUSAGE_SELF)`)
  right after the timed work, then writes what the parent needs for the correctness checks, and
  prints one JSON object as its last stdout line.

So `peak_rss_mb` is the peak of the timed work, and `process_peak_rss_mb` (from `wait4`) is the
peak of the whole worker including the post-timing dump (the same value as
`getrusage(RUSAGE_CHILDREN)` would give for a single child).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

console = Console()


def rss_mb(maxrss: int) -> float:
    """`ru_maxrss` in MiB (Linux reports KiB, macOS bytes)."""
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def peak_rss_mb() -> float:
    """Peak RSS of this process so far, in MiB."""
    return round(rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)


class Stopwatch:
    """Times named stages; after each one also notes the process's peak RSS so far."""

    def __init__(self) -> None:
        self.stages: list[dict[str, float | str]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stages.append(
            {"stage": name, "seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb()}
        )

    @property
    def seconds(self) -> float:
        return round(sum(float(s["seconds"]) for s in self.stages), 3)


def worker_result(sw: Stopwatch, rows: int, **extra: Any) -> dict[str, Any]:
    """The standard worker answer: rows, total seconds, stages, peak RSS of the timed work."""
    return {"rows": rows, "seconds": sw.seconds, "peak_rss_mb": peak_rss_mb(), "stages": sw.stages, **extra}


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as the last stdout line (the parent parses it)."""
    print(json.dumps(result), flush=True)


def run_worker(script: Path, args: list[str]) -> dict[str, Any]:
    """Run `python script --worker ...` in a fresh process; its JSON result plus `wait4` peak RSS."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)  # stderr passes through (progress)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves to get this child's rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["process_peak_rss_mb"] = round(rss_mb(usage.ru_maxrss), 1)
    return result


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import numpy
    import polars

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "polars": polars.__version__,
        "numpy": numpy.__version__,
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write `results/<name>-<UTC timestamp>.json` and return its path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"name": name, "utc": stamp, "machine": machine(), **payload}, indent=2) + "\n")
    return path


# comparison rows: {"stage": str, "rows": int, "pipeline": worker result, "baseline": worker result}


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("nan")


def comparison_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """Pipeline and baseline side by side: seconds, rows/s, peak RSS, and the speedup."""
    t = Table(title=title)
    t.add_column("stage")
    t.add_column("rows", justify="right")
    for who in ("pipeline", "baseline"):
        t.add_column(f"{who} s", justify="right")
        t.add_column(f"{who} rows/s", justify="right")
        t.add_column(f"{who} peak RSS MB", justify="right")
    t.add_column("speedup", justify="right")
    for r in rows:
        p, b = r["pipeline"], r["baseline"]
        cells = [r["stage"], f"{r['rows']:,}"]
        for m in (p, b):
            cells += [f"{m['seconds']:.2f}", f"{rate(m['rows'], m['seconds']):,.0f}", f"{m['peak_rss_mb']:,.0f}"]
        cells.append(f"{speedup(r):.1f}x")
        t.add_row(*cells)
    return t


def speedup(row: dict[str, Any]) -> float:
    """Baseline time over pipeline time, both per row (so a prefix baseline compares fairly)."""
    p, b = row["pipeline"], row["baseline"]
    return rate(p["rows"], p["seconds"]) / rate(b["rows"], b["seconds"])


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The same comparison as a Markdown table."""
    head = (
        "| stage | rows | pipeline s | pipeline rows/s | pipeline peak RSS MB "
        "| baseline s | baseline rows/s | baseline peak RSS MB | speedup |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = ""
    for r in rows:
        p, b = r["pipeline"], r["baseline"]
        body += (
            f"| {r['stage']} | {r['rows']:,} "
            f"| {p['seconds']:.2f} | {rate(p['rows'], p['seconds']):,.0f} | {p['peak_rss_mb']:,.0f} "
            f"| {b['seconds']:.2f} | {rate(b['rows'], b['seconds']):,.0f} | {b['peak_rss_mb']:,.0f} "
            f"| {speedup(r):.1f}x |\n"
        )
    return head + body


def stages_table(title: str, variants: dict[str, dict[str, Any]]) -> Table:
    """Per-stage seconds and peak-RSS-so-far of each variant (where the time and memory go)."""
    t = Table(title=title)
    t.add_column("variant")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    t.add_column("peak RSS so far MB", justify="right")
    for name, res in variants.items():
        for s in res["stages"]:
            t.add_row(name, str(s["stage"]), f"{s['seconds']:.2f}", f"{s['peak_rss_mb']:,.0f}")
    return t
