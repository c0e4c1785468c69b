"""Fixtures for the sinks: a Milvus client per test, on Milvus Lite and on the session's Milvus
server (mongomock fixtures: tests/conftest.py; the server: tests/milvus_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from batchyard.clients.milvus import open_vector_store
from batchyard.settings import MilvusSettings
from tests.milvus_server import MilvusServerInfo, drop_new_collections
from tests.s3.moto_s3 import S3Endpoint, moto_s3


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def milvus(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """A Milvus client: Milvus Lite on a fresh data directory, or the shared server.

    On the server, every collection the test creates is dropped afterwards.
    """
    if request.param == "lite":
        client = open_vector_store(MilvusSettings(index_type="FLAT"), default_path=str(tmp_path / "milvus.db"))
        yield client
        client.close()
        return
    server: MilvusServerInfo = request.getfixturevalue("milvus_server")
    with server_client(server) as client:
        yield client


@pytest.fixture
def server_milvus(milvus_server: MilvusServerInfo) -> Iterator[Any]:
    """A client on the session's Milvus server; the test's new collections are dropped after."""
    with server_client(milvus_server) as client:
        yield client


@contextmanager
def server_client(server: MilvusServerInfo) -> Iterator[Any]:
    """A client on `server` that drops the collections created while it was open."""
    client = open_vector_store(MilvusSettings(uri=server.uri, index_type="FLAT"), default_path="")
    before = set(client.list_collections())
    try:
        yield client
    finally:
        try:
            drop_new_collections(client, before)
        finally:
            client.close()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    """A real local S3 endpoint (moto's threaded server on loopback)."""
    with moto_s3() as endpoint:
        yield endpoint
