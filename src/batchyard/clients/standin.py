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
`os.pread`) would be slower for the snapshot's `_id`-order reads. So the query language stays mongomock's, and only its storage is
replaced.

What replaces it (`IndexedCollectionStore`, a mongomock `CollectionStore`):

- Documents are kept BSON-encoded and decoded on access, in a blob holder: the persisted
  stand-in's file (`standin_file.LogFile`: only each document's place in the file is in memory)
  or, for a plain `mongomock.MongoClient()` after `patch_mongomock()`, `MemoryBlobs`.
- Hash indexes (value -> set of ids) on every field named by the collection's indexes, and a
  sorted `_id` index per BSON type bracket (numbers, strings, ObjectIds;
  `sortedcontainers.SortedList`), all maintained on insert, update and delete.
- `plan(filter)` answers equality / `$in` / `$eq` on indexed fields and `_id`, `_id` ranges,
  and their `$and` / `$or` combinations from those indexes. When every condition was answered
  exactly, no document is decoded to filter it; otherwise the candidates are checked with
  mongomock's own `filter_applies`; a filter it cannot narrow at all falls back to mongomock's
  scan. Equality follows mongomock (Python `==`: 1, 1.0 and True are equal; missing equals
  None); a document whose indexed value is not a plain scalar (array, sub-document, date) makes
  lookups on that field check their candidates.
- Candidate sets of a filter are cached until an indexed value changes (marks and result
  payloads never do), so the snapshot's pages cost O(page), not O(collection); `count_documents`
  and `$group` counts by indexed string fields are answered from the indexes alone.

mongomock updates documents in place (`_update` mutates the dict it got from the store). The
store hands out decoded copies, so the update is written back in the `_ensure_uniques` hook that
mongomock calls after every in-place change (see `sync`). `standin_mongomock` routes mongomock's
`Collection` and `Cursor` to this store.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import functools
import itertools
import threading
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import bson
import bson.errors
from bson import ObjectId
from bson.codec_options import CodecOptions
from sortedcontainers import SortedList

_REF_BITS = 96  # a location: seq << 96 | blob reference (seq keeps mongomock's natural order)
_REF_MASK = (1 << _REF_BITS) - 1
_PLAN_CACHE = 8

# mongomock's compare-type codes of the `_id` brackets kept sorted, in BSON sort order
_NUM, _STR, _OID = 10, 15, 35
_BRACKETS = (_NUM, _STR, _OID)
_RANGE_OPS = ("$gt", "$gte", "$lt", "$lte")


class StandinFileError(Exception):
    """The stand-in file cannot be read or written (the message says why)."""


# --------------------------------------------------------------------------- values


class _Irregular(Exception):
    """A document value the hash index cannot represent exactly."""


_PLAIN_TYPES = frozenset({type(None), str, int, bool, bson.Int64, ObjectId})


def _plain(value: Any) -> bool:
    """A value whose Python `==` and hash agree with mongomock's equality (None, str, number, oid)."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return True
    return kind is float and value == value  # NaN never equals itself


def _bracket(value: Any) -> int | None:
    """The sorted `_id` bracket of a value (None: kept unsorted)."""
    kind = type(value)
    if kind is str:
        return _STR
    if kind is int or kind is bson.Int64 or (kind is float and value == value):
        return _NUM
    if kind is ObjectId:
        return _OID
    return None


def _field_value(doc: dict[str, Any], path: str) -> Any:
    """The indexed value of `path`: missing is None; arrays and odd parents are irregular."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict):
            raise _Irregular
        if part not in cur:
            return None
        cur = cur[part]
    if not _plain(cur):
        raise _Irregular
    return cur


def _pack(seq: int, ref: int) -> int:
    return (seq << _REF_BITS) | ref


def _pack_keys(doc_id: Any, keys: dict[str, tuple[bool, Any]]) -> dict[str, Any]:
    """Index keys as persisted: `{"_id": id, path: [value] (or [] when irregular)}`."""
    out: dict[str, Any] = {"_id": doc_id}
    for path, (regular, value) in keys.items():
        out[path] = [value] if regular else []
    return out


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

    The blob interface (also `standin_file.LogFile`'s): `put(collection, raw, keys) -> ref`,
    `get(ref) -> raw`, `get_many(refs)`, `keys(ref)` (the `keys` given to `put`, if kept), `release(...)` when a
    document is replaced or deleted, and `structure_changed()` after a drop or rename.
    """

    keeps_objects = True

    def __init__(self) -> None:
        self._data: dict[int, bytes | _PyDoc] = {}
        self._next = 0

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


# --------------------------------------------------------------------------- indexes


class _FieldIndex:
    """value -> ids of the documents holding it, for one field path (mongomock equality).

    A bucket is a dict with None values, not a set: CPython's garbage collector stops tracking
    a dict that holds only strings and numbers, while it walks every set on every full
    collection (measured at 1M chunks: 114 ms per full collection with sets, 40 with dicts).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.buckets: dict[Any, dict[Any, None]] = {}
        self.irregular: set[Any] = set()

    def key(self, doc: dict[str, Any]) -> tuple[bool, Any]:
        try:
            return True, _field_value(doc, self.path)
        except _Irregular:
            return False, None

    def add(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        regular, value = key
        if regular:
            bucket = self.buckets.get(value)
            if bucket is None:
                bucket = self.buckets[value] = {}
            bucket[doc_id] = None
        else:
            self.irregular.add(doc_id)

    def remove(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        regular, value = key
        if not regular:
            self.irregular.discard(doc_id)
            return
        bucket = self.buckets.get(value)
        if bucket is not None:
            bucket.pop(doc_id, None)
            if not bucket:
                del self.buckets[value]

    def lookup(self, values: Iterable[Any]) -> tuple[Collection[Any], bool]:
        """Ids whose value equals one of `values` (+ irregular ones), and whether that is exact.

        One value: the bucket itself, not a copy (read it, never change it): a unique check on
        (task, task_version, unit_id) must not copy every result of the task.
        """
        wanted = list(dict.fromkeys(values))
        if len(wanted) == 1 and not self.irregular:
            return self.buckets.get(wanted[0], {}), True
        found: set[Any] = set()
        for value in wanted:
            bucket = self.buckets.get(value)
            if bucket:
                found.update(bucket)
        if self.irregular:
            return found | self.irregular, False
        return found, True


class _Range:
    """A conjunction of `_id` bounds within one type bracket."""

    def __init__(self, bracket: int) -> None:
        self.bracket = bracket
        self.lo: Any = None
        self.lo_incl = True
        self.hi: Any = None
        self.hi_incl = True
        self.empty = False

    def add(self, op: str, bound: Any) -> None:
        if op in ("$gt", "$gte"):
            incl = op == "$gte"
            if self.lo is None or bound > self.lo or (bound == self.lo and not incl):
                self.lo, self.lo_incl = bound, incl
        else:
            incl = op == "$lte"
            if self.hi is None or bound < self.hi or (bound == self.hi and not incl):
                self.hi, self.hi_incl = bound, incl

    def contains(self, value: Any) -> bool:
        if _bracket(value) != self.bracket:
            return False
        if self.lo is not None and (value < self.lo or (value == self.lo and not self.lo_incl)):
            return False
        return not (self.hi is not None and (value > self.hi or (value == self.hi and not self.hi_incl)))

    def span(self, keys: list[Any] | SortedList) -> tuple[int, int]:
        """Positions [i, j) of the range within sorted `keys` (all of this bracket)."""
        if isinstance(keys, SortedList):
            left, right = keys.bisect_left, keys.bisect_right
        else:
            left, right = functools.partial(bisect.bisect_left, keys), functools.partial(bisect.bisect_right, keys)
        i = 0 if self.lo is None else (left if self.lo_incl else right)(self.lo)
        j = len(keys) if self.hi is None else (right if self.hi_incl else left)(self.hi)
        return i, max(i, j)


class Plan:
    """What the indexes say about a filter: candidate ids, an `_id` range, and exactness."""

    def __init__(self, ids: Collection[Any] | None, exact: bool, id_range: _Range | None, cache_key: bytes | None) -> None:
        self.ids = ids  # None: every document; a set, or an index bucket (read-only)
        self.exact = exact  # True: every candidate within the range matches the filter
        self.id_range = id_range
        self.cache_key = cache_key
        self.sorted: dict[int, list[Any]] = {}  # per bracket, the sorted candidates (lazy)


# --------------------------------------------------------------------------- the store


class IndexedCollectionStore:
    """A mongomock `CollectionStore` over encoded documents with hash and sorted `_id` indexes.

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
        self._locs = {}
        self._seq = 0
        self._sorted: dict[int, SortedList] = {b: SortedList() for b in _BRACKETS}
        self._others: set[Any] = set()
        self._fields: dict[str, _FieldIndex] = {}
        self._key_version = 0  # bumped whenever a candidate set could change
        self._plans: collections.OrderedDict[bytes, tuple[int, Plan]] = collections.OrderedDict()
        self._last_set: Any = None
        self._loading = False

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

    def drop(self) -> None:
        with self._lock:
            for loc in self._locs.values():
                self._blobs.release(self._name, loc & _REF_MASK, None, False)
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
            loc = self._locs[key]
            doc_id, old = self._old(loc)
            self._blobs.release(self._name, loc & _REF_MASK, doc_id, True)
            del self._locs[key]
            self._unindex(key, old)
            bracket = _bracket(key)
            if bracket is None:
                self._others.discard(key)
            else:
                self._sorted[bracket].remove(key)
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
    def get(self, key: Any, tz_aware: bool = False) -> dict[str, Any] | None:
        """The decoded document stored under `key` (a fresh dict), or None."""
        with self._lock:
            loc = self._locs.get(key)
            if loc is None:
                return None
            raw = self._blobs.get(loc & _REF_MASK)
        return _decode(raw, tz_aware)

    def get_many(self, keys: list[Any], tz_aware: bool = False) -> list[dict[str, Any]]:
        """The decoded documents stored under `keys` (missing ones left out), in that order."""
        with self._lock:
            locs = self._locs
            refs = [locs[k] & _REF_MASK for k in keys if k in locs]
            raws = self._blobs.get_many(refs)
        return [_decode(raw, tz_aware) for raw in raws]

    def _decode(self, loc: int) -> dict[str, Any]:
        return _decode(self._blobs.get(loc & _REF_MASK))

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
            loc = self._locs.get(key)
            if loc is None:
                seq = self._seq
                self._seq += 1
                self._add_key(key)
                self._key_version += 1
            else:
                seq = loc >> _REF_BITS
                _, old = self._old(loc)
                if old != keys:
                    self._key_version += 1
                self._unindex(key, old)
                self._blobs.release(self._name, loc & _REF_MASK, key, False)
            self._locs[key] = _pack(seq, ref)
            self._index(key, keys)

    def _add_key(self, key: Any) -> None:
        bracket = _bracket(key)
        if bracket is None:
            self._others.add(key)
        elif not self._loading:
            self._sorted[bracket].add(key)

    def _keys_of(self, doc: dict[str, Any]) -> dict[str, tuple[bool, Any]]:
        """The document's key in each field index."""
        return {path: index.key(doc) for path, index in self._fields.items()}

    def _old(self, loc: int) -> tuple[Any, dict[str, tuple[bool, Any]]]:
        """(`_id`, index keys) of a stored document, from its stored keys when they cover them."""
        stored = self._blobs.keys(loc & _REF_MASK)
        if stored is not None and self.covers(stored):
            return stored.get("_id"), self._unpack_keys(stored)
        doc = self._decode(loc)
        return doc.get("_id"), self._keys_of(doc)

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
        """One hash index per field named by the collection's indexes (built over the data)."""
        wanted: set[str] = set()
        for spec in self._index_specs.values():
            for field, _direction in spec.get("key", []):
                if field != "_id" and not field.startswith("$") and "$" not in field:
                    wanted.add(field)
        with self._lock:
            for field in list(self._fields):
                if field not in wanted:
                    del self._fields[field]
            new = [_FieldIndex(f) for f in sorted(wanted - set(self._fields))]
            if new and self._locs and not self._loading:
                for key, loc in self._locs.items():
                    doc = self._decode(loc)
                    for index in new:
                        index.add(key, index.key(doc))
            for index in new:
                self._fields[index.path] = index
            self._key_version += 1
            self._plans.clear()

    # ----- loading and relocating (used by the persisted stand-in)
    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def begin_load(self) -> None:
        self._loading = True

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
        loc = self._locs.get(key)
        if loc is None:
            seq = self._seq
            self._seq = seq + 1
            if _bracket(key) is None:
                self._others.add(key)
        else:  # an update appended later in the file
            seq = loc >> _REF_BITS
            self._unindex(key, self._old(loc)[1])
            self._blobs.release(self._name, loc & _REF_MASK, key, False)
        self._locs[key] = (seq << _REF_BITS) | ref
        for path, index in fields.items():
            value = stored[path]
            if value:
                bucket = index.buckets.get(value[0])
                if bucket is None:
                    bucket = index.buckets[value[0]] = {}
                bucket[key] = None
            else:
                index.irregular.add(key)
        return True

    def load_delete(self, doc_id: Any) -> None:
        key = store_key(doc_id)
        loc = self._locs.pop(key, None)
        if loc is None:
            return
        self._unindex(key, self._old(loc)[1])
        self._others.discard(key)
        self._blobs.release(self._name, loc & _REF_MASK, key, False)

    def end_load(self) -> None:
        by_bracket: dict[int, list[Any]] = {b: [] for b in _BRACKETS}
        for key in self._locs:
            bracket = _bracket(key)
            if bracket is not None:
                by_bracket[bracket].append(key)
        self._sorted = {b: SortedList(keys) for b, keys in by_bracket.items()}
        self._loading = False
        self._key_version += 1
        self._plans.clear()

    def refs(self) -> list[int]:
        """The blob references of the documents, in natural order."""
        return [loc & _REF_MASK for loc in self._locs.values()]

    def relocate(self, refs: list[int]) -> None:
        """New references, in natural order, after the file was rewritten."""
        with self._lock:
            for key, ref in zip(list(self._locs), refs, strict=True):
                self._locs[key] = _pack(self._locs[key] >> _REF_BITS, ref)

    # ----- planning
    def plan(self, filter: Any) -> Plan | None:
        """What the indexes can say about `filter` (None: scan with mongomock)."""
        if not isinstance(filter, dict):
            return None
        if len(filter) == 1 and "_id" in filter and _plain(filter["_id"]):  # keyed writes: short
            doc_id = filter["_id"]
            return Plan({doc_id} if doc_id in self._locs else set(), True, None, None)
        conjuncts = _flatten_and(filter)
        if conjuncts is None:
            return None
        id_range: _Range | None = None
        base: list[dict[str, Any]] = []
        for clause in conjuncts:
            bounds = _id_bounds(clause)
            if bounds is None:
                base.append(clause)
                continue
            for op, bound in bounds:
                bracket = _bracket(bound)
                if id_range is None:
                    id_range = _Range(bracket)  # type: ignore[arg-type]
                if bracket != id_range.bracket:
                    id_range.empty = True
                else:
                    id_range.add(op, bound)
        cache_key = _cache_key(base)
        with self._lock:
            cached = self._plans.get(cache_key) if cache_key is not None else None
            if cached is not None and cached[0] == self._key_version:
                self._plans.move_to_end(cache_key)  # type: ignore[arg-type]
                hit = cached[1]
                plan = Plan(hit.ids, hit.exact, id_range, cache_key)
                plan.sorted = hit.sorted
                return plan
            found = self._plan_and(base) if base else (None, True)
            if found is None:
                if id_range is None:
                    return None
                found = (None, False)  # the range narrows; every candidate is checked
            plan = Plan(found[0], found[1], id_range, cache_key)
            if cache_key is not None:
                self._plans[cache_key] = (self._key_version, plan)
                while len(self._plans) > _PLAN_CACHE:
                    self._plans.popitem(last=False)
            return plan

    def _plan_and(self, clauses: list[dict[str, Any]]) -> tuple[Collection[Any] | None, bool] | None:
        """Intersection of what each clause says (None: nothing narrows it)."""
        sets: list[Collection[Any]] = []
        exact = True
        for clause in clauses:
            for key, value in clause.items():
                part = self._plan_term(key, value)
                if part is None:
                    exact = False
                    continue
                ids, part_exact = part
                exact = exact and part_exact
                if ids is not None:
                    sets.append(ids)
        if not sets:
            return (None, exact) if exact else None
        sets.sort(key=len)
        smallest, rest = sets[0], sets[1:]
        if not rest:
            return smallest, exact
        return {k for k in smallest if all(k in other for other in rest)}, exact

    def _plan_term(self, key: str, value: Any) -> tuple[Collection[Any] | None, bool] | None:
        if key == "$and":
            if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
                return None
            return self._plan_and(list(value))
        if key == "$or":
            return self._plan_or(value)
        if key == "$comment":
            return None, True
        if key.startswith("$"):
            return None
        values = _equality_values(value)
        if values is None:
            return None
        if key == "_id":
            return {v for v in values if v in self._locs}, True
        index = self._fields.get(key)
        if index is None:
            return None
        return index.lookup(values)

    def _plan_or(self, value: Any) -> tuple[Collection[Any] | None, bool] | None:
        if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
            return None
        union: set[Any] = set()
        exact = True
        for clause in value:
            part = self._plan_and([clause]) if clause else (None, True)
            if part is None:
                return None
            ids, part_exact = part
            if ids is None:  # this clause alone matches everything (or cannot narrow)
                return (None, True) if part_exact else None
            exact = exact and part_exact
            union.update(ids)
        return union, exact

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
                loc = self._locs.get(key)
                if loc is None:
                    continue
                raw = self._blobs.get(loc & _REF_MASK)
            doc = _decode(raw)
            if plan.exact or filter_applies(filter, doc):
                yield doc, _decode(raw)

    def window(
        self, filter: Any, id_order: int | None, limit: int | None, *, tz_aware: bool = False
    ) -> list[dict[str, Any]] | None:
        """The first `limit` matches in `_id` order (1 / -1) or natural order (None).

        With `tz_aware`, dates come back aware (UTC), as a `tz_aware` client returns them.
        """
        if id_order is None and limit is None:
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
            return self.get_many(list(itertools.islice(keys, limit)), tz_aware)
        else:
            found = self._matching(plan, filter, keys)
            if tz_aware:
                from mongomock import helpers

                found = map(helpers.make_datetime_timezone_aware_in_document, found)
        return list(itertools.islice(found, limit))

    def count(self, filter: Any) -> int | None:
        """How many documents match, when the indexes know exactly (None otherwise)."""
        plan = self.plan(filter)
        if plan is None or not plan.exact:
            return None
        with self._lock:
            rng = plan.id_range
            if rng is None:
                return len(self._locs) if plan.ids is None else len(plan.ids)
            if rng.empty:
                return 0
            if plan.ids is None:
                i, j = rng.span(self._sorted[rng.bracket])
                return j - i
            return sum(1 for k in plan.ids if rng.contains(k))

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
            if plan.ids is None:
                keys = list(self._locs)
            else:
                locs = self._locs
                keys = sorted((k for k in plan.ids if k in locs), key=lambda k: locs[k])
        if rng is not None:
            keys = [k for k in keys if rng.contains(k)]
        return keys

    def _ordered_ids(self, plan: Plan, reverse: bool) -> Iterator[Any] | None:
        """Candidate ids in `_id` order, lazily (None: an unsortable id is among them)."""
        rng = plan.id_range
        with self._lock:
            if rng is not None:
                if rng.empty:
                    return iter(())
                brackets: tuple[int, ...] = (rng.bracket,)
            else:
                if self._others and (plan.ids is None or not self._others.isdisjoint(plan.ids)):
                    return None
                brackets = _BRACKETS
        if reverse:
            brackets = brackets[::-1]
        return (k for b in brackets for k in self._bracket_ids(plan, b, rng, reverse))

    def _bracket_ids(self, plan: Plan, bracket: int, rng: _Range | None, reverse: bool) -> Iterator[Any]:
        """Candidates of one bracket in order: a page costs what it returns, not the collection.

        A small candidate set is sorted once per plan (cached with it) and bisected; a large one
        (or none: every document) is checked while walking the sorted `_id` index.
        """
        members = plan.ids
        if members is not None and len(members) * 8 < len(self._sorted[bracket]):
            with self._lock:
                ordered = plan.sorted.get(bracket)
                if ordered is None:
                    ordered = sorted(k for k in members if _bracket(k) == bracket and k in self._locs)
                    plan.sorted[bracket] = ordered
            a, b = rng.span(ordered) if rng is not None else (0, len(ordered))
            positions = range(b - 1, a - 1, -1) if reverse else range(a, b)
            yield from (ordered[i] for i in positions)
            return
        for keys in self._walk(bracket, rng, reverse):
            if members is None:
                yield from keys
            else:
                yield from (k for k in keys if k in members)

    def _walk(self, bracket: int, rng: _Range | None, reverse: bool) -> Iterator[list[Any]]:
        """The sorted `_id` index within `rng`, in growing batches read under the lock."""
        lo, lo_incl, hi, hi_incl = (rng.lo, rng.lo_incl, rng.hi, rng.hi_incl) if rng else (None, True, None, True)
        batch = 256
        while True:
            with self._lock:
                found = self._sorted[bracket].irange(lo, hi, (lo_incl, hi_incl), reverse=reverse)
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
            ids = plan.ids
            if plan.id_range is not None:
                base = list(self._locs) if ids is None else ids
                ids = {k for k in base if plan.id_range.contains(k)}
            counts = self._count_groups([self._fields[p] for p in paths], ids)
        if counts is None:
            return None
        from mongomock.filtering import BsonComparable

        out = []
        for values, n in counts.items():
            doc: dict[str, Any] = {name: n for name in accumulators}
            doc["_id"] = values[0] if names is None else dict(zip(names, values, strict=True))
            out.append(doc)
        out.sort(key=lambda d: BsonComparable(d["_id"]))
        return out

    def _count_groups(self, indexes: list[_FieldIndex], ids: Collection[Any] | None) -> dict[tuple[Any, ...], int] | None:
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


# --------------------------------------------------------------------------- filter shapes


def _flatten_and(filter: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The top-level conjuncts of a filter, one key each ($and lists flattened)."""
    out: list[dict[str, Any]] = []
    for key, value in filter.items():
        if key == "$and":
            if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
                return None
            for clause in value:
                inner = _flatten_and(clause)
                if inner is None:
                    return None
                out.extend(inner)
        else:
            out.append({key: value})
    return out


def _id_bounds(clause: dict[str, Any]) -> list[tuple[str, Any]] | None:
    """`[(op, bound), ...]` when the clause is only an `_id` range within one sortable bracket."""
    if list(clause) != ["_id"]:
        return None
    value = clause["_id"]
    if not isinstance(value, dict) or not value or not all(op in _RANGE_OPS for op in value):
        return None
    bounds = list(value.items())
    if any(_bracket(b) is None for _, b in bounds):
        return None
    return bounds


def _equality_values(value: Any) -> list[Any] | None:
    """The values an equality / `$eq` / `$in` condition accepts (None: another operator)."""
    if _plain(value):
        return [value]
    if not isinstance(value, dict) or not value or not all(k in ("$eq", "$in") for k in value):
        return None
    accepted: list[Any] | None = None
    for op, arg in value.items():
        if op == "$eq":
            if not _plain(arg):
                return None
            values = [arg]
        else:
            if not isinstance(arg, list | tuple) or not all(_plain(v) for v in arg):
                return None
            values = list(arg)
        accepted = values if accepted is None else [v for v in accepted if v in values]
    return accepted


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
        def __getitem__(self, col_name: str) -> Any:
            col = self._collections.get(col_name)
            if col is None:
                col = self._collections[col_name] = cls(col_name, blobs)
            return col

        def rename(self, name: str, new_name: str) -> None:
            col = self._collections.pop(name, None) or cls(new_name, blobs)
            col.name = new_name
            self._collections[new_name] = col

    return _DatabaseStore()


__all__ = [
    "IndexedCollectionStore",
    "MemoryBlobs",
    "Plan",
    "StandinFileError",
    "collection_store_class",
    "database_store",
    "plain_collection_store_class",
    "store_key",
]
