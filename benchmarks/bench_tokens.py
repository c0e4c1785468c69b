"""Token counting benchmark: exact counts of 1M chunk texts, in-process vs the pool vs tiktoken.

Variants (each in its own process, on the first N texts of the cached corpus from `data.py`):

- `tiktoken` (baseline): stock `tiktoken` `encode` per text, one core (offline vocabularies via
  `ensure_tiktoken_offline()`), as the plan benchmark's baseline does.
- `in-process`: `token_counts(texts, workers=1)`: bpe-openai on one core, each distinct text once.
- `in-process, dedupe=False`: every text counted, repeats too: what finding the repeats costs or
  saves.
- `pool xN`: `token_counts(texts, workers=N)`, the process pool of N workers. `token_counts`
  counts in-process for one worker, so `pool x1` calls the pool itself (no dedupe): next to
  `in-process, dedupe=False` it shows what handing the texts to a worker costs.
- `pool xN, dedupe=False`: the largest pool, every text counted (like the next two).
- `pool xN, Python lists` / `pool xN, pickled Series slices`: the same work fed to the workers two
  other ways, to compare with the one in-memory Arrow IPC file that `token_counts` writes and its
  workers memory-map: each task a pickled Python list of str; or each task a zero-copy slice of
  the column, which Polars pickles as Arrow IPC (both go through the pool's pipes).
- `crossover`: in one process, in-process vs a warm pool on the first 500 ... 200,000 texts (best
  of 5, or 3 from 50,000): the input size from which a running pool wins (`POOL_MIN_BYTES`), and
  with the pool's start time, the size from which starting it pays (`POOL_START_MIN_BYTES`).

Each pool variant first starts its workers (stage `start pool`: one task per worker), then times
the count. Timed work starts from the texts already in memory as a Polars column. CPU seconds add
the parent's and the workers' (from `/proc/<pid>/stat`): on a shared machine the wall time of a
pool depends on what else runs, its CPU time much less. Worker peak RSS is each worker's `VmHWM`
(a worker also imports this script, as every spawned worker imports its parent's main module).
Check: every variant returns exactly the baseline's counts, text by text.

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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
from rich.table import Table

import data
from batchyard import tokens
from batchyard.tokens import ensure_tiktoken_offline, token_counts
from harness import Stopwatch, console, emit, run_worker, worker_result, write_result

ENCODING = "cl100k_base"
CROSSOVER_SIZES = [500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000]
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


# the variants


@dataclass(frozen=True)
class Variant:
    """One way to count: `how` is tiktoken, token_counts, pool (the pool itself), lists, series."""

    how: str
    workers: int = 1
    dedupe: bool = True


def variants(pools: list[int]) -> dict[str, Variant]:
    top = max(pools)
    out = {
        "tiktoken": Variant("tiktoken"),
        "in-process": Variant("token_counts", 1),
        "in-process, dedupe=False": Variant("token_counts", 1, dedupe=False),
    }
    for n in pools:  # token_counts counts in-process for one worker: a pool of one is called as is
        out[f"pool x{n}"] = Variant("token_counts", n) if n > 1 else Variant("pool", 1, False)
    out[f"pool x{top}, dedupe=False"] = Variant("token_counts", top, dedupe=False)
    out[f"pool x{top}, Python lists"] = Variant("lists", top, dedupe=False)
    out[f"pool x{top}, pickled Series slices"] = Variant("series", top, dedupe=False)
    return out


def _counter(v: Variant) -> tuple[Callable[[pl.Series], pl.Series], Callable[[], Any] | None]:
    """The function a variant times, and one that starts its pool's workers (None: no pool)."""
    if v.how == "tiktoken":
        import tiktoken

        ensure_tiktoken_offline()
        enc = tiktoken.get_encoding(ENCODING)
        return lambda s: pl.Series(
            [len(enc.encode(t, disallowed_special=())) for t in s.to_list()], dtype=pl.Int64
        ), None
    warm = pl.Series(["warm up"] * 4 * v.workers)  # one task per text: every worker starts
    if v.how == "pool":
        return partial(_pool_of, v.workers), partial(_pool_of, v.workers, warm)
    if v.how == "token_counts":
        count = partial(_token_counts, v.workers, v.dedupe)
        return count, partial(count, warm) if v.workers > 1 else None
    pool = ProcessPoolExecutor(v.workers, mp_context=multiprocessing.get_context("forkserver"))
    count = partial(_via_lists if v.how == "lists" else _via_series, pool, v.workers)
    return count, partial(_via_lists, pool, v.workers, warm)


def _token_counts(workers: int, dedupe: bool, texts: pl.Series) -> pl.Series:
    return token_counts(texts, ENCODING, workers=workers, dedupe=dedupe, min_pool_bytes=0)


def _pool_of(workers: int, texts: pl.Series) -> pl.Series:
    return tokens._pool_counts(texts, None, ENCODING, None, workers)


# the two transports token_counts does not use (it writes the column once to a memory file)


def _task_rows(texts: pl.Series, workers: int) -> int:
    """Rows per task, as `token_counts` sizes them: at most TASK_ROWS, four tasks per worker."""
    return max(1, min(tokens.TASK_ROWS, -(-texts.len() // (4 * workers))))


def _via_lists(pool: ProcessPoolExecutor, workers: int, texts: pl.Series) -> pl.Series:
    """Each task a Python list of str, pickled string by string."""
    rows = _task_rows(texts, workers)
    lists = (texts.slice(i, rows).to_list() for i in range(0, texts.len(), rows))
    return pl.Series([n for part in pool.map(_count_list, lists) for n in part], dtype=pl.Int64)


def _count_list(values: list[str]) -> list[int]:
    return tokens.count_tokens(values, ENCODING)


def _via_series(pool: ProcessPoolExecutor, workers: int, texts: pl.Series) -> pl.Series:
    """Each task a zero-copy slice, pickled by Polars (Arrow IPC) when a worker is free for it."""
    rows = _task_rows(texts, workers)
    slices = [texts.slice(i, rows) for i in range(0, texts.len(), rows)]
    return pl.concat(list(pool.map(_count_series, slices)))


def _count_series(texts: pl.Series) -> pl.Series:
    return tokens._count_slice(texts, None, ENCODING, None)


# workers (each runs in its own process)


def run_variant(name: str, v: Variant, path: Path, n_rows: int, out: Path) -> dict[str, Any]:
    sw = Stopwatch()
    with sw.stage("read parquet"):
        texts = pl.read_parquet(path, columns=["text"], n_rows=n_rows)["text"]
    count, start_pool = _counter(v)
    if start_pool is not None:
        with sw.stage("start pool"):
            start_pool()
    cpu = _cpu_now()
    with sw.stage("count"):
        counts = count(texts)
    cpu = _cpu_now() - cpu
    extra: dict[str, Any] = {}
    if v.how == "token_counts" and v.dedupe and v.workers > 1:
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


def run_crossover(path: Path, workers: int) -> dict[str, Any]:
    """Best-of-N seconds of in-process vs a warm pool at each input size, and the pool's start."""
    texts = pl.read_parquet(path, columns=["text"], n_rows=max(CROSSOVER_SIZES))["text"]
    start = time.perf_counter()
    token_counts(texts.head(1_000), ENCODING, workers=workers, min_pool_bytes=0)
    cold = time.perf_counter() - start
    rows = []
    for size in CROSSOVER_SIZES:
        part = texts.head(size)
        best = {"in_process": float("inf"), "pool": float("inf")}
        for _ in range(5 if size <= 20_000 else 3):
            for name, n in (("in_process", 1), ("pool", workers)):
                start = time.perf_counter()
                token_counts(part, ENCODING, workers=n, min_pool_bytes=0)
                best[name] = min(best[name], time.perf_counter() - start)
        mib = int(part.str.len_bytes().cast(pl.Int64).sum()) / 2**20
        rows.append(
            {"rows": size, "mib": round(mib, 2), **{k: round(v, 4) for k, v in best.items()}}
        )
    return {"workers": workers, "pool_start_seconds": round(cold, 3), "sizes": rows}


# driver


def measure(variant: str, pools: list[int], path: Path, n_rows: int) -> dict[str, Any]:
    """Run one variant in a fresh process; its result, with its counts loaded."""
    out = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    try:
        args = ["--worker", variant, "--workers", ",".join(map(str, pools)), "--path", str(path)]
        args += ["--rows", str(n_rows), "--out", str(out)]
        res = run_worker(Path(__file__), args)
        res["_counts"] = pl.read_parquet(out / "counts.parquet")["tokens"]
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def crossover_at(sizes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest size from which a warm pool is faster at every larger measured size."""
    at = None
    for row in reversed(sizes):
        if row["pool"] >= row["in_process"]:
            break
        at = row
    return at


def cold_crossover_mib(cross: dict[str, Any]) -> float | None:
    """MiB of text from which starting the pool pays: its start time over the saving per MiB."""
    big = cross["sizes"][-1]
    saving = (big["in_process"] - big["pool"]) / big["mib"]
    return round(cross["pool_start_seconds"] / saving, 1) if saving > 0 else None


def bench(n_texts: int, workers: list[int], seed: int) -> dict[str, Any]:
    path = data.ensure_corpus(max(n_texts, max(CROSSOVER_SIZES)), seed)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    console.print(f"[bold]tokens[/]: corpus {path.name}, {n_texts:,} texts, pools of {workers}")
    runs = {}
    for name in variants(workers):
        runs[name] = measure(name, workers, path, n_texts)
        console.print(f"  {name}: {runs[name]['seconds']:.2f} s")
    ref = runs["tiktoken"].pop("_counts")
    for name in list(runs)[1:]:
        got = runs[name].pop("_counts")
        assert got.equals(ref), f"{name}: counts differ from tiktoken's"
    console.print(
        f"[green]check ok[/]: every variant counted {runs['tiktoken']['tokens']:,} tokens, text by text equal"
    )
    args = ["--worker", "crossover", "--workers", str(max(workers)), "--path", str(path)]
    cross = run_worker(Path(__file__), args)
    cross["warm_crossover"] = crossover_at(cross["sizes"])
    cross["cold_crossover_mib"] = cold_crossover_mib(cross)
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
    c = Table(title=f"crossover: in-process vs a warm pool of {cross['workers']} (best of 3-5, ms)")
    for col in ("texts", "MiB", "in-process ms", "pool ms", "pool / in-process"):
        c.add_column(col, justify="right")
    for row in cross["sizes"]:
        ratio = row["pool"] / row["in_process"]
        c.add_row(
            f"{row['rows']:,}",
            f"{row['mib']:.1f}",
            f"{row['in_process'] * 1e3:.1f}",
            f"{row['pool'] * 1e3:.1f}",
            f"{ratio:.2f}",
        )
    console.print(c)
    warm = cross["warm_crossover"]
    console.print(
        f"pool start (first call, {cross['workers']} workers): {cross['pool_start_seconds']:.2f} s. "
        f"A warm pool wins from "
        + (f"{warm['rows']:,} texts ({warm['mib']:.1f} MiB)" if warm else "no measured size")
        + f" (POOL_MIN_BYTES: {tokens.POOL_MIN_BYTES / 2**20:.0f} MiB); starting the pool pays from "
        f"about {cross['cold_crossover_mib']} MiB (POOL_START_MIN_BYTES: "
        f"{tokens.POOL_START_MIN_BYTES / 2**20:.0f} MiB)"
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
    pools = [int(x) for x in args.workers.split(",")]
    if args.worker == "crossover":
        emit(run_crossover(args.path, max(pools)))
    elif args.worker:
        v = variants(pools)[args.worker]
        emit(run_variant(args.worker, v, args.path, args.rows, args.out))
    else:
        result = bench(args.texts, pools, args.seed)
        report(result)
        console.print(f"results: {write_result('tokens', result)}")


if __name__ == "__main__":
    main()
