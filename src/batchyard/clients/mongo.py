"""The document store: a real MongoDB, or a persisted pymongo-compatible stand-in.

`open_document_store(settings, standin_dir=...)` gives a `DocumentStore` whatever the backend:

- `settings.uri` set: a `pymongo.MongoClient`. The URI and its password never appear in a
  label, repr, log line or error raised here; `store.label` shows only the host list.
- no URI: the embedded stand-in, `mongomock` loaded from and saved to one BSON file in
  `standin_dir` (`<database>.mongo.bson`, written atomically by `save()`/`close()`). It is
  labelled as a stand-in wherever it is shown (`store.is_standin`, `store.label`).

Within one process every store opened on the same stand-in file shares one in-memory database
(so two stages see each other's writes); across processes an exclusive file lock stops a second
process from opening it while the first holds it, because the last save would otherwise win.

Stand-in file format: a stream of BSON documents (`bson.decode_file_iter` reads it). The first
is a header `{"format": "batchyard-mongo-standin", "version": 1, "database": ...,
"collections": {name: {"indexes": [{"name", "keys": [[field, dir], ...], "unique"}]}}}`; every
following one is `{"c": <collection name>, "d": <the document>}`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import bson
from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from batchyard.errors import TerminalError, TransientError
from batchyard.settings import MongoSettings

log = logging.getLogger(__name__)

STANDIN_FORMAT = "batchyard-mongo-standin"
STANDIN_VERSION = 1
RESULTS_INDEX_NAME = "batchyard_task_unit"
RESULTS_INDEX_KEYS = [("task", ASCENDING), ("task_version", ASCENDING), ("unit_id", ASCENDING)]
_LOAD_BATCH = 5_000


class DocumentStoreError(TerminalError):
    """The document store cannot be opened or used."""

    def __init__(self, label: str, reason: str) -> None:
        self.label = label
        self.reason = reason
        super().__init__(f"{label}: {reason}")


class StandinBusy(TransientError):
    """Another process holds the stand-in file open."""

    def __init__(self, path: str, waited_s: float, holder_pid: int | None = None) -> None:
        self.path = path
        self.waited_s = waited_s
        self.holder_pid = holder_pid
        who = f"another process (pid {holder_pid})" if holder_pid else "another process"
        super().__init__(
            f"the MongoDB stand-in at {path} is in use by {who} "
            f"(waited {waited_s:.1f} s); close that process or set a MongoDB URI"
        )


# --------------------------------------------------------------------------- mongomock shim


def patch_mongomock() -> None:
    """Adapt mongomock 4.3 to pymongo 4.20 and make keyed writes fast (idempotent).

    1. pymongo 4.20 passes `sort=` to `BulkOperationBuilder.add_update/add_replace`; mongomock
       does not accept it: the keyword is dropped (it only matters with several matches).
    2. mongomock scans every document for every filter and every unique-index check, so a bulk
       of n keyed updates costs O(n^2). Filters on `_id` (equality or `$in`) and equality
       filters covering a unique index are answered from a hash lookup instead; the lookup
       table is verified on use and falls back to the scan whenever a key is not a plain scalar
       (arrays, sub-documents, dates) or the index is partial.
    3. mongomock's cursor re-slices its whole result list (`results[skip:]`) on every `next()`,
       so reading n documents costs O(n^2); the slice is now computed once per result list.
    """
    try:
        from mongomock.collection import BulkOperationBuilder, Collection, Cursor
    except ImportError:  # pragma: no cover - mongomock is a core dependency
        return
    if getattr(BulkOperationBuilder, "_batchyard_shim", False):
        return
    orig_update = BulkOperationBuilder.add_update
    orig_replace = BulkOperationBuilder.add_replace

    def add_update(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        return orig_update(self, *args, **kwargs)

    def add_replace(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        return orig_replace(self, *args, **kwargs)

    BulkOperationBuilder.add_update = add_update  # type: ignore[method-assign]
    BulkOperationBuilder.add_replace = add_replace  # type: ignore[method-assign]

    orig_iter = Collection._iter_documents
    orig_uniques = Collection._ensure_uniques

    def _iter_documents(self: Any, filter: Any) -> Any:
        candidates = _fast_candidates(self._store, filter)
        if candidates is None:
            return orig_iter(self, filter)
        from mongomock.filtering import filter_applies

        return (doc for doc in candidates if filter_applies(filter, doc))

    def _ensure_uniques(self: Any, new_data: Any) -> None:
        from pymongo.errors import DuplicateKeyError

        slow = False
        for index in list(self._store.indexes.values()):
            if not index.get("unique"):
                continue
            verdict = _unique_check(self._store, index, new_data)
            if verdict is None:
                slow = True
            elif verdict:
                raise DuplicateKeyError("E11000 Duplicate Key Error", 11000)
        if slow:
            orig_uniques(self, new_data)

    orig_compute = Cursor._compute_results

    def _compute_results(self: Any, with_limit_and_skip: bool = False) -> Any:
        results = orig_compute(self, with_limit_and_skip=False)
        if not with_limit_and_skip:
            return results
        key = (self._skip, self._limit)
        if getattr(self, "_batchyard_src", None) is not results or self._batchyard_key != key:
            window = results[self._skip :]
            self._batchyard_slice = window[: abs(self._limit)] if self._limit else window
            self._batchyard_src, self._batchyard_key = results, key  # a strong ref: `is` stays valid
        return self._batchyard_slice

    Collection._iter_documents = _iter_documents  # type: ignore[method-assign]
    Collection._ensure_uniques = _ensure_uniques  # type: ignore[method-assign]
    Cursor._compute_results = _compute_results  # type: ignore[method-assign]
    BulkOperationBuilder._batchyard_shim = True  # type: ignore[attr-defined]


class _Unsafe(Exception):
    """A key value the hash lookup cannot represent exactly."""


_MISSING = object()
# id(index dict) -> (index dict, {"unsafe": bool, "keys": {key tuple: set of store ids}})
_UNIQUE_TABLES: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}


def _scalar(value: Any) -> tuple[str, Any]:
    from bson import ObjectId

    if value is None or value is _MISSING:
        return ("null", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        if value != value:  # NaN
            raise _Unsafe
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, ObjectId):
        return ("oid", value)
    raise _Unsafe


def _dotted(doc: Any, path: str) -> Any:
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        else:
            raise _Unsafe  # arrays along the path: multikey semantics
    return cur


def _index_key(doc: Any, index: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(_scalar(_dotted(doc, field)) for field, _ in index["key"])


def _store_id(value: Any) -> Any:
    if isinstance(value, dict):
        raise _Unsafe
    return value


def _table(store: Any, index: dict[str, Any]) -> dict[str, Any] | None:
    """The lookup table of a unique index, built on first use (None when unusable)."""
    if index.get("partialFilterExpression") is not None:
        return None
    entry = _UNIQUE_TABLES.get(id(index))
    if entry is None or entry[0] is not index:
        table: dict[str, Any] = {"unsafe": False, "keys": {}}
        try:
            for doc in store.documents:
                table["keys"].setdefault(_index_key(doc, index), set()).add(_store_id(doc["_id"]))
        except _Unsafe:
            table["unsafe"] = True
        entry = (index, table)
        _UNIQUE_TABLES[id(index)] = entry
    return None if entry[1]["unsafe"] else entry[1]


def _live(store: Any, index: dict[str, Any], table: dict[str, Any], key: tuple[Any, ...]) -> list[Any]:
    """Store ids whose document currently has `key` (stale entries are pruned)."""
    bucket = table["keys"].get(key)
    if not bucket:
        return []
    live = []
    for sid in list(bucket):
        if sid in store and _index_key(store[sid], index) == key:
            live.append(sid)
        else:
            bucket.discard(sid)
    return live


def _unique_check(store: Any, index: dict[str, Any], new_data: Any) -> bool | None:
    """True: duplicate; False: unique; None: use mongomock's scan."""
    table = _table(store, index)
    if table is None:
        return None
    try:
        key = _index_key(new_data, index)
        sid = _store_id(new_data["_id"])
        if index.get("sparse") and all(k == ("null", None) for k in key):
            return False
        table["keys"].setdefault(key, set()).add(sid)
        return len(_live(store, index, table, key)) > 1
    except _Unsafe:
        table["unsafe"] = True
        return None


def _fast_candidates(store: Any, filter: Any) -> list[Any] | None:
    """Stored documents that may match `filter`, from a hash lookup (None: scan instead)."""
    if not isinstance(filter, dict) or not filter:
        return None
    try:
        if "_id" in filter:
            value = filter["_id"]
            if isinstance(value, dict):
                if set(value) != {"$in"} or not isinstance(value["$in"], list | tuple):
                    return None
                ids = list(dict.fromkeys(_store_id(v) for v in value["$in"] if _scalar(v)))
            else:
                _scalar(value)
                ids = [value]
            return [store[i] for i in ids if i in store]
        for index in list(store.indexes.values()):
            if not index.get("unique") or index.get("sparse"):
                continue
            fields = [f for f, _ in index["key"]]
            if not all(f in filter for f in fields) or any(k.startswith("$") for k in filter):
                continue
            key = tuple(_scalar(filter[f]) for f in fields)
            table = _table(store, index)
            if table is None:
                continue
            return [store[sid] for sid in _live(store, index, table, key)]
    except (_Unsafe, TypeError):
        return None
    return None


# --------------------------------------------------------------------------- labels


def redact_uri(uri: str) -> str:
    """`scheme://host1,host2` of a MongoDB URI: credentials, path and options dropped."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "<unparsable MongoDB URI>"
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    hosts = netloc.rpartition("@")[2]
    return f"{scheme}://{hosts or '?'}"


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _uri_secrets(uri: str) -> list[str]:
    """The URI itself, its userinfo and password (raw and percent-decoded), for scrubbing."""
    from urllib.parse import unquote

    secrets = [uri]
    rest = uri.partition("://")[2]
    netloc = rest.split("/", 1)[0]
    userinfo, at, _ = netloc.rpartition("@")
    if at:
        secrets.append(userinfo)
        password = userinfo.partition(":")[2]
        secrets += [password, unquote(password)]
    return [s for s in secrets if len(s) >= 3]


# --------------------------------------------------------------------------- the store


class DocumentStore:
    """Chunks and results collections of one database, on MongoDB or the stand-in."""

    def __init__(
        self,
        client: Any,
        settings: MongoSettings,
        *,
        label: str,
        is_standin: bool,
        standin: _Standin | None = None,
        secrets: list[str] | None = None,
    ) -> None:
        self._client = client
        self._secrets = secrets or []
        self._settings = settings
        self._db = client[settings.database]
        self.label = label
        self.is_standin = is_standin
        self._standin = standin
        self._results_indexed = False
        self._closed = False

    # collections
    @property
    def client(self) -> Any:
        """The underlying `MongoClient` (or mongomock client)."""
        return self._client

    @property
    def database(self) -> Any:
        return self._db

    @property
    def chunks(self) -> Collection:
        """The source chunks collection."""
        return self._db[self._settings.chunks_collection]

    @property
    def results(self) -> Collection:
        """The inference results collection (unique index on task, task_version, unit_id)."""
        coll = self._db[self._settings.results_collection]
        if not self._results_indexed:
            error = None
            try:
                ensure_results_index(coll)
            except PyMongoError as exc:
                error = DocumentStoreError(
                    self.label, self._scrub(f"cannot create the results index: {type(exc).__name__}: {exc}")
                )
            if error is not None:  # raised outside the handler: no driver error (URI) in its context
                raise error
            self._results_indexed = True
        return coll

    def collection(self, name: str) -> Collection:
        """Any collection of the configured database."""
        return self._db[name]

    def ping(self) -> None:
        """Check the server answers (no-op for the stand-in)."""
        if self.is_standin:
            return
        error = None
        try:
            self._client.admin.command("ping")
        except PyMongoError as exc:
            error = DocumentStoreError(self.label, self._scrub(f"not reachable: {type(exc).__name__}: {exc}"))
        if error is not None:  # raised outside the handler: no driver error (URI) in its context
            raise error

    def _scrub(self, text: str) -> str:
        return _scrub(text, self._secrets)

    # lifecycle
    def save(self) -> None:
        """Persist the stand-in now (atomic); nothing to do for a real server."""
        if self._standin is not None:
            self._standin.save()

    def close(self) -> None:
        """Save (stand-in) and release the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._standin is not None:
            _release_standin(self._standin)
        else:
            self._client.close()

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DocumentStore {self.label} database={self._settings.database!r}>"

    __str__ = __repr__


def ensure_results_index(collection: Collection) -> None:
    """The unique (task, task_version, unit_id) index on a results collection (idempotent)."""
    collection.create_index(RESULTS_INDEX_KEYS, unique=True, name=RESULTS_INDEX_NAME)


def open_document_store(
    settings: MongoSettings, *, standin_dir: str | os.PathLike[str], lock_timeout_s: float = 10.0
) -> DocumentStore:
    """Open MongoDB (`settings.uri`) or the persisted stand-in under `standin_dir`.

    Opening does not contact a real server; the first operation does.

    Raises:
        DocumentStoreError: the URI is invalid (the message never contains it), or the stand-in
            file is corrupt.
        StandinBusy: another process holds the stand-in.
    """
    if settings.uri is not None:
        return _open_server(settings)
    return _open_standin(settings, Path(standin_dir), lock_timeout_s)


def _open_server(settings: MongoSettings) -> DocumentStore:
    assert settings.uri is not None
    uri = settings.uri.get_secret_value()
    label = f"MongoDB at {redact_uri(uri)}"
    error = None
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(
            uri, connect=False, appname="batchyard", tz_aware=True
        )
    except Exception as exc:
        reason = _scrub(f"{type(exc).__name__}: {exc}", _uri_secrets(uri))
        error = DocumentStoreError(label, f"invalid connection string ({reason})")
    if error is not None:  # raised outside the handler: the driver's error quotes the URI
        raise error
    return DocumentStore(
        client, settings, label=label, is_standin=False, secrets=_uri_secrets(uri)
    )


# --------------------------------------------------------------------------- the stand-in


class _Standin:
    """One in-memory mongomock database bound to its file, shared within the process."""

    def __init__(self, path: Path, database: str, lock_fd: int) -> None:
        import mongomock

        patch_mongomock()
        self.path = path
        self.database = database
        self.lock_fd = lock_fd
        self.pid = os.getpid()
        self.refs = 0
        self.mutex = threading.RLock()
        self.client = mongomock.MongoClient(tz_aware=True)
        self.db = self.client[database]

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            with self.path.open("rb") as fh:
                docs = bson.decode_file_iter(fh)
                header = next(docs, None)
                if not header or header.get("format") != STANDIN_FORMAT:
                    raise DocumentStoreError(
                        standin_label(self.path), "file is not a batchyard MongoDB stand-in"
                    )
                if int(header.get("version", 0)) > STANDIN_VERSION:
                    raise DocumentStoreError(
                        standin_label(self.path),
                        f"file format version {header.get('version')} is newer than this batchyard",
                    )
                meta: dict[str, Any] = header.get("collections", {})
                for name, info in meta.items():
                    coll = self.db[name]
                    for ix in info.get("indexes", []):
                        coll.create_index(
                            [(k, d) for k, d in ix["keys"]],
                            name=ix["name"],
                            unique=bool(ix.get("unique", False)),
                        )
                    if name not in self.db.list_collection_names():
                        self.db.create_collection(name)
                pending: dict[str, list[dict[str, Any]]] = {}
                for rec in docs:
                    bucket = pending.setdefault(rec["c"], [])
                    bucket.append(rec["d"])
                    if len(bucket) >= _LOAD_BATCH:
                        self.db[rec["c"]].insert_many(bucket)
                        bucket.clear()
                for name, bucket in pending.items():
                    if bucket:
                        self.db[name].insert_many(bucket)
        except DocumentStoreError:
            raise
        except Exception as exc:
            raise DocumentStoreError(
                standin_label(self.path), f"cannot read the stand-in file: {type(exc).__name__}: {exc}"
            ) from None

    def save(self) -> None:
        with self.mutex:
            names = sorted(self.db.list_collection_names())
            meta: dict[str, Any] = {}
            for name in names:
                indexes = []
                for ix_name, info in self.db[name].index_information().items():
                    if ix_name == "_id_":
                        continue
                    indexes.append(
                        {
                            "name": ix_name,
                            "keys": [[k, d] for k, d in info["key"]],
                            "unique": bool(info.get("unique", False)),
                        }
                    )
                meta[name] = {"indexes": indexes}
            header = {
                "format": STANDIN_FORMAT,
                "version": STANDIN_VERSION,
                "database": self.database,
                "collections": meta,
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(bson.encode(header))
                    for name in names:
                        for doc in _stored_documents(self.db[name]):
                            fh.write(bson.encode({"c": name, "d": doc}))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def _stored_documents(collection: Any) -> Any:
    """The stored documents without mongomock's per-document deep copy (read-only use)."""
    store = getattr(collection, "_store", None)
    documents = getattr(store, "documents", None)
    if documents is None:  # pragma: no cover - another mongomock layout
        return collection.find({})
    return documents


_STANDINS: dict[Path, _Standin] = {}
_STANDINS_LOCK = threading.Lock()


def standin_path(standin_dir: str | os.PathLike[str], database: str) -> Path:
    """The stand-in file of a database under `standin_dir`."""
    return Path(standin_dir) / f"{database}.mongo.bson"


def standin_label(path: Path) -> str:
    return f"MongoDB stand-in (mongomock, persisted at {path})"


def _lock(lock_path: Path, timeout_s: float) -> int:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            waited = time.monotonic() - start
            if waited >= timeout_s:
                os.close(fd)
                try:
                    holder = int(lock_path.read_text().strip() or 0) or None
                except (OSError, ValueError):
                    holder = None
                raise StandinBusy(str(lock_path.with_suffix("")), waited, holder) from None
            time.sleep(0.05)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _open_standin(settings: MongoSettings, standin_dir: Path, lock_timeout_s: float) -> DocumentStore:
    path = standin_path(standin_dir, settings.database).resolve()
    with _STANDINS_LOCK:
        standin = _STANDINS.get(path)
        if standin is not None and standin.pid != os.getpid():
            standin = None  # inherited through fork: the parent owns that copy and its lock
        if standin is None:
            fd = _lock(path.with_name(path.name + ".lock"), lock_timeout_s)
            try:
                standin = _Standin(path, settings.database, fd)
                standin.load()
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise
            _STANDINS[path] = standin
            log.info("using the %s (no MongoDB URI configured)", standin_label(path))
        standin.refs += 1
    return DocumentStore(
        standin.client, settings, label=standin_label(path), is_standin=True, standin=standin
    )


def _release_standin(standin: _Standin) -> None:
    with _STANDINS_LOCK:
        standin.refs -= 1
        try:
            standin.save()
        finally:
            if standin.refs <= 0:
                _STANDINS.pop(standin.path, None)
                fcntl.flock(standin.lock_fd, fcntl.LOCK_UN)
                os.close(standin.lock_fd)


__all__ = [
    "DocumentStore",
    "DocumentStoreError",
    "StandinBusy",
    "ensure_results_index",
    "open_document_store",
    "patch_mongomock",
    "redact_uri",
    "standin_label",
    "standin_path",
]
