"""The real-time lane: a shard's request lines sent to the synchronous endpoints, answered as
batch output and error lines.

Why: a small run, or the tail of a backfill, should not wait up to 24 h for a batch. This lane
takes the exact lines batchyard uploads for the Batch API (`{"custom_id", "method", "url",
"body"}`), sends each body to its synchronous endpoint (`/v1/embeddings`,
`/v1/chat/completions`, `/v1/responses`) and returns `(output, errors)` bytes in the Batch API's
output/error file format, so join, load, audit and rerun cannot tell which lane produced them:

- a success is `{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"},
  "error": null}` with the JSON body exactly as the server sent it (only whitespace outside
  strings is removed, so a pretty-printed body still fits on one line);
- an HTTP error that retrying did not fix is the same line with its status and error body;
- a request that could not be answered at all is `{"response": null, "error": {"code",
  "message"}}`: `timeout`, `connection_error`, `invalid_response` or `lane_error` (the join
  classifies these as `retry`), `batch_cancelled` when `cancel` was set before it was sent
  (`requeue`), `request_too_large` when it can never fit the lane's window (`fail`: its message
  names the setting to raise).

Requests are fitted to the lane's own limits, not only to the plan's. An embeddings request
(the plan packs up to 300k tokens into one) whose planned tokens exceed `split_tokens` (default:
a quarter of what one window admits, so that several calls share a window and it fills evenly)
is sent as several calls over consecutive slices of its `input`: the inputs of an embeddings
request are independent. Each call is limited, retried and counted on its own; their answers are
merged back into the request's one line, so the join, the audit and a rerun from staging map
every input back by custom_id and `data[i].index` as for a batch line: `data` holds every
call's entries with `index` shifted by the position of the call's first input, `usage` is the
sum of the calls' usage, every other field is the first call's, and the line lists the calls in
`parts` (`request_id`, `first` input, `inputs`, `status_code`). If any call fails, the request
gets one error line (the worst failure: a final 4xx before a retryable error before a cancel),
with `parts` too. A chat or responses request cannot be split: one that exceeds a window, or an
embeddings input that does, is never sent and gets `request_too_large`.

Every custom_id ends in exactly one line, whatever happens. A 401 or 403 is not a per-request
outcome but a wrong key or account: nothing more is sent and `ApiTerminalError` is raised, as
the batch path does, so a bad key never fails units.

Bodies are posted with the SDK's documented way to make a raw request, `client.post(path,
cast_to=httpx2.Response, body=body)` (httpx2 is the SDK's own HTTP client), not
`client.embeddings.create(**body)`: the typed method adds `encoding_format: "base64"` to an
embeddings body that has none and decodes the answer, so the server would not see the body the
batch lane sends, and we would not get the body's bytes as the server sent them. The SDK's own
retries are off (`max_retries=0`); this module retries with tenacity: on 429 it waits what
`retry-after-ms` or `retry-after` says (and gives up at once when that exceeds
`max_retry_after_s`, rather than retry early), otherwise (408/409/425/5xx, timeouts, connection
errors, a 2xx whose body is not JSON) exponential backoff with full jitter.

Client-side limits (`RateLimits`) use pyrate-limiter's sliding-window log buckets. We picked it
over aiolimiter (a leaky bucket: after an idle spell it lets up to twice the rate through within
one window, and it is asyncio only) and limits (its in-memory moving window inserts each hit at
the front of a list and expires keys from a timer thread, in whole seconds): pyrate-limiter's
`InMemoryBucket` is an exact sliding window in milliseconds, thread-safe, with weighted items
and a computed wait. A request needs a request slot and its tokens at the same instant, which
no library offers across two limits, so `RateLimits.acquire` holds one gate lock and puts the
request into the request bucket, then its tokens into the token bucket; a bucket that refuses
consumes nothing and says how long to wait. When the tokens are refused after the request slot
was granted, that slot is spent unused (as a server counts a rejected call; at most one per
request that had to wait for its tokens), which can only make the lane slower, never faster
than configured. So in any window of `rate_window_s`, the
requests started (retries included) and their tokens stay within the configured rates. Each
window is counted `arrival_margin_s` longer than that: a burst of calls granted together reaches
the server spread over tens of ms, and without the margin the server, counting by arrival, could
see the next window's first calls and this window's last ones inside one window.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx2
import msgspec
import openai
from pydantic import BaseModel, Field
from pyrate_limiter import InMemoryBucket, Rate, RateItem
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from batchyard.clients.batch_api import is_transient
from batchyard.errors import ApiTerminalError
from batchyard.tokens import count_tokens, encoding_for_model

log = logging.getLogger(__name__)

SYNC_ENDPOINTS = ("/v1/embeddings", "/v1/chat/completions", "/v1/responses")
MAX_LOG_UNITS = 100_000
"""Most entries the token bucket's log holds: tokens are counted in units of
`ceil(window tokens / MAX_LOG_UNITS)`, each request's rounded up, so memory stays bounded and
the sum of real tokens never exceeds the budget."""
CANCELLED_MESSAGE = "This request was not sent: the real-time lane was cancelled."


class RealtimeSettings(BaseModel):
    """The real-time lane: client-side rates, concurrency and retries."""

    requests_per_minute: int = Field(
        default=500, gt=0, description="Requests started per minute (retries included)."
    )
    tokens_per_minute: int = Field(
        default=200_000,
        gt=0,
        description="Planned tokens of the requests started per minute (retries included).",
    )
    rate_window_s: float = Field(
        default=60.0,
        gt=0,
        le=60,
        description="The rates are enforced over every sliding window of this many seconds, pro "
        "rata (rounded down): 60 is per minute; 1 spreads them evenly, as a provider that "
        "enforces per-minute limits per second would want.",
    )
    arrival_margin_s: float = Field(
        default=0.2,
        ge=0,
        le=10,
        description="Each window is counted this much longer, so that calls the network and the "
        "threads delay unevenly (by up to this much) still reach the server within the rates "
        "counted over exactly rate_window_s (costs margin/window of the throughput).",
    )
    concurrency: int = Field(default=8, gt=0, le=256, description="Requests in flight at most.")
    max_retries: int = Field(
        default=6, ge=0, le=50, description="Retries of one request (429, 408/409/5xx, timeouts)."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one HTTP call.")
    backoff_base_s: float = Field(
        default=0.5, gt=0, description="First retry waits up to this (no Retry-After given)."
    )
    backoff_max_s: float = Field(default=30.0, gt=0, description="Longest backoff between retries.")
    max_retry_after_s: float = Field(
        default=120.0,
        ge=0,
        description="A 429 asking to wait longer than this is not retried here; its error line "
        "goes to the join, which retries it in a follow-up attempt.",
    )
    split_tokens: int | None = Field(
        default=None,
        gt=0,
        description="An embeddings request over this many tokens is sent as several calls of at "
        "most this many (its inputs are independent; the answers are merged into the request's "
        "one output line). Default: a quarter of the tokens one window admits; never more than "
        "a window.",
    )


class Cancelled(Exception):
    """The lane was cancelled before this request was sent."""


class RateLimits:
    """Requests and tokens per window, granted together (pyrate-limiter sliding-window logs).

    Create one per provider account and model and pass it to every `run_shard` call that shares
    those limits (shards sent in parallel included); it holds no other state.
    """

    def __init__(self, settings: RealtimeSettings) -> None:
        share = settings.rate_window_s / 60
        window_ms = max(1, round((settings.rate_window_s + settings.arrival_margin_s) * 1000))
        self.window_s = settings.rate_window_s
        self.max_requests = max(1, math.floor(settings.requests_per_minute * share))
        self.max_tokens = max(1, math.floor(settings.tokens_per_minute * share))
        self.unit = max(1, math.ceil(self.max_tokens / MAX_LOG_UNITS))
        self._requests = InMemoryBucket([Rate(self.max_requests, window_ms)])
        self._tokens = InMemoryBucket([Rate(self.max_tokens // self.unit, window_ms)])
        self._gate = threading.Lock()

    def fits(self, tokens: int) -> bool:
        """Whether a request of `tokens` can ever be admitted (it fits in one window)."""
        return self._weight(tokens) <= self.max_tokens // self.unit

    def too_large(self, what: str, tokens: int) -> str:
        """Why `what` (of `tokens` tokens) can never be sent, naming the settings that decide it."""
        share = self.window_s / 60
        need = math.ceil(tokens / share)
        return (f"{what} has {tokens} tokens, more than the real-time lane admits in one window "
                f"({self.max_tokens} tokens per {self.window_s:g} s); it was not sent: raise "
                f"lane.realtime.tokens_per_minute to at least {need} (or lane.realtime.rate_window_s "
                "towards 60), or send it through the batch lane")

    def _weight(self, tokens: int) -> int:
        return math.ceil(tokens / self.unit)

    def acquire(self, tokens: int, cancel: threading.Event | None = None) -> float:
        """Block until a request of `tokens` may start now; the seconds waited.

        Raises:
            Cancelled: `cancel` was set while waiting.
            ValueError: the request does not fit in one window (check `fits` first).
        """
        weight = self._weight(tokens)
        if not self.fits(tokens):
            raise ValueError(f"{tokens} tokens exceed the {self.max_tokens} tokens of one window")
        start = time.monotonic()
        with self._gate:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                wait_ms = self._try(weight)
                if wait_ms is None:
                    return time.monotonic() - start
                if cancel is not None:
                    cancel.wait(wait_ms / 1000)
                else:
                    time.sleep(wait_ms / 1000)

    def _try(self, weight: int) -> int | None:
        """Take a request slot and `weight` token units now (None), or the ms to wait."""
        now = self._requests.now()
        self._requests.leak(now)
        self._tokens.leak(now)
        slot = RateItem("request", now)
        if not self._requests.put(slot):
            return _wait_ms(self._requests, slot)
        if weight == 0:
            return None
        units = RateItem("tokens", now, weight)
        if self._tokens.put(units):
            return None
        return _wait_ms(self._tokens, units)


def _wait_ms(bucket: InMemoryBucket, item: RateItem) -> int:
    """Milliseconds until `bucket` takes `item`, after it refused it (an in-memory bucket is sync)."""
    wait = bucket.waiting(item)
    assert isinstance(wait, int)
    return max(1, wait)


@dataclass
class LaneStats:
    """What one `run_shard` call did (for logs, the ledger and tests)."""

    requests: int = 0
    split: int = 0
    """Embeddings requests sent as several calls (over `split_tokens`)."""
    calls: int = 0
    """Calls the requests were sent as (a split request counts each of its calls)."""
    attempts: int = 0
    """HTTP calls made (each took a request slot and its tokens)."""
    succeeded: int = 0
    errors: int = 0
    """Lines in the error bytes."""
    retries: Counter[str] = field(default_factory=Counter)
    """Retries by reason: the HTTP status ("429", "503", ...), "timeout", "connection",
    "invalid_response"."""
    rate_wait_s: float = 0.0
    """Seconds requests waited for the client-side limits, summed over threads."""
    retry_wait_s: float = 0.0
    """Seconds slept before retries (Retry-After or backoff), summed over threads."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON (for the ledger), waits rounded to ms."""
        return {"requests": self.requests, "split": self.split, "calls": self.calls, "attempts": self.attempts,
                "succeeded": self.succeeded, "errors": self.errors, "retries": dict(self.retries),
                "rate_wait_s": round(self.rate_wait_s, 3), "retry_wait_s": round(self.retry_wait_s, 3)}


@dataclass(frozen=True)
class LaneResult:
    """Output and error bytes in the Batch API's file format, and what it took."""

    output: bytes
    errors: bytes
    stats: LaneStats


@dataclass(frozen=True)
class _Request:
    custom_id: str
    path: str
    """The endpoint relative to the SDK's base URL (`/embeddings`, ...)."""
    body: dict[str, Any]
    tokens: int


@dataclass(frozen=True)
class _Call:
    """One call of a request: the whole request, or a slice of an embeddings request's inputs."""

    req: _Request
    body: dict[str, Any]
    tokens: int
    first: int = 0
    """Position in the request's `input` of the call's first input (a slice)."""
    inputs: int = 0
    """Inputs of the slice (0: the whole request)."""

    @property
    def label(self) -> str:
        """How messages name the call."""
        if not self.inputs:
            return f"request {self.req.custom_id}"
        return f"request {self.req.custom_id} (inputs {self.first}-{self.first + self.inputs - 1})"


@dataclass(frozen=True)
class _Answer:
    """What one call got: an HTTP answer (`status`, compact JSON `body`), or none (`code`)."""

    call: _Call
    status: int | None = None
    request_id: str | None = None
    body: bytes = b""
    code: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def severity(self) -> int:
        """Which failure speaks for a split request: a final 4xx, then a retryable error, then a
        cancel (the join fails, retries or requeues the request accordingly)."""
        if self.status is not None:
            return 3 if self.status < 500 and self.status not in (408, 409, 429) else 2
        return 1 if self.code == "batch_cancelled" else 2


class InvalidResponse(Exception):
    """A 2xx answer whose body is not JSON (a broken proxy, a truncated answer)."""


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds a response asks to wait: `retry-after-ms`, else `retry-after` (seconds or a date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _exc_retry_after(exc: BaseException | None) -> float | None:
    if isinstance(exc, openai.APIStatusError) and exc.status_code == 429:
        return retry_after_s(exc.response.headers)
    return None


class StopOnLongRetryAfter(stop_base):
    """Stop retrying when a 429 asks to wait longer than `cap_s` (never retry before it says)."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        wait = _exc_retry_after(outcome.exception() if outcome else None)
        return wait is not None and wait > self.cap_s


def _retry_reason(exc: BaseException | None) -> str:
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return "invalid_response"


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, InvalidResponse) or is_transient(exc)


def parse_lines(lines: Iterable[tuple[str | bytes, int]]) -> list[_Request]:
    """The requests of a shard's lines, with their planned tokens.

    Raises:
        ValueError: a line is not a batch request line for a synchronous endpoint, or a
            custom_id repeats (the message names the line).
    """
    out: list[_Request] = []
    seen: set[str] = set()
    for no, (line, tokens) in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except ValueError:
            raise ValueError(f"request line {no} is not JSON") from None
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(cid, str) or not cid:
            raise ValueError(f"request line {no} has no custom_id")
        if obj.get("url") not in SYNC_ENDPOINTS or obj.get("method") != "POST":
            raise ValueError(
                f"request {cid} (line {no}): POST {obj.get('url')!r} is not one of {', '.join(SYNC_ENDPOINTS)}"
            )
        if not isinstance(obj.get("body"), dict):
            raise ValueError(f"request {cid} (line {no}): body is not a JSON object")
        if cid in seen:
            raise ValueError(f"request {cid} (line {no}): custom_id repeats an earlier line")
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"request {cid} (line {no}): tokens must be an integer >= 0, got {tokens!r}")
        seen.add(cid)
        out.append(_Request(cid, obj["url"].removeprefix("/v1"), obj["body"], tokens))
    return out


# ---------------------------------------------------------------------------- output lines
def _line_id() -> str:
    return "rt_req_" + secrets.token_hex(12)


def http_line(
    custom_id: str, status: int, request_id: str | None, body: bytes, parts: list[dict[str, Any]] | None = None
) -> bytes:
    """An output/error line for an HTTP answer; `body` is compact JSON, spliced in as is.
    `parts` lists the calls of a split request."""
    line: dict[str, Any] = {
        "id": _line_id(),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": msgspec.Raw(body)},
        "error": None,
    }
    if parts is not None:
        line["parts"] = parts
    return msgspec.json.encode(line)


def failed_line(custom_id: str, code: str, message: str, parts: list[dict[str, Any]] | None = None) -> bytes:
    """An error line for a request that got no HTTP answer."""
    line: dict[str, Any] = {
        "id": _line_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    if parts is not None:
        line["parts"] = parts
    return msgspec.json.encode(line)


def add_counts(total: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """`total` plus `more`, field by field (numbers summed, nested mappings alike, others skipped)."""
    for key, value in more.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            total[key] = (total.get(key) or 0) + value
        elif isinstance(value, Mapping):
            total[key] = add_counts(dict(total.get(key) or {}), value)
    return total


class _UsageBody(msgspec.Struct):
    usage: dict[str, Any] | None = None


class _UsageResponse(msgspec.Struct):
    body: _UsageBody | None = None


class _UsageLine(msgspec.Struct):
    response: _UsageResponse | None = None


_USAGE_LINE = msgspec.json.Decoder(_UsageLine)
_USAGE_NAMES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens",
                "prompt_tokens_details": "input_tokens_details", "completion_tokens_details": "output_tokens_details"}


def usage_of(output: bytes) -> dict[str, Any]:
    """The provider's usage summed over the answers of an output file, in the Batch API's shape
    (`input_tokens`, `output_tokens`, `total_tokens`, details), as a batch reports it: the
    real-time lane has no batch to report it, but every answer carries its own `usage`."""
    total: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    for raw in output.splitlines():
        try:
            line = _USAGE_LINE.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not an answer: the join records it as an anomaly
        used = line.response.body.usage if line.response and line.response.body else None
        if used:
            add_counts(total, {_USAGE_NAMES.get(k, k): v for k, v in used.items()})
    return total


_Fields = dict[str, msgspec.Raw]


def merge_embeddings(bodies: list[bytes], firsts: list[int]) -> bytes:
    """One `/v1/embeddings` body from the bodies of a split request's calls, in order.

    `data` holds every call's entries, `index` shifted by the position of the call's first
    input (`firsts`), so entry `index` i is the request's i-th input as in an unsplit answer;
    `usage` is summed; every other field is the first call's. Vectors stay as sent (raw JSON).

    Raises:
        InvalidResponse: a body is not a JSON object.
    """
    try:
        tops = [msgspec.json.decode(b, type=_Fields) for b in bodies]
        data: list[_Fields] = []
        usage: dict[str, Any] = {}
        for top, first in zip(tops, firsts, strict=True):
            for item in msgspec.json.decode(top.get("data", b"[]"), type=list[_Fields]):
                index = msgspec.json.decode(item["index"]) if "index" in item else None
                if isinstance(index, int) and not isinstance(index, bool):
                    item["index"] = msgspec.Raw(msgspec.json.encode(index + first))
                data.append(item)
            used = msgspec.json.decode(top["usage"]) if "usage" in top else None
            if isinstance(used, dict):
                add_counts(usage, used)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidResponse(f"a call's body cannot be merged: {exc}") from None
    merged: dict[str, Any] = dict(tops[0])
    merged["data"] = data
    if usage:
        merged["usage"] = usage
    return msgspec.json.encode(merged)


def compact_json(raw: bytes) -> bytes:
    """`raw` without whitespace outside strings (numbers and escapes untouched).

    Raises:
        InvalidResponse: `raw` is not JSON.
    """
    try:
        return msgspec.json.format(raw, indent=-1)
    except msgspec.DecodeError as exc:
        raise InvalidResponse(f"the body is not JSON ({exc}): {raw[:200]!r}") from None


def _error_body(response: httpx2.Response) -> bytes:
    """The JSON error body of a failed call; a non-JSON body is wrapped in OpenAI's error shape."""
    try:
        return compact_json(response.content)
    except InvalidResponse:
        text = response.content[:500].decode("utf-8", "replace")
        kind = "server_error" if response.status_code >= 500 else "invalid_request_error"
        return msgspec.json.encode(
            {"error": {"message": text or f"HTTP {response.status_code}", "type": kind, "param": None, "code": None}}
        )


# ---------------------------------------------------------------------------- the lane
class _Lane:
    """One `run_shard` call: the client, limits, retry policy and counters it shares."""

    def __init__(
        self,
        client: openai.OpenAI,
        settings: RealtimeSettings,
        limits: RateLimits,
        cancel: threading.Event | None,
    ) -> None:
        self.client = client.with_options(max_retries=0, timeout=settings.timeout_s)
        self.settings = settings
        self.limits = limits
        self.cancel = cancel
        self.halt = threading.Event()  # set on 401/403: send nothing more
        self.terminal: ApiTerminalError | None = None
        self.stats = LaneStats()
        self._lock = threading.Lock()
        self._backoff = wait_random_exponential(
            multiplier=settings.backoff_base_s, max=settings.backoff_max_s
        )
        self.retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_any(
                stop_after_attempt(settings.max_retries + 1),
                StopOnLongRetryAfter(settings.max_retry_after_s),
            ),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )

    # retry policy -------------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        wait = _exc_retry_after(state.outcome.exception() if state.outcome else None)
        return wait if wait is not None else float(self._backoff(state))

    def _sleep(self, seconds: float) -> None:
        if self.cancel is not None:
            self.cancel.wait(seconds)
        else:
            time.sleep(seconds)

    def _count_retry(self, state: RetryCallState) -> None:
        reason = _retry_reason(state.outcome.exception() if state.outcome else None)
        wait = state.next_action.sleep if state.next_action else 0.0
        with self._lock:
            self.stats.retries[reason] += 1
            self.stats.retry_wait_s += wait

    # one request --------------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self.halt.is_set() or (self.cancel is not None and self.cancel.is_set())

    def _attempt(self, call: _Call) -> tuple[httpx2.Response, bytes]:
        if self._stopped():
            raise Cancelled
        waited = self.limits.acquire(call.tokens, self.cancel)
        if self.halt.is_set():
            raise Cancelled
        with self._lock:
            self.stats.attempts += 1
            self.stats.rate_wait_s += waited
        response = self.client.post(call.req.path, cast_to=httpx2.Response, body=call.body)
        return response, compact_json(response.content)

    def send(self, call: _Call) -> _Answer:
        """What one call got; never raises (a 401/403 sets `terminal`)."""
        try:
            response, body = self.retrying(self._attempt, call)
        except Cancelled:
            return _Answer(call, code="batch_cancelled", message=CANCELLED_MESSAGE)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            self._stop_all(call.req, exc)
            return _Answer(call, code="batch_cancelled", message=CANCELLED_MESSAGE)
        except openai.APIStatusError as exc:
            rid = exc.response.headers.get("x-request-id")
            return _Answer(call, exc.status_code, rid, _error_body(exc.response))
        except openai.APITimeoutError:
            return _Answer(call, code="timeout", message=f"{call.label} got no answer within "
                           f"{self.settings.timeout_s:g} s on its last try")
        except openai.APIConnectionError as exc:
            return _Answer(call, code="connection_error", message=f"{call.label}: {type(exc).__name__}: {exc}")
        except InvalidResponse as exc:
            return _Answer(call, code="invalid_response", message=f"{call.label}: {exc}")
        except Exception as exc:  # a bug must not lose the line: log it, let the join retry it
            log.exception("real-time %s failed", call.label)
            return _Answer(call, code="lane_error", message=f"{call.label}: {type(exc).__name__}: {exc}")
        return _Answer(call, response.status_code, response.headers.get("x-request-id"), body)

    def _stop_all(self, req: _Request, exc: openai.APIStatusError) -> None:
        """Remember the first 401/403 and make every other request stop before it is sent."""
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body)
        message = str(err.get("message") or type(exc).__name__) if isinstance(err, dict) else ""
        key = self.client.api_key
        if key and key in message:  # a server may quote the key: never pass it on
            message = message.replace(key, "**********")
        with self._lock:
            if self.terminal is None:
                self.terminal = ApiTerminalError(
                    f"real-time request {req.custom_id}", exc.status_code, message or type(exc).__name__
                )
        self.halt.set()


def plan_calls(
    req: _Request, limits: RateLimits, *, split_tokens: int, encoding: str | None = None
) -> list[_Call] | bytes:
    """The calls that send `req` within the lane's limits, or its error line when it can never fit.

    An embeddings request over `split_tokens` (or over a window) is cut into consecutive slices
    of its `input` (next fit over the exact token count of each input, `encoding` or the
    model's), each within both; any other request is one call.
    """
    inputs = req.body.get("input")
    splittable = (req.path == "/embeddings" and isinstance(inputs, list) and len(inputs) > 1
                  and all(isinstance(x, str) for x in inputs))
    if not splittable or (req.tokens <= split_tokens and limits.fits(req.tokens)):
        if limits.fits(req.tokens):
            return [_Call(req, req.body, req.tokens)]
        return failed_line(req.custom_id, "request_too_large", limits.too_large(f"request {req.custom_id}", req.tokens))
    assert isinstance(inputs, list)
    counts = count_tokens(inputs, encoding or encoding_for_model(str(req.body.get("model", ""))))
    for i, n in enumerate(counts):
        if not limits.fits(n):
            return failed_line(req.custom_id, "request_too_large",
                               limits.too_large(f"input {i} of request {req.custom_id}", n))
    calls: list[_Call] = []
    first = tokens = 0
    for i, n in enumerate(counts):
        if i > first and (tokens + n > split_tokens or not limits.fits(tokens + n)):  # each call fits a window
            calls.append(_Call(req, {**req.body, "input": inputs[first:i]}, tokens, first, i - first))
            first, tokens = i, 0
        tokens += n
    calls.append(_Call(req, {**req.body, "input": inputs[first:]}, tokens, first, len(inputs) - first))
    return calls


def request_line(req: _Request, answers: list[_Answer]) -> tuple[bool, bytes]:
    """(is an output line, the line) of a request from the answers to its calls."""
    if len(answers) == 1 and not answers[0].call.inputs:
        a = answers[0]
        if a.status is None:
            return False, failed_line(req.custom_id, a.code or "lane_error", a.message)
        return a.ok, http_line(req.custom_id, a.status, a.request_id, a.body)
    parts = [{"request_id": a.request_id, "first": a.call.first, "inputs": a.call.inputs, "status_code": a.status}
             for a in answers]
    if all(a.ok for a in answers):
        try:
            body = merge_embeddings([a.body for a in answers], [a.call.first for a in answers])
        except InvalidResponse as exc:
            return False, failed_line(req.custom_id, "invalid_response", f"request {req.custom_id}: {exc}", parts)
        return True, http_line(req.custom_id, answers[0].status or 200, answers[0].request_id, body, parts)
    worst = max((a for a in answers if not a.ok), key=_Answer.severity)
    if worst.status is None:
        return False, failed_line(req.custom_id, worst.code or "lane_error", worst.message, parts)
    return False, http_line(req.custom_id, worst.status, worst.request_id, worst.body, parts)


def run_shard(
    client: openai.OpenAI,
    lines: Iterable[tuple[str | bytes, int]],
    settings: RealtimeSettings,
    *,
    limits: RateLimits | None = None,
    cancel: threading.Event | None = None,
    encoding: str | None = None,
) -> LaneResult:
    """Send a shard's request lines to the synchronous endpoints; batch output and error bytes.

    Args:
        client: an SDK client of the provider (its own retries and timeout are overridden).
        lines: `(line, tokens)`: each exact request line of the shard and its planned tokens.
        settings: rates, concurrency, retries, `split_tokens`.
        limits: the client-side limits to share with other calls (default: fresh ones).
        cancel: when set, requests not yet sent end as `batch_cancelled` error lines; requests
            in flight finish.
        encoding: the tokenizer the plan counted embeddings inputs with (default: the model's),
            to cut a request into calls.

    Returns:
        Output lines (2xx) and error lines, in the order of `lines`, each custom_id exactly once.

    Raises:
        ValueError: a line is not a request line for a synchronous endpoint (see `parse_lines`).
        ApiTerminalError: the provider refused the key or the account (401, 403).
    """
    requests = parse_lines(lines)
    limits = limits or RateLimits(settings)
    lane = _Lane(client, settings, limits, cancel)
    split_tokens = settings.split_tokens or max(1, limits.max_tokens // 4)
    planned = [plan_calls(r, limits, split_tokens=split_tokens, encoding=encoding) for r in requests]
    calls = [c for p in planned if isinstance(p, list) for c in p]
    workers = max(1, min(settings.concurrency, len(calls)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="realtime") as pool:
        answers = iter(list(pool.map(lane.send, calls)))
    if lane.terminal is not None:
        raise lane.terminal
    output: list[bytes] = []
    errors: list[bytes] = []
    for req, p in zip(requests, planned, strict=True):
        if isinstance(p, bytes):
            errors.append(p)
            continue
        ok, line = request_line(req, [next(answers) for _ in p])
        (output if ok else errors).append(line)
    lane.stats.requests = len(requests)
    lane.stats.split = sum(1 for p in planned if isinstance(p, list) and p[0].inputs)
    lane.stats.calls = len(calls)
    lane.stats.succeeded = len(output)
    lane.stats.errors = len(errors)
    return LaneResult(_jsonl(output), _jsonl(errors), lane.stats)


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)
