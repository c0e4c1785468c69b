"""Pure builders of OpenAI wire objects: errors, files, batches, list pages, batch output lines.

Nothing here does I/O. Field names follow `openai.types` (Batch, FileObject, BatchError, ...).
"""

from __future__ import annotations

import json
import secrets
import unicodedata
from typing import Any

DAY_S = 24 * 3600
BATCH_FILE_TTL_S = 30 * DAY_S
"""Files with purpose `batch` / `batch_output` expire after 30 days unless told otherwise."""

TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
SUPPORTED_ENDPOINTS = ("/v1/embeddings", "/v1/chat/completions", "/v1/responses")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}


class ApiError(Exception):
    """An error answered over HTTP in OpenAI's shape `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or error_type(status)

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return error_body(self.message, self.type, self.param, self.code)


SHOWN_CHARS = 64
"""At most this many characters of a value a client sent are echoed in an error message."""


def shown(value: Any, limit: int = SHOWN_CHARS, *, quote: bool = True) -> str:
    """A value a client sent, as an error message may quote it: `repr` (or the bare string when
    not `quote`), cut to `limit` characters.

    Why: errors that echo their input whole were a way to make the server build and send a
    response as large as any request (a 100 MB file id came back in a 100 MB error).
    """
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else f"<{type(value).__name__}>"
    cut = value[:limit]
    text = repr(cut) if quote else cut
    return text if len(value) <= limit else f"{text}... ({len(value):,} characters)"


FILENAME_CHARS = 200
DEFAULT_FILENAME = "upload.jsonl"


def safe_filename(name: str) -> str:
    """The name an uploaded file is stored and served under: its last path component, without
    control, format (right-to-left override and other bidi marks) or unassigned characters, at
    most FILENAME_CHARS characters (the extension kept); DEFAULT_FILENAME when nothing is left.

    Why: the name comes from the client and goes back out in FileObjects and in the
    Content-Disposition of every download; `../../../../tmp/pwned` or a name that reads backwards
    must not reach another tool that saves or shows it.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if not unicodedata.category(c).startswith("C")).strip()
    if base.strip(".") == "":
        return DEFAULT_FILENAME
    if len(base) > FILENAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        base = base[: FILENAME_CHARS - len(ext) - 1] + "." + ext if ext else base[:FILENAME_CHARS]
    return base


def error_type(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status."""
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """A plausible OpenAI error body for a bare HTTP status (used by injected faults)."""
    if status == 429:
        return error_body(
            message or "Rate limit reached for requests. Please try again in 0s.",
            "requests",
            None,
            "rate_limit_exceeded",
        )
    if status == 503:
        return error_body(
            message or "The server is overloaded or not ready yet.",
            "server_error",
            None,
            "service_unavailable",
        )
    if status >= 500:
        return error_body(
            message or "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            "server_error",
        )
    return error_body(
        message or f"Request failed with status {status}.",
        error_type(status),
        None,
        "invalid_request",
    )


def new_id(prefix: str, nbytes: int = 12) -> str:
    """A random object id such as `file-<hex>` or `batch_<hex>`."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


def file_object(
    file_id: str,
    *,
    nbytes: int,
    created_at: int,
    filename: str,
    purpose: str,
    expires_at: int | None,
) -> dict[str, Any]:
    """An `openai.types.FileObject` as JSON."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": nbytes,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": expires_at,
    }


def empty_usage() -> dict[str, Any]:
    """A `BatchUsage` with every count at zero."""
    return usage(0, 0)


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """A `BatchUsage` for the given token totals."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def new_batch(
    batch_id: str,
    *,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    created_at: int,
    metadata: dict[str, str] | None,
) -> dict[str, Any]:
    """A freshly created `openai.types.Batch` (status `validating`) as JSON."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "model": None,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created_at,
        "in_progress_at": None,
        "expires_at": created_at + DAY_S,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "usage": empty_usage(),
        "metadata": metadata,
    }


def batch_errors(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The `errors` field of a failed batch."""
    return {"object": "list", "data": items}


def batch_error(
    code: str, message: str, *, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """One `openai.types.BatchError` item."""
    return {"code": code, "message": message, "param": param, "line": line}


def list_page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A cursor page `{"object": "list", "data", "has_more", "first_id", "last_id"}`."""
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }


def paginate(
    items: list[dict[str, Any]], *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Items following the one with id `after` (all when None), at most `limit`, and has_more.

    An `after` id that is not in the list yields an empty page, as a cursor past the end would.
    """
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            return [], False
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return page, start + limit < len(items)


def output_line(
    custom_id: str, status_code: int, body_json: str, *, line_id: str | None = None
) -> str:
    """One output/error-file line for a request that got an HTTP answer (`error: null`).

    `body_json` is the already serialised response body, spliced in verbatim (embedding bodies
    are large and built as text).
    """
    line_id = line_id or new_id("batch_req_", 16)
    return (
        '{"id":'
        + json.dumps(line_id)
        + ',"custom_id":'
        + json.dumps(custom_id)
        + ',"response":{"status_code":'
        + str(int(status_code))
        + ',"request_id":'
        + json.dumps(new_id("req_", 16))
        + ',"body":'
        + body_json
        + '},"error":null}'
    )


def failed_line(custom_id: str, code: str, message: str) -> str:
    """One error-file line for a non-HTTP failure (`response: null`, `error: {code, message}`)."""
    return json.dumps(
        {
            "id": new_id("batch_req_", 16),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request could not be executed because the batch was cancelled."
