"""A real Milvus server for the tests: PyPI `milvus==2.3.5` (standalone, embedded etcd, local disk).

One server per pytest session (about 7-20 s to start on the 2-core box), on free loopback ports,
with its data in a temporary directory that is removed afterwards. Registered as a plugin from
`tests/conftest.py`; tests ask for `milvus_server` (its URI and pid).

The binary runs as a child process (`milvus run standalone`) that outlives a killed Python
parent, so the server is stopped three ways:

- the fixture's teardown calls `stop()` and, if the child is still there, kills it by pid;
- an `atexit` hook does the same when the session ends without a teardown;
- a session killed outright (SIGKILL) leaves a record in `STATE_DIR`; the next session kills the
  server of every record whose pytest process is gone.

Without the `milvus` package the tests that need it are skipped, with the install command.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = "pip install 'milvus==2.3.5' (in the test extra: pip install -e '.[test]')"
STATE_DIR = Path(tempfile.gettempdir()) / f"batchyard-milvus-tests-{os.getuid()}"
START_ATTEMPTS = 2


@dataclass(frozen=True)
class MilvusServerInfo:
    """A running embedded Milvus server."""

    uri: str
    pid: int
    base_dir: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int, exe: str) -> None:
    """SIGKILL `pid` if it still runs the Milvus binary `exe` (never some reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return
    if cmdline == exe:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)


def _reap_orphans() -> None:
    """Kill servers left behind by earlier sessions that were killed before their teardown."""
    if not STATE_DIR.is_dir():
        return
    for record in STATE_DIR.glob("*.json"):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if _alive(int(info["pytest_pid"])):
            continue
        _kill(int(info["server_pid"]), info["exe"])
        shutil.rmtree(info["base_dir"], ignore_errors=True)
        record.unlink(missing_ok=True)


class _Server:
    """One embedded server: start on free ports, stop for sure (idempotent)."""

    def __init__(self) -> None:
        from milvus import MilvusServer, MilvusServerConfig

        self.base_dir = Path(tempfile.mkdtemp(prefix="batchyard-milvus-"))
        self.server = MilvusServer(MilvusServerConfig())
        self.server.set_base_dir(str(self.base_dir))
        self.pid = 0
        self.record = STATE_DIR / f"{os.getpid()}.json"

    def start(self) -> MilvusServerInfo:
        cfg = self.server.config
        # every listening port on a fresh ephemeral port: other sessions on this machine scan
        # upwards from Milvus' default ports
        for key in list(cfg.config_key_maps.values()):
            if key.endswith("_port"):
                cfg.set(key, _free_port())
        self.server.webservice_port = _free_port()
        self.server.start()
        self.pid = self.server.server_proc.pid
        STATE_DIR.mkdir(exist_ok=True)
        self.record.write_text(
            json.dumps(
                {
                    "pytest_pid": os.getpid(),
                    "server_pid": self.pid,
                    "exe": self.server.get_milvus_executable_path(),
                    "base_dir": str(self.base_dir),
                }
            )
        )
        return MilvusServerInfo(f"http://127.0.0.1:{self.server.listen_port}", self.pid, self.base_dir)

    def stop(self) -> None:
        exe = self.server.get_milvus_executable_path()
        with contextlib.suppress(Exception):  # the child is killed by pid below
            self.server.stop()
        if self.pid:
            _kill(self.pid, exe)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.record.unlink(missing_ok=True)


def _start() -> tuple[_Server, MilvusServerInfo]:
    """Start a server; a second attempt covers a port taken between probing and binding."""
    error: Exception | None = None
    for _ in range(START_ATTEMPTS):
        server = _Server()
        try:
            return server, server.start()
        except Exception as exc:
            server.stop()
            error = exc
    raise RuntimeError(f"the embedded Milvus server did not start: {error}") from error


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusServerInfo]:
    """The session's embedded Milvus 2.3.5 server (started on first use, always stopped)."""
    try:
        import milvus  # noqa: F401
    except ImportError:
        pytest.skip(f"the embedded Milvus server is not installed: {INSTALL_HINT}")
    _reap_orphans()
    server, info = _start()
    atexit.register(server.stop)
    try:
        yield info
    finally:
        server.stop()
        atexit.unregister(server.stop)


def drop_new_collections(client: Any, before: set[str]) -> None:
    """Drop every collection that is not in `before` (a test's cleanup on the shared server)."""
    for name in set(client.list_collections()) - before:
        client.drop_collection(name)
