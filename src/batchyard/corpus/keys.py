"""Partition keys: the same in every run of a scope (pure).

A key is a company id, percent-encoded so that it is one path segment (`acme-robotics`,
`Soci%C3%A9t%C3%A9%20G%C3%A9n%C3%A9rale`), or `company/NN` for a company split into a fixed number
of hash buckets (`globex/07`). A unit's bucket is a stable hash of its chunk id (or, for tasks
whose unit is a document, of `company/document`, so a document never straddles two keys).

The bucket count of a company is chosen once, the first time its scope sees it, from its chunk
count (`buckets_for`), and recorded in the corpus state: the key set never depends on run order
or on later growth.
"""

from __future__ import annotations

import hashlib
import math
from urllib.parse import quote, unquote

import polars as pl

HEADROOM = 0.9
"""A split company's buckets are sized to 90% of the cap, so hash imbalance keeps each under it."""

_SAFE = "-_.~@+=,;:!$*()'"


def encode_company(company: str) -> str:
    """A company id as one readable path segment (no `/`, `%` escaped)."""
    return quote(company, safe=_SAFE)


def decode_company(segment: str) -> str:
    """The company id of an encoded segment."""
    return unquote(segment)


def bucket_of(basis: str, buckets: int) -> int:
    """The stable hash bucket of a unit's hash basis (0 when there is one bucket)."""
    if buckets <= 1:
        return 0
    digest = hashlib.blake2b(basis.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def buckets_for(chunks: int, max_chunks: int) -> int:
    """How many buckets a company of `chunks` chunks is split into (1: not split)."""
    if max_chunks <= 0:
        raise ValueError("max_chunks must be positive")
    if chunks <= max_chunks:
        return 1
    return math.ceil(chunks / (max_chunks * HEADROOM))


def _width(buckets: int) -> int:
    return max(2, len(str(buckets - 1)))


def key_of(company: str, bucket: int, buckets: int) -> str:
    """The partition key of one bucket of a company (the company itself when not split)."""
    if buckets <= 1:
        return encode_company(company)
    return f"{encode_company(company)}/{bucket:0{_width(buckets)}d}"


def keys_of(company: str, buckets: int) -> list[str]:
    """Every partition key of a company, in bucket order."""
    return [key_of(company, b, buckets) for b in range(max(1, buckets))]


def company_of(key: str) -> str:
    """The company id a partition key belongs to."""
    return decode_company(key.split("/", 1)[0])


def key_file(key: str) -> str:
    """A file name for a key (`acme%2F07.json` for `acme/07`)."""
    return quote(key, safe=_SAFE) + ".json"


def key_expr(basis: pl.Expr, buckets: dict[str, int], company: str = "company_id") -> pl.Expr:
    """The `pkey` of each row: its company's key, or `company/NN` for split companies.

    `basis` is the hash basis (chunk id, or `company/document` for document units); `buckets`
    maps companies to their bucket counts (absent or 1: not split).
    """
    split = {c: b for c, b in buckets.items() if b > 1}
    if not split:
        return pl.col(company).map_elements(encode_company, return_dtype=pl.String)

    def one(row: dict[str, str]) -> str:
        n = split.get(row["company"], 1)
        return key_of(row["company"], bucket_of(row["basis"], n), n)

    return pl.struct(company=pl.col(company), basis=basis).map_elements(one, return_dtype=pl.String)
