"""The inference task contract: what a task module declares and the pure logic shared by all.

A task module under `batchyard.tasks` exposes a module-level `TASK = InferenceTask(...)`; the
registry finds it. Everything here is pure except reading the task's prompt file.

- `request_bodies` builds the exact request body of every unit, vectorised in Polars.
- `parse` turns one response (status code + body) into a `ParseOutcome`; invalid output is an
  outcome with a reason, never an exception.
- `record` maps a validated output to the fields stored in MongoDB.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

import polars as pl
from pydantic import BaseModel, ValidationError

from batchyard.errors import ConfigError
from batchyard.tasks.prompts import PromptTemplate, load_prompt, prompt_path

TUnit = Literal["chunk", "document"]
TEndpoint = Literal["/v1/chat/completions", "/v1/responses"]
TParseStatus = Literal[
    "ok", "http_error", "refusal", "truncated", "invalid_json", "schema_violation", "empty"
]

CHAT: TEndpoint = "/v1/chat/completions"
RESPONSES: TEndpoint = "/v1/responses"
ENDPOINTS: tuple[str, ...] = get_args(TEndpoint)
PARSE_STATUSES: tuple[str, ...] = get_args(TParseStatus)

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_RAW_PREVIEW = 2_000  # characters of output quoted in an error message at most


# --- strict JSON schema (the one place that touches the SDK's private helper) -----------------


@cache
def _strict_schema_json(model: type[BaseModel]) -> str:
    from openai.lib._pydantic import to_strict_json_schema  # private API, wrapped only here

    return json.dumps(to_strict_json_schema(model), separators=(",", ":"), ensure_ascii=False)


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Strict-mode JSON schema of a pydantic model (`additionalProperties: false`, all required)."""
    return copy.deepcopy(json.loads(_strict_schema_json(model)))


# --- parse outcome ---------------------------------------------------------------------------


class Usage(TypedDict):
    """Token usage of one response: input (= chat prompt) and output (= chat completion) tokens.

    A plain dict so callers can `.get()` it and store it as JSON; a value is None when the
    response did not report it.
    """

    input_tokens: int | None
    output_tokens: int | None


def _no_usage() -> Usage:
    return {"input_tokens": None, "output_tokens": None}


@dataclass(frozen=True, slots=True)
class ParseOutcome:
    """The result of parsing one response.

    `status` is one of `PARSE_STATUSES`. Only `ok` carries `parsed` (the validated output as
    JSON-able data). `error` says in words what was wrong for every other status.
    """

    status: TParseStatus
    parsed: dict[str, Any] | None = None
    raw_text: str | None = None
    finish_reason: str | None = None
    refusal: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=_no_usage)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_row(self) -> dict[str, Any]:
        """Flat dict for a results table (`parsed` stays a dict; usage is split in two)."""
        return {
            "status": self.status,
            "parsed": self.parsed,
            "raw_text": self.raw_text,
            "finish_reason": self.finish_reason,
            "refusal": self.refusal,
            "error": self.error,
            "input_tokens": self.usage.get("input_tokens"),
            "output_tokens": self.usage.get("output_tokens"),
        }


def _get(obj: Any, *path: str | int) -> Any:
    """obj[path[0]][path[1]]... or None when any step is missing or of the wrong type."""
    for key in path:
        if isinstance(key, int):
            if not isinstance(obj, list) or not -len(obj) <= key < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[key] if isinstance(key, int) else obj.get(key)
    return obj


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(body: dict[str, Any]) -> Usage:
    u = body.get("usage")
    if not isinstance(u, dict):
        return _no_usage()
    return {
        "input_tokens": _int_or_none(u.get("input_tokens", u.get("prompt_tokens"))),
        "output_tokens": _int_or_none(u.get("output_tokens", u.get("completion_tokens"))),
    }


def _api_error(body: Any) -> str:
    err = _get(body, "error")
    if isinstance(err, dict):
        parts = [str(err[k]) for k in ("type", "code") if err.get(k)]
        msg = err.get("message") or "no message"
        return f"{msg} ({', '.join(parts)})" if parts else str(msg)
    if isinstance(err, str):
        return err
    return "no error details in the response body"


def _preview(text: str) -> str:
    return text if len(text) <= _RAW_PREVIEW else text[:_RAW_PREVIEW] + "…"


def _validation_summary(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    shown = []
    for e in errs[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        shown.append(f"{loc}: {e['msg']}")
    more = f" (+{len(errs) - 5} more)" if len(errs) > 5 else ""
    return f"{len(errs)} validation error(s): " + "; ".join(shown) + more


# --- the task --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceTask:
    """One inference function over chunks or documents.

    Attributes:
        name: task name; also the JSON schema name, so `[a-zA-Z0-9_-]{1,64}`.
        version: hand-bumped code version (bump when the model or parsing changes).
        description: one line for `batchyard tasks` listings.
        unit: `chunk` (one request per chunk) or `document` (chunks joined within a budget).
        output_model: the pydantic model every output is validated into.
        prompt: prompt file path relative to the prompts directory, e.g. `summary/v1.md`.
        endpoint: the endpoint this task uses unless the settings force another.
        collection: MongoDB collection for results (None: the settings' default).
    """

    name: str
    version: str
    description: str
    unit: TUnit
    output_model: type[BaseModel]
    prompt: str
    endpoint: TEndpoint = CHAT
    collection: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"task name {self.name!r} must match [a-zA-Z0-9_-]{{1,64}}")
        if self.unit not in get_args(TUnit):
            raise ConfigError(f"task {self.name}: unit {self.unit!r} is not chunk or document")
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"task {self.name}: endpoint {self.endpoint!r} is not supported")
        if not self.version:
            raise ConfigError(f"task {self.name}: version must not be empty")
        if not (isinstance(self.output_model, type) and issubclass(self.output_model, BaseModel)):
            raise ConfigError(f"task {self.name}: output_model must be a pydantic model class")

    # -- versions and prompt ---------------------------------------------------------------

    def prompt_file(self, prompts_dir: str | Path) -> Path:
        """Absolute path of this task's prompt file."""
        return prompt_path(prompts_dir, self.prompt)

    def content_sha256(self, prompts_dir: str | Path, params: Mapping[str, Any] | None = None) -> str:
        """sha256 over what is sent and what shapes the output.

        That is the system and user templates as sent (literal pieces and placeholder names),
        the structured-output parameter (task name and strict schema), the endpoint and the
        model parameters in `params` (see `model_params`). Not the prompt file's bytes: its
        maintainer notes, comments and whitespace that is not sent do not count.
        """
        params = dict(params or {})
        endpoint = self.resolve_endpoint(params.pop("endpoint", None))
        template = self.load_prompt(prompts_dir)

        def pieces(section: tuple[str | Any, ...]) -> list[Any]:
            return [p if isinstance(p, str) else {"placeholder": p.name} for p in section]

        blob = {"system": pieces(template.system), "user": pieces(template.user), "endpoint": endpoint,
                "output": self.response_format_json(endpoint), "params": params}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def task_version(self, prompts_dir: str | Path, params: Mapping[str, Any] | None = None) -> str:
        """`<version>+<first 12 hex of content_sha256>`, recorded with every result: a new
        version means the same unit would be asked differently, so it is selected again."""
        return f"{self.version}+{self.content_sha256(prompts_dir, params)[:12]}"

    def model_params(self, inference: Any) -> dict[str, Any]:
        """The parameters from `InferenceSettings` that shape this task's requests and output."""
        out = {"model": inference.model, "endpoint": self.resolve_endpoint(inference.endpoint),
               "temperature": inference.temperature, "max_output_tokens": inference.max_output_tokens}
        if self.unit == "document":  # the budget decides which chunks a document unit carries
            out["document_token_budget"] = inference.document_token_budget
        return out

    def load_prompt(self, prompts_dir: str | Path) -> PromptTemplate:
        """The parsed prompt template (raises `PromptError` if malformed)."""
        return load_prompt(prompts_dir, self.prompt)

    def resolve_endpoint(self, override: str | None = None) -> TEndpoint:
        """The endpoint to use: the override if given, else the task's own."""
        ep = override or self.endpoint
        if ep not in ENDPOINTS:
            raise ConfigError(f"task {self.name}: endpoint {ep!r} is not one of {ENDPOINTS}")
        return ep  # type: ignore[return-value]

    # -- schema and requests ---------------------------------------------------------------

    def json_schema(self) -> dict[str, Any]:
        """Strict JSON schema of `output_model` (a fresh copy each call)."""
        return strict_json_schema(self.output_model)

    def response_format_json(self, endpoint: str | None = None) -> str:
        """The compact JSON of the structured-output parameter for an endpoint.

        Chat: the value of `response_format`. Responses: the value of `text`.
        """
        schema = _strict_schema_json(self.output_model)
        name = json.dumps(self.name)
        if self.resolve_endpoint(endpoint) == CHAT:
            return (
                f'{{"type":"json_schema","json_schema":{{"name":{name},'
                f'"schema":{schema},"strict":true}}}}'
            )
        return (
            f'{{"format":{{"type":"json_schema","name":{name},"schema":{schema},"strict":true}}}}'
        )

    def request_bodies(
        self,
        units: pl.DataFrame,
        *,
        model: str,
        endpoint: str | None,
        temperature: float | None,
        max_output_tokens: int,
        prompts_dir: str | Path,
    ) -> pl.DataFrame:
        """One request body per unit: columns `unit_id` and `body` (compact JSON).

        `units` needs `unit_id` and the columns the prompt uses (`text`, `company_id`,
        `document_id`). Built vectorised with one `pl.concat_str` per body: everything that is
        the same for every row (model, the template's literal text, parameters, the strict
        schema) is JSON-encoded once in Python; the unit columns are JSON-escaped by Polars
        (`struct.json_encode` of a one-field struct) and spliced in between. Values are never
        interpreted. `temperature=None` leaves the field out (for models that reject it).
        """
        ep = self.resolve_endpoint(endpoint)
        template = self.load_prompt(prompts_dir)
        missing = sorted({"unit_id", *template.placeholders} - set(units.columns))
        if missing:
            raise ConfigError(f"task {self.name}: units frame lacks column(s) {missing}")
        params = "" if temperature is None else f',"temperature":{json.dumps(float(temperature))}'
        fragments: list[str | pl.Expr] = [f'{{"model":{json.dumps(model, ensure_ascii=False)},']
        if ep == CHAT:
            fragments += ['"messages":[{"role":"system","content":', *template.system_json()]
            fragments += ['},{"role":"user","content":', *template.user_json(), "}]"]
            params += f',"max_completion_tokens":{int(max_output_tokens)}'
            params += f',"response_format":{self.response_format_json(ep)}}}'
        else:
            fragments += ['"instructions":', *template.system_json()]
            fragments += [',"input":', *template.user_json()]
            params += f',"max_output_tokens":{int(max_output_tokens)}'
            params += f',"text":{self.response_format_json(ep)}}}'
        fragments.append(params)
        body = pl.concat_str(
            [pl.lit(f, dtype=pl.String) if isinstance(f, str) else f for f in fragments]
        )
        return units.select(pl.col("unit_id").cast(pl.String), body.alias("body"))

    # -- responses -------------------------------------------------------------------------

    def parse(
        self, endpoint: str, status_code: int | None, body: dict[str, Any] | None
    ) -> ParseOutcome:
        """Parse one response body of `endpoint` into a `ParseOutcome`.

        Never raises for anything in the response; an endpoint other than the two supported
        ones is a caller error (`ConfigError`).
        """
        ep = self.resolve_endpoint(endpoint)
        try:
            return self._parse(ep, status_code, body)
        except Exception as exc:  # a malformed body is an outcome, not a crash
            return ParseOutcome("empty", error=f"unreadable response body: {exc!r}")

    def _parse(self, ep: TEndpoint, status_code: int | None, body: Any) -> ParseOutcome:
        if status_code is not None and not 200 <= status_code < 300:
            usage = _usage(body) if isinstance(body, dict) else _no_usage()
            return ParseOutcome(
                "http_error", error=f"HTTP {status_code}: {_api_error(body)}", usage=usage
            )
        if not isinstance(body, dict):
            return ParseOutcome("empty", error="no response body")
        usage = _usage(body)
        if ep == CHAT:
            text, refusal, finish = self._chat_output(body)
            truncated = finish == "length"
            filtered = finish == "content_filter"
        else:
            status = body.get("status")
            if status == "failed" or body.get("error"):
                return ParseOutcome(
                    "http_error", error=f"response failed: {_api_error(body)}", usage=usage
                )
            text, refusal = self._responses_output(body)
            reason = _get(body, "incomplete_details", "reason")
            finish = reason if status == "incomplete" and reason else status
            truncated = status == "incomplete" and reason != "content_filter"
            filtered = status == "incomplete" and reason == "content_filter"
        common: dict[str, Any] = {"raw_text": text, "finish_reason": finish, "usage": usage}
        if refusal:
            return ParseOutcome(
                "refusal", refusal=refusal, error=f"model refused: {refusal}", **common
            )
        if filtered:
            return ParseOutcome(
                "refusal",
                refusal="content_filter",
                error="output was blocked by the content filter",
                **common,
            )
        if truncated:
            return ParseOutcome(
                "truncated",
                error=f"output was cut off (finish reason {finish!r}); raise max_output_tokens",
                **common,
            )
        if text is None or not text.strip():
            return ParseOutcome("empty", error="the response has no output text", **common)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return ParseOutcome(
                "invalid_json",
                error=f"output is not valid JSON: {exc.msg} at line {exc.lineno} column "
                f"{exc.colno} (char {exc.pos}): {_preview(text)!r}",
                **common,
            )
        try:
            model = self.output_model.model_validate(data)
        except ValidationError as exc:
            return ParseOutcome(
                "schema_violation",
                error=f"output does not match {self.output_model.__name__}: "
                + _validation_summary(exc),
                **common,
            )
        return ParseOutcome("ok", parsed=model.model_dump(mode="json"), **common)

    @staticmethod
    def _chat_output(body: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
        choice = _get(body, "choices", 0)
        if not isinstance(choice, dict):
            return None, None, None
        content = _get(choice, "message", "content")
        refusal = _get(choice, "message", "refusal")
        finish = choice.get("finish_reason")
        return (
            content if isinstance(content, str) else None,
            refusal if isinstance(refusal, str) and refusal else None,
            finish if isinstance(finish, str) else None,
        )

    @staticmethod
    def _responses_output(body: dict[str, Any]) -> tuple[str | None, str | None]:
        texts: list[str] = []
        refusals: list[str] = []
        output = body.get("output")
        for item in output if isinstance(output, list) else []:
            if not isinstance(item, dict) or item.get("type") != "message":
                continue
            content = item.get("content")
            for part in content if isinstance(content, list) else []:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal" and part.get("refusal"):
                    refusals.append(str(part["refusal"]))
        return ("".join(texts) if texts else None), ("\n".join(refusals) or None)

    # -- sink ------------------------------------------------------------------------------

    def record(self, parsed: dict[str, Any]) -> dict[str, Any]:
        """Fields stored in MongoDB for one validated output (default: the output itself).

        Subclass `InferenceTask` and override to reshape.
        """
        return dict(parsed)
