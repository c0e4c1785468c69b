"""`batchyard demo`: the whole pipeline on the embedded defaults.

Seeds a small corpus into the document store (the stand-in unless a MongoDB URI is configured),
embeds it through the local Batch API server into Milvus Lite, searches the passages nearest to
one that is not boilerplate (`batchyard search`: distinct texts, with their copies), runs one
inference task and prints a few parsed results.

Everything runs in one run context, opened by the CLI while Prefect's temporary API server
comes up (`batchyard.launch`): the seeding happens meanwhile, and Milvus Lite, the stand-in and
the embedded Batch API server start once for the two runs and the search.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

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
    _neighbours(console, ctx)

    console.rule(f"3. batch inference: {task}")
    first = Targets(companies=targets.companies[:1])
    small = ctx.staging.local_dir() / "demo-targets-inference.yaml"
    write_targets(small, first)
    info2 = run_job("inference", small, engine=engine, task=task, overrides=overrides)
    print_run(info2)
    _inference_samples(console, ctx, info2)
    return max(exit_code(info), exit_code(info2))


def _neighbours(console: Console, ctx: RunContext) -> None:
    """The passages nearest to one that is not boilerplate, through `batchyard search`: each
    distinct text once, with how many chunks carry it."""
    from collections import Counter

    from batchyard.search import search_text

    settings = ctx.settings
    fields = settings.mongo.fields
    docs = list(ctx.store.chunks.find({}, {fields.text: 1}).sort(fields.chunk_id, 1))
    copies = Counter(d.get(fields.text) for d in docs)
    # a passage of its own (one chunk has it), long enough to say something
    probe = max((d for d in docs if copies[d.get(fields.text)] == 1),
                key=lambda d: min(len(d[fields.text]), 600), default=None)
    if probe is None:
        console.print("every chunk repeats another one's text: no passage of its own to search for")
        return
    text = probe[fields.text]
    hits = search_text(ctx, text, k=5)
    t = Table(title=f"`batchyard search`: the passages nearest to chunk {probe['_id']} in Milvus "
              f"({settings.milvus.metric_type}; each text once)", title_justify="left")
    for col in ("rank", "similarity", "chunk", "copies", "text"):
        t.add_column(col, justify="right" if col in ("rank", "similarity", "copies") else "left",
                     no_wrap=col != "chunk", max_width=70 if col == "text" else None, overflow="ellipsis")
    for h in hits:
        t.add_row(str(h["rank"]), f"{h['score']:.4f}", h["chunk_id"], str(h["count"]),
                  " ".join((h["text"] or "").split()))
    console.print(f"query text: [italic]{' '.join(text.split())[:160]}…[/italic]")
    console.print(t)
    if settings.provider.embedded and settings.provider.local.embeddings_executor == "hash":
        console.print("The local server's `hash` embeddings are not semantic: only the passage itself scores "
                      "1.0; with a real model (README: the local embedding model) its neighbours are related "
                      "passages.", style="italic")


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
