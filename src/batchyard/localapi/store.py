"""Persistent state of the local Batch API server, under one `state_dir`.

Layout::

    state_dir/
      lock                    flock held by the live server (one server per state_dir)
      owner.salt              random salt of the owner tags (HMAC of a key; never the key)
      counters.json           fault counters and processed-request totals
      files/<file_id>.json    FileObject metadata      blobs/<file_id>   file content
      batches/<batch_id>.json batch record: {"batch": <Batch JSON>, "seq", "t", ...}
      progress/<batch_id>.jsonl  processed request lines, appended as they finish

Every JSON document is written atomically (temp file + `os.replace`). All state is also kept in
memory; the lock `Store.lock` serialises mutations between the HTTP threads and the worker.

The files hold chunk texts and model outputs, so they are owner-only: every file is created
0o600 (`open_private`) and the state_dir (when the store creates it) and its sub-directories are
0o700, whatever the umask.

Each file and batch records its owner: the tag of the key that created it (`owner_tag`, an HMAC
of the key under this state_dir's salt; None when the server has no keys). The server shows a
key only what it owns (`auth.Principal`). A file past its `expires_at` is deleted when it is
next looked at, and by `delete_expired`, which the worker calls every minute.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from batchyard.localapi import shapes

T = TypeVar("T")

COUNTER_NAMES = (
    "batches_created",
    "validation_failed",
    "token_limit_failed",
    "expired",
    "cancelled_by_server",
    "processed_requests",
    "exit_kills",
)


PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
COPY_CHUNK_BYTES = 1024 * 1024


class StateDirLockedError(RuntimeError):
    """Another live server holds this state_dir."""


class StorageFull(Exception):
    """An owner's files would pass its storage cap."""

    def __init__(self, used: int, adding: int, cap: int) -> None:
        self.used, self.adding, self.cap = used, adding, cap
        super().__init__(f"storage cap of {cap:,} bytes: {used:,} bytes held, {adding:,} more refused")


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, PRIVATE_FILE_MODE)


def open_private(path: Path, mode: str) -> IO[Any]:
    """`open(path, mode)`, creating the file owner-only (0o600) if it does not exist."""
    encoding = None if "b" in mode else "utf-8"
    return open(path, mode, encoding=encoding, opener=_private_opener)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temp file in the same directory and `os.replace`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open_private(tmp, "w") as fh:
        json.dump(data, fh, separators=(",", ":"), ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class Store:
    """Files, batches and counters of one server, persisted under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            self.root.mkdir(parents=True)
            os.chmod(self.root, PRIVATE_DIR_MODE)
        for sub in ("files", "blobs", "batches", "progress"):
            (self.root / sub).mkdir(exist_ok=True)
            os.chmod(self.root / sub, PRIVATE_DIR_MODE)  # also tightens an older state_dir
        self.lock = threading.RLock()
        self._lock_fh = open_private(self.root / "lock", "a+")  # held for the store's life
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_fh.close()
            raise StateDirLockedError(f"state_dir {self.root} is in use by another server") from exc
        self._files: dict[str, dict[str, Any]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.clock: Callable[[], float] = time.time
        """Now, for expiry (a test moves it forward instead of waiting an hour)."""
        self._salt = self._load_salt()
        self._load()

    def _load_salt(self) -> bytes:
        path = self.root / "owner.salt"
        if not path.exists():
            tmp = self.root / f".owner.salt.{os.getpid()}.tmp"
            with open_private(tmp, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            os.replace(tmp, path)
        return path.read_bytes()

    def owner_tag(self, key: str) -> str:
        """The owner recorded for what a key creates: stable for this state_dir, not the key."""
        return "k-" + hmac.new(self._salt, key.encode(), hashlib.sha256).hexdigest()[:24]

    # ------------------------------------------------------------------ loading / closing
    def _load(self) -> None:
        for path in (self.root / "files").glob("*.json"):
            meta = _read_json(path)
            self._files[meta["id"]] = meta
        for path in (self.root / "batches").glob("*.json"):
            rec = _read_json(path)
            self._batches[rec["batch"]["id"]] = rec
        counters = self.root / "counters.json"
        if counters.exists():
            self._counters.update(_read_json(counters))
        for tmp in self.root.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the state_dir lock."""
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()

    # ------------------------------------------------------------------ counters
    def counters(self) -> dict[str, int]:
        """A copy of the persisted counters."""
        with self.lock:
            return dict(self._counters)

    def bump(self, name: str, n: int = 1) -> int:
        """Add `n` to a counter, persist, and return the new value."""
        with self.lock:
            self._counters[name] = self._counters.get(name, 0) + n
            write_json_atomic(self.root / "counters.json", self._counters)
            return self._counters[name]

    # ------------------------------------------------------------------ files
    def blob_path(self, file_id: str) -> Path:
        """Where a file's content lives."""
        return self.root / "blobs" / file_id

    def tmp_blob_path(self, tag: str) -> Path:
        """A temp path in the blob directory (same filesystem, for `os.replace`)."""
        return self.root / "blobs" / f".{tag}.{os.getpid()}.{threading.get_ident()}.tmp"

    def add_file(
        self,
        content: IO[bytes],
        *,
        filename: str,
        purpose: str,
        expires_after_s: int | None,
        owner: str | None = None,
        cap: int | None = None,
    ) -> dict[str, Any]:
        """Store an uploaded file (copied from `content` in chunks) and return its FileObject.

        Raises:
            StorageFull: the owner's live files and this one would pass `cap` bytes.
        """
        file_id = shapes.new_id("file-")
        tmp = self.tmp_blob_path(file_id)
        try:
            with open_private(tmp, "wb") as fh:
                shutil.copyfileobj(content, fh, COPY_CHUNK_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
            return self.register_file(
                tmp,
                file_id=file_id,
                filename=filename,
                purpose=purpose,
                expires_after_s=expires_after_s,
                owner=owner,
                cap=cap,
            )
        finally:
            tmp.unlink(missing_ok=True)

    def register_file(
        self,
        tmp: Path,
        *,
        file_id: str,
        filename: str,
        purpose: str,
        expires_after_s: int | None,
        owner: str | None = None,
        cap: int | None = None,
    ) -> dict[str, Any]:
        """Move a fully written temp blob into place under `file_id` and record its metadata
        (`owner`: the tag of the key it belongs to; `cap`: see `add_file`)."""
        now = int(self.clock())
        expires_at = now + expires_after_s if expires_after_s else None
        nbytes = tmp.stat().st_size
        meta = shapes.file_object(
            file_id,
            nbytes=nbytes,
            created_at=now,
            filename=shapes.safe_filename(filename),
            purpose=purpose,
            expires_at=expires_at,
        )
        with self.lock:
            if cap is not None:
                self.delete_expired()
                used = self.used_bytes(owner)
                if used + nbytes > cap:
                    raise StorageFull(used, nbytes, cap)
            os.replace(tmp, self.blob_path(file_id))
            stored = {**meta, "_t": time.time(), "_owner": owner}
            write_json_atomic(self.root / "files" / f"{file_id}.json", stored)
            self._files[file_id] = stored
        return meta

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        """FileObject of a live file (expired files are deleted on access)."""
        with self.lock:
            meta = self._files.get(file_id)
            if meta is None:
                return None
            if self._expired(meta, self.clock()):
                self.delete_file(file_id)
                return None
            return {k: v for k, v in meta.items() if not k.startswith("_")}

    def file_owner(self, file_id: str) -> str | None:
        """The owner tag of a file (None: no keys when it was made, or no such file)."""
        with self.lock:
            return (self._files.get(file_id) or {}).get("_owner")

    @staticmethod
    def _expired(meta: dict[str, Any], now: float) -> bool:
        return meta.get("expires_at") is not None and meta["expires_at"] <= now

    def used_bytes(self, owner: str | None) -> int:
        """Bytes of an owner's live files (inputs and batch outputs alike)."""
        with self.lock:
            now = self.clock()
            return sum(m["bytes"] for m in self._files.values()
                       if m.get("_owner") == owner and not self._expired(m, now))

    def delete_expired(self, now: float | None = None) -> list[str]:
        """Delete every file past its `expires_at`; their ids."""
        with self.lock:
            now = self.clock() if now is None else now
            gone = [fid for fid, m in self._files.items() if self._expired(m, now)]
            for fid in gone:
                self.delete_file(fid)
            return gone

    def list_files(
        self,
        *,
        purpose: str | None = None,
        order: str = "desc",
        visible: Callable[[str | None], bool] = lambda owner: True,
    ) -> list[dict[str, Any]]:
        """Live files whose owner is `visible`, by creation time (`desc`: newest first)."""
        with self.lock:
            order_keys = {
                fid: (m.get("_t", m["created_at"]), fid)
                for fid, m in self._files.items()
                if visible(m.get("_owner"))
            }
        metas = [m for fid in order_keys if (m := self.get_file(fid)) is not None]
        if purpose:
            metas = [m for m in metas if m["purpose"] == purpose]
        metas.sort(key=lambda m: order_keys[m["id"]], reverse=order != "asc")
        return metas

    def read_file(self, file_id: str) -> bytes:
        """A file's content."""
        return self.blob_path(file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        """Delete a file; False if it did not exist."""
        with self.lock:
            if self._files.pop(file_id, None) is None:
                return False
            (self.root / "files" / f"{file_id}.json").unlink(missing_ok=True)
            self.blob_path(file_id).unlink(missing_ok=True)
            return True

    # ------------------------------------------------------------------ batches
    def add_batch(self, record: dict[str, Any]) -> None:
        """Persist a new batch record (gets a sequence number for stable ordering)."""
        with self.lock:
            record["seq"] = self.bump("batches_created")
            self._persist_batch(record)
            self._batches[record["batch"]["id"]] = record

    def _persist_batch(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.root / "batches" / f"{record['batch']['id']}.json", record)

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """A deep copy of a batch record, or None."""
        with self.lock:
            rec = self._batches.get(batch_id)
            return copy.deepcopy(rec) if rec is not None else None

    def list_batches(
        self, visible: Callable[[str | None], bool] = lambda owner: True
    ) -> list[dict[str, Any]]:
        """Batch objects whose owner is `visible`, newest first."""
        with self.lock:
            recs = sorted(self._batches.values(), key=lambda r: r["seq"], reverse=True)
            return [copy.deepcopy(r["batch"]) for r in recs if visible(r.get("owner"))]

    def update_batch(self, batch_id: str, fn: Callable[[dict[str, Any]], T]) -> T:
        """Run `fn(record)` under the lock on the live record, persist it, return fn's result."""
        with self.lock:
            rec = self._batches[batch_id]
            result = fn(rec)
            self._persist_batch(rec)
            return result

    def active_batch_ids(self) -> list[str]:
        """Ids of non-terminal batches, oldest first."""
        with self.lock:
            recs = [
                r
                for r in self._batches.values()
                if r["batch"]["status"] not in shapes.TERMINAL_STATUSES
            ]
            return [r["batch"]["id"] for r in sorted(recs, key=lambda r: r["seq"])]

    def batch_records(self) -> list[dict[str, Any]]:
        """Deep copies of every batch record, oldest first."""
        with self.lock:
            return [
                copy.deepcopy(r) for r in sorted(self._batches.values(), key=lambda r: r["seq"])
            ]

    def progress_path(self, batch_id: str) -> Path:
        """The append-only file of a batch's processed request lines."""
        return self.root / "progress" / f"{batch_id}.jsonl"
