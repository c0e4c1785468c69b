"""MongoDB stand-in benchmark: the indexed, log-file stand-in against the previous one.

Data (built once per size and cached under `benchmarks/.data/standin-<n>-s<seed>/`):

- `indexed/`: a stand-in seeded with `batchyard.seed.seed_store` through the current
  `open_document_store` (so it also holds the seed's (company, document, _id) index), and
  `catalog.json` (the seed's company -> documents catalogue);
- `previous/`: the same documents (`batchyard.seed.generate_chunks`) in the previous stand-in's
  file format (version 1: a header, then one `{"c", "d"}` record per chunk), written directly:
  seeding through the previous stand-in would take as long as the thing being measured.

Variants (each run in its own process, on a fresh copy of its file):

- `indexed`: `batchyard.clients.mongo` as it is now (see `batchyard.clients.standin`);
- `previous` (the baseline): `src/batchyard/clients/mongo.py` as of `--baseline-ref` (the commit
  before the indexed stand-in), read with `git show` and imported under another name: mongomock
  with `insert_many` on open, a scan per query, everything re-encoded on save.

Stages, timed in that order (peak RSS so far noted after each):

1. `open` (and the resident memory right after it, `rss_after_open_mb`);
2. `count + $group (targets)`: `count_documents` of the targets filter and an `aggregate`
   `[$match targets, $group by (company, document) with {$sum: 1}]`: partition sizing;
3. `page one company`: `iter_id_pages` (the snapshot's `_id`-range pages of 5,000, sorted,
   limited, projected) over the largest company;
4. `page all targets`: the same over every company with its document list (`targets_for`);
5. `snapshot (no-op embed)`: `iter_unprocessed_chunks` over all targets (what an `embed` that
   submits nothing runs: pages + sha256 + Polars frames);
6. `mark 100k`: `mark_chunks` (unordered `bulk_write` of `UpdateOne` `$set` marks, batches of
   5,000) on the first min(100,000, N) chunks by `_id` (`mark_ids.json`, made with the data);
7. `save`.

The previous stand-in runs every stage only up to `--baseline-full-max` chunks (default 20,000):
beyond that it evaluates the whole targets `$or` (one clause per company) on every document,
for the counts and for every `_id`-range page (O(n^2) for a pass: hours at 200k), so stages 2, 4
and 5 are skipped (reported as such). Its other stages run up to `--baseline-max` chunks
(default 1,000,000; at 1M its process peaks at about 4.3 GB).

Checks: both variants count the same chunks for one company and for all targets, and mark the
same number of chunks.

Usage:
    python benchmarks/bench_standin.py [--sizes 20000,200000,1000000] [--seed 0]
        [--baseline-max 1000000] [--baseline-full-max 20000] [--baseline-ref 9a644de]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bson
import polars as pl

from data import DATA_DIR
from harness import (
    BENCH_DIR,
    RESULTS_DIR,
    Stopwatch,
    console,
    emit,
    run_worker,
    worker_result,
    write_result,
)

BASELINE_REF = "9a644de"  # the last commit with the previous stand-in
PAGE_SIZE = 5_000
MARKS = 100_000
SPACE = "bench-space"
VARIANTS = ("indexed", "previous")


# --------------------------------------------------------------------------- data


def data_dir(n: int, seed: int) -> Path:
    return DATA_DIR / f"standin-{n}-s{seed}"


def ensure_data(n: int, seed: int, previous: bool) -> Path:
    """Seed the indexed stand-in (once) and, when asked, write the previous format (once)."""
    from batchyard.clients.mongo import open_document_store
    from batchyard.seed import SeedReport, generate_chunks, seed_store
    from batchyard.settings import MongoFields, MongoSettings

    root = data_dir(n, seed)
    indexed = root / "indexed"
    if not (root / "catalog.json").exists():
        shutil.rmtree(indexed, ignore_errors=True)
        start = time.perf_counter()
        with open_document_store(MongoSettings(), standin_dir=indexed) as store:
            report: SeedReport = seed_store(store, n, seed=seed)
        console.print(f"seeded {n:,} chunks into the indexed stand-in in {time.perf_counter() - start:.1f} s")
        (root / "catalog.json").write_text(json.dumps(report.catalog))
    if not (root / "mark_ids.json").exists():  # the chunks to mark: the first by _id
        ids = sorted(doc["_id"] for doc in generate_chunks(n, seed=seed))[:MARKS]
        (root / "mark_ids.json").write_text(json.dumps(ids))
    old = root / "previous" / "batchyard.mongo.bson"
    if previous and not old.exists():
        old.parent.mkdir(parents=True, exist_ok=True)
        f = MongoFields()
        keys = [[f.company, 1], [f.document, 1], ["_id", 1]]
        header = {
            "format": "batchyard-mongo-standin",
            "version": 1,
            "database": "batchyard",
            "collections": {"chunks": {"indexes": [{"name": "batchyard_company_document_id", "keys": keys,
                                                    "unique": False}]}},
        }
        tmp = old.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(bson.encode(header))
            for doc in generate_chunks(n, seed=seed):
                fh.write(bson.encode({"c": "chunks", "d": doc}))
        tmp.rename(old)
    return root


# --------------------------------------------------------------------------- workers


def _previous_module(ref: str) -> Any:
    """`batchyard.clients.mongo` as of `ref`, imported as `previous_mongo`."""
    source = subprocess.run(
        ["git", "show", f"{ref}:src/batchyard/clients/mongo.py"],
        cwd=BENCH_DIR, check=True, capture_output=True, text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-standin-")) / "previous_mongo.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_mongo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_mongo"] = module
    spec.loader.exec_module(module)
    return module


class _Timer(Stopwatch):
    """A `Stopwatch` that also notes each stage's CPU seconds (`cpu`): the machine is shared,
    and other work on it stretches wall time much more than CPU time."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.process_time()
        with super().stage(name):
            yield
        self.cpu[name] = round(time.process_time() - start, 3)


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_variant(variant: str, root: Path, n: int, full: bool, ref: str) -> dict[str, Any]:
    from batchyard.settings import MongoFields, MongoSettings
    from batchyard.stages.load import mark_chunks
    from batchyard.stages.snapshot import _projection, iter_id_pages, iter_unprocessed_chunks
    from batchyard.targets import CompanyTarget, Targets

    opener = _previous_module(ref).open_document_store if variant == "previous" else None
    if opener is None:
        from batchyard.clients.mongo import open_document_store as opener
    work = Path(tempfile.mkdtemp(prefix=f"bench-standin-{variant}-"))
    try:
        shutil.copy(root / variant / "batchyard.mongo.bson", work / "batchyard.mongo.bson")
        fields = MongoFields()
        catalog: dict[str, list[str]] = json.loads((root / "catalog.json").read_text())
        every = Targets(companies=[CompanyTarget(company_id=c, documents=d) for c, d in catalog.items()])
        largest = max(catalog, key=lambda c: len(catalog[c]))
        one = Targets(companies=[CompanyTarget(company_id=largest, documents=None)])
        projection = _projection(fields, [f"{fields.marks}.{SPACE}.text_sha256"])
        sw = _Timer()
        extra: dict[str, Any] = {"skipped": [], "cpu": sw.cpu}
        extra["rss_before_open_mb"] = _rss_now_mb()
        with sw.stage("open"):
            store = opener(MongoSettings(), standin_dir=work)
        extra["rss_after_open_mb"] = _rss_now_mb()
        chunks = store.chunks
        query = every.mongo_filter(fields)
        if full:
            with sw.stage("count + $group (targets)"):
                extra["counted"] = chunks.count_documents(query)
                groups = list(chunks.aggregate([
                    {"$match": query},
                    {"$group": {"_id": {"c": f"${fields.company}", "d": f"${fields.document}"}, "n": {"$sum": 1}}},
                ]))
                extra["groups"] = len(groups)
        with sw.stage("page one company"):
            extra["one_company"] = sum(len(p) for p in iter_id_pages(chunks, one.mongo_filter(fields), projection, PAGE_SIZE))
        if full:
            with sw.stage("page all targets"):
                extra["all_targets"] = sum(len(p) for p in iter_id_pages(chunks, query, projection, PAGE_SIZE))
            with sw.stage("snapshot (no-op embed)"):
                pages = iter_unprocessed_chunks(chunks, every, fields, space=SPACE, page_size=PAGE_SIZE)
                extra["snapshot_rows"] = sum(page.height for page, _rejects in pages)
        else:
            extra["skipped"] = ["count + $group (targets)", "page all targets", "snapshot (no-op embed)"]
        ids = json.loads((root / "mark_ids.json").read_text())
        rows = pl.DataFrame({"chunk_id": ids, "id_kind": ["str"] * len(ids), "text_sha256": ["0" * 64] * len(ids)})
        with sw.stage(f"mark {len(ids) // 1000}k"):
            receipt = mark_chunks(chunks, rows, fields=fields, space=SPACE, run_id="bench", batch_size=PAGE_SIZE)
            extra["marked"] = receipt.modified
        with sw.stage("save"):
            store.save()
        extra["file_mb"] = round((work / "batchyard.mongo.bson").stat().st_size / 2**20, 1)
        store.close()
        return worker_result(sw, n, **extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- driver


def bench(sizes: list[int], seed: int, baseline_max: int, baseline_full_max: int, ref: str) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    for n in sizes:
        with_previous = n <= baseline_max
        root = ensure_data(n, seed, with_previous)
        for variant in VARIANTS:
            if variant == "previous" and not with_previous:
                continue
            full = variant == "indexed" or n <= baseline_full_max
            console.print(f"[bold]{variant}[/] at {n:,} chunks ...")
            args = ["--worker", variant, "--root", str(root), "--n", str(n), "--baseline-ref", ref]
            res = run_worker(Path(__file__), [*args, "--full"] if full else args)
            runs[f"{variant}-{n}"] = res
        if with_previous:
            a, b = runs[f"indexed-{n}"], runs[f"previous-{n}"]
            for key in ("counted", "groups", "one_company", "marked", "all_targets", "snapshot_rows"):
                if key in a and key in b:
                    assert a[key] == b[key], f"{n}: {key} differs: indexed {a[key]} vs previous {b[key]}"
            console.print(f"[green]check ok[/] at {n:,}: both variants select and mark the same chunks")
    return {"runs": runs, "sizes": sizes, "seed": seed, "baseline_ref": ref,
            "load_at_end": [round(x, 2) for x in os.getloadavg()]}


def markdown(result: dict[str, Any]) -> str:
    """One table: per size and stage, seconds and peak RSS of both variants."""
    out = ("| chunks | stage | indexed s (CPU s) | indexed peak RSS MB | previous s (CPU s) "
           "| previous peak RSS MB | speedup (wall) |\n"
           "|---:|---|---:|---:|---:|---:|---:|\n")
    for n in result["sizes"]:
        a = result["runs"][f"indexed-{n}"]
        b = result["runs"].get(f"previous-{n}")
        b_stages = {s["stage"]: s for s in b["stages"]} if b else {}
        for s in a["stages"]:
            o = b_stages.get(s["stage"])
            if o is not None:
                ratio = f"{o['seconds'] / s['seconds']:.0f}x" if s["seconds"] > 0 else "-"
                prev = f"{o['seconds']:.2f} ({b['cpu'][s['stage']]:.2f}) | {o['peak_rss_mb']:,.0f} | {ratio}"
            else:
                prev = "skipped | | " if b else "not run | | "
            out += (f"| {n:,} | {s['stage']} | {s['seconds']:.2f} ({a['cpu'][s['stage']]:.2f}) "
                    f"| {s['peak_rss_mb']:,.0f} | {prev} |\n")
        extra = (f"RSS before / after open: indexed {a['rss_before_open_mb']:,.0f} / "
                 f"{a['rss_after_open_mb']:,.0f} MB")
        if b:
            extra += f", previous {b['rss_before_open_mb']:,.0f} / {b['rss_after_open_mb']:,.0f} MB"
        extra += f"; file after save: indexed {a['file_mb']:,.0f} MB" + (f", previous {b['file_mb']:,.0f} MB" if b else "")
        out += f"| {n:,} | ({extra}) | | | | | |\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000,1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-max", type=int, default=1_000_000)
    ap.add_argument("--baseline-full-max", type=int, default=20_000)
    ap.add_argument("--baseline-ref", default=BASELINE_REF)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        emit(run_variant(args.worker, args.root, args.n, args.full, args.baseline_ref))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    result = bench(sizes, args.seed, args.baseline_max, args.baseline_full_max, args.baseline_ref)
    table = markdown(result)
    console.print(table)
    console.print(f"results: {write_result('standin', result)}")
    (RESULTS_DIR / "standin-latest.md").write_text(
        f"# Stand-in benchmark\n\n`python benchmarks/bench_standin.py --sizes {args.sizes}`; "
        f"load average at the end {result['load_at_end']}.\n\n" + table
    )


if __name__ == "__main__":
    main()
