"""The synchronous endpoints: `POST /v1/embeddings`, `/v1/chat/completions`, `/v1/responses`.

Why they exist: batchyard's real-time lane sends the very request bodies of a shard to these
endpoints, and it must be tested offline against the real `openai` SDK. So a synchronous call
answers exactly what a batch line with the same body gets in its `response.body`: the body is
checked by the same rules (`validation.validate_body`), run by the worker's own executors, and
the same `[[fault:<kind>]]` text markers apply (error400 and error500 answer that status;
refusal, invalid_json, truncated and schema_violation shape the output).

Faults of their own (`FaultConfig.sync_*`) emulate what a real-time API does under load: 429
with `retry-after` (and `retry-after-ms`), 5xx, and slow answers that make a client time out.
Each is drawn from the seed, the sha256 of the request body and how many times that body has
arrived, so a retry draws afresh and a run is reproducible whatever the order in which
concurrent calls arrive. `sync_429_every` is the deterministic one: every Nth call the server
receives is answered 429, whatever its body.

Every call that passed the key check is recorded as a `SyncCall` (arrival time, status, prompt
tokens) once it was answered (a slow call only after its delay): tests read
`LocalServer.sync_calls()` to check, from the server's side, that a client kept to the rates it
was configured with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchyard.localapi import shapes
from batchyard.localapi.executors import error_result, marker_error
from batchyard.localapi.faults import unit_draw
from batchyard.localapi.validation import JsonTooDeep, RequestLine, load_json, validate_body

if TYPE_CHECKING:
    from batchyard.localapi.config import FaultConfig
    from batchyard.localapi.executors import Executor

log = logging.getLogger(__name__)

SYNC_PATHS = shapes.SUPPORTED_ENDPOINTS
"""The synchronous endpoints: the same three the Batch API accepts as batch endpoints."""


@dataclass(frozen=True)
class SyncCall:
    """One synchronous call as the server saw it."""

    at: float
    """`time.monotonic()` when the call reached the app (after the key check)."""
    path: str
    status: int
    tokens: int
    """Prompt tokens of a valid body (0 when the body was refused or never read)."""
    digest: str
    """sha256 of the body, shortened ("" when the body was never read)."""
    arrival: int
    """1 the first time this body arrived, 2 the second, ... (0 when never read)."""


@dataclass
class SyncAnswer:
    """What the server answers one synchronous call, and after how long."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    tokens: int = 0
    digest: str = ""
    arrival: int = 0


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`retry-after` in whole seconds (rounded up), plus `retry-after-ms` when not whole."""
    headers = {"retry-after": str(math.ceil(seconds))}
    if seconds != math.ceil(seconds):
        headers["retry-after-ms"] = str(round(seconds * 1000))
    return headers


class SyncEndpoints:
    """Answers synchronous calls with the worker's executors, injects faults, records calls."""

    def __init__(self, faults: FaultConfig, executor_for: Callable[[str], Executor]) -> None:
        self.faults = faults
        self.executor_for = executor_for
        self._lock = threading.Lock()
        self._arrivals: Counter[str] = Counter()
        self._received = 0  # synchronous calls answered so far (for `sync_429_every`)
        self._calls: list[SyncCall] = []

    # ------------------------------------------------------------------ the record
    def record(self, call: SyncCall) -> None:
        """Keep one call in the record."""
        with self._lock:
            self._calls.append(call)

    def calls(self) -> list[SyncCall]:
        """Every recorded call, in arrival order."""
        with self._lock:
            return sorted(self._calls, key=lambda c: c.at)

    # ------------------------------------------------------------------ answering
    def answer(self, path: str, raw: bytes) -> SyncAnswer:
        """The answer to one call (runs in a worker thread: validation and executors block)."""
        digest = hashlib.sha256(raw).hexdigest()[:24]
        with self._lock:
            self._arrivals[digest] += 1
            arrival = self._arrivals[digest]
            self._received += 1
            nth = self._received
        every = self.faults.sync_429_every
        if every is not None and nth % every == 0:
            return self._rate_limited(digest, arrival)
        try:
            item = validate_body(path, json_body(raw))
        except shapes.ApiError as exc:
            return SyncAnswer(exc.status, _encode(exc.body()), digest=digest, arrival=arrival)
        key = f"{digest}:{arrival}"
        answer = self._fault(key) or self._execute(path, item)
        f = self.faults
        if f.sync_slow_rate > 0 and unit_draw(f.seed, key, "sync_slow") < f.sync_slow_rate:
            answer.delay_s = f.sync_slow_s
        answer.headers["x-request-id"] = shapes.new_id("req_", 16)
        answer.tokens, answer.digest, answer.arrival = item.prompt_tokens, digest, arrival
        return answer

    def _fault(self, key: str) -> SyncAnswer | None:
        """An injected 429 or 5xx for the call with this key, else None."""
        f = self.faults
        if f.sync_429_rate > 0 and unit_draw(f.seed, key, "sync_429") < f.sync_429_rate:
            return self._rate_limited()
        if f.sync_5xx_rate > 0 and unit_draw(f.seed, key, "sync_5xx") < f.sync_5xx_rate:
            statuses = f.sync_5xx_statuses
            status = statuses[int(unit_draw(f.seed, key, "sync_5xx_status") * len(statuses))]
            return SyncAnswer(status, _encode(shapes.status_error_body(status)))
        return None

    def _rate_limited(self, digest: str = "", arrival: int = 0) -> SyncAnswer:
        """An injected 429 with the configured Retry-After."""
        wait = self.faults.sync_retry_after_s
        body = shapes.status_error_body(429, f"Rate limit reached (injected). Please try again in {wait:g}s.")
        headers = {**retry_after_headers(wait), "x-request-id": shapes.new_id("req_", 16)}
        return SyncAnswer(429, _encode(body), headers, digest=digest, arrival=arrival)

    def _execute(self, path: str, item: RequestLine) -> SyncAnswer:
        """The executor's answer, or the error a text marker asks for."""
        result = marker_error(path, item.body, text_markers=self.faults.text_markers)
        if result is None:
            try:
                result = self.executor_for(path).run([item])[0]
            except Exception as exc:  # a broken executor answers 500, like in a batch
                log.exception("executor for %s failed on a synchronous call", path)
                result = error_result(500, f"The local executor failed: {exc}")
        return SyncAnswer(result.status_code, result.body_json.encode("utf-8"))


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_body(raw: bytes) -> object:
    """A request's JSON body, or a 400 in OpenAI's shape (not JSON, or nested too deep)."""
    try:
        return load_json(raw)
    except JsonTooDeep as exc:
        raise shapes.ApiError(400, f"We could not parse the JSON body of your request: {exc}.") from None
    except ValueError:
        raise shapes.ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from None
