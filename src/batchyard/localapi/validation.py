"""Validation of a batch input file, like OpenAI's `validating` step (pure: bytes in, result out).

Errors carry OpenAI's codes where they are known (`invalid_json_line`, `duplicate_custom_id`,
`url_mismatch`, `model_mismatch`, `empty_file`, `too_many_tasks`, `missing_required_parameter`)
and a 1-based `line`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchyard.localapi import shapes
from batchyard.localapi.texts import embedding_inputs
from batchyard.prompt_tokens import prompt_tokens
from batchyard.tokens import count_tokens, encoding_for_model

MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 50_000
MAX_INPUTS_PER_REQUEST = 2_048
MAX_TOKENS_PER_INPUT = 8_192
MAX_TOKENS_PER_EMBEDDING_REQUEST = 300_000
MAX_ERRORS = 100
"""Validation stops recording errors after this many (the batch fails anyway)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a request line or body (OpenAI's own
structured-output schemas nest far less); deeper JSON is refused as invalid, never parsed on into
a recursion error."""


class JsonTooDeep(ValueError):
    """JSON nested deeper than MAX_JSON_DEPTH."""

    def __init__(self) -> None:
        super().__init__(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")


def load_json(raw: bytes | str) -> Any:
    """`json.loads`, refusing JSON nested deeper than MAX_JSON_DEPTH.

    Raises:
        JsonTooDeep: too deep (also when the parser itself runs out of recursion).
        ValueError: not JSON.
    """
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise JsonTooDeep() from None
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            raise JsonTooDeep()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return obj


@dataclass
class RequestLine:
    """One valid request of the input file."""

    index: int
    """Position among the file's requests (0-based)."""
    line: int
    """Line number in the file (1-based)."""
    custom_id: str
    body: dict[str, Any]
    prompt_tokens: int = 0


@dataclass
class ValidationResult:
    """Outcome of validating one input file."""

    requests: list[RequestLine] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None

    @property
    def ok(self) -> bool:
        """True when the batch may run."""
        return not self.errors

    @property
    def total_tokens(self) -> int:
        """Enqueued-token estimate of the batch (sum of prompt tokens)."""
        return sum(r.prompt_tokens for r in self.requests)


class _Errors:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(
        self, code: str, message: str, *, param: str | None = None, line: int | None = None
    ) -> None:
        if len(self.items) < MAX_ERRORS:
            self.items.append(shapes.batch_error(code, message, param=param, line=line))


def _check_line(
    obj: Any, lineno: int, endpoint: str, errs: _Errors
) -> tuple[str, dict[str, Any]] | None:
    """Envelope checks of one parsed line; (custom_id, body) when it passes."""
    if not isinstance(obj, dict):
        errs.add("invalid_json_line", "Each line must be a JSON object.", line=lineno)
        return None
    ok = True
    for name in ("custom_id", "method", "url", "body"):
        if name not in obj or obj[name] is None:
            errs.add(
                "missing_required_parameter",
                f"Missing required parameter: '{name}'.",
                param=name,
                line=lineno,
            )
            ok = False
    if not ok:
        return None
    custom_id, method, url, body = obj["custom_id"], obj["method"], obj["url"], obj["body"]
    if not isinstance(custom_id, str) or not custom_id:
        errs.add(
            "invalid_value",
            "Invalid 'custom_id': expected a non-empty string.",
            param="custom_id",
            line=lineno,
        )
        ok = False
    if method != "POST":
        errs.add(
            "invalid_value",
            f"Invalid value for 'method': {shapes.shown(method)}. Only 'POST' is supported.",
            param="method",
            line=lineno,
        )
        ok = False
    if url != endpoint:
        errs.add(
            "url_mismatch",
            f"The URL provided for this request ({shapes.shown(url)}) does not match the batch endpoint ({shapes.shown(endpoint)}).",
            param="url",
            line=lineno,
        )
        ok = False
    if not isinstance(body, dict):
        errs.add(
            "invalid_value", "Invalid 'body': expected a JSON object.", param="body", line=lineno
        )
        ok = False
    elif not isinstance(body.get("model"), str) or not body.get("model"):
        errs.add(
            "missing_required_parameter",
            "Missing required parameter: 'body.model'.",
            param="body.model",
            line=lineno,
        )
        ok = False
    return (custom_id, body) if ok else None


def _check_body(endpoint: str, body: dict[str, Any], lineno: int, errs: _Errors) -> bool:
    """Endpoint-specific shape checks of a request body."""
    if endpoint == "/v1/embeddings":
        inp = body.get("input")
        if inp is None:
            errs.add(
                "missing_required_parameter",
                "Missing required parameter: 'body.input'.",
                param="body.input",
                line=lineno,
            )
            return False
        items = [inp] if isinstance(inp, str) else inp
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            errs.add(
                "invalid_value",
                "Invalid 'input': expected a string or an array of strings.",
                param="body.input",
                line=lineno,
            )
            return False
        if not items:
            errs.add(
                "invalid_value", "Invalid 'input': empty array.", param="body.input", line=lineno
            )
            return False
        if len(items) > MAX_INPUTS_PER_REQUEST:
            errs.add(
                "invalid_value",
                f"Invalid 'input': array too long. Expected an array with maximum length "
                f"{MAX_INPUTS_PER_REQUEST}, but got an array with length {len(items)} instead.",
                param="body.input",
                line=lineno,
            )
            return False
        if any(x == "" for x in items):
            errs.add(
                "invalid_value",
                "Invalid 'input': input strings must not be empty.",
                param="body.input",
                line=lineno,
            )
            return False
        return True
    key = "messages" if endpoint == "/v1/chat/completions" else "input"
    val = body.get(key)
    if val is None:
        errs.add(
            "missing_required_parameter",
            f"Missing required parameter: 'body.{key}'.",
            param=f"body.{key}",
            line=lineno,
        )
        return False
    if key == "messages" and (not isinstance(val, list) or not val):
        errs.add(
            "invalid_value",
            "Invalid 'messages': expected a non-empty array.",
            param="body.messages",
            line=lineno,
        )
        return False
    if key == "input" and not isinstance(val, (str, list)):
        errs.add(
            "invalid_value",
            "Invalid 'input': expected a string or an array.",
            param="body.input",
            line=lineno,
        )
        return False
    return True


def _count_tokens(result: ValidationResult, endpoint: str, errs: _Errors) -> None:
    """Fill `prompt_tokens` of every request; embeddings inputs over the limits are errors."""
    encoding = encoding_for_model(result.model or "")
    if endpoint != "/v1/embeddings":  # as OpenAI bills a prompt: messages, their overhead, the schema
        for req in result.requests:
            req.prompt_tokens = prompt_tokens(endpoint, req.body, encoding)
        return
    total_inputs = 0
    for req in result.requests:
        inputs = embedding_inputs(req.body)
        total_inputs += len(inputs)
        counts = count_tokens(inputs, encoding)
        req.prompt_tokens = sum(counts)
        longest = max(counts, default=0)
        if longest > MAX_TOKENS_PER_INPUT:
            errs.add(
                "invalid_value",
                f"Invalid 'input': input {counts.index(longest)} has {longest} tokens; the maximum "
                f"context length is {MAX_TOKENS_PER_INPUT} tokens.",
                param="body.input",
                line=req.line,
            )
        elif req.prompt_tokens > MAX_TOKENS_PER_EMBEDDING_REQUEST:
            errs.add(
                "invalid_value",
                f"Invalid 'input': the request has {req.prompt_tokens} tokens in total; the maximum "
                f"is {MAX_TOKENS_PER_EMBEDDING_REQUEST} tokens per request.",
                param="body.input",
                line=req.line,
            )
    if total_inputs > MAX_EMBEDDING_INPUTS:
        errs.add(
            "too_many_inputs",
            f"The batch has {total_inputs:,} embedding inputs; /v1/embeddings batches may have at "
            f"most {MAX_EMBEDDING_INPUTS:,} inputs across all requests.",
        )


def validate_input(content: bytes, endpoint: str) -> ValidationResult:
    """Validate a batch input file for `endpoint`; every problem becomes a BatchError item."""
    result = ValidationResult()
    errs = _Errors()
    if len(content) > MAX_FILE_BYTES:
        errs.add(
            "file_too_large", f"The input file is {len(content):,} bytes; the maximum is 200 MB."
        )
        result.errors = errs.items
        return result
    seen: dict[str, int] = {}
    nlines = 0
    for lineno, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        nlines += 1
        try:
            obj = load_json(raw)
        except JsonTooDeep as exc:
            errs.add("invalid_json_line", f"This line is not valid JSON: {exc}.", line=lineno)
            continue
        except ValueError:
            errs.add("invalid_json_line", "This line is not parseable as valid JSON.", line=lineno)
            continue
        checked = _check_line(obj, lineno, endpoint, errs)
        if checked is None:
            continue
        custom_id, body = checked
        if custom_id in seen:
            errs.add(
                "duplicate_custom_id",
                f"The custom_id {shapes.shown(custom_id)} is a duplicate of the one on line {seen[custom_id]}. "
                "The custom_id parameter must be unique for each request in a batch.",
                param="custom_id",
                line=lineno,
            )
            continue
        seen[custom_id] = lineno
        if result.model is None:
            result.model = body["model"]
        elif body["model"] != result.model:
            errs.add(
                "model_mismatch",
                f"The model {shapes.shown(body['model'])} does not match the model {shapes.shown(result.model)} of the other "
                "requests. Each input file may only contain requests for a single model.",
                param="body.model",
                line=lineno,
            )
            continue
        if not _check_body(endpoint, body, lineno, errs):
            continue
        result.requests.append(RequestLine(len(result.requests), lineno, custom_id, body))
    if nlines == 0:
        errs.add("empty_file", "The batch input file is empty.")
    elif nlines > MAX_REQUESTS:
        errs.add(
            "too_many_tasks",
            f"The batch input file has {nlines:,} requests; the maximum is {MAX_REQUESTS:,}.",
        )
    if not errs.items:
        _count_tokens(result, endpoint, errs)
    result.errors = errs.items
    return result


def token_limit_message(model: str, cap: int) -> str:
    """OpenAI's message for a batch refused by the enqueued-token cap."""
    return (
        f"Enqueued token limit reached for {model} in organization org-local. Limit: {cap:,} "
        "enqueued tokens. Please try again once some in_progress batches have been completed."
    )


def validate_body(endpoint: str, body: Any) -> RequestLine:
    """Check one synchronous request body like a batch line's body; its prompt tokens counted.

    Raises:
        shapes.ApiError: 400 in OpenAI's shape for the first problem (the `param` without the
            `body.` prefix a batch line error carries).
    """
    errs = _Errors()
    if not isinstance(body, dict):
        errs.add("invalid_value", "The request body must be a JSON object.")
    elif not isinstance(body.get("model"), str) or not body["model"]:
        errs.add("missing_required_parameter", "Missing required parameter: 'model'.", param="model")
    elif _check_body(endpoint, body, 1, errs):
        result = ValidationResult(model=body["model"])
        result.requests.append(RequestLine(0, 1, "sync", body))
        _count_tokens(result, endpoint, errs)
        if not errs.items:
            return result.requests[0]
    first = errs.items[0]
    param = first["param"].removeprefix("body.") if first["param"] else None
    message = first["message"].replace("'body.", "'")
    raise shapes.ApiError(400, message, param=param, code=first["code"])
