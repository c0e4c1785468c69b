"""Files + Batches through the `openai` SDK, with retries and crash-safe adoption.

This is the only module that talks to the Batch API and the only place where SDK exceptions
are mapped onto batchyard's terminal/transient errors. Transient failures (429, 5xx,
timeouts, connection resets) are retried with exponential backoff and full jitter (tenacity);
terminal ones (bad key, unknown model, malformed input) raise `ApiTerminalError` at once.

A batch create that failed transiently may still have created the batch on the server, so
every retry of `create_batch` first looks for a batch with the same metadata and adopts it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeVar

import openai
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from batchyard.errors import ApiTerminalError, ApiTransientError, BatchyardError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from batchyard.settings import ProviderSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

_DOWNLOAD_CHUNK = 1 << 20
_TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Whether an SDK exception may succeed on retry."""
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
    return False


def _status(exc: BaseException) -> int | None:
    return exc.status_code if isinstance(exc, openai.APIStatusError) else None


def _message(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        return f"{type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


class BatchApi:
    """The Files and Batches endpoints of one OpenAI-compatible server."""

    def __init__(self, client: openai.OpenAI, settings: ProviderSettings) -> None:
        self.client = client
        self.settings = settings
        self.reconnect: Callable[[str], tuple[str, str]] | None = None
        """For a server that may move (the embedded one, shared by processes): given the base URL
        that stopped answering, where to go now and with which key."""
        self.calls: Counter[str] = Counter()
        """Calls made, by operation (`upload`, `create`, `retrieve`, `list`, ...; `list_pages`
        counts the pages a list call fetched), for reports and tests."""

    @classmethod
    def connect(cls, settings: ProviderSettings, *, base_url: str | None = None, api_key: str | None = None) -> BatchApi:
        """Build the SDK client (its own retries off: this class retries)."""
        key = api_key or (settings.api_key.get_secret_value() if settings.api_key else "local")
        client = openai.OpenAI(
            api_key=key,
            base_url=base_url or settings.base_url,
            organization=settings.organization,
            timeout=settings.request_timeout_s,
            max_retries=0,
        )
        return cls(client, settings)

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    def _call(self, operation: str, fn: Callable[[], T], *, on_retry: Callable[[], T | None] | None = None) -> T:
        """Run an API call with backoff; `on_retry` may return a result that makes retrying moot."""
        s = self.settings
        self.calls[operation.split(" ", 1)[0]] += 1
        try:
            return self._retrying(operation, fn, on_retry)
        except BatchyardError as exc:
            # a server may quote the key (OpenAI quotes it partly masked): never pass it on
            key = s.api_key.get_secret_value() if s.api_key else ""
            if key and key in str(exc):
                exc.args = (str(exc).replace(key, "**********"),)
            raise

    def _follow(self) -> None:
        """Before a retry: if the server moved (`reconnect`), point the client at it."""
        if self.reconnect is None:
            return
        import httpx2

        lost = str(self.client.base_url).rstrip("/")
        try:
            if httpx2.get(f"{lost.removesuffix('/v1')}/healthz", timeout=1.0).status_code == 200:
                return  # it answers: a blip, not a move
        except httpx2.HTTPError:  # it does not answer: follow the server
            pass
        base_url, key = self.reconnect(lost)
        if base_url.rstrip("/") == lost:
            return
        old = self.client
        self.client = openai.OpenAI(api_key=key, base_url=base_url, organization=self.settings.organization,
                                    timeout=self.settings.request_timeout_s, max_retries=0)
        old.close()
        log.warning("the embedded Batch API server moved to %s", base_url)

    def _retrying(self, operation: str, fn: Callable[[], T], on_retry: Callable[[], T | None] | None) -> T:
        s = self.settings
        attempt = 0
        try:
            for attempt_ctx in Retrying(
                retry=retry_if_exception(is_transient),
                stop=stop_after_attempt(s.max_retries + 1),
                wait=wait_random_exponential(multiplier=s.backoff_base_s, max=s.backoff_max_s),
                reraise=False,
            ):
                with attempt_ctx:
                    attempt += 1
                    if attempt > 1:
                        log.warning("retrying %s (attempt %d)", operation, attempt)
                        self._follow()
                        if on_retry is not None:
                            found = on_retry()
                            if found is not None:
                                return found
                    return fn()
        except RetryError as exc:
            last = exc.last_attempt.exception()
            assert last is not None  # a failed attempt always carries its exception
            error: BatchyardError = ApiTransientError(operation, _status(last), _message(last))
        except openai.OpenAIError as exc:
            kind = ApiTransientError if is_transient(exc) else ApiTerminalError
            error = kind(operation, _status(exc), _message(exc))
        # raised here, outside the handler, so that the SDK error (its request carries the key)
        # is not even the suppressed `__context__`: tblib (loaded by Dask) pickles that too
        raise error

    # the real-time embeddings endpoint (for `batchyard search`: one query, not a shard)

    def embed(self, model: str, texts: list[str], dimensions: int | None) -> list[list[float]]:
        """Vectors of `texts` from `/v1/embeddings`, with this class's retries and key scrubbing."""
        extra: dict[str, Any] = {"dimensions": dimensions} if dimensions is not None else {}
        got = self._call(
            f"embed {len(texts)} text(s) with {model}",
            lambda: self.client.embeddings.create(model=model, input=texts, encoding_format="float", **extra),
        )
        return [list(d.embedding) for d in sorted(got.data, key=lambda d: d.index)]

    # files

    def upload(self, filename: str, data: bytes) -> str:
        """Upload a batch input file; returns its id."""
        extra: dict[str, Any] = {}
        if self.settings.file_expires_after_s:
            extra["expires_after"] = {"anchor": "created_at", "seconds": self.settings.file_expires_after_s}
        f = self._call(
            f"upload {filename}",
            lambda: self.client.files.create(file=(filename, data, "application/jsonl"), purpose="batch", **extra),
        )
        return f.id

    def find_file(self, filename: str, size: int, since: float) -> str | None:
        """An already uploaded batch file with this name and size, created after `since`."""
        def scan() -> str | None:
            for f in self.client.files.list(purpose="batch", order="desc", limit=100):
                if f.created_at < since:
                    return None
                if f.filename == filename and f.bytes == size:
                    return f.id
            return None

        return self._call(f"find file {filename}", scan)

    def content(self, file_id: str) -> bytes:
        """Download a file's bytes."""
        return self._call(f"download {file_id}", lambda: self.client.files.content(file_id).read())

    def download(self, file_id: str, write: Callable[[Iterator[bytes]], None]) -> None:
        """Stream a file's bytes to `write` in 1 MiB pieces (a retry calls `write` again from the
        start), so an output file of hundreds of MB is never held in memory whole."""

        def fetch() -> None:
            with self.client.files.with_streaming_response.content(file_id) as response:
                write(response.iter_bytes(_DOWNLOAD_CHUNK))

        self._call(f"download {file_id}", fetch)

    def file_exists(self, file_id: str) -> bool:
        """Whether the server still has a file (False on 404: expired, deleted or purged)."""
        try:
            self._call(f"retrieve file {file_id}", lambda: self.client.files.retrieve(file_id))
        except ApiTerminalError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def delete_file(self, file_id: str) -> None:
        """Delete a remote file (missing files are fine)."""
        try:
            self._call(f"delete {file_id}", lambda: self.client.files.delete(file_id))
        except ApiTerminalError as exc:
            if exc.status != 404:
                raise

    # batches

    def find_batch(self, metadata: dict[str, str], since: float) -> dict[str, Any] | None:
        """The newest batch whose metadata contains `metadata`, created after `since`."""
        def scan() -> dict[str, Any] | None:
            for b in self.client.batches.list(limit=100):
                if b.created_at < since:
                    return None
                meta = b.metadata or {}
                if all(meta.get(k) == v for k, v in metadata.items()):
                    return b.model_dump(mode="json")
            return None

        return self._call("find batch", scan)

    def create_batch(self, file_id: str, endpoint: str, metadata: dict[str, str], since: float) -> dict[str, Any]:
        """Create a batch; a retry first adopts a batch the failed attempt may have created."""
        return self._call(
            f"create batch for {file_id}",
            lambda: self.client.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=self.settings.completion_window,
                metadata=metadata,
            ).model_dump(mode="json"),
            on_retry=lambda: self.find_batch(metadata, since),
        )

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        """A batch as plain JSON data."""
        return self._call(f"retrieve {batch_id}", lambda: self.client.batches.retrieve(batch_id).model_dump(mode="json"))

    def list_batches(self, wanted: set[str], *, since: float) -> dict[str, dict[str, Any]]:
        """The batches in `wanted`, from the list endpoint (newest first), by id.

        Pages of 100 are fetched until every wanted batch was seen or the page reaches batches
        created before `since` (the oldest one wanted, minus some slack). A batch the list did
        not show is simply absent from the result.
        """
        def scan() -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            self.calls["list_pages"] += 1
            page = self.client.batches.list(limit=100)
            while True:
                for b in page.data:
                    if b.id in wanted:
                        found[b.id] = b.model_dump(mode="json")
                    if len(found) == len(wanted) or b.created_at < since:
                        return found
                if not page.has_next_page():
                    return found
                self.calls["list_pages"] += 1
                page = page.get_next_page()

        return self._call("list batches", scan)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the server to cancel a batch."""
        return self._call(f"cancel {batch_id}", lambda: self.client.batches.cancel(batch_id).model_dump(mode="json"))
