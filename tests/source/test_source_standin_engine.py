"""The indexed stand-in engine answers exactly what mongomock's own scan answers, without scanning.

The property tests run the same random documents, writes and queries through two mongomock
collections: one on `IndexedCollectionStore` (what `patch_mongomock()` installs and the stand-in
uses) and one on mongomock's plain `CollectionStore` (a full scan per query, the reference).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from pymongo import UpdateOne

from batchyard.clients.mongo import patch_mongomock
from batchyard.clients.standin import IndexedCollectionStore, plain_collection_store_class
from batchyard.stages.snapshot import iter_id_pages

COMPANIES = ["acme", "globex", "initech", "hooli"]
DOCUMENTS = ["10k", "10q", "call", "pr", "esg"]
OIDS = [ObjectId() for _ in range(6)]
INDEXES = [
    ([("company", 1), ("document", 1), ("_id", 1)], {}),
    ([("meta.tag", 1)], {}),
    ([("task", 1), ("task_version", 1), ("unit_id", 1)], {"sparse": True}),
]


def _pair(name: str) -> tuple[Any, Any]:
    """(indexed collection, plain mongomock collection), both empty, with the same indexes."""
    patch_mongomock()
    db = mongomock.MongoClient()[name]
    db._store._collections["plain"] = plain_collection_store_class()("plain")
    fast, plain = db["fast"], db["plain"]
    for keys, opts in INDEXES:
        fast.create_index(keys, **opts)
        plain.create_index(keys, **opts)
    assert isinstance(fast._store, IndexedCollectionStore)
    assert not isinstance(plain._store, IndexedCollectionStore)
    return fast, plain


def _value(rng: random.Random, pool: list[Any], awkward: float = 0.25) -> Any:
    """Mostly a value from the pool; sometimes the awkward ones mongomock treats specially."""
    roll = rng.random()
    if roll >= awkward:
        return rng.choice(pool)
    return rng.choice([None, 1, 1.0, True, 0, [rng.choice(pool), "x"], {"a": 1}, "", 2.5])


def _random_id(rng: random.Random, used: set[Any]) -> Any:
    while True:
        kind = rng.random()
        if kind < 0.6:
            value: Any = f"{rng.choice(COMPANIES)}/{rng.randrange(400):04d}"
        elif kind < 0.8:
            value = rng.randrange(-50, 400)
        elif kind < 0.93:
            value = rng.choice([*OIDS, ObjectId()])
        else:
            value = rng.choice([2.5, -0.5, 1e9, None, True, {"k": rng.randrange(3)}])
        marker = ("dict", value["k"]) if isinstance(value, dict) else value
        if marker not in used:
            used.add(marker)
            return value


def _random_doc(rng: random.Random, used: set[Any], awkward: float = 0.25) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": _random_id(rng, used)}
    if rng.random() < 0.92:
        doc["company"] = _value(rng, COMPANIES, awkward)
    if rng.random() < 0.9:
        doc["document"] = _value(rng, DOCUMENTS, awkward)
    if rng.random() < 0.5:
        doc["meta"] = {"tag": _value(rng, ["a", "b", "c"], awkward)} if rng.random() >= awkward / 2 else "flat"
    if rng.random() < 0.3:
        doc["task"], doc["task_version"], doc["unit_id"] = "t", rng.choice(["1", "2"]), str(doc["_id"])
    doc["n"] = rng.randrange(10)
    return doc


def _random_condition(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A filter mixing what the indexes answer with what only mongomock can check."""
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return {"$or": [_random_condition(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if depth < 2 and roll < 0.25:
        return {"$and": [_random_condition(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    field = rng.choice(["company", "document", "meta.tag", "_id", "unit_id", "n", "company"])
    pool = {"company": COMPANIES, "document": DOCUMENTS, "meta.tag": ["a", "b", "c"], "n": list(range(10))}.get(
        field, [f"{c}/{i:04d}" for c in COMPANIES for i in range(0, 400, 37)] + [5, 17, OIDS[0]]
    )
    kind = rng.random()
    if kind < 0.4:
        return {field: _value(rng, pool)}
    if kind < 0.65:
        return {field: {"$in": [_value(rng, pool) for _ in range(rng.randint(0, 4))]}}
    if kind < 0.72:
        return {field: {"$eq": _value(rng, pool)}}
    if kind < 0.9 and field == "_id":
        bound = rng.choice([-float("inf"), "", OIDS[0], rng.randrange(400), f"{rng.choice(COMPANIES)}/0200"])
        return {"_id": {rng.choice(["$gt", "$gte", "$lt", "$lte"]): bound}}
    return {field: rng.choice([{"$ne": _value(rng, pool)}, {"$exists": rng.random() < 0.5}, {"$gt": 3}])}


def _random_filter(rng: random.Random) -> dict[str, Any]:
    parts = [_random_condition(rng) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.3:
        parts.append({"_id": {"$gt": rng.choice(["", "globex", -float("inf"), OIDS[2]])}})
    out: dict[str, Any] = {}
    for part in parts:
        key = next(iter(part))
        if key in out:
            out = {"$and": [out, part]} if out else part
        else:
            out[key] = part[key]
    return out


def _same(fast: Any, plain: Any, query: dict[str, Any], rng: random.Random) -> None:
    sort = rng.choice([None, [("_id", 1)], [("_id", -1)]])
    limit = rng.choice([0, 0, 1, 3, 20])
    skip = rng.choice([0, 0, 2])
    projection = rng.choice([None, {"company": 1}, {"n": 0}, {"meta.tag": 1, "n": 1, "_id": 0}, {"meta": 0}])

    def run(coll: Any) -> Any:
        try:
            cursor = coll.find(query, projection).skip(skip).limit(limit)
            if sort:
                cursor = cursor.sort(sort)
            return list(cursor)
        except Exception as exc:  # both must fail the same way
            return f"error: {type(exc).__name__}"

    got, want = run(fast), run(plain)
    assert got == want, (query, sort, skip, limit)
    try:
        want_count: Any = plain.count_documents(query)
    except Exception as exc:
        want_count = f"error: {type(exc).__name__}"
    try:
        got_count: Any = fast.count_documents(query)
    except Exception as exc:
        got_count = f"error: {type(exc).__name__}"
    assert got_count == want_count, query


def _same_groups(fast: Any, plain: Any, query: dict[str, Any]) -> None:
    for group_id in ("$company", {"c": "$company", "d": "$document"}, "$meta.tag"):
        pipeline: list[dict[str, Any]] = [{"$group": {"_id": group_id, "n": {"$sum": 1}}}]
        if query:
            pipeline.insert(0, {"$match": query})
        try:
            want: Any = sorted(map(repr, plain.aggregate(pipeline)))
        except Exception as exc:
            want = f"error: {type(exc).__name__}"
        try:
            got: Any = sorted(map(repr, fast.aggregate(pipeline)))
        except Exception as exc:
            got = f"error: {type(exc).__name__}"
        assert got == want, (query, group_id)


def _same_state(fast: Any, plain: Any) -> None:
    assert list(fast.find()) == list(plain.find())


@pytest.mark.parametrize("awkward", [0.25, 0.0])
@pytest.mark.parametrize("seed", range(4))
def test_queries_match_mongomocks_scan(seed: int, awkward: float) -> None:
    """awkward=0: only plain scalars in the indexed fields, so most plans are exact."""
    rng = random.Random(seed)
    fast, plain = _pair(f"q{seed}")
    used: set[Any] = set()
    docs = [_random_doc(rng, used, awkward) for _ in range(300)]
    fast.insert_many([dict(d) for d in docs])
    plain.insert_many([dict(d) for d in docs])
    _same_state(fast, plain)
    for _ in range(150):
        query = _random_filter(rng)
        _same(fast, plain, query, rng)
    for _ in range(25):
        _same_groups(fast, plain, _random_filter(rng))


@pytest.mark.parametrize("seed", range(4))
def test_writes_keep_the_indexes_exact(seed: int) -> None:
    rng = random.Random(100 + seed)
    fast, plain = _pair(f"w{seed}")
    used: set[Any] = set()
    for _ in range(120):
        doc = _random_doc(rng, used)
        fast.insert_one(dict(doc))
        plain.insert_one(dict(doc))
    for step in range(120):
        query = _random_filter(rng)
        roll = rng.random()
        if roll < 0.35:
            update = {"$set": {rng.choice(["company", "document", "meta.tag", "n"]): _value(rng, COMPANIES)}}
            one = rng.random() < 0.5
            outcomes = []
            for coll in (fast, plain):
                try:
                    res = coll.update_one(query, update) if one else coll.update_many(query, update)
                    outcomes.append((res.matched_count, res.modified_count))
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            assert outcomes[0] == outcomes[1], (query, update)
        elif roll < 0.5:
            for coll in (fast, plain):
                coll.delete_many(query)
        elif roll < 0.75:
            version, unit = rng.choice(["1", "2"]), f"u{rng.randrange(30)}"
            key = {"_id": f"r-{version}-{unit}", "task": "t", "task_version": version, "unit_id": unit}
            ops = [UpdateOne(key, {"$set": {"company": rng.choice(COMPANIES)}}, upsert=True)]
            for coll in (fast, plain):
                coll.bulk_write(ops, ordered=False)
        else:
            doc = _random_doc(rng, used)
            fast.insert_one(dict(doc))
            plain.insert_one(dict(doc))
        _same_state(fast, plain)
        _same(fast, plain, _random_filter(rng), rng)
        if step % 10 == 0:
            _same_groups(fast, plain, _random_filter(rng))


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count documents decoded by the indexed store."""
    decoded = [0]
    orig_get, orig_many = IndexedCollectionStore.get, IndexedCollectionStore.get_many

    def get(self: IndexedCollectionStore, key: Any, **kwargs: Any) -> Any:
        decoded[0] += 1
        return orig_get(self, key, **kwargs)

    def get_many(self: IndexedCollectionStore, keys: list[Any], *args: Any) -> Any:
        decoded[0] += len(keys)
        return orig_many(self, keys, *args)

    monkeypatch.setattr(IndexedCollectionStore, "get", get)
    monkeypatch.setattr(IndexedCollectionStore, "get_many", get_many)
    return decoded


def test_pages_counts_and_groups_read_only_what_they_return(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_mongomock()
    coll = mongomock.MongoClient()["paging"]["chunks"]
    coll.create_index([("company_id", 1), ("document_id", 1), ("_id", 1)])
    n = 6_000
    coll.insert_many(
        [{"_id": f"{COMPANIES[i % 4]}/d{i % 7}/{i:05d}", "company_id": COMPANIES[i % 4],
          "document_id": f"{COMPANIES[i % 4]}-d{i % 7}", "text": "x" * 50} for i in range(n)]
    )
    decoded = _counting(monkeypatch)
    targets = {"$or": [{"company_id": "acme", "document_id": {"$in": ["acme-d0", "acme-d4"]}},
                       {"company_id": {"$in": ["globex", "hooli"]}}]}
    pages = list(iter_id_pages(coll, targets, {"company_id": 1, "document_id": 1}, 250))
    selected = sum(len(p) for p in pages)
    assert selected == coll.count_documents(targets) > 3_000
    assert decoded[0] == selected  # each returned chunk decoded once; nothing else read
    assert all(a[-1]["_id"] < b[0]["_id"] for a, b in itertools.pairwise(pages))

    decoded[0] = 0
    counts = list(coll.aggregate([{"$match": targets},
                                  {"$group": {"_id": {"c": "$company_id", "d": "$document_id"}, "n": {"$sum": 1}}}]))
    assert sum(c["n"] for c in counts) == selected
    assert coll.count_documents({"company_id": "acme"}) == n // 4
    assert decoded[0] == 0

    coll.bulk_write([UpdateOne({"_id": f"acme/d0/{i:05d}"}, {"$set": {"batchyard.s": {"sha": "h"}}})
                     for i in range(0, n, 28)], ordered=False)
    assert decoded[0] <= 2 * (n // 28 + 1)  # the matched document and its old version, per update
