"""The server under hostile clients (issue 18): half-sent requests, floods of connections, huge
chunked bodies, huge echoed values, deep JSON, clients that hang up, and TCP_NODELAY.

Raw sockets stand in for the hostile clients (no HTTP library sends half a request); the openai
SDK checks that well-behaved clients are still answered.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from batchyard.localapi.runner import LocalServer
    from conftest import Api, MakeApi

N = 200


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of batchyard's and uvicorn's loggers (uvicorn's do not reach the root)."""
    caplog.set_level(logging.INFO)
    uv = logging.getLogger("uvicorn")
    uv.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        uv.removeHandler(caplog.handler)


def address(server: LocalServer) -> tuple[str, int]:
    assert server.port is not None
    return "127.0.0.1", server.port


def connect(server: LocalServer, data: bytes) -> socket.socket:
    sock = socket.create_connection(address(server), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def closed_by_server(socks: list[socket.socket], within_s: float) -> tuple[list[bytes], float]:
    """Wait until the server has closed every socket (EOF or reset); what each one received, and
    how long the last one took. Fails after `within_s`."""
    start = time.monotonic()
    got = {s: b"" for s in socks}
    open_ = set(socks)
    while open_:
        left = within_s - (time.monotonic() - start)
        assert left > 0, f"{len(open_)} of {len(socks)} connections still open after {within_s} s"
        readable, _, _ = select.select(list(open_), [], [], min(left, 1.0))
        for s in readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                got[s] += data
            else:
                open_.discard(s)
                s.close()
    return [got[s] for s in socks], time.monotonic() - start


def one_line_per_kind(log: pytest.LogCaptureFixture) -> list[str]:
    """The server's warnings; no record carries a traceback."""
    assert not [r for r in log.records if r.exc_info or "Traceback" in r.getMessage()], "a traceback was logged"
    return [r.getMessage() for r in log.records if r.levelno >= logging.WARNING]


def test_connections_that_send_half_their_headers_are_closed(make_api: MakeApi, server_log: pytest.LogCaptureFixture) -> None:
    api = make_api(header_timeout_s=2.0)
    socks = [connect(api.server, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Ty") for _ in range(N)]
    socks += [connect(api.server, b"") for _ in range(10)]  # and some that send nothing at all
    assert api.client.files.list().data == [], "a good client is answered meanwhile"
    answers, _took = closed_by_server(socks, within_s=60)
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    warnings = one_line_per_kind(server_log)
    assert len([w for w in warnings if "no complete request headers within 2 s" in w]) == 1, warnings
    assert api.client.files.list().data == []


def test_a_slow_second_request_on_a_kept_alive_connection_is_closed(make_api: MakeApi) -> None:
    api = make_api(header_timeout_s=1.0, keep_alive_s=30)
    sock = connect(api.server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while b'"ok"' not in first:
        first += sock.recv(4096)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and never the rest
    _, took = closed_by_server([sock], within_s=30)
    assert took < 25, "closed by the header timeout, not the 30 s keep-alive"


def test_connections_that_send_half_their_body_get_408(make_api: MakeApi, server_log: pytest.LogCaptureFixture) -> None:
    api = make_api(body_idle_timeout_s=2.0)
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    socks = [connect(api.server, head + b'{"model": "text-embedding-3-small", "input": "') for _ in range(N)]
    answers, _ = closed_by_server(socks, within_s=60)
    for a in answers:
        status, _, rest = a.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in rest.lower(), a[:200]
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    warnings = one_line_per_kind(server_log)
    assert len([w for w in warnings if "no body bytes for 2 s" in w]) == 1, warnings
    assert api.client.files.list().data == []


def test_at_the_cap_half_sent_connections_make_room_for_whole_requests(
        make_api: MakeApi, server_log: pytest.LogCaptureFixture) -> None:
    api = make_api(max_connections=20, header_timeout_s=60)
    held = [connect(api.server, b"GET /v1/files HTTP/1.1\r\n") for _ in range(20)]
    time.sleep(0.5)  # let the server accept them all
    for _ in range(5):  # a good client gets through, each time on a new connection
        r = httpx.get(f"{api.server.base_url}/files", headers={"connection": "close"}, timeout=10)
        assert r.status_code == 200 and r.json()["data"] == []
    time.sleep(0.5)
    readable, _, _ = select.select(held, [], [], 5)
    # one slot was made, the oldest waiting connection's; each client's close freed it again
    assert readable == held[:1] and held[0].recv(100) == b"", readable
    warnings = one_line_per_kind(server_log)
    assert len([w for w in warnings if "closed to make room: 20 open" in w]) == 1, warnings
    for s in held:
        s.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
        make_api: MakeApi, server_log: pytest.LogCaptureFixture) -> None:
    api = make_api(max_connections=4, faults={"sync_slow_rate": 1.0, "sync_slow_s": 4.0})
    body = json.dumps({"model": "text-embedding-3-small", "input": "slow"}).encode()
    request = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    busy = [connect(api.server, request) for _ in range(4)]
    time.sleep(1.0)  # all four are being answered (slowly)
    refused = [connect(api.server, b"") for _ in range(10)]
    answers, took = closed_by_server(refused, within_s=20)
    assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers) and took < 3.5, (took, {a[:30] for a in answers})
    warnings = one_line_per_kind(server_log)
    assert len([w for w in warnings if "connections refused: 4 open, each with a request in progress" in w]) == 1
    for s in busy:
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 "), got[:60]
        s.close()


def send_chunked(server: LocalServer, path: str, total: int, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """POST `total` bytes chunked (a JSON array that never ends) until the server answers; the
    answer and how many body bytes were sent by then."""
    sock = connect(server, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n".encode())
    block = b"[" + b"1," * (chunk // 2 - 1) + b"1"
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    sent, answer = 0, b""
    sock.setblocking(False)
    while sent < total and not answer:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            answer = sock.recv(65536)
            break
        if writable:
            try:
                sock.sendall(frame)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                continue
            sent += len(block)
    sock.setblocking(True)
    sock.settimeout(10)
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        more = sock.recv(65536)
        if not more:
            break
        answer += more
    sock.close()
    return answer, sent


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/batches", "/v1/chat/completions"])
def test_a_huge_chunked_json_body_gets_413_while_it_streams(make_api: MakeApi, path: str) -> None:
    cap = 2 * 1024 * 1024
    api = make_api(max_json_bytes=cap)
    answer, sent = send_chunked(api.server, path, total=300 * 1024 * 1024)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large" and "2 MB" in err["message"], err
    assert sent < cap + 32 * 1024 * 1024, f"the server read on to {sent:,} bytes"
    # a declared Content-Length over the cap: refused before a byte of the body is read
    sock = connect(api.server, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {cap + 1}\r\n\r\n".encode())
    answers, _ = closed_by_server([sock], within_s=20)
    assert answers[0].startswith(b"HTTP/1.1 413 "), answers


def test_errors_echo_at_most_a_bounded_part_of_what_they_were_sent(api: Api) -> None:
    base = api.server.base_url
    huge = "f" * 1_000_000
    r = httpx.post(f"{base}/batches", json={"input_file_id": huge, "endpoint": "/v1/embeddings",
                                            "completion_window": "24h", "metadata": {"k": "v"}}, timeout=30)
    assert r.status_code == 400 and len(r.content) < 1_000, len(r.content)
    assert "(1,000,000 characters)" in r.json()["error"]["message"]
    for bad in ({"endpoint": "/v1/" + huge}, {"completion_window": huge}, {"metadata": {"k" * 100_000: "v"}},
                {"metadata": {"k": "v" * 100_000}}):
        params = {"input_file_id": "file-x", "endpoint": "/v1/embeddings", "completion_window": "24h", **bad}
        r = httpx.post(f"{base}/batches", json=params, timeout=30)
        assert r.status_code == 400 and len(r.content) < 1_000, (list(bad), len(r.content))
    r = httpx.get(f"{base}/files/{'x' * 12_000}", timeout=30)
    assert r.status_code == 404 and len(r.content) < 1_000
    r = httpx.get(f"{base}/nothing/{'y' * 12_000}", timeout=30)
    assert r.status_code == 404 and len(r.content) < 1_000
    r = httpx.get(f"{base}/files", params={"order": huge[:12_000]}, timeout=30)
    assert r.status_code == 400 and len(r.content) < 1_000
    # and in a batch's validation errors
    lines = [api.emb("a" * 100_000, "x"), api.emb("a" * 100_000, "y"), api.emb("b", "z", model="m" * 100_000)]
    batch = api.run(lines)
    assert batch.status == "failed" and batch.errors is not None
    assert all(len(e.message or "") < 500 for e in batch.errors.data or []), batch.errors


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deep_json_is_a_validation_error_naming_the_line(api: Api) -> None:
    from batchyard.localapi.validation import MAX_JSON_DEPTH

    ok = json.dumps(api.emb("ok", "fine"))
    too_deep = json.dumps(api.emb("deep", "x")).replace('"x"', deep(100_000))
    just_too_deep = json.dumps(api.emb("deep2", "x")).replace('"x"', deep(MAX_JSON_DEPTH))
    batch = api.run([ok, too_deep, just_too_deep])
    assert batch.status == "failed" and batch.errors is not None, batch
    errors = batch.errors.data or []
    assert [(e.code, e.line) for e in errors] == [("invalid_json_line", 2), ("invalid_json_line", 3)], errors
    assert all(f"nested deeper than {MAX_JSON_DEPTH} levels" in (e.message or "") for e in errors)
    # the synchronous endpoints and a batch create say the same, with 400
    for path, body in (("/embeddings", f'{{"model": "m", "input": {deep(100_000)}}}'),
                       ("/batches", f'{{"metadata": {deep(5_000)}}}')):
        r = httpx.post(api.server.base_url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested deeper than" in r.json()["error"]["message"], r.text


def test_a_client_that_hangs_up_mid_body_is_one_line(make_api: MakeApi, server_log: pytest.LogCaptureFixture) -> None:
    api = make_api()
    head = b"Host: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    for path in (b"/v1/embeddings", b"/v1/batches", b"/v1/files"):
        for _ in range(5):
            sock = connect(api.server, b"POST " + path + b" HTTP/1.1\r\n" + head + b'{"model": "m", "inp')
            time.sleep(0.05)
            sock.close()
    deadline = time.monotonic() + 20
    while not any("hung up" in r.getMessage() for r in server_log.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in server_log.records]
        time.sleep(0.1)
    time.sleep(0.5)
    warnings = one_line_per_kind(server_log)
    assert len([w for w in warnings if "hung up" in w]) == 1, warnings
    assert not [w for w in warnings if "Exception in ASGI application" in w], warnings
    assert api.client.files.list().data == []


def test_accepted_connections_have_tcp_nodelay(api: Api) -> None:
    """Without it, every answer on a kept-alive connection waited ~44 ms for a delayed ACK
    (requests/s before and after: benchmarks/bench_serve.py)."""
    server = api.server
    with httpx.Client(base_url=server.base_url) as client:
        client.get("/files").raise_for_status()
        assert server._server is not None
        conns = list(server._server.server_state.connections)
        assert conns
        for proto in conns:
            sock = proto.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
