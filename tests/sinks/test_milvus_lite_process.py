"""Milvus Lite in its own process: one child per data directory, shared, stopped by the last
release, and started again on a fresh port when a child dies during start-up."""

from __future__ import annotations

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


def test_a_child_that_dies_during_start_up_is_started_again_on_a_fresh_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = LiteServer.start
    ports: list[int] = []

    def flaky_start(self: LiteServer) -> None:
        ports.append(self.port)
        if len(ports) == 1:
            raise LiteServerError(str(self.data_dir), "the server exited during start-up: epoll_wait error")
        real_start(self)

    monkeypatch.setattr(LiteServer, "start", flaky_start)
    data = tmp_path / "milvus.db"
    uri = milvus_lite.acquire(data)
    try:
        assert len(ports) == 2 and uri.endswith(f":{ports[1]}")
        assert MilvusClient(uri=uri).list_collections() == []
    finally:
        milvus_lite.release(data)


def test_a_child_that_always_dies_fails_with_the_data_dir_named(tmp_path: Path) -> None:
    data = tmp_path / "not-a-dir.db"
    data.write_text("a file where the data directory should be")
    with pytest.raises(LiteServerError, match=r"not-a-dir\.db: the server exited during start-up"):
        milvus_lite.acquire(data)
    assert data.resolve() not in milvus_lite._SERVERS
