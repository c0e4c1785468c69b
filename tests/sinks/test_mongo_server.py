"""The snapshot -> mark / store path against a REAL MongoDB server.

Runs only when `BATCHYARD_TEST_MONGO_URI` names a server (e.g. `mongodb://127.0.0.1:27017`);
each test works in its own throw-away database, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest
from bson import ObjectId
from bson.raw_bson import RawBSONDocument
from pydantic import SecretStr

from batchyard.clients.mongo import DocumentStore, open_document_store
from batchyard.seed import seed_store, targets_for
from batchyard.settings import MongoFields, MongoSettings
from batchyard.stages.load import LoadError, mark_chunks, store_results
from batchyard.stages.snapshot import iter_chunks_for_task, iter_unprocessed_chunks

URI_ENV = "BATCHYARD_TEST_MONGO_URI"
SPACE = "server_test_space_8"

pytestmark = [
    pytest.mark.mongo_server,
    pytest.mark.skipif(
        not os.environ.get(URI_ENV),
        reason="set BATCHYARD_TEST_MONGO_URI to run against a real MongoDB server",
    ),
]


@pytest.fixture
def store(tmp_path: Any) -> Iterator[DocumentStore]:
    settings = MongoSettings(
        uri=SecretStr(os.environ[URI_ENV]), database=f"batchyard_test_{uuid.uuid4().hex[:12]}"
    )
    s = open_document_store(settings, standin_dir=str(tmp_path))
    assert not s.is_standin
    s.ping()
    try:
        yield s
    finally:
        s.client.drop_database(settings.database)
        s.close()


def _scan(coll: Any, targets: Any = None, page_size: int = 50) -> tuple[pl.DataFrame, pl.DataFrame]:
    pages = list(iter_unprocessed_chunks(coll, targets, MongoFields(), space=SPACE, page_size=page_size))
    if not pages:
        return pl.DataFrame(), pl.DataFrame()
    return pl.concat([p[0] for p in pages]), pl.concat([p[1] for p in pages])


def test_snapshot_mark_rescan_on_a_server(store: DocumentStore) -> None:
    fields = MongoFields()
    report = seed_store(store, 500, seed=3, batch_size=120)
    assert report.inserted == 500
    assert seed_store(store, 500, seed=3, batch_size=120).inserted == 0

    chunks, rejects = _scan(store.chunks, targets_for(report), page_size=33)
    assert chunks.height == 500 and chunks["chunk_id"].n_unique() == 500 and rejects.is_empty()

    receipt = mark_chunks(store.chunks, chunks, fields=fields, space=SPACE, run_id="r1", batch_size=64)
    assert (receipt.matched, receipt.modified, receipt.upserted) == (500, 500, 0)
    assert _scan(store.chunks)[0].height == 0

    changed = chunks["chunk_id"][123]
    store.chunks.update_one({"_id": changed}, {"$set": {"text": "Umsatz: 4,2 Mrd. € (restated)"}})
    assert _scan(store.chunks)[0]["chunk_id"].to_list() == [changed]


def test_mixed_ids_and_rejects_on_a_server(store: DocumentStore) -> None:
    base = {"company_id": "acme", "document_id": "d", "chunk_index": 0}
    oid = ObjectId()
    store.chunks.insert_many(
        [
            {"_id": 5, **base, "text": "int id"},
            {"_id": "s", **base, "text": "string id"},
            {"_id": oid, **base, "text": "objectid id"},
            {"_id": "nul", **base, "text": "a\x00b"},
            {"_id": "num-text", **base, "text": 1.5},
        ]
    )
    # a string that is not valid UTF-8, as other drivers can store it
    bad = b"\x02text\x00\x05\x00\x00\x00caf\xe9\x00"
    body = (
        b"\x02_id\x00\x09\x00\x00\x00bad-utf8\x00"
        + b"\x02company_id\x00\x05\x00\x00\x00acme\x00"
        + b"\x02document_id\x00\x02\x00\x00\x00d\x00"
        + bad
    )
    raw = len(body) + 5
    try:
        store.chunks.insert_one(RawBSONDocument(raw.to_bytes(4, "little") + body + b"\x00"))
        has_bad = True
    except Exception:  # a server that validates UTF-8
        has_bad = False
    chunks, rejects = _scan(store.chunks, page_size=2)
    assert sorted(chunks["chunk_id"]) == sorted(["5", "s", str(oid)])
    codes = dict(zip(rejects["unit_id"], rejects["code"], strict=True))
    assert codes["nul"] == "nul_in_text" and codes["num-text"] == "text_not_string"
    if has_bad:
        assert codes["bad-utf8"] == "lone_surrogate"
    mark_chunks(store.chunks, chunks, fields=MongoFields(), space=SPACE, run_id="r", batch_size=10)
    assert store.chunks.count_documents({f"batchyard.{SPACE}.run_id": "r"}) == 3


def test_results_and_document_units_on_a_server(store: DocumentStore) -> None:
    report = seed_store(store, 200, seed=8, n_companies=2)
    docs = [d for ds in report.catalog.values() for d in ds]
    done = docs[::3]
    rows = pl.DataFrame(
        {
            "unit_id": done,
            "company_id": ["x"] * len(done),
            "document_id": done,
            "parsed": ['{"summary": "ok"}'] * len(done),
            "raw_text": ["ok"] * len(done),
            "model": ["m"] * len(done),
            "batch_id": ["b"] * len(done),
            "total_tokens": [10] * len(done),
        }
    )
    first = store_results(store.results, rows, task="summary", task_version="1", run_id="r1", batch_size=7)
    again = store_results(store.results, rows, task="summary", task_version="1", run_id="r2", batch_size=7)
    assert first.upserted == len(done) and again.upserted == 0 and again.matched == len(done)
    assert store.results.count_documents({}) == len(done)

    pages = list(
        iter_chunks_for_task(
            store.chunks, store.results, None, MongoFields(),
            task="summary", task_version="1", unit="document", page_size=16,
        )
    )
    got = pl.concat([p[0] for p in pages])
    assert set(got["document_id"]) == set(docs) - set(done)
    assert got.height == store.chunks.count_documents({"document_id": {"$nin": done}})


def test_write_errors_are_reported_on_a_server(store: DocumentStore) -> None:
    store.chunks.insert_many([{"_id": f"c{i}", "text": "t"} for i in range(4)])
    store.chunks.create_index(f"batchyard.{SPACE}.text_sha256", unique=True, sparse=True)
    rows = pl.DataFrame(
        {"chunk_id": ["c0", "c1", "c2", "c3"], "id_kind": ["str"] * 4, "text_sha256": ["a", "a", "b", "b"]}
    )
    with pytest.raises(LoadError) as info:
        mark_chunks(store.chunks, rows, fields=MongoFields(), space=SPACE, run_id="r", batch_size=10)
    assert info.value.receipt.error_count == 2
    assert {e["code"] for e in info.value.receipt.errors} == {11000}
