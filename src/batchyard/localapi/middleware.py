"""The server's ASGI middleware besides the key check and the body guard: injected transient
errors, and the record of synchronous calls.

Plain ASGI classes, not Starlette's `@app.middleware("http")`: that one runs the app in a task
group, so an error raised while a route reads its body (a client that hung up, a body over its
cap) reached the route wrapped in an exception group, and the log got a traceback of it.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from batchyard.localapi import shapes
from batchyard.localapi.sync import SYNC_PATHS, SyncCall, SyncEndpoints

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from batchyard.localapi.config import FaultConfig


class TransientFaults:
    """A share (`faults.transient_error_rate`) of `/v1/` calls is answered 429/500/503 before
    any work (429 with `retry-after: 0`)."""

    def __init__(self, app: ASGIApp, faults: FaultConfig) -> None:
        self.app = app
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        f = self.faults
        if scope["type"] == "http" and f.transient_error_rate > 0 and scope["path"].startswith("/v1/"):
            with self._lock:
                hit = self._rng.random() < f.transient_error_rate
                status = self._rng.choice(f.transient_statuses) if hit else 0
            if hit:
                body = json.dumps(shapes.status_error_body(status, "Injected transient error; please retry.")).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if status == 429:
                    headers.append((b"retry-after", b"0"))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class RecordSyncCalls:
    """Records every synchronous call that reached it (`SyncEndpoints.record`), with the status
    it was answered (499 when the client hung up first); the route adds tokens, digest and
    arrival through `request.state.sync_call`."""

    def __init__(self, app: ASGIApp, sync: SyncEndpoints) -> None:
        self.app = app
        self.sync = sync

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in SYNC_PATHS:
            await self.app(scope, receive, send)
            return
        at = time.monotonic()
        seen: dict[str, Any] = {"status": 499}
        scope.setdefault("state", {})["sync_call"] = seen

        def record() -> None:
            if not seen.get("recorded"):
                seen["recorded"] = True
                self.sync.record(SyncCall(at=at, path=scope["path"], status=seen["status"],
                                          tokens=seen.get("tokens", 0), digest=seen.get("digest", ""),
                                          arrival=seen.get("arrival", 0)))

        async def send_seen(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                record()  # before the client can have its answer: a caller reads every call it made
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            record()  # never answered (499)
