"""Errors raised with a secret in play carry no secret: message, repr, traceback, pickle.

Prefect persists task failures by pickling the exception, and every error ends up in a log or
on a terminal, so each of those forms is checked.
"""

from __future__ import annotations

import json
import pickle
import socket
import threading
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batchyard import runner
from batchyard.clients.batch_api import BatchApi
from batchyard.context import RunContext
from batchyard.errors import ApiTerminalError, ApiTransientError, BatchyardError
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer
from batchyard.settings import ProviderSettings
from tests.helpers import seed
from tests.secrets.leaks import Sentinels, log_text, no_leak, no_leak_in_files_logs_or_output


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_error(sent: Sentinels, exc: BaseException) -> None:
    """Every form an error takes on its way to a log, a terminal or Prefect's result store."""
    # the SDK error (its request carries the key) is not chained, not even as a suppressed
    # context: tblib, which Dask loads, pickles `__context__` too
    assert exc.__cause__ is None and exc.__context__ is None, "the SDK error (with its request) is not chained"
    no_leak(sent, "str(error)", str(exc))
    no_leak(sent, "repr(error)", repr(exc))
    no_leak(sent, "traceback", "".join(traceback.format_exception(exc)))
    no_leak(sent, "pickled error", pickle.dumps(exc))
    if isinstance(exc, BatchyardError):
        no_leak(sent, "error attrs", json.dumps(exc.attrs(), default=str))
    for word in ("Authorization", "Bearer", "headers"):
        assert word.lower() not in str(exc).lower()


class Unauthorized(BaseHTTPRequestHandler):
    """Answers every call like OpenAI does for a bad key: 401, key masked to its ends."""

    seen: list[str] = []

    def _answer(self) -> None:
        auth = self.headers.get("Authorization") or ""
        self.seen.append(auth)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = auth.removeprefix("Bearer ")
        masked = key[:3] + "*" * max(0, len(key) - 7) + key[-4:]
        body = json.dumps({"error": {
            "message": f"Incorrect API key provided: {masked}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def unauthorized() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that answers 401; yields its base URL and the Authorization headers seen."""
    seen: list[str] = []
    handler = type("Handler", (Unauthorized,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_refused(settings: Any) -> ApiTerminalError:
    """Run an embeddings job on 20 chunks against a provider that refuses it; the error."""
    ctx = RunContext(settings)
    try:
        targets = seed(ctx, 20)
        with pytest.raises(ApiTerminalError) as ei:
            runner.execute(ctx, EmbeddingsJob(ctx, targets))
    finally:
        ctx.close()
    return ei.value


@pytest.mark.parametrize("retries", [0, 1])
def test_connection_error_on_a_dead_port_carries_no_key(sentinels: Sentinels, retries: int,
                                                        debug_logs: pytest.LogCaptureFixture) -> None:
    api = BatchApi.connect(ProviderSettings(
        api_key=sentinels.api_key, base_url=f"http://127.0.0.1:{dead_port()}/v1",
        max_retries=retries, backoff_base_s=0.01, backoff_max_s=0.01, request_timeout_s=5,
    ))
    try:
        assert api.client.api_key == sentinels.api_key
        with pytest.raises(ApiTransientError) as ei:
            api.upload("s00000.1.jsonl", b'{"custom_id": "x"}\n')
        assert ei.value.status is None and "upload s00000.1.jsonl failed after retries" in str(ei.value)
        check_error(sentinels, ei.value)
        with pytest.raises(ApiTransientError) as ei2:
            api.retrieve("batch_abc")
        check_error(sentinels, ei2.value)
    finally:
        api.close()
    no_leak(sentinels, "log records", log_text(debug_logs))
    if retries:
        assert "retrying upload s00000.1.jsonl" in log_text(debug_logs)


def test_a_401_maps_to_a_terminal_error_without_request_headers(
    sentinels: Sentinels, unauthorized: tuple[str, list[str]], debug_logs: pytest.LogCaptureFixture
) -> None:
    url, seen = unauthorized
    api = BatchApi.connect(ProviderSettings(api_key=sentinels.api_key, base_url=url, max_retries=3))
    try:
        with pytest.raises(ApiTerminalError) as ei:
            api.create_batch("file-1", "/v1/embeddings", {"batchyard_run": "r"}, since=0)
    finally:
        api.close()
    exc = ei.value
    assert seen == [f"Bearer {sentinels.api_key}"], "the key was sent, once: a 401 is not retried"
    assert exc.status == 401 and "Incorrect API key provided" in str(exc)
    check_error(sentinels, exc)
    no_leak(sentinels, "log records", log_text(debug_logs))


def test_a_run_against_a_provider_that_rejects_the_key_stages_no_key(
    settings_factory: Any, sentinels: Sentinels, unauthorized: tuple[str, list[str]], tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    url, seen = unauthorized
    settings = settings_factory(provider={"api_key": sentinels.api_key, "base_url": url},
                                limits={"max_inputs_per_batch": 10, "max_inputs_per_request": 5})
    exc = run_refused(settings)
    assert seen and all(h == f"Bearer {sentinels.api_key}" for h in seen)
    check_error(sentinels, exc)
    staged = [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in staged) and any(p.parent.name == "ledger" for p in staged)
    no_leak_in_files_logs_or_output(sentinels, staged, debug_logs, capfd)


def test_a_run_with_a_key_the_local_server_does_not_accept_leaks_neither_key(
    settings_factory: Any, sentinels: Sentinels, tmp_path: Path, debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The real local server, keyed with `server_key`; the pipeline presents `api_key`."""
    config = LocalApiConfig(api_keys=[SecretStr(sentinels.server_key)])
    with LocalServer(config, tmp_path / "server-state") as server:
        exc = run_refused(settings_factory(provider={"api_key": sentinels.api_key, "base_url": server.base_url}))
        assert server.store is not None and server.store.list_files() == [], "nothing got in"
    assert exc.status == 401 and "Incorrect API key provided" in str(exc)
    check_error(sentinels, exc)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    no_leak_in_files_logs_or_output(sentinels, files, debug_logs, capfd)
