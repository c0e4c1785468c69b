"""Shared fixtures: isolated environment, per-test settings, one Prefect harness per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest

from batchyard.clients.mongo import patch_mongomock
from batchyard.settings import MongoFields

# the session's embedded Milvus server (fixture `milvus_server`)
pytest_plugins = ["tests.milvus_server"]

# quiet, offline Prefect (ENVIRONMENT.md); set before anything imports prefect
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No BATCHYARD_* variable or .env from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("BATCHYARD_") and key != "BATCHYARD_TEST_MONGO_URI":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Any:
    """Build Settings for a test: staging under tmp_path, FLAT index, fast polling."""
    from batchyard.settings import Settings

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "staging": {"root": str(tmp_path / "staging")},
            "milvus": {"index_type": "FLAT"},
            "provider": {"poll_interval_s": 0.05, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                         "requeue_backoff_s": 0.05},
            "embedding": {"dimensions": 16},
        }
        for key, val in overrides.items():
            if isinstance(val, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **val}
            else:
                base[key] = val
        return Settings(_env_file=None, **base)  # type: ignore[call-arg]

    return make


# mongomock collections through the pymongo API (tests/source, tests/sinks)
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


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
