"""Batch embeddings: unembedded or changed chunks → vectors in Milvus, marks in MongoDB.

Each distinct text is embedded once. Per partition, every planned chunk (`inputs.parquet`) is
served one of three ways, recorded in `route` and in the result's `vector_source`:

- `request`: it is sent (the first chunk of each distinct text);
- `alias`: another chunk of the partition with the same sent text is sent; this one gets that
  vector (`dedup:<chunk id>`) or, if that request fails, the same failure;
- `reused`: the embedding space already has a vector for this text in Milvus, from an earlier
  run (`reused:<run id>/<chunk id>`); nothing is sent and the result is ready at plan time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.crash import crashpoint
from batchyard.jobs.base import Job
from batchyard.pricing import estimate
from batchyard.stages import plan as planning
from batchyard.stages.join import dedupe, embedding_outcomes, read_embedding_lines
from batchyard.tokens import encoding_for_model

if TYPE_CHECKING:
    from collections.abc import Iterator

    from batchyard.context import RunContext
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.runs import PartitionStore
    from batchyard.targets import Targets

NATIVE_DIMS = {"text-embedding-3-large": 3072, "text-embedding-3-small": 1536, "text-embedding-ada-002": 1536}

INPUTS = pl.Schema(
    {
        "chunk_id": pl.String,
        "source_id": pl.String,
        "id_kind": pl.String,
        "company_id": pl.String,
        "document_id": pl.String,
        "chunk_index": pl.Int64,
        "text_sha256": pl.String,  # of the source text (what the marks keep)
        "sent_sha256": pl.String,  # of the text sent (differs when truncated)
        "tokens": pl.Int64,
        "truncated": pl.Boolean,
        "route": pl.String,  # request | alias | reused
        "rep": pl.String,  # alias: the chunk whose request serves it; reused: donor run/chunk
    }
)


class EmbeddingsJob(Job):
    """Embed the target chunks for one embedding space (model + dimensions)."""

    kind = "embeddings"

    def __init__(self, ctx: RunContext, targets: Targets) -> None:
        super().__init__(ctx, targets)
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

    @property
    def result_key(self) -> str:
        return "chunk_id"

    def params(self) -> dict[str, Any]:
        return {
            "model": self.emb.model,
            "dimensions": self.dims,
            "space": self.emb.space,
            "targets": self.targets.model_dump(mode="json"),
            "limits": self.ctx.settings.limits.model_dump(mode="json"),
        }

    # snapshot

    def source_pages(self, targets: Targets, extra: dict[str, Any] | None = None
                     ) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        from batchyard.stages.snapshot import iter_unprocessed_chunks

        mongo = self.ctx.settings.mongo
        return iter_unprocessed_chunks(
            self.ctx.store.chunks, targets, mongo.fields, space=self.emb.space, page_size=self.ctx.page_size,
            extra=extra,
        )

    def after_snapshot(self, part: PartitionStore) -> None:
        """Look up vectors this space already holds for the partition's texts (`reuse.parquet`)."""
        from batchyard.clients.milvus import vectors_by_text

        st = part.staging
        rels = [part.rel("chunks", n) for n in st.list(part.rel("chunks"), ".parquet")]
        if not rels:
            return
        shas = pl.concat([st.read_parquet(r).select("text_sha256") for r in rels]).unique()
        found = vectors_by_text(self.ctx.milvus, self.collection, shas["text_sha256"].sort().to_list())
        st.write_parquet(part.rel("reuse.parquet"), found)

    # plan

    def plan_partition(self, part: PartitionStore) -> dict[str, int]:
        limits = self.ctx.settings.limits
        st = part.staging
        encoding = self.emb.encoding or encoding_for_model(self.emb.model)
        inputs, rejects = planning.prepare_inputs(self.chunks(part), limits=limits, encoding=encoding)
        reuse_rel = part.rel("reuse.parquet")
        reuse = st.read_parquet(reuse_rel) if st.exists(reuse_rel) else pl.DataFrame(schema={"text_sha256": pl.String})
        reusable = ~pl.col("truncated") & pl.col("sent_sha256").is_in(reuse["text_sha256"].implode())
        reused, rest = inputs.filter(reusable), inputs.filter(~reusable)
        reps, aliases = planning.split_duplicates(rest)
        dims = self.emb.dimensions if self.emb.pass_dimensions else None
        requests = planning.embedding_requests(reps, model=self.emb.model, dimensions=dims, limits=limits)
        if reused.height:
            reused = reused.join(reuse.rename({"text_sha256": "sent_sha256"}), on="sent_sha256", how="left")
            reused = reused.with_columns(rep=pl.format("{}/{}", "donor_run_id", "donor_chunk_id"))
        table = pl.concat(
            [
                reps.with_columns(route=pl.lit("request"), rep=pl.lit(None, pl.String)).select(INPUTS.names()),
                aliases.with_columns(route=pl.lit("alias"), rep=pl.col("rep_chunk_id")).select(INPUTS.names()),
                reused.with_columns(route=pl.lit("reused")).select(INPUTS.names()) if reused.height
                else INPUTS.to_frame(),
            ]
        ).cast(INPUTS)  # type: ignore[arg-type]
        st.write_parquet(part.rel("inputs.parquet"), table)
        if reused.height:
            ready = reused.select(
                unit_id="chunk_id", vector="vector", batch_id=pl.lit(None, pl.String), shard=pl.lit(None, pl.String),
                attempt=pl.lit(0, pl.Int64), custom_id=pl.lit(None, pl.String), lane=pl.lit("reused"),
            )
            st.write_parquet(part.rel("results", "reused.parquet"), self.result_rows(part, ready))
        stats = self.write_plan(part, requests, rejects, table)
        saved = int(aliases["tokens"].sum() or 0) + int(reused["tokens"].sum() or 0) if table.height else 0
        stats.update(
            inputs_deduplicated=aliases.height,
            inputs_reused=reused.height,
            tokens_saved=saved,
            cost_saved_usd=estimate(self.ctx.settings.pricing, self.model, input_tokens=saved)["batch_usd"],
        )
        return stats

    # collect

    def parse_attempt(
        self, requests: pl.DataFrame, output: bytes, errors: bytes, batch: ShardRecord
    ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        out_lines, a1 = read_embedding_lines(output, f"outputs/{batch.name}.jsonl")
        err_lines, a2 = read_embedding_lines(errors, f"errors/{batch.name}.jsonl")
        lines, a3 = dedupe(pl.concat([out_lines, err_lines]), requests["custom_id"], f"shard {batch.key}")
        vectors, outcomes = embedding_outcomes(requests, lines, dims=self.dims, batch_ended_as=batch.batch_status or "")
        return vectors, outcomes, pl.concat([a1, a2, a3])

    def payload_keys(self) -> list[str]:
        return ["custom_id", "unit_id"]

    def payload_schema(self) -> dict[str, pl.DataType]:
        return {"vector": pl.Array(pl.Float32, self.dims)}

    def _inputs(self, part: PartitionStore) -> pl.DataFrame:
        return part.staging.read_parquet(part.rel("inputs.parquet"))

    def expand_units(self, part: PartitionStore, units: pl.DataFrame) -> pl.DataFrame:
        """Settled unit rows plus one row per alias of each representative, with its outcome."""
        aliases = self._inputs(part).filter(pl.col("route") == "alias").select("chunk_id", "rep")
        if aliases.height == 0:
            return units
        settled = units.filter(pl.col("final") != "pending")
        extra = settled.join(aliases, left_on="unit_id", right_on="rep", how="inner")
        extra = extra.with_columns(
            unit_id=pl.col("chunk_id"),
            message=pl.format("same text as chunk {}: {}", pl.col("unit_id"), pl.col("message")),
        ).drop("chunk_id")
        return pl.concat([units, extra.select(units.columns)], how="vertical_relaxed")

    def result_rows(self, part: PartitionStore, ok: pl.DataFrame) -> pl.DataFrame:
        meta = self._inputs(part).drop("tokens")
        rows = (
            ok.select("unit_id", "vector", "batch_id", "shard", "attempt", "custom_id", "lane")
            .rename({"unit_id": "chunk_id"})
            .join(meta, on="chunk_id", how="left")
        )
        return rows.with_columns(
            vector_source=pl.when(pl.col("route") == "alias").then(pl.format("dedup:{}", "rep"))
            .when(pl.col("route") == "reused").then(pl.format("reused:{}", "rep"))
            .otherwise(pl.lit("batch")),
            model=pl.lit(self.emb.model),
            dimensions=pl.lit(self.dims, pl.Int64),
            run_id=pl.lit(part.run_id),
            partition=pl.lit(part.pid),
        ).drop("route", "rep")

    def replan_requests(
        self, part: PartitionStore, requests: pl.DataFrame, max_tokens: int
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Re-pack the attempt's inputs into requests and shards of at most `max_tokens` tokens.

        Inputs are independent, so a request over the limit is cut too (new requests get their
        custom_ids as at plan time); only an input over `max_tokens` on its own is unfittable.
        Each new request keeps the highest retry and requeue counts of the requests its inputs
        came from.
        """
        sent = [(cid, text) for line, ids in requests.select("line", "unit_ids").iter_rows()
                for cid, text in zip(ids, json.loads(line)["body"]["input"], strict=True)]
        texts = pl.DataFrame(sent, schema={"chunk_id": pl.String, "text": pl.String}, orient="row")
        inputs = self._inputs(part).join(texts, on="chunk_id", how="inner")
        fit, unfit = inputs.filter(pl.col("tokens") <= max_tokens), inputs.filter(pl.col("tokens") > max_tokens)
        caps = planning.ShardLimits.from_settings(self.ctx.settings.limits)
        caps = planning.ShardLimits(caps.max_requests, caps.max_bytes, caps.max_inputs, max_tokens)
        dims = self.emb.dimensions if self.emb.pass_dimensions else None
        new = planning.embedding_requests(fit, model=self.emb.model, dimensions=dims, limits=self.ctx.settings.limits,
                                          shard_limits=caps)
        before = requests.select("unit_ids", "spent", "requeues").explode("unit_ids")
        carried = (new.select("custom_id", "unit_ids").explode("unit_ids").join(before, on="unit_ids")
                   .group_by("custom_id").agg(pl.col("spent").max(), pl.col("requeues").max()))
        new = new.drop("spent", "requeues").join(carried, on="custom_id", how="left", maintain_order="left")
        return new.select(planning.REQUESTS.names()), unfit.select(unit_id="chunk_id", tokens="tokens")

    def planned_units(self, part: PartitionStore) -> pl.DataFrame:
        rel = part.rel("inputs.parquet")
        if not part.staging.exists(rel):
            return pl.DataFrame(schema={"unit_id": pl.String})
        return part.staging.read_parquet(rel).select(unit_id="chunk_id")

    # load

    def load_part(self, part: PartitionStore, results: pl.DataFrame) -> list[dict[str, Any]]:
        from batchyard.clients.milvus import BulkImportConfig, ensure_collection
        from batchyard.stages.load import load_vectors, mark_chunks

        s = self.ctx.settings
        client = self.ctx.milvus
        ensure_collection(client, self.collection, dim=self.dims, index_type=s.milvus.index_type,
                          metric_type=s.milvus.metric_type)
        # Milvus keeps the sha256 of the text the vector was made from; the marks keep the
        # source text's, so that an unchanged (truncated) chunk is not selected again
        vectors = results.drop("text_sha256").rename({"sent_sha256": "text_sha256"})
        r1 = load_vectors(client, self.collection, vectors, run_id=part.run_id,
                          batch_rows=s.milvus.upsert_batch_rows, max_request_bytes=s.milvus.max_request_bytes,
                          bulk=BulkImportConfig.from_settings(s.milvus))
        crashpoint("during_load")
        r2 = mark_chunks(self.ctx.store.chunks, results, fields=s.mongo.fields, space=self.emb.space,
                         run_id=part.run_id, batch_size=s.mongo.write_batch_size)
        return [r1.model_dump(mode="json"), r2.model_dump(mode="json")]
