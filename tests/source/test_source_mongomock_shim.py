"""The mongomock shim: pymongo 4.20 bulk ops work, and the hash lookups keep MongoDB semantics."""

from __future__ import annotations

import time
from typing import Any

import pytest
from bson import ObjectId
from pymongo import InsertOne, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

KEY = [("task", 1), ("task_version", 1), ("unit_id", 1)]


def test_unique_index_still_rejects_duplicates(mongo_db: Any) -> None:
    coll = mongo_db["res"]
    coll.create_index(KEY, unique=True)
    coll.insert_one({"task": "t", "task_version": "1", "unit_id": "a"})
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"task": "t", "task_version": "1", "unit_id": "a"})
    coll.insert_one({"task": "t", "task_version": "2", "unit_id": "a"})
    b = coll.insert_one({"task": "t", "task_version": "1", "unit_id": "b"}).inserted_id
    # an update that would collide is refused and rolled back
    with pytest.raises(DuplicateKeyError):
        coll.update_one({"_id": b}, {"$set": {"unit_id": "a"}})
    assert coll.find_one({"_id": b})["unit_id"] == "b"
    # after a delete the key is free again
    coll.delete_one({"task": "t", "task_version": "1", "unit_id": "a"})
    coll.update_one({"_id": b}, {"$set": {"unit_id": "a"}})
    assert coll.count_documents({"task": "t", "task_version": "1", "unit_id": "a"}) == 1
    assert coll.count_documents({"task": "t", "task_version": "1", "unit_id": "b"}) == 0
    # moving a document off a key and back works both ways
    coll.update_one({"_id": b}, {"$set": {"unit_id": "c"}})
    coll.insert_one({"task": "t", "task_version": "1", "unit_id": "a"})
    with pytest.raises(DuplicateKeyError):
        coll.update_one({"_id": b}, {"$set": {"unit_id": "a"}})


def test_bulk_upserts_and_per_op_errors(mongo_db: Any) -> None:
    coll = mongo_db["res"]
    coll.create_index(KEY, unique=True)
    ops = [UpdateOne({"task": "t", "task_version": "1", "unit_id": f"u{i}"}, {"$set": {"v": i}}, upsert=True) for i in range(1, 6)]
    assert coll.bulk_write(ops, ordered=False).upserted_count == 5
    again = coll.bulk_write(ops, ordered=False)
    assert (again.upserted_count, again.matched_count) == (0, 5)
    with pytest.raises(BulkWriteError) as info:
        coll.bulk_write(
            [InsertOne({"task": "t", "task_version": "1", "unit_id": "u1"}), InsertOne({"task": "t", "task_version": "1", "unit_id": "new"})],
            ordered=False,
        )
    assert [e["index"] for e in info.value.details["writeErrors"]] == [0]
    assert coll.count_documents({}) == 6


def test_lookups_match_the_scan(mongo_db: Any) -> None:
    coll = mongo_db["docs"]
    coll.create_index(KEY, unique=True)
    oid = ObjectId()
    coll.insert_many(
        [
            {"_id": 1, "task": "t", "task_version": "1", "unit_id": "x"},
            {"_id": "s", "task": "t", "task_version": "1", "unit_id": "y", "n": None},
            {"_id": oid, "task": "t", "task_version": "2", "unit_id": "x"},
        ]
    )
    assert coll.find_one({"_id": 1})["unit_id"] == "x"
    assert coll.find_one({"_id": "s", "unit_id": "nope"}) is None
    assert {d["_id"] for d in coll.find({"_id": {"$in": [1, oid, "missing"]}})} == {1, oid}
    assert coll.find_one({"task": "t", "task_version": "2", "unit_id": "x"})["_id"] == oid
    assert coll.find_one({"task": "t", "task_version": "1", "unit_id": "x", "other": 5}) is None
    # an array value switches that index back to mongomock's own scan (multikey semantics)
    coll.insert_one({"_id": 9, "task": "t", "task_version": "3", "unit_id": ["p", "q"]})
    assert coll.find_one({"task": "t", "task_version": "3", "unit_id": "p"})["_id"] == 9
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"task": "t", "task_version": "3", "unit_id": "q"})


def test_keyed_bulk_updates_are_not_quadratic(mongo_db: Any) -> None:
    coll = mongo_db["big"]
    n = 6_000
    coll.insert_many([{"_id": f"c{i}", "v": 0} for i in range(n)])
    start = time.perf_counter()
    res = coll.bulk_write([UpdateOne({"_id": f"c{i}"}, {"$set": {"v": 1}}) for i in range(n)], ordered=False)
    assert res.modified_count == n
    assert time.perf_counter() - start < 5.0
