"""Snapshot: `_id`-range paging, marks, rejects, and task/unit selection."""

from __future__ import annotations

import hashlib
from typing import Any

import polars as pl
import pytest
from bson import ObjectId

from batchyard.schemas import CHUNKS, FAILURES
from batchyard.seed import seed_store, targets_for
from batchyard.settings import MongoFields
from batchyard.stages.load import mark_chunks, store_results
from batchyard.stages.snapshot import (
    REJECT_CODES,
    duplicate_failures,
    find_duplicates,
    iter_chunks_for_task,
    iter_id_pages,
    iter_unprocessed_chunks,
    mongo_id,
)
from batchyard.targets import CompanyTarget, Targets

SPACE = "text_embedding_3_small_256"


def _scan(coll: Any, fields: MongoFields, targets: Targets | None = None, page_size: int = 7) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    pages = list(iter_unprocessed_chunks(coll, targets, fields, space=SPACE, page_size=page_size))
    for chunks, rejects in pages:
        assert chunks.schema == CHUNKS
        assert rejects.schema == FAILURES
        assert chunks.height <= page_size
    chunks = pl.concat([p[0] for p in pages]) if pages else CHUNKS.to_frame()
    rejects = pl.concat([p[1] for p in pages]) if pages else FAILURES.to_frame()
    return chunks, rejects, len(pages)


def test_tiny_pages_return_every_chunk_once(chunks: Any, fields: MongoFields) -> None:
    seed_store(chunks, 230, seed=11)
    got, rejects, n_pages = _scan(chunks, fields, page_size=7)
    assert rejects.is_empty()
    assert got.height == 230
    assert got["chunk_id"].n_unique() == 230
    assert n_pages == -(-230 // 7)
    assert got["chunk_id"].to_list() == sorted(got["chunk_id"].to_list())  # _id order
    row = got.row(0, named=True)
    source = chunks.find_one({"_id": row["chunk_id"]})
    assert row["text"] == source["text"]
    assert row["text_sha256"] == hashlib.sha256(source["text"].encode()).hexdigest()
    assert row["id_kind"] == "str"
    assert row["chunk_index"] == source["chunk_index"]


def test_marks_empty_the_next_scan_and_changed_text_reappears(chunks: Any, fields: MongoFields) -> None:
    seed_store(chunks, 120, seed=4)
    first, _, _ = _scan(chunks, fields)
    receipt = mark_chunks(chunks, first, fields=fields, space=SPACE, run_id="r1", batch_size=50)
    assert receipt.matched == 120 and receipt.error_count == 0

    second, rejects, n_pages = _scan(chunks, fields)
    assert second.is_empty() and rejects.is_empty() and n_pages == 0

    # another space is independent
    other = list(iter_unprocessed_chunks(chunks, None, fields, space="other_space", page_size=50))
    assert sum(p[0].height for p in other) == 120

    changed = first["chunk_id"][17]
    chunks.update_one({"_id": changed}, {"$set": {"text": "Revenue was restated to €1.2 billion."}})
    third, _, _ = _scan(chunks, fields)
    assert third["chunk_id"].to_list() == [changed]
    assert third["text_sha256"][0] == hashlib.sha256("Revenue was restated to €1.2 billion.".encode()).hexdigest()


def test_targets_limit_the_scan(chunks: Any, fields: MongoFields) -> None:
    report = seed_store(chunks, 300, seed=9)
    company, docs = next(iter(report.catalog.items()))
    other = list(report.catalog)[1]
    targets = Targets(
        companies=[CompanyTarget(company_id=company, documents=docs[:2]), CompanyTarget(company_id=other)]
    )
    got, _, _ = _scan(chunks, fields, targets, page_size=5)
    expected = chunks.count_documents(targets.mongo_filter(fields))
    assert got.height == expected > 0
    assert set(got["company_id"]) == {company, other}
    assert set(got.filter(pl.col("company_id") == company)["document_id"]) == set(docs[:2])
    all_targets = targets_for(report)
    assert _scan(chunks, fields, all_targets, page_size=50)[0].height == 300


def test_int_objectid_and_string_ids_are_all_scanned(chunks: Any, fields: MongoFields) -> None:
    oid = ObjectId()
    ids: list[Any] = [3, 11, 2**40, "a/b/1", "zz", oid, ObjectId()]
    chunks.insert_many(
        [{"_id": i, "company_id": "c", "document_id": "d", "chunk_index": n, "text": f"t{n}"} for n, i in enumerate(ids)]
    )
    got, rejects, _ = _scan(chunks, fields, page_size=2)
    assert rejects.is_empty()
    assert got.height == len(ids)
    kinds = dict(zip(got["chunk_id"], got["id_kind"], strict=True))
    assert kinds["3"] == "int" and kinds["a/b/1"] == "str" and kinds[str(oid)] == "objectid"
    for cid, kind in kinds.items():
        assert chunks.count_documents({"_id": mongo_id(cid, kind)}) == 1


def test_every_reject_kind_has_its_code_and_names_the_chunk(chunks: Any, fields: MongoFields) -> None:
    good = {"company_id": "acme", "document_id": "acme-10k", "chunk_index": 1, "text": "fine"}
    chunks.insert_many(
        [
            {"_id": "ok-1", **good},
            {"_id": "no-text", **{k: v for k, v in good.items() if k != "text"}},
            {"_id": "null-text", **good, "text": None},
            {"_id": "int-text", **good, "text": 42},
            {"_id": "nul", **good, "text": "a\x00b"},
            {"_id": "blank", **good, "text": " \n\t"},
            {"_id": "no-company", **{k: v for k, v in good.items() if k != "company_id"}},
            {"_id": "no-document", **good, "document_id": ""},
            {"_id": "bad-index", **good, "chunk_index": "three"},
            {"_id": "x" * 600, **good},
            {"_id": 2.5, **good},
            {"_id": "ok-2", **good},
        ]
    )
    # invalid UTF-8 from a real server decodes (surrogateescape) to a lone surrogate;
    # mongomock refuses to store one, so put it straight into its store
    chunks._store["surrogate"] = {"_id": "surrogate", **good, "text": "caf\udce9"}

    got, rejects, _ = _scan(chunks, fields, page_size=3)
    # NUL is valid text: JSON carries it as \\u0000 and the Batch API accepts it
    assert sorted(got["chunk_id"]) == ["nul", "ok-1", "ok-2"]
    codes = dict(zip(rejects["unit_id"], rejects["code"], strict=True))
    assert codes == {
        "no-text": "missing_text",
        "null-text": "missing_text",
        "int-text": "text_not_string",
        "blank": "empty_text",
        "no-company": "missing_company",
        "no-document": "missing_document",
        "bad-index": "bad_chunk_index",
        "x" * 600: "chunk_id_too_long",
        "2.5": "unsupported_id_type",
        "surrogate": "lone_surrogate",
    }
    assert set(codes.values()) <= set(REJECT_CODES)
    assert set(rejects["stage"]) == {"snapshot"}
    messages = dict(zip(rejects["unit_id"], rejects["message"], strict=True))
    assert "int" in messages["int-text"] and "'int-text'" in messages["int-text"]
    for unit, message in messages.items():
        assert repr(unit)[:20] in message or unit == "2.5"


def test_duplicate_chunk_ids_in_a_custom_id_field(chunks: Any) -> None:
    fields = MongoFields(chunk_id="uid")
    base = {"company_id": "acme", "document_id": "d", "text": "t"}
    chunks.insert_many(
        [
            {"_id": 1, "uid": "u-1", **base},
            {"_id": 2, "uid": "u-2", **base},
            {"_id": 3, "uid": "u-1", **base},
            {"_id": 4, **base},
        ]
    )
    got, rejects, _ = _scan(chunks, fields, page_size=1)
    assert got["chunk_id"].to_list() == ["u-1", "u-2", "u-1"]
    assert dict(zip(rejects["unit_id"], rejects["code"], strict=True)) == {"4": "missing_chunk_id"}
    # the whole snapshot is checked afterwards: no copy of a repeated id is kept, each one fails
    dups = find_duplicates(got.lazy())
    assert dups.select("chunk_id", "source_id").rows() == [("u-1", "1"), ("u-1", "3")]
    failures = duplicate_failures(dups)
    assert failures["code"].to_list() == ["duplicate_chunk_id"] * 2
    assert all("(_id 1, 3)" in m for m in failures["message"])
    # marks go through the custom id field
    unique = got.filter(pl.col("chunk_id") == "u-2")
    mark_chunks(chunks, unique, fields=fields, space=SPACE, run_id="r", batch_size=10)
    assert chunks.count_documents({f"batchyard.{SPACE}.run_id": "r"}) == 1


def test_pages_are_projected(chunks: Any, fields: MongoFields) -> None:
    chunks.insert_one({"_id": "a", "company_id": "c", "document_id": "d", "text": "t", "big": "x" * 1000})
    (page,) = iter_id_pages(chunks, {}, {"text": 1}, 10)
    assert page == [{"_id": "a", "text": "t"}]


def _result_rows(units: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "unit_id": units,
            "company_id": ["c"] * len(units),
            "document_id": ["d"] * len(units),
            "parsed": ['{"label": "x"}'] * len(units),
            "raw_text": ['{"label": "x"}'] * len(units),
            "model": ["m"] * len(units),
            "batch_id": ["b"] * len(units),
        }
    )


def test_chunk_units_without_a_result(chunks: Any, results: Any, fields: MongoFields) -> None:
    seed_store(chunks, 60, seed=2)
    ids = [d["_id"] for d in chunks.find({}, {"_id": 1}).sort("_id", 1)]
    store_results(results, _result_rows(ids[:25]), task="sentiment", task_version="1", run_id="r", batch_size=10)
    pages = list(
        iter_chunks_for_task(chunks, results, None, fields, task="sentiment", task_version="1", unit="chunk", page_size=8)
    )
    got = pl.concat([p[0] for p in pages])
    assert got["chunk_id"].to_list() == ids[25:]
    # another version of the task has no results yet
    pages = list(
        iter_chunks_for_task(chunks, results, None, fields, task="sentiment", task_version="2", unit="chunk", page_size=8)
    )
    assert sum(p[0].height for p in pages) == 60


def test_document_units_select_whole_documents(chunks: Any, results: Any, fields: MongoFields) -> None:
    from batchyard.tasks.units import document_unit_id

    report = seed_store(chunks, 400, seed=6, n_companies=3)
    all_docs = [d for docs in report.catalog.values() for d in docs]
    done = all_docs[::2]
    company_of = {d: c for c, docs in report.catalog.items() for d in docs}
    done_units = [document_unit_id(company_of[d], d) for d in done]
    store_results(results, _result_rows(done_units), task="summary", task_version="v1", run_id="r", batch_size=10)
    pages = list(
        iter_chunks_for_task(chunks, results, None, fields, task="summary", task_version="v1", unit="document", page_size=6)
    )
    got = pl.concat([p[0] for p in pages])
    assert all(p[0].height <= 6 for p in pages)
    assert set(got["document_id"]) == set(all_docs) - set(done)
    expected = chunks.count_documents({"document_id": {"$nin": done}})
    assert got.height == expected == got["chunk_id"].n_unique()

    targets = Targets(companies=[CompanyTarget(company_id=next(iter(report.catalog)))])
    pages = list(
        iter_chunks_for_task(chunks, results, targets, fields, task="summary", task_version="v1", unit="document", page_size=50)
    )
    assert set(pl.concat([p[0] for p in pages])["company_id"]) == {targets.company_ids[0]}


def test_unit_must_be_chunk_or_document(chunks: Any, results: Any, fields: MongoFields) -> None:
    with pytest.raises(ValueError, match="unit must be"):
        list(iter_chunks_for_task(chunks, results, None, fields, task="t", task_version="1", unit="page", page_size=5))
