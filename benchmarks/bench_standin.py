"""MongoDB stand-in benchmark: what change detection asks the document store, this stand-in
against the stand-in before it (measured in the same run).

Data (built once per size and seed, cached under `benchmarks/.data/standin-changes-<n>-s<seed>/`
and reused by every case): a stand-in seeded with `batchyard.seed.seed_store` (all chunks
stamped `SEEDED`) and closed (which writes its index checkpoint), then opened again and 100
chunks edited with `batchyard.seed_changes.edit_chunks` (stamped `CHANGED`): those 100 records
come after the checkpoint, so every open replays them, as after a run's loads. Kept: the file,
its checkpoint and `meta.json` (the seed's catalogue and the changed ids). Each worker opens a
fresh copy of those files.

Variants (each in its own process):

- `indexed`: this checkout's `batchyard` (`src/`);
- `baseline`: `src/` as of `--baseline-ref` (the commit before this change: hash indexes, no
  range terms, no checkpoint), exported with `git archive` and put first on `PYTHONPATH`.

Stages, in order (wall and CPU seconds, peak RSS after each):

1. `open` (a write-mode open, as `RunContext.store` does), then `first use of the indexes` (this
   stand-in builds its indexes from the checkpoint when first read: what the first query after
   an open pays on top of it; the baseline built them while opening);
2. `q1 changed pages ($in)`: `iter_id_pages` (the snapshot's `_id`-range pages of 5,000) over
   `{company: {$in: every company}, updated_at: {$gte: CHANGED}}`; `q1 changed pages ($or)`: the
   same with the `$or` of company + document lists (`targets_for(report)`);
3. `q2 newest change ($in)` / `($or)`: `find(targets, {updated_at: 1}).sort(updated_at, -1).limit(1)`;
4. `q3 counts per company`: `stages.partition.size_targets` over the `$or` targets (two
   `$match` + `$group` `$sum: 1` aggregates);
5. `q4 ids of one company`: `find({company: largest}, {_id: 1})`;
6. `q5 point lookups`: `find({_id: {$in: 1,000 ids}})`;
7. `close` (nothing was written) and `reopen`.

Checks: both variants return the same ids for q1, the same newest chunk for q2, the same
counts for q3 and q4, the same documents for q5.

Usage:
    python benchmarks/bench_standin.py [--sizes 100000,1000000] [--seed 0]
        [--baseline-ref d4371ca] [--baseline-max 1000000] [--baseline-or-max 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

BASELINE_REF = "d4371ca"  # the last commit before range terms, lazy plans and checkpoints
PAGE_SIZE = 5_000
CHANGES = 100
LOOKUPS = 1_000
SEEDED = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
CHANGED = datetime(2026, 1, 6, 8, 0, tzinfo=UTC)
VARIANTS = ("indexed", "baseline")
FILES = ("batchyard.mongo.bson", "batchyard.mongo.bson.idx")


# --------------------------------------------------------------------------- data


def data_dir(n: int, seed: int) -> Path:
    return DATA_DIR / f"standin-changes-{n}-s{seed}"


def ensure_data(n: int, seed: int) -> Path:
    """Seed the stand-in and change 100 chunks (once per size and seed)."""
    from batchyard.clients.mongo import open_document_store
    from batchyard.seed import seed_store
    from batchyard.seed_changes import edit_chunks
    from batchyard.settings import MongoSettings

    root = data_dir(n, seed)
    if (root / "meta.json").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    with open_document_store(MongoSettings(), standin_dir=root) as store:
        report = seed_store(store, n, seed=seed, updated_at=SEEDED)  # the close writes the checkpoint
    with open_document_store(MongoSettings(), standin_dir=root) as store:  # replayed at every open
        changed = edit_chunks(store, CHANGES, seed=seed, at=CHANGED).edited
        sizes = {d["_id"]: d["n"] for d in store.chunks.aggregate([{"$group": {"_id": "$company_id", "n": {"$sum": 1}}}])}
    meta = {"catalog": report.catalog, "changed": sorted(changed), "largest": max(sizes, key=sizes.__getitem__)}
    (root / "meta.json").write_text(json.dumps(meta))
    console.print(f"built {n:,} chunks with {CHANGES} changed in {time.perf_counter() - start:.0f} s")
    return root


def baseline_src(ref: str) -> Path:
    """`src/` as of `ref`, exported once into `benchmarks/.data/src-<ref>/`."""
    out = DATA_DIR / f"src-{ref}"
    if not (out / "src" / "batchyard").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref, "src"], cwd=BENCH_DIR.parent, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "src"


# --------------------------------------------------------------------------- workers


class _Timer(Stopwatch):
    """A `Stopwatch` that also notes each stage's CPU seconds (`cpu`): the machine is shared."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.process_time()
        with super().stage(name):
            yield
        self.cpu[name] = round(time.process_time() - start, 3)


def run_variant(root: Path, n: int, shapes_run: list[str]) -> dict[str, Any]:
    import batchyard
    from batchyard.clients.mongo import open_document_store
    from batchyard.settings import MongoFields, MongoSettings
    from batchyard.stages.partition import size_targets
    from batchyard.stages.snapshot import iter_id_pages
    from batchyard.targets import CompanyTarget, Targets

    meta = json.loads((root / "meta.json").read_text())
    catalog: dict[str, list[str]] = meta["catalog"]
    fields = MongoFields()
    whole = Targets(companies=[CompanyTarget(company_id=c, documents=None) for c in catalog])
    listed = Targets(companies=[CompanyTarget(company_id=c, documents=d) for c, d in catalog.items()])
    shapes = {"$in": whole.mongo_filter(fields), "$or": listed.mongo_filter(fields)}
    projection = {fields.company: 1, fields.document: 1, fields.chunk_index: 1, fields.text: 1}
    since = {"updated_at": {"$gte": CHANGED}}
    lookups = meta["changed"][:10] + [f"{c}/{d[0]}/00000" for c, d in list(catalog.items())[: LOOKUPS - 10]]
    work = Path(tempfile.mkdtemp(prefix="bench-standin-"))
    try:
        for name in FILES:
            if (root / name).exists():
                shutil.copyfile(root / name, work / name)
        sw = _Timer()
        out: dict[str, Any] = {"src": str(Path(batchyard.__file__).parent), "skipped": [], "cpu": sw.cpu}
        with sw.stage("open"):
            store = open_document_store(MongoSettings(), standin_dir=work)
        chunks = store.chunks
        with sw.stage("first use of the indexes"):
            _build_indexes(chunks)
        for shape, targets in shapes.items():
            if shape not in shapes_run:
                out["skipped"] += [f"q1 changed pages ({shape})", f"q2 newest change ({shape})"]
                continue
            with sw.stage(f"q1 changed pages ({shape})"):
                pages = iter_id_pages(chunks, {**targets, **since}, projection, PAGE_SIZE)
                out[f"q1 {shape}"] = [d["_id"] for page in pages for d in page]
            with sw.stage(f"q2 newest change ({shape})"):
                newest = list(chunks.find(targets, {"updated_at": 1}).sort("updated_at", -1).limit(1))
                out[f"q2 {shape}"] = [d["_id"] for d in newest]
        with sw.stage("q3 counts per company"):
            by_company, by_document = size_targets(chunks, listed, fields)
            out["q3"] = [sum(by_company.values()), len(by_company), sum(by_document.values())]
        with sw.stage("q4 ids of one company"):
            out["q4"] = len(list(chunks.find({fields.company: meta["largest"]}, {"_id": 1})))
        with sw.stage("q5 point lookups"):
            out["q5"] = sorted(d["_id"] for d in chunks.find({"_id": {"$in": lookups}}))
        size = (work / FILES[0]).stat().st_size
        with sw.stage("close"):
            store.close()
        del store, chunks  # the reopen below must not find the closed stand-in's memory still held
        out["file_grew_bytes"] = (work / FILES[0]).stat().st_size - size
        with sw.stage("reopen"):
            store = open_document_store(MongoSettings(), standin_dir=work)
        store.close()
        return worker_result(sw, n, **out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_indexes(chunks: Any) -> None:
    """What the first query after an open pays on top of it: this stand-in builds its field
    indexes and sorted `_id` index from the checkpoint when first read (the baseline built them
    while opening, so this costs it nothing)."""
    store = chunks._store
    for index in store._fields.values():
        _ = index.buckets
    sorted_ids = store._sorted
    if hasattr(sorted_ids, "of"):
        for bracket in (10, 15, 35):
            sorted_ids.of(bracket)


@contextlib.contextmanager
def _pythonpath(path: Path | None) -> Iterator[None]:
    old = os.environ.get("PYTHONPATH")
    if path is not None:
        os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


# --------------------------------------------------------------------------- driver


def bench(sizes: list[int], seed: int, ref: str, baseline_max: int, baseline_or_max: int) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    here = BENCH_DIR.parent / "src"
    old = baseline_src(ref)
    for n in sizes:
        root = ensure_data(n, seed)
        for variant in VARIANTS:
            shapes = ["$in", "$or"]
            if variant == "baseline":
                shapes = [s for s, top in (("$in", baseline_max), ("$or", baseline_or_max)) if n <= top]
            console.print(f"[bold]{variant}[/] at {n:,} chunks ...")
            args = ["--worker", "--root", str(root), "--n", str(n), "--shapes", ",".join(shapes)]
            with _pythonpath(here if variant == "indexed" else old):
                runs[f"{variant}-{n}"] = run_worker(Path(__file__), args)
        a, b = runs[f"indexed-{n}"], runs[f"baseline-{n}"]
        assert a["src"] != b["src"], "both variants imported the same batchyard"
        assert len(a.get("q1 $in", [])) == CHANGES
        for key in ("q1 $in", "q1 $or", "q2 $in", "q2 $or", "q3", "q4", "q5"):
            if key in a and key in b:
                assert a[key] == b[key], f"{n}: {key} differs: indexed {a[key]} vs baseline {b[key]}"
        console.print(f"[green]check ok[/] at {n:,}: both variants answer the same")
    return {"runs": runs, "sizes": sizes, "seed": seed, "baseline_ref": ref,
            "load_at_end": [round(x, 2) for x in os.getloadavg()]}


def markdown(result: dict[str, Any]) -> str:
    """One table: per size and stage, seconds (CPU) and peak RSS of both variants."""
    out = ("| chunks | stage | stand-in s (CPU s) | peak RSS MB | baseline s (CPU s) | baseline peak RSS MB "
           "| speedup (wall) |\n|---:|---|---:|---:|---:|---:|---:|\n")
    for n in result["sizes"]:
        a, b = result["runs"][f"indexed-{n}"], result["runs"][f"baseline-{n}"]
        b_stages = {s["stage"]: s for s in b["stages"]}
        for s in a["stages"]:
            o = b_stages.get(s["stage"])
            if o is not None:
                ratio = f"{o['seconds'] / s['seconds']:,.0f}x" if s["seconds"] > 0 and o["seconds"] > 0 else "-"
                prev = f"{o['seconds']:.3f} ({b['cpu'][s['stage']]:.3f}) | {o['peak_rss_mb']:,.0f} | {ratio}"
            else:
                prev = "not run | | "
            out += (f"| {n:,} | {s['stage']} | {s['seconds']:.3f} ({a['cpu'][s['stage']]:.3f}) "
                    f"| {s['peak_rss_mb']:,.0f} | {prev} |\n")
        out += (f"| {n:,} | (bytes the close wrote: stand-in {a['file_grew_bytes']:,}, "
                f"baseline {b['file_grew_bytes']:,}) | | | | | |\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-ref", default=BASELINE_REF)
    ap.add_argument("--baseline-max", type=int, default=1_000_000,
                    help="largest size at which the baseline runs q1 and q2 with the $in targets "
                    "(each decodes every chunk)")
    ap.add_argument("--baseline-or-max", type=int, default=100_000,
                    help="the same with the $or targets (mongomock checks every clause per chunk: "
                    "64 s at 100k, about half an hour at 1M)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        emit(run_variant(args.root, args.n, [s for s in args.shapes.split(",") if s]))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    result = bench(sizes, args.seed, args.baseline_ref, args.baseline_max, args.baseline_or_max)
    table = markdown(result)
    console.print(table)
    console.print(f"results: {write_result('standin', result)}")
    command = " ".join(["python benchmarks/bench_standin.py", *sys.argv[1:]])
    (RESULTS_DIR / "standin-latest.md").write_text(
        f"# Stand-in benchmark\n\n`{command}`; load average at the end {result['load_at_end']}.\n\n" + table
    )


if __name__ == "__main__":
    main()
