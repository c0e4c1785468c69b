"""`batchyard`: the command line (Typer + rich).

Exit codes are part of the interface (scripts and schedulers read them):

| code | meaning |
|------|---------|
| 0 | the run finished and every unit succeeded |
| 1 | error: the command could not do its work (one line on stderr; `--verbose` for the traceback) |
| 2 | usage error: a bad option, argument, targets file, task name, profile or setting |
| 3 | the run finished, but some units failed (see `failures` in the summary) |
| 4 | the run was cancelled, or is not finished yet (e.g. `--no-wait`) |
| 5 | an integrity check failed (`audit`, asset checks) |

Every user error is checked before the command waits for Prefect: a usage error exits at once,
stopping the temporary server a Prefect-engine command starts first (it takes longest to come
up; see `orchestration/temporary.py`). What a run needs is opened in the background meanwhile
(`launch.py`), and a service that cannot be reached is one line (`infra.py`) before any run is
created. Ctrl-C and SIGTERM exit 130 and 143, the run they stopped marked `interrupted`.
"""

from __future__ import annotations

import atexit
import enum
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchyard.errors import BatchyardError, ConfigError

# requests imports urllib3's SOCKS support as it loads and urllib3 warns when PySocks is missing;
# batchyard never uses a SOCKS proxy, and the warning (printed whenever a thread first imports
# requests) would break the one-line errors
warnings.filterwarnings("ignore", message="SOCKS support in urllib3 requires")

if TYPE_CHECKING:
    from batchyard.settings import Settings

# quiet, offline-friendly Prefect for the command line (a profile or the shell may override);
# a loaded 2-core machine can take far longer than Prefect's default 20 s to start its
# temporary server on the first run
for _k, _v in {
    "DO_NOT_TRACK": "1",  # no first-run telemetry notice from the Prefect SDK
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "ERROR",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # a flow run started here sends Prefect the INFO records a deployment run sends (state
    # changes, task runs); the terminal shows batchyard's own lines and one-line errors only
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
}.items():
    os.environ.setdefault(_k, _v)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILURES, EXIT_UNFINISHED, EXIT_CHECKS = 0, 1, 2, 3, 4, 5
EPILOG = (
    "Exit codes: 0 every unit succeeded · 1 error · 2 usage error · 3 finished with failed units · "
    "4 cancelled or unfinished · 5 integrity check failed."
)

app = typer.Typer(help="Batch embeddings and LLM inference over MongoDB chunks.", no_args_is_help=True,
                  epilog=EPILOG, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect configuration.")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)

_state: dict[str, Any] = {}


class EngineChoice(enum.StrEnum):
    """How a run's steps execute."""

    prefect = "prefect"
    local = "local"


Engine = Annotated[EngineChoice, typer.Option(help="prefect (flows, tasks, artifacts) or local (plain threads).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts).")]
FullScan = Annotated[bool, typer.Option(
    "--full-scan", help="Read every targeted chunk, not only those changed since the last run (the periodic "
    "full reconcile; see corpus.full_scan_every_s).")]
KeepDeleted = Annotated[bool, typer.Option(
    "--keep-deleted", help="Do not prune: keep vectors and results of chunks the source no longer has.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Snapshot and plan in this process without contacting the Batch API provider, then print "
    "partitions, shards, requests, inputs, tokens and the estimated cost at batch prices (inference: output at "
    "most max_output_tokens per request). The planned run is kept (state dry_run; the tracker leaves it alone): "
    "`--run-id RUN` without --dry-run, or `batchyard resume RUN`, submits exactly that plan; delete its staging "
    "folder to discard it.")]


class LaneChoice(enum.StrEnum):
    """Which lane requests take."""

    batch = "batch"
    realtime = "realtime"
    auto = "auto"


LaneOption = Annotated[LaneChoice | None, typer.Option(
    "--lane", help="batch (Batch API, half price, up to 24 h), realtime (synchronous calls, same bodies), "
    "or auto (real-time under lane.auto_max_tokens, and for a small retry tail). Default: lane.mode.")]


@app.callback()
def main(
    profile: Annotated[str | None, typer.Option(help="Environment profile: profiles/<name>.env.")] = None,
    root: Annotated[str | None, typer.Option(help="Staging root (local path or s3://bucket/prefix).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level; show tracebacks.")] = False,
) -> None:
    """Global options."""
    _state["profile"] = profile
    _state["root"] = root
    _state["verbose"] = verbose
    # Prefect's console handler: its records (a flow run's crash, a traceback) stay out of the
    # terminal, which gets one line per error (set before Prefect is imported, which applies it)
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING" if verbose else "CRITICAL")
    from batchyard.logs import configure_logging

    configure_logging(logging.INFO if verbose else logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM stops a command as Ctrl-C does: its run is recorded as `interrupted`."""
    _state["signal"] = signum
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- errors


def _fail(exc: BaseException, code: int = EXIT_ERROR) -> NoReturn:
    """One line on stderr (the traceback only with --verbose), then exit with `code`.

    An infrastructure failure names the component, its address (secrets masked) and the cause
    (`batchyard.infra`). When a run stopped on it, a second line says how to resume it."""
    from batchyard.infra import one_line

    _settle()
    if _state.get("verbose") and exc.__traceback__ is not None:
        from rich.traceback import Traceback

        err_console.print(Traceback.from_exception(type(exc), exc, exc.__traceback__))
    err_console.print(f"[red]error:[/red] {escape(one_line(exc, _state.get('settings')))}", highlight=False,
                      soft_wrap=True)
    _resume_hint(exc)
    raise typer.Exit(code)


def _settle() -> None:
    """Before an early exit: let what runs in the background finish (the import of Prefect, see
    `PrefectApi.settle`; the opening of the stores), so that the error is the last line printed."""
    api = _state.get("prefect_api")
    if api is not None:
        api.settle()
    for launch in _state.get("launches", []):
        launch.settle()


def _resume_hint(exc: BaseException) -> None:
    """The last line after a run stopped early: its state, and the command that continues it."""
    tagged = getattr(exc, "batchyard_run", None)
    if tagged:
        _job, run_id, state = tagged
        err_console.print(f"run {run_id} is {state}; `batchyard resume {run_id}` continues it", highlight=False,
                          soft_wrap=True)


def _interrupted(exc: BaseException) -> NoReturn:
    """Ctrl-C or SIGTERM: say so (and how to resume the run it stopped), exit 130 or 143."""
    signum = int(_state.get("signal") or signal.SIGINT)
    _settle()
    err_console.print(f"interrupted ({signal.Signals(signum).name})", highlight=False)
    _resume_hint(exc)
    raise typer.Exit(128 + signum)


def _usage_error(exc: BaseException) -> NoReturn:
    _fail(exc, EXIT_USAGE)


def _overrides(lane: str | None = None, *, full_scan: bool = False, keep_deleted: bool = False,
               **limits: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _state.get("root"):
        out["staging"] = {"root": _state["root"]}
    if lane is not None:
        out["lane"] = {"mode": lane}
    corpus = {**({"full_scan": True} if full_scan else {}), **({"prune": False} if keep_deleted else {})}
    if corpus:
        out["corpus"] = corpus
    lim = {k: v for k, v in limits.items() if v is not None}
    if "max_inputs_per_batch" in lim:
        lim = _fit_request_size(lim)
    if lim:
        out["limits"] = lim
    return out


def _fit_request_size(lim: dict[str, Any]) -> dict[str, Any]:
    """--max-inputs-per-batch sets the shard size; requests keep their configured size (profile,
    environment) unless it no longer fits in a shard, then they are lowered to the shard size.
    The result goes into the overrides a flow gets, so the flow's settings validate too."""
    from batchyard.settings import load_settings

    try:
        configured = load_settings(_state.get("profile")).limits.max_inputs_per_request
    except (FileNotFoundError, ConfigError):
        return lim  # reported as a usage error when the command loads its settings
    if configured > lim["max_inputs_per_batch"]:
        return {**lim, "max_inputs_per_request": lim["max_inputs_per_batch"]}
    return lim


def _settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings, or a one-line usage error (bad profile, unknown name, invalid value): the
    error names the setting, never its value (`load_settings`)."""
    from batchyard.settings import load_settings

    try:
        return load_settings(_state.get("profile"), **(overrides or {}))
    except (FileNotFoundError, ConfigError) as exc:
        _usage_error(exc)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _print_table(title: str, headers: list[str], rows: list[list[str]], *, no_wrap: set[str] | None = None,
                 title_style: str | None = None, out: Console | None = None) -> None:
    """A table that fits the terminal: columns side by side when they fit at their narrowest,
    else one block per row (`column  value` lines), so that no column is squeezed out of sight
    (rich shrinks columns that do not fit to nothing)."""
    out = out or console
    no_wrap = no_wrap or set()
    table = Table(title=title, title_justify="left", title_style=title_style)
    for h in headers:
        table.add_column(h, no_wrap=h in no_wrap)
    for row in rows:
        table.add_row(*row)
    # measured unconstrained: rich clamps a measurement to the width it is given
    if Measurement.get(out, out.options.update_width(100_000), table).minimum <= out.width:
        out.print(table)
        return
    out.print(title, style=title_style or "italic", highlight=False)
    for i, row in enumerate(rows):
        block = Table.grid(padding=(0, 2))
        block.add_column(no_wrap=True, style="bold")
        block.add_column(overflow="fold")
        for h, value in zip(headers, row, strict=True):
            block.add_row(h, value)
        if i:
            out.print()
        out.print(block)


# --------------------------------------------------------------------------- configuration and tasks


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (secrets masked) and which profile file was used."""
    from batchyard.settings import profile_source

    s = _settings(_overrides())
    out = {"profile_file": profile_source(_state.get("profile")), **s.masked()}
    console.print_json(json.dumps(out))


@app.command()
def tasks() -> None:
    """List the inference tasks with their versions and endpoints."""
    from batchyard.tasks.prompts import resolve_prompts_dir
    from batchyard.tasks.registry import list_tasks

    s = _settings(_overrides())
    prompts = resolve_prompts_dir(s.prompts_dir)
    t = Table(title="inference tasks")
    for col in ("task", "version", "unit", "endpoint", "prompt", "description"):
        t.add_column(col, no_wrap=col in ("task", "version"))
    for task in list_tasks():
        version = task.task_version(prompts, task.model_params(s.inference))
        t.add_row(task.name, version, task.unit, task.endpoint, task.prompt, task.description)
    console.print(t)


# --------------------------------------------------------------------------- source


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
    try:
        with RunContext(s) as ctx:
            store = ctx.store
            console.print(f"document store: [bold]{store.label}[/bold]")
            with console.status(f"seeding {chunks:,} chunks"):
                report = seed_store(store, chunks, fields=s.mongo.fields, seed=seed_value, n_companies=companies)
            store.save()
            write_targets(targets_out, targets_for(report, all_documents=not list_documents))
    except BatchyardError as exc:
        _fail(exc)
    console.print(f"seeded {report.chunks:,} chunks in {report.documents:,} documents of {report.companies:,} "
                  f"companies; targets written to {targets_out}")


# --------------------------------------------------------------------------- jobs


class _Quiet:
    """A progress display that shows nothing (`--json`)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(show: bool = True, api: Any = None) -> tuple[Any, Any]:
    """A progress bar on stderr (transient) and the callback that moves it. Its first frame says
    what the command waits for (`api`: the Prefect API it started), never a bare `starting 0/?`."""
    if not show:
        return _Quiet(), lambda event: None
    progress = Progress(
        TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err_console, transient=True,
        disable=not err_console.is_terminal,  # a log file or a pipe gets the errors only
    )
    bar = progress.add_task("starting", total=None, detail=_first_detail(api))

    def update(event: dict[str, Any]) -> None:
        detail = str(event.get("detail", ""))
        info = event.get("batches")
        if info:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(info["by_state"].items()))
            if info.get("waiting"):
                detail += f" ({info['waiting']} waiting)"
        progress.update(bar, description=event.get("stage", ""), total=event.get("total"),
                        completed=event.get("completed", 0), detail=detail)

    return progress, update


def _check_inputs(kind: str, targets: Path | None, task: str | None) -> None:
    """Usage errors that must not wait for Prefect: the targets file and the task name."""
    from batchyard.errors import TargetsError, TaskNotFound

    try:
        if targets is not None:
            from batchyard.targets import load_targets

            load_targets(targets)
        if kind == "inference":
            from batchyard.tasks.registry import get_task

            get_task(task or "")
    except (TargetsError, TaskNotFound) as exc:
        _usage_error(exc)


# --------------------------------------------------------------------------- what a run command starts


def _prefect_api() -> Any:
    """The Prefect API of this command, started (once per process) in the background: a
    temporary server comes up while the command loads and opens everything else
    (`orchestration.temporary`). Called before anything else a Prefect-engine command does."""
    api = _state.get("prefect_api")
    if api is None:
        from batchyard.infra import InfraError
        from batchyard.orchestration.temporary import PrefectApi

        try:
            api = PrefectApi().start()
        except InfraError as exc:
            _fail(exc)
        _state["prefect_api"] = api
        atexit.register(api.stop)  # after Prefect's own exit hooks (they send its last logs and events)
    return api


def _launch(settings: Settings, *, sinks: bool = True, provider: bool = True) -> Any:
    """The command's run context, its clients opened in the background (`batchyard.launch`);
    one per distinct settings, closed when the command exits."""
    from batchyard.launch import Launch

    launches: list[Launch] = _state.setdefault("launches", [])
    for launch in launches:  # settings compare their secrets too (a JSON dump would mask them)
        if launch.settings == settings and (launch.sinks, launch.provider) == (sinks, provider):
            return launch
    if not launches:
        atexit.register(_close_launches)
    launches.append(Launch(settings, sinks=sinks, provider=provider).start())
    return launches[-1]


def _close_launches() -> None:
    for launch in _state.pop("launches", []):
        launch.close()


_WHAT = {"staging": "staging root", "document store": "document store", "Milvus": "Milvus",
         "Batch API": "embedded Batch API server"}


def _ready(launch: Any, api: Any, update: Any) -> Any:
    """Wait for the launch (and the Prefect API), showing what is still starting; raise the
    first failure at once, whatever is still pending."""
    while True:
        pending = [_WHAT.get(n, n) for n in launch.pending()]
        if api is not None and not api.ready:
            pending.append("Prefect's temporary API server" if api.temporary else "Prefect API check")
        launch.check()
        if not pending:
            break
        update({"stage": "starting", "detail": ", ".join(pending), "completed": 0, "total": None})
        time.sleep(0.1)
    ctx = launch.ready()
    if api is not None:
        api.wait()
    return ctx


def _open(overrides: dict[str, Any], api: Any, update: Any, *, sinks: bool = True, provider: bool = True) -> Any:
    """The command's settings, checked, and its run context once everything is open."""
    settings = _settings(overrides)
    _state["settings"] = settings
    prefect = _state.get("prefect_api")
    if prefect is not None:  # the inputs are good: import Prefect while its server comes up
        prefect.preload("batchyard.orchestration.flows")
    return _ready(_launch(settings, sinks=sinks, provider=provider), api, update)


def _first_detail(api: Any) -> str:
    """What a command waits for first: Prefect's temporary server, or its stores."""
    return "Prefect's temporary API server" if api is not None and api.temporary else "opening the stores"


def _run_job(kind: str, targets: Path | None, *, engine: EngineChoice | str, overrides: dict[str, Any],
             task: str | None = None, run_id: str | None = None, wait: bool = True,
             show_progress: bool = True) -> dict[str, Any]:
    """Run a job (or resume a run) on the chosen engine; returns its run.json.

    Under Prefect, Prefect's API starts first (it takes longest), then the inputs and settings
    are checked, then the stores open while it comes up; the progress bar shows all of it."""
    engine = EngineChoice(engine)
    api = _prefect_api() if engine is EngineChoice.prefect else None
    progress, update = _progress(show_progress, api)
    with progress:
        _check_inputs(kind, targets, task)
        ctx = _open(overrides, api, update)
        hook = update if show_progress else None
        if api is not None:
            return _run_prefect(kind, targets, task=task, run_id=run_id, wait=wait, overrides=overrides, hook=hook,
                                ctx=ctx)
        from batchyard import runner

        if kind == "resume":
            return runner.resume(ctx, run_id or "", on_progress=hook)
        from batchyard.targets import load_targets

        tg = load_targets(targets) if targets else None
        if kind == "embeddings":
            from batchyard.jobs.embeddings import EmbeddingsJob

            job: Any = EmbeddingsJob(ctx, tg)  # type: ignore[arg-type]
        else:
            from batchyard.jobs.inference import InferenceJob

            job = InferenceJob(ctx, tg, task or "")  # type: ignore[arg-type]
        return runner.execute(ctx, job, run_id=run_id, on_progress=hook, wait=wait)


def _call_flow(name: str, settings: Settings, ctx: Any, hook: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one of `orchestration.flows` in this process, in the command's context; returns what
    it returned whatever its final state (Prefect imported here: after `PREFECT_API_URL` is set)."""
    from batchyard.orchestration import flows

    if hook is not None:
        flows.PROGRESS_HOOKS.append(hook)
    try:
        with flows.provided_context(ctx):
            state = flows.with_runner(getattr(flows, name), settings)(
                profile=_state.get("profile"), return_state=True, **kwargs)
        return flows.outcome(state)
    finally:
        if hook is not None:
            flows.PROGRESS_HOOKS.remove(hook)


def _run_prefect(kind: str, targets: Path | None, *, task: str | None, run_id: str | None, wait: bool,
                 overrides: dict[str, Any], hook: Any, ctx: Any) -> dict[str, Any]:
    settings = ctx.settings
    if kind == "embeddings":
        return _call_flow("embeddings_flow", settings, ctx, hook, targets=str(targets), run_id=run_id,
                          overrides=overrides, wait=wait)
    if kind == "inference":
        return _call_flow("inference_flow", settings, ctx, hook, task_name=task or "", targets=str(targets),
                          run_id=run_id, overrides=overrides, wait=wait)
    return _call_flow("resume_flow", settings, ctx, hook, run_id=run_id or "", overrides=overrides)


def _print_run(info: dict[str, Any]) -> None:
    from batchyard.pricing import figure
    from batchyard.runner import describe_state

    t = Table(title=f"run {info['run_id']} ({info['job']}): {describe_state(info)}", title_justify="left")
    t.add_column("stage", no_wrap=True)
    t.add_column("figures")
    for key in ("snapshot", "plan", "final"):
        if key in info:
            val = {k: v for k, v in info[key].items() if not isinstance(v, dict)}
            t.add_row(key, ", ".join(f"{k}={figure(k, v)}" for k, v in val.items()))
    cost = _cost_line(info.get("final", {}))
    if cost:
        t.add_row("cost", cost)
    by_code = info.get("final", {}).get("failures_by_code")
    if by_code:
        t.add_row("failures", ", ".join(f"{k}={v}" for k, v in by_code.items()))
    lanes = info.get("final", {}).get("lanes")
    if lanes:
        t.add_row("lanes", _lanes_line(lanes))
    queue = info.get("final", {}).get("queue") or {}
    if "mean_fill_while_waiting" in queue:
        t.add_row("provider queue", f"{queue['mean_fill_while_waiting']:.0%} full on average while work waited "
                  f"({queue['seconds_waiting']:,} s; cap {queue['cap_tokens']:,} tokens)")
    for r in info.get("loads", []):
        imported = f"imported={r['imported']}, " if r.get("imported") else ""  # Milvus bulk import
        t.add_row(f"load {r.get('sink')}", f"{r.get('target')}: rows={r.get('rows')}, {imported}"
                  f"upserted={r.get('upserted')}, modified={r.get('modified')}, parts={r.get('parts')}")
    unmatched = info.get("targets_unmatched")
    if unmatched:
        t.add_row("unmatched targets", ", ".join(unmatched))
    t.add_row("document store", str(info.get("document_store")))
    t.add_row("provider", str(info.get("provider")))
    console.print(t)
    if info.get("phase") == "done" and not info.get("plan", {}).get("units") and not info.get("final", {}).get("failures"):
        console.print("nothing to do: every targeted unit is up to date (its assets are fresh); nothing was submitted")
    if info.get("phase") != "done":
        console.print(f"run {info['run_id']} is not finished (phase {info.get('phase')}): the scheduled tracker "
                      f"or `batchyard resume {info['run_id']}` finishes it")


def _cost_line(final: dict[str, Any]) -> str:
    """The plan's cost estimate, at the prices of the lane(s) the run used, next to the cost of
    what the provider reported using (each lane at its price)."""
    from batchyard.pricing import usd

    if "cost_estimate_usd" not in final:
        return ""
    tokens = final.get("cost_estimate_tokens")
    planned = ""
    if tokens:
        out = f" + at most {tokens['output_max']:,} output" if tokens.get("output_max") else ""
        planned = f" ({tokens.get('input', 0):,} input tokens{out})"
    lanes = set(final.get("lanes") or {})
    realtime = usd(final.get("cost_estimate_realtime_usd", 0.0))
    if lanes == {"realtime"}:
        estimate = f"estimate {realtime} at real-time prices{planned}"
    else:
        both = f", {realtime} real-time" if "realtime" in lanes else ""
        estimate = f"estimate {usd(final['cost_estimate_usd'])} at batch prices{both}{planned}"
    usage = final.get("usage", {})
    used = ", ".join(f"{k}={v:,}" for k, v in usage.items() if k in ("input_tokens", "output_tokens")) or "none"
    return f"{estimate} · reported {usd(final.get('cost_reported_usd', 0.0))} (provider usage: {used})"


def _lanes_line(lanes: dict[str, Any]) -> str:
    """Per lane: the tokens the provider finished and their cost at that lane's price."""
    from batchyard.pricing import usd

    def one(name: str, v: dict[str, Any]) -> str:
        out = f" + {v['output_tokens']:,} output" if v.get("output_tokens") else ""
        return f"{name}: {v.get('input_tokens', 0):,} input{out} tokens, {usd(v['usd'])}"

    return ", ".join(one(k, v) for k, v in lanes.items())


def _report(info: dict[str, Any], as_json: bool) -> NoReturn:
    """Print the run's summary (table or JSON) and exit with the run's exit code."""
    from batchyard.runner import exit_code

    if as_json:
        _emit_json(info)
    else:
        _print_run(info)
    raise typer.Exit(exit_code(info))


def _guarded(fn: Any) -> dict[str, Any]:
    """Run a job, turning its errors into one-line exits (exit 2 for usage errors, 1 for the
    rest, 130/143 for Ctrl-C/SIGTERM); `--verbose` adds the traceback."""
    try:
        return dict(fn())
    except typer.Exit:
        raise
    except (ConfigError, FileNotFoundError) as exc:
        _usage_error(exc)
    except BatchyardError as exc:
        from batchyard.trail import UnitNotFound

        _fail(exc, EXIT_USAGE if isinstance(exc, UnitNotFound) else EXIT_ERROR)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:
        _fail(exc)


def _dry_run(kind: str, targets: Path, *, task: str | None, run_id: str | None, overrides: dict[str, Any],
             as_json: bool) -> NoReturn:
    """`--dry-run`: snapshot and plan with no Batch API client, print the estimate, exit 0."""
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.targets import load_targets

    _check_inputs(kind, targets, task)
    settings = _settings(overrides)

    def go() -> dict[str, Any]:
        progress, update = _progress()
        with progress if not as_json else _Quiet(), RunContext(settings) as ctx:
            tg = load_targets(targets)
            if kind == "embeddings":
                from batchyard.jobs.embeddings import EmbeddingsJob

                job: Any = EmbeddingsJob(ctx, tg)
            else:
                from batchyard.jobs.inference import InferenceJob

                job = InferenceJob(ctx, tg, task or "")
            return runner.dry_run(ctx, job, run_id=run_id, on_progress=None if as_json else update)

    info = _guarded(go)
    if as_json:
        _emit_json({"run_id": info["run_id"], "job": info["job"], "state": info.get("state"),
                    "phase": info.get("phase"), **info["dry_run"]})
        raise typer.Exit(EXIT_OK)
    est = info["dry_run"]
    console.print(f"[bold]dry run {info['run_id']}[/bold] ({info['job']}): planned, nothing was sent",
                  highlight=False)
    t = Table()
    t.add_column("", no_wrap=True)
    t.add_column("value", justify="right")
    for key in ("partitions", "shards", "requests", "inputs", "units", "rejected", "input_tokens",
                "output_tokens_max", "bytes", "tokens_saved"):
        if key != "output_tokens_max" or est[key]:
            t.add_row(key.replace("_", " "), f"{est[key]:,}")
    priced = "" if est["priced"] else f" (no price for {est['model']}: set pricing.models)"
    t.add_row("cost at batch prices", f"${est['cost_batch_usd']:,.6f}{priced}")
    t.add_row("cost in real time", f"${est['cost_realtime_usd']:,.6f}")
    if est["cost_saved_usd"]:
        t.add_row("saved by reuse and dedup", f"${est['cost_saved_usd']:,.6f}")
    console.print(t)
    if info.get("state") == "dry_run":
        console.print(f"to submit exactly this plan: `batchyard resume {info['run_id']}`; "
                      f"to discard it, delete its staging folder ({info['job']}/{info['run_id']})")
    raise typer.Exit(EXIT_OK)


@app.command(epilog=EPILOG)
def embed(
    targets: Annotated[Path, typer.Option(help="Targets file (YAML or CSV).")],
    engine: Engine = EngineChoice.prefect,
    max_inputs_per_batch: Annotated[int | None, typer.Option(help="Embedding inputs per batch (shard size).")] = None,
    max_requests_per_batch: Annotated[int | None, typer.Option(help="Requests per batch file.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Continue or name this run.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the batches (default), or submit and "
                                       "return: the scheduled tracker finishes the run.")] = True,
    lane: LaneOption = None,
    full_scan: FullScan = False,
    keep_deleted: KeepDeleted = False,
    dry_run: DryRun = False,
    as_json: AsJson = False,
) -> None:
    """Embed the target chunks that are new or changed; load Milvus; mark MongoDB; prune what the
    source no longer has."""
    over = _overrides(lane=lane.value if lane else None, full_scan=full_scan, keep_deleted=keep_deleted,
                      max_inputs_per_batch=max_inputs_per_batch, max_requests_per_batch=max_requests_per_batch)
    if dry_run:
        _dry_run("embeddings", targets, task=None, run_id=run_id, overrides=over, as_json=as_json)
    info = _guarded(lambda: _run_job("embeddings", targets, engine=engine, run_id=run_id, overrides=over,
                                     wait=wait, show_progress=not as_json))
    _report(info, as_json)


@app.command(epilog=EPILOG)
def infer(
    task: Annotated[str, typer.Argument(help="Task name (see `batchyard tasks`).")],
    targets: Annotated[Path, typer.Option(help="Targets file (YAML or CSV).")],
    engine: Engine = EngineChoice.prefect,
    max_requests_per_batch: Annotated[int | None, typer.Option(help="Requests per batch file.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Continue or name this run.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the batches (default), or submit and "
                                       "return: the scheduled tracker finishes the run.")] = True,
    lane: LaneOption = None,
    full_scan: FullScan = False,
    keep_deleted: KeepDeleted = False,
    dry_run: DryRun = False,
    as_json: AsJson = False,
) -> None:
    """Run an inference task over the target units without a result for its version; flag or
    remove results of units the source no longer has."""
    over = _overrides(lane=lane.value if lane else None, full_scan=full_scan, keep_deleted=keep_deleted,
                      max_requests_per_batch=max_requests_per_batch)
    if dry_run:
        _dry_run("inference", targets, task=task, run_id=run_id, overrides=over, as_json=as_json)
    info = _guarded(lambda: _run_job("inference", targets, engine=engine, task=task, run_id=run_id,
                                     overrides=over, wait=wait, show_progress=not as_json))
    _report(info, as_json)


@app.command(epilog=EPILOG)
def resume(run_id: Annotated[str, typer.Argument(help="Run id.")], engine: Engine = EngineChoice.prefect,
           as_json: AsJson = False) -> None:
    """Continue an interrupted or cancelled run from where it stopped."""
    _check_run_exists(run_id)
    info = _guarded(lambda: _run_job("resume", None, engine=engine, run_id=run_id, overrides=_overrides(),
                                     show_progress=not as_json))
    _report(info, as_json)


def _print_queues(staging: Any, settings: Settings) -> None:
    """The provider queues of the staging root: what every run holds against each cap."""
    from batchyard.provider_queue import accounts

    rows = accounts(staging)
    if not rows:
        return
    budget = settings.limits.enqueued_token_budget
    t = Table(title="provider queue (enqueued tokens reserved by every run and worker)", title_justify="left")
    for col in ("account", "model", "batches", "reserved", "cap", "fill", "provider/ours", "runs"):
        t.add_column(col, no_wrap=col in ("model", "batches"))
    for q in rows:
        cap = min(budget, q["stated_cap"]) if q["stated_cap"] else budget
        t.add_row(q["account"], q["model"], str(q["reservations"]), f"{q['provider_tokens']:,}",
                  f"{cap:,}" + (" (stated)" if q["stated_cap"] and q["stated_cap"] <= budget else ""),
                  f"{q['provider_tokens'] / max(cap, 1):.0%}", f"{q['ratio']:.3f}", ", ".join(q["runs"][:3])
                  + (f" (+{len(q['runs']) - 3})" if len(q["runs"]) > 3 else ""))
    console.print(t)


def _check_run_exists(run_id: str) -> None:
    from batchyard.errors import RunNotFound
    from batchyard.storage.runs import find_run
    from batchyard.storage.staging import Staging

    try:
        find_run(Staging.from_settings(_settings(_overrides()).staging), run_id)
    except RunNotFound as exc:
        _usage_error(exc)


class RerunFrom(enum.StrEnum):
    """Where `rerun` starts re-materializing."""

    results = "results"
    sinks = "sinks"


@app.command(epilog=EPILOG)
def rerun(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    start: Annotated[RerunFrom, typer.Option("--from", help="results (re-parse staged outputs, reload sinks) or "
                                             "sinks (reload only).")] = RerunFrom.sinks,
    engine: Engine = EngineChoice.prefect,
    as_json: AsJson = False,
) -> None:
    """Re-materialize a finished run from its staged files, without calling the Batch API.

    Under Prefect (default) it is a flow run (`batchyard-rerun`) that materializes the assets it
    rewrote."""
    _check_run_exists(run_id)
    api = _prefect_api() if engine is EngineChoice.prefect else None

    def go() -> dict[str, Any]:
        progress, update = _progress(not as_json, api)
        with progress:
            ctx = _open(_overrides(), api, update, provider=False)
            try:
                if api is not None:
                    return _call_flow("rerun_flow", ctx.settings, ctx, update, run_id=run_id, start=start.value,
                                      overrides=_overrides())
                from batchyard import runner

                return runner.rematerialize(ctx, run_id, start=start.value)
            except ValueError as exc:
                _fail(exc)

    _report(_guarded(go), as_json)


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    wait_s: Annotated[float, typer.Option("--wait", help="Seconds to wait for a live driver to act.")] = 30.0,
) -> None:
    """Cancel a run: live batches are cancelled, what finished is kept; `resume` continues it.

    Works while another process drives the run: the request is recorded in the run's staging
    folder and that process acts on it within one poll round.
    """
    from batchyard import runner
    from batchyard.context import RunContext

    _check_run_exists(run_id)
    try:
        with RunContext(_settings(_overrides())) as ctx:
            out = runner.cancel(ctx, run_id, wait_s=wait_s)
    except BatchyardError as exc:
        _fail(exc)
    if out["ended"]:
        console.print(f"run {run_id} already ended ({out['ended']}): nothing to cancel, nothing changed")
    elif out["driven_by"]:
        owner = out["driven_by"]["owner"]
        state = "acknowledged" if out["acknowledged"] else "recorded (not yet acknowledged)"
        console.print(f"run {run_id}: cancel {state}; the process driving it ({owner}) cancels its live batches, "
                      "collects what finished and stops")
    else:
        console.print(f"run {run_id}: cancel requested for {out['cancelled_batches']} live batch(es); "
                      f"`batchyard resume {run_id}` collects what finished and finishes the run")


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Run id (default: list runs).")] = None,
    shards: Annotated[bool, typer.Option("--shards", help="Also list every shard attempt.")] = False,
    as_json: AsJson = False,
) -> None:
    """Show runs, or one run's partitions (and shards), as tables or JSON."""
    from batchyard import runner
    from batchyard.runner import partition_table
    from batchyard.storage.ledger import run_records
    from batchyard.storage.runs import find_run, list_runs
    from batchyard.storage.staging import Staging

    s = _settings(_overrides())
    staging = Staging.from_settings(s.staging)
    if run_id is None:
        rows = []
        for run in list_runs(staging):
            info = run.read_run()
            final = info.get("final", {})
            rows.append({"run": run.run_id, "job": run.job, "state": runner.describe_state(info),
                         "phase": info.get("phase", "?"), "partitions": len(info.get("partitions", [])),
                         "shards": info.get("plan", {}).get("shards"), "results": final.get("results"),
                         "failures": final.get("failures")})
        if as_json:
            _emit_json(rows)
            return
        _print_table(f"runs in {staging.root}", ["run", "job", "state", "phase", "partitions", "shards", "results",
                                                 "failures"],
                     [["" if v is None else str(v) for v in r.values()] for r in rows], no_wrap={"run", "job"})
        _print_queues(staging, s)
        return
    try:
        run = find_run(staging, run_id)
    except BatchyardError as exc:
        _usage_error(exc)
    info = run.read_run()
    parts = partition_table(run)
    records = run_records(run)
    if as_json:
        _emit_json({"run": info, "partitions": parts,
                    "shards": [r.model_dump(mode="json", exclude={"history"}) for r in records] if shards else None})
        return
    _print_table(f"run {run_id} ({run.job}): {runner.describe_state(info)} / {info.get('phase')}",
                 ["partition", "companies", "phase", "chunks", "requests", "shards", "waiting", "results",
                  "loaded_parts"], [[str(v) for v in p.values()] for p in parts], no_wrap={"partition"})
    waiting = [r for r in records if r.waiting_note]
    if shards or waiting:
        _print_table("shard attempts" if shards else "waiting shard attempts",
                     ["shard", "state", "batch status", "requests", "inputs", "tokens", "batch", "outcome / note"],
                     [[rec.key, rec.state, rec.batch_status or "", str(rec.n_requests), str(rec.n_inputs),
                       str(rec.tokens), rec.batch_id or "",
                       rec.waiting_note or ", ".join(f"{k} {v}" for k, v in (rec.outcome or {}).items())]
                      for rec in (records if shards else waiting)], no_wrap={"shard", "batch"})


# --------------------------------------------------------------------------- audit


@app.command(epilog=EPILOG)
def audit(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    unit_id: Annotated[str | None, typer.Option("--id", help="Show the trail of one chunk or unit id.")] = None,
    full: Annotated[bool, typer.Option("--full", help="With --id: also print the whole request line and each "
                                       "whole output or error line (megabytes for a large request).")] = False,
    sinks: Annotated[bool, typer.Option("--sinks/--no-sinks", help="Also check that Milvus and MongoDB hold what "
                                        "was loaded (default), or check staging only.")] = True,
    engine: Engine = EngineChoice.prefect,
    as_json: AsJson = False,
) -> None:
    """Reconcile a run from its staged files and the sinks, with no Batch API call.

    Prints what was selected, rejected, planned, sent (per shard attempt: sha256, file and batch
    ids, request counts), received, parsed, failed and loaded, and checks that every count
    agrees: re-parsing the staged output and error files must give the recorded outcomes, each
    shard file must match its ledger sha256. Exit 0 when everything reconciles, 5 when something
    differs (each difference names the counts and the units). With --id: the trail of one chunk
    or unit, from its source row to its Milvus/MongoDB document (exit 5 if the trail
    contradicts itself): its own input, where its output line is and, for an embedding, the
    vector's first values and norm; --full adds the whole request and output lines. Under
    Prefect (default) the audit is a flow run (`batchyard-audit`), `Failed` when something differs.
    """
    from batchyard.storage.runs import find_run
    from batchyard.trail import audit_or_trail

    _check_run_exists(run_id)
    api = _prefect_api() if engine is EngineChoice.prefect else None
    uses_sinks = bool(sinks or unit_id)

    def go() -> dict[str, Any]:
        progress, update = _progress(not as_json, api)
        with progress:
            ctx = _open(_overrides(), api, update, sinks=uses_sinks, provider=False)
            if api is not None:
                return _call_flow("audit_flow", ctx.settings, ctx, None, run_id=run_id, unit_id=unit_id,
                                  sinks=sinks, full=full, overrides=_overrides())
            return audit_or_trail(ctx, find_run(ctx.staging, run_id), unit_id=unit_id, sinks=sinks, full=full)

    out = _guarded(go)
    kind = out.pop("kind")
    if as_json:
        _emit_json(out)
    elif kind == "trail":
        _print_trail(out)
    else:
        _print_audit(out)
    raise typer.Exit(EXIT_CHECKS if out["differences"] else EXIT_OK)


_AUDIT_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "selected": [("partition", "partition"), ("companies", "companies"), ("chunks", "chunks"),
                 ("repeated_ids", "repeated ids"), ("snapshot_rejects", "snapshot rejects"), ("planned", "planned"),
                 ("plan_rejects", "plan rejects")],
    "rejected": [("stage", "stage"), ("code", "code"), ("units", "units")],
    "planned": [("partition", "partition"), ("units", "units"), ("sent", "sent"), ("aliases", "aliases"),
                ("reused", "reused"), ("requests", "requests"), ("shards", "shards"), ("tokens", "tokens")],
    "sent": [("shard", "shard attempt"), ("lane", "lane"), ("state", "state"), ("sha256", "sha256 (verified)"),
             ("file_id", "file id"),
             ("batch_id", "batch id"), ("requests", "requests"), ("inputs", "inputs"),
             ("request_counts", "provider counts")],
    "received": [("shard", "shard attempt"), ("status", "batch"), ("sent", "sent"), ("output", "output lines"),
                 ("error", "error lines"), ("unfinished", "of which unfinished"), ("missing", "missing"),
                 ("anomalies", "anomalies")],
    "parsed": [("shard", "shard attempt"), ("ok", "ok"), ("requeue", "requeue"), ("retry", "retry"), ("fail", "fail"),
               ("units_ok", "units ok"), ("units_fail", "units failed"), ("units_pending", "units pending")],
    "failed": [("stage", "stage"), ("code", "code"), ("units", "units")],
    "loaded": [("sink", "sink"), ("target", "target"), ("parts", "parts"), ("rows", "result rows"),
               ("receipt_rows", "receipt rows"), ("found", "in the sink"), ("superseded", "rewritten later")],
}
_NO_WRAP = {"partition", "shard", "file_id", "batch_id", "target", "code", "sha256"}


def _audit_cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "shard" and "attempt" in row:
        return f"{row['partition']}/{row['shard']}.{row['attempt']}"
    if key == "sha256":
        return f"{str(value)[:16]}… {'✓' if row.get('sha256_ok') else '✗ differs'}"
    if key == "companies":
        names = list(value or [])
        return ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
    if key == "batch_id" and row.get("past_batches"):
        return f"{value or ''}\n(earlier: {', '.join(row['past_batches'])})"
    if key == "request_counts":
        return "" if not value else f"{value.get('completed', 0)}/{value.get('failed', 0)}/{value.get('total', 0)}"
    return "" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _print_audit(report: dict[str, Any]) -> None:
    """The audit report (its JSON form) as tables."""
    run = report["run"]
    console.print(f"[bold]audit of run {run['run_id']}[/bold] ({run['job']}, {run['state']} / {run['phase']})",
                  highlight=False)
    for name, columns in _AUDIT_COLUMNS.items():
        rows = report.get(name, [])
        if not rows:
            console.print(f"{name}: none", style="italic")
            continue
        _print_table(name + (" (provider counts: completed/failed/total)" if name == "sent" else ""),
                     [label for _, label in columns], [[_audit_cell(row, key) for key, _ in columns] for row in rows],
                     no_wrap={label for key, label in columns if key in _NO_WRAP})
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)
    differences = report["differences"]
    if not differences:
        console.print(f"[green]{report['checks']:,} counts reconciled; everything agrees[/green]")
        return
    _print_table(f"{len(differences)} difference(s) in {report['checks']:,} reconciled counts",
                 ["check", "expected", "actual", "units"],
                 [[d["check"], d["expected"], d["actual"],
                   "\n".join(d["units"]) + (f"\n(+{d['more']} more)" if d["more"] else "")] for d in differences],
                 no_wrap={"units"}, title_style="bold red")


def _own_output_text(own: dict[str, Any]) -> str:
    """What an output or error line says about one unit, in a few words."""
    if own.get("error"):
        err = own["error"]
        return f"error {err.get('code')}: {err.get('message')}" if isinstance(err, dict) else f"error: {err}"
    if "vector" in own:
        vec = own["vector"]
        if vec is None:
            return f"data[{own['data_index']}]: no valid vector"
        head = ", ".join(f"{v:.6f}" for v in vec["head"])
        return f"data[{own['data_index']}]: {vec['dims']} dimensions, norm {vec['norm']:.6f}, first values [{head}, …]"
    return f"answer: {own.get('answer', '')}"


def _print_trail(found: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    for src in found.get("source", []):
        rows.append(("source row", f"chunk {src['chunk_id']} (_id {src['source_id']}), company {src['company_id']}, "
                     f"document {src['document_id']}, index {src['chunk_index']}, text sha256 {src['text_sha256']}"))
    plan = found.get("plan")
    if plan:
        route = plan.get("route", "request")
        tokens = plan.get("tokens", plan.get("n_tokens"))
        rows.append(("planned", f"unit {found['unit_id']} in partition {found['partition']}, {route}"
                     + (f", {tokens} tokens" if tokens else "") + (", truncated" if plan.get("truncated") else "")))
    served = found.get("served_by")
    if served:
        rows.append(("served by", served["why"]))
    req = found.get("request")
    if req:
        own = req.get("own", {})
        rows.append(("request", f"custom_id {req['custom_id']}, shard {req['shard']}: input {req['position'] + 1} "
                     f"of {req['n_inputs']} (index {req['position']}), line of {own.get('line_bytes', 0):,} bytes"
                     + (f", model {own['model']}" if own.get("model") else "")))
        if own.get("system_chars"):
            rows.append(("system prompt", f"{own['system_chars']:,} characters (the task's, the same for every unit)"))
        if own.get("input") is not None:
            rows.append(("input", str(own["input"])))
    for a in found.get("attempts", []):
        raw = a["raw"]
        where = (f"{raw['file']} line {raw['line_no']} ({raw.get('line_bytes', 0):,} bytes)" if raw
                 else "no output or error line")
        outcome = a["outcome"] or {}
        rows.append((f"attempt {a['shard']}.{a['attempt']}",
                     f"file {a['file_id']}, batch {a['batch_id']} ({a['batch_status']}), sha256 "
                     f"{'verified' if a['sha256_ok'] else 'DIFFERS'}; {where}; outcome {outcome.get('outcome')}"
                     f" ({outcome.get('final')}{', ' + str(outcome['code']) if outcome.get('code') else ''})"))
        if raw and raw.get("own"):
            rows.append(("  output", _own_output_text(raw["own"])))
    result = found.get("result")
    if result:
        rows.append(("result", f"results/{result['part']}.parquet"
                     + (f", vector_source {result['vector_source']}" if result.get("vector_source") else "")))
    for f in found.get("failures", []):
        rows.append(("failure", f"failures/{f['part']}.parquet: {f['code']}: {f['message']}"))
    loaded = found.get("loaded") or {}
    receipt = loaded.get("receipt")
    if receipt:
        rows.append(("loaded", f"loads/{loaded['part']}.json at {receipt['at']}: "
                     + ", ".join(f"{s['sink']} {s['target']}" for s in receipt["sinks"])))
    if "milvus" in loaded:
        m = loaded["milvus"]
        rows.append(("Milvus", f"collection {m['collection']}: "
                     + (f"chunk_id {m['chunk_id']}, run {m['run_id']}, text sha256 {m['text_sha256']}" if m["found"]
                        else "not found")))
    if "mongo" in loaded:
        m = loaded["mongo"]
        doc = m.get("mark") or m.get("document")
        rows.append(("MongoDB", f"{m['collection']} {json.dumps(m['filter'], default=str)}: "
                     + (json.dumps(doc, default=str) if m["found"] else "not found")))
    for note in loaded.get("superseded", []):
        rows.append(("note", note))
    for d in found.get("differences", []):
        rows.append(("[red]difference[/red]", d))
    t = Table(title=f"trail of {found['id']} in run {found['run_id']} ({found['job']})", title_justify="left",
              show_header=False)
    t.add_column("what", no_wrap=True)
    t.add_column("value", overflow="fold")
    for what, value in rows:
        t.add_row(what, escape(value))
    console.print(t)
    if req and "line" in req:
        console.print(f"request line ({req['custom_id']}):", style="bold")
        console.print(req["line"], markup=False, highlight=False, soft_wrap=True)
    for a in found.get("attempts", []):
        if a["raw"] and "text" in a["raw"]:
            console.print(f"raw line, {a['raw']['file']} line {a['raw']['line_no']} (batch {a['batch_id']}):",
                          style="bold")
            console.print(a["raw"]["text"], markup=False, highlight=False, soft_wrap=True)
    if req and "line" not in req:
        console.print(f"`batchyard audit {found['run_id']} --id {found['id']} --full` prints the whole request "
                      "and output lines", highlight=False, markup=False, soft_wrap=True)


@app.command(epilog=EPILOG)
def assets(
    job: Annotated[str | None, typer.Option("--job", help="Only this job (embeddings, inference-<task>).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Also compare the sinks with the source unit by unit "
                                        "(exit 5 on a difference).")] = False,
    as_json: AsJson = False,
) -> None:
    """Every partition key of every job: its latest materialization across runs and its state now.

    A key is stale when the source has units to process for it, its task version or a setting
    that shapes results changed, its last materialization failed a check, or the sink holds
    fewer or more than was loaded (Milvus counts per company). `--check` runs the checks against
    the sinks now and exits 5 when one fails.
    """
    from batchyard import runner
    from batchyard.context import RunContext

    with RunContext(_settings(_overrides())) as ctx:
        rows = _guarded(lambda: {"rows": runner.asset_status(ctx, job_name=job, check=check)})["rows"]
    failed = check and any(r for row in rows for r in row["reasons"] if r.startswith(("check:", "failed check")))
    if as_json:
        _emit_json(rows)
        raise typer.Exit(EXIT_CHECKS if failed else EXIT_OK)
    color = {"fresh": "green"}
    _print_table("assets: partition keys",
                 ["scope", "partition", "run", "materialized", "results", "failures", "in flight", "status", "reason"],
                 [[r["scope"].rsplit("/", 1)[0], r["partition"], r["run_id"] or "", (r["materialized_at"] or "")[:19],
                   f"{r['results']:,}", f"{r['failures']:,}", f"{r['in_flight']:,}" if r["in_flight"] else "",
                   f"[{color.get(r['status'], 'yellow')}]{r['status']}[/]", escape("; ".join(r["reasons"]))]
                  for r in rows], no_wrap={"partition", "run", "status"})
    stale = sum(1 for r in rows if r["status"] == "stale")
    console.print(f"{len(rows):,} partition key(s): {len(rows) - stale:,} fresh, {stale:,} stale")
    raise typer.Exit(EXIT_CHECKS if failed else EXIT_OK)


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
    keyed = bool(cfg.api_keys or cfg.api_keys_file or cfg.admin_api_keys)
    access = "API key required, each key sees its own files and batches" if keyed else "no API key: loopback only"
    if insecure and not keyed:
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


@app.command(epilog=EPILOG)
def demo(
    chunks: Annotated[int, typer.Option(help="Chunks to seed.")] = 300,
    engine: Engine = EngineChoice.prefect,
    task: Annotated[str, typer.Option(help="Inference task to run after the embeddings.")] = "classify",
) -> None:
    """Seed a small corpus, embed it, run one inference task, and show what came back."""
    os.environ.setdefault("BATCHYARD_PROVIDER__POLL_INTERVAL_S", "0.5")
    api = _prefect_api() if engine is EngineChoice.prefect else None  # comes up while the corpus is seeded
    console.rule("1. seed")

    def go() -> dict[str, Any]:
        progress, update = _progress(api=api)
        with progress:
            _check_inputs("inference", None, task)
            ctx = _open(_overrides(), None, update)
        from batchyard.demo import run_demo

        return {"code": run_demo(console, chunks=chunks, engine=engine.value, task=task, ctx=ctx, run_job=_run_job,
                                 overrides=_overrides(), print_run=_print_run)}

    raise typer.Exit(_guarded(go)["code"])


# --------------------------------------------------------------------------- look at the data


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="The text to search for.")],
    k: Annotated[int, typer.Option("--k", help="Distinct texts to show.")] = 10,
    company: Annotated[str | None, typer.Option(help="Only chunks of this company.")] = None,
    document: Annotated[str | None, typer.Option(help="Only chunks of this document.")] = None,
    as_json: AsJson = False,
) -> None:
    """The chunks nearest to TEXT in the Milvus collection of the configured embedding space.

    The text is embedded like the corpus (provider, model, dimensions; the embedded local server
    when no API key is set). Identical texts are shown once, with how many chunks carry them.
    """
    import tempfile

    from rich.markup import escape

    from batchyard.context import RunContext
    from batchyard.search import search_text

    settings = _settings(_overrides())
    # the embedded server answers one embeddings call here: give it a state of its own, so a
    # search neither waits for nor loads the state of a run's server
    with tempfile.TemporaryDirectory(prefix="batchyard-search-") as state:
        if settings.provider.embedded:
            local = settings.provider.local.model_copy(update={"state_dir": state})
            settings = settings.model_copy(update={"provider": settings.provider.model_copy(update={"local": local})})
        with RunContext(settings) as ctx:
            hits = _guarded(lambda: {"hits": search_text(ctx, text, k=k, company=company, document=document)})["hits"]
    if as_json:
        _emit_json(hits)
        return
    t = Table(title=f"nearest to {_snippet(text, 50)!r}", title_justify="left", caption_justify="left",
              caption=f"score: {settings.milvus.metric_type} in space {settings.embedding.space}; "
              "copies: chunks with this exact text, shown once")
    for col in ("rank", "score", "copies"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("chunk (company · document)", overflow="fold", ratio=2)
    t.add_column("text", min_width=24, ratio=3)
    for h in hits:
        where = f"[dim]{escape(h['company'] or '')} · {escape(h['document'] or '')}[/dim]"
        t.add_row(str(h["rank"]), f"{h['score']:.4f}", f"{h['count']:,}", f"{escape(h['chunk_id'])}\n{where}",
                  escape(_snippet(h["text"], 160)) if h["text"] is not None else "[dim](not in the source)[/dim]")
    console.print(t)
    if not hits:
        console.print("no vector matched")


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the page here (default: report.html in the "
                                            "run's staging folder).")] = None,
) -> None:
    """Write one self-contained HTML page about a run: summary, cost per lane, a timeline of every
    shard attempt, the provider queue's fill, tokens per shard, failures by code, the bins.

    Read from the run's staged files only (no API call); the page loads nothing from anywhere.
    """
    from batchyard.report import write
    from batchyard.storage.runs import find_run
    from batchyard.storage.staging import Staging

    _check_run_exists(run_id)
    run = find_run(Staging.from_settings(_settings(_overrides()).staging), run_id)
    written = _guarded(lambda: {"w": write(run, out)})["w"]
    console.print(f"report of run {run_id} ({run.job}) written to {written.location} "
                  f"({written.bytes / 1024:,.0f} KiB)", highlight=False, soft_wrap=True)


def _snippet(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run() -> None:  # pragma: no cover - the console script
    """Entry point: `batchyard`."""
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
