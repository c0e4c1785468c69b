"""Polars schemas of the staged tables, and the value types passed between stages.

Every staged Parquet table has its schema here so that stages, tests and benchmarks agree.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

TJob = Literal["embeddings", "inference"]
TIdKind = Literal["str", "objectid", "int"]

# one row per selected source chunk (p=<partition>/chunks/<page>.parquet)
CHUNKS = pl.Schema(
    {
        "chunk_id": pl.String,  # str() of the chunk id field; the Milvus primary key
        "source_id": pl.String,  # repr of the document's MongoDB _id (names it in messages)
        "id_kind": pl.String,  # TIdKind: how to turn chunk_id back into the MongoDB _id
        "company_id": pl.String,
        "document_id": pl.String,
        "chunk_index": pl.Int64,
        "text": pl.String,
        "text_sha256": pl.String,
    }
)

# one row per unit that could not be used, with its reason (the failures dataset)
FAILURES = pl.Schema(
    {
        "unit_id": pl.String,
        "stage": pl.String,  # snapshot | plan | batch | join | parse
        "code": pl.String,
        "message": pl.String,
        "attempt": pl.Int64,
        "batch_id": pl.String,
        "raw": pl.String,  # raw output text where there was one (inference)
    }
)


def empty_failures() -> pl.DataFrame:
    """An empty failures table."""
    return FAILURES.to_frame()


def failures_frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    """A failures table from dicts (missing keys become null)."""
    if not rows:
        return empty_failures()
    return pl.DataFrame(rows, schema=FAILURES, strict=False)
