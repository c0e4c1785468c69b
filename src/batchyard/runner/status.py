"""Asset freshness across the latest run of each job scope (`batchyard assets`)."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.storage.runs import RunStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job

    Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- asset freshness


def current_job(ctx: RunContext, run: RunStore) -> Job:
    """The job a run would be with today's settings, code and prompts (for staleness)."""
    from batchyard.targets import Targets

    info = run.read_run()
    targets = Targets.model_validate(info["params"]["targets"])
    if info["kind"] == "embeddings":
        from batchyard.jobs.embeddings import EmbeddingsJob

        return EmbeddingsJob(ctx, targets)
    from batchyard.jobs.inference import InferenceJob

    return InferenceJob(ctx, targets, info["params"]["task"])


def pending_by_company(job: Job) -> dict[str, int]:
    """Units the source holds that `job` would select now, per company (reads the source)."""
    counts: dict[str, int] = defaultdict(int)
    for chunks, _ in job.source_pages(job.targets):
        if chunks.height == 0:
            continue
        unit = "chunk" if job.kind == "embeddings" else job.task.unit  # type: ignore[attr-defined]
        key = "chunk_id" if unit == "chunk" else "document_id"
        for company, n in chunks.group_by("company_id").agg(pl.col(key).n_unique()).iter_rows():
            counts[str(company)] += int(n)
    return dict(counts)


def asset_status(ctx: RunContext, *, job_name: str | None = None) -> list[dict[str, Any]]:
    """Every asset of the latest run of each job scope: data version, when, fresh or stale and why."""
    from batchyard.assets import job_scope, staleness
    from batchyard.storage.runs import list_runs

    latest: dict[str, tuple[RunStore, Job]] = {}
    for run in list_runs(ctx.staging):
        if job_name is not None and run.job != job_name:
            continue
        info = run.read_run()
        if info.get("state") == "dry_run" or "partitions" not in info:
            continue
        job = current_job(ctx, run)
        recorded = (f"embeddings/{info['params']['space']}" if info["kind"] == "embeddings"
                    else f"inference/{info['params']['task']}@{info['params']['task_version']}")
        latest[recorded] = (run, job)  # runs are listed oldest first
    out: list[dict[str, Any]] = []
    for scope, (run, job) in sorted(latest.items()):
        pending = pending_by_company(as_recorded(job, run))
        for status in staleness(ctx, job, run, pending):
            row = status.to_json()
            row["scope"] = scope
            if job_scope(job) != scope and not row["reasons"]:  # a cause staleness() does not name
                row["status"] = "stale"
                row["reasons"] = [f"now {job_scope(job)}"]
            out.append(row)
    return out


def as_recorded(job: Job, run: RunStore) -> Job:
    """`job` selecting by the run's own task version: what is new in the source since the run,
    apart from a version change (which `staleness` names on its own)."""
    recorded = run.read_run().get("params", {}).get("task_version")
    if recorded is None or getattr(job, "task_version", recorded) == recorded:
        return job
    then = copy.copy(job)
    then.task_version = recorded  # type: ignore[attr-defined]
    return then
