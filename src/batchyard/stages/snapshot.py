"""Snapshot: select the chunks a run must process from MongoDB, page by page.

This module reads MongoDB and yields Polars pages; the caller routes them to partitions and
writes them to staging. Memory stays flat however large the collection: each query is one `_id`
range (`{"_id": {"$gt": last}}` + the targets filter, sorted by `_id`, `limit(page_size)`,
projected to the fields needed), and each yielded page holds at most `page_size` chunks.

`_id` values of three BSON type brackets are scanned, in MongoDB's sort order: numbers (ints),
strings, then ObjectIds. A range query only matches its own bracket, so each bracket is paged on
its own. Non-integer numbers are rejected (`unsupported_id_type`); `_id`s of other types (UUIDs,
dates, documents) are not scanned at all (paging is always by `_id`, even when `fields.chunk_id`
names another field).

Selections:

- `iter_unprocessed_chunks`: embeddings. A chunk is unprocessed when it has no mark for the
  embedding space, or the sha256 of its text differs from the mark's `text_sha256`.
- `iter_chunks_for_task`: inference. A chunk unit is selected when the results collection has no
  result for (task, task_version, unit_id = chunk_id); with `unit="document"` a document is
  selected when there is no result for (task, task_version, unit_id = its document key, see
  `document_unit_id`), and all its chunks are yielded.
- `iter_orphans`: chunks of a targeted document that have no company: a targets filter cannot
  reach them by company, so they are looked up by document and rejected (`missing_company`).

Bad chunks are never fatal: each becomes a row of the rejects page (`FAILURES` schema,
stage "snapshot") with one of the `REJECT_CODES` and a message naming the chunk. A chunk id
that repeats in the source (possible with a custom `fields.chunk_id`) is caught after the whole
snapshot (`find_duplicates`): no copy is used, and each copy fails as `duplicate_chunk_id`.
Text containing NUL characters is valid: JSON carries it as `\\u0000`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from bson import ObjectId
from bson.codec_options import CodecOptions

from batchyard.schemas import CHUNKS, FAILURES, TIdKind
from batchyard.settings import MongoFields
from batchyard.targets import Targets

STAGE = "snapshot"
MAX_CHUNK_ID_BYTES = 512  # the Milvus VARCHAR primary key's max_length

REJECT_CODES = {
    "missing_text": "the text field is missing or null",
    "text_not_string": "the text field is not a string",
    "empty_text": "the text is empty or only whitespace",
    "lone_surrogate": "the text is not valid UTF-8 (lone surrogate / undecodable bytes)",
    "missing_company": "the company field is missing, empty or not a string",
    "missing_document": "the document field is missing, empty or not a string",
    "missing_chunk_id": "the chunk id field is missing or null",
    "unsupported_id_type": "the chunk id is not a string, an integer or an ObjectId",
    "chunk_id_too_long": f"the chunk id is longer than {MAX_CHUNK_ID_BYTES} UTF-8 bytes",
    "bad_chunk_index": "the chunk index is not an integer",
    "duplicate_chunk_id": "another chunk in the source has the same chunk id",
}

# (first-page lower bound, id kind of that bracket), in MongoDB's BSON sort order
_ID_BRACKETS: tuple[tuple[Any, str], ...] = (
    (-math.inf, "number"),
    ("", "string"),
    (ObjectId("000000000000000000000000"), "objectid"),
)


# --------------------------------------------------------------------------- ids and hashes


def text_sha256(text: str) -> str:
    """Hex sha256 of the text's UTF-8 bytes (the value stored in marks)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def id_kind(value: Any) -> TIdKind | None:
    """How a MongoDB id is turned into a `chunk_id` string (None: unsupported type)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, ObjectId):
        return "objectid"
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    return None


def mongo_id(chunk_id: str, kind: str) -> Any:
    """The original MongoDB id from a staged (`chunk_id`, `id_kind`) pair."""
    if kind == "str":
        return chunk_id
    if kind == "objectid":
        return ObjectId(chunk_id)
    if kind == "int":
        return int(chunk_id)
    raise ValueError(f"unknown id_kind {kind!r} for chunk {chunk_id!r}")


def get_path(doc: dict[str, Any], path: str, default: Any = None) -> Any:
    """`doc[a][b]` for the dotted path "a.b" (default when any step is missing)."""
    if "." not in path:
        return doc.get(path, default)
    cur: Any = doc
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return default
        cur = cur[key]
    return cur


def mark_path(fields: MongoFields, space: str) -> str:
    """Dotted path of a space's mark in a chunk document (`<marks>.<space>`)."""
    check_space(space)
    return f"{fields.marks}.{space}"


def check_space(space: str) -> None:
    """A space key must be usable as one MongoDB field name."""
    if not space or "." in space or space.startswith("$") or "\x00" in space:
        raise ValueError(f"invalid embedding space key {space!r} (no dots, no leading $)")


# --------------------------------------------------------------------------- classification


@dataclass
class _Page:
    """Rows collected for one yielded page."""

    chunks: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in CHUNKS})
    rejects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks["chunk_id"])

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        chunks = pl.DataFrame(self.chunks, schema=CHUNKS)
        rejects = (
            pl.DataFrame(self.rejects, schema=FAILURES, strict=False)
            if self.rejects
            else FAILURES.to_frame()
        )
        return chunks, rejects


@dataclass
class _Row:
    chunk_id: str
    source_id: str
    id_kind: str
    company_id: str
    document_id: str
    chunk_index: int | None
    text: str
    sha: str


def _reject(page: _Page, unit_id: str, code: str, message: str) -> None:
    page.rejects.append(
        {"unit_id": unit_id, "stage": STAGE, "code": code, "message": message, "attempt": 0}
    )


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _classify(doc: dict[str, Any], fields: MongoFields, page: _Page) -> _Row | None:
    """A valid row, or None after recording why the chunk is rejected."""
    raw_id = doc.get("_id") if fields.chunk_id == "_id" else get_path(doc, fields.chunk_id)
    ref = f"chunk _id={_describe(doc.get('_id'))}"
    if raw_id is None:
        _reject(page, str(doc.get("_id")), "missing_chunk_id",
                f"{ref}: field {fields.chunk_id!r} is missing or null")
        return None
    kind = id_kind(raw_id)
    if kind is None:
        _reject(page, str(raw_id), "unsupported_id_type",
                f"{ref}: {fields.chunk_id!r} is a {type(raw_id).__name__}; expected a string, "
                "an integer or an ObjectId")
        return None
    chunk_id = str(raw_id)
    ref = f"chunk {chunk_id!r} ({ref})" if fields.chunk_id != "_id" else f"chunk {chunk_id!r}"
    try:
        id_bytes = len(chunk_id.encode("utf-8"))
    except UnicodeEncodeError:
        _reject(page, chunk_id.encode("utf-8", "backslashreplace").decode(), "lone_surrogate",
                f"{ref}: the chunk id is not valid UTF-8")
        return None
    if id_bytes > MAX_CHUNK_ID_BYTES:
        _reject(page, chunk_id, "chunk_id_too_long",
                f"{ref}: id is {id_bytes} UTF-8 bytes; at most {MAX_CHUNK_ID_BYTES} allowed")
        return None

    text = get_path(doc, fields.text)
    if text is None:
        _reject(page, chunk_id, "missing_text", f"{ref}: field {fields.text!r} is missing or null")
        return None
    if not isinstance(text, str):
        _reject(page, chunk_id, "text_not_string",
                f"{ref}: field {fields.text!r} is a {type(text).__name__}, not a string")
        return None
    try:
        sha = text_sha256(text)
    except UnicodeEncodeError as exc:
        _reject(page, chunk_id, "lone_surrogate",
                f"{ref}: text is not valid UTF-8 (lone surrogate at character {exc.start})")
        return None
    if not text.strip():
        _reject(page, chunk_id, "empty_text", f"{ref}: text is empty or only whitespace")
        return None

    company = _string_field(doc, fields.company)
    if company is None:
        _reject(page, chunk_id, "missing_company",
                f"{ref}: field {fields.company!r} is missing, empty or not a string "
                f"(got {_describe(get_path(doc, fields.company))})")
        return None
    document = _string_field(doc, fields.document)
    if document is None:
        _reject(page, chunk_id, "missing_document",
                f"{ref}: field {fields.document!r} is missing, empty or not a string "
                f"(got {_describe(get_path(doc, fields.document))})")
        return None
    index = get_path(doc, fields.chunk_index)
    if index is not None:
        if isinstance(index, float) and index.is_integer():
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            _reject(page, chunk_id, "bad_chunk_index",
                    f"{ref}: field {fields.chunk_index!r} is {_describe(index)}, not an integer")
            return None
    return _Row(chunk_id, _describe(doc.get("_id")), kind, company, document, index, text, sha)


def _string_field(doc: dict[str, Any], path: str) -> str | None:
    value = get_path(doc, path)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return value
    return None


def _append(page: _Page, row: _Row) -> None:
    c = page.chunks
    c["chunk_id"].append(row.chunk_id)
    c["source_id"].append(row.source_id)
    c["id_kind"].append(row.id_kind)
    c["company_id"].append(row.company_id)
    c["document_id"].append(row.document_id)
    c["chunk_index"].append(row.chunk_index)
    c["text"].append(row.text)
    c["text_sha256"].append(row.sha)


# --------------------------------------------------------------------------- paging


def _reading_view(collection: Any) -> Any:
    """The collection decoding invalid UTF-8 into lone surrogates (rejected, not fatal)."""
    try:
        return collection.with_options(
            codec_options=CodecOptions(
                document_class=dict,
                tz_aware=True,
                unicode_decode_error_handler="surrogateescape",
            )
        )
    except (NotImplementedError, TypeError, AttributeError):  # mongomock
        return collection


def _and(*clauses: dict[str, Any]) -> dict[str, Any]:
    clauses = tuple(c for c in clauses if c)
    if not clauses:
        return {}
    if len(clauses) == 1:
        return clauses[0]
    return {"$and": list(clauses)}


def _with_bound(bound: dict[str, Any], query: dict[str, Any]) -> dict[str, Any]:
    if "_id" in query:
        return _and(bound, query)
    return {**query, **bound}


def iter_id_pages(
    collection: Any,
    query: dict[str, Any],
    projection: dict[str, Any],
    page_size: int,
) -> Iterator[list[dict[str, Any]]]:
    """Raw documents matching `query`, in `_id` order, `page_size` per `_id`-range query."""
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    view = _reading_view(collection)
    for lower, _bracket in _ID_BRACKETS:
        bound: dict[str, Any] = {"_id": {"$gte": lower}}
        while True:
            docs = list(
                view.find(_with_bound(bound, query), projection)
                .sort("_id", 1)
                .limit(page_size)
                .batch_size(page_size)
            )
            if not docs:
                break
            yield docs
            if len(docs) < page_size:
                break
            bound = {"_id": {"$gt": docs[-1]["_id"]}}


def _projection(fields: MongoFields, extra: Iterable[str] = ()) -> dict[str, int]:
    keys = [fields.company, fields.document, fields.chunk_index, fields.text, *extra]
    if fields.chunk_id != "_id":
        keys.append(fields.chunk_id)
    proj: dict[str, int] = {}
    for key in keys:
        # a parent path covers its children; MongoDB rejects both in one projection
        if any(key.startswith(k + ".") for k in proj):
            continue
        for k in [k for k in proj if k.startswith(key + ".")]:
            del proj[k]
        proj[key] = 1
    return proj


class _Selector:
    """Classifies raw pages into yielded (chunks, rejects) pages of at most `page_size` chunks."""

    def __init__(self, fields: MongoFields, page_size: int) -> None:
        self.fields = fields
        self.page_size = page_size
        self.page = _Page()

    def add(self, docs: list[dict[str, Any]], keep: Any,
            current: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        rows: list[_Row] = []
        for doc in docs:
            if current is not None and current(doc):
                continue
            row = _classify(doc, self.fields, self.page)
            if row is not None:
                rows.append(row)
        for row, wanted in zip(rows, keep(rows, docs), strict=True):
            if wanted:
                _append(self.page, row)
                if self.page.n_chunks >= self.page_size:
                    yield self.flush()
        if len(self.page.rejects) >= self.page_size:
            yield self.flush()

    def flush(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        frames = self.page.frames()
        self.page = _Page()
        return frames

    def finish(self) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        if self.page.n_chunks or self.page.rejects:
            yield self.flush()


def iter_unprocessed_chunks(
    collection: Any,
    targets: Targets | None,
    fields: MongoFields,
    *,
    space: str,
    page_size: int,
    extra: dict[str, Any] | None = None,
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """Pages of (chunks without a current mark for `space`, rejects).

    `chunks` has exactly the `CHUNKS` columns; `rejects` the `FAILURES` columns with stage
    "snapshot". Pages hold at most `page_size` chunks; nothing is yielded when nothing is
    selected or rejected. `targets=None` scans the whole collection; `extra` narrows the read
    (the changes of a company, see `batchyard.corpus.detect`).
    """
    sha_path = f"{mark_path(fields, space)}.text_sha256"
    query = _and(targets.mongo_filter(fields) if targets is not None else {}, extra or {})
    projection = _projection(fields, [sha_path])
    selector = _Selector(fields, page_size)

    def keep(rows: list[_Row], docs: list[dict[str, Any]]) -> list[bool]:
        by_id = {}
        for doc in docs:
            raw = doc.get("_id") if fields.chunk_id == "_id" else get_path(doc, fields.chunk_id)
            by_id[str(raw)] = get_path(doc, sha_path)
        return [by_id.get(r.chunk_id) != r.sha for r in rows]

    def current(doc: dict[str, Any]) -> bool:
        # the fast path of a no-op run: a chunk whose mark matches its text's sha256 was valid
        # and embedded; it needs no validation, it is simply not selected
        mark = get_path(doc, sha_path)
        if mark is None:
            return False
        text = get_path(doc, fields.text)
        if not isinstance(text, str):
            return False
        try:
            return bool(mark == text_sha256(text))
        except UnicodeEncodeError:
            return False

    for docs in iter_id_pages(collection, query, projection, page_size):
        yield from selector.add(docs, keep, current)
    yield from selector.finish()


def iter_chunks_for_task(
    chunks: Any,
    results: Any,
    targets: Targets | None,
    fields: MongoFields,
    *,
    task: str,
    task_version: str,
    unit: str,
    page_size: int,
    extra: dict[str, Any] | None = None,
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """Pages of (chunks whose unit has no result for task@task_version, rejects).

    `unit="chunk"`: a chunk is selected when no result has unit_id == its chunk_id.
    `unit="document"`: a document is selected when no result has unit_id == its document_id;
    every chunk of a selected document is yielded (in `_id` order, possibly across pages).
    `extra` narrows which chunks (or, for documents, which documents) are considered; a
    considered document is still read whole. A result flagged deleted does not count.
    """
    if unit not in ("chunk", "document"):
        raise ValueError(f"unit must be 'chunk' or 'document', not {unit!r}")
    targets_query = targets.mongo_filter(fields) if targets is not None else {}
    query = _and(targets_query, extra or {})
    projection = _projection(fields)
    selector = _Selector(fields, page_size)
    key = {"task": task, "task_version": task_version}

    if unit == "chunk":

        def keep(rows: list[_Row], docs: list[dict[str, Any]]) -> list[bool]:
            ids = [r.chunk_id for r in rows]
            done = _done_units(results, key, ids)
            return [r.chunk_id not in done for r in rows]

        for docs in iter_id_pages(chunks, query, projection, page_size):
            yield from selector.add(docs, keep)
        yield from selector.finish()
        return

    pending = _documents_without_result(chunks, results, query, fields, key, page_size)
    for group in _groups(pending, max(1, min(page_size, 1_000))):
        companies = sorted({c for c, _ in group})
        documents = sorted({d for _, d in group})
        wanted = set(group)
        group_query = _and(
            targets_query,
            {fields.company: {"$in": companies}},
            {fields.document: {"$in": documents}},
        )

        for docs in iter_id_pages(chunks, group_query, projection, page_size):
            picked = [
                d
                for d in docs
                if (_string_field(d, fields.company), _string_field(d, fields.document)) in wanted
            ]
            yield from selector.add(picked, _keep_all)
    # chunks of a targeted company without a document belong to no document unit: rejected
    whole = [c.company_id for c in targets.companies if c.documents is None] if targets is not None else None
    no_doc: dict[str, Any] = {fields.document: {"$in": [None, ""]}}
    if whole is None or whole:
        no_doc_query = _and(query, no_doc) if whole is None else _and({fields.company: {"$in": whole}, **no_doc},
                                                                         extra or {})
        for docs in iter_id_pages(chunks, no_doc_query, projection, page_size):
            yield from selector.add(docs, _keep_all)
    yield from selector.finish()


def iter_orphans(
    collection: Any, targets: Targets, fields: MongoFields, *, page_size: int
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """Rejects for chunks of a targeted document that lack a company (no chunk is yielded).

    Such a chunk names a targeted document but no company, so no targets filter selects it by
    company; each one fails as `missing_company`, named, instead of vanishing from the run.
    """
    documents = sorted({d for c in targets.companies for d in (c.documents or [])})
    if not documents:
        return
    query = {fields.document: {"$in": documents}, fields.company: {"$in": [None, ""]}}
    selector = _Selector(fields, page_size)
    for docs in iter_id_pages(collection, query, _projection(fields), page_size):
        yield from selector.add(docs, _keep_all)
    yield from selector.finish()


def find_duplicates(chunks: pl.LazyFrame) -> pl.DataFrame:
    """Rows (chunk_id, source_id, company_id, document_id) whose chunk_id occurs more than once.

    `chunks` is the lazily scanned snapshot of a whole run; only two columns are read to find
    the repeated ids, so this stays cheap at millions of chunks.
    """
    repeated = chunks.group_by("chunk_id").agg(pl.len().alias("n")).filter(pl.col("n") > 1).select("chunk_id")
    return (
        chunks.join(repeated, on="chunk_id", how="semi")
        .select("chunk_id", "source_id", "company_id", "document_id")
        .sort("chunk_id", "source_id")
        .collect()
    )


def duplicate_failures(dups: pl.DataFrame) -> pl.DataFrame:
    """One `duplicate_chunk_id` failure per copy, naming every source document of that id."""
    if dups.height == 0:
        return FAILURES.to_frame()
    sources = dups.group_by("chunk_id").agg(pl.col("source_id").str.join(", ").alias("all"))
    return (
        dups.join(sources, on="chunk_id")
        .select(
            unit_id="chunk_id",
            stage=pl.lit(STAGE),
            code=pl.lit("duplicate_chunk_id"),
            message=pl.format(
                "chunk {} (_id={}): the same chunk id is carried by several source documents "
                "(_id {}); none of them is embedded until the ids are unique",
                pl.col("chunk_id"), pl.col("source_id"), pl.col("all"),
            ),
            attempt=pl.lit(0, pl.Int64),
            batch_id=pl.lit(None, pl.String),
            raw=pl.lit(None, pl.String),
        )
        .cast(FAILURES)  # type: ignore[arg-type]
    )


def _keep_all(rows: list[_Row], docs: list[dict[str, Any]]) -> list[bool]:
    return [True] * len(rows)


def _done_units(results: Any, key: dict[str, str], unit_ids: list[str]) -> set[str]:
    if not unit_ids:
        return set()
    cursor = results.find({**key, "unit_id": {"$in": unit_ids}, "deleted_at": None}, {"unit_id": 1, "_id": 0})
    return {d["unit_id"] for d in cursor}


def _documents_without_result(
    chunks: Any,
    results: Any,
    query: dict[str, Any],
    fields: MongoFields,
    key: dict[str, str],
    page_size: int,
) -> list[tuple[str, str]]:
    """(company, document) pairs of the targeted chunks with no result for their document unit."""
    from batchyard.tasks.units import document_unit_id

    pipeline: list[dict[str, Any]] = []
    if query:
        pipeline.append({"$match": query})
    pipeline.append({"$group": {"_id": {"c": f"${fields.company}", "d": f"${fields.document}"}}})
    pairs: list[tuple[str, str]] = []
    for rec in chunks.aggregate(pipeline, allowDiskUse=True):
        c, d = rec["_id"].get("c"), rec["_id"].get("d")
        if isinstance(c, str) and isinstance(d, str) and c and d:
            pairs.append((c, d))
    pairs.sort()
    pending: list[tuple[str, str]] = []
    for group in _groups(pairs, max(1, page_size)):
        done = _done_units(results, key, sorted({document_unit_id(c, d) for c, d in group}))
        pending.extend(p for p in group if document_unit_id(*p) not in done)
    return pending


def _groups(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
