"""The stand-in's storage engine: mongomock's query language over encoded, indexed documents.

Why this exists. mongomock keeps every document as a Python dict and answers every filter by
scanning all of them: a 1M-chunk stand-in held gigabytes of dicts, re-validated every document
with `insert_many` on each open, and paid O(n) per `_id`-range page (O(n^2) for a snapshot).

Why mongomock and not another embedded store. The pipeline's pymongo code (bulk_write of
`UpdateOne`, `$set` of dotted paths, upserts against a unique index, `aggregate` `$group`,
`with_options`, `count_documents`) must run unchanged against the stand-in, and mongomock is the
only embedded engine that accepts all of it through the pymongo API: montydb 2.5 raises
NotImplementedError for `bulk_write`, `aggregate`, `with_options` and `create_index` and scans
for every query; mongita 1.2 has no `bulk_write`, `aggregate`, `$or` or `$and`. SQLite as the
document store (measured: 22 us per random read of a 1.4 KB document against 3.6 us for
`os.pread`) would be slower for the snapshot's `_id`-order reads. So the query language stays
mongomock's, and only its storage is replaced.

What replaces it (`IndexedCollectionStore`, a mongomock `CollectionStore`):

- Documents are kept BSON-encoded and decoded on access, in a blob holder: the persisted
  stand-in's file (`standin_file.LogFile`: only each document's place in the file is in memory)
  or, for a plain `mongomock.MongoClient()` after `patch_mongomock()`, `MemoryBlobs`. A document
  has a slot (its natural-order position); the slot's blob reference is one 64-bit entry of an
  array, so 1M documents cost a dict of ids and 8 MB of references.
- Field indexes (`standin_index.FieldIndex`: hash buckets, plus sorted distinct values for
  ranges and sorts) on every field named by the collection's indexes, and a sorted `_id` index
  per BSON type bracket (numbers, strings, ObjectIds; `sortedcontainers.SortedList`), all
  maintained on insert, update and delete.
- `plan(filter)` turns equality / `$in` / `$eq`, ranges on indexed fields, `_id` ranges and
  their `$and` / `$or` combinations into lazy terms (`standin_plan`): the most selective term
  drives and the others only filter its candidates, so a query costs about what it matches.
  When every condition was answered exactly, no document is decoded to filter it; otherwise the
  candidates are checked with mongomock's own `filter_applies`; a filter it cannot narrow at
  all falls back to mongomock's scan. Equality follows mongomock (Python `==`: 1, 1.0 and True
  are equal; missing equals None); a document whose indexed value is not a plain scalar (array,
  sub-document) makes lookups on that field check their candidates.
- Candidate sets of a filter are cached until an indexed value changes (marks and result
  payloads never do), so the snapshot's pages cost O(page), not O(collection); `count_documents`
  and `$group` counts by indexed string fields are answered from the indexes alone; a sort on
  one indexed field with a limit walks that field's sorted values; a projection of `_id` alone is
  answered without decoding a document.

mongomock updates documents in place (`_update` mutates the dict it got from the store). The
store hands out decoded copies, so the update is written back in the `_ensure_uniques` hook that
mongomock calls after every in-place change (see `sync`). `standin_mongomock` routes mongomock's
`Collection` and `Cursor` to this store.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import threading
import weakref
from array import array
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import bson
import bson.errors
from bson.codec_options import CodecOptions
from sortedcontainers import SortedList

from batchyard.clients.standin_index import (
    ID_BRACKETS,
    Bounds,
    FieldIndex,
    SortedIds,
    id_bracket,
    plain,
)
from batchyard.clients.standin_plan import EVERYTHING, Term, build_and, flatten_and, id_bounds

_PLAN_CACHE = 8
_FORWARD_CACHE = 65_536  # documents whose index keys a plan read one by one, kept per key version


class StandinFileError(Exception):
    """The stand-in file cannot be read or written (the message says why)."""


def _pack_keys(doc_id: Any, keys: dict[str, tuple[bool, Any]]) -> dict[str, Any]:
    """Index keys as persisted: `{"_id": id, path: [value] (or [] when irregular)}`."""
    out: dict[str, Any] = {"_id": doc_id}
    for path, (regular, value) in keys.items():
        out[path] = [value] if regular else []
    return out


def index_fields(specs: dict[str, Any]) -> set[str]:
    """The fields the stand-in keeps a field index for: every field an index names."""
    wanted: set[str] = set()
    for spec in specs.values():
        for field, _direction in spec.get("key", []):
            if field != "_id" and not field.startswith("$") and "$" not in field:
                wanted.add(field)
    return wanted


def store_key(doc_id: Any) -> Any:
    """mongomock's key of a document in its collection store (dict ids are hashable copies)."""
    if isinstance(doc_id, dict):
        from mongomock import helpers

        return helpers.hashdict(doc_id)
    return doc_id


# --------------------------------------------------------------------------- blob holders


class _PyDoc:
    """A document BSON cannot encode, kept as a Python object (in-memory stores only).

    A real server can hold what pymongo refuses to encode (invalid UTF-8 read back as lone
    surrogates); mongomock stores anything, so an in-memory store keeps such a document as is.
    """

    __slots__ = ("doc",)

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = copy.deepcopy(doc)


def _encode(doc: dict[str, Any], keep_objects: bool) -> bytes | _PyDoc:
    try:
        return bson.encode(doc)
    except (bson.errors.InvalidDocument, UnicodeEncodeError):
        if keep_objects:
            return _PyDoc(doc)
        raise


_AWARE: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True)  # what mongomock's tz_aware clients return: UTC-aware dates


def _decode(raw: bytes | _PyDoc, tz_aware: bool = False) -> dict[str, Any]:
    if isinstance(raw, _PyDoc):
        doc = copy.deepcopy(raw.doc)
        if tz_aware:
            from mongomock import helpers

            return helpers.make_datetime_timezone_aware_in_document(doc)  # type: ignore[no-any-return]
        return doc
    return bson.decode(raw, _AWARE) if tz_aware else bson.decode(raw)


class MemoryBlobs:
    """Encoded documents held in memory (stores that are not persisted).

    The blob interface (also `standin_file.LogFile`'s): `put(collection, raw, keys) -> ref` (a
    non-zero int below 2**64), `get(ref) -> raw`, `get_many(refs)`, `keys(ref)` (the `keys`
    given to `put`, if kept), `release(...)` when a document is replaced or deleted, and
    `structure_changed()` after a drop or rename.
    """

    keeps_objects = True

    def __init__(self) -> None:
        self._data: dict[int, bytes | _PyDoc] = {}
        self._next = 1  # 0 marks an empty slot in the stores' reference arrays

    def put(self, collection: str, raw: bytes | _PyDoc, keys: dict[str, Any]) -> int:
        ref = self._next
        self._next += 1
        self._data[ref] = raw
        return ref

    def get(self, ref: int) -> bytes | _PyDoc:
        return self._data[ref]

    def get_many(self, refs: list[int]) -> list[bytes | _PyDoc]:
        return [self._data[ref] for ref in refs]

    def keys(self, ref: int) -> dict[str, Any] | None:
        return None

    def release(self, collection: str, ref: int, doc_id: Any, deleted: bool) -> None:
        self._data.pop(ref, None)

    def structure_changed(self) -> None:
        """A collection was dropped or renamed (nothing to do in memory)."""


# --------------------------------------------------------------------------- plans

_UNSET: Any = object()


class Candidates:
    """The ids a filter's indexed conditions allow (lazily materialized), shared by every plan
    of that filter while no indexed value changes: the pages of a snapshot reuse them."""

    def __init__(self, term: Term) -> None:
        self.term = term
        self._ids: Collection[Any] | None = _UNSET
        self.sorted: dict[int, list[Any]] = {}  # per bracket, the sorted candidates (lazy)

    @classmethod
    def of(cls, ids: Collection[Any]) -> Candidates:
        found = cls(EVERYTHING)
        found._ids = ids
        return found

    def ids(self) -> Collection[Any] | None:
        """The candidate ids (None: every document); call with the store lock held."""
        if self._ids is _UNSET:
            self._ids = None if self.term is EVERYTHING else self.term.ids()
        return self._ids

    @property
    def built(self) -> bool:
        return self._ids is not _UNSET


class Plan:
    """What the indexes say about a filter: its candidates, an `_id` range, and exactness."""

    def __init__(self, found: Candidates, exact: bool, id_range: Bounds | None) -> None:
        self.found = found
        self.term = found.term
        self.exact = exact  # True: every candidate within the range matches the filter
        self.id_range = id_range


# --------------------------------------------------------------------------- the store


class IndexedCollectionStore:
    """A mongomock `CollectionStore` over encoded documents with field and sorted `_id` indexes.

    Built as a subclass of mongomock's class by `collection_store_class()` (mongomock is imported
    lazily); see the module docstring for what it keeps and why.
    """

    _blobs: Any
    _locs: dict[Any, int]

    def _setup(self, name: str, blobs: Any) -> None:
        from mongomock.thread import RWLock

        self._name = name
        self._blobs = blobs if blobs is not None else MemoryBlobs()
        self._documents: collections.OrderedDict[Any, Any] = collections.OrderedDict()  # unused: mongomock's own dict stays empty
        self._index_specs: dict[str, Any] = {}
        self._ttl_indexes: dict[str, Any] = {}
        self._is_force_created = False
        self._rwlock = RWLock()
        self._lock = threading.RLock()
        self._locs = {}  # id -> slot (slots grow in natural order)
        self._refs = array("Q")  # slot -> blob reference (0: the document was deleted)
        self._sorted = SortedIds()
        self._others: set[Any] = set()
        self._fields: dict[str, FieldIndex] = {}
        self._key_version = 0  # bumped whenever a candidate set could change
        self._plans: collections.OrderedDict[bytes, tuple[int, Candidates, bool]] = collections.OrderedDict()
        self._forwarded: tuple[int, dict[Any, dict[str, Any] | None]] = (0, {})
        self._last_set: Any = None
        self._bulk = False  # loading the whole collection: the sorted `_id` index is built at the end

    # ----- mongomock's CollectionStore interface
    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        if getattr(self, "_name", value) != value:
            self._blobs.structure_changed()  # renamed: its records carry the old name
        self._name = value

    @property
    def indexes(self) -> dict[str, Any]:
        return self._index_specs

    @indexes.setter
    def indexes(self, value: dict[str, Any]) -> None:
        self._index_specs = value
        self._refresh_fields()

    def create(self) -> None:
        self._is_force_created = True

    @property
    def is_created(self) -> bool:
        return bool(self._locs or self._index_specs or self._is_force_created)

    def reset(self, blobs: Any) -> None:
        """Empty, with no index, over `blobs` (a stand-in reloading its file in place)."""
        with self._lock:
            self._setup(self._name, blobs)

    def drop(self) -> None:
        with self._lock:
            for key in list(self._locs):
                self._blobs.release(self._name, self._ref(key), None, False)
            self._blobs.structure_changed()
            blobs = self._blobs
            self._setup(self._name, blobs)

    def create_index(self, index_name: str, index_dict: dict[str, Any]) -> None:
        with self._lock:
            self._index_specs[index_name] = index_dict
            if index_dict.get("expireAfterSeconds") is not None:
                self._ttl_indexes[index_name] = index_dict
            self._refresh_fields()

    def drop_index(self, index_name: str) -> None:
        self._remove_expired_documents()
        with self._lock:
            del self._index_specs[index_name]
            self._ttl_indexes.pop(index_name, None)
            self._refresh_fields()

    @property
    def is_empty(self) -> bool:
        self._remove_expired_documents()
        return not self._locs

    def __contains__(self, key: Any) -> bool:
        self._remove_expired_documents()
        return key in self._locs

    def __getitem__(self, key: Any) -> dict[str, Any]:
        self._remove_expired_documents()
        doc = self.get(key)
        if doc is None:
            raise KeyError(key)
        return doc

    def __setitem__(self, key: Any, doc: dict[str, Any]) -> None:
        self._write(key, doc)
        self._last_set = doc

    def __delitem__(self, key: Any) -> None:
        with self._lock:
            slot = self._locs[key]
            ref = self._refs[slot]
            doc_id, old = self._old(ref)
            self._blobs.release(self._name, ref, doc_id, True)  # may refuse (read-only)
            del self._locs[key]
            self._refs[slot] = 0
            self._unindex(key, old)
            bracket = id_bracket(key)
            if bracket is None:
                self._others.discard(key)
            else:
                self._sorted.discard(key, bracket)
            self._key_version += 1

    def __len__(self) -> int:
        self._remove_expired_documents()
        return len(self._locs)

    @property
    def documents(self) -> Iterator[dict[str, Any]]:
        self._remove_expired_documents()
        for key in list(self._locs):
            doc = self.get(key)
            if doc is not None:
                yield doc

    def _remove_expired_documents(self) -> None:
        if not self._ttl_indexes:
            return
        for index in list(self._ttl_indexes.values()):
            self._expire(index)

    def _expire(self, index: dict[str, Any]) -> None:
        import mongomock

        try:
            expiry = int(index["expireAfterSeconds"])
        except ValueError:
            return
        if len(index["key"]) > 1:
            return
        field = next(iter(index["key"]))[0]
        now = mongomock.utcnow()  # type: ignore[attr-defined]
        expired = [
            key for key in list(self._locs)
            if (doc := self.get(key)) is not None
            and self._value_meets_expiry(doc.get(field), expiry, now)  # type: ignore[attr-defined]
        ]
        for key in expired:
            with contextlib.suppress(KeyError):
                del self[key]

    # ----- reading and writing documents
    def _ref(self, key: Any) -> int:
        return self._refs[self._locs[key]]

    def get(self, key: Any, tz_aware: bool = False) -> dict[str, Any] | None:
        """The decoded document stored under `key` (a fresh dict), or None."""
        with self._lock:
            slot = self._locs.get(key)
            if slot is None:
                return None
            raw = self._blobs.get(self._refs[slot])
        return _decode(raw, tz_aware)

    def get_many(self, keys: list[Any], tz_aware: bool = False) -> list[dict[str, Any]]:
        """The decoded documents stored under `keys` (missing ones left out), in that order."""
        with self._lock:
            locs, refs = self._locs, self._refs
            raws = self._blobs.get_many([refs[locs[k]] for k in keys if k in locs])
        return [_decode(raw, tz_aware) for raw in raws]

    def sync(self, doc: dict[str, Any]) -> None:
        """Store a document mongomock changed in place (called from `_ensure_uniques`)."""
        if doc is self._last_set:
            self._last_set = None  # just stored by __setitem__ (an insert)
            return
        self._write(store_key(doc.get("_id")), doc)

    def _write(self, key: Any, doc: dict[str, Any]) -> None:
        raw = _encode(doc, self._blobs.keeps_objects)
        with self._lock:
            keys = self._keys_of(doc)
            ref = self._blobs.put(self._name, raw, _pack_keys(doc.get("_id"), keys))  # may refuse
            slot = self._locs.get(key)
            if slot is None:
                self._locs[key] = len(self._refs)
                self._refs.append(ref)
                self._add_key(key)
                self._key_version += 1
                self._index(key, keys)
            else:
                old_ref = self._refs[slot]
                self._reindex(key, self._old(old_ref)[1], keys)
                self._blobs.release(self._name, old_ref, key, False)
                self._refs[slot] = ref

    def _reindex(self, key: Any, old: dict[str, tuple[bool, Any]], new: dict[str, tuple[bool, Any]]) -> None:
        """Move a document between the buckets whose value changed (marks change none)."""
        changed = False
        for path, index_key in new.items():
            was = old[path]
            if was != index_key or type(was[1]) is not type(index_key[1]):
                index = self._fields[path]
                index.remove(key, was)
                index.add(key, index_key)
                changed = True
        if changed:
            self._key_version += 1

    def _add_key(self, key: Any) -> None:
        bracket = id_bracket(key)
        if bracket is None:
            self._others.add(key)
        elif not self._bulk:
            self._sorted.add(key, bracket)

    def _keys_of(self, doc: dict[str, Any]) -> dict[str, tuple[bool, Any]]:
        """The document's key in each field index."""
        return {path: index.key(doc) for path, index in self._fields.items()}

    def _old(self, ref: int) -> tuple[Any, dict[str, tuple[bool, Any]]]:
        """(`_id`, index keys) of a stored document, from its stored keys when they cover them."""
        stored = self._blobs.keys(ref)
        if stored is not None and self.covers(stored):
            return stored.get("_id"), self._unpack_keys(stored)
        doc = _decode(self._blobs.get(ref))
        return doc.get("_id"), self._keys_of(doc)

    def forward(self, key: Any, path: str) -> tuple[bool, Any]:
        """A document's key in the index of `path`, read through its blob (for plan terms that
        test a few candidates instead of walking many buckets). Cached per key version."""
        version, cache = self._forwarded
        if version != self._key_version or len(cache) > _FORWARD_CACHE:
            cache = {}
            self._forwarded = (self._key_version, cache)
        stored = cache.get(key, _UNSET)
        if stored is _UNSET:
            stored = self._blobs.keys(self._ref(key))
            if stored is None or path not in stored:
                doc = _decode(self._blobs.get(self._ref(key)))
                stored = _pack_keys(doc.get("_id"), self._keys_of(doc))
            cache[key] = stored
        assert stored is not None
        value = stored[path]
        return (True, value[0]) if value else (False, None)

    def covers(self, stored: dict[str, Any]) -> bool:
        """True when stored keys (see `stored_keys`) hold a value for every field index."""
        return all(path in stored for path in self._fields)

    def stored_keys(self, doc: dict[str, Any]) -> dict[str, Any]:
        """What a persisted record keeps of a document for the indexes: `_id` and index keys."""
        return _pack_keys(doc.get("_id"), self._keys_of(doc))

    def _unpack_keys(self, stored: dict[str, Any]) -> dict[str, tuple[bool, Any]]:
        return {path: ((True, stored[path][0]) if stored[path] else (False, None)) for path in self._fields}

    def _index(self, key: Any, keys: dict[str, tuple[bool, Any]]) -> None:
        for path, index_key in keys.items():
            self._fields[path].add(key, index_key)

    def _unindex(self, key: Any, keys: dict[str, tuple[bool, Any]]) -> None:
        for path, index_key in keys.items():
            self._fields[path].remove(key, index_key)

    def _refresh_fields(self) -> None:
        """One field index per field named by the collection's indexes (built over the data)."""
        wanted = index_fields(self._index_specs)
        with self._lock:
            for field in list(self._fields):
                if field not in wanted:
                    del self._fields[field]
            new = [FieldIndex(f) for f in sorted(wanted - set(self._fields))]
            if new and self._locs and not self._bulk:
                for key in self._locs:
                    doc = _decode(self._blobs.get(self._ref(key)))
                    for index in new:
                        index.add(key, index.key(doc))
            for index in new:
                self._fields[index.path] = index
            self._key_version += 1
            self._plans.clear()

    # ----- loading, checkpoints and relocating (used by the persisted stand-in)
    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def begin_load(self, bulk: bool) -> None:
        """Records follow (`load_put`, `load_delete`); `bulk`: into an empty store, so the
        sorted `_id` index is built once at `end_load` instead of per record."""
        self._bulk = bulk

    def load_put(self, stored: dict[str, Any], ref: int) -> bool:
        """Add a persisted document by its stored keys (`stored_keys`) and blob reference.

        False (nothing done) when `stored` lacks a field index's key: pass `stored_keys(doc)`.
        Runs once per document when a stand-in opens, hence written for speed.
        """
        fields = self._fields
        for path in fields:
            if path not in stored:
                return False
        key = stored["_id"]
        if isinstance(key, dict):
            key = store_key(key)
        slot = self._locs.get(key)
        if slot is None:
            self._locs[key] = len(self._refs)
            self._refs.append(ref)
            self._add_key(key)
        else:  # an update appended later in the file
            old_ref = self._refs[slot]
            self._reindex(key, self._old(old_ref)[1], self._unpack_keys(stored))
            self._blobs.release(self._name, old_ref, key, False)
            self._refs[slot] = ref
            return True
        for path, index in fields.items():
            index.fill(key, stored[path])
        return True

    def load_delete(self, doc_id: Any) -> None:
        key = store_key(doc_id)
        slot = self._locs.pop(key, None)
        if slot is None:
            return
        ref = self._refs[slot]
        self._refs[slot] = 0
        self._unindex(key, self._old(ref)[1])
        bracket = id_bracket(key)
        if bracket is None:
            self._others.discard(key)
        elif not self._bulk:
            self._sorted.discard(key, bracket)
        self._blobs.release(self._name, ref, key, False)

    def end_load(self) -> None:
        if self._bulk:
            by_bracket: dict[int, list[Any]] = {b: [] for b in ID_BRACKETS}
            for key in self._locs:
                bracket = id_bracket(key)
                if bracket is not None:
                    by_bracket[bracket].append(key)
            self._sorted = SortedIds({b: SortedList(keys) for b, keys in by_bracket.items()})
        self._bulk = False
        self._key_version += 1
        self._plans.clear()

    def refs(self) -> list[int]:
        """The blob references of the documents, in natural order."""
        refs = self._refs
        return [refs[slot] for slot in self._locs.values()]

    def relocate(self, refs: list[int]) -> None:
        """New references, in natural order, after the file was rewritten."""
        with self._lock:
            if len(refs) != len(self._locs):
                raise ValueError("relocate: one reference per document expected")
            self._refs = array("Q", refs)
            self._locs = dict(zip(self._locs, range(len(refs)), strict=True))

    def export_state(self) -> dict[str, Any]:
        """The in-memory indexes as columns, for a checkpoint (`standin_checkpoint`): ids in
        natural order, and everything else as packed arrays of positions among them."""
        with self._lock:
            ids = list(self._locs)
            refs, locs = self._refs, self._locs
            position = {k: i for i, k in enumerate(ids)} if self._holes() else locs
            fields = {}
            for path, index in self._fields.items():
                buckets = index.buckets
                fields[path] = {
                    "values": list(buckets),
                    "sizes": array("q", map(len, buckets.values())),
                    "members": array("q", (position[k] for bucket in buckets.values() for k in bucket)),
                    "irregular": array("q", map(position.__getitem__, index.irregular)),
                }
            return {
                "ids": ids,
                "refs": array("Q", (refs[slot] for slot in locs.values())),
                "sorted": {b: array("q", map(position.__getitem__, self._sorted.of(b))) for b in ID_BRACKETS},
                "others": array("q", map(position.__getitem__, self._others)),
                "fields": fields,
            }

    def field_paths(self) -> list[str]:
        """The fields this store keeps an index for."""
        return list(self._fields)

    def _holes(self) -> bool:
        return len(self._refs) != len(self._locs)

    def import_state(self, state: dict[str, Any]) -> None:
        """Fill an empty store from `export_state()` columns. The sorted `_id` index and the
        field indexes are built when first read (an open that reads by `_id` builds none);
        fields no index names are kept too: an index created later then needs no scan."""
        ids: list[Any] = state["ids"]
        with self._lock:
            self._locs = dict(zip(ids, range(len(ids)), strict=True))
            self._refs = array("Q", state["refs"])  # a copy of the packed column (fast)
            self._sorted = SortedIds.from_positions(ids, state["sorted"])
            self._others = {ids[i] for i in state["others"]}
            for path, column in state["fields"].items():
                self._fields[path] = FieldIndex.from_column(path, ids, column)
            self._key_version += 1
            self._plans.clear()

    # ----- planning
    def plan(self, filter: Any) -> Plan | None:
        """What the indexes can say about `filter` (None: scan with mongomock)."""
        if not isinstance(filter, dict):
            return None
        if len(filter) == 1 and "_id" in filter and plain(filter["_id"]):  # keyed writes: short
            doc_id = filter["_id"]
            return Plan(Candidates.of({doc_id} if doc_id in self._locs else set()), True, None)
        conjuncts = flatten_and(filter)
        if conjuncts is None:
            return None
        id_range: Bounds | None = None
        base: list[dict[str, Any]] = []
        for clause in conjuncts:
            bounds = id_bounds(clause)
            if bounds is None:
                base.append(clause)
                continue
            for op, bound in bounds:
                bracket = id_bracket(bound)
                if id_range is None:
                    id_range = Bounds(bracket)  # type: ignore[arg-type]
                if bracket != id_range.bracket:
                    id_range.empty = True
                else:
                    id_range.add(op, bound)
        cache_key = _cache_key(base)
        with self._lock:
            cached = self._plans.get(cache_key) if cache_key is not None else None
            if cached is not None and cached[0] == self._key_version:
                self._plans.move_to_end(cache_key)  # type: ignore[arg-type]
                return Plan(cached[1], cached[2], id_range)
            # terms reach the store through a weak proxy: the plan cache holds them, and a cycle
            # would keep a closed stand-in's indexes alive until the next full garbage collection
            term = build_and(weakref.proxy(self), base) if base else EVERYTHING
            if term is None:
                if id_range is None:
                    return None
                found, exact = Candidates(EVERYTHING), False  # the range narrows; candidates are checked
            else:
                found, exact = Candidates(term), term.exact
            if cache_key is not None:
                self._plans[cache_key] = (self._key_version, found, exact)
                while len(self._plans) > _PLAN_CACHE:
                    self._plans.popitem(last=False)
            return Plan(found, exact, id_range)

    def _candidates(self, plan: Plan) -> Collection[Any] | None:
        with self._lock:
            return plan.found.ids()

    # ----- answering
    def select(self, filter: Any) -> Iterator[dict[str, Any]] | None:
        """Matching documents in natural order (None: let mongomock scan)."""
        plan = self.plan(filter)
        if plan is None:
            return None
        return self._matching(plan, filter, self._natural_ids(plan))

    def select_pairs(self, filter: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]] | None:
        """(document, an independent copy of it) of each match, in natural order (None: scan).

        Both are decoded from the stored bytes: cheaper than mongomock's `copy.deepcopy`.
        """
        plan = self.plan(filter)
        if plan is None:
            return None
        return self._pairs(plan, filter, self._natural_ids(plan))

    def _pairs(self, plan: Plan, filter: Any, keys: list[Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        from mongomock.filtering import filter_applies

        for key in keys:
            with self._lock:
                slot = self._locs.get(key)
                if slot is None:
                    continue
                raw = self._blobs.get(self._refs[slot])
            doc = _decode(raw)
            if plan.exact or filter_applies(filter, doc):
                yield doc, _decode(raw)

    def window(
        self, filter: Any, id_order: int | None, limit: int | None, *, tz_aware: bool = False, ids_only: bool = False
    ) -> list[dict[str, Any]] | None:
        """The first `limit` matches in `_id` order (1 / -1) or natural order (None).

        With `tz_aware`, dates come back aware (UTC), as a `tz_aware` client returns them. With
        `ids_only` (a projection of `_id` alone), an exact plan decodes no document.
        """
        if id_order is None and limit is None and not ids_only:
            return None
        plan = self.plan(filter)
        if plan is None:
            return None
        if id_order is None:
            keys: Iterable[Any] = self._natural_ids(plan)
        else:
            ordered = self._ordered_ids(plan, reverse=id_order < 0)
            if ordered is None:
                return None
            keys = ordered
        if plan.exact:  # every candidate matches: read just the window, in one go
            window = list(itertools.islice(keys, limit))
            if ids_only and all(type(k) in _PLAIN_IDS for k in window):
                return [{"_id": k} for k in window]
            return self.get_many(window, tz_aware)
        found = self._matching(plan, filter, keys)
        if tz_aware:
            from mongomock import helpers

            found = map(helpers.make_datetime_timezone_aware_in_document, found)
        return list(itertools.islice(found, limit))

    def sorted_window(
        self, filter: Any, path: str, direction: int, limit: int | None, *, tz_aware: bool = False
    ) -> list[dict[str, Any]] | None:
        """The first `limit` matches sorted on one indexed field (None: let mongomock sort).

        mongomock's order: by bracket and value (missing as None), ties in natural order in both
        directions (a stable sort). Walks the field's sorted values from the wanted end and keeps
        each value's matching documents, so `find(...).sort(f, -1).limit(1)` reads one bucket
        or a few, not the collection. Refused (None) when the field holds booleans, or arrays
        among the candidates (mongomock sorts those by their first element), or with no limit.
        """
        index = self._fields.get(path)
        if index is None or not limit:
            return None
        plan = self.plan(filter)
        if plan is None:
            return None
        from mongomock.filtering import filter_applies

        out: list[dict[str, Any]] = []
        with self._lock:
            rng = plan.id_range
            if rng is not None and rng.empty:
                return []
            if not index.sortable() or (index.irregular and self._any_candidate(plan, index.irregular)):
                return None
            locs = self._locs
            for value in index.sorted_values(reverse=direction < 0):
                bucket = index.buckets[value]
                if plan.term is EVERYTHING:
                    members: Collection[Any] = bucket
                elif plan.found.built:
                    ids = plan.found.ids()
                    assert ids is not None
                    members = [k for k in bucket if k in ids] if len(bucket) <= len(ids) else [k for k in ids if k in bucket]
                else:
                    members = plan.term.keep(bucket)
                keys = sorted((k for k in members if rng is None or rng.contains(k)), key=locs.__getitem__)
                if not keys:
                    continue
                if plan.exact:
                    out.extend(self.get_many(keys[: limit - len(out)], tz_aware))
                else:
                    for doc in self.get_many(keys):
                        if filter_applies(filter, doc):
                            out.append(_aware(doc) if tz_aware else doc)
                            if len(out) >= limit:
                                break
                if len(out) >= limit:
                    break
        return out[:limit]

    def _any_candidate(self, plan: Plan, keys: set[Any]) -> bool:
        if plan.term is EVERYTHING:
            return bool(keys)
        if plan.found.built:
            ids = plan.found.ids()
            return ids is None or any(k in ids for k in keys)
        return bool(plan.term.keep(keys))

    def count(self, filter: Any) -> int | None:
        """How many documents match, when the indexes know exactly (None otherwise)."""
        plan = self.plan(filter)
        if plan is None or not plan.exact:
            return None
        with self._lock:
            ids = self._candidates(plan)
            rng = plan.id_range
            if rng is None:
                return len(self._locs) if ids is None else len(ids)
            if rng.empty:
                return 0
            if ids is None:
                i, j = rng.span(self._sorted.of(rng.bracket))
                return j - i
            return sum(1 for k in ids if rng.contains(k))

    def _matching(self, plan: Plan, filter: Any, keys: Iterable[Any]) -> Iterator[dict[str, Any]]:
        from mongomock.filtering import filter_applies

        for key in keys:
            doc = self.get(key)
            if doc is None:
                continue
            if plan.exact or filter_applies(filter, doc):
                yield doc

    def _natural_ids(self, plan: Plan) -> list[Any]:
        rng = plan.id_range
        with self._lock:
            if rng is not None and rng.empty:
                return []
            ids = self._candidates(plan)
            locs = self._locs
            if ids is None:
                keys = list(locs)
            else:
                keys = sorted((k for k in ids if k in locs), key=locs.__getitem__)
        if rng is not None:
            keys = [k for k in keys if rng.contains(k)]
        return keys

    def _ordered_ids(self, plan: Plan, reverse: bool) -> Iterator[Any] | None:
        """Candidate ids in `_id` order, lazily (None: an unsortable id is among them)."""
        rng = plan.id_range
        with self._lock:
            ids = self._candidates(plan)
            if rng is not None:
                if rng.empty:
                    return iter(())
                brackets: tuple[int, ...] = (rng.bracket,)
            else:
                if self._others and (ids is None or not self._others.isdisjoint(ids)):
                    return None
                brackets = ID_BRACKETS
        if reverse:
            brackets = brackets[::-1]
        return (k for b in brackets for k in self._bracket_ids(plan, ids, b, rng, reverse))

    def _bracket_ids(
        self, plan: Plan, members: Collection[Any] | None, bracket: int, rng: Bounds | None, reverse: bool
    ) -> Iterator[Any]:
        """Candidates of one bracket in order: a page costs what it returns, not the collection.

        A small candidate set is sorted once per plan (cached with it) and bisected; a large one
        (or none: every document) is checked while walking the sorted `_id` index.
        """
        if members is not None and len(members) * 8 < len(self._locs):
            with self._lock:
                ordered = plan.found.sorted.get(bracket)
                if ordered is None:
                    ordered = sorted(k for k in members if id_bracket(k) == bracket and k in self._locs)
                    plan.found.sorted[bracket] = ordered
            a, b = rng.span(ordered) if rng is not None else (0, len(ordered))
            positions = range(b - 1, a - 1, -1) if reverse else range(a, b)
            yield from (ordered[i] for i in positions)
            return
        for keys in self._walk(bracket, rng, reverse):
            if members is None:
                yield from keys
            else:
                yield from (k for k in keys if k in members)

    def _walk(self, bracket: int, rng: Bounds | None, reverse: bool) -> Iterator[list[Any]]:
        """The sorted `_id` index within `rng`, in growing batches read under the lock."""
        lo, lo_incl, hi, hi_incl = (rng.lo, rng.lo_incl, rng.hi, rng.hi_incl) if rng else (None, True, None, True)
        batch = 256
        while True:
            with self._lock:
                found = self._sorted.of(bracket).irange(lo, hi, (lo_incl, hi_incl), reverse=reverse)
                keys = list(itertools.islice(found, batch))
            if not keys:
                return
            yield keys
            if len(keys) < batch:
                return
            if reverse:
                hi, hi_incl = keys[-1], False
            else:
                lo, lo_incl = keys[-1], False
            batch = min(batch * 2, 16_384)

    def group_counts(self, match: Any, spec: dict[str, Any]) -> list[dict[str, Any]] | None:
        """`$group` by indexed string fields with `{$sum: 1}` counts (None: not answerable)."""
        shape = _group_shape(spec)
        if shape is None:
            return None
        names, paths, accumulators = shape
        if any(p not in self._fields for p in paths):
            return None
        plan = self.plan(match if match is not None else {})
        if plan is None or not plan.exact:
            return None
        with self._lock:
            ids = self._candidates(plan)
            if plan.id_range is not None:
                base = list(self._locs) if ids is None else ids
                ids = {k for k in base if plan.id_range.contains(k)}
            counts = self._count_groups([self._fields[p] for p in paths], ids)
        if counts is None:
            return None
        out = []
        # every group value is a string (`_count_groups`), and the `_id`s share their keys, so
        # mongomock's BSON order (`BsonComparable`) is the order of the value tuples
        for values in sorted(counts):
            doc: dict[str, Any] = {name: counts[values] for name in accumulators}
            doc["_id"] = values[0] if names is None else dict(zip(names, values, strict=True))
            out.append(doc)
        return out

    def _nested_counts(
        self, outer: FieldIndex, inner: FieldIndex, ids: Collection[Any] | None
    ) -> dict[tuple[Any, ...], int] | None:
        """(outer, inner) counts when every inner bucket lies in one outer bucket (documents
        within companies): one count per inner value, not one step per document. None when a
        bucket straddles outer values (or a value is not a string)."""
        view = None if ids is None else _as_keys(ids)
        counts: dict[tuple[Any, ...], int] = {}
        for value, bucket in inner.buckets.items():
            n = len(bucket) if view is None else len(bucket.keys() & view)
            if not n:
                continue
            regular, top = self.forward(next(iter(bucket)), outer.path)
            if not regular or type(value) is not str or type(top) is not str:
                return None
            if not _nested_in(bucket, outer.buckets.get(top)):
                return None
            counts[(top, value)] = n
        return counts

    def _count_groups(self, indexes: list[FieldIndex], ids: Collection[Any] | None) -> dict[tuple[Any, ...], int] | None:
        for index in indexes:
            if index.irregular and (ids is None or not index.irregular.isdisjoint(ids)):
                return None
        if len(indexes) == 1:
            counts: dict[tuple[Any, ...], int] = {}
            for value, bucket in indexes[0].buckets.items():
                n = len(bucket) if ids is None else len(bucket.keys() & ids)
                if n:
                    if type(value) is not str:
                        return None
                    counts[(value,)] = n
            return counts
        if len(indexes) == 2:
            for outer, inner in ((0, 1), (1, 0)):
                nested = self._nested_counts(indexes[outer], indexes[inner], ids)
                if nested is not None:
                    return {(k if outer == 0 else k[::-1]): n for k, n in nested.items()}
        keys: dict[Any, tuple[Any, ...]] = {}
        for depth, index in enumerate(indexes):
            for value, bucket in index.buckets.items():
                members = bucket.keys() if ids is None else bucket.keys() & ids
                if members and type(value) is not str:
                    return None
                for k in members:
                    if depth == 0:
                        keys[k] = (value,)
                    else:
                        keys[k] = (*keys[k], value)
        return dict(collections.Counter(keys.values()))


def _nested_in(inner: dict[Any, None], outer: dict[Any, None] | None) -> bool:
    return outer is not None and inner.keys() <= outer.keys()


def _aware(doc: dict[str, Any]) -> dict[str, Any]:
    from mongomock import helpers

    return helpers.make_datetime_timezone_aware_in_document(doc)  # type: ignore[no-any-return]


def _as_keys(ids: Collection[Any]) -> Any:
    """A set-like view of ids for C-level `&` (a bucket's keys, or a set)."""
    if isinstance(ids, dict):
        return ids.keys()
    return ids if isinstance(ids, set | frozenset) else set(ids)


_PLAIN_IDS = frozenset({str, int, float, bson.Int64, bson.ObjectId})  # ids returned as they are keyed


# --------------------------------------------------------------------------- filter shapes


def _cache_key(clauses: list[dict[str, Any]]) -> bytes | None:
    try:
        return bson.encode({"q": clauses})
    except Exception:
        return None


def _group_shape(spec: dict[str, Any]) -> tuple[list[str] | None, list[str], list[str]] | None:
    """(output names or None for a single field, field paths, count accumulators)."""
    group_id = spec.get("_id")
    accumulators = [k for k in spec if k != "_id"]
    for name in accumulators:
        acc = spec[name]
        if not isinstance(acc, dict) or list(acc) != ["$sum"] or type(acc["$sum"]) is not int or acc["$sum"] != 1:
            return None
    if isinstance(group_id, str):
        if not group_id.startswith("$") or group_id.startswith("$$"):
            return None
        return None, [group_id[1:]], accumulators
    if isinstance(group_id, dict) and group_id:
        names = list(group_id)
        paths = []
        for name in names:
            expr = group_id[name]
            if name.startswith("$") or not isinstance(expr, str) or not expr.startswith("$") or expr.startswith("$$"):
                return None
            paths.append(expr[1:])
        return names, paths, accumulators
    return None


# --------------------------------------------------------------------------- mongomock wiring

_PLAIN_STORE: Any = None
_INDEXED_STORE: Any = None


def collection_store_class() -> Any:
    """`IndexedCollectionStore` as a subclass of mongomock's `CollectionStore` (built once)."""
    global _INDEXED_STORE, _PLAIN_STORE
    if _INDEXED_STORE is None:
        from mongomock import store

        _PLAIN_STORE = store.CollectionStore

        class _Store(IndexedCollectionStore, store.CollectionStore):  # type: ignore[misc]
            def __init__(self, name: str, blobs: Any = None) -> None:
                self._setup(name, blobs)

        _Store.__name__ = _Store.__qualname__ = "IndexedCollectionStore"
        _INDEXED_STORE = _Store
    return _INDEXED_STORE


def plain_collection_store_class() -> Any:
    """mongomock's own `CollectionStore` (scans everything; the reference in tests)."""
    collection_store_class()
    return _PLAIN_STORE


def database_store(blobs: Any) -> Any:
    """A mongomock `DatabaseStore` whose collections keep their documents in `blobs`."""
    from mongomock import store

    cls = collection_store_class()

    class _DatabaseStore(store.DatabaseStore):  # type: ignore[misc]
        blobs: Any = None

        def __getitem__(self, col_name: str) -> Any:
            col = self._collections.get(col_name)
            if col is None:
                col = self._collections[col_name] = cls(col_name, self.blobs)
            return col

        def rename(self, name: str, new_name: str) -> None:
            col = self._collections.pop(name, None) or cls(new_name, self.blobs)
            col.name = new_name
            self._collections[new_name] = col

        def reset(self, new_blobs: Any) -> None:
            """Every collection emptied in place, over `new_blobs` (see `IndexedCollectionStore.reset`)."""
            self.blobs = new_blobs
            for col in self._collections.values():
                col.reset(new_blobs)

    db = _DatabaseStore()
    db.blobs = blobs
    return db


__all__ = [
    "Candidates",
    "IndexedCollectionStore",
    "MemoryBlobs",
    "Plan",
    "StandinFileError",
    "collection_store_class",
    "database_store",
    "index_fields",
    "plain_collection_store_class",
    "store_key",
]
