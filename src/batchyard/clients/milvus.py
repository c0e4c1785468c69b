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

Writes are `upsert`s so reruns never duplicate; large loads into a server go through bulk
import instead (`import_frame`, bottom of this module), which keeps that promise by importing
only ids the collection does not hold yet. Milvus Lite allows one process per data directory and
no concurrent writers to one collection: load from one task at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import polars as pl
from pydantic import SecretStr
from pymilvus import DataType, MilvusClient

from batchyard.errors import ConfigError, TerminalError
from batchyard.settings import MilvusSettings

log = logging.getLogger(__name__)

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


LITE_KEEPALIVE_MS = 300_000
"""Keepalive ping interval towards a Milvus Lite child. Its gRPC server keeps gRPC's default
ping policy (no more than one ping per 5 minutes without data); pymilvus pings every 10 s, which
such a server may answer with `GOAWAY too_many_pings`, logged by gRPC on the terminal. On a
local socket to a child that dies with us, keepalive has nothing to detect."""


class _LiteProcessClient(MilvusClient):
    """A client of a Milvus Lite server process; closing it releases that process."""

    def __init__(self, data_dir: str, **kwargs: Any) -> None:
        from batchyard.clients import milvus_lite

        self._lite_dir = data_dir
        kwargs.setdefault("grpc_options", {"grpc.keepalive_time_ms": LITE_KEEPALIVE_MS})
        super().__init__(uri=milvus_lite.acquire(data_dir), **kwargs)

    def close(self) -> None:
        from batchyard.clients import milvus_lite

        try:
            super().close()
        finally:
            if self._lite_dir:
                milvus_lite.release(self._lite_dir)
                self._lite_dir = ""


def open_vector_store(settings: MilvusSettings, *, default_path: str) -> MilvusClient:
    """A `MilvusClient`: the server at `settings.uri`, or Milvus Lite at `default_path`.

    A Lite path is a directory; its parent is created. With `lite_mode = "process"` (the
    default) Lite runs as a child process of its own (see `milvus_lite.py`); with `"thread"`,
    inside this process. Close the client when done (`client.close()`): a Lite data directory
    belongs to one process at a time.
    """
    uri = settings.uri or default_path
    kwargs: dict[str, Any] = {}
    if settings.token is not None:
        kwargs["token"] = settings.token.get_secret_value()
    if settings.db_name:
        kwargs["db_name"] = settings.db_name
    if is_local_uri(uri):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser())
        if settings.lite_mode == "process":
            return _LiteProcessClient(uri, **kwargs)
        log.warning("milvus.lite_mode=thread: Milvus Lite at %s listens on a loopback TCP port without "
                    "authentication while this process runs; other local users can reach it "
                    "(lite_mode=process uses an owner-only Unix socket)", uri)
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
            raise ValueError(f"column {series.name!r} has vectors of lengths {lo!r} to {hi!r}")
        dim = int(hi) if isinstance(hi, int) else 0
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


def _prepared(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, np.ndarray]:
    """The scalar columns (typed, nulls filled) and the `(rows, dim)` float32 vectors of `frame`."""
    missing = [c for c in FIELDS if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {', '.join(missing)} for Milvus collection {name!r}")
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
    return scalars, vectors_to_numpy(frame[VECTOR_FIELD])


def id_filter(ids: list[str]) -> str:
    """`chunk_id in [...]`, each id a double-quoted literal with JSON escapes."""
    return f"chunk_id in {json.dumps(ids, ensure_ascii=False)}"


def upsert_calls(frame: pl.DataFrame, dim: int, *, batch_rows: int, max_request_bytes: int) -> int:
    """How many upsert calls `upsert_frame` makes for `frame`."""
    if frame.is_empty():
        return 0
    step = upsert_step(frame, dim, batch_rows=batch_rows, max_request_bytes=max_request_bytes)
    return -(-frame.height // step)


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
    On servers whose upsert misroutes partition keys (`upsert_misroutes_partition_keys`), each
    batch is a delete of its ids followed by an insert, which is what upsert does inside Milvus.
    """
    if frame.is_empty():
        return 0
    scalars, vectors = _prepared(frame, name)
    dim = vectors.shape[1]
    step = upsert_step(scalars, dim, batch_rows=batch_rows, max_request_bytes=max_request_bytes)
    replace = upsert_misroutes_partition_keys(client)
    total = 0
    for start in range(0, frame.height, step):
        part = scalars.slice(start, step)
        block = vectors[start : start + part.height]
        rows = part.to_dicts()
        for row, vec in zip(rows, block, strict=True):
            row[VECTOR_FIELD] = vec
        if replace:
            client.delete(collection_name=name, filter=id_filter(part["chunk_id"].to_list()))
            res = client.insert(collection_name=name, data=rows)
            total += int(res.get("insert_count", len(rows)) if isinstance(res, dict) else len(rows))
            continue
        res = client.upsert(collection_name=name, data=rows)
        total += int(res.get("upsert_count", len(rows)) if isinstance(res, dict) else len(rows))
    return total


_MISROUTES: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def upsert_misroutes_partition_keys(client: MilvusClient) -> bool:
    """True for a Milvus 2.3.0-2.3.9 server, whose upsert hashes the wrong field to choose a
    partition-key partition (milvus-io/milvus#30607, fixed by #30772/#30773 in February 2024).

    Rows upserted there are missed by every `company_id == ...` filter (seen on the embedded
    2.3.5 server: 60 upserted rows, 1 found by company). Insert and bulk import route correctly.
    Milvus Lite and anything that reports no server version: False.
    """
    try:
        return _MISROUTES[client]
    except (KeyError, TypeError):
        pass
    try:
        version = str(client.get_server_version())
    except Exception:  # a stand-in without the call, or a server that refuses it
        version = ""
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version)
    affected = match is not None and (int(match[1]), int(match[2])) == (2, 3) and int(match[3]) < 10
    with contextlib.suppress(TypeError):
        _MISROUTES[client] = affected
    return affected


def search(
    client: MilvusClient,
    name: str,
    vector: Any,
    *,
    limit: int = 10,
    filter: str = "",
    consistency_level: str | None = None,
) -> list[dict[str, Any]]:
    """Nearest chunks to one vector: `[{"chunk_id", "distance", company_id, ...}]`, best first.

    `consistency_level="Strong"` sees every row loaded before the call (a server's default,
    Bounded, may miss rows loaded a moment ago, e.g. by the run that just ended).
    """
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    extra = {"consistency_level": consistency_level} if consistency_level else {}
    hits = client.search(
        collection_name=name,
        data=[query],
        filter=filter,
        limit=limit,
        output_fields=[f for f in SCALAR_FIELDS if f != "chunk_id"],
        **extra,
    )
    out: list[dict[str, Any]] = []
    for hit in hits[0] if hits else []:
        row = {"chunk_id": hit.get("chunk_id", hit.get("id")), "distance": float(hit["distance"])}
        row.update(hit.get("entity", {}))
        out.append(row)
    return out


def count(client: MilvusClient, name: str, *, filter: str = "") -> int:
    """Entities in the collection (matching `filter`)."""
    client.load_collection(name)  # a new client of a Lite or server process may find it released
    res = client.query(
        collection_name=name, filter=filter, output_fields=["count(*)"], consistency_level="Strong"
    )
    return int(res[0]["count(*)"]) if res else 0


def get_rows(client: MilvusClient, name: str, ids: list[str], output_fields: list[str]) -> list[dict[str, Any]]:
    """The entities of `ids`, read with strong consistency.

    A check or audit that runs right after a load must see what that load wrote; a server's
    default consistency (Bounded, a few seconds of staleness) may not show it yet.
    """
    return list(client.get(name, ids=ids, output_fields=output_fields, consistency_level="Strong"))


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


# --------------------------------------------------------------------------- bulk import
#
# Above `milvus.bulk_import_min_rows`, a load into a Milvus server writes Parquet files with
# pymilvus' BulkWriter and lets the server import them (one import task per file) instead of
# sending every row through upserts. It is off by default: on the embedded Milvus 2.3.5 it was
# 4-9x slower than upserts (benchmarks/README.md, "Milvus loads"); measure before turning it on.
#
# - API: Milvus 2.3 imports through the gRPC `Import` call (`utility.do_bulk_insert`); the REST
#   `bulk_import` job API only exists from Milvus 2.4, so it is not used. pymilvus marks the
#   `utility` calls for removal in 3.1: without them, loads fall back to upserts with a warning.
# - Files: `local` storage writes under `bulk_local_dir`, at an absolute path the server reads
#   (the embedded server and any standalone server on local disk, same machine); `s3` writes to
#   the server's own MinIO/S3 bucket with `RemoteBulkWriter`, and the import names object keys.
# - Import inserts, it never upserts: an id already in the collection would exist twice. So ids
#   already present are upserted and only the new ids are imported (`import_frame`).
# - An import task is `Completed` before its segments serve queries; a refresh load
#   (`load_collection(refresh=True)`, the Milvus 2.3 way for imported segments) makes them
#   visible, so when `import_frame` returns, a count or a rerun sees every row.
# - Milvus 2.3 imports into the default database only (the import request carries no database).

BULK_FILE_BYTES = 64 * 1024 * 1024
"""Vector + scalar bytes per import file. The writer keeps rows as Python lists until then
(about 8 KB per 256-dim row), so this also bounds the writer's memory."""
EXISTS_QUERY_IDS = 5_000
_FAILED_STATES = {"Failed", "FailedAndCleaned"}


class BulkImportError(VectorStoreError):
    """A bulk import into a Milvus server failed, timed out, or could not start."""


@dataclass(frozen=True)
class BulkImportConfig:
    """Where and how to bulk-import into one Milvus server (see `from_settings`)."""

    uri: str
    min_rows: int
    token: SecretStr | None = None
    storage: Literal["local", "s3"] = "local"
    local_dir: str | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = "batchyard-bulk"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    timeout_s: float = 3_600.0
    poll_s: float = 0.5

    @classmethod
    def from_settings(cls, settings: MilvusSettings) -> BulkImportConfig | None:
        """The bulk-import setup for a server URI; None for Milvus Lite or when switched off.

        Raises:
            ConfigError: `bulk_storage` is s3 without a bucket or endpoint.
        """
        uri = settings.uri
        if settings.bulk_import_min_rows is None or not uri or is_local_uri(uri):
            return None
        if settings.db_name not in ("", "default"):
            log.warning(
                "milvus.db_name is %r: Milvus 2.3 bulk-imports into the default database only, "
                "so loads use upserts", settings.db_name,
            )
            return None
        if settings.bulk_storage == "s3" and not (settings.bulk_s3_bucket and settings.bulk_s3_endpoint_url):
            raise ConfigError("milvus.bulk_storage is 's3' but bulk_s3_bucket or bulk_s3_endpoint_url is unset")
        return cls(
            uri=uri,
            min_rows=settings.bulk_import_min_rows,
            token=settings.token,
            storage=settings.bulk_storage,
            local_dir=settings.bulk_local_dir,
            s3_bucket=settings.bulk_s3_bucket,
            s3_endpoint_url=settings.bulk_s3_endpoint_url,
            s3_prefix=settings.bulk_s3_prefix,
            s3_access_key_id=settings.bulk_s3_access_key_id,
            s3_secret_access_key=settings.bulk_s3_secret_access_key,
            timeout_s=settings.bulk_import_timeout_s,
        )

    def scrub(self, text: str) -> str:
        """`text` with every secret of this config masked (server errors can echo them)."""
        for secret in (self.token, self.s3_access_key_id, self.s3_secret_access_key):
            value = secret.get_secret_value() if secret is not None else ""
            if value:
                text = text.replace(value, "**********")
        return text


@dataclass(frozen=True)
class ImportOutcome:
    """What `import_frame` wrote."""

    imported: int
    upserted: int
    upsert_calls: int
    import_tasks: int


def bulk_import_unavailable() -> str | None:
    """Why bulk import cannot run with the installed pymilvus, or None when it can."""
    try:
        from pymilvus import utility
    except ImportError as exc:  # pragma: no cover - pymilvus always ships it up to 3.0
        return f"pymilvus has no ORM utility module ({exc})"
    if not hasattr(utility, "do_bulk_insert"):
        return "this pymilvus has no utility.do_bulk_insert (removed in 3.1); Milvus 2.3 needs it"
    try:
        _bulk_writer()
    except ImportError as exc:
        return f"pymilvus' bulk writer is not installed ({exc}): pip install 'pymilvus[bulk-writer]'"
    return None


def _bulk_writer() -> Any:
    """`pymilvus.bulk_writer`, imported without its side effect on logging.

    Its modules call `logging.basicConfig(level=INFO)` at import and log every file at INFO:
    the root logger is put back as it was and the writer's loggers are held at WARNING.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import pymilvus.bulk_writer as bw
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    logging.getLogger("pymilvus.bulk_writer").setLevel(logging.WARNING)
    for mod in ("bulk_writer", "local_bulk_writer", "remote_bulk_writer", "buffer"):
        logging.getLogger(f"pymilvus.bulk_writer.{mod}").setLevel(logging.WARNING)
    return bw


def existing_ids(client: MilvusClient, name: str, ids: list[str]) -> set[str]:
    """Those of `ids` that the collection already holds (queried in slices, strongly consistent)."""
    found: set[str] = set()
    for lo in range(0, len(ids), EXISTS_QUERY_IDS):
        rows = client.query(
            collection_name=name,
            filter=id_filter(ids[lo : lo + EXISTS_QUERY_IDS]),
            output_fields=["chunk_id"],
            consistency_level="Strong",
        )
        found.update(str(r["chunk_id"]) for r in rows)
    return found


def import_frame(
    client: MilvusClient,
    name: str,
    frame: pl.DataFrame,
    cfg: BulkImportConfig,
    *,
    batch_rows: int,
    max_request_bytes: int,
) -> ImportOutcome:
    """Load `frame` into a server collection: ids it already holds are upserted, new ids imported.

    Returns once every row is visible to queries.

    Raises:
        BulkImportError: writing the files, starting an import, an import task failed (its
            reason is in the message), or the imports did not finish within `cfg.timeout_s`.
    """
    scalars, vectors = _prepared(frame, name)
    ids = scalars["chunk_id"].to_list()
    present = existing_ids(client, name, ids) if count(client, name) else set()
    is_old = scalars["chunk_id"].is_in(list(present))
    old = frame.filter(is_old)
    upserted = upsert_frame(client, name, old, batch_rows=batch_rows, max_request_bytes=max_request_bytes)
    calls = upsert_calls(old, vectors.shape[1], batch_rows=batch_rows, max_request_bytes=max_request_bytes)
    new_mask = ~is_old.to_numpy()
    tasks = _import_rows(client, name, scalars.filter(~is_old), vectors[new_mask], cfg)
    return ImportOutcome(
        imported=int(new_mask.sum()), upserted=upserted, upsert_calls=calls, import_tasks=tasks
    )


def _import_rows(
    client: MilvusClient, name: str, scalars: pl.DataFrame, vectors: np.ndarray, cfg: BulkImportConfig
) -> int:
    """Write the rows as import files, import them all, wait, refresh; returns the task count.

    The rows the server reports imported must add up to the rows written: the writer flushes
    (and uploads) in threads whose errors would otherwise only be printed.
    """
    if scalars.is_empty():
        return 0
    local_root = None
    if cfg.storage == "local" and cfg.local_dir:
        local_root = Path(cfg.local_dir).expanduser().resolve()
        local_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="batchyard-bulk-", dir=local_root) as tmp:
        groups = write_import_files(name, scalars, vectors, cfg, tmp)
        try:
            imported = _run_imports(name, groups, cfg) if groups else 0
        finally:
            if cfg.storage == "s3" and groups:
                _remove_objects(cfg, groups)
    client.load_collection(name, refresh=True)
    if imported != scalars.height:
        raise BulkImportError(
            name, f"{imported} of {scalars.height} rows imported from {len(groups)} file(s); the "
            "bulk writer lost the rest (its error is in the log); load again to finish"
        )
    return len(groups)


def write_import_files(
    name: str, scalars: pl.DataFrame, vectors: np.ndarray, cfg: BulkImportConfig, workdir: str
) -> list[list[str]]:
    """Write the rows as Parquet import files; returns the file groups (one import task each).

    Local storage: absolute paths under `workdir`. S3 storage: object keys in `cfg.s3_bucket`
    (under `cfg.s3_prefix/<uuid>/`), uploaded from `workdir`.

    Raises:
        BulkImportError: a row was refused, the bucket does not exist, or writing failed.
    """
    bw = _bulk_writer()
    schema = _schema(int(vectors.shape[1]))
    try:
        if cfg.storage == "s3":
            if not _minio(cfg).bucket_exists(cfg.s3_bucket or ""):
                raise BulkImportError(name, f"bucket {cfg.s3_bucket!r} does not exist at {cfg.s3_endpoint_url}")
            writer = bw.RemoteBulkWriter(
                schema=schema,
                remote_path=cfg.s3_prefix,
                connect_param=_s3_param(bw, cfg),
                chunk_size=BULK_FILE_BYTES,
                file_type=bw.BulkFileType.PARQUET,
                local_path=workdir,
            )
        else:
            writer = bw.LocalBulkWriter(
                schema=schema, local_path=workdir, chunk_size=BULK_FILE_BYTES,
                file_type=bw.BulkFileType.PARQUET,
            )
        with writer:
            for row, vec in zip(scalars.iter_rows(named=True), vectors, strict=True):
                row[VECTOR_FIELD] = vec
                writer.append_row(row)
            writer.commit()
            return [[str(f) for f in group] for group in writer.batch_files if group]
    except BulkImportError:
        raise
    except Exception as exc:  # MilvusException, S3 and OS errors: one clear message
        raise BulkImportError(name, cfg.scrub(f"writing import files failed: {_reason(exc)}")) from None


def _s3_endpoint(cfg: BulkImportConfig) -> tuple[str, bool]:
    """`host:port` and whether TLS is on, from `http(s)://host:port`."""
    url = urlsplit(cfg.s3_endpoint_url or "")
    return url.netloc or url.path, url.scheme == "https"


def _s3_keys(cfg: BulkImportConfig) -> tuple[str | None, str | None]:
    key, secret = cfg.s3_access_key_id, cfg.s3_secret_access_key
    return (key.get_secret_value() if key else None, secret.get_secret_value() if secret else None)


def _s3_param(bw: Any, cfg: BulkImportConfig) -> Any:
    endpoint, secure = _s3_endpoint(cfg)
    key, secret = _s3_keys(cfg)
    return bw.RemoteBulkWriter.S3ConnectParam(
        bucket_name=cfg.s3_bucket, endpoint=endpoint, access_key=key, secret_key=secret, secure=secure
    )


def _minio(cfg: BulkImportConfig) -> Any:
    """A MinIO/S3 client for the bucket (minio comes with `pymilvus[bulk-writer]`)."""
    from minio import Minio

    endpoint, secure = _s3_endpoint(cfg)
    key, secret = _s3_keys(cfg)
    return Minio(endpoint, access_key=key, secret_key=secret, secure=secure)


def _remove_objects(cfg: BulkImportConfig, groups: list[list[str]]) -> None:
    """Delete uploaded import files (the server has read them, or the import failed)."""
    from minio.deleteobjects import DeleteObject

    keys = [DeleteObject(k) for group in groups for k in group]
    for err in _minio(cfg).remove_objects(cfg.s3_bucket or "", keys):
        log.warning("could not delete import file %s: %s", err.name, err.message)


def _run_imports(name: str, groups: list[list[str]], cfg: BulkImportConfig) -> int:
    """Start one import task per file group, wait until all completed; returns rows imported."""
    from pymilvus import connections, utility

    alias = f"batchyard-bulk-{uuid.uuid4().hex}"
    token = cfg.token.get_secret_value() if cfg.token is not None else ""
    with warnings.catch_warnings():
        # pymilvus warns (FutureWarning) that the ORM calls go away in 3.1: see the section note
        warnings.simplefilter("ignore", FutureWarning)
        connections.connect(alias=alias, uri=cfg.uri, token=token)
        try:
            tasks = []
            for files in groups:
                try:
                    tasks.append(
                        utility.do_bulk_insert(collection_name=name, files=files, timeout=60, using=alias)
                    )
                except Exception as exc:
                    raise BulkImportError(
                        name, cfg.scrub(f"the server refused the import of {files[0]}: {_reason(exc)}")
                    ) from None
            return _wait_for_imports(name, tasks, cfg, alias)
        finally:
            connections.disconnect(alias)


def _wait_for_imports(name: str, tasks: list[int], cfg: BulkImportConfig, alias: str) -> int:
    """Poll the import tasks until all completed; returns the rows they imported."""
    from pymilvus import BulkInsertState, utility

    deadline = time.monotonic() + cfg.timeout_s
    pending = dict.fromkeys(tasks, "Pending")
    rows = 0
    while True:
        for task in list(pending):
            state = utility.get_bulk_insert_state(task, using=alias)
            if state.state_name in _FAILED_STATES:
                reason = state.failed_reason or "no reason given"
                raise BulkImportError(name, cfg.scrub(f"import task {task} failed: {reason}"))
            if state.state == BulkInsertState.ImportCompleted:
                rows += int(state.row_count)
                del pending[task]
            else:
                pending[task] = state.state_name
        if not pending:
            return rows
        if time.monotonic() >= deadline:
            states = ", ".join(f"{t}: {s}" for t, s in pending.items())
            raise BulkImportError(
                name, f"{len(pending)} import task(s) not completed after {cfg.timeout_s:g} s ({states})"
            )
        time.sleep(cfg.poll_s)


def _reason(exc: BaseException) -> str:
    """A one-line reason from a pymilvus/minio exception."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(message).split())
