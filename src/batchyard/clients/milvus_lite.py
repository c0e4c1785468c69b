"""Milvus Lite in a process of its own (`python -m milvus_lite server`), reached over gRPC.

pymilvus runs Milvus Lite inside the calling process when it is given a `.db` path. At a million
256-dimension vectors Lite holds about 2 GB, and that memory stays with whatever process opened
it: the pipeline's own memory would then grow with the collection, not with a partition. So the
embedded default (`milvus.lite_mode = "process"`) starts Lite's own gRPC server as a child
process and connects to it like to any Milvus server. Side effects: its spurious gRPC
tracebacks stay in the child, and the data directory has one owner however many clients this
process opens.

Lite has no authentication, and on a loopback TCP port any local user could read and write the
vectors. So the child listens on a Unix socket in an owner-only folder (0700) next to the data
directory (`<staging>/.milvus-lite/`), and pymilvus connects to `unix:<path>`; a path too long
for a Unix socket (107 bytes) goes to a private temporary folder instead. The child runs under
a umask taken from the staging folder's mode (`perms.umask_for`), so its data files are as
private as the rest of staging. (`milvus.lite_mode = "thread"` runs Lite in this process,
where pymilvus binds it to a loopback TCP port: readable by local users during the run.)

The child is tied to its parent: on Linux it gets SIGTERM when the parent dies
(`PR_SET_PDEATHSIG`), so a crashed pipeline never leaves a server holding the data directory.
Within one process, every client of one data directory shares one child (reference counted).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from batchyard.errors import TerminalError
from batchyard.storage.perms import file_mode_in, umask_for

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


class LiteServerError(TerminalError):
    """Milvus Lite's server process did not start."""

    def __init__(self, data_dir: str, reason: str) -> None:
        self.data_dir = data_dir
        super().__init__(f"Milvus Lite at {data_dir}: {reason}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


SOCKET_PATH_MAX = 107
"""Longest path of a Unix socket (`sun_path` holds 108 bytes with its NUL)."""
SOCKET_NAME = "milvus"
"""The child binds `unix:<folder>/milvus:0`: `milvus_lite server` joins `--host` and `--port`
with a colon, and for a `unix:` address gRPC takes all of it as the path."""


def _socket_folder(data_dir: Path) -> tuple[Path, bool]:
    """An owner-only folder for the child's socket, and whether it is a temporary one."""
    folder = data_dir.parent / ".milvus-lite"
    if len(str(folder / f"{SOCKET_NAME}:0").encode()) > SOCKET_PATH_MAX:
        return Path(tempfile.mkdtemp(prefix="batchyard-milvus-")), True  # 0700 by mkdtemp
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)  # whatever the umask or an older folder had
    return folder, False


def _reachable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class LiteServer:
    """One `milvus_lite server` child process serving one data directory on a Unix socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.refs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.folder: Path | None = None
        self._temporary = False

    @property
    def socket_path(self) -> Path:
        assert self.folder is not None, "not started"
        return self.folder / f"{SOCKET_NAME}:0"

    @property
    def uri(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.folder, self._temporary = _socket_folder(self.data_dir)
        if _reachable(self.socket_path):
            raise LiteServerError(str(self.data_dir), "another process serves it (its socket answers)")
        self.socket_path.unlink(missing_ok=True)  # a dead child's socket: gRPC does not replace it
        log_path = self.data_dir.parent / f".{self.data_dir.name}.server.log"
        umask = umask_for(self.data_dir.parent)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode_in(self.data_dir.parent))
        with os.fdopen(fd, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                 "--host", f"unix:{self.folder / SOCKET_NAME}", "--port", "0"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _child_setup(umask),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self._remove_folder()
                raise LiteServerError(str(self.data_dir), f"the server exited during start-up: {tail[0]}")
            if _reachable(self.socket_path):
                log.info("Milvus Lite server for %s on %s (pid %d)", self.data_dir, self.uri, self.proc.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise LiteServerError(str(self.data_dir), f"the server did not listen within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        if self.folder is not None:
            self.socket_path.unlink(missing_ok=True)
        self._remove_folder()

    def _remove_folder(self) -> None:
        if self._temporary and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _child_setup(umask: int) -> None:  # pragma: no cover - runs in the child before exec
    os.umask(umask)  # the child's data files get staging's access
    if sys.platform == "linux":
        _die_with_parent()


_SERVERS: dict[Path, LiteServer] = {}
_LOCK = threading.Lock()


def _start(path: Path, attempts: int = 3) -> LiteServer:
    """Start a server, again if it dies at start-up: a child can die for reasons of the moment
    (gRPC's poller failing on a loaded machine, seen once in CI as `epoll_wait error: Bad file
    descriptor`)."""
    for attempt in range(1, attempts + 1):
        server = LiteServer(path)
        try:
            server.start()
            return server
        except LiteServerError as exc:
            if attempt == attempts or "exited during start-up" not in str(exc):
                raise
            log.warning("%s; starting it again (attempt %d of %d)", exc, attempt + 1, attempts)
    raise AssertionError("unreachable")


def acquire(data_dir: str | os.PathLike[str]) -> str:
    """The URI of the Lite server of `data_dir`, starting it if this process has none yet."""
    path = Path(data_dir).expanduser().resolve()
    with _LOCK:
        server = _SERVERS.get(path)
        if server is None or server.proc is None or server.proc.poll() is not None:
            server = _start(path)
            _SERVERS[path] = server
        server.refs += 1
        return server.uri


def release(data_dir: str | os.PathLike[str]) -> None:
    """Drop one reference; the last one stops the server (it saves its data on SIGTERM)."""
    path = Path(data_dir).expanduser().resolve()
    with _LOCK:
        server = _SERVERS.get(path)
        if server is None:
            return
        server.refs -= 1
        if server.refs <= 0:
            server.stop()
            _SERVERS.pop(path, None)
