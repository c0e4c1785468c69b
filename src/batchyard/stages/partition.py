"""Partitions: how a run splits its targets into units of work of bounded size.

A partition is what a task, a worker or a Dask process takes: it is snapshotted, planned,
collected and loaded on its own, so memory is bounded by a partition, not by the corpus.

- A company with more targeted chunks than `max_chunks` is split into `k` partitions by a
  stable hash of the chunk id (`bucket_of`), sized with 10% headroom so that hash imbalance
  keeps every bucket under the cap.
- Smaller companies are packed together, in targets order, into partitions of at most
  `max_chunks`. One partition per company would turn a corpus of 1,500 small companies into
  1,500 tiny batches (the Batch API allows 2,000 batch creations per hour); packing keeps
  shards full. A company is never split across packed partitions.

Sizing reads one aggregate per run: chunk counts per targeted company (and per document for
companies whose documents are listed), which also tells which targets match no chunk at all.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchyard.settings import MongoFields
    from batchyard.targets import Targets

HEADROOM = 0.9


@dataclass
class PartitionSpec:
    """One partition: the companies it covers, and its hash bucket for a split company."""

    id: str
    companies: list[str]
    chunks: int
    bucket: int | None = None
    buckets: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As stored in run.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartitionSpec:
        """From run.json."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def bucket_of(chunk_id: str, buckets: int) -> int:
    """The stable hash bucket of a chunk id (0 when there is one bucket)."""
    if buckets <= 1:
        return 0
    digest = hashlib.blake2b(chunk_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def plan_partitions(counts: dict[str, int], order: list[str], max_chunks: int) -> list[PartitionSpec]:
    """Partitions over the companies in `order` that have chunks (`counts`), each <= max_chunks.

    Pure: the same counts always give the same partitions.
    """
    if max_chunks <= 0:
        raise ValueError("max_chunks must be positive")
    specs: list[PartitionSpec] = []
    packed: list[str] = []
    packed_n = 0

    def new_id() -> str:
        return f"p{len(specs):04d}"

    def flush() -> None:
        nonlocal packed, packed_n
        if packed:
            specs.append(PartitionSpec(new_id(), packed, packed_n))
            packed, packed_n = [], 0

    for company in order:
        n = counts.get(company, 0)
        if n <= 0:
            continue
        if n > max_chunks:
            flush()
            k = math.ceil(n / (max_chunks * HEADROOM))
            for b in range(k):
                specs.append(PartitionSpec(new_id(), [company], math.ceil(n / k), bucket=b, buckets=k))
            continue
        if packed_n + n > max_chunks:
            flush()
        packed.append(company)
        packed_n += n
    flush()
    return specs


def size_targets(
    collection: Any, targets: Targets, fields: MongoFields
) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Chunk counts per targeted company, and per (company, document) for listed documents."""
    by_company: dict[str, int] = {}
    for rec in collection.aggregate(
        [{"$match": targets.mongo_filter(fields)}, {"$group": {"_id": f"${fields.company}", "n": {"$sum": 1}}}]
    ):
        key = rec["_id"]
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if isinstance(key, str):
            by_company[key] = by_company.get(key, 0) + int(rec["n"])
    listed = [c for c in targets.companies if c.documents is not None]
    by_document: dict[tuple[str, str], int] = {}
    if listed:
        match = {"$or": [{fields.company: c.company_id, fields.document: {"$in": c.documents}} for c in listed]}
        group = {"_id": {"c": f"${fields.company}", "d": f"${fields.document}"}, "n": {"$sum": 1}}
        for rec in collection.aggregate([{"$match": match}, {"$group": group}]):
            c, d = rec["_id"].get("c"), rec["_id"].get("d")
            by_document[(str(c), str(d))] = int(rec["n"])
    return by_company, by_document


def unmatched_targets(
    targets: Targets, by_company: dict[str, int], by_document: dict[tuple[str, str], int]
) -> list[str]:
    """Each target company or document that matched no chunk, as `company` or `company/document`."""
    out: list[str] = []
    for c in targets.companies:
        if c.documents is None:
            if not by_company.get(c.company_id):
                out.append(c.company_id)
            continue
        out += [f"{c.company_id}/{d}" for d in c.documents if not by_document.get((c.company_id, d))]
    return out
