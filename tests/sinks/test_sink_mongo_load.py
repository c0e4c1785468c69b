"""MongoDB sinks: chunk marks and inference results, idempotent, with write errors reported."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import pytest
from bson import ObjectId

from batchyard.settings import MongoFields
from batchyard.stages.load import LoadError, mark_chunks, store_results

SPACE = "text_embedding_3_small_256"


def _chunk_rows(ids: list[Any]) -> pl.DataFrame:
    kinds = {str: "str", int: "int", ObjectId: "objectid"}
    return pl.DataFrame(
        {
            "chunk_id": [str(i) for i in ids],
            "id_kind": [kinds[type(i)] for i in ids],
            "text_sha256": [f"sha-{i}" for i in ids],
        }
    )


def test_mark_chunks_sets_the_mark_and_reruns_insert_nothing(chunks: Any, fields: MongoFields) -> None:
    ids: list[Any] = [f"c{i}" for i in range(1, 8)] + [7, 12, ObjectId(), ObjectId()]
    chunks.insert_many([{"_id": i, "text": "t", "batchyard": {"other_space": {"text_sha256": "keep"}}} for i in ids])
    rows = _chunk_rows([*ids, "gone"])  # "gone" was deleted since the snapshot
    receipt = mark_chunks(chunks, rows, fields=fields, space=SPACE, run_id="run-1", batch_size=4)
    assert receipt.sink == "mongo.marks" and receipt.target == "batchyard_test.chunks"
    assert (receipt.rows, receipt.matched, receipt.modified, receipt.upserted) == (12, 11, 11, 0)
    assert receipt.batches == 3 and receipt.error_count == 0

    doc = chunks.find_one({"_id": ids[-1]})
    mark = doc["batchyard"][SPACE]
    assert mark["text_sha256"] == f"sha-{ids[-1]}" and mark["run_id"] == "run-1" and mark["at"]
    assert doc["batchyard"]["other_space"] == {"text_sha256": "keep"}  # other spaces untouched
    assert chunks.find_one({"_id": 7})["batchyard"][SPACE]["text_sha256"] == "sha-7"

    again = mark_chunks(chunks, rows, fields=fields, space=SPACE, run_id="run-2", batch_size=100)
    assert (again.matched, again.upserted) == (11, 0)
    assert chunks.count_documents({}) == 11  # nothing inserted, "gone" stays gone
    assert chunks.count_documents({f"batchyard.{SPACE}.run_id": "run-2"}) == 11


def test_mark_chunks_reports_write_errors_and_applies_the_rest(chunks: Any, fields: MongoFields) -> None:
    chunks.insert_many([{"_id": f"c{i}", "text": "t"} for i in range(1, 6)])
    # force per-operation failures: two chunks may not share a text_sha256 mark
    chunks.create_index(f"batchyard.{SPACE}.text_sha256", unique=True, sparse=True)
    rows = pl.DataFrame(
        {
            "chunk_id": ["c1", "c2", "c3", "c4", "c5"],
            "id_kind": ["str"] * 5,
            "text_sha256": ["a", "b", "a", "c", "b"],
        }
    )
    with pytest.raises(LoadError) as info:
        mark_chunks(chunks, rows, fields=fields, space=SPACE, run_id="r", batch_size=10)
    receipt = info.value.receipt
    assert receipt.error_count == 2
    assert {e["unit_id"] for e in receipt.errors} == {"c3", "c5"}
    assert all(e["code"] == 11000 for e in receipt.errors)
    assert receipt.matched == 3
    assert "2 of 5 operation(s) failed" in str(info.value)
    assert chunks.count_documents({f"batchyard.{SPACE}": {"$exists": True}}) == 3


def test_mark_chunks_rejects_an_unusable_space(chunks: Any, fields: MongoFields) -> None:
    with pytest.raises(ValueError, match="invalid embedding space"):
        mark_chunks(chunks, _chunk_rows(["a"]), fields=fields, space="a.b", run_id="r", batch_size=1)


def _results(units: list[str], *, label: str = "positive") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "unit_id": units,
            "company_id": ["acme"] * len(units),
            "document_id": ["acme-10k-2025"] * len(units),
            "parsed": [json.dumps({"label": label, "score": 0.9, "quote": "€ ünïcode"})] * len(units),
            "raw_text": [f"raw {label}"] * len(units),
            "model": ["gpt-4.1-mini"] * len(units),
            "batch_id": ["batch_1"] * len(units),
            "prompt_tokens": [100] * len(units),
            "completion_tokens": [20] * len(units),
            "total_tokens": [120] * len(units),
        }
    )


def test_store_results_upserts_once_per_unit(results: Any) -> None:
    units = [f"acme/acme-10k-2025/{i:05d}" for i in range(23)]
    receipt = store_results(results, _results(units), task="sentiment", task_version="1", run_id="r1", batch_size=10)
    assert (receipt.rows, receipt.upserted, receipt.matched) == (23, 23, 0)
    assert receipt.batches == 3 and receipt.sink == "mongo.results"
    doc = results.find_one({"unit_id": units[4]})
    assert doc["task"] == "sentiment" and doc["task_version"] == "1"
    assert doc["result"] == {"label": "positive", "score": 0.9, "quote": "€ ünïcode"}
    assert doc["usage"] == {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    assert doc["model"] == "gpt-4.1-mini" and doc["batch_id"] == "batch_1" and doc["run_id"] == "r1"
    assert doc["company_id"] == "acme" and doc["document_id"] == "acme-10k-2025" and doc["raw_text"] == "raw positive"
    assert doc["at"] is not None

    again = store_results(results, _results(units, label="negative"), task="sentiment", task_version="1", run_id="r2", batch_size=10)
    assert (again.upserted, again.matched, again.modified) == (0, 23, 23)
    assert results.count_documents({}) == 23
    assert results.find_one({"unit_id": units[4]})["result"]["label"] == "negative"

    other = store_results(results, _results(units[:5]), task="sentiment", task_version="2", run_id="r3", batch_size=10)
    assert other.upserted == 5
    assert results.count_documents({}) == 28
    assert "batchyard_task_unit" in results.index_information()


def test_store_results_skips_failures_and_reports_bad_json(results: Any) -> None:
    rows = pl.DataFrame(
        {
            "unit_id": ["u1", "u2", "u3", "u3"],
            "parsed": ['{"a": 1}', None, "{not json", '{"a": 3}'],
            "attempt": [1, 1, 1, 2],
            "usage": ['{"input_tokens": 5}', None, None, '{"input_tokens": 7}'],
        }
    )
    receipt = store_results(results, rows, task="t", task_version="1", run_id="r", batch_size=10)
    # u2 has no output; u3's first (unparsable) attempt is superseded by its second
    assert (receipt.rows, receipt.skipped, receipt.upserted, receipt.error_count) == (2, 2, 2, 0)
    assert results.find_one({"unit_id": "u1"})["usage"] == {"input_tokens": 5}
    assert results.find_one({"unit_id": "u3"})["result"] == {"a": 3}

    bad = pl.DataFrame({"unit_id": ["u9"], "parsed": ["{oops"]})
    with pytest.raises(LoadError, match="bad_parsed_json"):
        store_results(results, bad, task="t", task_version="1", run_id="r", batch_size=10)
    assert results.find_one({"unit_id": "u9"}) is None
