"""Load: write joined results into the sinks and say what was written.

- `load_vectors`: Milvus `upsert` of the embedded chunks (reruns never duplicate); a large load
  into a Milvus server goes through bulk import instead (`bulk=`), which upserts the ids the
  collection already holds and imports only the new ones, so reruns still never duplicate.
- `mark_chunks`: per chunk, `$set <marks>.<space> = {text_sha256, run_id, at}` in MongoDB so the
  next snapshot selects only new or changed chunks.
- `store_results`: inference results, one document per (task, task_version, unit_id), upserted.

Each returns a `LoadReceipt` (the caller stores it as `loads/<sink>.json`). MongoDB writes are
unordered `bulk_write`s of `batch_size` operations; write errors never vanish: the other
operations still run, then `LoadError` is raised carrying the receipt and every per-operation
error (unit id, code, message).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, Field
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from batchyard.clients import milvus as mv
from batchyard.clients.mongo import ensure_results_index
from batchyard.errors import TerminalError
from batchyard.settings import MongoFields
from batchyard.stages.snapshot import mark_path, mongo_id

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 100
DUPLICATE_KEY = 11000
USAGE_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cached_tokens",
)


class LoadReceipt(BaseModel):
    """What one load wrote, where, and when."""

    sink: str = Field(description="milvus | mongo.marks | mongo.results")
    target: str = Field(description="Collection written (no credentials).")
    rows: int = Field(default=0, description="Rows offered to the sink after filtering.")
    matched: int = Field(default=0, description="MongoDB: documents matched by the filters.")
    modified: int = Field(default=0, description="MongoDB: documents changed.")
    upserted: int = Field(default=0, description="Milvus: rows upserted; MongoDB: new documents.")
    imported: int = Field(default=0, description="Milvus: new rows written by bulk import.")
    method: Literal["upsert", "bulk_import"] | None = Field(
        default=None, description="Milvus: how the vectors were written."
    )
    skipped: int = Field(default=0, description="Rows not written (no vector/output, duplicates).")
    batches: int = Field(default=0, description="Write calls made.")
    error_count: int = Field(default=0, description="Operations that failed.")
    errors: list[dict[str, Any]] = Field(
        default_factory=list, description=f"The first {MAX_REPORTED_ERRORS} failed operations."
    )
    run_id: str = Field(default="", description="Run that loaded.")
    seconds: float = Field(default=0.0, description="Wall time.")
    at: datetime = Field(default_factory=lambda: datetime.now(UTC), description="Finish time (UTC).")


class LoadError(TerminalError):
    """Some operations of a load failed; the rest were written (see `.receipt`)."""

    def __init__(self, receipt: LoadReceipt) -> None:
        self.receipt = receipt
        first = receipt.errors[0] if receipt.errors else {}
        super().__init__(
            f"{receipt.sink} into {receipt.target}: {receipt.error_count} of {receipt.rows} "
            f"operation(s) failed (first: unit {first.get('unit_id')!r}, code {first.get('code')}: "
            f"{first.get('message')})"
        )


# --------------------------------------------------------------------------- Milvus


def load_vectors(
    client: Any,
    name: str,
    results: pl.DataFrame,
    *,
    run_id: str,
    batch_rows: int,
    max_request_bytes: int,
    bulk: mv.BulkImportConfig | None = None,
) -> LoadReceipt:
    """Write embedded chunks into Milvus collection `name` (create it first: `ensure_collection`).

    `results` needs chunk_id, company_id, document_id, chunk_index, text_sha256 and vector;
    rows without a vector are skipped; a chunk_id appearing twice keeps its last row.

    Upserts, unless `bulk` is given (a Milvus server: `BulkImportConfig.from_settings`) and at
    least `bulk.min_rows` rows remain: then ids already in the collection are upserted and the
    rest bulk-imported (`receipt.method == "bulk_import"`). Without the bulk-import API in the
    installed pymilvus, it logs why and upserts.

    Raises:
        BulkImportError: the bulk import failed or timed out (named collection and reason).
    """
    start = time.perf_counter()
    need = [c for c in mv.FIELDS if c != "run_id"]
    missing = [c for c in need if c not in results.columns]
    if missing:
        raise ValueError(f"results lack column(s) {', '.join(missing)} to load into Milvus")
    frame = results.filter(pl.col(mv.VECTOR_FIELD).is_not_null())
    if "attempt" in frame.columns:
        frame = frame.sort("attempt", maintain_order=True, nulls_last=False)
    frame = frame.unique(subset="chunk_id", keep="last", maintain_order=True)
    frame = frame.select(*need).with_columns(pl.lit(run_id, dtype=pl.String).alias("run_id"))
    receipt = LoadReceipt(
        sink="milvus", target=name, rows=frame.height, skipped=results.height - frame.height, run_id=run_id
    )
    bulk = _bulk_for(bulk, frame.height, name)
    if bulk is not None:
        out = mv.import_frame(
            client, name, frame, bulk, batch_rows=batch_rows, max_request_bytes=max_request_bytes
        )
        receipt.method = "bulk_import"
        receipt.imported, receipt.upserted = out.imported, out.upserted
        receipt.batches = out.upsert_calls + out.import_tasks
    else:
        receipt.method = "upsert"
        receipt.upserted = mv.upsert_frame(
            client, name, frame, batch_rows=batch_rows, max_request_bytes=max_request_bytes
        )
        receipt.batches = mv.upsert_calls(
            frame, _dim(frame), batch_rows=batch_rows, max_request_bytes=max_request_bytes
        )
    receipt.seconds = round(time.perf_counter() - start, 3)
    receipt.at = datetime.now(UTC)
    return receipt


def _bulk_for(bulk: mv.BulkImportConfig | None, rows: int, name: str) -> mv.BulkImportConfig | None:
    """`bulk` when this load should go through bulk import, else None (logged when it cannot)."""
    if bulk is None or rows < bulk.min_rows:
        return None
    reason = mv.bulk_import_unavailable()
    if reason:
        log.warning("Milvus collection %r: upserting %d rows instead of bulk import: %s", name, rows, reason)
        return None
    return bulk


def _dim(frame: pl.DataFrame) -> int:
    dtype = frame.schema[mv.VECTOR_FIELD]
    if isinstance(dtype, pl.Array):
        return int(dtype.size)
    if frame.is_empty():
        return 1
    longest = frame[mv.VECTOR_FIELD].list.len().max()
    return int(longest) if isinstance(longest, int) and longest > 0 else 1


# --------------------------------------------------------------------------- MongoDB


class _BulkTally:
    def __init__(self, sink: str, target: str, run_id: str) -> None:
        self.receipt = LoadReceipt(sink=sink, target=target, run_id=run_id)

    def error(self, unit_id: Any, code: Any, message: str) -> None:
        r = self.receipt
        r.error_count += 1
        if len(r.errors) < MAX_REPORTED_ERRORS:
            r.errors.append({"unit_id": unit_id, "code": code, "message": message[:500]})

    def add_result(self, matched: int, modified: int, upserted: int) -> None:
        r = self.receipt
        r.matched += matched
        r.modified += modified
        r.upserted += upserted

    def finish(self, start: float) -> LoadReceipt:
        """Stamp time and duration; raise LoadError (with the receipt) if any write failed."""
        receipt = self.receipt
        receipt.seconds = round(time.perf_counter() - start, 3)
        receipt.at = datetime.now(UTC)
        if receipt.error_count:
            raise LoadError(receipt)
        return receipt

    def run(self, collection: Any, ops: list[UpdateOne], unit_ids: list[Any], *, retry_dup: bool) -> None:
        """One unordered bulk_write; duplicate-key races of upserts are retried once."""
        self.receipt.batches += 1
        try:
            res = collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            details = exc.details or {}
            self.add_result(
                details.get("nMatched", 0), details.get("nModified", 0), details.get("nUpserted", 0)
            )
            retry: list[int] = []
            for err in details.get("writeErrors", []):
                i = int(err.get("index", -1))
                if retry_dup and err.get("code") == DUPLICATE_KEY and 0 <= i < len(ops):
                    retry.append(i)
                    continue
                unit = unit_ids[i] if 0 <= i < len(unit_ids) else None
                self.error(unit, err.get("code"), str(err.get("errmsg", "")))
            for err in details.get("writeConcernErrors", []):
                self.error(None, err.get("code"), f"write concern: {err.get('errmsg', '')}")
            if retry:
                self.run(collection, [ops[i] for i in retry], [unit_ids[i] for i in retry], retry_dup=False)
            return
        self.add_result(res.matched_count, res.modified_count, res.upserted_count)


def _target(collection: Any) -> str:
    return str(getattr(collection, "full_name", getattr(collection, "name", "?")))


def mark_chunks(
    collection: Any,
    rows: pl.DataFrame,
    *,
    fields: MongoFields,
    space: str,
    run_id: str,
    batch_size: int,
) -> LoadReceipt:
    """Mark chunks as embedded in `space`: `$set <marks>.<space> = {text_sha256, run_id, at}`.

    `rows` needs chunk_id, id_kind and text_sha256 (the hash of the text that was embedded, so a
    chunk edited since the snapshot is selected again next time). Never inserts: a chunk deleted
    meanwhile stays deleted (it counts as not matched).

    Raises:
        LoadError: some updates failed (all others were applied); `.receipt` has the details.
    """
    start = time.perf_counter()
    missing = [c for c in ("chunk_id", "id_kind", "text_sha256") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {', '.join(missing)} to mark chunks")
    path = mark_path(fields, space)
    frame = rows.filter(pl.col("chunk_id").is_not_null() & pl.col("text_sha256").is_not_null())
    frame = frame.unique(subset="chunk_id", keep="last", maintain_order=True)
    tally = _BulkTally("mongo.marks", _target(collection), run_id)
    tally.receipt.rows = frame.height
    tally.receipt.skipped = rows.height - frame.height
    at = datetime.now(UTC)
    key = fields.chunk_id
    ids = frame["chunk_id"].to_list()
    kinds = frame["id_kind"].to_list()
    shas = frame["text_sha256"].to_list()
    for lo in range(0, len(ids), batch_size):
        ops: list[UpdateOne] = []
        units: list[Any] = []
        for cid, kind, sha in zip(ids[lo : lo + batch_size], kinds[lo : lo + batch_size], shas[lo : lo + batch_size], strict=True):
            try:
                original = mongo_id(cid, kind or "str")
            except (ValueError, TypeError) as exc:
                tally.error(cid, "bad_id", f"cannot turn chunk_id back into a MongoDB id: {exc}")
                continue
            ops.append(
                UpdateOne({key: original}, {"$set": {path: {"text_sha256": sha, "run_id": run_id, "at": at}}})
            )
            units.append(cid)
        if ops:
            tally.run(collection, ops, units, retry_dup=False)
    return tally.finish(start)


def _usage(frame: pl.DataFrame) -> list[dict[str, Any] | None]:
    n = frame.height
    if "usage" in frame.columns:
        col = frame["usage"]
        if col.dtype == pl.String:
            out: list[dict[str, Any] | None] = []
            for v in col.to_list():
                try:
                    out.append(json.loads(v) if v else None)
                except json.JSONDecodeError:
                    out.append({"raw": v})
            return out
        if isinstance(col.dtype, pl.Struct):
            return [
                {k: v for k, v in d.items() if v is not None} if d else None for d in col.to_list()
            ]
    cols = [c for c in USAGE_COLUMNS if c in frame.columns]
    if not cols:
        return [None] * n
    records = frame.select(cols).to_dicts()
    return [{k: v for k, v in rec.items() if v is not None} or None for rec in records]


def _column(frame: pl.DataFrame, name: str) -> list[Any]:
    return frame[name].to_list() if name in frame.columns else [None] * frame.height


def store_results(
    collection: Any,
    rows: pl.DataFrame,
    *,
    task: str,
    task_version: str,
    run_id: str,
    batch_size: int,
) -> LoadReceipt:
    """Upsert inference results keyed by (task, task_version, unit_id).

    `rows` needs unit_id and parsed (the validated output as a JSON string); optional columns:
    company_id, document_id, raw_text, model, batch_id, attempt, custom_id, and usage (a JSON
    string or struct) or token columns (prompt_tokens, completion_tokens, total_tokens,
    input_tokens, output_tokens, ...). Rows with a null `parsed` are skipped (they are failures,
    recorded elsewhere). The unique (task, task_version, unit_id) index is ensured first.

    Raises:
        LoadError: a `parsed` value is not valid JSON or a write failed; all other rows were
            written and `.receipt` has the details.
    """
    start = time.perf_counter()
    missing = [c for c in ("unit_id", "parsed") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {', '.join(missing)} to store results")
    ensure_results_index(collection)
    frame = rows.filter(pl.col("unit_id").is_not_null() & pl.col("parsed").is_not_null())
    if "attempt" in frame.columns:
        frame = frame.sort("attempt", maintain_order=True, nulls_last=False)
    frame = frame.unique(subset="unit_id", keep="last", maintain_order=True)
    tally = _BulkTally("mongo.results", _target(collection), run_id)
    tally.receipt.rows = frame.height
    tally.receipt.skipped = rows.height - frame.height
    at = datetime.now(UTC)
    units = [str(u) for u in frame["unit_id"].to_list()]
    parsed = frame["parsed"].to_list()
    companies = _column(frame, "company_id")
    documents = _column(frame, "document_id")
    raw = _column(frame, "raw_text")
    models = _column(frame, "model")
    batch_ids = _column(frame, "batch_id")
    attempts = _column(frame, "attempt")
    custom_ids = _column(frame, "custom_id")
    usage = _usage(frame)
    for lo in range(0, len(units), batch_size):
        ops: list[UpdateOne] = []
        op_units: list[str] = []
        for i in range(lo, min(lo + batch_size, len(units))):
            try:
                result = json.loads(parsed[i]) if isinstance(parsed[i], str) else parsed[i]
            except json.JSONDecodeError as exc:
                tally.error(units[i], "bad_parsed_json", f"parsed output is not JSON: {exc}")
                continue
            doc: dict[str, Any] = {
                "result": result,
                "model": models[i],
                "run_id": run_id,
                "batch_id": batch_ids[i],
                "company_id": companies[i],
                "document_id": documents[i],
                "usage": usage[i],
                "raw_text": raw[i],
                "at": at,
            }
            if attempts[i] is not None:
                doc["attempt"] = attempts[i]
            if custom_ids[i] is not None:
                doc["custom_id"] = custom_ids[i]
            ops.append(
                UpdateOne(
                    {"task": task, "task_version": task_version, "unit_id": units[i]},
                    {"$set": doc, "$unset": {"deleted_at": "", "deleted_by_run": ""}},
                    upsert=True,
                )
            )
            op_units.append(units[i])
        if ops:
            tally.run(collection, ops, op_units, retry_dup=True)
    return tally.finish(start)
