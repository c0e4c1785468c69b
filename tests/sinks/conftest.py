"""Fixtures for the sinks: mongomock collections and a Milvus Lite client per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mongomock
import pytest

from batchyard.clients.mongo import patch_mongomock
from batchyard.settings import MongoFields


@pytest.fixture
def fields() -> MongoFields:
    return MongoFields()


@pytest.fixture
def mongo_db() -> Iterator[Any]:
    """A fresh mongomock database (pymongo API), with the pymongo 4.20 bulk shim applied."""
    patch_mongomock()
    client = mongomock.MongoClient()
    yield client["batchyard_test"]
    client.close()


@pytest.fixture
def chunks(mongo_db: Any) -> Any:
    return mongo_db["chunks"]


@pytest.fixture
def results(mongo_db: Any) -> Any:
    return mongo_db["inference_results"]


@pytest.fixture
def milvus(tmp_path: Any) -> Iterator[Any]:
    """A Milvus Lite client on a fresh data directory under tmp_path."""
    from batchyard.clients.milvus import open_vector_store
    from batchyard.settings import MilvusSettings

    client = open_vector_store(MilvusSettings(index_type="FLAT"), default_path=str(tmp_path / "milvus.db"))
    yield client
    client.close()
