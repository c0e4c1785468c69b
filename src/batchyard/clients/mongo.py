"""The document store: a real MongoDB, or a persisted pymongo-compatible stand-in.

`open_document_store(settings, standin_dir=...)` gives a `DocumentStore` whatever the backend:

- `settings.uri` set: a `pymongo.MongoClient`. The URI and its password never appear in a
  label, repr, log line or error raised here; `store.label` shows only the host list. This is
  plain pymongo: nothing below changes how a real server is used.
- no URI: the embedded stand-in, `mongomock` over batchyard's indexed storage, persisted in one
  file in `standin_dir` (`<database>.mongo.bson`; `save()`/`close()` make changes durable
  atomically). It is labelled as a stand-in wherever it is shown (`store.is_standin`,
  `store.label`).

Why the stand-in is mongomock over its own storage, not another embedded store: the pipeline's
pymongo calls (unordered `bulk_write` of `UpdateOne`, `$set` of dotted paths, upserts against a
unique index, `aggregate` `$group`, `count_documents`) must run unchanged, and mongomock is the
only embedded engine that takes all of them through the pymongo API (montydb 2.5 raises
NotImplementedError for `bulk_write`, `aggregate`, `with_options` and `create_index` and scans
for every query; mongita 1.2 has no `bulk_write`, `aggregate`, `$or` or `$and`). What did not scale was mongomock's storage (every document a dict,
every query a scan, every open an `insert_many`), so that is what is replaced:
`batchyard.clients.standin` keeps documents BSON-encoded in the file (read back with `pread`)
and answers `_id`, company, document, chunk-id and results-key lookups, `_id`-range pages,
counts and `$group` counts from hash and sorted indexes; `batchyard.clients.standin_file` is the
append-only file with commit records. Opening reads a few bytes per document (no `insert_many`)
and the chunk fields the pipeline looks up by are indexed on open (`_ensure_lookup_indexes`).

What the stand-in answers from its indexes, i.e. what costs about what it returns (the same
pymongo calls a real server answers from its own indexes; `mongo.fields.*` names the fields):

- `find({<targets>, updated_at: {$gte: T}, _id: {$gt: last}}).sort("_id", 1).limit(page)` with
  the targets as a company `$in` or an `$or` of company + document `$in` (`iter_id_pages`): the
  `updated_at` range (`$gt/$gte/$lt/$lte`) drives, the targets only filter its candidates, so a
  pass over 100 changed chunks of 1M costs milliseconds; the candidates are built once per
  filter and reused by every page while no indexed value changes;
- `find(<targets>, {updated_at: 1}).sort(updated_at, -1).limit(1)` (the newest change): walks
  the sorted dates from the newest, decoding one document;
- `aggregate([{$match: <targets>}, {$group: {_id: "$company" (or company + document), n: {$sum: 1}}}])`
  and `count_documents(<filter>)`: counted from the indexes, no document decoded;
- `find({company: c}, {_id: 1})` (a company's ids) and `find({_id: {$in: ids}})`: no scan, and
  no document decoded for an `_id`-only projection;
- not cheap: filters on fields no index names (each candidate is decoded and checked by
  mongomock), sorts on unindexed fields or without a limit, and anything mongomock must scan.

Within one process every store opened on the same stand-in file shares one in-memory database
(so two stages see each other's writes). Across processes they take turns (`standin_lock`): a
store opened for writing (the default) holds an exclusive file lock until it is closed, one
opened with `read_only=True` a shared one (readers run side by side and every write is refused),
and an opener waits at most `lock_timeout_s` (30 s by default, with a warning after 2 s) before
`StandinBusy` names the holder. Closing a store that changed nothing writes nothing, and opening
is cheap (an index checkpoint beside the file, `standin_checkpoint`), so a process can open the
stand-in per operation and let others in between. A forked child that inherited an open
stand-in can read it but not write or save it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from batchyard.clients.standin import StandinFileError
from batchyard.clients.standin_file import FORMAT, VERSION, StandinDatabase
from batchyard.clients.standin_lock import LockTimeout, StandinLock, describe
from batchyard.clients.standin_mongomock import install_indexed_store
from batchyard.errors import TerminalError, TransientError
from batchyard.settings import MongoSettings

log = logging.getLogger(__name__)

STANDIN_FORMAT = FORMAT
STANDIN_VERSION = VERSION
RESULTS_INDEX_NAME = "batchyard_task_unit"
RESULTS_INDEX_KEYS = [("task", ASCENDING), ("task_version", ASCENDING), ("unit_id", ASCENDING)]
STANDIN_LOOKUP_INDEX = "batchyard_standin_company_document"
STANDIN_CHUNK_ID_INDEX = "batchyard_standin_chunk_id"
STANDIN_UPDATED_AT_INDEX = "batchyard_standin_updated_at"
DEFAULT_LOCK_TIMEOUT_S = 30.0


class DocumentStoreError(TerminalError):
    """The document store cannot be opened or used."""

    def __init__(self, label: str, reason: str) -> None:
        self.label = label
        self.reason = reason
        super().__init__(f"{label}: {reason}")


class StandinBusy(TransientError):
    """Another process holds the stand-in file (for writing, or for reading while we would write)."""

    def __init__(
        self, path: str, waited_s: float, holders: list[dict[str, Any]] | int | None = None, *, write: bool = True
    ) -> None:
        if isinstance(holders, int):
            holders = [{"pid": holders}]
        self.path = path
        self.waited_s = waited_s
        self.holders = holders or []
        self.holder_pid: int | None = self.holders[0]["pid"] if self.holders else None
        wanted = "write" if write else "read"
        super().__init__(
            f"the MongoDB stand-in at {path} is {describe(self.holders)}; waited {waited_s:.1f} s to {wanted} it. "
            "Retry when that process is done, or set a MongoDB URI"
        )


# --------------------------------------------------------------------------- mongomock shim


def patch_mongomock() -> None:
    """Adapt mongomock 4.3 to pymongo 4.20 and give it indexes (idempotent).

    1. pymongo 4.20 passes `sort=` to `BulkOperationBuilder.add_update/add_replace`; mongomock
       does not accept it: the keyword is dropped (it only matters with several matches).
    2. Every mongomock collection created afterwards keeps its documents BSON-encoded with hash
       indexes on its indexed fields and a sorted `_id` index, so keyed writes, `$in` lookups,
       `_id`-range pages, counts and `$group` counts do not scan the collection
       (`batchyard.clients.standin_mongomock`, which also stops cursors re-slicing their results per item).
    """
    try:
        from mongomock.collection import BulkOperationBuilder
    except ImportError:  # pragma: no cover - mongomock is a core dependency
        return
    if not getattr(BulkOperationBuilder, "_batchyard_shim", False):
        orig_update = BulkOperationBuilder.add_update
        orig_replace = BulkOperationBuilder.add_replace

        def add_update(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
            return orig_update(self, *args, **kwargs)

        def add_replace(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
            return orig_replace(self, *args, **kwargs)

        BulkOperationBuilder.add_update = add_update  # type: ignore[method-assign]
        BulkOperationBuilder.add_replace = add_replace  # type: ignore[method-assign]
        BulkOperationBuilder._batchyard_shim = True  # type: ignore[attr-defined]
    install_indexed_store()


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

    def wanted(self) -> bool:
        """Whether another process waits for this stand-in (a real server: never)."""
        return self._standin is not None and self._standin.lock.wanted()

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
    settings: MongoSettings,
    *,
    standin_dir: str | os.PathLike[str],
    lock_timeout_s: float | None = None,
    read_only: bool = False,
) -> DocumentStore:
    """Open MongoDB (`settings.uri`) or the persisted stand-in under `standin_dir`.

    Opening does not contact a real server; the first operation does. `read_only` concerns the
    stand-in only: it then shares the file with other readers, and every write through it raises
    `StandinFileError` ("opened read-only"); a real server is used as is.

    Raises:
        DocumentStoreError: the URI is invalid (the message never contains it), or the stand-in
            file is corrupt.
        StandinBusy: another process held the stand-in for `lock_timeout_s`.
    """
    if settings.uri is not None:
        return _open_server(settings)
    return _open_standin(settings, Path(standin_dir), settings.standin_wait_s if lock_timeout_s is None
                         else lock_timeout_s, read_only)


def _open_server(settings: MongoSettings) -> DocumentStore:
    assert settings.uri is not None
    uri = settings.uri.get_secret_value()
    label = f"MongoDB at {redact_uri(uri)}"
    error = None
    try:
        # a timeout in the URI wins over the setting (pymongo lets keywords win over the URI)
        timeout: dict[str, Any] = {} if "serverselectiontimeoutms" in uri.lower() else {
            "serverSelectionTimeoutMS": int(settings.server_selection_timeout_s * 1000)}
        client: MongoClient[dict[str, Any]] = MongoClient(
            uri, connect=False, appname="batchyard", tz_aware=True, **timeout
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
    """One stand-in database bound to its file, shared within the process."""

    def __init__(self, path: Path, database: str, lock: StandinLock) -> None:
        import mongomock

        patch_mongomock()
        self.path = path
        self.database = database
        self.lock = lock
        self.pid = os.getpid()
        self.refs = 0
        self.mutex = threading.RLock()
        self.data = StandinDatabase(path, database)
        self.server = mongomock.store.ServerStore()
        self.client: Any = mongomock.MongoClient(tz_aware=True, _store=self.server)

    @property
    def read_only(self) -> bool:
        return self.data.read_only

    def load(self, read_only: bool) -> None:
        """Open the file (created when missing, unless read-only); its documents are not re-inserted."""
        try:
            self.data.open(read_only=read_only)
        except StandinFileError as exc:
            self.data.close()
            raise DocumentStoreError(standin_label(self.path), str(exc)) from None
        except OSError as exc:
            self.data.close()
            raise DocumentStoreError(
                standin_label(self.path), f"cannot read the stand-in file: {type(exc).__name__}: {exc}"
            ) from None
        self.server._databases[self.database] = self.data.db_store

    def make_writable(self, timeout_s: float) -> None:
        """A stand-in opened read-only in this process is about to be written: take the
        exclusive lock, and reload the file if another process changed it meanwhile."""
        try:
            self.lock.upgrade(timeout_s)
        except LockTimeout as exc:
            raise StandinBusy(str(self.path), exc.waited_s, exc.holders, write=True) from None
        with self.mutex:
            if self.data.changed_on_disk():
                self.data.reopen()
                self.load(read_only=False)
            else:
                self.data.make_writable()

    def save(self) -> None:
        with self.mutex:
            try:
                self.data.save()
            except StandinFileError as exc:
                raise DocumentStoreError(standin_label(self.path), str(exc)) from None

    def close(self) -> None:
        """Close the file and let go of the in-memory database: mongomock's client and database
        objects refer to each other, so without this the indexes (hundreds of MB at 1M chunks)
        would stay until the next full garbage collection."""
        self.data.close()
        for db in self.client._database_accesses.values():
            db._collection_accesses.clear()
        self.client._database_accesses.clear()
        self.server._databases.clear()


_STANDINS: dict[Path, _Standin] = {}
_STANDINS_LOCK = threading.Lock()


def standin_path(standin_dir: str | os.PathLike[str], database: str) -> Path:
    """The stand-in file of a database under `standin_dir`."""
    return Path(standin_dir) / f"{database}.mongo.bson"


def standin_label(path: Path) -> str:
    return f"MongoDB stand-in (mongomock, persisted at {path})"


def standin_in_use(standin_dir: str | os.PathLike[str], database: str, *, write: bool = True) -> StandinBusy | None:
    """Whether another process holds the stand-in now (for writing, or for reading when `write`):
    a `StandinBusy` naming the holders, or None. Never waits, holds nothing: for commands that
    fail fast before they start (the lock file's lines are its format, read them only here)."""
    path = standin_path(standin_dir, database).resolve()
    lock = StandinLock(path.with_name(path.name + ".lock"), f"the MongoDB stand-in at {path}")
    if not lock.path.exists():
        return None
    try:
        lock.acquire(exclusive=write, timeout_s=0.0)
    except LockTimeout as exc:
        return StandinBusy(str(path), exc.waited_s, exc.holders, write=write)
    lock.release()
    return None


def _open_standin(settings: MongoSettings, standin_dir: Path, lock_timeout_s: float, read_only: bool) -> DocumentStore:
    path = standin_path(standin_dir, settings.database).resolve()
    with _STANDINS_LOCK:
        standin = _STANDINS.get(path)
        if standin is not None and standin.pid != os.getpid():
            standin = None  # inherited through fork: the parent owns that copy and its lock
        if standin is None:
            lock = StandinLock(path.with_name(path.name + ".lock"), f"the MongoDB stand-in at {path}")
            try:
                lock.acquire(exclusive=not read_only, timeout_s=lock_timeout_s)
            except LockTimeout as exc:
                raise StandinBusy(str(path), exc.waited_s, exc.holders, write=not read_only) from None
            try:
                standin = _Standin(path, settings.database, lock)
                standin.load(read_only)
            except BaseException:
                lock.release()
                raise
            _STANDINS[path] = standin
            _ensure_lookup_indexes(standin, settings)
            log.info("using the %s (no MongoDB URI configured)", standin_label(path))
        elif standin.read_only and not read_only:
            standin.make_writable(lock_timeout_s)
            _ensure_lookup_indexes(standin, settings)
        standin.refs += 1
    return DocumentStore(
        standin.client, settings, label=standin_label(path), is_standin=True, standin=standin
    )


def _ensure_lookup_indexes(standin: _Standin, settings: MongoSettings) -> None:
    """Index the chunk fields the pipeline looks up by (the stand-in indexes them).

    Company and document (targets filters, partition counts), the change field
    (`fields.updated_at`: ranges and the newest change) and, when it is not `_id`, the chunk id
    field (marks are written by it). Creating them again is a no-op. An index built here over
    existing documents goes into the checkpoint, so it is built once, not at every open.
    """
    f = settings.fields
    chunks = standin.client[settings.database][settings.chunks_collection]
    chunks.create_index([(f.company, ASCENDING), (f.document, ASCENDING)], name=STANDIN_LOOKUP_INDEX)
    if f.chunk_id != "_id":
        chunks.create_index([(f.chunk_id, ASCENDING)], name=STANDIN_CHUNK_ID_INDEX)
    if f.updated_at:
        chunks.create_index([(f.updated_at, ASCENDING)], name=STANDIN_UPDATED_AT_INDEX)
    standin.data.refresh_checkpoint()


def _release_standin(standin: _Standin) -> None:
    with _STANDINS_LOCK:
        standin.refs -= 1
        if standin.pid != os.getpid():
            return  # inherited through fork: the parent saves it and owns the (shared) lock
        try:
            standin.save()  # writes nothing when nothing changed
            if standin.refs <= 0:
                standin.data.checkpoint_if_stale()
        finally:
            if standin.refs <= 0:
                _STANDINS.pop(standin.path, None)
                standin.close()
                standin.lock.release()


__all__ = [
    "DocumentStore",
    "DocumentStoreError",
    "StandinBusy",
    "ensure_results_index",
    "open_document_store",
    "patch_mongomock",
    "redact_uri",
    "standin_in_use",
    "standin_label",
    "standin_path",
]
