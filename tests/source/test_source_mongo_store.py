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
    # the driver's error (it quotes the URI) is not chained, not even as a suppressed context
    assert info.value.__cause__ is None and info.value.__context__ is None


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


# --------------------------------------------------------------------------- the stand-in file


def _chunk(i: int, company: str = "acme") -> dict[str, object]:
    return {"_id": f"{company}/{i:05d}", "company_id": company, "document_id": f"{company}-10k", "text": f"t{i}"}


def test_reopen_does_not_reinsert_and_keeps_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = MongoSettings()
    with open_document_store(settings, standin_dir=tmp_path) as store:
        store.chunks.insert_many([_chunk(i, c) for c in ("acme", "globex") for i in range(50)])
        store.results.insert_one({"task": "t", "task_version": "1", "unit_id": "acme/00001"})
    import mongomock.collection

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("opening the stand-in re-inserted documents")

    monkeypatch.setattr(mongomock.collection.Collection, "insert_many", refuse)
    monkeypatch.setattr(mongomock.collection.Collection, "_insert", refuse)
    with open_document_store(settings, standin_dir=tmp_path) as store:
        assert store.chunks.count_documents({"company_id": "globex"}) == 50
        page = list(store.chunks.find({"company_id": "acme", "_id": {"$gt": "acme/00010"}}).sort("_id", 1).limit(3))
        assert [d["_id"] for d in page] == ["acme/00011", "acme/00012", "acme/00013"]
        assert store.results.count_documents({"task": "t", "task_version": "1", "unit_id": "acme/00001"}) == 1


def test_an_interrupted_save_leaves_the_last_save(tmp_path: Path) -> None:
    settings = MongoSettings()
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    store = open_document_store(settings, standin_dir=tmp_path)
    try:
        store.chunks.insert_many([_chunk(i) for i in range(10)])
        store.save()
        store.chunks.insert_many([_chunk(i) for i in range(10, 20)])
        store.chunks.delete_one({"_id": "acme/00000"})
        store.chunks.update_one({"_id": "acme/00001"}, {"$set": {"text": "changed"}})
        store._standin.data.file._flush()  # type: ignore[union-attr]  # on disk, not committed
        # the process dies here: what is on disk is the last save plus uncommitted records
        (crashed / standin_path(tmp_path, settings.database).name).write_bytes(
            standin_path(tmp_path, settings.database).read_bytes() + b"\x30\x00\x00\x00\x12comm"
        )
    finally:
        store.close()
    with open_document_store(settings, standin_dir=crashed) as again:
        assert again.chunks.count_documents({}) == 10
        assert again.chunks.find_one({"_id": "acme/00001"})["text"] == "t1"
        assert again.chunks.find_one({"_id": "acme/00000"}) is not None
        again.chunks.insert_one(_chunk(99))  # appends after the truncated tail
    with open_document_store(settings, standin_dir=crashed) as again:
        assert again.chunks.count_documents({}) == 11
    with open_document_store(settings, standin_dir=tmp_path) as saved:  # closed normally
        assert saved.chunks.count_documents({}) == 19
        assert saved.chunks.find_one({"_id": "acme/00001"})["text"] == "changed"


def test_version_1_files_are_read_and_rewritten(tmp_path: Path) -> None:
    import bson

    header = {
        "format": "batchyard-mongo-standin",
        "version": 1,
        "database": "batchyard",
        "collections": {"chunks": {"indexes": [
            {"name": "cd", "keys": [["company_id", 1], ["document_id", 1]], "unique": False}]}},
    }
    path = standin_path(tmp_path, "batchyard")
    path.write_bytes(bson.encode(header) + b"".join(bson.encode({"c": "chunks", "d": _chunk(i)}) for i in range(5)))
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        assert store.chunks.count_documents({"company_id": "acme"}) == 5
        assert "cd" in store.chunks.index_information()
    with path.open("rb") as fh:
        first = next(bson.decode_file_iter(fh))
    assert first["version"] == 2


def test_a_mostly_superseded_file_is_rewritten_smaller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchyard.clients import standin_file as standin

    monkeypatch.setattr(standin, "_REWRITE_GARBAGE", 0)
    path = standin_path(tmp_path, "batchyard")
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        store.chunks.insert_many([_chunk(i) for i in range(200)])
        store.save()
        size = path.stat().st_size
        for round_ in range(3):
            store.chunks.bulk_write(
                [UpdateOne({"_id": f"acme/{i:05d}"}, {"$set": {"mark": round_}}) for i in range(200)], ordered=False
            )
        store.chunks.delete_many({"_id": {"$gte": "acme/00100"}})
        store.save()
        assert path.stat().st_size < size
        assert store.chunks.count_documents({"mark": 2}) == 100
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        assert store.chunks.count_documents({"mark": 2}) == 100
        assert store.chunks.count_documents({}) == 100


def test_marking_every_chunk_once_leaves_no_second_copy_to_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run marks each chunk once: the next open must not read every chunk twice (garbage is
    kept under half the live bytes), so a no-op run after a backfill opens at its own size."""
    from batchyard.clients import standin_file as standin

    monkeypatch.setattr(standin, "_REWRITE_GARBAGE", 0)
    path = standin_path(tmp_path, "batchyard")
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        store.chunks.insert_many([_chunk(i) for i in range(200)])
        store.save()
        size = path.stat().st_size
        for half in (range(100), range(100, 200)):  # two loads, as incremental loading saves
            store.chunks.bulk_write(
                [UpdateOne({"_id": f"acme/{i:05d}"}, {"$set": {"mark": "m"}}) for i in half], ordered=False
            )
            store.save()
        assert path.stat().st_size < 1.5 * size
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        assert store.chunks.count_documents({"mark": "m"}) == 200


def test_pages_read_back_scattered_and_unwritten_records(tmp_path: Path) -> None:
    """Pages gather documents from saved records, rewritten ones and ones not yet on disk."""
    from batchyard.stages.snapshot import iter_id_pages

    companies = ["acme", "globex", "initech"]
    expected = {}
    with open_document_store(MongoSettings(), standin_dir=tmp_path) as store:
        store.chunks.insert_many([_chunk(i, companies[i % 3]) for i in range(3_000)])
        store.save()
        for i in range(0, 3_000, 3):  # appended again: the page's records are scattered
            store.chunks.update_one({"_id": f"acme/{i:05d}"}, {"$set": {"text": f"new {i}"}})
        store.chunks.insert_many([_chunk(i, "acme") for i in range(3_000, 3_050)])  # still in memory
        for doc in store.chunks.find({"company_id": {"$in": ["acme", "initech"]}}):
            expected[doc["_id"]] = doc["text"]
        query = {"company_id": {"$in": ["acme", "initech"]}}
        pages = list(iter_id_pages(store.chunks, query, {"text": 1}, 128))
        got = {d["_id"]: d["text"] for page in pages for d in page}
        assert got == expected
        assert len(got) == 2_050
        assert [d["_id"] for page in pages for d in page] == sorted(got)
        assert got["acme/00003"] == "new 3" and got["acme/03049"] == "t3049"
