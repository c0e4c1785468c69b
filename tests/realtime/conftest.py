"""Fixtures of the real-time lane tests: local servers (sync endpoints) on tmp state dirs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchyard.localapi.config import FaultConfig, LocalApiConfig
from batchyard.localapi.runner import LocalServer

ServerFactory = Callable[..., LocalServer]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Factory: `start_server(faults={...}, **config)` -> a started in-process LocalServer."""
    started: list[LocalServer] = []

    def _start(faults: dict[str, Any] | None = None, **config: Any) -> LocalServer:
        cfg = LocalApiConfig(faults=FaultConfig(**(faults or {})), **config)
        server = LocalServer(cfg, tmp_path / f"server{len(started)}")
        started.append(server)
        return server.start()

    yield _start
    for server in started:
        server.stop()
