"""Shared plumbing of the benchmarks: isolated worker processes, peak RSS, results, tables.

Every measured variant (pipeline, baseline, load-only reference) runs in its own Python process:
the parent starts `python <script> --worker <variant> ...`; the worker times its stages with
`Stopwatch`, records its peak RSS right after the timed work (`peak_rss_mb`), writes what the
parent needs for the correctness checks, and prints one JSON object as its last stdout line
(with `exit_peak_rss_mb`, the peak including that dump). Nothing is subtracted: each figure
includes the interpreter and the imported libraries.

Peak RSS is the kernel's high-water mark of the worker's own address space (`VmHWM` in
`/proc/self/status`). `getrusage(...).ru_maxrss` is NOT used on Linux: a child's `ru_maxrss`
(and so `RUSAGE_CHILDREN` / `os.wait4` in the parent) starts at the parent's peak RSS, because
the kernel carries it across fork+exec; a driver that built a 1.4 GB data set made every worker
report at least 1.4 GB. The `wait4` value is kept in the results as `rusage_maxrss_mb` for
reference only. Elsewhere (macOS) `ru_maxrss` is the fallback.
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

console = Console(width=None if sys.stdout.isatty() else 160)


def rss_mb(maxrss: int) -> float:
    """`ru_maxrss` in MiB (Linux reports KiB, macOS bytes)."""
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def peak_rss_mb() -> float:
    """Peak RSS of this process's address space so far, in MiB (`VmHWM`; see the module doc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)


class Stopwatch:
    """Times named stages (wall and CPU); after each one also notes the process's peak RSS so far.

    CPU time (`time.process_time`: user + system, all threads) beside wall time shows how much of
    a slow run was waiting for a core that other work on the machine held.
    """

    def __init__(self) -> None:
        self.stages: list[dict[str, float | str]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.stages.append(
            {
                "stage": name,
                "seconds": round(time.perf_counter() - start, 3),
                "cpu_seconds": round(time.process_time() - cpu, 3),
                "peak_rss_mb": peak_rss_mb(),
            }
        )

    @property
    def seconds(self) -> float:
        return round(sum(float(s["seconds"]) for s in self.stages), 3)


def worker_result(sw: Stopwatch, rows: int, **extra: Any) -> dict[str, Any]:
    """The standard worker answer: rows, total seconds, stages, peak RSS of the timed work."""
    return {
        "rows": rows,
        "seconds": sw.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "stages": sw.stages,
        **extra,
    }


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as the last stdout line (the parent parses it)."""
    print(json.dumps({**result, "exit_peak_rss_mb": peak_rss_mb()}), flush=True)


def run_worker(script: Path, args: list[str]) -> dict[str, Any]:
    """Run `python script --worker ...` in a fresh process; its JSON result (+ `wait4` maxrss)."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)  # stderr passes through (progress)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves to get its rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["rusage_maxrss_mb"] = round(rss_mb(usage.ru_maxrss), 1)  # inflated: see module doc
    return result


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import numpy
    import polars

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # other work on the box skews timings
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "polars": polars.__version__,
        "numpy": numpy.__version__,
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write `results/<name>-<UTC timestamp>.json` and return its path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(
        json.dumps({"name": name, "utc": stamp, "machine": machine(), **payload}, indent=2) + "\n"
    )
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
            cells += [
                f"{m['seconds']:.2f}",
                f"{rate(m['rows'], m['seconds']):,.0f}",
                f"{m['peak_rss_mb']:,.0f}",
            ]
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
    t.add_column("CPU s", justify="right")
    t.add_column("peak RSS so far MB", justify="right")
    for name, res in variants.items():
        for s in res["stages"]:
            cpu = f"{s['cpu_seconds']:.2f}" if "cpu_seconds" in s else ""
            t.add_row(name, str(s["stage"]), f"{s['seconds']:.2f}", cpu, f"{s['peak_rss_mb']:,.0f}")
    return t
