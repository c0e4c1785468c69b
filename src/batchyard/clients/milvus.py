"""The vector store: Milvus Lite at a local path (default) or a Milvus server.

One collection per embedding space (`collection_name(prefix, space)`), with a fixed schema:

| field        | type                | note                       |
|--------------|---------------------|----------------------------|
| chunk_id     | VARCHAR(512)        | primary key (the chunk id) |
| company_id   | VARCHAR(256)        | partition key              |
| document_id  | VARCHAR(512)        |                            |
| chunk_index  | INT64               | -1 when unknown            |
| text_sha256  | VARCHAR(64)         |                            |
| run_id       | VARCHAR(128)        | run that wrote the vector  |
| vector       | FLOAT_VECTOR(dim)   |                            |

Writes are `upsert`s so reruns never duplicate. Milvus Lite allows one process per data
directory and no concurrent writers to one collection: load from one task at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pymilvus import DataType, MilvusClient

from batchyard.errors import ConfigError, TerminalError
from batchyard.settings import MilvusSettings

SCALAR_FIELDS = ("chunk_id", "company_id", "document_id", "chunk_index", "text_sha256", "run_id")
VECTOR_FIELD = "vector"
FIELDS = (*SCALAR_FIELDS, VECTOR_FIELD)
MAX_LENGTHS = {"chunk_id": 512, "company_id": 256, "document_id": 512, "text_sha256": 64, "run_id": 128}
_NAME_MAX = 255
_SERVER_PREFIXES = ("http://", "https://", "tcp://", "grpc://", "unix:")
_INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
}


class VectorStoreError(TerminalError):
    """A Milvus collection cannot be used as asked (schema or dimension mismatch)."""

    def __init__(self, collection: str, reason: str) -> None:
        self.collection = collection
        self.reason = reason
        super().__init__(f"Milvus collection {collection!r}: {reason}")


class DimensionMismatch(VectorStoreError, ConfigError):
    """The collection exists with another vector dimension than the embedding space."""

    def __init__(self, collection: str, existing: int, wanted: int) -> None:
        self.existing = existing
        self.wanted = wanted
        super().__init__(
            collection,
            f"vector dimension is {existing} but this embedding space has {wanted}; use another "
            "collection prefix or drop the collection",
        )


def is_local_uri(uri: str) -> bool:
    """True for a Milvus Lite path (anything that is not a server URI)."""
    return not uri.lower().startswith(_SERVER_PREFIXES)


def vector_store_label(settings: MilvusSettings, *, default_path: str) -> str:
    """Where vectors go, for logs (never the token)."""
    uri = settings.uri or default_path
    if is_local_uri(uri):
        return f"Milvus Lite at {uri}"
    scheme, _, rest = uri.partition("://")
    host = rest.split("/", 1)[0].rpartition("@")[2]
    return f"Milvus at {scheme}://{host}"


def open_vector_store(settings: MilvusSettings, *, default_path: str) -> MilvusClient:
    """A `MilvusClient`: the server at `settings.uri`, or Milvus Lite at `default_path`.

    A Lite path is a directory; its parent is created. Close the client when done
    (`client.close()`): a Lite data directory is locked to one process.
    """
    uri = settings.uri or default_path
    kwargs: dict[str, Any] = {}
    if is_local_uri(uri):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser())
    if settings.token is not None:
        kwargs["token"] = settings.token.get_secret_value()
    if settings.db_name:
        kwargs["db_name"] = settings.db_name
    return MilvusClient(uri=uri, **kwargs)


def collection_name(prefix: str, space: str) -> str:
    """A valid Milvus collection name for a space: `[A-Za-z_][A-Za-z0-9_]*`, at most 255."""
    raw = f"{prefix}_{space}" if prefix else space
    name = re.sub(r"[^A-Za-z0-9_]", "_", raw)
    if not name or not (name[0].isalpha() or name[0] == "_") or not name[0].isascii():
        name = f"_{name}"
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
        name = f"{name[: _NAME_MAX - 13]}_{digest}"
    return name


def _schema(dim: int) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=MAX_LENGTHS["chunk_id"])
    schema.add_field(
        "company_id", DataType.VARCHAR, max_length=MAX_LENGTHS["company_id"], is_partition_key=True
    )
    schema.add_field("document_id", DataType.VARCHAR, max_length=MAX_LENGTHS["document_id"])
    schema.add_field("chunk_index", DataType.INT64)
    schema.add_field("text_sha256", DataType.VARCHAR, max_length=MAX_LENGTHS["text_sha256"])
    schema.add_field("run_id", DataType.VARCHAR, max_length=MAX_LENGTHS["run_id"])
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    return schema


def ensure_collection(
    client: MilvusClient,
    name: str,
    *,
    dim: int,
    index_type: str = "AUTOINDEX",
    metric_type: str = "COSINE",
) -> bool:
    """Create the collection (schema above, vector index, loaded) unless it exists.

    Returns True when it was created. An existing collection must have every field and the
    same vector dimension.

    Raises:
        DimensionMismatch: the existing collection has another dimension.
        VectorStoreError: the existing collection lacks a field of the schema.
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, not {dim}")
    if client.has_collection(name):
        desc = client.describe_collection(name)
        fields = {f["name"]: f for f in desc.get("fields", [])}
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise VectorStoreError(
                name, f"exists without field(s) {', '.join(missing)}; it was not created by batchyard"
            )
        existing = int(fields[VECTOR_FIELD].get("params", {}).get("dim", -1))
        if existing != dim:
            raise DimensionMismatch(name, existing, dim)
        client.load_collection(name)
        return False
    index_params = MilvusClient.prepare_index_params()
    index_params.add_index(
        field_name=VECTOR_FIELD,
        index_type=index_type,
        metric_type=metric_type,
        params=_INDEX_PARAMS.get(index_type.upper(), {}),
    )
    client.create_collection(name, schema=_schema(dim), index_params=index_params)
    return True


def collection_dim(client: MilvusClient, name: str) -> int:
    """The vector dimension of an existing collection."""
    desc = client.describe_collection(name)
    for f in desc.get("fields", []):
        if f["name"] == VECTOR_FIELD:
            return int(f.get("params", {}).get("dim", -1))
    raise VectorStoreError(name, f"has no {VECTOR_FIELD!r} field")


def vectors_to_numpy(series: pl.Series) -> np.ndarray:
    """A `(rows, dim)` float32 array from an `Array(Float32, dim)` or list column (no Python loop).

    Raises:
        ValueError: rows of different lengths, or a null vector.
    """
    if series.null_count():
        raise ValueError(f"column {series.name!r} has {series.null_count()} null vector(s)")
    dtype = series.dtype
    if isinstance(dtype, pl.List):
        lengths = series.list.len()
        lo, hi = lengths.min(), lengths.max()
        if lo != hi:
            raise ValueError(f"column {series.name!r} has vectors of lengths {lo} to {hi}")
        dim = int(hi) if hi is not None else 0
        series = series.cast(pl.Array(pl.Float32, dim))
    elif isinstance(dtype, pl.Array):
        if dtype.inner != pl.Float32:
            series = series.cast(pl.Array(pl.Float32, dtype.size))
    else:
        raise ValueError(f"column {series.name!r} is {dtype}, not a list or array of floats")
    arr = series.to_numpy()
    if arr.ndim != 2:  # empty frames come back 1-d
        arr = arr.reshape(len(series), -1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def rows_per_request(dim: int, *, batch_rows: int, max_request_bytes: int, row_overhead: int = 0) -> int:
    """Rows per upsert so that rows x (dim x 4 + overhead) stays within `max_request_bytes`."""
    per_row = dim * 4 + max(0, row_overhead)
    return max(1, min(batch_rows, max_request_bytes // max(1, per_row)))


def upsert_step(frame: pl.DataFrame, dim: int, *, batch_rows: int, max_request_bytes: int) -> int:
    """Rows per upsert call for `frame`: vector bytes plus the mean size of its scalar fields."""
    strings = [c for c in ("chunk_id", "company_id", "document_id", "text_sha256", "run_id") if c in frame.columns]
    string_bytes = 0
    if strings and frame.height:
        string_bytes = frame.select(
            pl.sum_horizontal(pl.col(c).cast(pl.String).str.len_bytes().cast(pl.Int64) for c in strings).mean()
        ).item() or 0
    return rows_per_request(
        dim,
        batch_rows=batch_rows,
        max_request_bytes=max_request_bytes,
        row_overhead=int(string_bytes) + 8 * len(FIELDS),
    )


def upsert_frame(
    client: MilvusClient,
    name: str,
    frame: pl.DataFrame,
    *,
    batch_rows: int,
    max_request_bytes: int,
) -> int:
    """Upsert a frame with the collection's columns; returns the rows upserted.

    Batches hold at most `batch_rows` rows and about `max_request_bytes` (vector bytes plus the
    mean size of the scalar strings). Nulls in `chunk_index` become -1; `company_id` must be set.
    """
    if frame.is_empty():
        return 0
    missing = [c for c in FIELDS if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {', '.join(missing)} for Milvus collection {name!r}")
    vectors = vectors_to_numpy(frame[VECTOR_FIELD])
    dim = vectors.shape[1]
    scalars = frame.select(
        pl.col("chunk_id").cast(pl.String),
        pl.col("company_id").cast(pl.String),
        pl.col("document_id").cast(pl.String).fill_null(""),
        pl.col("chunk_index").cast(pl.Int64).fill_null(-1),
        pl.col("text_sha256").cast(pl.String).fill_null(""),
        pl.col("run_id").cast(pl.String).fill_null(""),
    )
    bad = scalars.filter(pl.col("chunk_id").is_null() | pl.col("company_id").is_null()).height
    if bad:
        raise ValueError(f"{bad} row(s) without chunk_id or company_id for Milvus collection {name!r}")
    step = upsert_step(scalars, dim, batch_rows=batch_rows, max_request_bytes=max_request_bytes)
    total = 0
    for start in range(0, frame.height, step):
        part = scalars.slice(start, step)
        block = vectors[start : start + part.height]
        rows = part.to_dicts()
        for row, vec in zip(rows, block, strict=True):
            row[VECTOR_FIELD] = vec
        res = client.upsert(collection_name=name, data=rows)
        total += int(res.get("upsert_count", len(rows)) if isinstance(res, dict) else len(rows))
    return total


def search(
    client: MilvusClient,
    name: str,
    vector: Any,
    *,
    limit: int = 10,
    filter: str = "",
) -> list[dict[str, Any]]:
    """Nearest chunks to one vector: `[{"chunk_id", "distance", company_id, ...}]`, best first."""
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    hits = client.search(
        collection_name=name,
        data=[query],
        filter=filter,
        limit=limit,
        output_fields=[f for f in SCALAR_FIELDS if f != "chunk_id"],
    )
    out: list[dict[str, Any]] = []
    for hit in hits[0] if hits else []:
        row = {"chunk_id": hit.get("chunk_id", hit.get("id")), "distance": float(hit["distance"])}
        row.update(hit.get("entity", {}))
        out.append(row)
    return out


def count(client: MilvusClient, name: str, *, filter: str = "") -> int:
    """Entities in the collection (matching `filter`)."""
    res = client.query(
        collection_name=name, filter=filter, output_fields=["count(*)"], consistency_level="Strong"
    )
    return int(res[0]["count(*)"]) if res else 0


def vectors_by_text(client: MilvusClient, name: str, shas: list[str], *, batch: int = 500) -> pl.DataFrame:
    """One stored vector per text sha256 found in the collection (for re-using embeddings).

    Returns columns text_sha256, donor_chunk_id, donor_run_id, vector (`Array(Float32, dim)`);
    an empty frame when the collection does not exist yet or no sha is stored.
    """
    schema = {"text_sha256": pl.String, "donor_chunk_id": pl.String, "donor_run_id": pl.String}
    if not shas or not client.has_collection(name):
        return pl.DataFrame(schema={**schema, VECTOR_FIELD: pl.List(pl.Float32)})
    dim = collection_dim(client, name)
    client.load_collection(name)
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(shas), batch):
        wanted = [s for s in shas[start : start + batch] if s not in rows]
        if not wanted:
            continue
        res = client.query(
            collection_name=name,
            filter=f"text_sha256 in {json.dumps(wanted)}",
            output_fields=["chunk_id", "text_sha256", "run_id", VECTOR_FIELD],
            consistency_level="Strong",
        )
        for hit in res:
            rows.setdefault(hit["text_sha256"], hit)
    if not rows:
        return pl.DataFrame(schema={**schema, VECTOR_FIELD: pl.Array(pl.Float32, dim)})
    hits = list(rows.values())
    return pl.DataFrame(
        {
            "text_sha256": [h["text_sha256"] for h in hits],
            "donor_chunk_id": [h["chunk_id"] for h in hits],
            "donor_run_id": [h["run_id"] for h in hits],
            VECTOR_FIELD: np.asarray([h[VECTOR_FIELD] for h in hits], dtype=np.float32),
        },
        schema={**schema, VECTOR_FIELD: pl.Array(pl.Float32, dim)},
    )
