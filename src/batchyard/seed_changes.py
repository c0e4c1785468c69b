"""Realistic changes to a seeded corpus, for tests and benchmarks of change detection.

Why. Change detection must be measured against what a source really does between two runs:
a few chunks edited in place, some deleted, a few appended to existing documents, and now and
then a whole document re-chunked under new ids (the old ids gone). Each helper does one of
these through plain pymongo calls (`find`, `bulk_write`, `insert_many`, `delete_many`), so it
works the same on a real MongoDB and on the stand-in, and stamps what it writes with `at` in
`fields.updated_at` (when the source has that field), as an ingestion pipeline would.

`collection` is a pymongo collection of chunks or a `DocumentStore` (its chunks). Which chunks
change is deterministic for `seed`. Every helper returns a `CorpusChange` naming the ids it
touched, so a test can check exactly what the pipeline did with them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import UpdateOne

from batchyard.clients.mongo import DocumentStore
from batchyard.seed import _get, _put, now_ms
from batchyard.settings import MongoFields

_ADDENDA = [
    "Subsequent to the end of the period, {name} completed the refinancing of its revolving credit facility.",
    "{name} restated the prior-period segment figures to reflect the new reporting structure.",
    "Management reaffirmed the full-year outlook and noted continued pricing discipline.",
    "The Board of {name} authorized an additional share repurchase program.",
    "An update on supply-chain resilience and inventory levels followed the quarter-end review.",
    "{name} announced a change in its reporting currency effective next fiscal year.",
]


@dataclass
class CorpusChange:
    """What one helper changed: ids edited, deleted and added (a re-chunk deletes and adds)."""

    at: datetime
    edited: list[Any] = field(default_factory=list)
    deleted: list[Any] = field(default_factory=list)
    added: list[Any] = field(default_factory=list)

    def merge(self, other: CorpusChange) -> CorpusChange:
        """Both changes as one (the later date)."""
        return CorpusChange(max(self.at, other.at), self.edited + other.edited,
                            self.deleted + other.deleted, self.added + other.added)


def _chunks(collection: Any) -> Any:
    return collection.chunks if isinstance(collection, DocumentStore) else collection


def pick_chunks(collection: Any, n: int, *, seed: int = 0, query: dict[str, Any] | None = None) -> list[Any]:
    """`n` chunk ids drawn at random (deterministic for `seed`) among those matching `query`.

    Reads the ids only (`find(query, {"_id": 1})`, answered from the indexes on the stand-in).
    """
    ids = sorted((d["_id"] for d in _chunks(collection).find(query or {}, {"_id": 1})), key=_order)
    return random.Random(seed).sample(ids, min(n, len(ids)))


def _order(value: Any) -> tuple[str, str]:
    return type(value).__name__, str(value)


def _ids(collection: Any, chunks: int | Iterable[Any], seed: int) -> list[Any]:
    return pick_chunks(collection, chunks, seed=seed) if isinstance(chunks, int) else list(chunks)


def edit_chunks(
    collection: Any, chunks: int | Iterable[Any], *, fields: MongoFields | None = None,
    seed: int = 0, at: datetime | None = None,
) -> CorpusChange:
    """Edit the text of `chunks` (ids, or how many to pick at random) and bump their change date.

    The edit is what a restatement does to a filing: a figure changes and a sentence is added.
    """
    f = fields or MongoFields()
    coll, stamp = _chunks(collection), at or now_ms()
    ids = _ids(collection, chunks, seed)
    rng = random.Random(f"edit:{seed}")
    ops, edited = [], []
    for doc in coll.find({"_id": {"$in": ids}}, {f.text: 1, "company_name": 1}):
        text = _restated(str(_get_or(doc, f.text, "")), rng)
        text += " " + rng.choice(_ADDENDA).format(name=doc.get("company_name", "The Company"))
        changes: dict[str, Any] = {f.text: text}
        if f.updated_at:
            changes[f.updated_at] = stamp
        ops.append(UpdateOne({"_id": doc["_id"]}, {"$set": changes}))
        edited.append(doc["_id"])
    if ops:
        coll.bulk_write(ops, ordered=False)
    return CorpusChange(stamp, edited=edited)


def _restated(text: str, rng: random.Random) -> str:
    """The text with one of its figures changed (or unchanged when it has none)."""
    figures = list(re.finditer(r"\d+\.\d", text))
    if not figures:
        return text
    m = rng.choice(figures)
    value = float(m.group()) * rng.uniform(0.9, 1.1)
    return f"{text[: m.start()]}{value:.1f}{text[m.end():]}"


def _get_or(doc: dict[str, Any], path: str, default: Any) -> Any:
    try:
        return _get(doc, path)
    except (KeyError, TypeError):
        return default


def delete_chunks(collection: Any, chunks: int | Iterable[Any], *, seed: int = 0) -> CorpusChange:
    """Delete `chunks` (ids, or how many to pick at random)."""
    ids = _ids(collection, chunks, seed)
    if ids:
        _chunks(collection).delete_many({"_id": {"$in": ids}})
    return CorpusChange(now_ms(), deleted=ids)


def add_chunks(
    collection: Any, n: int, *, fields: MongoFields | None = None, seed: int = 0, at: datetime | None = None,
) -> CorpusChange:
    """Append `n` new chunks to existing documents (drawn at random, deterministic for `seed`).

    Each new chunk copies its document's metadata from one of its chunks (not batchyard's
    marks), takes the next chunk index and the id `company/document/NNNNN`, and holds an
    addendum paragraph.
    """
    f = fields or MongoFields()
    coll, stamp = _chunks(collection), at or now_ms()
    rng = random.Random(f"add:{seed}")
    templates = list(coll.find({"_id": {"$in": pick_chunks(collection, n, seed=seed)}}))
    if not templates:
        return CorpusChange(stamp)
    next_index: dict[tuple[Any, Any], int] = {}
    new: list[dict[str, Any]] = []
    for i in range(n):
        template = templates[i % len(templates)]
        company, document = _get(template, f.company), _get(template, f.document)
        key = (company, document)
        if key not in next_index:
            next_index[key] = _last_index(coll, f, company, document) + 1
        index = next_index[key]
        next_index[key] += 1
        chunk_id = f"{company}/{document}/{index:05d}"
        text = " ".join(rng.choice(_ADDENDA).format(name=template.get("company_name", "The Company"))
                        for _ in range(rng.randint(2, 5)))
        new.append(_chunk_like(template, f, chunk_id, index, text, stamp))
    coll.insert_many(new, ordered=False)
    return CorpusChange(stamp, added=[d["_id"] for d in new])


def _last_index(coll: Any, f: MongoFields, company: Any, document: Any) -> int:
    last = list(coll.find({f.company: company, f.document: document}, {f.chunk_index: 1})
                .sort(f.chunk_index, -1).limit(1))
    return int(_get_or(last[0], f.chunk_index, -1)) if last else -1


def _chunk_like(template: dict[str, Any], f: MongoFields, chunk_id: str, index: int, text: str,
                stamp: datetime) -> dict[str, Any]:
    """A new chunk with the template's metadata (no marks) and its own id, index and text."""
    marks = f.marks.split(".", 1)[0]
    doc = {k: v for k, v in template.items() if k not in ("_id", marks)}
    doc["_id"] = chunk_id
    if f.chunk_id != "_id":
        _put(doc, f.chunk_id, chunk_id)
    _put(doc, f.chunk_index, index)
    _put(doc, f.text, text)
    if f.updated_at:
        _put(doc, f.updated_at, stamp)
    return doc


def rechunk_document(
    collection: Any, company: Any, document: Any, *, fields: MongoFields | None = None,
    at: datetime | None = None, target_chars: int = 1_600,
) -> CorpusChange:
    """Split a document's text again into chunks of about `target_chars` under new ids.

    The old chunks are deleted; the new ones are `company/document/r<ms>-NNNNN` (`<ms>`: the
    change date in epoch milliseconds, so re-chunking twice gives new ids again), split at
    sentence ends, numbered from 0, with the first old chunk's metadata.
    """
    f = fields or MongoFields()
    coll, stamp = _chunks(collection), at or now_ms()
    old = list(coll.find({f.company: company, f.document: document}).sort(f.chunk_index, 1))
    if not old:
        return CorpusChange(stamp)
    sentences = [s for d in old for s in re.split(r"(?<=[.!?])\s+", str(_get_or(d, f.text, ""))) if s]
    pieces, current = [], ""
    for sentence in sentences:
        if current and len(current) + len(sentence) > target_chars:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    revision = int(stamp.timestamp() * 1000)
    new = [_chunk_like(old[0], f, f"{company}/{document}/r{revision}-{i:05d}", i, text, stamp)
           for i, text in enumerate(pieces)]
    old_ids = [d["_id"] for d in old]
    coll.delete_many({"_id": {"$in": old_ids}})
    coll.insert_many(new, ordered=False)
    return CorpusChange(stamp, deleted=old_ids, added=[d["_id"] for d in new])


__all__ = ["CorpusChange", "add_chunks", "delete_chunks", "edit_chunks", "pick_chunks", "rechunk_document"]
