"""Fixtures of the local Batch API tests: servers on tmp state dirs, SDK clients, batch helpers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch

from batchyard.localapi.config import FaultConfig, LocalApiConfig
from batchyard.localapi.runner import LocalServer

TERMINAL = ("completed", "failed", "expired", "cancelled")


def emb_line(
    cid: str, inp: Any, model: str = "text-embedding-3-small", **body: Any
) -> dict[str, Any]:
    """An embeddings request line."""
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": model, "input": inp, **body},
    }


def chat_line(
    cid: str,
    text: str,
    schema: dict[str, Any] | None = None,
    model: str = "gpt-4o-mini",
    **body: Any,
) -> dict[str, Any]:
    """A chat completions request line (with a strict json_schema response_format when given)."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "Extract facts."},
            {"role": "user", "content": text},
        ],
        **body,
    }
    if schema is not None:
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "Out", "schema": schema, "strict": True},
        }
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": payload}


def resp_line(
    cid: str, text: str, schema: dict[str, Any] | None = None, model: str = "gpt-4o-mini"
) -> dict[str, Any]:
    """A responses request line (text.format json_schema when given)."""
    payload: dict[str, Any] = {"model": model, "input": [{"role": "user", "content": text}]}
    if schema is not None:
        payload["text"] = {
            "format": {"type": "json_schema", "name": "Out", "schema": schema, "strict": True}
        }
    return {"custom_id": cid, "method": "POST", "url": "/v1/responses", "body": payload}


class Api:
    """An SDK client of one server plus helpers to submit and await batches."""

    emb = staticmethod(emb_line)
    chat = staticmethod(chat_line)
    resp = staticmethod(resp_line)

    def __init__(self, server: LocalServer, max_retries: int = 2) -> None:
        self.server = server
        self.client = openai.OpenAI(
            base_url=server.base_url, api_key="test", max_retries=max_retries
        )

    def upload(self, lines: list[Any], name: str = "input.jsonl") -> str:
        """Upload request lines (dicts are JSON-encoded, strings sent as they are); the file id."""
        text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        return self.client.files.create(file=(name, text.encode()), purpose="batch").id

    def submit(self, lines: list[Any], endpoint: str = "/v1/embeddings", **kwargs: Any) -> Batch:
        """Upload `lines` and create a batch on `endpoint`."""
        file_id = self.upload(lines)
        return self.client.batches.create(
            input_file_id=file_id, endpoint=endpoint, completion_window="24h", **kwargs
        )

    def wait(
        self, batch_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 15.0
    ) -> Batch:
        """Poll until the batch reaches one of `statuses`."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.client.batches.retrieve(batch_id)
            if batch.status in statuses:
                return batch
            if time.monotonic() > deadline:
                raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s")
            time.sleep(0.02)

    def run(self, lines: list[Any], endpoint: str = "/v1/embeddings", **kwargs: Any) -> Batch:
        """Submit and wait for a terminal status."""
        return self.wait(self.submit(lines, endpoint, **kwargs).id)

    def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        """Parsed lines of an output or error file (empty for None)."""
        if file_id is None:
            return []
        text = self.client.files.content(file_id).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def by_id(self, file_id: str | None) -> dict[str, dict[str, Any]]:
        """Lines of a file keyed by custom_id."""
        return {line["custom_id"]: line for line in self.lines(file_id)}


MakeServer = Callable[..., LocalServer]
MakeApi = Callable[..., Api]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Factory: `make_server(state_dir=None, faults={...}, **config)` -> started LocalServer."""
    servers: list[LocalServer] = []

    def _make(
        state_dir: Path | None = None, faults: dict[str, Any] | None = None, **config: Any
    ) -> LocalServer:
        config.setdefault("validating_s", 0.0)
        cfg = LocalApiConfig(faults=FaultConfig(**(faults or {})), **config)
        server = LocalServer(cfg, state_dir or tmp_path / f"state{len(servers)}")
        servers.append(server)
        return server.start()

    yield _make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: MakeServer) -> LocalServer:
    """A default server (hash embeddings, schema chat, no faults)."""
    return make_server()


@pytest.fixture
def api(server: LocalServer) -> Api:
    """Helpers bound to the default server."""
    return Api(server)


@pytest.fixture
def marked_api(make_server: MakeServer) -> Api:
    """Helpers bound to a server that honours `[[fault:<kind>]]` text markers (off by default)."""
    return Api(make_server(faults={"text_markers": True}))


@pytest.fixture
def make_api(make_server: MakeServer) -> MakeApi:
    """Factory: `make_api(faults={...}, **config)` -> Api on a fresh server."""

    def _make(max_retries: int = 2, **kwargs: Any) -> Api:
        return Api(make_server(**kwargs), max_retries=max_retries)

    return _make


@pytest.fixture
def api_for() -> Callable[[LocalServer], Api]:
    """Factory: `api_for(server)` -> Api bound to an already started server."""
    return Api
