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


GROUPED_MODULES = {
    "tests.deploy.test_flow_states", "tests.deploy.test_prefect_server",  # a real Prefect server each
    "tests.e2e.test_report", "tests.faults.test_audit_reconcile",  # a run shared by the module
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup` (pyproject) tests go to the workers one by one, so that no worker
    is left alone with a long file at the end, except what shares something costly to start:
    every test that uses the Milvus server goes to one worker (one server starts, not one per
    worker), and the modules whose module fixture starts servers or a run stay on one worker.

    xdist names a group by a suffix of the test's node id (`...@group`); with pytest 9 its
    assignment no longer reaches the id, so the suffix is set here too."""
    if not config.getvalue("loadgroup"):
        return
    for item in items:
        if "milvus_server" in getattr(item, "fixturenames", ()) or item.get_closest_marker("milvus_server"):
            group = "milvus-server"
        elif getattr(item, "module", None) is not None and item.module.__name__ in GROUPED_MODULES:
            group = item.module.__name__
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
        if hasattr(item, "_id"):  # pytest >= 9: the node id is `_id`, which xdist does not set
            from _pytest.nodes import coerce_node_id

            item._id = coerce_node_id(f"{item.nodeid}@{group}")
