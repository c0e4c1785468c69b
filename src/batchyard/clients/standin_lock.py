"""The inter-process lock of a stand-in file: shared for readers, exclusive for a writer.

Why. The stand-in is one file that one process writes at a time (the last save would otherwise
win), but two runs in one project directory must take turns with it, and commands that only
read (counts, audits, a snapshot) need not wait for each other. So a reader takes a shared
`flock` and a writer an exclusive one, on `<file>.lock`; both wait a bounded time, polling,
then fail with `StandinBusy` naming the processes that hold it (the lock file has a line per
live holder: pid, mode, since when) and how long they waited. A waiter logs one warning when the
wait passes `WARN_AFTER_S`, so a blocked run says what it waits for.

A shared lock is turned into an exclusive one (`upgrade`) when a process that opened the
stand-in for reading opens it for writing. Linux drops the shared lock while converting, so
another writer may slip in: the caller must check whether the file changed and reload it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchyard.storage.perms import file_mode_in

log = logging.getLogger(__name__)

WARN_AFTER_S = 2.0
_FIRST_POLL_S, _MAX_POLL_S = 0.01, 0.25


class LockTimeout(Exception):
    """The lock was not granted within the wait (`holders`: what the lock file says)."""

    def __init__(self, waited_s: float, holders: list[dict[str, Any]]) -> None:
        super().__init__(f"not granted in {waited_s:.1f} s")
        self.waited_s = waited_s
        self.holders = holders


class StandinLock:
    """`flock` on one lock file, held by this process in one mode at a time."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label  # what is locked, for the waiting message
        self.fd = -1
        self.exclusive = False

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def acquire(self, exclusive: bool, timeout_s: float) -> None:
        """Take the lock (waiting at most `timeout_s`); raises LockTimeout."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode_in(self.path.parent))  # staging's access
        try:
            self._wait(fd, exclusive, timeout_s)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.exclusive = fd, exclusive
        self._record()

    def upgrade(self, timeout_s: float) -> None:
        """Shared -> exclusive (see the module docstring: the file may have changed meanwhile).
        On a timeout the shared lock is taken back when it can be."""
        assert self.held
        if self.exclusive:
            return
        try:
            self._wait(self.fd, True, timeout_s)
        except LockTimeout:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                log.warning("lost the shared lock of %s while waiting to write it", self.label)
            raise
        self.exclusive = True
        self._record()

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self._forget()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd, self.exclusive = -1, False

    @property
    def waiters(self) -> Path:
        """A folder where processes waiting for the lock leave their pid (`wanted`)."""
        return self.path.with_name(self.path.name + ".wait")

    def wanted(self) -> bool:
        """Whether another live process waits for this lock (a holder lets go when it can)."""
        try:
            names = os.listdir(self.waiters)
        except OSError:
            return False
        return any(n.isdigit() and int(n) != os.getpid() and _alive(int(n)) for n in names)

    def _wait(self, fd: int, exclusive: bool, timeout_s: float) -> None:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        try:
            fcntl.flock(fd, mode)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        mark = self.waiters / str(os.getpid())
        self.waiters.mkdir(mode=0o700, exist_ok=True)
        mark.touch(mode=0o600)
        try:
            self._poll(fd, mode, timeout_s)
        finally:
            mark.unlink(missing_ok=True)

    def _poll(self, fd: int, mode: int, timeout_s: float) -> None:
        start = time.monotonic()
        pause, warned = _FIRST_POLL_S, False
        while True:
            try:
                fcntl.flock(fd, mode)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise LockTimeout(waited, self.holders())
            if not warned and waited >= WARN_AFTER_S:
                warned = True
                log.warning("waiting up to %.0f s for %s: %s", timeout_s, self.label, describe(self.holders()))
            time.sleep(min(pause, max(0.0, timeout_s - waited)))
            pause = min(pause * 2, _MAX_POLL_S)

    def _record(self) -> None:
        """Note this process as a holder (for the messages of those who wait): a writer is the
        only holder; each reader adds its line and removes it when it lets go."""
        note = json.dumps({"pid": os.getpid(), "mode": "write" if self.exclusive else "read",
                           "since": datetime.now(UTC).strftime("%H:%M:%S UTC")})
        lines = [] if self.exclusive else [n for n in self._notes() if n["pid"] != os.getpid() and _alive(n["pid"])]
        self._rewrite([*map(json.dumps, lines), note])

    def _forget(self) -> None:
        self._rewrite([json.dumps(n) for n in self._notes() if n["pid"] != os.getpid()] if not self.exclusive else [])

    def _rewrite(self, lines: list[str]) -> None:
        text = "".join(line + "\n" for line in lines).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text, 0)
        except OSError:
            pass  # the notes only inform waiters

    def _notes(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except OSError:
            return []
        notes = []
        for line in text.splitlines():
            line = line.strip()
            if line.isdigit():  # the format before modes: a pid alone
                notes.append({"pid": int(line)})
                continue
            try:
                note = json.loads(line)
            except ValueError:
                continue
            if isinstance(note, dict) and isinstance(note.get("pid"), int):
                notes.append(note)
        return notes

    def holders(self) -> list[dict[str, Any]]:
        """The other live processes the lock file names: [{"pid", "mode", "since"}, ...]."""
        return [n for n in self._notes() if n["pid"] != os.getpid() and _alive(n["pid"])]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def describe(holders: list[dict[str, Any]] | None) -> str:
    """"in use by another process (pid 12) for writing since 10:02:03 UTC" (or less)."""
    if not holders:
        return "in use by another process"
    if len(holders) > 1:
        pids = ", ".join(str(h["pid"]) for h in holders)
        return f"in use by {len(holders)} other processes (pids {pids}) for reading"
    holder = holders[0]
    text = f"in use by another process (pid {holder['pid']})"
    mode = {"write": "writing", "read": "reading"}.get(holder.get("mode", ""))
    if mode:
        text += f" for {mode}"
    if holder.get("since"):
        text += f" since {holder['since']}"
    return text


__all__ = ["WARN_AFTER_S", "LockTimeout", "StandinLock", "describe"]
