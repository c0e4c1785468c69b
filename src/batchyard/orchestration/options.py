"""Typed run options: the per-run knobs a deployment user sets, as flow parameters.

A deployment's parameters are what an operator edits in the Prefect UI or passes with
`prefect deployment run --param options='{...}'`. A pydantic model gives them a schema (Prefect
renders and validates it) instead of an untyped `overrides: dict`. Each option maps to one
setting of `batchyard.settings` (see `to_overrides`); anything not listed here is still set
through the profile or the environment of the worker.

`SettingsOptions` is what every flow takes (the tracker and `resume` too); `RunOptions` adds
what starts a run: the targets file, a run id and whether to wait for the batches.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SettingsOptions(BaseModel):
    """Settings a flow run may override (unset: the profile, the environment, the defaults)."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(
        default=None,
        description="Profile to load (dev, test, prod or your own). Unset: $BATCHYARD_PROFILE, else "
        "the Prefect Variable `batchyard_profile`, else the embedded defaults.",
    )
    staging_root: str | None = Field(
        default=None, description="Staging root (local path or s3://bucket/prefix)."
    )
    poll_interval_s: float | None = Field(
        default=None, gt=0, le=3600, description="Seconds between status polls of live batches."
    )
    max_inputs_per_batch: int | None = Field(
        default=None, gt=0, le=50_000, description="Embedding inputs per batch (shard size)."
    )
    max_requests_per_batch: int | None = Field(
        default=None, gt=0, le=50_000, description="Requests per batch file."
    )

    def to_overrides(self) -> dict[str, Any]:
        """The nested settings overrides these options stand for (unset options left out)."""
        out: dict[str, Any] = {}
        if self.staging_root is not None:
            out["staging"] = {"root": self.staging_root}
        if self.poll_interval_s is not None:
            out["provider"] = {"poll_interval_s": self.poll_interval_s}
        limits: dict[str, Any] = {}
        if self.max_inputs_per_batch is not None:
            limits["max_inputs_per_batch"] = self.max_inputs_per_batch
            # as the CLI does: a request never holds more inputs than its batch
            limits["max_inputs_per_request"] = min(2048, self.max_inputs_per_batch)
        if self.max_requests_per_batch is not None:
            limits["max_requests_per_batch"] = self.max_requests_per_batch
        if limits:
            out["limits"] = limits
        return out


class RunOptions(SettingsOptions):
    """What starts (or continues) an embeddings or inference run."""

    targets: str = Field(
        default="targets.yaml",
        description="Targets file (YAML or CSV), relative to the flow run's working directory.",
    )
    run_id: str | None = Field(default=None, description="Continue or name this run.")
    wait: bool = Field(
        default=True,
        description="Wait for the batches (default), or submit and return: the scheduled tracker "
        "finishes the run.",
    )


def merge_overrides(base: dict[str, Any] | None, top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top` merged over it, nested groups merged key by key."""
    out: dict[str, Any] = dict(base or {})
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out
