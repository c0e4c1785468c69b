"""Opening the stand-in: the index checkpoint (used when valid, ignored and rebuilt when not),
read-only opens, and processes taking turns with one stand-in file."""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import UpdateOne

from batchyard.clients import standin_file
from batchyard.clients.mongo import StandinBusy, open_document_store, standin_in_use, standin_path
from batchyard.clients.standin import StandinFileError
from batchyard.settings import MongoSettings

T0 = datetime(2026, 2, 1)
SETTINGS = MongoSettings()


def _chunk(i: int, company: str = "acme") -> dict[str, Any]:
    return {"_id": f"{company}/{i:05d}", "company_id": company, "document_id": f"{company}-d{i % 3}",
            "text": f"t{i}", "updated_at": T0 + timedelta(minutes=i % 7)}


@pytest.fixture
def small_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints for small stores too, and only when a save's records reach the store's size."""
    monkeypatch.setattr(standin_file, "CHECKPOINT_MIN", 10)
    monkeypatch.setattr(standin_file, "CHECKPOINT_SHARE", 1)


@pytest.fixture
def records_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many records opening the stand-in reads from its file."""
    count = [0]
    orig = standin_file.LogFile.frames

    def frames(self: standin_file.LogFile, start: int, end: int) -> Any:
        for item in orig(self, start, end):
            count[0] += 1
            yield item

    monkeypatch.setattr(standin_file.LogFile, "frames", frames)
    return count


def _snapshot(store: Any) -> dict[str, Any]:
    """What a reader sees: every chunk, and answers that use each index."""
    chunks = store.chunks
    return {
        "docs": sorted(chunks.find(), key=lambda d: d["_id"]),
        "globex": sorted(d["_id"] for d in chunks.find({"company_id": "globex"}, {"_id": 1})),
        "late": [d["_id"] for d in chunks.find({"updated_at": {"$gte": T0 + timedelta(minutes=5)}}).sort("_id", 1)],
        "newest": list(chunks.find({}, {"updated_at": 1}).sort("updated_at", -1).limit(2)),
        "d1": chunks.count_documents({"company_id": "acme", "document_id": "acme-d1"}),
    }


def _fill(tmp_path: Path, n: int = 300) -> dict[str, Any]:
    """`n` chunks (the close writes a checkpoint), then 47 changes after it (no checkpoint)."""
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        store.chunks.insert_many([_chunk(i, ("acme", "globex")[i % 2]) for i in range(n)])
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        store.chunks.bulk_write([UpdateOne({"_id": f"acme/{i:05d}"}, {"$set": {"updated_at": T0 + timedelta(days=1)}})
                                 for i in range(0, 40, 2)], ordered=False)
        store.chunks.delete_many({"_id": {"$in": [f"globex/{i:05d}" for i in range(1, 30, 2)]}})
        store.chunks.insert_many([_chunk(i, "initech") for i in range(n, n + 12)])
        return _snapshot(store)


def test_open_reads_only_the_records_after_the_checkpoint(
    tmp_path: Path, small_checkpoints: None, records_read: list[int]
) -> None:
    expected = _fill(tmp_path)
    assert standin_file.checkpoint.path_for(standin_path(tmp_path, "batchyard")).exists()
    records_read[0] = 0
    with open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True) as store:
        assert records_read[0] <= 47 + 2  # the changes and their commit, not the 300 documents
        assert _snapshot(store) == expected


def _read_whole(tmp_path: Path, expected: dict[str, Any], records_read: list[int]) -> None:
    records_read[0] = 0
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        assert records_read[0] >= len(expected["docs"])  # the checkpoint was not used
        assert _snapshot(store) == expected
    records_read[0] = 0
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:  # and a good one was written
        assert records_read[0] <= 2
        assert _snapshot(store) == expected


def test_a_foreign_corrupt_or_outdated_checkpoint_is_ignored_and_rebuilt(
    tmp_path: Path, small_checkpoints: None, records_read: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    expected = _fill(a)
    _fill(b, 200)
    idx = standin_file.checkpoint.path_for(standin_path(a, "batchyard"))
    other = standin_file.checkpoint.path_for(standin_path(b, "batchyard"))

    shutil.copy(other, idx)  # another file's checkpoint
    _read_whole(a, expected, records_read)

    data = bytearray(idx.read_bytes())  # a corrupt one
    data[len(data) // 2] ^= 0xFF
    idx.write_bytes(bytes(data))
    _read_whole(a, expected, records_read)

    older = tmp_path / "older"  # the file restored from a copy older than its checkpoint
    shutil.copytree(a, older)
    with open_document_store(SETTINGS, standin_dir=a) as store:
        store.chunks.insert_many([_chunk(i, "hooli") for i in range(40)])
        store.save()
        monkeypatch.setattr(standin_file, "CHECKPOINT_SHARE", 1_000)
        store.chunks.delete_many({"company_id": "hooli"})
    shutil.copy(standin_path(older, "batchyard"), standin_path(a, "batchyard"))
    _read_whole(a, expected, records_read)

    kept = idx.read_bytes()  # a checkpoint from before the file was rewritten
    monkeypatch.setattr(standin_file, "_REWRITE_GARBAGE", 0)
    with open_document_store(SETTINGS, standin_dir=a) as store:
        store.chunks.bulk_write([UpdateOne({"_id": d["_id"]}, {"$set": {"m": 1}}) for d in expected["docs"]] * 2,
                                ordered=False)
        store.chunks.update_many({}, {"$unset": {"m": ""}})
    idx.write_bytes(kept)
    _read_whole(a, expected, records_read)


def test_a_checkpoint_missing_a_newer_index_is_not_used(
    tmp_path: Path, small_checkpoints: None, records_read: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(tmp_path)
    write = standin_file.StandinDatabase.write_checkpoint
    monkeypatch.setattr(standin_file.StandinDatabase, "write_checkpoint", lambda self: None)
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        store.chunks.create_index([("text", 1)])  # committed, but the checkpoint is not rewritten
    monkeypatch.setattr(standin_file.StandinDatabase, "write_checkpoint", write)
    records_read[0] = 0
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        assert records_read[0] >= 300
        assert [d["_id"] for d in store.chunks.find({"text": "t8"})] == ["acme/00008"]


# --------------------------------------------------------------------------- read-only


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readers_write_nothing_and_a_read_only_store_refuses_writes(tmp_path: Path) -> None:
    expected = _fill(tmp_path)
    path = standin_path(tmp_path, "batchyard")
    before = _digest(path)
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:  # opened for writing, only read
        assert _snapshot(store) == expected
    with open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True) as store:
        assert _snapshot(store) == expected
        with pytest.raises(StandinFileError, match="opened read-only; writes are refused"):
            store.chunks.insert_one(_chunk(999))
        with pytest.raises(StandinFileError, match="read-only"):
            store.chunks.update_one({"_id": "acme/00000"}, {"$set": {"text": "changed"}})
        with pytest.raises(StandinFileError, match="read-only"):
            store.chunks.delete_one({"_id": "acme/00000"})
        assert _snapshot(store) == expected
    assert _digest(path) == before  # no commit record, no fsync: nothing at all
    missing = tmp_path / "none"
    with open_document_store(SETTINGS, standin_dir=missing, read_only=True) as store:
        assert store.chunks.count_documents({}) == 0
    assert not standin_path(missing, "batchyard").exists()


def test_a_reader_that_writes_reloads_what_another_writer_saved(tmp_path: Path) -> None:
    expected = _fill(tmp_path)
    reader = open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True)
    try:
        assert _snapshot(reader) == expected
        # another writer's save (as if it got the lock while this process waited to write)
        other = standin_file.StandinDatabase(standin_path(tmp_path, "batchyard").resolve(), "batchyard")
        other.open()
        from batchyard.clients.standin_mongomock import install_indexed_store

        install_indexed_store()
        import mongomock

        client = mongomock.MongoClient(_store=mongomock.store.ServerStore())
        client._store._databases["batchyard"] = other.db_store
        client["batchyard"]["chunks"].insert_one(_chunk(5, "umbrella"))
        other.save()
        other.close()
        with open_document_store(SETTINGS, standin_dir=tmp_path) as writer:
            assert writer.chunks.count_documents({"company_id": "umbrella"}) == 1
            writer.chunks.insert_one(_chunk(6, "umbrella"))
        assert reader.chunks.count_documents({"company_id": "umbrella"}) == 2  # the same collections
    finally:
        reader.close()
    with open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True) as store:
        assert store.chunks.count_documents({"company_id": "umbrella"}) == 2


# --------------------------------------------------------------------------- processes taking turns


def _writer(path: str, holding: Any, release: Any, n: int) -> None:
    with open_document_store(SETTINGS, standin_dir=path, lock_timeout_s=30) as store:
        store.chunks.insert_many([_chunk(i, "wayne") for i in range(n)])
        holding.set()
        release.wait(30)


def _reader(path: str, holding: Any, release: Any) -> None:
    with open_document_store(SETTINGS, standin_dir=path, read_only=True) as store:
        store.chunks.count_documents({})
        holding.set()
        release.wait(30)


def test_two_processes_take_turns(tmp_path: Path) -> None:
    _fill(tmp_path)
    # spawn, not fork: a worker that ran Prefect tests has threads a forked child would inherit
    ctx = multiprocessing.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_writer, args=(str(tmp_path), holding, release, 25))
    proc.start()
    try:
        assert holding.wait(30)
        with pytest.raises(StandinBusy) as info:  # bounded, and says who holds it and how
            open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True, lock_timeout_s=0.3)
        message = str(info.value)
        assert f"(pid {proc.pid}) for writing since" in message and " s to read it" in message
        assert 0.3 <= info.value.waited_s < 10  # bounded by the timeout, plus one poll at most
        busy = standin_in_use(tmp_path, "batchyard", write=False)  # a fail-fast check, no wait
        assert busy is not None and busy.holder_pid == proc.pid
        release.set()
        start = time.monotonic()
        with open_document_store(SETTINGS, standin_dir=tmp_path, lock_timeout_s=30) as store:
            assert store.chunks.count_documents({"company_id": "wayne"}) == 25  # its writes, saved
            store.chunks.insert_one(_chunk(99, "wayne"))
        assert time.monotonic() - start < 30
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0
    assert standin_in_use(tmp_path, "batchyard") is None

    holding, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_reader, args=(str(tmp_path), holding, release))
    proc.start()
    try:
        assert holding.wait(30)
        with open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True, lock_timeout_s=0.3) as store:
            assert store.chunks.count_documents({"company_id": "wayne"}) == 26  # readers share the file
        with pytest.raises(StandinBusy, match=f"\\(pid {proc.pid}\\) for reading since .* to write it"):
            open_document_store(SETTINGS, standin_dir=tmp_path, lock_timeout_s=0.3)
        release.set()
        with open_document_store(SETTINGS, standin_dir=tmp_path, lock_timeout_s=30) as store:
            store.chunks.delete_one({"_id": "wayne/00099"})
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0


def test_writes_before_an_index_is_built_are_kept(tmp_path: Path, small_checkpoints: None) -> None:
    """After an open from the checkpoint, the indexes are built on first read: inserts,
    updates of indexed values and deletes made before that are all in them."""
    expected = _fill(tmp_path)
    reference = {d["_id"]: d for d in expected["docs"]}
    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        chunks = store.chunks
        indexes = chunks._store._fields
        assert indexes["company_id"]._pending is not None and indexes["updated_at"]._pending is not None
        chunks.insert_many([_chunk(i, "stark") for i in range(10)])
        chunks.update_many({"_id": {"$in": ["acme/00010", "acme/00012"]}},
                           {"$set": {"company_id": "stark", "updated_at": T0 + timedelta(days=3)}})
        chunks.delete_many({"_id": {"$in": ["globex/00031", "stark/00003"]}})
        chunks.update_one({"_id": "acme/00014"}, {"$set": {"text": "marks only"}})
        assert indexes["company_id"]._pending is not None  # every write above was queued
        for doc in [_chunk(i, "stark") for i in range(10)]:
            reference[doc["_id"]] = doc
        for chunk_id in ("acme/00010", "acme/00012"):
            reference[chunk_id] = {**reference[chunk_id], "company_id": "stark", "updated_at": T0 + timedelta(days=3)}
        del reference["globex/00031"], reference["stark/00003"]
        stark = sorted(k for k, d in reference.items() if d["company_id"] == "stark")
        assert sorted(d["_id"] for d in chunks.find({"company_id": "stark"}, {"_id": 1})) == stark
        assert [d["_id"] for d in chunks.find({"updated_at": {"$gt": T0 + timedelta(days=2)}}).sort("_id", 1)] == [
            "acme/00010", "acme/00012"]
        assert [d["_id"] for d in chunks.find({}).sort("_id", 1)] == sorted(reference)
        assert chunks.count_documents({"company_id": "globex"}) == sum(d["company_id"] == "globex" for d in reference.values())


def test_the_checkpoint_keeps_every_kind_of_id_and_value(tmp_path: Path, small_checkpoints: None) -> None:
    from bson import Int64, ObjectId

    oid = ObjectId()
    ids: list[Any] = [1, 2.5, Int64(3), oid, "s", {"k": 1, "j": [1, 2]}, T0, None, False, "d"]
    values: list[Any] = [T0, oid, "x", 7, 7.5, None, [T0], {"a": 1}, False, b"raw"]
    docs = [{"_id": i, "company_id": v, "updated_at": v, "document_id": "d"} for i, v in zip(ids, values, strict=True)]
    docs += [{"_id": f"pad/{i:03d}", "company_id": "pad", "document_id": "d"} for i in range(20)]
    queries: list[dict[str, Any]] = [{}, {"company_id": oid}, {"company_id": T0}, {"company_id": {"$in": [7, None]}},
                                     {"updated_at": {"$lte": T0}}, {"_id": {"$gt": 1}}, {"company_id": "pad"}]

    def answers(store: Any) -> list[Any]:
        return [list(store.chunks.find(q).sort("_id", 1)) if q else list(store.chunks.find()) for q in queries]

    with open_document_store(SETTINGS, standin_dir=tmp_path) as store:
        store.chunks.insert_many(docs)
        store.save()
        expected = answers(store)
    assert standin_file.checkpoint.path_for(standin_path(tmp_path, "batchyard")).exists()
    with open_document_store(SETTINGS, standin_dir=tmp_path, read_only=True) as store:
        assert not store._standin.data.read_whole  # type: ignore[union-attr]
        assert answers(store) == expected


def test_a_closed_standin_lets_go_of_its_indexes(tmp_path: Path) -> None:
    """Closing the last store frees the indexes at once (reference counting), not at the next
    full garbage collection: a process opening the stand-in per operation must not hold two."""
    import gc
    import weakref

    _fill(tmp_path)
    enabled = gc.isenabled()
    gc.disable()
    try:
        store = open_document_store(SETTINGS, standin_dir=tmp_path)
        chunks = store.chunks
        assert chunks.count_documents({"company_id": "acme"}) > 0
        assert list(chunks.find({"company_id": {"$in": ["acme", "globex"]}, "updated_at": {"$gte": T0}}).limit(1))
        indexes = weakref.ref(chunks._store)
        store.close()
        del store, chunks
        assert indexes() is None
    finally:
        if enabled:
            gc.enable()
