"""A job is one kind of batch work (embeddings, or one inference task) over the same stages.

The stages are shared: snapshot → plan → (submit, track, collect per shard) → finalize → load.
A job supplies only what differs: which rows to select, how to build request lines, how to
parse one attempt's output lines, what a result row holds, and where results are loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.crash import crashpoint
from batchyard.schemas import CHUNKS, FAILURES, empty_failures
from batchyard.stages import plan as planning
from batchyard.stages.batches import write_shards
from batchyard.stages.join import ANOMALIES

if TYPE_CHECKING:
    from collections.abc import Iterable

    from batchyard.context import RunContext
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.runs import RunStore


UNIT_ROWS: dict[str, pl.DataType] = {
    "custom_id": pl.String(),
    "unit_id": pl.String(),
    "outcome": pl.String(),
    "code": pl.String(),
    "message": pl.String(),
    "status_code": pl.Int64(),
    "final": pl.String(),
    "attempt": pl.Int64(),
    "shard": pl.String(),
    "batch_id": pl.String(),
}


def with_columns_of(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Add the missing columns of `UNIT_ROWS` + `schema` as typed nulls."""
    full = {**UNIT_ROWS, **schema}
    missing = {k: v for k, v in full.items() if k not in frame.columns}
    return frame.with_columns(pl.lit(None, dtype).alias(k) for k, dtype in missing.items())


class Job(ABC):
    """Base of EmbeddingsJob and InferenceJob."""

    kind: str = ""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    @property
    @abstractmethod
    def name(self) -> str:
        """The staging folder of this job's runs (e.g. `embeddings`, `inference-summary`)."""

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """The Batch API endpoint."""

    @property
    @abstractmethod
    def model(self) -> str:
        """The model every request of this job uses."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Run parameters recorded in run.json (no secrets)."""

    @abstractmethod
    def snapshot(self, run: RunStore) -> dict[str, int]:
        """Select source rows into chunks.parquet (+ rejects); returns counts."""

    @abstractmethod
    def plan(self, run: RunStore) -> dict[str, int]:
        """Build requests.parquet, shard files and ledger records; returns counts."""

    @abstractmethod
    def parse_attempt(
        self, requests: pl.DataFrame, output: bytes, errors: bytes, batch: ShardRecord
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """(payload rows, outcomes per request, anomalies) of one shard attempt."""

    @abstractmethod
    def payload_keys(self) -> list[str]:
        """Join keys of payload rows."""

    @abstractmethod
    def payload_schema(self) -> dict[str, pl.DataType]:
        """Columns of settled unit rows (so that a run with no output still has typed tables)."""

    @abstractmethod
    def result_rows(self, run: RunStore, ok: pl.DataFrame) -> pl.DataFrame:
        """Typed result rows from settled `ok` unit rows."""

    @abstractmethod
    def load(self, run: RunStore) -> list[dict[str, Any]]:
        """Load results.parquet into the sinks; returns load receipts."""

    # shared

    def write_snapshot(self, run: RunStore, pages: Iterable[tuple[pl.DataFrame, pl.DataFrame]]) -> dict[str, int]:
        """Stream (chunks page, rejects page) pairs into chunks.parquet and rejects.parquet."""
        rejects = []
        with run.staging.parquet_writer(run.rel("chunks.parquet"), CHUNKS) as out:
            for page, bad in pages:
                out.write(page)
                if bad.height:
                    rejects.append(bad)
        rej = pl.concat(rejects).cast(FAILURES) if rejects else empty_failures()  # type: ignore[arg-type]
        run.staging.write_parquet(run.rel("rejects.parquet"), rej)
        crashpoint("after_snapshot")
        return {"chunks": out.rows, "rejected": rej.height}

    def write_plan(
        self, run: RunStore, requests: pl.DataFrame, rejects: pl.DataFrame, units: pl.DataFrame
    ) -> dict[str, int]:
        """Cut requests into shards under the limits; write rejects, requests.parquet, shards, ledger.

        Idempotent: planning again after a crash rewrites the same files. Returns plan counts
        (`units` is the planned input or unit frame, with a `truncated` flag).
        """
        limits = planning.ShardLimits.from_settings(self.ctx.settings.limits)
        requests = planning.assign_shards(requests, limits)
        planning.check_shards(requests, limits)
        st = run.staging
        snapshot_rejects = st.read_parquet(run.rel("rejects.parquet")).filter(pl.col("stage") == "snapshot")
        st.write_parquet(run.rel("rejects.parquet"), pl.concat([snapshot_rejects, rejects.cast(FAILURES)]))  # type: ignore[arg-type]
        st.write_parquet(run.rel("requests.parquet"), requests)
        records = write_shards(run, requests, job=self.name, endpoint=self.endpoint, model=self.model)
        return {
            "units": units.height,
            "truncated": int(units["truncated"].sum()) if units.height else 0,
            "rejected": rejects.height,
            "requests": requests.height,
            "shards": len(records),
            "tokens": int(requests["tokens"].sum()) if requests.height else 0,
        }

    def planned_units(self, run: RunStore) -> pl.DataFrame:
        """Every unit the plan sent (from requests.parquet)."""
        req = run.staging.read_parquet(run.rel("requests.parquet"))
        return req.select(pl.col("unit_ids").explode().alias("unit_id")).unique(maintain_order=True)

    def finalize(self, run: RunStore, *, cancelled: bool = False) -> dict[str, int]:
        """Write results.parquet, failures.parquet and anomalies.parquet from the settled attempts.

        Every planned unit ends in exactly one of results and failures.
        """
        st = run.staging
        parsed_files = [run.rel("parsed", n) for n in st.list(run.rel("parsed"), ".parquet")]
        parsed = (
            pl.concat([st.read_parquet(p) for p in parsed_files], how="diagonal_relaxed")
            if parsed_files
            else pl.DataFrame(schema={"unit_id": pl.String, "final": pl.String, "attempt": pl.Int64})
        )
        parsed = with_columns_of(parsed, self.payload_schema())
        ok = parsed.filter(pl.col("final") == "ok").sort("attempt").unique("unit_id", keep="first", maintain_order=True)
        results = self.result_rows(run, ok)
        failed = (
            parsed.filter((pl.col("final") == "fail") & ~pl.col("unit_id").is_in(ok["unit_id"].implode()))
            .sort("attempt")
            .unique("unit_id", keep="last", maintain_order=True)
        )
        fail_rows = failed.select(
            "unit_id",
            stage=pl.lit("batch"),
            code=pl.col("code").fill_null("failed"),
            message=pl.col("message").fill_null("failed"),
            attempt="attempt",
            batch_id="batch_id",
            raw=pl.col("raw_text") if "raw_text" in failed.columns else pl.lit(None, pl.String),
        ).cast(FAILURES)  # type: ignore[arg-type]
        rejects = st.read_parquet(run.rel("rejects.parquet")) if st.exists(run.rel("rejects.parquet")) else empty_failures()
        planned = self.planned_units(run)
        settled = pl.concat([ok.select("unit_id"), fail_rows.select("unit_id")])
        unresolved = planned.filter(~pl.col("unit_id").is_in(settled["unit_id"].implode()))
        why = "the run was cancelled before this unit finished" if cancelled else "no attempt settled this unit"
        unresolved_rows = unresolved.select(
            "unit_id", stage=pl.lit("batch"), code=pl.lit("run_cancelled" if cancelled else "unresolved"),
            message=pl.format("unit {}: {}", "unit_id", pl.lit(why)), attempt=pl.lit(None, pl.Int64),
            batch_id=pl.lit(None, pl.String), raw=pl.lit(None, pl.String),
        ).cast(FAILURES)  # type: ignore[arg-type]
        failures = pl.concat([rejects.cast(FAILURES), fail_rows, unresolved_rows])  # type: ignore[arg-type]
        anomaly_files = [run.rel("anomalies", n) for n in st.list(run.rel("anomalies"), ".parquet")]
        anomalies = pl.concat([st.read_parquet(p) for p in anomaly_files]) if anomaly_files else ANOMALIES.to_frame()
        st.write_parquet(run.rel("results.parquet"), results)
        st.write_parquet(run.rel("failures.parquet"), failures)
        st.write_parquet(run.rel("anomalies.parquet"), anomalies)
        return {
            "results": results.height,
            "failures": failures.height,
            "rejected": rejects.height,
            "anomalies": anomalies.height,
            "unresolved": unresolved_rows.height,
        }
