"""The synthetic corpus: determinism, realism, speed, and idempotent seeding."""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from batchyard.seed import generate_chunks, seed_store, targets_for
from batchyard.settings import MongoFields


def test_same_seed_same_corpus_other_seed_other_corpus() -> None:
    a = list(generate_chunks(800, seed=7))
    b = list(generate_chunks(800, seed=7))
    c = list(generate_chunks(800, seed=8))
    assert a == b
    assert [d["text"] for d in a] != [d["text"] for d in c]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 37, 1_000])
def test_exactly_n_chunks_with_unique_readable_ids(n: int) -> None:
    docs = list(generate_chunks(n, seed=1))
    assert len(docs) == n
    assert len({d["_id"] for d in docs}) == n
    for d in docs:
        assert d["_id"] == f"{d['company_id']}/{d['document_id']}/{d['chunk_index']:05d}"
        assert re.fullmatch(r"[a-z0-9-]+", d["company_id"])
        assert d["document_id"].startswith(d["company_id"] + "-")


def test_corpus_looks_like_company_filings() -> None:
    docs = list(generate_chunks(20_000, seed=3))
    lengths = sorted(len(d["text"]) for d in docs)
    n = len(lengths)
    in_band = sum(300 <= x <= 1_500 for x in lengths) / n
    assert in_band > 0.75, in_band  # mostly 300-1,500 characters
    assert 0.01 < sum(x < 100 for x in lengths) / n < 0.08  # a few headings
    assert 0.005 < sum(x > 2_500 for x in lengths) / n < 0.05  # a few long sections
    assert 500 < statistics.median(lengths) < 1_100

    companies = {d["company_id"] for d in docs}
    documents = {d["document_id"] for d in docs}
    assert len(companies) >= 100
    assert len(documents) >= 5 * len(companies) * 0.8
    kinds = Counter(d["doc_type"] for d in docs)
    assert {"10k", "10q", "ec", "pr", "esg", "ar"} <= set(kinds)
    assert len({d["ticker"] for d in docs}) == len(companies)  # tickers are unique

    texts = Counter(d["text"] for d in docs)
    boilerplate = [t for t, k in texts.items() if k >= 50]
    assert any("forward-looking statements" in t for t in boilerplate)
    assert sum(texts[t] for t in boilerplate) / n > 0.03

    assert sum(any(ord(ch) > 127 for ch in d["text"]) for d in docs) / n > 0.2
    assert any("€" in d["text"] for d in docs)
    assert any(re.search(r"[éèüöåøñçß]", d["company_name"]) for d in docs)
    assert any(re.search(r"\d+\.\d%", d["text"]) for d in docs)  # figures
    assert any(re.search(r"Q[1-4] 20\d\d", d["title"]) for d in docs)  # periods


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    count = sum(1 for _ in generate_chunks(20_000, seed=0))
    elapsed = time.perf_counter() - start
    assert count == 20_000
    assert elapsed < 5.0, f"20k chunks took {elapsed:.1f} s"


def test_custom_field_names_are_used() -> None:
    fields = MongoFields(chunk_id="uid", company="meta.company", document="doc", text="body")
    doc = next(generate_chunks(3, seed=0, fields=fields))
    assert doc["uid"] == doc["_id"]
    assert doc["meta"]["company"] == doc["_id"].split("/")[0]
    assert doc["doc"] == doc["_id"].split("/")[1]
    assert isinstance(doc["body"], str) and "text" not in doc


def test_n_companies_is_respected() -> None:
    docs = list(generate_chunks(300, seed=2, n_companies=4))
    assert len({d["company_id"] for d in docs}) == 4


def test_seed_store_is_idempotent_and_keeps_marks(chunks: Any) -> None:
    report = seed_store(chunks, 1_200, seed=5, batch_size=500)
    assert report.chunks == report.inserted == chunks.count_documents({}) == 1_200
    assert report.companies == len(report.catalog) == len(chunks.distinct("company_id"))
    assert report.documents == len(chunks.distinct("document_id"))
    chunks.update_one({}, {"$set": {"batchyard.space.text_sha256": "abc"}})

    again = seed_store(chunks, 1_200, seed=5, batch_size=500)
    assert again.inserted == 0 and again.updated == 0
    assert chunks.count_documents({}) == 1_200
    assert chunks.count_documents({"batchyard.space.text_sha256": "abc"}) == 1

    targets = targets_for(report)
    assert chunks.count_documents(targets.mongo_filter(MongoFields())) == 1_200
    whole = targets_for(report, all_documents=True)
    assert all(c.documents is None for c in whole.companies)


def test_seed_stamps_what_it_writes_and_only_restamps_changes(chunks: Any) -> None:
    """Every chunk gets its change date; a reseed leaves unchanged chunks (and their date) alone
    and re-stamps a chunk whose content differs from what is generated."""
    first, second, third = (datetime(2026, 3, d, 8, 0, 0, 123_000, tzinfo=UTC) for d in (1, 2, 3))
    report = seed_store(chunks, 400, seed=5, updated_at=first)
    assert report.updated_at == first
    assert {d["updated_at"] for d in chunks.find({}, {"updated_at": 1})} == {first.replace(tzinfo=None)}
    assert "batchyard_updated_at" in chunks.index_information()

    again = seed_store(chunks, 400, seed=5, updated_at=second)
    assert again.inserted == 0 and again.updated == 0
    assert chunks.count_documents({"updated_at": {"$gt": first}}) == 0

    victim = chunks.find_one({}, sort=[("_id", 1)])
    chunks.update_one({"_id": victim["_id"]}, {"$set": {"text": "edited by hand"}})
    restored = seed_store(chunks, 400, seed=5, updated_at=third)
    assert (restored.inserted, restored.updated) == (0, 1)
    assert [d["_id"] for d in chunks.find({"updated_at": {"$gte": third}})] == [victim["_id"]]
    assert chunks.find_one({"_id": victim["_id"]})["text"] == victim["text"]


def test_seed_without_a_change_field_writes_none() -> None:
    doc = next(generate_chunks(1, seed=0, fields=MongoFields(updated_at=None)))
    assert "updated_at" not in doc
    nested = next(generate_chunks(1, seed=0, fields=MongoFields(updated_at="meta.changed")))
    assert nested["meta"]["changed"].tzinfo is not None
