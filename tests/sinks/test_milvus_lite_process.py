"""Milvus Lite in a process of its own, shared by every process of a project directory: one
server per data directory, started by a supervisor, stopped once no registered process is left,
listening only on an owner-only Unix socket."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymilvus import MilvusClient

from batchyard.clients import milvus_lite
from batchyard.clients.milvus_lite import LiteServer, LiteServerError


def stopped(data: Path, within_s: float = milvus_lite.GRACE_S + 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not milvus_lite.server_pids(data):
            return True
        time.sleep(0.1)
    return False


def test_one_server_per_data_dir_shared_by_processes_and_stopped_after_the_last(tmp_path: Path) -> None:
    data = tmp_path / "milvus.db"
    uri = milvus_lite.acquire(data)
    other: subprocess.Popen[str] | None = None
    try:
        assert milvus_lite.acquire(data) == uri, "a second client of this process shares the server"
        pids = milvus_lite.server_pids(data)
        client = MilvusClient(uri=uri)
        client.create_collection("c", dimension=4)
        client.close()
        # another process attaches to the same server and sees the collection
        code = ("import sys, time\nfrom pymilvus import MilvusClient\nfrom batchyard.clients import milvus_lite\n"
                f"uri = milvus_lite.acquire({str(data)!r})\n"
                "print(uri, MilvusClient(uri=uri).list_collections(), flush=True)\nsys.stdin.readline()\n"
                f"milvus_lite.release({str(data)!r})\n")
        other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert other.stdout is not None
        assert other.stdout.readline().split(" ", 1) == [uri, "['c']\n"]
        assert milvus_lite.server_pids(data) == pids, "the other process attached, it started nothing"
        milvus_lite.release(data)
        milvus_lite.release(data)
        time.sleep(milvus_lite.GRACE_S + 1)
        assert milvus_lite.server_pids(data) == pids, "still serving the other process"
        other.communicate("done\n", timeout=60)
    finally:
        if other is not None and other.poll() is None:
            other.kill()
    assert stopped(data), "the last process left: the server stops"
    assert not Path(uri.removeprefix("unix:")).exists(), "the socket goes with the server"


def test_a_crashed_process_does_not_keep_the_server(tmp_path: Path) -> None:
    data = tmp_path / "milvus.db"
    code = (f"from batchyard.clients import milvus_lite\nmilvus_lite.acquire({str(data)!r})\n"
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    crashed = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert crashed.returncode == -signal.SIGKILL
    assert stopped(data), "nobody uses it: the supervisor stops it"


def test_a_child_that_dies_during_start_up_is_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = LiteServer.start
    starts: list[LiteServer] = []

    def flaky_start(self: LiteServer) -> None:
        starts.append(self)
        if len(starts) == 1:
            raise LiteServerError(str(self.data_dir), "the server exited during start-up: epoll_wait error")
        real_start(self)

    monkeypatch.setattr(LiteServer, "start", flaky_start)
    server = milvus_lite._start((tmp_path / "milvus.db").resolve())  # what the supervisor runs
    try:
        assert len(starts) == 2 and server is starts[1]
        assert MilvusClient(uri=server.uri).list_collections() == []
    finally:
        server.stop()


def _listening_inet_sockets(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append(cols[1])
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_server_listens_on_an_owner_only_unix_socket_not_on_tcp(tmp_path: Path) -> None:
    """Lite has no authentication: on a loopback port any local user could read the vectors."""
    data = tmp_path / "staging" / "milvus.db"
    uri = milvus_lite.acquire(data)
    try:
        pids = milvus_lite.server_pids(data)
        assert uri.startswith("unix:") and Path(uri.removeprefix("unix:")).is_socket()
        folder = Path(uri.removeprefix("unix:")).parent
        assert folder.parent == data.parent and stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert _listening_inet_sockets(pids["lite"]) == [] and _listening_inet_sockets(pids["supervisor"]) == []
        client = MilvusClient(uri=uri)
        client.create_collection("c", dimension=4)
        client.insert("c", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        assert client.query("c", filter="id >= 0", output_fields=["id"]) == [{"id": 1}]
        client.close()
    finally:
        milvus_lite.release(data)
    assert stopped(data)


def test_a_long_staging_path_puts_the_socket_in_a_private_temporary_folder(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 60) / ("e" * 60) / "milvus.db"
    uri = milvus_lite.acquire(data)
    try:
        path = Path(uri.removeprefix("unix:"))
        assert len(str(path)) <= milvus_lite.SOCKET_PATH_MAX and path.is_socket()
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert MilvusClient(uri=uri).list_collections() == []
    finally:
        milvus_lite.release(data)
    assert stopped(data) and not path.exists()


def test_a_killed_server_is_replaced_by_the_next_acquire(tmp_path: Path) -> None:
    data = tmp_path / "milvus.db"
    milvus_lite.acquire(data)
    try:
        os.kill(milvus_lite.server_pids(data)["lite"], signal.SIGKILL)  # no clean stop: its socket stays
        deadline = time.monotonic() + 30
        while milvus_lite.server_pids(data) and time.monotonic() < deadline:
            time.sleep(0.1)  # the supervisor notices and leaves
        uri = milvus_lite.acquire(data)  # a dead server is replaced
        assert MilvusClient(uri=uri).list_collections() == []
    finally:
        milvus_lite.release(data)
        milvus_lite.release(data)


def test_a_server_that_always_dies_fails_with_the_data_dir_named(tmp_path: Path) -> None:
    data = tmp_path / "not-a-dir.db"
    data.write_text("a file where the data directory should be")
    with pytest.raises(LiteServerError, match=r"not-a-dir\.db: the server exited during start-up"):
        milvus_lite.acquire(data)
