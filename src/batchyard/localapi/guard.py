"""What the local Batch API server does against clients that send too slowly, too much or too often.

Why: 20,000 connections that sent half a request each held a file descriptor forever (uvicorn
times out idle kept-alive connections, but not a request whose headers never finish), the
server ran out of descriptors and stopped answering, and the log grew by a traceback per
connection. A JSON body was taken whole into memory whatever its size. So:

- `guarded_protocol`: uvicorn's h11 protocol with two things uvicorn lacks: a cap on open
  connections, checked when a connection is accepted (uvicorn's `limit_concurrency` answers 503
  only once a request's headers have arrived, so it cannot protect descriptors from clients
  that never finish them; with HTTP/1.1 and no pipelining the cap bounds requests in flight
  too), and a timeout for the request headers, from the connection's start or from the first
  byte after an answer (uvicorn's `timeout_keep_alive` covers the idle time between requests).
  At the cap, the connection that has waited longest for a request's headers is closed to make
  room; only when every connection has a request in progress is a new one refused (503).
- `BodyGuard`, an ASGI middleware in front of every route: a body is capped while it streams
  (a declared Content-Length over the cap is refused before a byte is read), the wait for each
  next piece of a body is bounded, and an answer sent before the body was read to its end
  closes the connection, so a client cannot keep it busy with a body nobody reads.
- `Rejections`: one log line per kind of rejection, the first at once and then a count every
  minute, never a traceback per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from batchyard.localapi import shapes

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from batchyard.localapi.config import LocalApiConfig

log = logging.getLogger("batchyard.localapi.server")

SUMMARY_EVERY_S = 60.0


@dataclass(frozen=True)
class HttpLimits:
    """The limits a server enforces per connection and per request (from `LocalApiConfig`)."""

    max_connections: int
    header_timeout_s: float
    body_idle_timeout_s: float
    max_json_bytes: int
    max_upload_bytes: int


def http_limits(config: LocalApiConfig) -> HttpLimits:
    """The limits a server's config sets."""
    return HttpLimits(max_connections=config.max_connections, header_timeout_s=config.header_timeout_s,
                      body_idle_timeout_s=config.body_idle_timeout_s, max_json_bytes=config.max_json_bytes,
                      max_upload_bytes=config.max_upload_bytes)


class Rejections:
    """Counts rejections by kind; logs the first of each kind at once, then a count per minute.

    Called from the server's event loop only (protocols and middleware run there).
    """

    def __init__(self, every_s: float = SUMMARY_EVERY_S) -> None:
        self.every_s = every_s
        self.total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._summary: asyncio.TimerHandle | None = None

    def note(self, kind: str) -> None:
        """One more rejection of `kind` (a sentence fragment: "connections closed: ...")."""
        self.total[kind] += 1
        if self.total[kind] == 1:
            log.warning("%s (further ones are counted and logged once a minute)", kind)
            return
        self._pending[kind] += 1
        if self._summary is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the loop (a test): log now
                self.flush()
                return
            self._summary = loop.call_later(self.every_s, self.flush)

    def flush(self) -> None:
        """Log the counts since the last line, one line per kind."""
        self._summary = None
        pending, self._pending = self._pending, Counter()
        for kind, n in pending.items():
            log.warning("%s: %d more in the last %.0f s (%d in all)", kind, n, self.every_s, self.total[kind])


# --------------------------------------------------------------------------- connections

_INVALID_HTTP = "Invalid HTTP request received."


class _CountInvalidRequests(logging.Filter):
    """Drops uvicorn's line per malformed request: `guarded_protocol` counts them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _INVALID_HTTP


_FILTER = _CountInvalidRequests()


def guarded_protocol(limits: HttpLimits, rejections: Rejections) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a header timeout (see the module doc)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _FILTER not in uvicorn_log.filters:
        uvicorn_log.addFilter(_FILTER)

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _header_timer: asyncio.TimerHandle | None = None

        _waiting_since = 0.0
        """When this connection began to wait for a request's headers (0: a request is in progress)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections and not self._evict_one():
                self._refused = True
                transport.write(_plain_response(503, "Too many connections; try again later."))
                transport.close()
                rejections.note(f"connections refused: {limits.max_connections} open, each with a request "
                                "in progress (provider.local.max_connections)")
                return
            super().connection_made(transport)
            self._arm()

        def _evict_one(self) -> bool:
            """Close the connection that has waited longest for a request's headers, to make room:
            a flood of half-sent requests then cannot lock out a client that sends whole ones."""
            waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c._waiting_since]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c._waiting_since)
            oldest._disarm()
            oldest.transport.close()
            rejections.note(f"connections closed to make room: {limits.max_connections} open "
                            "(provider.local.max_connections); the one waiting longest for a request went")
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # bytes that came before the close took effect
            if self.conn.their_state is h11.IDLE:
                self._arm()  # a new request is starting: its headers must be complete in time
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def send_400_response(self, msg: str) -> None:
            rejections.note("requests refused: not valid HTTP/1.1 (answered 400)")
            super().send_400_response(msg)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._waiting_since = self.loop.time()  # kept alive, idle: evictable

        def _arm(self) -> None:
            if not self._waiting_since:
                self._waiting_since = self.loop.time()
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            self._waiting_since = 0.0
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:  # nothing answered on it yet: say why
                self.transport.write(_plain_response(408, "Request headers not received in time."))
            self.transport.close()
            rejections.note(f"connections closed: no complete request headers within "
                            f"{limits.header_timeout_s:g} s (provider.local.header_timeout_s)")

    return GuardedH11Protocol


def _plain_response(status: int, text: str) -> bytes:
    body = text.encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


# --------------------------------------------------------------------------- request bodies


class BodyRejected(shapes.ApiError):
    """A request body that is too large or too slow: answered in OpenAI's shape, and the
    connection is closed (the rest of the body is never read)."""


def too_large(limit: int, *, upload: bool) -> BodyRejected:
    """413 for a body over `limit` bytes (an upload's file, or a JSON body)."""
    size = f"{limit / 1024 / 1024:g} MB" if limit >= 1024 * 1024 else f"{limit:,} bytes"
    if upload:
        return BodyRejected(413, f"File is too large: the maximum size is {size}.", param="file",
                            code="file_too_large")
    return BodyRejected(413, f"Request body is too large: the maximum is {size} "
                             "(provider.local.max_json_bytes).", code="request_too_large")


MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart framing and the form fields around the file in an upload's body."""


class BodyGuard:
    """ASGI middleware: caps, idle timeouts and connection close for request bodies."""

    def __init__(self, app: ASGIApp, limits: HttpLimits, rejections: Rejections,
                 is_upload: Callable[[Scope], bool]) -> None:
        self.app = app
        self.limits = limits
        self.rejections = rejections
        self.is_upload = is_upload

    def _cap(self, scope: Scope) -> tuple[int, BodyRejected]:
        if self.is_upload(scope):
            limit = self.limits.max_upload_bytes
            return limit + MULTIPART_OVERHEAD_BYTES, too_large(limit, upload=True)
        limit = self.limits.max_json_bytes
        return limit, too_large(limit, upload=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap, over = self._cap(scope)
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            self.rejections.note(f"requests refused: body over {cap:,} bytes announced (answered 413)")
            await _answer(over, send)
            return
        has_body = bool(declared) or _chunked(scope)
        state = {"seen": 0, "done": not has_body, "started": False}

        async def guarded_receive() -> Message:
            if state["done"]:
                return await receive()  # the body is read: waits for a disconnect, unbounded
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_idle_timeout_s)
            except TimeoutError:
                self.rejections.note(f"requests refused: no body bytes for {self.limits.body_idle_timeout_s:g} s "
                                     "(provider.local.body_idle_timeout_s; answered 408)")
                raise BodyRejected(408, "Request body not received in time.", code="request_timeout") from None
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > cap:
                    self.rejections.note(f"requests refused: body over {cap:,} bytes (answered 413)")
                    raise over
                if not message.get("more_body", False):
                    state["done"] = True
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not state["done"]:
                # answered before the body was read to its end: the rest is never read
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:
            self.rejections.note("requests dropped: the client hung up before sending its whole body")


async def _answer(exc: shapes.ApiError, send: Send) -> None:
    body = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _chunked(scope: Scope) -> bool:
    return b"chunked" in (_header(scope, b"transfer-encoding") or b"").lower()

