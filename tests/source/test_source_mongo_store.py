"""The document store: the persisted stand-in, its label, and secret-free server labels."""
# ruff: noqa: RUF001  (non-ASCII punctuation is the point)

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from pydantic import SecretStr
from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from batchyard.clients.mongo import (
    DocumentStore,
    DocumentStoreError,
    StandinBusy,
    open_document_store,
    patch_mongomock,
    redact_uri,
    standin_path,
)
from batchyard.settings import MongoSettings

SECRET_URI = "mongodb://user:S3CRET@127.0.0.1:1/?serverSelectionTimeoutMS=50"


def test_standin_persists_across_close_and_reopen(tmp_path: Path) -> None:
    settings = MongoSettings(database="acme_db", chunks_collection="ch", results_collection="res")
    with open_document_store(settings, standin_dir=tmp_path) as store:
        assert store.is_standin
        store.chunks.insert_many([{"_id": f"c{i}", "text": f"chunk {i} – €{i}"} for i in range(3)])
        store.results.insert_one({"task": "t", "task_version": "1", "unit_id": "c0", "result": {"a": 1}})
        store.collection("other").insert_one({"_id": 1})
    assert standin_path(tmp_path, "acme_db").exists()

    with open_document_store(settings, standin_dir=tmp_path) as store:
        assert sorted(d["_id"] for d in store.chunks.find()) == ["c0", "c1", "c2"]
        assert store.chunks.find_one({"_id": "c1"})["text"] == "chunk 1 – €1"
        assert store.collection("other").count_documents({}) == 1
        # the unique (task, task_version, unit_id) index came back too
        with pytest.raises(DuplicateKeyError):
            store.results.insert_one({"task": "t", "task_version": "1", "unit_id": "c0"})
        store.chunks.delete_one({"_id": "c2"})
        store.save()  # explicit save: visible without close
        assert not list(tmp_path.glob("*.tmp"))
    with open_document_store(settings, standin_dir=tmp_path) as store:
        assert store.chunks.count_documents({}) == 2


def test_standin_label_says_standin(tmp_path: Path) -> None:
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        assert "stand-in" in store.label
        assert "mongomock" in store.label
        assert str(tmp_path) in store.label
        assert "stand-in" in repr(store)
        store.ping()  # no server to reach: a no-op


def test_two_stores_in_one_process_share_the_standin(tmp_path: Path) -> None:
    a = open_document_store(MongoSettings(), standin_dir=tmp_path)
    b = open_document_store(MongoSettings(), standin_dir=tmp_path)
    try:
        a.chunks.insert_one({"_id": "x"})
        assert b.chunks.find_one({"_id": "x"}) == {"_id": "x"}
    finally:
        a.close()
        b.chunks.insert_one({"_id": "y"})
        b.close()
        b.close()  # idempotent
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as c:
        assert c.chunks.count_documents({}) == 2


def _hold_standin(path: str, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    store = open_document_store(MongoSettings(), standin_dir=path)
    ready.set()
    done.wait(10)
    store.close()


def test_second_process_gets_a_clear_busy_error(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_standin, args=(str(tmp_path), ready, done))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(StandinBusy, match=f"in use by another process \\(pid {proc.pid}\\)"):
            open_document_store(MongoSettings(), standin_dir=tmp_path, lock_timeout_s=0.2)
    finally:
        done.set()
        proc.join(10)
    with open_document_store(MongoSettings(), standin_dir=tmp_path, lock_timeout_s=2) as store:
        assert store.is_standin


def test_corrupt_standin_file_is_a_clear_error(tmp_path: Path) -> None:
    standin_path(tmp_path, "batchyard").write_bytes(b"not bson at all")
    with pytest.raises(DocumentStoreError, match="stand-in"):
        open_document_store(MongoSettings(), standin_dir=tmp_path)
    # the lock was released: a good file opens again
    standin_path(tmp_path, "batchyard").unlink()
    open_document_store(MongoSettings(), standin_dir=tmp_path).close()


def test_server_uri_never_appears_in_label_repr_or_errors(tmp_path: Path) -> None:
    settings = MongoSettings(uri=SecretStr(SECRET_URI))
    store = open_document_store(settings, standin_dir=tmp_path)
    try:
        assert isinstance(store, DocumentStore)
        assert not store.is_standin
        assert store.label == "MongoDB at mongodb://127.0.0.1:1"
        for text in (store.label, repr(store), str(store), repr(settings), str(settings.model_dump())):
            assert "S3CRET" not in text
            assert "user:" not in text
        with pytest.raises(DocumentStoreError) as info:
            store.results  # noqa: B018 (first use creates the index: no server there)
        assert "S3CRET" not in str(info.value)
        assert "127.0.0.1:1" in str(info.value)
        with pytest.raises(DocumentStoreError) as info:
            store.ping()
        assert "S3CRET" not in str(info.value)
    finally:
        store.close()
    assert not list(tmp_path.iterdir())  # no stand-in was created


def test_invalid_uri_error_is_scrubbed(tmp_path: Path) -> None:
    bad = "mongodb://user:S3CRET@host:notaport/"
    with pytest.raises(DocumentStoreError) as info:
        open_document_store(MongoSettings(uri=SecretStr(bad)), standin_dir=tmp_path)
    assert "S3CRET" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_redact_uri_strips_credentials_and_options() -> None:
    assert redact_uri("mongodb+srv://u:p%40ss@cluster0.example.net/db?tls=true") == (
        "mongodb+srv://cluster0.example.net"
    )
    assert redact_uri("mongodb://a:1,b:2/?replicaSet=rs") == "mongodb://a:1,b:2"
    assert "pw" not in redact_uri("garbage-with-pw")


def test_mongomock_shim_is_idempotent_and_bulk_upserts_work(tmp_path: Path) -> None:
    patch_mongomock()
    patch_mongomock()
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        res = store.chunks.bulk_write(
            [UpdateOne({"_id": i}, {"$set": {"v": i}}, upsert=True) for i in range(1, 4)], ordered=False
        )
        assert res.upserted_count == 3
