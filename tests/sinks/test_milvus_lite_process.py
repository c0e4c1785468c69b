"""Milvus Lite in its own process: one child per data directory, shared, stopped by the last
release, and started again on a fresh port when a child dies during start-up."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from pymilvus import MilvusClient

from batchyard.clients import milvus_lite
from batchyard.clients.milvus_lite import LiteServer, LiteServerError


def test_one_child_per_data_dir_shared_and_stopped_by_the_last_release(tmp_path: Path) -> None:
    data = tmp_path / "milvus.db"
    uri = milvus_lite.acquire(data)
    try:
        assert milvus_lite.acquire(data) == uri, "a second client shares the child"
        server = milvus_lite._SERVERS[data.resolve()]
        assert server.refs == 2 and server.proc is not None
        client = MilvusClient(uri=uri)
        client.create_collection("c", dimension=4)
        assert client.list_collections() == ["c"]
        client.close()
        milvus_lite.release(data)
        assert server.proc is not None and server.proc.poll() is None, "one reference left: still serving"
    finally:
        milvus_lite.release(data)
    assert server.proc is None and data.resolve() not in milvus_lite._SERVERS


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
    data = tmp_path / "milvus.db"
    uri = milvus_lite.acquire(data)
    try:
        assert len(starts) == 2 and uri == starts[1].uri
        assert MilvusClient(uri=uri).list_collections() == []
    finally:
        milvus_lite.release(data)


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
def test_the_child_listens_on_an_owner_only_unix_socket_not_on_tcp(tmp_path: Path) -> None:
    """Lite has no authentication: on a loopback port any local user could read the vectors."""
    data = tmp_path / "staging" / "milvus.db"
    uri = milvus_lite.acquire(data)
    try:
        server = milvus_lite._SERVERS[data.resolve()]
        assert server.proc is not None
        assert uri.startswith("unix:") and Path(uri.removeprefix("unix:")).is_socket()
        folder = Path(uri.removeprefix("unix:")).parent
        assert folder.parent == data.parent and stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert _listening_inet_sockets(server.proc.pid) == []
        client = MilvusClient(uri=uri)
        client.create_collection("c", dimension=4)
        client.insert("c", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        assert client.query("c", filter="id >= 0", output_fields=["id"]) == [{"id": 1}]
        client.close()
    finally:
        milvus_lite.release(data)
    assert not Path(uri.removeprefix("unix:")).exists(), "the socket goes with the child"


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
    assert not path.parent.exists()


def test_a_socket_left_by_a_killed_child_does_not_stop_the_next(tmp_path: Path) -> None:
    data = tmp_path / "milvus.db"
    milvus_lite.acquire(data)
    server = milvus_lite._SERVERS[data.resolve()]
    assert server.proc is not None
    server.proc.kill()  # no clean stop: its socket file stays
    server.proc.wait()
    assert server.socket_path.exists()
    try:
        uri = milvus_lite.acquire(data)  # a dead child is replaced
        assert MilvusClient(uri=uri).list_collections() == []
    finally:
        milvus_lite.release(data)
        milvus_lite.release(data)


def test_a_child_that_always_dies_fails_with_the_data_dir_named(tmp_path: Path) -> None:
    data = tmp_path / "not-a-dir.db"
    data.write_text("a file where the data directory should be")
    with pytest.raises(LiteServerError, match=r"not-a-dir\.db: the server exited during start-up"):
        milvus_lite.acquire(data)
    assert data.resolve() not in milvus_lite._SERVERS
