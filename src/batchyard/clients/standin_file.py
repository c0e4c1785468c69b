"""The stand-in's file: an append-only stream of BSON records, made durable by commit records.

Why a log. Saving 1M documents by rewriting them all took minutes, and keeping them all in memory
took gigabytes. Here a write appends one record (buffered, written in 4 MiB steps); `save()`
appends a commit record; the stores keep only each document's place in the file and read it back
with `os.pread` (the page cache holds the bytes, not this process).

Records (every one a BSON document, so `bson.decode_file_iter` reads the file):

- header, first: `{"format": "batchyard-mongo-standin", "version": 2, "database", "collections"}`;
- put: `{"c": collection, "k": {"_id": id, <indexed path>: [value] or [] when irregular},
  "d": document}`. `k` holds the values the hash indexes need, so opening decodes a few bytes
  per document instead of the whole document;
- delete: `{"c": collection, "x": _id}`;
- commit: `{"commit": n, "collections": {name: {"indexes": [...]}}}`, then a 16-byte trailer
  `{"t": offset of that commit}` so that opening finds the index definitions first.

Opening reads records up to the last commit; records after it (an interrupted save) are
truncated away, so a save is atomic: records, fsync, commit, fsync. When superseded records
reach half the live ones (and pass 32 MiB), `save()` rewrites the file instead: live records copied
verbatim in long runs to a temporary file, fsync, `os.replace`. Version 1 files (no commit
records, no `k`) are read and rewritten once as version 2.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson

from batchyard.clients.standin import IndexedCollectionStore, StandinFileError, database_store
from batchyard.gctune import fewer_collections
from batchyard.storage.perms import fit_to_folder

FORMAT = "batchyard-mongo-standin"
VERSION = 2
_READ_BLOCK = 16 << 20  # bytes read per step while loading or copying
_TAIL_FLUSH = 4 << 20  # appended bytes buffered before a write
_REWRITE_GARBAGE = 32 << 20  # a save rewrites the file past this much garbage (and > live / 2)
_TRAILER_HEAD = (16).to_bytes(4, "little") + b"\x12t\x00"
_KEYS, _DOC, _DELETE = b"\x03k\x00", b"\x03d\x00", b"x\x00"
_GAP = 64 << 10  # records closer than this are read with one pread by get_many
# a reference: record offset << 45 | record length << 20 | where the document starts in it
_LEN_MASK = (1 << 25) - 1
_START_MASK = (1 << 20) - 1


def _ref(offset: int, length: int, doc_start: int) -> int:
    return (offset << 45) | (length << 20) | doc_start


def _unref(ref: int) -> tuple[int, int, int]:
    """(record offset, record length, document start within the record)."""
    return ref >> 45, (ref >> 20) & _LEN_MASK, ref & _START_MASK


def _c_element(collection: str) -> bytes:
    name = collection.encode()
    return b"\x02c\x00" + (len(name) + 1).to_bytes(4, "little") + name + b"\x00"


def _parse_put(record: bytes) -> tuple[dict[str, Any] | None, int]:
    """(the `k` sub-document or None when absent, where the document starts) of a put record."""
    p = 11 + int.from_bytes(record[7:11], "little")
    keys = None
    if record[p : p + 3] == _KEYS:
        size = int.from_bytes(record[p + 3 : p + 7], "little")
        keys = bson.decode(record[p + 3 : p + 3 + size])
        p += 3 + size
    if record[p : p + 3] != _DOC:
        raise StandinFileError("unexpected record layout (no document)")
    return keys, p + 3


class LogFile:
    """The blob holder of a persisted stand-in (see the module docstring).

    A reference packs a record's offset, its length and where its document starts (`_ref`); a
    record appended since the last write is read from `tail`.
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
        self.garbage = 0  # bytes of everything else
        self.rewrite = False  # the next save must rewrite the whole file

    # ----- the blob interface of IndexedCollectionStore
    def put(self, collection: str, raw: bytes, keys: dict[str, Any]) -> int:
        head = _c_element(collection) + _KEYS + bson.encode(keys) + _DOC
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
        return _ref(start, record_len, 4 + len(head))

    def _read(self, offset: int, length: int) -> bytes:
        if offset + length > self.disk_end:
            with self.lock:
                if offset + length > self.disk_end:  # partly or wholly appended, not yet written
                    on_disk = max(0, self.disk_end - offset)
                    head = self._read(offset, on_disk) if on_disk else b""
                    at = offset + on_disk - self.disk_end
                    return head + bytes(self.tail[at : at + length - on_disk])
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise StandinFileError(f"{self.path}: short read at offset {offset}")
        return data

    def get(self, ref: int) -> bytes:
        offset, length, start = _unref(ref)
        return self._read(offset + start, length - start - 1)

    def get_many(self, refs: list[int]) -> list[bytes]:
        """The documents of `refs`, in that order; nearby records are read with one `pread`."""
        out: list[bytes] = [b""] * len(refs)
        places = sorted((ref >> 45, i) for i, ref in enumerate(refs))
        k = 0
        while k < len(places):
            run_start = places[k][0]
            run_end, j = run_start, k
            while j < len(places) and places[j][0] <= run_end + _GAP and places[j][0] - run_start < _READ_BLOCK:
                _, length, _ = _unref(refs[places[j][1]])
                run_end = max(run_end, places[j][0] + length)
                j += 1
            data = self._read(run_start, run_end - run_start)
            for offset, i in places[k:j]:
                _, length, start = _unref(refs[i])
                at = offset - run_start
                out[i] = data[at + start : at + length - 1]
            k = j
        return out

    def keys(self, ref: int) -> dict[str, Any] | None:
        offset, _, start = _unref(ref)
        return _parse_put(self._read(offset, start))[0]

    def release(self, collection: str, ref: int, doc_id: Any, deleted: bool) -> None:
        with self.lock:
            size = _unref(ref)[1]
            self.live -= size
            self.garbage += size
            if deleted:
                self._writable()
                record = bson.encode({"c": collection, "x": doc_id})
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
        """Make everything appended so far durable, atomically (commit record + trailer)."""
        with self.lock:
            self._writable()
            self._flush()
            os.fsync(self.fd)
            self.commits += 1
            record = bson.encode({"commit": bson.Int64(self.commits), "collections": meta})
            self.tail += record + bson.encode({"t": bson.Int64(self.disk_end)})
            self.garbage += len(record) + 16
            self._flush()
            os.fsync(self.fd)

    def should_rewrite(self) -> bool:
        # at most half garbage: opening reads every record, so a run that marks every chunk once
        # must not leave the next open reading each chunk twice (writes stay amortized: <= 3x)
        return self.rewrite or (2 * self.garbage > self.live and self.garbage > _REWRITE_GARBAGE)

    def rewrite_from(self, stores: dict[str, IndexedCollectionStore], meta: dict[str, Any]) -> None:
        """Copy the live records to a new file and swap it in (temp file, fsync, os.replace)."""
        with self.lock, contextlib.ExitStack() as held:
            self._writable()
            for name in sorted(stores):
                held.enter_context(stores[name].lock)  # readers must not see half-moved refs
            self._flush()
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
                        refs, pos = self._copy_live(fh, pos, stores[name].refs())
                        moved.append((stores[name], refs))
                    live = pos - len(header)
                    commit = bson.encode({"commit": bson.Int64(1), "collections": meta})
                    fh.write(commit + bson.encode({"t": bson.Int64(pos)}))
                    pos += len(commit) + 16
                    fh.flush()
                    os.fsync(fh.fileno())
                fit_to_folder(tmp)  # mkstemp made it 0600; staging may share it with a group
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
                store.relocate(refs)
            self.disk_end, self.tail = pos, bytearray()
            self.live, self.garbage = live, pos - live
            self.commits, self.rewrite = 1, False

    def _copy_live(self, fh: Any, pos: int, refs: list[int]) -> tuple[list[int], int]:
        """Write the records `refs` point at, copying adjacent ones as one run; their new refs."""
        out: list[int] = []
        run_start = run_end = -1
        for ref in refs:
            offset, length, start = _unref(ref)
            if offset != run_end:
                self._copy_run(fh, run_start, run_end)
                run_start = offset
            run_end = offset + length
            out.append(_ref(pos, length, start))
            pos += length
        self._copy_run(fh, run_start, run_end)
        return out, pos

    def _copy_run(self, fh: Any, start: int, end: int) -> None:
        while start < end:
            data = os.pread(self.fd, min(_READ_BLOCK, end - start), start)
            if not data:
                raise StandinFileError(f"{self.path}: short read at offset {start}")
            fh.write(data)
            start += len(data)

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

    def last_meta(self, size: int) -> dict[str, Any] | None:
        """The collections of the last commit, found through the trailer (None: no trailer)."""
        if size < 32:
            return None
        trailer = os.pread(self.fd, 16, size - 16)
        if not trailer.startswith(_TRAILER_HEAD) or trailer[-1] != 0:
            return None
        at = int.from_bytes(trailer[7:15], "little")
        length = int.from_bytes(os.pread(self.fd, 4, at), "little") if 0 < at < size else 0
        if at + length != size - 16:
            return None
        try:
            meta = bson.decode(os.pread(self.fd, length, at)).get("collections")
        except Exception:
            return None
        return meta if isinstance(meta, dict) else None

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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StandinDatabase:
    """One database of the stand-in: mongomock collections over `IndexedCollectionStore`s."""

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database
        self.file = LogFile(path, database)
        self.db_store: Any = None

    @fewer_collections()
    def open(self) -> None:
        """Load the file (or create it); afterwards `db_store` holds its collections."""
        if not self.path.exists():
            self.db_store = database_store(self.file)
            self.file.rewrite_from({}, {})
            return
        header, first, size = self.file.open_existing()
        if int(header.get("version", 0)) < 2:  # no commit records: the whole file is one save
            self._load(header.get("collections") or {}, first, size, committed_only=False)
            self.file.rewrite = True
            self.save()  # rewritten as version 2 before anything is appended to it
            return
        meta = self.file.last_meta(size) or header.get("collections") or {}
        last = self._load(meta, first, size, committed_only=True)
        if last is None:
            raise StandinFileError("the file has no completed save (no commit record)")
        if last < size:  # records of an interrupted save: not part of any save
            self.file.truncate(last)
            self._load(meta, first, last, committed_only=True)
        self.file.disk_end = last

    def _load(self, meta: dict[str, Any], start: int, end: int, committed_only: bool) -> int | None:
        """Load the records in [start, end) into fresh stores; the end of the last commit."""
        self.db_store = database_store(self.file)
        self.file.live, self.file.garbage, self.file.disk_end = 0, start, end
        apply_meta(self.db_store, meta)  # indexes first: records fill them as they load
        stores: dict[bytes, IndexedCollectionStore] = {}
        last_commit: int | None = None
        final: dict[str, Any] | None = None
        for pos, record in self.file.frames(start, end):
            if record[4:7] == b"\x02c\x00":
                name_end = 11 + int.from_bytes(record[7:11], "little")
                name = record[11 : name_end - 1]
                store = stores.get(name)
                if store is None:
                    store = stores[name] = self.db_store[name.decode()]
                    store.begin_load()
                if record[name_end + 1 : name_end + 3] == _DELETE:  # after the type byte of x
                    self.file.garbage += len(record)
                    store.load_delete(bson.decode(record)["x"])
                    continue
                self.file.live += len(record)
                keys, doc_start = _parse_put(record)
                ref = _ref(pos, len(record), doc_start)
                if keys is None or not store.load_put(keys, ref):  # written before an index existed
                    store.load_put(store.stored_keys(bson.decode(record[doc_start:-1])), ref)
                continue
            try:
                rec = bson.decode(record)
            except Exception as exc:
                if committed_only and last_commit is not None:
                    break  # a torn tail after the last save
                raise StandinFileError(f"corrupt record at offset {pos}: {exc}") from None
            self.file.garbage += len(record)
            if "commit" in rec:
                last_commit, final = pos + len(record), rec.get("collections") or {}
                self.file.commits = int(rec["commit"])
            elif "t" in rec:
                if last_commit == pos:  # the trailer belongs to the save it follows
                    last_commit += len(record)
            else:
                raise StandinFileError(f"corrupt record at offset {pos}: unknown record")
        for store in stores.values():
            store.end_load()
        if final is not None:
            apply_meta(self.db_store, final)
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

    def save(self) -> None:
        """Persist every change atomically (a commit record, or a rewrite when mostly garbage)."""
        meta = self.meta()
        if self.file.should_rewrite():
            names = self.db_store.list_created_collection_names()
            self.file.rewrite_from({name: self.db_store[name] for name in names}, meta)
        else:
            self.file.commit(meta)

    def close(self) -> None:
        self.file.close()


def apply_meta(db_store: Any, meta: dict[str, Any]) -> None:
    """Create the collections and indexes a header or commit record lists."""
    for name, info in meta.items():
        store = db_store[name]
        store.create()
        for ix in info.get("indexes", []):
            spec = {k: v for k, v in ix.items() if k not in ("name", "keys")}
            spec["key"] = [(k, d) for k, d in ix["keys"]]
            if spec.get("unique") is False:  # mongomock leaves a non-unique index's flag out
                del spec["unique"]
            if store.indexes.get(ix["name"]) != spec:
                store.create_index(ix["name"], spec)


__all__ = ["FORMAT", "VERSION", "LogFile", "StandinDatabase", "apply_meta"]
