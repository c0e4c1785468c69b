"""`batchyard`: the command line (Typer + rich)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchyard.errors import BatchyardError

if TYPE_CHECKING:
    from batchyard.settings import Settings

# quiet, offline-friendly Prefect for the command line (a profile or the shell may override)
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "ERROR",
}.items():
    os.environ.setdefault(_k, _v)

app = typer.Typer(help="Batch embeddings and LLM inference over MongoDB chunks.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.")
app.add_typer(config_app, name="config")
console = Console()

_state: dict[str, Any] = {}

Engine = Annotated[str, typer.Option(help="prefect (flows, tasks, artifacts) or local (plain threads).")]


@app.callback()
def main(
    profile: Annotated[str | None, typer.Option(help="Environment profile: loads profiles/<name>.env.")] = None,
    root: Annotated[str | None, typer.Option(help="Staging root (local path or s3://bucket/prefix).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    """Global options."""
    _state["profile"] = profile
    _state["root"] = root
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "uvicorn", "uvicorn.access", "pymilvus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # milvus-lite answers a client probe (AllocTimestamp) it does not implement; harmless
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def _overrides(**limits: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _state.get("root"):
        out["staging"] = {"root": _state["root"]}
    lim = {k: v for k, v in limits.items() if v is not None}
    if "max_inputs_per_batch" in lim:
        lim.setdefault("max_inputs_per_request", min(2048, lim["max_inputs_per_batch"]))
    if lim:
        out["limits"] = lim
    return out


def _settings(overrides: dict[str, Any] | None = None) -> Settings:
    from batchyard.settings import load_settings

    return load_settings(_state.get("profile"), **(overrides or {}))


def _fail(exc: BaseException) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1) from None


# configuration and tasks


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (secrets masked)."""
    s = _settings(_overrides())
    console.print_json(json.dumps(s.masked()))


@app.command()
def tasks() -> None:
    """List the inference tasks with their versions and endpoints."""
    from batchyard.tasks.prompts import resolve_prompts_dir
    from batchyard.tasks.registry import list_tasks

    s = _settings(_overrides())
    prompts = resolve_prompts_dir(s.prompts_dir)
    t = Table(title="inference tasks")
    for col in ("task", "version", "unit", "endpoint", "prompt", "description"):
        t.add_column(col)
    for task in list_tasks():
        t.add_row(task.name, task.task_version(prompts), task.unit, task.endpoint, task.prompt, task.description)
    console.print(t)


# source


@app.command()
def seed(
    chunks: Annotated[int, typer.Option(help="Number of synthetic chunks to write.")] = 1000,
    targets_out: Annotated[Path, typer.Option(help="Where to write the matching targets file.")] = Path("targets.yaml"),
    seed_value: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    companies: Annotated[int | None, typer.Option(help="Number of companies (default: scales with chunks).")] = None,
    list_documents: Annotated[bool, typer.Option(help="List each document in the targets file "
                                                      "(default: companies only, i.e. all their documents).")] = False,
) -> None:
    """Write a realistic synthetic corpus into the configured document store, plus a targets file."""
    from batchyard.context import RunContext
    from batchyard.seed import seed_store, targets_for
    from batchyard.targets import write_targets

    s = _settings(_overrides())
    with RunContext(s) as ctx:
        store = ctx.store
        console.print(f"document store: [bold]{store.label}[/bold]")
        with console.status(f"seeding {chunks:,} chunks"):
            report = seed_store(store, chunks, fields=s.mongo.fields, seed=seed_value, n_companies=companies)
        store.save()
        write_targets(targets_out, targets_for(report, all_documents=not list_documents))
    console.print(f"seeded {report.chunks:,} chunks in {report.documents:,} documents of {report.companies:,} "
                  f"companies; targets written to {targets_out}")


# jobs


def _progress() -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
    )
    bar = progress.add_task("shards collected", total=None, detail="")

    def update(info: dict[str, Any]) -> None:
        states = ", ".join(f"{k} {v}" for k, v in sorted(info["by_state"].items()))
        progress.update(bar, total=info["shards"], completed=info["by_state"].get("collected", 0), detail=states)

    return progress, update


def _run_job(kind: str, targets: Path | None, *, engine: str, overrides: dict[str, Any], task: str | None = None,
             run_id: str | None = None) -> dict[str, Any]:
    from batchyard import runner
    from batchyard.context import RunContext

    progress, update = _progress()
    profile = _state.get("profile")
    with progress:
        if engine == "prefect":
            from batchyard.orchestration import flows

            flows.PROGRESS_HOOKS.append(update)
            try:
                if kind == "embeddings":
                    return flows.embeddings_flow(targets=str(targets), run_id=run_id, profile=profile, overrides=overrides)
                if kind == "inference":
                    return flows.inference_flow(task_name=task or "", targets=str(targets), run_id=run_id,
                                                profile=profile, overrides=overrides)
                return flows.resume_flow(run_id=run_id or "", profile=profile, overrides=overrides)
            finally:
                flows.PROGRESS_HOOKS.remove(update)
        with RunContext(_settings(overrides)) as ctx:
            if kind == "resume":
                return runner.resume(ctx, run_id or "", on_progress=update)
            from batchyard.targets import load_targets

            tg = load_targets(targets) if targets else None
            if kind == "embeddings":
                from batchyard.jobs.embeddings import EmbeddingsJob

                job: Any = EmbeddingsJob(ctx, tg)  # type: ignore[arg-type]
            else:
                from batchyard.jobs.inference import InferenceJob

                job = InferenceJob(ctx, tg, task or "")  # type: ignore[arg-type]
            return runner.execute(ctx, job, run_id=run_id, on_progress=update)


def _print_run(info: dict[str, Any]) -> None:
    t = Table(title=f"run {info['run_id']} ({info['job']}): {info['state']}")
    t.add_column("stage")
    t.add_column("figures")
    for key in ("snapshot", "plan", "batches", "final"):
        if key in info:
            val = info[key]
            if key == "batches":
                val = {**val.get("by_status", {}), "shards": val.get("shards")}
            t.add_row(key, ", ".join(f"{k}={v}" for k, v in val.items()))
    for r in info.get("loads", []):
        t.add_row(f"load {r.get('sink')}", f"{r.get('target')}: rows={r.get('rows')}, upserted={r.get('upserted')}, "
                  f"modified={r.get('modified')}")
    t.add_row("document store", str(info.get("document_store")))
    t.add_row("provider", str(info.get("provider")))
    console.print(t)


@app.command()
def embed(
    targets: Annotated[Path, typer.Option(help="Targets file (YAML or CSV).")],
    engine: Engine = "prefect",
    max_inputs_per_batch: Annotated[int | None, typer.Option(help="Embedding inputs per batch (shard size).")] = None,
    max_requests_per_batch: Annotated[int | None, typer.Option(help="Requests per batch file.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Continue or name this run.")] = None,
) -> None:
    """Embed the target chunks that are new or changed; load Milvus; mark MongoDB."""
    try:
        info = _run_job("embeddings", targets, engine=engine, run_id=run_id, overrides=_overrides(
            max_inputs_per_batch=max_inputs_per_batch, max_requests_per_batch=max_requests_per_batch))
    except (BatchyardError, FileNotFoundError) as exc:
        _fail(exc)
    _print_run(info)


@app.command()
def infer(
    task: Annotated[str, typer.Argument(help="Task name (see `batchyard tasks`).")],
    targets: Annotated[Path, typer.Option(help="Targets file (YAML or CSV).")],
    engine: Engine = "prefect",
    max_requests_per_batch: Annotated[int | None, typer.Option(help="Requests per batch file.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Continue or name this run.")] = None,
) -> None:
    """Run an inference task over the target units without a result for its version."""
    try:
        info = _run_job("inference", targets, engine=engine, task=task, run_id=run_id,
                        overrides=_overrides(max_requests_per_batch=max_requests_per_batch))
    except (BatchyardError, FileNotFoundError) as exc:
        _fail(exc)
    _print_run(info)


@app.command()
def resume(run_id: Annotated[str, typer.Argument(help="Run id.")], engine: Engine = "prefect") -> None:
    """Continue an interrupted or cancelled run from where it stopped."""
    try:
        info = _run_job("resume", None, engine=engine, run_id=run_id, overrides=_overrides())
    except (BatchyardError, FileNotFoundError) as exc:
        _fail(exc)
    _print_run(info)


@app.command()
def rerun(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    start: Annotated[str, typer.Option("--from", help="results (rebuild tables, reload sinks) or sinks (reload only).")]
    = "sinks",
) -> None:
    """Re-materialize a finished run from its staged files, without calling the Batch API."""
    from batchyard import runner
    from batchyard.context import RunContext

    try:
        with RunContext(_settings(_overrides())) as ctx:
            info = runner.rematerialize(ctx, run_id, start=start)
    except (BatchyardError, ValueError) as exc:
        _fail(exc)
    _print_run(info)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """Cancel a run's live batches; `batchyard resume RUN` collects what finished and goes on."""
    from batchyard import runner
    from batchyard.context import RunContext

    try:
        with RunContext(_settings(_overrides())) as ctx:
            out = runner.cancel(ctx, run_id)
    except BatchyardError as exc:
        _fail(exc)
    console.print(f"run {run_id}: cancel requested for {out['cancelled_batches']} live batch(es); "
                  f"`batchyard resume {run_id}` collects what finished and finishes the run")


@app.command()
def status(run_id: Annotated[str | None, typer.Argument(help="Run id (default: list runs).")] = None) -> None:
    """Show runs, or one run's shards and statuses, as tables."""
    from batchyard.storage.ledger import Ledger
    from batchyard.storage.runs import find_run, list_runs
    from batchyard.storage.staging import Staging

    s = _settings(_overrides())
    staging = Staging.from_settings(s.staging)
    if run_id is None:
        t = Table(title=f"runs in {staging.root}")
        for col in ("run", "job", "state", "phase", "shards", "results", "failures"):
            t.add_column(col)
        for run in list_runs(staging):
            info = run.read_run()
            final = info.get("final", {})
            t.add_row(run.run_id, run.job, info.get("state", "?"), info.get("phase", "?"),
                      str(info.get("plan", {}).get("shards", "")), str(final.get("results", "")),
                      str(final.get("failures", "")))
        console.print(t)
        return
    try:
        run = find_run(staging, run_id)
    except BatchyardError as exc:
        _fail(exc)
    info = run.read_run()
    t = Table(title=f"run {run_id} ({run.job}): {info.get('state')} / {info.get('phase')}")
    for col in ("shard", "state", "batch status", "requests", "inputs", "tokens", "batch", "outcome"):
        t.add_column(col)
    for rec in Ledger(run).all():
        t.add_row(rec.name, rec.state, rec.batch_status or "", str(rec.n_requests), str(rec.n_inputs),
                  str(rec.tokens), rec.batch_id or "", ", ".join(f"{k} {v}" for k, v in (rec.outcome or {}).items()))
    console.print(t)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address (other than loopback only with API keys, or --insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    state_dir: Annotated[Path, typer.Option(help="Where files and batches persist.")] = Path(".batchyard-server"),
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve a non-loopback address without API keys (anyone who reaches it can read every file).")] = False,
) -> None:
    """Run the local OpenAI-compatible Batch API server (files + batches) in the foreground.

    With provider.local.api_keys (BATCHYARD_PROVIDER__LOCAL__API_KEYS='["<key>"]') or
    provider.local.api_keys_file set, every request needs `Authorization: Bearer <key>`.
    """
    from batchyard.localapi.runner import ServeError, ServeRefused
    from batchyard.localapi.runner import serve as serve_forever
    from batchyard.localapi.store import StateDirLockedError

    s = _settings(_overrides())
    cfg = s.provider.local.model_copy(update={"host": host, "port": port})
    access = "API key required" if cfg.api_keys or cfg.api_keys_file else "no API key: loopback only"
    if insecure and not (cfg.api_keys or cfg.api_keys_file):
        access = "no API key: --insecure"

    def ready(url: str) -> None:
        console.print(f"batchyard Batch API server on http://{host}:{port}/v1 ({access}; state in {state_dir})")

    try:
        serve_forever(cfg, state_dir, on_ready=ready, insecure=insecure)
    except ServeRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (ServeError, StateDirLockedError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    chunks: Annotated[int, typer.Option(help="Chunks to seed.")] = 300,
    engine: Engine = "prefect",
    task: Annotated[str, typer.Option(help="Inference task to run after the embeddings.")] = "classify",
) -> None:
    """Seed a small corpus, embed it, run one inference task, and show what came back."""
    from batchyard.demo import run_demo

    os.environ.setdefault("BATCHYARD_PROVIDER__POLL_INTERVAL_S", "0.5")
    try:
        run_demo(console, chunks=chunks, engine=engine, task=task, run_job=_run_job, overrides=_overrides(),
                 settings=_settings(_overrides()), print_run=_print_run)
    except (BatchyardError, FileNotFoundError) as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    app()
