"""Milvus Lite in a process of its own (`python -m milvus_lite server`), reached over gRPC.

pymilvus runs Milvus Lite inside the calling process when it is given a `.db` path. At a million
256-dimension vectors Lite holds about 2 GB, and that memory stays with whatever process opened
it: the pipeline's own memory would then grow with the collection, not with a partition. So the
embedded default (`milvus.lite_mode = "process"`) starts Lite's own gRPC server as a child
process on a free loopback port and connects to it like to any Milvus server. Side effects:
its spurious gRPC tracebacks stay in the child, and the data directory has one owner however
many clients this process opens.

The child is tied to its parent: on Linux it gets SIGTERM when the parent dies
(`PR_SET_PDEATHSIG`), so a crashed pipeline never leaves a server holding the data directory.
Within one process, every client of one data directory shares one child (reference counted).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from batchyard.errors import TerminalError

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiteServer:
    """One `milvus_lite server` child process serving one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.refs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir.parent / f".{self.data_dir.name}.server.log"
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise LiteServerError(str(self.data_dir), f"the server exited during start-up: {tail[0]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    log.info("Milvus Lite server for %s on port %d (pid %d)", self.data_dir, self.port, self.proc.pid)
                    return
            except OSError:
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


_SERVERS: dict[Path, LiteServer] = {}
_LOCK = threading.Lock()


def _start(path: Path, attempts: int = 3) -> LiteServer:
    """Start a server, on a fresh port each time: a child can die at start-up for reasons of the
    moment (its port taken between our probe and its bind; gRPC's poller failing on a loaded
    machine, seen once in CI as `epoll_wait error: Bad file descriptor`)."""
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
