"""Rebuild a job from the parameters recorded in run.json (for resume, cancel and reruns)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchyard.targets import Targets

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job


def job_from_params(ctx: RunContext, kind: str, params: dict[str, Any]) -> Job:
    """The job a run was created with, using the run's recorded model and limits."""
    from batchyard.settings import EmbeddingSettings, InferenceSettings, LimitsSettings

    targets = Targets.model_validate(params["targets"])
    s = ctx.settings
    s.limits = LimitsSettings.model_validate(params.get("limits", s.limits.model_dump()))
    if kind == "embeddings":
        from batchyard.jobs.embeddings import EmbeddingsJob

        s.embedding = EmbeddingSettings.model_validate(
            {**s.embedding.model_dump(), "model": params["model"], "dimensions": params["dimensions"]}
        )
        return EmbeddingsJob(ctx, targets)
    if kind == "inference":
        from batchyard.jobs.inference import InferenceJob

        s.inference = InferenceSettings.model_validate(
            {
                **s.inference.model_dump(),
                "model": params["model"],
                "endpoint": params["endpoint"],
                "temperature": params["temperature"],
                "max_output_tokens": params["max_output_tokens"],
                "document_token_budget": params["document_token_budget"],
            }
        )
        job = InferenceJob(ctx, targets, params["task"])
        if job.task_version != params["task_version"]:
            job.task_version = params["task_version"]  # the run keeps the version it planned with
        return job
    raise ValueError(f"unknown job kind {kind!r}")
