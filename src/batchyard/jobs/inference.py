"""Batch inference: one task (prompt, request builder, output schema) over target chunks or documents."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.crash import crashpoint
from batchyard.jobs.base import Job, with_columns_of
from batchyard.prompt_tokens import prompt_token_counts
from batchyard.stages import plan as planning
from batchyard.stages.join import INFERENCE_ROWS, inference_outcomes, read_json_lines
from batchyard.tasks.prompts import resolve_prompts_dir
from batchyard.tasks.registry import get_task
from batchyard.tasks.units import build_units
from batchyard.tokens import encoding_for_model

if TYPE_CHECKING:
    from collections.abc import Iterator

    from batchyard.context import RunContext
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.runs import PartitionStore
    from batchyard.targets import Targets


class InferenceJob(Job):
    """Run one inference task over the target units that have no result for its version."""

    kind = "inference"

    def __init__(self, ctx: RunContext, targets: Targets, task_name: str) -> None:
        super().__init__(ctx, targets)
        self.task = get_task(task_name)
        self.inf = ctx.settings.inference
        self.prompts_dir = resolve_prompts_dir(ctx.settings.prompts_dir)
        self.task_version = self.task.task_version(self.prompts_dir, self.task.model_params(self.inf))

    @property
    def name(self) -> str:
        return f"inference-{self.task.name}"

    @property
    def endpoint(self) -> str:
        return self.inf.endpoint or self.task.endpoint

    @property
    def model(self) -> str:
        return self.inf.model

    @property
    def results_collection(self) -> str:
        """MongoDB collection of this task's results."""
        return self.task.collection or self.ctx.settings.mongo.results_collection

    def params(self) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "task_version": self.task_version,
            "unit": self.task.unit,
            "endpoint": self.endpoint,
            "model": self.model,
            "temperature": self.inf.temperature,
            "max_output_tokens": self.inf.max_output_tokens,
            "document_token_budget": self.inf.document_token_budget,
            "prompt": self.task.prompt,
            "targets": self.targets.model_dump(mode="json"),
            "limits": self.ctx.settings.limits.model_dump(mode="json"),
        }

    def source_pages(self, targets: Targets, extra: dict[str, Any] | None = None
                     ) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        from batchyard.stages.snapshot import iter_chunks_for_task

        mongo = self.ctx.settings.mongo
        store = self.ctx.store
        return iter_chunks_for_task(
            store.chunks, store.collection(self.results_collection), targets, mongo.fields,
            task=self.task.name, task_version=self.task_version, unit=self.task.unit, page_size=self.ctx.page_size,
            extra=extra,
        )

    @property
    def selection_version(self) -> str:
        return self.task_version

    def unit_ids(self, chunks: pl.DataFrame) -> pl.Series:
        if self.task.unit != "document":
            return super().unit_ids(chunks)
        from batchyard.tasks.units import document_unit_id

        return pl.Series("unit_id", [document_unit_id(c, d) for c, d in
                                     zip(chunks["company_id"].to_list(), chunks["document_id"].to_list(), strict=True)],
                         dtype=pl.String)

    def bucket_key(self) -> pl.Expr:
        if self.task.unit == "document":  # every chunk of a document in the same partition
            return pl.format("{}/{}", "company_id", "document_id")
        return super().bucket_key()

    def plan_partition(self, part: PartitionStore) -> dict[str, int]:
        encoding = encoding_for_model(self.model)
        budget = self.inf.document_token_budget
        units, rejects = build_units(self.chunks(part), self.task.unit, token_budget=budget, encoding=encoding)
        part.staging.write_parquet(part.rel("units.parquet"), units)
        bodies = self.task.request_bodies(
            units, model=self.model, endpoint=self.endpoint, temperature=self.inf.temperature,
            max_output_tokens=self.inf.max_output_tokens, prompts_dir=self.prompts_dir,
        )
        # what the provider bills for each prompt (messages, their overhead, the schema), not the JSON
        bodies = bodies.with_columns(tokens=prompt_token_counts(bodies["body"], self.endpoint, encoding))
        requests = planning.inference_requests(bodies, endpoint=self.endpoint)
        return self.write_plan(part, requests, rejects, units)

    def parse_attempt(
        self, requests: pl.DataFrame, output: bytes, errors: bytes, batch: ShardRecord
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        from batchyard.stages.join import ANOMALIES

        out, a1 = read_json_lines(output, f"outputs/{batch.name}.jsonl")
        err, a2 = read_json_lines(errors, f"errors/{batch.name}.jsonl")
        planned = set(requests["custom_id"].to_list())
        seen: set[str] = set()
        lines, extra = [], []
        for no, line in enumerate(out + err, start=1):
            cid = line["custom_id"]
            if cid not in planned:
                extra.append({"source": f"shard {batch.name}", "line": no, "custom_id": cid, "code": "unknown_custom_id",
                              "message": f"shard {batch.name}: custom_id {cid} matches no planned request"})
            elif cid in seen:
                extra.append({"source": f"shard {batch.name}", "line": no, "custom_id": cid, "code": "duplicate_output",
                              "message": f"shard {batch.name}: second line for custom_id {cid}"})
            else:
                seen.add(cid)
                lines.append(line)
        parsed, outcomes = inference_outcomes(
            self.task, self.endpoint, requests, lines, batch_ended_as=batch.batch_status or ""
        )
        a3 = pl.DataFrame(extra, schema=ANOMALIES) if extra else ANOMALIES.to_frame()
        return parsed, outcomes, pl.concat([a1, a2, a3])

    def payload_keys(self) -> list[str]:
        return ["custom_id"]

    def payload_schema(self) -> dict[str, pl.DataType]:
        return {k: v for k, v in INFERENCE_ROWS.items() if k != "custom_id"}

    def result_rows(self, part: PartitionStore, ok: pl.DataFrame) -> pl.DataFrame:
        units = part.staging.read_parquet(part.rel("units.parquet")).drop("text")
        cols = [c for c in INFERENCE_ROWS.names() if c != "custom_id"]
        ok = with_columns_of(ok, self.payload_schema())
        return (
            ok.select("unit_id", "custom_id", "batch_id", "shard", "attempt", "lane", *cols)
            .join(units, on="unit_id", how="left")
            .with_columns(
                task=pl.lit(self.task.name),
                task_version=pl.lit(self.task_version),
                model=pl.lit(self.model),
                run_id=pl.lit(part.run_id),
                partition=pl.lit(part.pid),
            )
        )

    def planned_units(self, part: PartitionStore) -> pl.DataFrame:
        rel = part.rel("units.parquet")
        if not part.staging.exists(rel):
            return pl.DataFrame(schema={"unit_id": pl.String})
        return part.staging.read_parquet(rel).select("unit_id")

    def load_part(self, part: PartitionStore, results: pl.DataFrame) -> list[dict[str, Any]]:
        from batchyard.stages.load import store_results

        s = self.ctx.settings
        # the task decides what of its parsed output is stored (default: all of it)
        results = results.with_columns(
            parsed=pl.col("parsed").map_elements(
                lambda p: json.dumps(self.task.record(json.loads(p))), return_dtype=pl.String
            )
        )
        crashpoint("during_load")
        receipt = store_results(
            self.ctx.store.collection(self.results_collection), results, task=self.task.name,
            task_version=self.task_version, run_id=part.run_id, batch_size=s.mongo.write_batch_size,
        )
        return [receipt.model_dump(mode="json")]
