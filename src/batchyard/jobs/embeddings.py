"""Batch embeddings: unembedded or changed chunks → vectors in Milvus, marks in MongoDB."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.crash import crashpoint
from batchyard.jobs.base import Job
from batchyard.stages import plan as planning
from batchyard.stages.join import dedupe, embedding_outcomes, read_embedding_lines
from batchyard.tokens import encoding_for_model

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.runs import RunStore
    from batchyard.targets import Targets

NATIVE_DIMS = {"text-embedding-3-large": 3072, "text-embedding-3-small": 1536, "text-embedding-ada-002": 1536}


class EmbeddingsJob(Job):
    """Embed the target chunks for one embedding space (model + dimensions)."""

    kind = "embeddings"

    def __init__(self, ctx: RunContext, targets: Targets) -> None:
        super().__init__(ctx)
        self.targets = targets
        self.emb = ctx.settings.embedding

    @property
    def name(self) -> str:
        return "embeddings"

    @property
    def endpoint(self) -> str:
        return "/v1/embeddings"

    @property
    def model(self) -> str:
        return self.emb.model

    @property
    def dims(self) -> int:
        """Vector length of the space."""
        return self.emb.dimensions or NATIVE_DIMS.get(self.emb.model, 1536)

    @property
    def collection(self) -> str:
        """The Milvus collection of this space."""
        from batchyard.clients.milvus import collection_name

        return collection_name(self.ctx.settings.milvus.collection_prefix, self.emb.space)

    def params(self) -> dict[str, Any]:
        return {
            "model": self.emb.model,
            "dimensions": self.dims,
            "space": self.emb.space,
            "targets": self.targets.model_dump(mode="json"),
            "limits": self.ctx.settings.limits.model_dump(mode="json"),
        }

    def snapshot(self, run: RunStore) -> dict[str, int]:
        from batchyard.stages.snapshot import iter_unprocessed_chunks

        mongo = self.ctx.settings.mongo
        return self.write_snapshot(run, iter_unprocessed_chunks(
            self.ctx.store.chunks, self.targets, mongo.fields, space=self.emb.space, page_size=self.ctx.page_size
        ))

    def plan(self, run: RunStore) -> dict[str, int]:
        limits = self.ctx.settings.limits
        chunks = run.staging.read_parquet(run.rel("chunks.parquet"))
        encoding = self.emb.encoding or encoding_for_model(self.emb.model)
        inputs, rejects = planning.prepare_inputs(chunks, limits=limits, encoding=encoding)
        dims = self.emb.dimensions if self.emb.pass_dimensions else None
        requests = planning.embedding_requests(inputs, model=self.emb.model, dimensions=dims, limits=limits)
        return self.write_plan(run, requests, rejects, inputs)

    def parse_attempt(
        self, requests: pl.DataFrame, output: bytes, errors: bytes, batch: ShardRecord
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        out_lines, a1 = read_embedding_lines(output, f"outputs/{batch.name}.jsonl")
        err_lines, a2 = read_embedding_lines(errors, f"errors/{batch.name}.jsonl")
        lines, a3 = dedupe(pl.concat([out_lines, err_lines]), requests["custom_id"], f"shard {batch.name}")
        vectors, outcomes = embedding_outcomes(requests, lines, dims=self.dims, batch_ended_as=batch.batch_status or "")
        return vectors, outcomes, pl.concat([a1, a2, a3])

    def payload_keys(self) -> list[str]:
        return ["custom_id", "unit_id"]

    def payload_schema(self) -> dict[str, pl.DataType]:
        return {"vector": pl.Array(pl.Float32, self.dims)}

    def result_rows(self, run: RunStore, ok: pl.DataFrame) -> pl.DataFrame:
        chunks = run.staging.read_parquet(run.rel("chunks.parquet")).drop("text")
        return (
            ok.select("unit_id", "vector", "batch_id", "shard", "attempt", "custom_id")
            .rename({"unit_id": "chunk_id"})
            .join(chunks, on="chunk_id", how="left")
            .with_columns(
                model=pl.lit(self.emb.model),
                dimensions=pl.lit(self.dims, pl.Int64),
                run_id=pl.lit(run.run_id),
            )
        )

    def load(self, run: RunStore) -> list[dict[str, Any]]:
        from batchyard.clients.milvus import BulkImportConfig, ensure_collection
        from batchyard.stages.load import load_vectors, mark_chunks

        s = self.ctx.settings
        results = run.staging.read_parquet(run.rel("results.parquet"))
        client = self.ctx.milvus
        ensure_collection(client, self.collection, dim=self.dims, index_type=s.milvus.index_type,
                          metric_type=s.milvus.metric_type)
        receipts = []
        r1 = load_vectors(client, self.collection, results, run_id=run.run_id,
                          batch_rows=s.milvus.upsert_batch_rows, max_request_bytes=s.milvus.max_request_bytes,
                          bulk=BulkImportConfig.from_settings(s.milvus))
        receipts.append(r1.model_dump(mode="json"))
        run.staging.write_json(run.rel("loads", "milvus.json"), receipts[-1])
        crashpoint("during_load")
        r2 = mark_chunks(self.ctx.store.chunks, results, fields=s.mongo.fields, space=self.emb.space,
                         run_id=run.run_id, batch_size=s.mongo.write_batch_size)
        self.ctx.store.save()
        receipts.append(r2.model_dump(mode="json"))
        run.staging.write_json(run.rel("loads", "mongo.json"), receipts[-1])
        return receipts
