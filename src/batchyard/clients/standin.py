"""The stand-in's storage engine: mongomock's query language over encoded, indexed documents.

Why this exists. mongomock keeps every document as a Python dict and answers every filter by
scanning all of them: a 1M-chunk stand-in held ~3 GB of dicts, re-validated every document with
`insert_many` on each open, and paid O(n) per `_id`-range page (O(n^2) for a snapshot).

Why mongomock and not another embedded store. The pipeline's pymongo code (bulk_write of
`UpdateOne`, `$set` of dotted paths, upserts against a unique index, `aggregate` `$group`,
`with_options`, `count_documents`) must run unchanged against the stand-in, and mongomock is the
only embedded engine that accepts all of it through the pymongo API. montydb and mongita cover
less of that API and also answer queries by scanning; SQLite (measured: 22 us per random read of a
1.4 KB document against 3.6 us for `os.pread`) would be slower for the snapshot's `_id`-order
reads. So the query language stays mongomock's, and only its storage is replaced.

What replaces it (`IndexedCollectionStore`, a mongomock `CollectionStore`):

- Documents are kept BSON-encoded and decoded on access. The persisted stand-in keeps only
  their place in the file (`_LogFile`, read back with `os.pread`: the page cache holds the bytes,
  not this process); an in-memory store (plain `mongomock.MongoClient()` after
  `patch_mongomock()`) keeps the bytes themselves.
- Hash indexes (value -> set of ids) on every field named by the collection's indexes, a sorted
  `_id` index per BSON type bracket (numbers, strings, ObjectIds; `sortedcontainers.SortedList`),
  all maintained on insert, update and delete.
- `plan(filter)` answers equality / `$in` / `$eq` on indexed fields and `_id`, `_id` ranges,
  and their `$and` / `$or` combinations from those indexes. When every condition was answered
  exactly, no document is decoded to filter it; otherwise the candidates are checked with
  mongomock's own `filter_applies`; a filter it cannot narrow at all falls back to mongomock's
  scan. Equality follows mongomock (Python `==`: 1, 1.0 and True are equal; missing equals None);
  any document whose indexed value is not a plain scalar (arrays, sub-documents, dates) makes
  lookups on that field verify their candidates.
- Candidate sets of a filter are cached until an indexed value changes (marks and results
  payloads never do), so the snapshot's pages cost O(page), not O(collection).

mongomock updates documents in place (`_update` mutates the dict it got from the store). The
store hands out decoded copies, so the update is written back in the `_ensure_uniques` hook that
mongomock calls after every in-place change (`install_indexed_store()` wires it; see `sync`).

Persisted file (`_LogFile`): a stream of BSON documents, appended to between saves:
header `{"format", "version": 2, "database", "collections": meta}`, then
`{"c": collection, "d": document}` (put), `{"c": collection, "x": _id}` (delete) and
`{"commit": n, "collections": meta}` (a save). Records after the last commit are discarded on
open, so a save is atomic: data, fsync, commit record, fsync. When more than half of the file is
superseded records, `save` rewrites it (temporary file, fsync, `os.replace`). Version 1 files
(no commit records) are read and rewritten as version 2 on open.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import functools
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import bson
import bson.errors
from bson import ObjectId
from sortedcontainers import SortedList

FORMAT = "batchyard-mongo-standin"
VERSION = 2
_READ_BLOCK = 16 << 20  # bytes read per step while loading
_TAIL_FLUSH = 4 << 20  # appended bytes buffered before a write
_LEN_BITS = 25  # packed reference: offset << 25 | length (a document is at most 16 MiB)
_REF_BITS = 66  # packed location: seq << 66 | reference
_REF_MASK = (1 << _REF_BITS) - 1
_LEN_MASK = (1 << _LEN_BITS) - 1
_PLAN_CACHE = 8
_REWRITE_GARBAGE = 32 << 20  # a save rewrites the file past this much garbage (and > live)

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


def _decode(raw: bytes | _PyDoc) -> dict[str, Any]:
    if isinstance(raw, _PyDoc):
        return copy.deepcopy(raw.doc)
    return bson.decode(raw)


class MemoryBlobs:
    """Encoded documents held in memory (stores that are not persisted)."""

    keeps_objects = True

    def __init__(self) -> None:
        self._data: dict[int, bytes] = {}
        self._next = 0

    def put(self, collection: str, raw: bytes) -> int:
        ref = self._next
        self._next += 1
        self._data[ref] = raw
        return ref

    def get(self, ref: int) -> bytes:
        return self._data[ref]

    def release(self, collection: str, ref: int, doc_id: Any, deleted: bool) -> None:
        self._data.pop(ref, None)

    def structure_changed(self) -> None:
        """A collection was dropped or renamed (nothing to do in memory)."""


class _LogFile:
    """The stand-in file: an append-only stream of BSON records, made durable by commit records.

    References handed to the stores pack a document's offset and length in the file
    (`offset << 25 | length`); a document appended since the last write is read from `tail`.
    """

    keeps_objects = False

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.fd = -1
        self.disk_end = 0  # bytes on disk
        self.tail = bytearray()  # appended, not yet written
        self.commits = 0
        self.live = 0  # bytes of current records
        self.garbage = 0  # bytes of superseded records
        self.rewrite = False  # the next save must rewrite the whole file

    # ----- the blob interface of IndexedCollectionStore
    def put(self, collection: str, raw: bytes) -> int:
        head = _record_head(collection)
        record_len = 4 + len(head) + len(raw) + 1
        with self.lock:
            self._writable()
            start = self.disk_end + len(self.tail)
            self.tail += record_len.to_bytes(4, "little")
            self.tail += head
            self.tail += raw
            self.tail += b"\x00"
            self.live += record_len
            if len(self.tail) >= _TAIL_FLUSH:
                self._flush()
        return ((start + 4 + len(head)) << _LEN_BITS) | len(raw)

    def get(self, ref: int) -> bytes:
        offset, length = ref >> _LEN_BITS, ref & _LEN_MASK
        if offset >= self.disk_end:
            with self.lock:
                if offset >= self.disk_end:
                    at = offset - self.disk_end
                    return bytes(self.tail[at : at + length])
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise StandinFileError(f"{self.path}: short read at offset {offset}")
        return data

    def release(self, collection: str, ref: int, doc_id: Any, deleted: bool) -> None:
        with self.lock:
            size = 4 + len(_record_head(collection)) + (ref & _LEN_MASK) + 1
            self.live -= size
            self.garbage += size
            if deleted:
                record = bson.encode({"c": collection, "x": doc_id})
                self._writable()
                self.tail += record
                self.garbage += len(record)

    def structure_changed(self) -> None:
        self.rewrite = True

    # ----- writing
    def _writable(self) -> None:
        if os.getpid() != self.pid:
            raise StandinFileError(
                f"{self.path}: this stand-in was opened by process {self.pid}; "
                "a forked process cannot write it (open the store in this process)"
            )

    def _flush(self) -> None:
        if not self.tail:
            return
        view = memoryview(self.tail)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], self.disk_end + written)
        view.release()
        self.disk_end += written
        self.tail = bytearray()

    def commit(self, meta: dict[str, Any]) -> None:
        """Make everything appended so far durable, atomically (one commit record)."""
        with self.lock:
            self._writable()
            self._flush()
            os.fsync(self.fd)
            self.commits += 1
            self.tail += bson.encode({"commit": bson.Int64(self.commits), "collections": meta})
            self._flush()
            os.fsync(self.fd)

    def should_rewrite(self) -> bool:
        return self.rewrite or (self.garbage > self.live and self.garbage > _REWRITE_GARBAGE)

    def rewrite_from(self, stores: dict[str, IndexedCollectionStore], meta: dict[str, Any]) -> None:
        """Write the live documents to a new file and swap it in (temp file, fsync, os.replace)."""
        with self.lock, contextlib.ExitStack() as held:
            self._writable()
            for name in sorted(stores):
                held.enter_context(stores[name]._lock)  # readers must not see half-moved refs
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            moved: list[tuple[IndexedCollectionStore, list[int]]] = []
            try:
                with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
                    header = bson.encode(
                        {"format": FORMAT, "version": VERSION, "database": self.database, "collections": meta}
                    )
                    pos = fh.write(header)
                    for name in sorted(stores):
                        refs, pos = _copy_records(fh, pos, name, stores[name], self.get)
                        moved.append((stores[name], refs))
                    commit = bson.encode({"commit": bson.Int64(1), "collections": meta})
                    fh.write(commit)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.path.parent)
            new_fd = os.open(self.path, os.O_RDWR)
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = new_fd
            for store, refs in moved:
                store._relocate(refs)
            self.disk_end, self.tail = pos + len(commit), bytearray()
            self.live, self.garbage = pos - len(header), len(header) + len(commit)
            self.commits, self.rewrite = 1, False

    def truncate(self, end: int) -> None:
        os.ftruncate(self.fd, end)
        os.fsync(self.fd)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    # ----- reading
    def open_existing(self) -> tuple[dict[str, Any], int, int]:
        """(header, offset of the first record, file size) of the file at `path`."""
        self.fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 4, 0)
        length = int.from_bytes(head, "little") if len(head) == 4 else 0
        try:
            header = bson.decode(os.pread(self.fd, length, 0)) if 5 <= length <= size else {}
        except Exception:
            header = {}
        if header.get("format") != FORMAT:
            raise StandinFileError("file is not a batchyard MongoDB stand-in")
        version = int(header.get("version", 0))
        if version > VERSION:
            raise StandinFileError(f"file format version {version} is newer than this batchyard")
        return header, length, size

    def frames(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of each complete record in [start, end); stops at a torn one."""
        pos, buf, buf_at = start, b"", start
        while pos + 4 <= end:
            rel = pos - buf_at
            if rel + 4 > len(buf):
                buf, buf_at, rel = os.pread(self.fd, min(_READ_BLOCK, end - pos), pos), pos, 0
            length = int.from_bytes(buf[rel : rel + 4], "little")
            if length < 5 or pos + length > end:
                return
            if rel + length > len(buf):
                buf, buf_at, rel = os.pread(self.fd, min(max(_READ_BLOCK, length), end - pos), pos), pos, 0
            record = buf[rel : rel + length]
            if len(record) != length or record[-1] != 0:
                return
            yield pos, record
            pos += length


def _record_head(collection: str) -> bytes:
    """The bytes of a put record between its length and the document: `"c": name, "d":`."""
    name = collection.encode()
    return b"\x02c\x00" + (len(name) + 1).to_bytes(4, "little") + name + b"\x00\x03d\x00"


class StandinDatabase:
    """One database of the stand-in: mongomock over `IndexedCollectionStore`s in a `_LogFile`."""

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database
        self.file = _LogFile(path, database)
        self.db_store: Any = None

    def open(self) -> None:
        """Load the file (or create it); afterwards `client(...)` serves its data."""
        if not self.path.exists():
            self.db_store = database_store(self.file)
            self.file.rewrite_from({}, {})
            return
        header, first, size = self.file.open_existing()
        if int(header.get("version", 0)) < 2:  # no commit records: the whole file is one save
            self._apply(header, first, size, committed_only=False)
            self.file.rewrite = True
            self.save()  # rewritten as version 2 before anything is appended to it
            return
        last = self._apply(header, first, size, committed_only=True)
        if last is None:
            raise StandinFileError("the file has no completed save (no commit record)")
        if last < size:  # records of an interrupted save: not part of any save
            self.file.truncate(last)
            self._apply(header, first, last, committed_only=True)
        self.file.disk_end = last

    def _apply(self, header: dict[str, Any], start: int, end: int, committed_only: bool) -> int | None:
        """Load the records in [start, end) into fresh stores; the end of the last commit."""
        from mongomock import helpers

        self.db_store = database_store(self.file)
        self.file.live, self.file.garbage, self.file.disk_end = 0, start, end
        _apply_meta(self.db_store, header.get("collections") or {})
        loading: dict[str, IndexedCollectionStore] = {}
        last_commit: int | None = None
        meta: dict[str, Any] | None = None
        for pos, record in self.file.frames(start, end):
            try:
                rec = bson.decode(record)
            except Exception as exc:
                if committed_only and last_commit is not None:
                    break  # a torn tail after the last save
                raise StandinFileError(f"corrupt record at offset {pos}: {exc}") from None
            if "commit" in rec:
                last_commit, meta = pos + len(record), rec.get("collections") or {}
                self.file.commits = int(rec["commit"])
                self.file.garbage += len(record)
                continue
            name = rec.get("c")
            if not isinstance(name, str):
                raise StandinFileError(f"corrupt record at offset {pos}: no collection name")
            store = loading.get(name)
            if store is None:
                store = loading[name] = self.db_store[name]
                store.begin_load()
            if "d" in rec:
                head = _record_head(name)
                if record[4 : 4 + len(head)] != head:
                    raise StandinFileError(f"unexpected record layout at offset {pos}")
                doc = rec["d"]
                key = doc.get("_id")
                if isinstance(key, dict):
                    key = helpers.hashdict(key)
                self.file.live += len(record)
                store.load_put(key, doc, ((pos + 4 + len(head)) << _LEN_BITS) | (len(record) - 5 - len(head)))
            elif "x" in rec:
                key = rec["x"]
                self.file.garbage += len(record)
                store.load_delete(helpers.hashdict(key) if isinstance(key, dict) else key)
        for store in loading.values():
            store.end_load()
        if meta is not None:
            _apply_meta(self.db_store, meta)
        return last_commit if committed_only else end

    def meta(self) -> dict[str, Any]:
        """Collections and their index definitions (stored in the header and every commit)."""
        out: dict[str, Any] = {}
        for name in sorted(self.db_store.list_created_collection_names()):
            indexes = []
            for ix_name, spec in self.db_store[name].indexes.items():
                entry = {k: v for k, v in spec.items() if k != "key"}
                entry.update(name=ix_name, keys=[[k, d] for k, d in spec["key"]])
                indexes.append(entry)
            out[name] = {"indexes": indexes}
        return out

    def stores(self) -> dict[str, IndexedCollectionStore]:
        return {name: self.db_store[name] for name in self.db_store.list_created_collection_names()}

    def save(self) -> None:
        """Persist every change atomically (a commit record, or a rewrite when mostly garbage)."""
        meta = self.meta()
        if self.file.should_rewrite():
            self.file.rewrite_from(self.stores(), meta)
        else:
            self.file.commit(meta)

    def close(self) -> None:
        self.file.close()


def _apply_meta(db_store: Any, meta: dict[str, Any]) -> None:
    """Create the collections and indexes a header or commit record lists."""
    for name, info in meta.items():
        store = db_store[name]
        store.create()
        for ix in info.get("indexes", []):
            spec = {k: v for k, v in ix.items() if k not in ("name", "keys")}
            spec["key"] = [(k, d) for k, d in ix["keys"]]
            if not spec.get("unique", True):
                spec.pop("unique")
            if store.indexes.get(ix["name"]) != spec:
                store.create_index(ix["name"], spec)


def _copy_records(
    fh: Any, pos: int, name: str, store: IndexedCollectionStore, read: Callable[[int], bytes]
) -> tuple[list[int], int]:
    """Write one collection's documents in natural order; their new references and the end."""
    head = _record_head(name)
    refs: list[int] = []
    for loc in store._locs.values():
        raw = read(loc & _REF_MASK)
        record_len = 4 + len(head) + len(raw) + 1
        fh.write(record_len.to_bytes(4, "little"))
        fh.write(head)
        fh.write(raw)
        fh.write(b"\x00")
        refs.append(((pos + 4 + len(head)) << _LEN_BITS) | len(raw))
        pos += record_len
    return refs, pos


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- indexes


class _FieldIndex:
    """value -> ids of the documents holding it, for one field path (mongomock equality)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.buckets: dict[Any, set[Any]] = {}
        self.irregular: set[Any] = set()

    def key(self, doc: dict[str, Any]) -> tuple[bool, Any]:
        try:
            return True, _field_value(doc, self.path)
        except _Irregular:
            return False, None

    def add(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        regular, value = key
        if regular:
            self.buckets.setdefault(value, set()).add(doc_id)
        else:
            self.irregular.add(doc_id)

    def remove(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        regular, value = key
        if not regular:
            self.irregular.discard(doc_id)
            return
        bucket = self.buckets.get(value)
        if bucket is not None:
            bucket.discard(doc_id)
            if not bucket:
                del self.buckets[value]

    def lookup(self, values: Iterable[Any]) -> tuple[set[Any], bool]:
        """Ids whose value equals one of `values` (+ irregular ones), and whether that is exact."""
        found: set[Any] = set()
        for value in dict.fromkeys(values):
            bucket = self.buckets.get(value)
            if bucket:
                found = found | bucket if found else set(bucket)
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

    def __init__(self, ids: set[Any] | None, exact: bool, id_range: _Range | None, cache_key: bytes | None) -> None:
        self.ids = ids  # None: every document
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
        self._documents = collections.OrderedDict()  # unused: mongomock's own dict stays empty
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
            old = self._decode(loc)
            self._blobs.release(self._name, loc & _REF_MASK, old.get("_id"), True)
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
        now = mongomock.utcnow()
        expired = [
            key for key in list(self._locs)
            if (doc := self.get(key)) is not None
            and self._value_meets_expiry(doc.get(field), expiry, now)  # type: ignore[attr-defined]
        ]
        for key in expired:
            with contextlib.suppress(KeyError):
                del self[key]

    # ----- reading and writing documents
    def get(self, key: Any) -> dict[str, Any] | None:
        """The decoded document stored under `key` (a fresh dict), or None."""
        with self._lock:
            loc = self._locs.get(key)
            if loc is None:
                return None
            raw = self._blobs.get(loc & _REF_MASK)
        return _decode(raw)

    def _decode(self, loc: int) -> dict[str, Any]:
        return _decode(self._blobs.get(loc & _REF_MASK))

    def sync(self, doc: dict[str, Any]) -> None:
        """Store a document mongomock changed in place (called from `_ensure_uniques`)."""
        if doc is self._last_set:
            self._last_set = None  # just stored by __setitem__ (an insert)
            return
        key = doc.get("_id")
        if isinstance(key, dict):
            from mongomock import helpers

            key = helpers.hashdict(key)
        self._write(key, doc)

    def _write(self, key: Any, doc: dict[str, Any]) -> None:
        raw = _encode(doc, self._blobs.keeps_objects)
        with self._lock:
            ref = self._blobs.put(self._name, raw)  # first: it may refuse (forked process)
            loc = self._locs.get(key)
            if loc is None:
                seq = self._seq
                self._seq += 1
                self._add_key(key)
                self._key_version += 1
            else:
                seq = loc >> _REF_BITS
                old = self._decode(loc)
                if self._unindex(key, old, doc):
                    self._key_version += 1
                self._blobs.release(self._name, loc & _REF_MASK, key, False)
            self._locs[key] = _pack(seq, ref)
            self._index(key, doc)

    def _add_key(self, key: Any) -> None:
        bracket = _bracket(key)
        if bracket is None:
            self._others.add(key)
        elif not self._loading:
            self._sorted[bracket].add(key)

    def _index(self, key: Any, doc: dict[str, Any]) -> None:
        for index in self._fields.values():
            index.add(key, index.key(doc))

    def _unindex(self, key: Any, old: dict[str, Any], new: dict[str, Any] | None = None) -> bool:
        """Remove `key` from the field indexes; True when an indexed value changes."""
        changed = False
        for index in self._fields.values():
            before = index.key(old)
            if new is not None and index.key(new) != before:
                changed = True
            index.remove(key, before)
        return changed or new is None

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
    def begin_load(self) -> None:
        self._loading = True

    def load_put(self, key: Any, doc: dict[str, Any], ref: int) -> None:
        loc = self._locs.get(key)
        if loc is None:
            seq = self._seq
            self._seq += 1
            self._add_key(key)
        else:
            seq = loc >> _REF_BITS
            self._unindex(key, self._decode(loc))
            self._blobs.release(self._name, loc & _REF_MASK, key, False)
        self._locs[key] = _pack(seq, ref)
        self._index(key, doc)

    def load_delete(self, key: Any) -> None:
        loc = self._locs.pop(key, None)
        if loc is None:
            return
        self._unindex(key, self._decode(loc))
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

    def _relocate(self, refs: list[int]) -> None:
        """New references, in natural order, after the file was rewritten."""
        with self._lock:
            for key, ref in zip(list(self._locs), refs, strict=True):
                self._locs[key] = _pack(self._locs[key] >> _REF_BITS, ref)

    # ----- planning
    def plan(self, filter: Any) -> Plan | None:
        """What the indexes can say about `filter` (None: scan with mongomock)."""
        if not isinstance(filter, dict):
            return None
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

    def _plan_and(self, clauses: list[dict[str, Any]]) -> tuple[set[Any] | None, bool] | None:
        """Intersection of what each clause says (None: nothing narrows it)."""
        sets: list[set[Any]] = []
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
        result = sets[0]
        for other in sets[1:]:
            if not result:
                break
            result = result & other
        return result, exact

    def _plan_term(self, key: str, value: Any) -> tuple[set[Any] | None, bool] | None:
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

    def _plan_or(self, value: Any) -> tuple[set[Any] | None, bool] | None:
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
            union |= ids
        return union, exact

    # ----- answering
    def select(self, filter: Any) -> Iterator[dict[str, Any]] | None:
        """Matching documents in natural order (None: let mongomock scan)."""
        plan = self.plan(filter)
        if plan is None:
            return None
        return self._matching(plan, filter, self._natural_ids(plan))

    def window(self, filter: Any, id_order: int | None, limit: int | None) -> list[dict[str, Any]] | None:
        """The first `limit` matches in `_id` order (1 / -1) or natural order (None)."""
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
        out: list[dict[str, Any]] = []
        for doc in self._matching(plan, filter, keys):
            out.append(doc)
            if limit is not None and len(out) >= limit:
                break
        return out

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

    def _ordered_ids(self, plan: Plan, reverse: bool) -> list[Any] | Iterator[Any] | None:
        """Candidate ids in `_id` order (None: an unsortable id is among them)."""
        rng = plan.id_range
        with self._lock:
            if rng is not None:
                if rng.empty:
                    return []
                brackets: tuple[int, ...] = (rng.bracket,)
            else:
                if self._others and (plan.ids is None or not self._others.isdisjoint(plan.ids)):
                    return None
                brackets = _BRACKETS
            parts = [self._bracket_ids(plan, b, rng, reverse) for b in brackets]
        if reverse:
            parts.reverse()
        return (k for part in parts for k in part)

    def _bracket_ids(self, plan: Plan, bracket: int, rng: _Range | None, reverse: bool) -> list[Any]:
        """Candidates of one bracket in order (a snapshot list, taken under the lock)."""
        universe = self._sorted[bracket]
        i, j = rng.span(universe) if rng is not None else (0, len(universe))
        if plan.ids is None:
            keys = list(universe.islice(i, j))
        elif len(plan.ids) * 8 >= len(universe):
            members = plan.ids
            keys = [k for k in universe.islice(i, j) if k in members]
        else:
            ordered = plan.sorted.get(bracket)
            if ordered is None:
                ordered = sorted(k for k in plan.ids if _bracket(k) == bracket and k in self._locs)
                plan.sorted[bracket] = ordered
            a, b = rng.span(ordered) if rng is not None else (0, len(ordered))
            keys = ordered[a:b]
        if reverse:
            keys.reverse()
        return keys

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

    def _count_groups(self, indexes: list[_FieldIndex], ids: set[Any] | None) -> dict[tuple[Any, ...], int] | None:
        for index in indexes:
            if index.irregular and (ids is None or not index.irregular.isdisjoint(ids)):
                return None
        if len(indexes) == 1:
            counts: dict[tuple[Any, ...], int] = {}
            for value, bucket in indexes[0].buckets.items():
                n = len(bucket) if ids is None else len(bucket & ids)
                if n:
                    if type(value) is not str:
                        return None
                    counts[(value,)] = n
            return counts
        keys: dict[Any, tuple[Any, ...]] = {}
        for depth, index in enumerate(indexes):
            for value, bucket in index.buckets.items():
                members = bucket if ids is None else bucket & ids
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


def install_indexed_store() -> None:
    """Route mongomock's collections through `IndexedCollectionStore` (idempotent)."""
    from mongomock import aggregate, store
    from mongomock.collection import Collection, Cursor

    cls = collection_store_class()
    if getattr(Collection, "_batchyard_indexed", False):
        return
    store.CollectionStore = cls  # every new in-memory collection gets the indexes

    orig_iter = Collection._iter_documents
    orig_uniques = Collection._ensure_uniques
    orig_count = Collection.count_documents
    orig_aggregate = Collection.aggregate
    orig_compute = Cursor._compute_results

    def _iter_documents(self: Any, filter: Any) -> Any:
        st = self._store
        if isinstance(st, IndexedCollectionStore):
            found = st.select(filter)
            if found is not None:
                return found
        return orig_iter(self, filter)

    def _ensure_uniques(self: Any, new_data: Any) -> None:
        st = self._store
        if isinstance(st, IndexedCollectionStore):
            st.sync(new_data)
        orig_uniques(self, new_data)

    def count_documents(self: Any, filter: Any, **kwargs: Any) -> int:
        st = self._store
        if isinstance(st, IndexedCollectionStore) and not kwargs:
            n = st.count(filter)
            if n is not None:
                return n
        return int(orig_count(self, filter, **kwargs))

    def aggregate_(self: Any, pipeline: Any, session: Any = None, **kwargs: Any) -> Any:
        st = self._store
        stages = list(pipeline) if isinstance(pipeline, list | tuple) else None
        if isinstance(st, IndexedCollectionStore) and stages and not session:
            match, rest = _leading_match(stages)
            if rest and list(rest[0]) == ["$group"] and isinstance(rest[0]["$group"], dict):
                grouped = st.group_counts(match, rest[0]["$group"])
                if grouped is not None:
                    return aggregate.process_pipeline(grouped, self.database, rest[1:], None)
            if match is not None:
                docs = list(self.find(match))
                return aggregate.process_pipeline(docs, self.database, rest, None)
        return orig_aggregate(self, pipeline, session=session, **kwargs)

    def _compute_results(self: Any, with_limit_and_skip: bool = False) -> Any:
        if not with_limit_and_skip:
            return orig_compute(self, with_limit_and_skip=False)
        key = (self._factory, self._skip, self._limit)
        if getattr(self, "_batchyard_key", None) != key:
            window = _fast_window(self)
            if window is None:
                # mongomock re-slices its whole result list on every next(): slice once instead
                results = orig_compute(self, with_limit_and_skip=False)
                window = results[self._skip :]
                if self._limit:
                    window = window[: abs(self._limit)]
            self._batchyard_key, self._batchyard_window = key, window
        return self._batchyard_window

    Collection._iter_documents = _iter_documents  # type: ignore[method-assign]
    Collection._ensure_uniques = _ensure_uniques  # type: ignore[method-assign]
    Collection.count_documents = count_documents  # type: ignore[method-assign]
    Collection.aggregate = aggregate_  # type: ignore[method-assign]
    Cursor._compute_results = _compute_results  # type: ignore[method-assign]
    Collection._batchyard_indexed = True  # type: ignore[attr-defined]


def _leading_match(stages: list[Any]) -> tuple[Any, list[Any]]:
    first = stages[0]
    if isinstance(first, dict) and list(first) == ["$match"] and isinstance(first["$match"], dict):
        return first["$match"], stages[1:]
    return None, stages


def _fast_window(cursor: Any) -> list[dict[str, Any]] | None:
    """A cursor's (skip, limit) window computed from the indexes (None: mongomock computes it)."""
    st = cursor.collection._store
    if not isinstance(st, IndexedCollectionStore):
        return None
    order = _id_sort(cursor._sort)
    if order is False:
        return None
    limit = None if not cursor._limit else cursor._skip + abs(cursor._limit)
    docs = st.window(cursor._spec, order or None, limit)
    if docs is None:
        return None
    from mongomock import helpers

    coll = cursor.collection
    out = [coll._copy_only_fields(d, cursor._projection, dict) for d in docs[cursor._skip :]]
    if coll.codec_options.tz_aware:
        out = [helpers.make_datetime_timezone_aware_in_document(d) for d in out]
    return out


def _id_sort(sort: Any) -> int | bool:
    """1 / -1 for a sort on `_id` only, 0 for no sort, False for any other sort."""
    if not sort:
        return 0
    items = list(sort.items()) if isinstance(sort, dict) else list(sort)
    if len(items) != 1:
        return False
    field, direction = items[0]
    if field != "_id" or direction not in (1, -1):
        return False
    return int(direction)


__all__ = [
    "FORMAT",
    "VERSION",
    "IndexedCollectionStore",
    "MemoryBlobs",
    "Plan",
    "StandinDatabase",
    "StandinFileError",
    "collection_store_class",
    "database_store",
    "install_indexed_store",
    "plain_collection_store_class",
]
