"""Configuration of the local Batch API server: access keys, limits, executors, pacing, faults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr


class FaultConfig(BaseModel):
    """Faults the server injects, so that every batch outcome has a test.

    Batch-level faults apply to the first `*_batches` batches created (None: every batch), counted
    in the server's persisted state so a restart does not reset them.
    """

    validation_failure: bool = Field(
        default=False, description="Fail every new batch at validation (code `invalid_request`)."
    )
    validation_fail_batches: int | None = Field(
        default=None, ge=0, description="With validation_failure: only the first N batches."
    )
    request_error_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of requests answered with an HTTP error body."
    )
    request_error_status: int = Field(default=500, description="Status code of injected request errors.")
    request_error_sticky: bool = Field(
        default=False,
        description="The same custom_ids fail in every batch (True) or each batch draws afresh (False).",
    )
    expire_after_requests: int | None = Field(
        default=None, ge=0, description="A batch expires after processing this many requests."
    )
    expire_batches: int | None = Field(default=None, ge=0, description="Only the first N batches expire.")
    expire_after_fraction: float | None = Field(
        default=None, ge=0, lt=1,
        description="A batch expires once this share of its requests is done (rounded down: a "
        "one-request batch expires with nothing done).",
    )
    cancel_after_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="The server cancels a batch once this share of its requests is done."
    )
    cancel_after_requests: int | None = Field(
        default=None, ge=0, description="The server cancels a batch after this many requests."
    )
    cancel_batches: int | None = Field(default=None, ge=0, description="Only the first N batches.")
    cancelling_s: float = Field(default=0.0, ge=0, description="Seconds a batch stays `cancelling`.")
    token_count_factor: float = Field(
        default=1.0, ge=0.5, le=2.0,
        description="The server counts this many tokens per token of the exact count, in the enqueued-token "
        "cap and in reported usage (a provider that counts differently from the client).",
    )
    enqueued_token_cap: int | None = Field(
        default=None, gt=0, description="Fail new batches with `token_limit_exceeded` over this cap."
    )
    transient_error_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of HTTP calls answered 429/500 before any work."
    )
    transient_statuses: list[int] = Field(default=[429, 500, 503], description="Statuses to draw from.")
    text_markers: bool = Field(
        default=False,
        description="Honour `[[fault:<kind>]]` markers in request text (refusal, invalid_json, "
        "schema_violation, truncated, error400, error500). Off by default: with it on, anyone "
        "whose text reaches the server (a chunk in the corpus) can make its request fail.",
    )
    sync_429_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of synchronous calls (/v1/embeddings, /v1/chat/completions, "
        "/v1/responses) answered 429 with a Retry-After, as a rate limit would.",
    )
    sync_429_every: int | None = Field(
        default=None,
        ge=1,
        description="Answer every Nth synchronous call 429 (the 4th, 8th, ... with 4), counted "
        "over all synchronous calls in arrival order: a deterministic rate-limit pattern, "
        "whatever the bodies (with sync_retry_after_s).",
    )
    sync_retry_after_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Retry-After of those 429s: whole seconds (rounded up) in `retry-after`, "
        "and the exact value in `retry-after-ms` when it is not a whole number of seconds.",
    )
    sync_5xx_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of synchronous calls answered with a 5xx."
    )
    sync_5xx_statuses: list[Annotated[int, Field(ge=500, le=599)]] = Field(
        default=[500, 502, 503], min_length=1, description="Statuses those 5xx are drawn from."
    )
    sync_slow_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of synchronous calls answered only after sync_slow_s (a client with "
        "a shorter timeout times out; the server still does the work).",
    )
    sync_slow_s: float = Field(default=5.0, ge=0, le=600, description="Delay of a slow answer.")
    exit_after_requests: int | None = Field(
        default=None, ge=1, description="Kill the server process (SIGKILL) after N processed requests."
    )
    seed: int = Field(
        default=0,
        description="Seed for rate-based faults (deterministic per custom_id; for synchronous "
        "calls per request body and how many times that body arrived).",
    )


class LocalApiConfig(BaseModel):
    """The local Batch API server."""

    host: str = Field(default="127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(default=0, ge=0, le=65535, description="Port (0: pick a free one).")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys the server accepts as `Authorization: Bearer <key>` on every route but "
        "/healthz (at least 16 characters each), as JSON: "
        "BATCHYARD_PROVIDER__LOCAL__API_KEYS='[\"<key>\"]'. Without any key the server binds "
        "loopback only (`batchyard serve --insecure` overrides). The embedded server ignores "
        "them: it makes its own random key for each process.",
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys that see every key's files and batches (each other key sees only its "
        "own) and are not held to max_storage_bytes_per_key, as JSON like api_keys.",
    )
    max_storage_bytes_per_key: int | None = Field(
        default=10 * 1024**3,
        gt=0,
        description="Bytes of live files (uploads and batch outputs) one key may hold; an upload "
        "past it gets 413 (`storage_limit_exceeded`). None: no cap. Admin keys have none.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="A file of further keys for `batchyard serve`: one key per line, blank lines "
        "and lines starting with `#` ignored. Keep it owner-only (chmod 600).",
    )
    max_upload_bytes: int = Field(
        default=200 * 1024 * 1024,
        gt=0,
        description="Largest file accepted by POST /v1/files (the Batch API's 200 MB input file "
        "limit); a larger upload gets 413 and is never held in memory whole.",
    )
    max_json_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=0,
        description="Largest JSON body of any other request (a synchronous call, a batch "
        "create): refused with 413 while it streams, never held whole beyond this.",
    )
    max_connections: int = Field(
        default=512,
        gt=0,
        le=100_000,
        description="Open connections at most; one more is answered 503 and closed at once "
        "(keep it below the process's file descriptor limit, `ulimit -n`).",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A connection must send a request's complete headers within this many seconds "
        "(of connecting, or of its first byte after an answer), else it is closed.",
    )
    body_idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest wait for the next piece of a request body; then 408 and the "
        "connection is closed.",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0, le=3600, description="An idle kept-alive connection is closed after this."
    )
    state_dir: str | None = Field(
        default=None, description="Where files and batches persist (default: <staging root>/.localapi)."
    )
    embeddings_executor: Literal["hash", "sentence-transformers"] = Field(
        default="hash", description="Executor for /v1/embeddings."
    )
    chat_executor: Literal["schema", "forward"] = Field(
        default="schema", description="Executor for /v1/chat/completions and /v1/responses."
    )
    forward_url: str | None = Field(
        default=None, description="Base URL of a real-time OpenAI-compatible API for `forward`."
    )
    forward_api_key: SecretStr | None = Field(default=None, description="Key for the forward target.")
    forward_concurrency: int = Field(default=4, gt=0, le=256, description="Parallel forwarded calls.")
    validating_s: float = Field(default=0.0, ge=0, description="Seconds a batch stays `validating`.")
    in_progress_s: float = Field(
        default=0.0, ge=0, description="Seconds a batch stays `in_progress` at least (a provider's batch latency)."
    )
    seconds_per_request: float = Field(default=0.0, ge=0, description="Extra seconds per request.")
    finalizing_s: float = Field(default=0.0, ge=0, description="Seconds a batch stays `finalizing`.")
    shuffle_output: bool = Field(default=True, description="Write output lines in shuffled order.")
    faults: FaultConfig = Field(default_factory=FaultConfig)
