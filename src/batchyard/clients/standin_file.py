"""The stand-in's file: an append-only stream of BSON records, made durable by commit records.

Why a log. Saving 1M documents by rewriting them all took minutes, and keeping them all in memory
took gigabytes. Here a write appends one record (buffered, written in 4 MiB steps); `save()`
appends a commit record; the stores keep only each document's place in the file and read it back
with `os.pread` (the page cache holds the bytes, not this process).

Records (every one a BSON document, so `bson.decode_file_iter` reads the file):

- header, first: `{"format": "batchyard-mongo-standin", "version": 2, "database", "collections",
  "file_id"}` (`file_id`: random, new at every rewrite; it names the file for the index
  checkpoint, `standin_checkpoint`; files written before it had none get one at their next
  rewrite, which the first save that writes anything then does);
- put: `{"c": collection, "k": {"_id": id, <indexed path>: [value] or [] when irregular},
  "d": document}`. `k` holds the values the hash indexes need, so opening decodes a few bytes
  per document instead of the whole document;
- delete: `{"c": collection, "x": _id}`;
- commit: `{"commit": n, "collections": {name: {"indexes": [...]}}}`, then a 16-byte trailer
  `{"t": offset of that commit}` so that opening finds the index definitions first.

Opening reads records up to the last commit; records after it (an interrupted save) are
truncated away, so a save is atomic: records, fsync, commit, fsync. A save with nothing to save
(no record appended, the same indexes) writes nothing. When superseded records reach half the
live ones (and pass 32 MiB), `save()` rewrites the file instead: live records copied verbatim in
long runs to a temporary file, fsync, `os.replace`. Version 1 files (no commit records, no `k`)
are read and rewritten once as version 2.

Opening loads the index checkpoint when it is valid for this file and replays only the records
after it; otherwise it reads every record (and then writes a checkpoint for the next open). A
checkpoint is rewritten after every rewrite of the file, and when a process closes the stand-in
once the records since it reach 1/16 of the documents (not at every save: at 1M chunks it costs
about 2 s of CPU, and a run saves after every load). A stand-in opened read-only (`open(read_only=True)`) refuses every write
and never changes the file (a checkpoint may still be written beside it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson

from batchyard.clients import standin_checkpoint as checkpoint
from batchyard.clients.standin import (
    IndexedCollectionStore,
    StandinFileError,
    database_store,
    index_fields,
)
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
# a reference (64 bits, kept in the stores' arrays): record offset << 28 | record length
_LEN_BITS = 28
_LEN_MASK = (1 << _LEN_BITS) - 1
_MAX_OFFSET = 1 << (64 - _LEN_BITS)  # 64 GiB of file
CHECKPOINT_MIN = 10_000  # records: below this a full read is cheap, no checkpoint is written
CHECKPOINT_SHARE = 16  # a save rewrites the checkpoint once the records since it reach docs / this


def _ref(offset: int, length: int) -> int:
    return (offset << _LEN_BITS) | length


def _unref(ref: int) -> tuple[int, int]:
    """(record offset, record length)."""
    return ref >> _LEN_BITS, ref & _LEN_MASK


def _doc_start(record: bytes | memoryview, at: int = 0) -> int:
    """Where the document starts in a put record that starts at `at` (skips `c` and `k`)."""
    p = at + 11 + int.from_bytes(record[at + 7 : at + 11], "little")
    if record[p : p + 3] == _KEYS:
        p += 3 + int.from_bytes(record[p + 3 : p + 7], "little")
    return p + 3


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
        self.read_only = False
        self.file_id: str | None = None  # the header's (None: a file from before file ids)
        self.disk_end = 0  # bytes on disk
        self.tail = bytearray()  # appended, not yet written
        self.commits = 0
        self.live = 0  # bytes of current records
        self.garbage = 0  # bytes of everything else
        self.rewrite = False  # the next save must rewrite the whole file
        self.dirty = False  # records appended since the last commit
        self.since_checkpoint = 0  # records in the file after the checkpoint (all: none)

    # ----- the blob interface of IndexedCollectionStore
    def put(self, collection: str, raw: bytes, keys: dict[str, Any]) -> int:
        head = _c_element(collection) + _KEYS + bson.encode(keys) + _DOC
        record_len = 4 + len(head) + len(raw) + 1
        with self.lock:
            self._writable()
            start = self.disk_end + len(self.tail)
            if start >= _MAX_OFFSET or record_len > _LEN_MASK:
                raise StandinFileError(f"{self.path}: the stand-in file would pass 64 GiB; use a MongoDB server")
            self.tail += record_len.to_bytes(4, "little")
            self.tail += head
            self.tail += raw
            self.tail += b"\x00"
            self.live += record_len
            self.dirty = True
            self.since_checkpoint += 1
            if len(self.tail) >= _TAIL_FLUSH:
                self._flush()
        return _ref(start, record_len)

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
        record = self._read(*_unref(ref))
        return record[_doc_start(record) : -1]

    def get_many(self, refs: list[int]) -> list[bytes]:
        """The documents of `refs`, in that order; nearby records are read with one `pread`."""
        out: list[bytes] = [b""] * len(refs)
        places = sorted((ref >> _LEN_BITS, i) for i, ref in enumerate(refs))
        k = 0
        while k < len(places):
            run_start = places[k][0]
            run_end, j = run_start, k
            while j < len(places) and places[j][0] <= run_end + _GAP and places[j][0] - run_start < _READ_BLOCK:
                run_end = max(run_end, places[j][0] + (refs[places[j][1]] & _LEN_MASK))
                j += 1
            data = self._read(run_start, run_end - run_start)
            for offset, i in places[k:j]:
                at = offset - run_start
                out[i] = data[_doc_start(data, at) : at + (refs[i] & _LEN_MASK) - 1]
            k = j
        return out

    def keys(self, ref: int) -> dict[str, Any] | None:
        return _parse_put(self._read(*_unref(ref)))[0]

    def release(self, collection: str, ref: int, doc_id: Any, deleted: bool) -> None:
        with self.lock:
            if deleted:
                self._writable()
            size = _unref(ref)[1]
            self.live -= size
            self.garbage += size
            if deleted:
                record = bson.encode({"c": collection, "x": doc_id})
                self.tail += record
                self.garbage += len(record)
                self.dirty = True
                self.since_checkpoint += 1

    def structure_changed(self) -> None:
        self.rewrite = True

    # ----- writing
    def _writable(self) -> None:
        if self.read_only:
            raise StandinFileError(
                f"{self.path}: this stand-in was opened read-only; writes are refused "
                "(open the document store without read_only to write)"
            )
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
            self.dirty = False

    def should_rewrite(self) -> bool:
        # at most half garbage: opening reads every record, so a run that marks every chunk once
        # must not leave the next open reading each chunk twice (writes stay amortized: <= 3x);
        # a file without a file id gets one (its checkpoints need it)
        return (self.rewrite or not self.file_id
                or (2 * self.garbage > self.live and self.garbage > _REWRITE_GARBAGE))

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
            file_id = uuid.uuid4().hex
            try:
                with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
                    header = bson.encode({"format": FORMAT, "version": VERSION, "database": self.database,
                                          "collections": meta, "file_id": file_id})
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
            self.commits, self.rewrite, self.dirty, self.file_id = 1, False, False, file_id
            self.since_checkpoint = sum(len(refs) for _, refs in moved)

    def _copy_live(self, fh: Any, pos: int, refs: list[int]) -> tuple[list[int], int]:
        """Write the records `refs` point at, copying adjacent ones as one run; their new refs."""
        out: list[int] = []
        run_start = run_end = -1
        for ref in refs:
            offset, length = _unref(ref)
            if offset != run_end:
                self._copy_run(fh, run_start, run_end)
                run_start = offset
            run_end = offset + length
            out.append(_ref(pos, length))
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
        self.fd = os.open(self.path, os.O_RDONLY if self.read_only else os.O_RDWR)
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
        file_id = header.get("file_id")
        self.file_id = file_id if isinstance(file_id, str) and file_id else None
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
        self.committed_meta: dict[str, Any] = {}
        self.checkpoint_fields: set[tuple[str, str]] | None = None  # what the checkpoint indexes
        self.read_whole = False  # the last open read every record (no usable checkpoint)

    @property
    def read_only(self) -> bool:
        return self.file.read_only

    @fewer_collections()
    def open(self, read_only: bool = False) -> None:
        """Load the file (or create it); afterwards `db_store` holds its collections.

        Read-only: the file is neither created nor changed, and every write is refused.
        """
        self.file.read_only = read_only
        if not self.path.exists():
            self._reset_stores()
            if not read_only:
                self.file.rewrite_from({}, {})
            self.committed_meta = self.meta()
            return
        header, first, size = self.file.open_existing()
        if int(header.get("version", 0)) < 2:  # no commit records: the whole file is one save
            self._load(header.get("collections") or {}, first, size, committed_only=False)
            self.committed_meta = self.meta()
            if not read_only:
                self.file.rewrite = True
                self.save()  # rewritten as version 2 before anything is appended to it
            return
        meta = self.file.last_meta(size) or header.get("collections") or {}
        saved = self._checkpoint(meta, size)
        start = first if saved is None else saved["end"]
        last = self._load(meta, start, size, committed_only=True, saved=saved)
        if last is None and saved is not None:
            last = saved["end"]  # no save after the checkpoint
        if last is None:
            raise StandinFileError("the file has no completed save (no commit record)")
        if last < size:  # records of an interrupted save: not part of any save
            if not read_only:
                self.file.truncate(last)
            self._load(meta, start, last, committed_only=True, saved=saved)
        self.file.disk_end = last
        self.committed_meta = self.meta()
        self.read_whole = saved is None
        if saved is None and sum(len(s) for s in self._stores().values()) >= CHECKPOINT_MIN:
            self.write_checkpoint()

    def _reset_stores(self) -> None:
        """Empty collection stores over `file`: new ones, or the existing ones emptied in place
        (mongomock's collection objects keep their store, so a reload must reuse it)."""
        if self.db_store is None:
            self.db_store = database_store(self.file)
        else:
            self.db_store.reset(self.file)

    def changed_on_disk(self) -> bool:
        """Whether the file is no longer what was loaded (replaced, appended to, created)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.file.fd >= 0
        if self.file.fd < 0:
            return True
        fst = os.fstat(self.file.fd)
        return (st.st_ino, st.st_dev) != (fst.st_ino, fst.st_dev) or st.st_size != self.file.disk_end

    def reopen(self) -> None:
        """Forget the loaded file: the next `open` reads it afresh into the same stores."""
        self.file.close()
        self.file = LogFile(self.path, self.database)

    def make_writable(self) -> None:
        """A read-only stand-in whose file did not change becomes writable (its exclusive lock
        is held by the caller); a file that did not exist is created."""
        self.file.read_only = False
        if self.file.fd < 0:
            self.file.rewrite_from({}, {})
            self.committed_meta = {}
            return
        fd = os.open(self.path, os.O_RDWR)
        os.close(self.file.fd)
        self.file.fd = fd

    def _stores(self) -> dict[str, IndexedCollectionStore]:
        return {name: self.db_store[name] for name in self.db_store.list_created_collection_names()}

    def _checkpoint(self, meta: dict[str, Any], size: int) -> dict[str, Any] | None:
        """The index checkpoint, when it describes a save of this very file and indexes every
        field the last save's indexes name (see `standin_checkpoint`); None otherwise."""
        if not self.file.file_id:
            return None
        saved = checkpoint.read(checkpoint.path_for(self.path))
        if saved is None or saved.get("file_id") != self.file.file_id:
            return None
        end = saved.get("end")
        if not isinstance(end, int) or not 16 <= end <= size or os.pread(self.file.fd, 16, end - 16) != saved.get("trailer"):
            return None
        for name, info in meta.items():
            state = saved["collections"].get(name)
            wanted = index_fields({ix["name"]: {"key": ix["keys"]} for ix in info.get("indexes", [])})
            if state is not None and not wanted <= set(state["fields"]):
                return None  # an index created since: its field is not in the checkpoint
        return saved

    def _load(
        self, meta: dict[str, Any], start: int, end: int, committed_only: bool, saved: dict[str, Any] | None = None
    ) -> int | None:
        """Load the records in [start, end) into fresh stores (on top of a checkpoint's state
        when given); the end of the last commit in that range."""
        self._reset_stores()
        apply_meta(self.db_store, meta)  # indexes first: records fill them as they load
        if saved is None:
            self.file.live, self.file.garbage, self.file.since_checkpoint = 0, start, 0
        else:
            for name, state in saved["collections"].items():
                self.db_store[name].import_state(state)
            self.file.live, self.file.garbage = saved["live"], saved["garbage"]
            self.file.commits, self.file.since_checkpoint = saved["commits"], 0
        self.checkpoint_fields = None if saved is None else _fields_of(saved["collections"])
        self.file.disk_end = end
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
                    store.begin_load(bulk=saved is None)
                self.file.since_checkpoint += 1
                if record[name_end + 1 : name_end + 3] == _DELETE:  # after the type byte of x
                    self.file.garbage += len(record)
                    store.load_delete(bson.decode(record)["x"])
                    continue
                self.file.live += len(record)
                keys, doc_start = _parse_put(record)
                ref = _ref(pos, len(record))
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
        """Persist every change atomically (a commit record, or a rewrite when mostly garbage).

        Nothing is written when nothing changed since the last save (a reader's close costs no
        fsync), nor ever for a read-only stand-in.
        """
        if self.read_only:
            return
        meta = self.meta()
        if not self.file.dirty and meta == self.committed_meta and not self.file.rewrite:
            return
        if self.file.should_rewrite():
            self.file.rewrite_from(self._stores(), meta)
            self.committed_meta = meta
            self.write_checkpoint()
            return
        self.file.commit(meta)
        self.committed_meta = meta

    def checkpoint_if_stale(self) -> None:
        """On the last close: rewrite the checkpoint once the records after it reach 1/16 of
        the documents (the next open replays at most that), or when it lacks an index."""
        if self.read_only or self.file.dirty:
            return
        docs = sum(len(s) for s in self._stores().values())
        if self.file.since_checkpoint >= max(CHECKPOINT_MIN, docs // CHECKPOINT_SHARE):
            self.write_checkpoint()
        else:
            self.refresh_checkpoint()

    def refresh_checkpoint(self) -> None:
        """Rewrite a checkpoint that lacks a field index built since (one built by decoding every
        document must not be built again at every open)."""
        if self.checkpoint_fields is None:
            return
        now = {(name, path) for name, store in self._stores().items() for path in store.field_paths()}
        if not now <= self.checkpoint_fields:
            self.write_checkpoint()

    def write_checkpoint(self) -> None:
        """Save the indexes beside the file for the next open (right after a save or a load:
        they must describe the file as committed)."""
        if not self.file.file_id or self.file.dirty or self.file.tail:
            return
        end = self.file.disk_end
        stores = self._stores()
        with contextlib.ExitStack() as held:
            for name in sorted(stores):
                held.enter_context(stores[name].lock)
            states = {name: store.export_state() for name, store in stores.items()}
            identity = {"file_id": self.file.file_id, "end": end, "trailer": os.pread(self.file.fd, 16, end - 16),
                        "live": self.file.live, "garbage": self.file.garbage, "commits": self.file.commits}
        try:
            checkpoint.write(checkpoint.path_for(self.path), checkpoint.encode(identity, states))
        except OSError:
            return  # a missing checkpoint only makes the next open slower
        self.file.since_checkpoint = 0
        self.checkpoint_fields = _fields_of(states)

    def close(self) -> None:
        self.file.close()


def _fields_of(collections: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    return {(name, path) for name, state in collections.items() for path in state["fields"]}


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


__all__ = ["CHECKPOINT_MIN", "FORMAT", "VERSION", "LogFile", "StandinDatabase", "apply_meta"]
