"""Milvus Lite and a Milvus server: the collection schema, idempotent upserts, dimension checks,
byte batching. Tests taking the `milvus` fixture run once against each (`[lite]`, `[server]`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest
from pymilvus import DataType

from batchyard.clients import milvus as mv
from batchyard.stages.load import load_vectors
from tests.sinks.vectors import vector_frame

DIM = 16


def _frame(n: int, *, dim: int = DIM, seed: int = 0, as_list: bool = False) -> pl.DataFrame:
    return vector_frame(n, dim=dim, seed=seed, as_list=as_list)


def test_collection_name_is_valid() -> None:
    assert mv.collection_name("chunks", "text-embedding-3-small_256") == "chunks_text_embedding_3_small_256"
    assert mv.collection_name("", "3large") == "_3large"
    assert mv.collection_name("é", "x") == "__x"
    long = mv.collection_name("p", "s" * 400)
    assert len(long) == 255 and long.replace("_", "").isalnum()
    assert long != mv.collection_name("p", "s" * 401)


def test_collection_has_the_schema_and_upserts_never_duplicate(milvus: Any) -> None:
    name = mv.collection_name("chunks", "test_16")
    assert mv.ensure_collection(milvus, name, dim=DIM, index_type="FLAT", metric_type="COSINE")
    assert not mv.ensure_collection(milvus, name, dim=DIM, index_type="FLAT", metric_type="COSINE")
    fields = {f["name"]: f for f in milvus.describe_collection(name)["fields"]}
    assert set(fields) == set(mv.FIELDS)
    assert fields["chunk_id"]["is_primary"] and fields["chunk_id"]["type"] == DataType.VARCHAR
    assert fields["chunk_id"]["params"]["max_length"] == 512
    assert fields["company_id"].get("is_partition_key")
    assert fields["chunk_index"]["type"] == DataType.INT64
    assert fields["text_sha256"]["params"]["max_length"] == 64
    assert fields["vector"]["type"] == DataType.FLOAT_VECTOR and fields["vector"]["params"]["dim"] == DIM

    frame = _frame(50).with_columns(pl.lit("run-1").alias("run_id"))
    assert mv.upsert_frame(milvus, name, frame, batch_rows=20, max_request_bytes=1 << 20) == 50
    assert mv.upsert_frame(milvus, name, frame, batch_rows=20, max_request_bytes=1 << 20) == 50
    assert mv.count(milvus, name) == 50

    # a changed vector overwrites the old one
    target = frame["chunk_id"][7]
    new_vec = np.zeros(DIM, np.float32)
    new_vec[0] = 1.0
    changed = frame.filter(pl.col("chunk_id") == target).with_columns(
        pl.Series("vector", [new_vec], dtype=pl.Array(pl.Float32, DIM)), pl.lit("run-2").alias("run_id")
    )
    mv.upsert_frame(milvus, name, changed, batch_rows=20, max_request_bytes=1 << 20)
    assert mv.count(milvus, name) == 50
    hits = mv.search(milvus, name, new_vec, limit=1)
    assert hits[0]["chunk_id"] == target and hits[0]["run_id"] == "run-2"
    assert hits[0]["distance"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["company_id"] == frame["company_id"][7]

    filtered = mv.search(milvus, name, new_vec, limit=100, filter='company_id == "co1"')
    assert filtered and {h["company_id"] for h in filtered} == {"co1"}
    assert mv.count(milvus, name, filter='company_id == "co2"') == frame.filter(pl.col("company_id") == "co2").height


def test_dimension_mismatch_is_a_clear_error(milvus: Any) -> None:
    name = mv.collection_name("chunks", "dims")
    mv.ensure_collection(milvus, name, dim=8, index_type="FLAT", metric_type="COSINE")
    with pytest.raises(mv.DimensionMismatch, match="dimension is 8 but this embedding space has 32") as info:
        mv.ensure_collection(milvus, name, dim=32, index_type="FLAT", metric_type="COSINE")
    assert info.value.existing == 8 and info.value.wanted == 32
    assert mv.collection_dim(milvus, name) == 8


def test_foreign_collection_is_refused(milvus: Any) -> None:
    milvus.create_collection("foreign", dimension=8)
    with pytest.raises(mv.VectorStoreError, match="not created by batchyard"):
        mv.ensure_collection(milvus, "foreign", dim=8, index_type="FLAT", metric_type="COSINE")


class _Recorder:
    """Stands in for a MilvusClient: records the size of every upsert."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.rows: list[dict[str, Any]] = []

    def upsert(self, collection_name: str, data: list[dict[str, Any]]) -> dict[str, int]:
        self.calls.append(len(data))
        self.rows.extend(data)
        return {"upsert_count": len(data)}


def test_upserts_are_batched_by_bytes() -> None:
    assert mv.rows_per_request(16, batch_rows=1000, max_request_bytes=16 * 4 * 10) == 10
    assert mv.rows_per_request(16, batch_rows=4, max_request_bytes=1 << 20) == 4
    assert mv.rows_per_request(4096, batch_rows=1000, max_request_bytes=10) == 1
    assert mv.rows_per_request(1536, batch_rows=100_000, max_request_bytes=64 << 20) * 1536 * 4 <= 64 << 20

    rec = _Recorder()
    frame = _frame(95, dim=32).with_columns(pl.lit("r").alias("run_id"))
    budget = 12 * (32 * 4 + 200)
    assert mv.upsert_frame(rec, "c", frame, batch_rows=1000, max_request_bytes=budget) == 95  # type: ignore[arg-type]
    assert sum(rec.calls) == 95 and len(rec.calls) > 1
    assert max(rec.calls) * 32 * 4 <= budget
    assert all(isinstance(r["vector"], np.ndarray) and r["vector"].dtype == np.float32 for r in rec.rows)
    np.testing.assert_array_equal(np.stack([r["vector"] for r in rec.rows]), frame["vector"].to_numpy())
    assert rec.calls == [rec.calls[0]] * (len(rec.calls) - 1) + [rec.calls[-1]]

    rec = _Recorder()
    mv.upsert_frame(rec, "c", frame, batch_rows=7, max_request_bytes=1 << 20)  # type: ignore[arg-type]
    assert max(rec.calls) == 7


def test_vectors_from_lists_and_arrays() -> None:
    arr = _frame(5, dim=4)["vector"]
    lst = _frame(5, dim=4, as_list=True)["vector"]
    np.testing.assert_array_equal(mv.vectors_to_numpy(arr), mv.vectors_to_numpy(lst))
    assert mv.vectors_to_numpy(arr).shape == (5, 4)
    ragged = pl.Series("vector", [[1.0, 2.0], [1.0]], dtype=pl.List(pl.Float32))
    with pytest.raises(ValueError, match="lengths 1 to 2"):
        mv.vectors_to_numpy(ragged)


def test_load_vectors_receipt_and_idempotency(milvus: Any) -> None:
    name = mv.collection_name("chunks", "load")
    mv.ensure_collection(milvus, name, dim=DIM, index_type="FLAT", metric_type="COSINE")
    results = _frame(40, as_list=True)
    # one failed row (no vector) and one chunk embedded twice (the later attempt wins)
    results = pl.concat(
        [
            results.with_columns(pl.lit(1).alias("attempt")),
            results.head(1).with_columns(pl.lit(None, dtype=pl.List(pl.Float32)).alias("vector"), pl.lit(1).alias("attempt")).with_columns(pl.lit("failed/x/1").alias("chunk_id")),
            results.slice(3, 1).with_columns(pl.lit(2).alias("attempt")),
        ],
        how="vertical_relaxed",
    )
    receipt = load_vectors(milvus, name, results, run_id="run-9", batch_rows=16, max_request_bytes=1 << 20)
    assert receipt.sink == "milvus" and receipt.target == name
    assert receipt.rows == receipt.upserted == 40
    assert receipt.skipped == 2
    assert receipt.batches == 3
    again = load_vectors(milvus, name, results, run_id="run-10", batch_rows=16, max_request_bytes=1 << 20)
    assert again.upserted == 40
    assert mv.count(milvus, name) == 40
    assert mv.count(milvus, name, filter='run_id == "run-10"') == 40
    assert receipt.model_dump(mode="json")["at"].endswith("Z")
