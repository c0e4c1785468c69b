"""Limits of the local server: upload size (413, streamed), requests per batch, file permissions."""

from __future__ import annotations

import json
import os
import socket
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from batchyard.localapi.validation import MAX_REQUESTS, validate_input

if TYPE_CHECKING:
    from conftest import Api, MakeApi, MakeServer

BOUNDARY = "by-test-boundary"


def multipart_body(size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A multipart upload of a `size`-byte file as a generator: httpx sends it chunked, with no
    Content-Length, and nothing holds the whole body."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    block = b"x" * chunk
    sent = 0
    while sent < size:
        part = block[: min(chunk, size - sent)]
        sent += len(part)
        yield part
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def post_streamed(api: Api, size: int) -> httpx.Response:
    return httpx.post(
        f"{api.server.base_url}/files",
        content=multipart_body(size),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=60,
    )


def test_uploads_over_the_limit_get_413(make_api: MakeApi) -> None:
    api = make_api(max_upload_bytes=4096)
    # with Content-Length (the SDK): 413 over the limit, the limit itself is fine
    with pytest.raises(openai.APIStatusError) as ei:
        api.client.files.create(file=("a.jsonl", b"y" * 4097), purpose="batch")
    assert ei.value.status_code == 413
    err = ei.value.body
    assert isinstance(err, dict) and err["code"] == "file_too_large"
    assert err["message"] == "File is too large: the maximum size is 4,096 bytes."
    ok = api.client.files.create(file=("a.jsonl", b"y" * 4096), purpose="batch")
    assert ok.bytes == 4096
    # chunked (no Content-Length): counted while spooling; just over, far over, and just under
    for size in (4097, 200_000, 8_000_000):
        r = post_streamed(api, size)
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large", (size, r.text)
    r = post_streamed(api, 4000)
    assert r.status_code == 200 and r.json()["bytes"] == 4000
    assert sorted(f.bytes for f in api.client.files.list()) == [4000, 4096]
    assert len(list((api.server.state_dir / "blobs").iterdir())) == 2, "no blob of a refused upload"


def test_the_default_limit_is_the_batch_api_file_limit(api: Api) -> None:
    assert api.server.config.max_upload_bytes == 200 * 1024 * 1024
    # a raw request that declares 201 MB and sends none of it: refused on the header alone
    url = httpx.URL(api.server.base_url)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: {url.host}\r\nContent-Length: {201 * 1024 * 1024}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(head.encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), reply
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["message"] == "File is too large: the maximum size is 200 MB."


def test_an_upload_is_never_held_in_memory_whole(make_api: MakeApi) -> None:
    size = 24 * 1024 * 1024
    api = make_api(max_upload_bytes=size)
    post_streamed(api, 1000)  # warm up the app's code paths before measuring
    tracemalloc.start()
    try:
        accepted = post_streamed(api, size)
        _, peak_accepted = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        refused = post_streamed(api, size + 4 * 1024 * 1024)
        _, peak_refused = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert accepted.status_code == 200 and accepted.json()["bytes"] == size
    assert refused.status_code == 413
    # client and server together (one process) stay far below the file's size
    assert peak_accepted < size / 4, peak_accepted
    assert peak_refused < size / 4, peak_refused


def test_more_than_50000_requests_fail_validation(api: Api) -> None:
    assert MAX_REQUESTS == 50_000
    lines = [json.dumps(api.emb(f"r{i}", "hi")) for i in range(MAX_REQUESTS + 1)]
    batch = api.run(lines, timeout=60)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.code, e.message) for e in batch.errors.data] == [
        ("too_many_tasks", "The batch input file has 50,001 requests; the maximum is 50,000.")
    ]
    # the limit itself passes validation
    at_limit = ("\n".join(lines[:MAX_REQUESTS]) + "\n").encode()
    result = validate_input(at_limit, "/v1/embeddings")
    assert result.ok and len(result.requests) == MAX_REQUESTS


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every path under root (root included), by relative path."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: anything not created owner-only explicitly would be world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_state_files_are_owner_only(make_server: MakeServer, api_for: type[Api], tmp_path: Path,
                                    open_umask: None) -> None:
    state = tmp_path / "state"
    server = make_server(state_dir=state, seconds_per_request=0.01, faults={"text_markers": True})
    api = api_for(server)
    lines = [api.emb(f"r{i}", f"text {i}") for i in range(20)] + [api.emb("bad", "x", model="other")]
    failed = api.run(lines)  # validation fails (two models): its input stays
    done = api.run([api.emb(f"r{i}", f"text {i}") for i in range(20)] + [api.emb("e", "[[fault:error400]]")])
    assert failed.status == "failed" and done.status == "completed"
    assert done.output_file_id and done.error_file_id
    running = api.submit([api.emb(f"s{i}", f"slow {i}") for i in range(200)])
    api.wait(running.id, ("in_progress",))
    assert any((state / "progress").iterdir()), "a progress file exists while the batch runs"
    found = modes(state)
    for name in ("files", "blobs", "batches", "progress", "lock", "counters.json",
                 f"blobs/{done.output_file_id}", f"blobs/{done.error_file_id}", f"progress/{running.id}.jsonl"):
        assert name in found, name
    for name, mode in found.items():
        expected = 0o700 if (state / name).is_dir() else 0o600
        assert mode == expected, f"{name}: {oct(mode)}"
    api.client.batches.cancel(running.id)
