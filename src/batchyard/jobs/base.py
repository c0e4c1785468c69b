"""A job is one kind of batch work (embeddings, or one inference task) over the same stages.

The stages are shared: snapshot → plan → (submit, track, collect, load per shard attempt) →
finalize, all per partition. A job supplies only what differs: which rows to select, how to
build request lines, how to parse one attempt's output lines, what a result row holds, and
where results are loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.schemas import CHUNKS, FAILURES
from batchyard.stages import plan as planning
from batchyard.stages.batches import write_shards

if TYPE_CHECKING:
    from collections.abc import Iterator

    from batchyard.context import RunContext
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.runs import PartitionStore
    from batchyard.targets import Targets


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
    "lane": pl.String(),
}


def with_columns_of(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Add the missing columns of `UNIT_ROWS` + `schema` as typed nulls."""
    full = {**UNIT_ROWS, **schema}
    missing = {k: v for k, v in full.items() if k not in frame.columns}
    return frame.with_columns(pl.lit(None, dtype).alias(k) for k, dtype in missing.items())


class Job(ABC):
    """Base of EmbeddingsJob and InferenceJob."""

    kind: str = ""

    def __init__(self, ctx: RunContext, targets: Targets) -> None:
        self.ctx = ctx
        self.targets = targets

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
    def source_pages(self, targets: Targets, extra: dict[str, Any] | None = None
                     ) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        """(chunks page, rejects page) pairs of the source rows to process for `targets`
        (`extra`: a filter that narrows the read, e.g. to a company's changes)."""

    @property
    def selection_version(self) -> str:
        """What the corpus' change cursors are valid for (an inference task's version)."""
        return ""

    def unit_ids(self, chunks: pl.DataFrame) -> pl.Series:
        """The unit id of each chunk row (chunk units: the chunk id)."""
        return chunks["chunk_id"].alias("unit_id")

    def bucket_key(self) -> pl.Expr:
        """What a split company's chunks are hashed on to pick their partition: the chunk id, so
        a partition holds whole units (document-unit jobs hash the document instead)."""
        return pl.col("chunk_id")

    def after_snapshot(self, part: PartitionStore) -> None:  # noqa: B027 - optional hook
        """Extra I/O once a partition's chunks are staged (embeddings look up reusable vectors)."""

    @abstractmethod
    def plan_partition(self, part: PartitionStore) -> dict[str, int]:
        """Plan one partition: units, requests.parquet, shard files, ledger records; counts."""

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

    def expand_units(self, part: PartitionStore, units: pl.DataFrame) -> pl.DataFrame:
        """Unit rows of one attempt, plus rows for units served by the same request."""
        return units

    @abstractmethod
    def result_rows(self, part: PartitionStore, ok: pl.DataFrame) -> pl.DataFrame:
        """Typed result rows from settled `ok` unit rows."""

    @abstractmethod
    def planned_units(self, part: PartitionStore) -> pl.DataFrame:
        """Every unit the partition's plan accounts for (column `unit_id`)."""

    @abstractmethod
    def load_part(self, part: PartitionStore, results: pl.DataFrame) -> list[dict[str, Any]]:
        """Load one results part into the sinks (idempotent upserts); returns load receipts."""

    def replan_requests(
        self, part: PartitionStore, requests: pl.DataFrame, max_tokens: int
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Re-cut one shard attempt's requests into shards of at most `max_tokens` tokens.

        For a shard over the provider's enqueued-token limit. Requests are kept whole (an
        inference request is one unit); one over `max_tokens` on its own can never be queued.
        Returns (the requests with `shard` set per new shard, in order; the unfittable units:
        `unit_id`, `tokens`).
        """
        fits = requests.filter(pl.col("tokens") <= max_tokens)
        unfit = requests.filter(pl.col("tokens") > max_tokens).select(unit_id="unit_ids", tokens="tokens")
        caps = planning.ShardLimits.from_settings(self.ctx.settings.limits)
        caps = planning.ShardLimits(caps.max_requests, caps.max_bytes, caps.max_inputs, max_tokens)
        return planning.assign_shards(fits, caps), unfit.explode("unit_id")

    # shared

    def chunks(self, part: PartitionStore) -> pl.DataFrame:
        """The partition's snapshot, without chunk ids that repeat in the source."""
        st = part.staging
        rels = [part.rel("chunks", n) for n in st.list(part.rel("chunks"), ".parquet")]
        frame = pl.concat([st.read_parquet(r) for r in rels]) if rels else CHUNKS.to_frame()
        dup_rel = part.run.rel("duplicates.parquet")
        if st.exists(dup_rel):
            dups = st.read_parquet(dup_rel).select("chunk_id").unique()
            frame = frame.join(dups, on="chunk_id", how="anti")
        return frame

    def write_plan(
        self, part: PartitionStore, requests: pl.DataFrame, rejects: pl.DataFrame, units: pl.DataFrame
    ) -> dict[str, int]:
        """Cut requests into shards (if the job did not); write plan rejects, requests, shards, ledger.

        Idempotent: planning again after a crash rewrites the same files. Returns plan counts
        (`units` is the planned input or unit frame, with a `truncated` flag).
        """
        limits = planning.ShardLimits.from_settings(self.ctx.settings.limits)
        if requests.height and requests["shard"].null_count():
            requests = planning.assign_shards(requests, limits)
        planning.check_shards(requests, limits)
        st = part.staging
        st.write_parquet(part.rel("failures", "plan.parquet"), rejects.cast(FAILURES))  # type: ignore[arg-type]
        st.write_parquet(part.rel("requests.parquet"), requests)
        records = write_shards(part, requests, job=self.name, endpoint=self.endpoint, model=self.model)
        return {
            "units": units.height,
            "truncated": int(units["truncated"].sum()) if units.height else 0,
            "rejected": rejects.height,
            "requests": requests.height,
            "shards": len(records),
            "tokens": int(requests["tokens"].sum()) if requests.height else 0,
        }

    def settled_units(self, part: PartitionStore, *, include_final: bool = False) -> pl.DataFrame:
        """Unit ids already in the partition's results or failures parts (one column, unit_id)."""
        st = part.staging
        ids = []
        for name in part.parts("results"):
            frame = st.read_parquet(part.rel("results", f"{name}.parquet"))
            if frame.height:
                ids.append(frame.select(pl.col(self.result_key).alias("unit_id")))
        for name in part.parts("failures"):
            if name == "final" and not include_final:
                continue
            ids.append(st.read_parquet(part.rel("failures", f"{name}.parquet")).select("unit_id"))
        return pl.concat(ids) if ids else pl.DataFrame(schema={"unit_id": pl.String})

    @property
    def result_key(self) -> str:
        """The unit id column of a result row."""
        return "unit_id"

    def finalize_partition(self, part: PartitionStore, *, cancelled: bool = False) -> dict[str, int]:
        """Write the partition's `final` failures part: planned units that nothing settled.

        Every planned unit ends in exactly one of results and failures. Rewritten whole each
        time, so a cancelled partition that is resumed later settles those units properly.
        """
        planned = self.planned_units(part)
        settled = self.settled_units(part)
        unresolved = planned.join(settled, on="unit_id", how="anti")
        why = "the run was cancelled before this unit finished" if cancelled else "no attempt settled this unit"
        rows = unresolved.select(
            "unit_id", stage=pl.lit("batch"), code=pl.lit("run_cancelled" if cancelled else "unresolved"),
            message=pl.format("unit {}: {}", "unit_id", pl.lit(why)), attempt=pl.lit(None, pl.Int64),
            batch_id=pl.lit(None, pl.String), raw=pl.lit(None, pl.String),
        ).cast(FAILURES)  # type: ignore[arg-type]
        rel = part.rel("failures", "final.parquet")
        if rows.height or part.staging.exists(rel):
            part.staging.write_parquet(rel, rows)
        return {"planned": planned.height, "unresolved": rows.height}
