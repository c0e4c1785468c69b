"""Fixtures for the sinks: a Milvus Lite client per test (mongomock fixtures: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def milvus(tmp_path: Any) -> Iterator[Any]:
    """A Milvus Lite client on a fresh data directory under tmp_path."""
    from batchyard.clients.milvus import open_vector_store
    from batchyard.settings import MilvusSettings

    client = open_vector_store(MilvusSettings(index_type="FLAT"), default_path=str(tmp_path / "milvus.db"))
    yield client
    client.close()
