"""Ranges, sorts and `_id`-only reads on the stand-in's field indexes: exactly mongomock's answers,
reading only what they return.

The property tests run the same random documents, writes and queries through a mongomock
collection on `IndexedCollectionStore` and one on mongomock's plain `CollectionStore` (a full
scan per query, the reference). The change field `u` holds dates from a small pool (so values
tie), and sometimes None, a missing field, or values of other types.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import mongomock
import pytest
from pymongo import UpdateOne

from batchyard.clients.mongo import patch_mongomock
from batchyard.clients.standin import IndexedCollectionStore, plain_collection_store_class
from batchyard.clients.standin_plan import Equal
from batchyard.stages.snapshot import iter_id_pages

COMPANIES = [f"c{i:02d}" for i in range(12)]
DOCUMENTS = ["10k", "10q", "call", "pr"]
T0 = datetime(2026, 1, 1)
DATES = [T0 + timedelta(hours=h) for h in range(0, 48, 4)]
INDEXES = [[("company", 1), ("document", 1)], [("u", 1)]]


def _pair(name: str) -> tuple[Any, Any]:
    patch_mongomock()
    db = mongomock.MongoClient()[name]
    db._store._collections["plain"] = plain_collection_store_class()("plain")
    fast, plain = db["fast"], db["plain"]
    for keys in INDEXES:
        fast.create_index(keys)
        plain.create_index(keys)
    assert isinstance(fast._store, IndexedCollectionStore)
    return fast, plain


def _u(rng: random.Random, awkward: float) -> Any:
    if rng.random() >= awkward:
        return rng.choice(DATES)
    return rng.choice([None, 5, 2.5, "2026", [rng.choice(DATES)], {"d": 1}, T0 - timedelta(days=1)])


def _doc(rng: random.Random, i: int, awkward: float, nested: bool = False) -> dict[str, Any]:
    """A chunk; `nested`: its document id names its company (each document in one company)."""
    company = rng.choice(COMPANIES)
    document = f"{company}-{rng.choice(DOCUMENTS)}" if nested else rng.choice(DOCUMENTS)
    doc: dict[str, Any] = {"_id": f"{company}/{i:05d}", "company": company, "document": document,
                           "n": rng.randrange(5)}
    if rng.random() < 0.95:
        doc["u"] = _u(rng, awkward)
    return doc


def _range(rng: random.Random) -> dict[str, Any]:
    ops = rng.sample(["$gt", "$gte", "$lt", "$lte"], rng.randint(1, 2))
    out: dict[str, Any] = {}
    for op in ops:
        roll = rng.random()
        if roll < 0.8:
            out[op] = rng.choice(DATES) + timedelta(minutes=rng.choice([0, 0, 30]))
        elif roll < 0.9:
            out[op] = rng.choice([3, "2026"])
        else:
            out[op] = datetime(2026, 1, 1, 12, tzinfo=UTC)  # aware: mongomock compares it as naive UTC
    return {"u": out}


def _targets(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.35:
        return {"company": {"$in": rng.sample(COMPANIES, rng.randint(1, 10))}}
    if roll < 0.7:
        return {"$or": [{"company": c, "document": {"$in": [*rng.sample(DOCUMENTS, 2), f"{c}-{rng.choice(DOCUMENTS)}"]}}
                        for c in rng.sample(COMPANIES, rng.randint(1, 6))]}
    if roll < 0.8:
        return {"company": rng.choice(COMPANIES), "n": {"$gt": 1}}  # `n` is not indexed: checked
    return {}


def _query(rng: random.Random) -> dict[str, Any]:
    query = _targets(rng)
    if rng.random() < 0.8:
        query = {**query, **_range(rng)} if "u" not in query else {"$and": [query, _range(rng)]}
    if rng.random() < 0.3:
        query["_id"] = {rng.choice(["$gt", "$gte"]): f"{rng.choice(COMPANIES)}/00100"}
    if rng.random() < 0.1:
        query = {"$and": [query, {"u": {"$in": [rng.choice(DATES), None]}}]}
    return query


def _outcome(run: Any) -> Any:
    try:
        return run()
    except Exception as exc:  # both must fail the same way
        return f"error: {type(exc).__name__}"


def _same(fast: Any, plain: Any, query: dict[str, Any], rng: random.Random) -> None:
    sort = rng.choice([None, [("_id", 1)], [("u", -1)], [("u", 1)], [("u", -1)]])
    limit = rng.choice([1, 1, 3, 20, 0])
    skip = rng.choice([0, 0, 1])
    projection = rng.choice([None, {"u": 1}, {"_id": 1}, {"_id": 1}, {"n": 0}])

    def run(coll: Any) -> Any:
        cursor = coll.find(query, projection).skip(skip).limit(limit)
        return list(cursor.sort(sort) if sort else cursor)

    assert _outcome(lambda: run(fast)) == _outcome(lambda: run(plain)), (query, sort, skip, limit, projection)
    assert _outcome(lambda: fast.count_documents(query)) == _outcome(lambda: plain.count_documents(query)), query
    for key in ("$company", {"c": "$company", "d": "$document"}, {"d": "$document", "c": "$company"}):
        group = [{"$match": query}, {"$group": {"_id": key, "k": {"$sum": 1}}}]
        got = _outcome(lambda: list(fast.aggregate(group)))  # noqa: B023 (called at once)
        assert got == _outcome(lambda: list(plain.aggregate(group))), query  # noqa: B023


@pytest.mark.parametrize("awkward", [0.0, 0.2])
@pytest.mark.parametrize("seed", range(4))
def test_ranges_and_sorts_match_mongomocks_scan(seed: int, awkward: float) -> None:
    rng = random.Random(seed)
    fast, plain = _pair(f"r{seed}")
    docs = [_doc(rng, i, awkward, nested=seed % 2 == 1) for i in range(400)]
    fast.insert_many([dict(d) for d in docs])
    plain.insert_many([dict(d) for d in docs])
    for _ in range(150):
        _same(fast, plain, _query(rng), rng)


@pytest.mark.parametrize("seed", range(3))
def test_writes_keep_the_sorted_values_exact(seed: int) -> None:
    """Values come and go (updates, deletes, inserts, a boolean for a while) after the sorted
    values were first built: ranges and sorts stay exact."""
    rng = random.Random(50 + seed)
    fast, plain = _pair(f"s{seed}")
    docs = [_doc(rng, i, 0.1) for i in range(200)]
    fast.insert_many([dict(d) for d in docs])
    plain.insert_many([dict(d) for d in docs])
    _same(fast, plain, _range(rng), rng)  # builds the sorted values
    next_id = 200
    for step in range(120):
        roll = rng.random()
        query = _query(rng)
        if roll < 0.4:
            value = True if step == 30 else _u(rng, 0.1)
            for coll in (fast, plain):
                coll.update_many(query, {"$set": {"u": value}})
        elif roll < 0.55:
            for coll in (fast, plain):
                coll.delete_many(query)
        elif roll < 0.7:
            ops = [UpdateOne({"_id": f"up/{i:05d}"}, {"$set": {"u": rng.choice(DATES), "company": "c00"}}, upsert=True)
                   for i in rng.sample(range(600), 5)]
            for coll in (fast, plain):
                coll.bulk_write(ops, ordered=False)
        else:
            doc = _doc(rng, next_id, 0.1)
            next_id += 1
            fast.insert_one(dict(doc))
            plain.insert_one(dict(doc))
        if step == 60:
            for coll in (fast, plain):
                coll.update_many({"u": True}, {"$set": {"u": 1}})
        assert list(fast.find()) == list(plain.find())
        _same(fast, plain, _query(rng), rng)


# --------------------------------------------------------------------------- what is read


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count documents decoded by the indexed store."""
    decoded = [0]
    orig_get, orig_many = IndexedCollectionStore.get, IndexedCollectionStore.get_many

    def get(self: IndexedCollectionStore, key: Any, *args: Any, **kwargs: Any) -> Any:
        decoded[0] += 1
        return orig_get(self, key, *args, **kwargs)

    def get_many(self: IndexedCollectionStore, keys: list[Any], *args: Any, **kwargs: Any) -> Any:
        decoded[0] += len(keys)
        return orig_many(self, keys, *args, **kwargs)

    monkeypatch.setattr(IndexedCollectionStore, "get", get)
    monkeypatch.setattr(IndexedCollectionStore, "get_many", get_many)
    return decoded


def _corpus(n: int, companies: int = 60) -> Any:
    patch_mongomock()
    coll = mongomock.MongoClient(tz_aware=True)["changes"]["chunks"]
    coll.create_index([("company_id", 1), ("document_id", 1)])
    coll.create_index([("updated_at", 1)])
    coll.insert_many([{"_id": f"co{i % companies:03d}/d{i % 5}/{i:06d}", "company_id": f"co{i % companies:03d}",
                       "document_id": f"co{i % companies:03d}-d{i % 5}", "text": "x" * 40, "updated_at": T0}
                      for i in range(n)])
    return coll


def test_change_pages_newest_change_and_company_ids_read_only_what_they_return(monkeypatch: pytest.MonkeyPatch) -> None:
    """The change detection's queries on a corpus where 37 chunks changed:

    1. pages of the changed chunks among the targets (company `$in`, or `$or` of company and
       documents) decode those chunks only, and never materialize the targets' ids;
    2. the newest change among the targets decodes one chunk;
    3. counts per company decode nothing;
    4. all ids of one company decode nothing.
    """
    n, companies = 12_000, 60
    coll = _corpus(n, companies)
    changed = [f"co{i % companies:03d}/d{i % 5}/{i:06d}" for i in range(5, n, 331)]
    later = T0 + timedelta(days=1)
    for k, chunk_id in enumerate(changed):
        coll.update_one({"_id": chunk_id}, {"$set": {"updated_at": later + timedelta(minutes=k)}})
    decoded = _counting(monkeypatch)
    materialized: list[int] = []
    orig_ids = Equal.ids

    def ids(self: Equal) -> Any:
        found = orig_ids(self)
        materialized.append(len(found))
        return found

    monkeypatch.setattr(Equal, "ids", ids)

    every = {"company_id": {"$in": [f"co{i:03d}" for i in range(companies)]}}
    listed = {"$or": [{"company_id": f"co{i:03d}", "document_id": {"$in": [f"co{i:03d}-d{j}" for j in range(5)]}}
                      for i in range(companies)]}
    for targets in (every, listed):
        decoded[0] = 0
        query = {**targets, "updated_at": {"$gte": later}}
        pages = list(iter_id_pages(coll, query, {"text": 1}, 10))
        got = [d["_id"] for page in pages for d in page]
        assert got == sorted(changed)
        assert decoded[0] == len(changed)
        assert not any(size > len(changed) for size in materialized)  # the targets' ids never built

        decoded[0] = 0
        newest = list(coll.find(targets, {"updated_at": 1}).sort("updated_at", -1).limit(1))
        assert newest == [{"_id": changed[-1], "updated_at": (later + timedelta(minutes=len(changed) - 1)).replace(tzinfo=UTC)}]
        assert decoded[0] == 1

    decoded[0] = 0
    counts = {d["_id"]: d["n"] for d in coll.aggregate([{"$match": every}, {"$group": {"_id": "$company_id", "n": {"$sum": 1}}}])}
    assert sum(counts.values()) == n and len(counts) == companies
    ids_of_one = [d["_id"] for d in coll.find({"company_id": "co007"}, {"_id": 1})]
    assert len(ids_of_one) == n // companies and all(i.startswith("co007/") for i in ids_of_one)
    assert decoded[0] == 0


def test_many_target_clauses_and_few_candidates_match_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A targets `$or` of 80 company + documents clauses and a range matching ~30 chunks: each
    candidate is tested against its company's clause only, with mongomock's answers."""
    from batchyard.clients import standin_plan

    routed = [0]
    orig = standin_plan.AnyOf._routed

    def count(self: standin_plan.AnyOf, view: Any, *args: Any) -> Any:
        routed[0] += 1
        return orig(self, view, *args)

    monkeypatch.setattr(standin_plan.AnyOf, "_routed", count)
    rng = random.Random(7)
    fast, plain = _pair("routes")
    companies = [f"k{i:03d}" for i in range(100)]
    docs = [{"_id": f"{c}/{i:05d}", "company": c, "document": f"{c}-{i % 4}",
             "u": DATES[0] if rng.random() < 0.95 else rng.choice([*DATES[1:], None, [DATES[2]], "x"])}
            for i, c in ((i, rng.choice(companies)) for i in range(3_000))]
    fast.insert_many([dict(d) for d in docs])
    plain.insert_many([dict(d) for d in docs])
    for _ in range(25):
        targets = {"$or": [{"company": c, "document": {"$in": [f"{c}-{j}" for j in rng.sample(range(4), 2)]}}
                           for c in rng.sample(companies, 80)]}
        if rng.random() < 0.3:
            targets["$or"].append({"company": {"$in": rng.sample(companies, 3)}})  # a clause routed nowhere
        query = {**targets, **_range(rng)}
        for sort in ([("_id", 1)], [("u", -1)]):
            assert list(fast.find(query).sort(sort).limit(50)) == list(plain.find(query).sort(sort).limit(50)), query
        assert fast.count_documents(query) == plain.count_documents(query)
    assert routed[0] > 0
