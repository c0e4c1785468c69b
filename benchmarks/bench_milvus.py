"""Milvus load benchmark: upsert vs bulk import into a Milvus server, and Milvus Lite at scale.

Data (built once, cached as `benchmarks/.data/milvus-<n>x<dims>-s<seed>.parquet`): rows with the
sink's columns (chunk_id, company_id over 50 companies, document_id, chunk_index, text_sha256)
and unit float32 vectors. Every variant loads a slice of it through the pipeline's own
`load_vectors`, in its own process, into a fresh collection unless said otherwise.

Server part (one embedded Milvus 2.3.5 server, started and stopped here; HNSW index):

- `upsert` at each `--batches` size on `--rows` rows: `load_vectors(bulk=None)`. On 2.3.5 each
  batch is a delete + insert (`upsert_misroutes_partition_keys`); `raw-upsert` (extra) is
  `client.upsert` at the best batch size, for the cost of that workaround.
- `bulk`: `load_vectors(bulk=...)` on the same rows: Parquet files (LocalBulkWriter), one import
  task per file, wait until completed, refresh load. Then the same into the now non-empty
  collection with `--rows` new ids (the existing-id query runs), then the first rows again
  (every id known: all upserts, no import).
- crossover: bulk and upsert (best batch) at each `--crossover` size, for the threshold
  `milvus.bulk_import_min_rows`.

Upsert's rows are queryable when the call returns (growing segments; the HNSW index is built
later, in the background); bulk import's are indexed and loaded when `load_vectors` returns.
Both times stop when a strongly consistent count sees every row.

Lite part (Milvus Lite in the worker process, FLAT index, the pipeline's default upsert batches):
for each `--lite-rows` size, `lite` reads the whole slice and upserts it (what
`EmbeddingsJob.load` does with results.parquet); `lite-sliced` reads and upserts it in slices of
`--lite-slice` rows; `read` (reference) only reads the slice. Each reports peak RSS (VmHWM) and
the RSS still held after the load, after dropping the frame, and after closing the client.

Usage:
    python benchmarks/bench_milvus.py [--rows 100000] [--dims 256] [--batches 1000,2000,5000,10000]
        [--crossover 10000,30000] [--lite-rows 200000,1000000] [--lite-slice 50000]
        [--only server|lite]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from batchyard.clients import milvus as mv
from batchyard.settings import MilvusSettings
from batchyard.stages.load import load_vectors
from data import DATA_DIR
from harness import (
    Stopwatch,
    console,
    emit,
    rate,
    run_worker,
    worker_result,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
COMPANIES = 50
MAX_REQUEST_BYTES = 64 * 1024 * 1024
SERVER_INDEX = "HNSW"
LITE = MilvusSettings()  # the pipeline's defaults: upsert_batch_rows, max_request_bytes


# data


def data_path(n: int, dims: int, seed: int) -> Path:
    return DATA_DIR / f"milvus-{n}x{dims}-s{seed}.parquet"


def ensure_data(n: int, dims: int, seed: int) -> Path:
    """The cached rows (built in slices of 100k to keep the builder's memory small)."""
    path = data_path(n, dims, seed)
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = []
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        vec = rng.standard_normal((hi - lo, dims), dtype=np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        i = pl.col("i")
        parts.append(
            pl.DataFrame({"i": pl.int_range(lo, hi, eager=True)}).select(
                chunk_id=pl.format("co{}/doc{}/{}", i % COMPANIES, i // 100, i),
                company_id=pl.format("co{}", i % COMPANIES),
                document_id=pl.format("doc{}", i // 100),
                chunk_index=i % 100,
                text_sha256=i.cast(pl.String).str.pad_start(64, "0"),
                vector=pl.lit(pl.Series(vec, dtype=pl.Array(pl.Float32, dims))),
            )
        )
    tmp = path.with_suffix(".tmp")
    pl.concat(parts).write_parquet(tmp, row_group_size=50_000)
    tmp.rename(path)
    return path


def read_slice(path: Path, offset: int, n: int) -> pl.DataFrame:
    return pl.scan_parquet(path).slice(offset, n).collect()


def rss_now_mb() -> float:
    """Current RSS of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


# workers


def _server_client(uri: str, collection: str, dims: int, fresh: bool) -> Any:
    client = mv.open_vector_store(MilvusSettings(uri=uri), default_path="")
    if fresh and client.has_collection(collection):
        client.drop_collection(collection)
    mv.ensure_collection(client, collection, dim=dims, index_type=SERVER_INDEX, metric_type="COSINE")
    return client


def _timed(module: Any, names: list[str], timings: dict[str, float]) -> None:
    """Wrap module functions so their wall time adds up in `timings` (import breakdown)."""
    for name in names:
        fn = getattr(module, name)

        def wrapper(*a: Any, __fn: Any = fn, __name: str = name, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return __fn(*a, **kw)
            finally:
                timings[__name] = timings.get(__name, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)


def work_server(args: argparse.Namespace) -> dict[str, Any]:
    frame = read_slice(args.src, args.offset, args.n)
    client = _server_client(args.uri, args.collection, args.dims, fresh=args.fresh)
    before = mv.count(client, args.collection)
    sw = Stopwatch()
    timings: dict[str, float] = {}
    receipt = None
    if args.worker == "raw-upsert":
        with sw.stage("upsert"):
            scalars, vectors = mv._prepared(frame.with_columns(pl.lit("bench").alias("run_id")), "bench")
            for lo in range(0, frame.height, args.batch):
                rows = scalars.slice(lo, args.batch).to_dicts()
                for row, vec in zip(rows, vectors[lo : lo + args.batch], strict=True):
                    row[mv.VECTOR_FIELD] = vec
                client.upsert(collection_name=args.collection, data=rows)
    else:
        bulk = None
        if args.worker == "bulk":
            bulk = mv.BulkImportConfig(uri=args.uri, min_rows=1, local_dir=tempfile.gettempdir())
            _timed(mv, ["existing_ids", "upsert_frame", "write_import_files", "_run_imports"], timings)
            _timed(client, ["load_collection"], timings)  # the refresh load
        with sw.stage("load_vectors"):
            receipt = load_vectors(
                client, args.collection, frame, run_id="bench", batch_rows=args.batch,
                max_request_bytes=MAX_REQUEST_BYTES, bulk=bulk,
            )
    with sw.stage("count"):
        bulk_done = receipt is not None and receipt.method == "bulk_import"
        expected = before + (receipt.imported if bulk_done else args.n)  # upserts: fresh collections
        got = mv.count(client, args.collection)
    assert got == expected, f"{args.worker}: count {got}, expected {expected}"
    if args.drop:  # its background index builds would slow the next variant down
        client.drop_collection(args.collection)
    client.close()
    return worker_result(
        sw, args.n, receipt=receipt.model_dump(mode="json") if receipt else None,
        breakdown={k: round(v, 3) for k, v in timings.items()},
    )


def work_lite(args: argparse.Namespace) -> dict[str, Any]:
    sw = Stopwatch()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-lite-"))
    extra: dict[str, Any] = {}
    try:
        if args.worker == "read":
            with sw.stage("read"):
                frame = read_slice(args.src, 0, args.n)
            return worker_result(sw, args.n, rss_after_mb=rss_now_mb())
        client = mv.open_vector_store(MilvusSettings(index_type="FLAT"), default_path=str(data_dir / "m.db"))
        mv.ensure_collection(client, "bench", dim=args.dims, index_type="FLAT", metric_type="COSINE")
        slice_rows = args.n if args.worker == "lite" else args.lite_slice
        for lo in range(0, args.n, slice_rows):
            with sw.stage("read"):
                frame = read_slice(args.src, lo, min(slice_rows, args.n - lo))
            with sw.stage("upsert"):
                load_vectors(
                    client, "bench", frame, run_id="bench", batch_rows=LITE.upsert_batch_rows,
                    max_request_bytes=LITE.max_request_bytes,
                )
        extra["rss_after_load_mb"] = rss_now_mb()  # the (last) frame still held
        del frame
        gc.collect()
        extra["rss_after_gc_mb"] = rss_now_mb()
        with sw.stage("count"):
            assert mv.count(client, "bench") == args.n
        result = worker_result(sw, args.n, **extra)  # peak RSS of the load, before close
        with sw.stage("close"):
            client.close()
        gc.collect()
        result["rss_after_close_mb"] = rss_now_mb()
        result["close_s"] = sw.stages[-1]["seconds"]
        return result
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# driver


def _worker(variant: str, src: Path, n: int, dims: int, **opts: Any) -> dict[str, Any]:
    args = ["--worker", variant, "--src", str(src), "--n", str(n), "--dims", str(dims)]
    for key, val in opts.items():
        if isinstance(val, bool):
            args += [f"--{key}"] if val else []
        else:
            args += [f"--{key}", str(val)]
    res = run_worker(Path(__file__), args)
    res["variant"] = variant
    res.update({k: v for k, v in opts.items() if k in ("batch", "offset")})
    console.print(f"  {variant} {opts.get('batch', '')} {n:,} rows: {res['seconds']:.1f} s, "
                  f"{rate(res['rows'], res['seconds']):,.0f} rows/s, peak {res['peak_rss_mb']:,.0f} MB")
    return res


def bench_server(src: Path, rows: int, dims: int, batches: list[int], crossover: list[int]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))  # the embedded-server helper lives with the tests
    from tests.milvus_server import start_embedded_server

    server, info = start_embedded_server()
    out: dict[str, Any] = {"upsert": [], "bulk": [], "crossover": []}
    try:
        common = {"uri": info.uri}
        console.print(f"[bold]server[/]: Milvus 2.3.5 at {info.uri}, {rows:,} rows x {dims} dims, {SERVER_INDEX}")
        for b in batches:
            out["upsert"].append(_worker("upsert", src, rows, dims, batch=b, collection=f"up{b}", fresh=True, drop=True, **common))
        best = max(out["upsert"], key=lambda r: rate(r["rows"], r["seconds"]))["batch"]
        out["best_batch"] = best
        out["raw_upsert"] = _worker("raw-upsert", src, rows, dims, batch=best, collection="raw", fresh=True, drop=True, **common)
        bulk = {"batch": best, "collection": "bulk", **common}
        out["bulk"].append(_worker("bulk", src, rows, dims, fresh=True, **bulk) | {"case": "empty collection"})
        out["bulk"].append(
            _worker("bulk", src, rows, dims, offset=rows, **bulk) | {"case": "non-empty collection, new ids"}
        )
        out["bulk"].append(_worker("bulk", src, rows, dims, drop=True, **bulk) | {"case": "same ids again (all upserts)"})
        for n in crossover:
            up = _worker("upsert", src, n, dims, batch=best, collection=f"xu{n}", fresh=True, drop=True, **common)
            bk = _worker("bulk", src, n, dims, batch=best, collection=f"xb{n}", fresh=True, drop=True, **common)
            out["crossover"].append({"rows": n, "upsert": up, "bulk": bk})
    finally:
        server.stop()
    return out


def bench_lite(src: Path, sizes: list[int], dims: int, lite_slice: int) -> list[dict[str, Any]]:
    console.print(f"[bold]Milvus Lite[/]: FLAT, {dims} dims, upsert batches of {LITE.upsert_batch_rows}")
    out = []
    for n in sizes:
        row = {"rows": n}
        for variant in ("read", "lite", "lite-sliced"):
            row[variant] = _worker(variant, src, n, dims, **{"lite-slice": lite_slice})
        out.append(row)
    return out


def report(result: dict[str, Any]) -> None:
    console.print(markdown(result))


def _rs(r: dict[str, Any]) -> str:
    return f"{rate(r['rows'], r['seconds']):,.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The result tables as Markdown (for benchmarks/README.md)."""
    lines: list[str] = []
    srv = result.get("server")
    if srv:
        best = srv["best_batch"]
        lines += ["| server load (100% new ids unless said) | batch | rows | s | rows/s | peak RSS MB | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in srv["upsert"]:
            mark = " (best)" if r["batch"] == best else ""
            lines.append(f"| upsert (delete+insert on 2.3.5){mark} | {r['batch']:,} | {r['rows']:,} | {r['seconds']:.1f} | {_rs(r)} | {r['peak_rss_mb']:,.0f} | |")
        r = srv["raw_upsert"]
        lines.append(f"| raw `client.upsert` (extra) | {r['batch']:,} | {r['rows']:,} | {r['seconds']:.1f} | {_rs(r)} | {r['peak_rss_mb']:,.0f} | misroutes partition keys on 2.3.5 |")
        for r in srv["bulk"]:
            bd = ", ".join(f"{k.strip('_')} {v:.1f} s" for k, v in r["breakdown"].items())
            lines.append(f"| bulk import: {r['case']} | files | {r['rows']:,} | {r['seconds']:.1f} | {_rs(r)} | {r['peak_rss_mb']:,.0f} | {bd} |")
        lines += ["", f"| rows | upsert s (batch {best:,}) | upsert rows/s | bulk s | bulk rows/s | bulk / upsert |",
                  "|---:|---:|---:|---:|---:|---:|"]
        pairs = [*srv["crossover"], {"rows": srv["bulk"][0]["rows"],
                                     "upsert": next(u for u in srv["upsert"] if u["batch"] == best),
                                     "bulk": srv["bulk"][0]}]
        for c in pairs:
            u, b = c["upsert"], c["bulk"]
            ratio = rate(b["rows"], b["seconds"]) / rate(u["rows"], u["seconds"])
            lines.append(f"| {c['rows']:,} | {u['seconds']:.1f} | {_rs(u)} | {b['seconds']:.1f} | {_rs(b)} | {ratio:.2f}x |")
    lite = result.get("lite")
    if lite:
        lines += ["", "| Milvus Lite (FLAT) | rows | s | rows/s | peak RSS MB | RSS after load MB | after gc MB | after close MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in lite:
            r = row["read"]
            lines.append(f"| read only (reference) | {row['rows']:,} | {r['seconds']:.1f} | | {r['peak_rss_mb']:,.0f} | {r['rss_after_mb']:,.0f} | | |")
            for variant in ("lite", "lite-sliced"):
                r = row[variant]
                up = sum(float(s["seconds"]) for s in r["stages"] if s["stage"] == "upsert")
                label = "read all + upsert" if variant == "lite" else "read + upsert in slices"
                lines.append(
                    f"| {label} | {row['rows']:,} | {up:.1f} | {rate(row['rows'], up):,.0f} | {r['peak_rss_mb']:,.0f} "
                    f"| {r['rss_after_load_mb']:,.0f} | {r['rss_after_gc_mb']:,.0f} | {r['rss_after_close_mb']:,.0f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--batches", default="1000,2000,5000,10000")
    ap.add_argument("--crossover", default="10000,30000")
    ap.add_argument("--lite-rows", default="200000,1000000")
    ap.add_argument("--lite-slice", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["server", "lite"])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=LITE.upsert_batch_rows, help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--collection", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--drop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker in ("read", "lite", "lite-sliced"):
        emit(work_lite(args))
        return
    if args.worker:
        emit(work_server(args))
        return
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    lite_sizes = ints(args.lite_rows)
    src = ensure_data(max([2 * args.rows, *lite_sizes]), args.dims, args.seed)
    result: dict[str, Any] = {
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "params": vars(args) | {"src": str(src)},
    }
    if args.only != "lite":
        result["server"] = bench_server(src, args.rows, args.dims, ints(args.batches), ints(args.crossover))
    if args.only != "server":
        result["lite"] = bench_lite(src, lite_sizes, args.dims, args.lite_slice)
    report(result)
    result["params"] = {k: str(v) for k, v in result["params"].items()}
    console.print(f"results: {write_result('milvus', result)}")


if __name__ == "__main__":
    main()
