"""A real Milvus server for the tests: PyPI `milvus==2.3.5` (standalone, embedded etcd, local disk).

One server per pytest session (about 7-20 s to start on the 2-core box), on free loopback ports,
with its data in a temporary directory that is removed afterwards. Registered as a plugin from
`tests/conftest.py`; tests ask for `milvus_server` (its URI and pid).

The binary runs as a child process (`milvus run standalone`) that outlives a killed Python
parent, so the server is stopped three ways:

- the fixture's teardown calls `stop()` and, if the child is still there, kills it by pid;
- an `atexit` hook does the same when the session ends without a teardown;
- a session killed outright (SIGKILL) leaves a record in `STATE_DIR`; the next session kills the
  server of every record whose owning process is gone.

Without the `milvus` package the tests that need it are skipped, with the install command.
`benchmarks/bench_milvus.py` starts its server with `start_embedded_server` too.
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
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = "pip install 'milvus==2.3.5' (in the test extra: pip install -e '.[test]')"
STATE_DIR = Path(tempfile.gettempdir()) / f"batchyard-milvus-tests-{os.getuid()}"
START_ATTEMPTS = 2
START_TIMEOUT_S = 180


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
    """SIGKILL `pid` if it still runs the Milvus binary `exe` (never a reused pid), and remove
    the session-id file the binary leaves outside its base dir."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        cmdline = ""  # already gone
    if cmdline and cmdline != exe:
        return  # the pid belongs to another program now
    if cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
    (Path(tempfile.gettempdir()) / "milvus" / f"server_id_{pid}").unlink(missing_ok=True)


def _etcd_config(client_port: int, peer_port: int) -> str:
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return (
        f"name: batchyard-test\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: batchyard-test={peer}\n"
    )


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (the server copies the environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _reap_orphans() -> None:
    """Kill servers left behind by earlier sessions that were killed before their teardown."""
    if not STATE_DIR.is_dir():
        return
    for record in STATE_DIR.glob("*.json"):
        try:
            info = json.loads(record.read_text())
            owner, pid, exe, base_dir = info["owner_pid"], info["server_pid"], info["exe"], info["base_dir"]
        except (OSError, ValueError, KeyError):
            record.unlink(missing_ok=True)
            continue
        if _alive(int(owner)):
            continue
        _kill(int(pid), exe)
        shutil.rmtree(base_dir, ignore_errors=True)
        record.unlink(missing_ok=True)


class EmbeddedServer:
    """One embedded server: start on free ports, stop for sure (idempotent)."""

    def __init__(self) -> None:
        from milvus import MilvusServer, MilvusServerConfig

        self.base_dir = Path(tempfile.mkdtemp(prefix="batchyard-milvus-"))
        # started without waiting, so the orphan record is written before the long wait
        self.server = MilvusServer(MilvusServerConfig(), wait_for_started=False)
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
        # the embedded etcd's peer port is 2380 unless its own config file says otherwise, and
        # Milvus reads that file's path from the environment only (ETCD_CONFIG_PATH)
        etcd_config = self.base_dir / "configs" / "embed-etcd.yaml"
        etcd_config.parent.mkdir(parents=True, exist_ok=True)
        etcd_config.write_text(_etcd_config(int(cfg.get("etcd_port")), _free_port()))
        with _environ(ETCD_CONFIG_PATH=str(etcd_config)):
            self.server.start()
        self.pid = self.server.server_proc.pid
        STATE_DIR.mkdir(exist_ok=True)
        self.record.write_text(
            json.dumps(
                {
                    "owner_pid": os.getpid(),
                    "server_pid": self.pid,
                    "exe": self.server.get_milvus_executable_path(),
                    "base_dir": str(self.base_dir),
                }
            )
        )
        self._wait_ready()
        return MilvusServerInfo(f"http://127.0.0.1:{self.server.listen_port}", self.pid, self.base_dir)

    def _wait_ready(self) -> None:
        """Wait for `/healthz`; fail fast, naming the log, if the process exits meanwhile
        (the package's own wait keeps polling a dead process until its timeout)."""
        proc = self.server.server_proc
        url = f"http://127.0.0.1:{self.server.webservice_port}/healthz"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"milvus exited with code {proc.returncode} while starting; see {self.base_dir / 'logs'}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if b"OK" in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"milvus did not answer {url} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        exe = self.server.get_milvus_executable_path()
        proc = self.server.server_proc
        pid = self.pid or (proc.pid if proc is not None else 0)
        with contextlib.suppress(Exception):  # the child is killed by pid below
            self.server.stop()
        if pid:
            _kill(pid, exe)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.record.unlink(missing_ok=True)
        atexit.unregister(self.stop)


def start_embedded_server() -> tuple[EmbeddedServer, MilvusServerInfo]:
    """Start a server (stop it with `.stop()`; an `atexit` hook stops it otherwise).

    Servers orphaned by killed sessions are reaped first; a second attempt covers a port taken
    between probing and binding.
    """
    _reap_orphans()
    error: Exception | None = None
    for _ in range(START_ATTEMPTS):
        server = EmbeddedServer()
        try:
            info = server.start()
        except Exception as exc:
            server.stop()
            error = exc
            continue
        atexit.register(server.stop)
        return server, info
    raise RuntimeError(f"the embedded Milvus server did not start: {error}") from error


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusServerInfo]:
    """The session's embedded Milvus 2.3.5 server (started on first use, always stopped)."""
    try:
        import milvus  # noqa: F401
    except ImportError:
        pytest.skip(f"the embedded Milvus server is not installed: {INSTALL_HINT}")
    server, info = start_embedded_server()
    try:
        yield info
    finally:
        server.stop()


def drop_new_collections(client: Any, before: set[str]) -> None:
    """Drop every collection that is not in `before` (a test's cleanup on the shared server)."""
    for name in set(client.list_collections()) - before:
        client.drop_collection(name)
