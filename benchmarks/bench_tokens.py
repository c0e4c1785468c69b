"""Token counting benchmark: exact counts of 1M chunk texts, in-process vs the pool vs tiktoken.

Variants (each in its own process, on the first N texts of the cached corpus from `data.py`):

- `tiktoken` (baseline): stock `tiktoken` `encode` per text, one core (offline vocabularies via
  `ensure_tiktoken_offline()`), as the plan benchmark's baseline does.
- `in-process`: `token_counts(texts, workers=1)`: bpe-openai on one core, distinct texts once.
- `in-process, no dedupe`: the same with `dedupe=False` (what finding the repeats costs or saves).
- `pool xN`: `token_counts(texts, workers=N)`, the process pool of N workers; N=1 calls the
  pool directly (`token_counts` counts in-process for one worker), so it shows the transport cost.
- `pool xN, no dedupe`: the largest pool with `dedupe=False`.
- `crossover`: in one process, in-process vs a warm pool on the first 500 ... 100,000 texts, best
  of 5 each: the input size from which the pool wins (`MIN_POOL_ROWS`).

Each pool variant first starts its workers (stage `start pool`: one call on 1,000 texts), then
times the count. Timed work starts from the texts already in memory as a Polars column. CPU
seconds add the parent's and the workers' (from `/proc/<pid>/stat`): on a shared machine the wall
time of a pool depends on what else runs, its CPU time much less. Worker peak RSS is each worker's
`VmHWM`. Check: every variant returns exactly the baseline's counts, text by text.

Usage:
    python benchmarks/bench_tokens.py --texts 1000000 [--workers 1,2] [--seed 0]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
from rich.table import Table

import data
from batchyard import tokens
from batchyard.tokens import ensure_tiktoken_offline, token_counts
from harness import Stopwatch, console, emit, run_worker, worker_result, write_result

ENCODING = "cl100k_base"
CROSSOVER_SIZES = [500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]
OVER_LIMIT = 8_192  # tokens per embeddings input


# per-process figures of the pool's workers


def _children() -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (`/proc/<pid>/stat` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _cpu_now() -> float:
    return time.process_time() + sum(_cpu_seconds(pid) for pid in _children())


# workers (each runs in its own process)


def run_variant(variant: str, path: Path, n_rows: int, out: Path) -> dict[str, Any]:
    sw = Stopwatch()
    with sw.stage("read parquet"):
        texts = pl.read_parquet(path, columns=["text"], n_rows=n_rows)["text"]
    count, workers = _counter(variant, texts)
    if workers:
        with sw.stage("start pool"):
            count(texts.head(1_000))
    cpu = _cpu_now()
    with sw.stage("count"):
        counts = count(texts)
    cpu = _cpu_now() - cpu
    extra: dict[str, Any] = {}
    if variant.startswith("pool") and "no dedupe" not in variant:
        with sw.stage(f"tokens_over({OVER_LIMIT})"):
            extra["over_limit"] = int(tokens.tokens_over(texts, OVER_LIMIT, ENCODING).sum())
    count_stage = next(s for s in sw.stages if s["stage"] == "count")
    pids = _children()
    counts.to_frame("tokens").write_parquet(out / "counts.parquet")
    return {
        **worker_result(sw, texts.len(), **extra),
        "seconds": count_stage["seconds"],
        "cpu_seconds": round(cpu, 2),
        "workers": len(pids),
        "worker_peak_rss_mb": [_peak_rss_mb(pid) for pid in pids],
        "tokens": int(counts.sum()),
    }


def _counter(variant: str, texts: pl.Series) -> tuple[Any, int]:
    """The function to time for a variant, and its number of worker processes (0: none)."""
    if variant == "tiktoken":
        import tiktoken

        ensure_tiktoken_offline()
        enc = tiktoken.get_encoding(ENCODING)

        def baseline(s: pl.Series) -> pl.Series:
            lens = [len(enc.encode(t, disallowed_special=())) for t in s.to_list()]
            return pl.Series(lens, dtype=pl.Int64)

        return baseline, 0
    dedupe = "no dedupe" not in variant
    if variant.startswith("in-process"):
        return (lambda s: token_counts(s, ENCODING, workers=1, dedupe=dedupe)), 0
    n = int(variant.split()[1].removeprefix("x").rstrip(","))
    if n == 1:  # token_counts never uses a pool of one: call the pool itself
        return (lambda s: tokens._pool_counts(s, None, ENCODING, None, 1)), 1
    return (lambda s: token_counts(s, ENCODING, workers=n, dedupe=dedupe, min_pool_rows=0)), n


def run_crossover(path: Path, workers: int, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` seconds of in-process vs a warm pool at each input size."""
    texts = pl.read_parquet(path, columns=["text"], n_rows=max(CROSSOVER_SIZES))["text"]
    start = time.perf_counter()
    token_counts(texts.head(1_000), ENCODING, workers=workers, min_pool_rows=0)
    cold = time.perf_counter() - start
    rows = []
    for size in CROSSOVER_SIZES:
        part = texts.head(size)
        best = {"in_process": float("inf"), "pool": float("inf")}
        for _ in range(repeats):
            for name, n in (("in_process", 1), ("pool", workers)):
                start = time.perf_counter()
                token_counts(part, ENCODING, workers=n, min_pool_rows=0)
                best[name] = min(best[name], time.perf_counter() - start)
        rows.append({"rows": size, **{k: round(v, 4) for k, v in best.items()}})
    return {"workers": workers, "pool_start_seconds": round(cold, 3), "sizes": rows}


# driver


def measure(variant: str, path: Path, n_rows: int) -> dict[str, Any]:
    """Run one variant in a fresh process; its result, with its counts loaded."""
    out = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    try:
        args = ["--worker", variant, "--path", str(path), "--rows", str(n_rows), "--out", str(out)]
        res = run_worker(Path(__file__), args)
        res["_counts"] = pl.read_parquet(out / "counts.parquet")["tokens"]
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def crossover_at(sizes: list[dict[str, Any]]) -> int | None:
    """The smallest size from which the pool is faster at every larger measured size."""
    at = None
    for row in reversed(sizes):
        if row["pool"] >= row["in_process"]:
            break
        at = row["rows"]
    return at


def bench(n_texts: int, workers: list[int], seed: int) -> dict[str, Any]:
    path = data.ensure_corpus(max(n_texts, max(CROSSOVER_SIZES)), seed)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    console.print(f"[bold]tokens[/]: corpus {path.name}, {n_texts:,} texts, pools of {workers}")
    variants = ["tiktoken", "in-process", "in-process, no dedupe"]
    variants += [f"pool x{n}" for n in workers] + [f"pool x{max(workers)}, no dedupe"]
    runs = {}
    for v in variants:
        runs[v] = measure(v, path, n_texts)
        console.print(f"  {v}: {runs[v]['seconds']:.2f} s")
    ref = runs["tiktoken"].pop("_counts")
    for v in variants[1:]:
        got = runs[v].pop("_counts")
        assert got.equals(ref), f"{v}: counts differ from tiktoken's"
    console.print(f"[green]check ok[/]: every variant counted {runs['tiktoken']['tokens']:,} tokens, text by text equal")
    args = ["--worker", "crossover", "--path", str(path), "--rows", str(max(workers)), "--out", "-"]
    cross = run_worker(Path(__file__), args)
    cross["crossover_rows"] = crossover_at(cross["sizes"])
    return {
        "texts": n_texts,
        "runs": runs,
        "crossover": cross,
        "load_at_start": load_at_start,
        "load_at_end": [round(x, 2) for x in os.getloadavg()],
        "corpus": {"path": path.name, **data.describe(path)},
    }


def report(result: dict[str, Any]) -> None:
    runs = result["runs"]
    base, single = runs["tiktoken"], runs["in-process"]
    t = Table(title=f"token counts of {result['texts']:,} texts ({ENCODING})")
    for col in ("variant", "s", "texts/s", "CPU s", "peak RSS MB", "worker peak RSS MB"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    t.add_column("vs tiktoken", justify="right")
    t.add_column("vs in-process", justify="right")
    for name, r in runs.items():
        t.add_row(
            name,
            f"{r['seconds']:.2f}",
            f"{r['rows'] / r['seconds']:,.0f}",
            f"{r['cpu_seconds']:.2f}",
            f"{r['peak_rss_mb']:,.0f}",
            " + ".join(f"{x:,.0f}" for x in r["worker_peak_rss_mb"]) or "-",
            f"{base['seconds'] / r['seconds']:.1f}x",
            f"{single['seconds'] / r['seconds']:.2f}x",
        )
    console.print(t)
    for name, r in runs.items():
        extra = {s["stage"]: s["seconds"] for s in r["stages"] if s["stage"] != "count"}
        console.print(f"  {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in extra.items()))
        if "over_limit" in r:
            console.print(f"    texts over {OVER_LIMIT:,} tokens: {r['over_limit']:,}")
    cross = result["crossover"]
    c = Table(title=f"crossover: in-process vs a warm pool of {cross['workers']} (best of 5, ms)")
    for col in ("texts", "in-process ms", "pool ms", "pool / in-process"):
        c.add_column(col, justify="right")
    for row in cross["sizes"]:
        ratio = row["pool"] / row["in_process"]
        c.add_row(f"{row['rows']:,}", f"{row['in_process'] * 1e3:.1f}", f"{row['pool'] * 1e3:.1f}", f"{ratio:.2f}")
    console.print(c)
    console.print(
        f"pool start (first call, {cross['workers']} workers): {cross['pool_start_seconds']:.2f} s; "
        f"the pool wins from {cross['crossover_rows'] or 'no measured size'} texts; "
        f"MIN_POOL_ROWS is {tokens.MIN_POOL_ROWS:,}"
    )
    console.print(f"load average: start {result['load_at_start']}, end {result['load_at_end']}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--texts", type=int, default=1_000_000)
    ap.add_argument("--workers", default="1,2", help="pool sizes, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "crossover":
        emit(run_crossover(args.path, args.rows))
    elif args.worker:
        emit(run_variant(args.worker, args.path, args.rows, args.out))
    else:
        result = bench(args.texts, [int(x) for x in args.workers.split(",")], args.seed)
        report(result)
        console.print(f"results: {write_result('tokens', result)}")


if __name__ == "__main__":
    main()
