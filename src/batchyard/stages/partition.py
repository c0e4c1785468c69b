"""Bins: how a run packs the partition keys it touches into units of work of bounded size.

A **partition key** (`batchyard.corpus.keys`) is stable across runs: a company, or one of a
fixed number of hash buckets of a large company (`globex/07`). A **bin** is run-local: the
keys one snapshot query, one plan and one lease cover, holding at most `max_chunks` of the
chunks the run reads (`candidates`). Memory is bounded by a bin, not by the corpus.

- A company whose candidates fit the cap goes whole into a bin (all its keys); small companies
  are packed together, in targets order (one bin per company would turn 1,500 small companies
  into 1,500 tiny batches, and the Batch API allows 2,000 batch creations an hour).
- A company split into buckets whose candidates exceed the cap gets one bin per bucket key;
  one source query fills them all.

Sizing reads one aggregate per run (`size_targets`): chunk counts per targeted company, and
per document for companies whose documents are listed (which also tells which targets match
no chunk at all).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from batchyard.corpus.keys import bucket_of, key_of, keys_of

if TYPE_CHECKING:
    from batchyard.settings import MongoFields
    from batchyard.targets import Targets

__all__ = ["PartitionSpec", "bucket_of", "plan_bins", "size_targets", "unmatched_targets"]


@dataclass
class PartitionSpec:
    """One bin of a run: its companies, the partition keys it covers, and their bucket counts."""

    id: str
    companies: list[str]
    chunks: int
    keys: list[str] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    """Bucket counts of the bin's split companies (absent: not split)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As stored in run.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartitionSpec:
        """From run.json."""
        data = dict(data)
        if isinstance(data.get("buckets"), int):  # runs staged before partition keys
            n, b = data.pop("buckets"), data.pop("bucket", None)
            data["buckets"] = {data["companies"][0]: n} if n > 1 else {}
            data["keys"] = [key_of(data["companies"][0], b or 0, n)] if n > 1 else list(data["companies"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def plan_bins(candidates: dict[str, int], order: list[str], buckets: dict[str, int],
              max_chunks: int) -> list[PartitionSpec]:
    """Bins over the companies in `order` with candidates, each about <= max_chunks.

    `buckets`: each company's recorded bucket count. Pure: the same input gives the same bins.
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
            keys = [k for c in packed for k in keys_of(c, buckets.get(c, 1))]
            split = {c: buckets[c] for c in packed if buckets.get(c, 1) > 1}
            specs.append(PartitionSpec(new_id(), packed, packed_n, keys=keys, buckets=split))
            packed, packed_n = [], 0

    for company in order:
        n = candidates.get(company, 0)
        if n <= 0:
            continue
        k = buckets.get(company, 1)
        if n > max_chunks and k > 1:
            flush()
            for b in range(k):
                specs.append(PartitionSpec(new_id(), [company], math.ceil(n / k), keys=[key_of(company, b, k)],
                                           buckets={company: k}))
            continue
        if packed and packed_n + n > max_chunks:
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
