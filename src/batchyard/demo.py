"""`batchyard demo`: the whole pipeline on the embedded defaults.

Seeds a small corpus into the document store (the stand-in unless a MongoDB URI is configured),
embeds it through the local Batch API server into Milvus Lite, queries nearest neighbours, runs
one inference task and prints a few parsed results.

Everything runs in one run context, opened by the CLI while Prefect's temporary API server
comes up (`batchyard.launch`): the seeding happens meanwhile, and Milvus Lite, the stand-in and
the embedded Batch API server start once for the two runs and the queries.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import polars as pl
from rich.table import Table

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from batchyard.context import RunContext


def run_demo(
    console: Console,
    *,
    chunks: int,
    engine: str,
    task: str,
    ctx: RunContext,
    run_job: Callable[..., dict[str, Any]],
    overrides: dict[str, Any],
    print_run: Callable[[dict[str, Any]], None],
) -> int:
    """Run the demo in `ctx` and print what it did; returns the exit code of its worst run."""
    from batchyard.runner import exit_code
    from batchyard.seed import seed_store, targets_for
    from batchyard.targets import Targets, write_targets

    settings = ctx.settings
    store = ctx.store
    console.print(f"document store: [bold]{store.label}[/bold]")
    report = seed_store(store, chunks, fields=settings.mongo.fields, seed=7, n_companies=4)
    store.save()
    targets_path = ctx.staging.local_dir() / "demo-targets.yaml"
    targets = targets_for(report)
    write_targets(targets_path, targets)
    console.print(f"{report.chunks} chunks, {report.documents} documents, {report.companies} companies "
                  f"→ targets in {targets_path}")

    console.rule("2. batch embeddings")
    info = run_job("embeddings", targets_path, engine=engine, overrides=overrides)
    print_run(info)
    _neighbours(console, ctx, info)

    console.rule(f"3. batch inference: {task}")
    first = Targets(companies=targets.companies[:1])
    small = ctx.staging.local_dir() / "demo-targets-inference.yaml"
    write_targets(small, first)
    info2 = run_job("inference", small, engine=engine, task=task, overrides=overrides)
    print_run(info2)
    _inference_samples(console, ctx, info2)
    return max(exit_code(info), exit_code(info2))


def _neighbours(console: Console, ctx: RunContext, info: dict[str, Any]) -> None:
    """Nearest neighbours of one embedded chunk, straight from Milvus."""
    from batchyard.clients.milvus import collection_name, ensure_collection, search
    from batchyard.storage.runs import RunStore

    settings = ctx.settings
    run = RunStore(ctx.staging, info["job"], info["run_id"])
    results = run.read_dataset("results")
    if results.height == 0:
        console.print("no new vectors in this run (everything was already embedded): nothing to query")
        return
    st = ctx.staging
    chunks = pl.concat([st.read_parquet(p.rel("chunks", n)) for p in run.partitions()
                        for n in st.list(p.rel("chunks"), ".parquet")])
    # probe with a repeated passage (boilerplate), so that exact duplicates show up as neighbours
    repeated = chunks.group_by("text_sha256").len().sort("len", descending=True)["text_sha256"][0]
    probe_id = chunks.filter(pl.col("text_sha256") == repeated)["chunk_id"][0]
    probe = results.filter(pl.col("chunk_id") == probe_id).row(0, named=True)
    text = chunks.filter(pl.col("chunk_id") == probe_id)["text"][0]
    snippets = dict(zip(chunks["chunk_id"], chunks["text"].str.slice(0, 60), strict=True))
    name = collection_name(settings.milvus.collection_prefix, settings.embedding.space)
    ensure_collection(ctx.milvus, name, dim=len(probe["vector"]), index_type=settings.milvus.index_type,
                      metric_type=settings.milvus.metric_type)
    hits = search(ctx.milvus, name, list(probe["vector"]), limit=5)
    t = Table(title=f"nearest neighbours in Milvus of chunk {probe_id} ({settings.milvus.metric_type})")
    t.add_column("chunk")
    t.add_column("company")
    t.add_column("similarity", justify="right")
    t.add_column("text")
    for h in hits:
        t.add_row(str(h["chunk_id"]), str(h.get("company_id")), f"{h['distance']:.4f}",
                  snippets.get(h["chunk_id"], "") + "…")
    console.print(f"query text: [italic]{text[:160]}…[/italic]")
    console.print(t)


def _inference_samples(console: Console, ctx: RunContext, info: dict[str, Any]) -> None:
    from batchyard.storage.runs import RunStore

    run = RunStore(ctx.staging, info["job"], info["run_id"])
    results = run.read_dataset("results")
    t = Table(title=f"a few parsed results (run {info['run_id']}, staged under {ctx.staging.root})")
    t.add_column("unit")
    t.add_column("parsed output")
    for row in results.head(3).iter_rows(named=True):
        t.add_row(str(row["unit_id"]), json.dumps(json.loads(row["parsed"]), indent=1)[:600])
    console.print(t)
