"""End to end, as a user runs it: `batchyard seed --chunks N`, then `batchyard embed` on the
embedded defaults (MongoDB stand-in, local Batch API server with the hash executor, Milvus
Lite), then the same `embed` again (a no-op: nothing new).

Reports, per run: wall time, the peak RSS of the batchyard process (VmHWM, sampled from /proc
until it exits) and of its whole process tree (Prefect's temporary server included), and the
per-stage seconds the run records in run.json (`timings`: snapshot, plan, submit, track = poll
and download, collect, load, wait = idle between polls), and the stage that set the process's
memory high-water mark (run.json `peak_rss_mb`).

    python benchmarks/e2e.py --chunks 20000 200000 1000000 [--engine prefect|local]

Results go to `results/e2e-<n>.json` and, for the sizes run, a table in `results/latest.md`
(section "End to end") and on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STAGES = ("snapshot", "plan", "submit", "track", "wait", "collect", "load")


def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def run_measured(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run a CLI command; wall seconds, exit code, stdout, peak RSS of it and of its tree (MiB)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "batchyard.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"self": 0, "tree": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["self"] = max(peak["self"], _status(proc.pid, "VmHWM"))
            peak["tree"] = max(peak["tree"], sum(_status(p, "VmRSS") for p in _tree(proc.pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return {"exit": proc.returncode, "seconds": round(time.monotonic() - t0, 2), "stdout": out, "stderr": err,
            "peak_rss_mb": round(peak["self"] / 1024), "tree_peak_rss_mb": round(peak["tree"] / 1024)}


def measure(n: int, engine: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"batchyard-e2e-{n}-") as tmp:
        cwd = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
        env.update({"PREFECT_HOME": str(cwd / ".prefect"), "COLUMNS": "200"})
        seeded = run_measured(["seed", "--chunks", str(n)], cwd, env)
        if seeded["exit"] != 0:
            raise RuntimeError(f"seed failed: {seeded['stderr'][-2000:]}")
        runs = {}
        for label in ("embed", "no-op embed"):
            out = run_measured(["embed", "--targets", "targets.yaml", "--engine", engine, "--json"], cwd, env)
            if out["exit"] not in (0, 3):
                raise RuntimeError(f"{label} exited {out['exit']}: {out['stderr'][-3000:]}")
            info = json.loads(out["stdout"])
            runs[label] = {
                "exit": out["exit"], "seconds": out["seconds"], "peak_rss_mb": out["peak_rss_mb"],
                "tree_peak_rss_mb": out["tree_peak_rss_mb"], "results": info["final"]["results"],
                "failures": info["final"]["failures"], "partitions": len(info.get("partitions", [])),
                "shards": info["plan"].get("shards", 0), "requests": info["plan"].get("requests", 0),
                "dedup": info["plan"].get("inputs_deduplicated", 0), "timings": info.get("timings", {}),
                "peaks": info.get("peak_rss_mb", {}),
            }
        return {"chunks": n, "engine": engine, "cpus": os.cpu_count(), "seed_seconds": seeded["seconds"],
                "seed_peak_rss_mb": seeded["peak_rss_mb"], "load_average": os.getloadavg(),
                "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **runs}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| chunks | run | exit | wall s | peak RSS MB | peak set in | tree peak RSS MB | partitions | shards | results | "
            + " | ".join(f"{s} s" for s in STAGES) + " |")
    lines = [head, "|" + "---:|" * (10 + len(STAGES))]
    for r in rows:
        for label in ("embed", "no-op embed"):
            x = r[label]
            t = x["timings"]
            peaks = x.get("peaks") or {}
            where = max(peaks, key=peaks.__getitem__) if peaks else "-"
            lines.append(
                f"| {r['chunks']:,} | {label} | {x['exit']} | {x['seconds']} | {x['peak_rss_mb']:,} | {where} | "
                f"{x['tree_peak_rss_mb']:,} | {x['partitions']} | {x['shards']} | {x['results']:,} | "
                + " | ".join(f"{t.get(s, 0):.1f}" for s in STAGES) + " |"
            )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["chunks"]: r for r in rows}
    out = []
    if 20_000 in by and 200_000 in by:
        a, b = by[20_000], by[200_000]
        out.append(f"200k vs 20k: wall {b['embed']['seconds'] / a['embed']['seconds']:.1f}x (target <= 10x), "
                   f"peak RSS {b['embed']['peak_rss_mb'] / a['embed']['peak_rss_mb']:.2f}x (target <= 1.5x), "
                   f"no-op {b['no-op embed']['seconds'] / a['no-op embed']['seconds']:.1f}x (target <= 3x)")
    if 1_000_000 in by:
        m = by[1_000_000]["embed"]
        out.append(f"1M: peak RSS {m['peak_rss_mb']:,} MB (target <= 2,048 MB), wall {m['seconds']:.0f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[20_000])
    parser.add_argument("--engine", choices=("prefect", "local"), default="prefect")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for n in args.chunks:
        row = measure(n, args.engine)
        (RESULTS / f"e2e-{n}.json").write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(table([row]), flush=True)
    text = table(rows) + "\n\n" + "\n".join(f"- {line}" for line in ratios(rows))
    print(text)


if __name__ == "__main__":
    main()
