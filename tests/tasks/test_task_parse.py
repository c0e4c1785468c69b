"""Parsing responses of both endpoints into outcomes; invalid output never raises."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from batchyard.errors import ConfigError
from batchyard.tasks import PARSE_STATUSES, ParseOutcome, get_task

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"

GOOD_CLASSIFY = {
    "section_type": "financial_results",
    "topics": ["revenue", "profitability", "revenue"],
    "confidence": 0.92,
    "rationale": "Reports Q3 revenue and margin versus last year.",
}
GOOD_SUMMARY = {
    "summary": "Q3 2025 results. Revenue grew. Margin expanded. Guidance raised.",
    "key_figures": [
        {
            "name": "Revenue",
            "value": 1.2,
            "unit": "EUR billion",
            "period": "Q3 2025",
            "context": "up 8% y/y",
        },
        {
            "name": "Net loss",
            "value": -30,
            "unit": "EUR million",
            "period": None,
            "context": "narrowed",
        },
    ],
    "outlook": "positive",
    "notable_events": ["Acquired Beta GmbH in July 2025."],
}


def chat_body(
    content: str | None,
    *,
    finish: str = "stop",
    refusal: str | None = None,
) -> dict[str, Any]:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4.1-mini-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 812, "completion_tokens": 64, "total_tokens": 876},
    }
    ChatCompletion.model_validate(body)  # the fixture is a real chat completion shape
    return body


def responses_body(
    parts: list[dict[str, Any]],
    *,
    status: str = "completed",
    reason: str | None = None,
    reasoning: bool = False,
) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append({"id": "rs_1", "type": "reasoning", "summary": []})
    output.append(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": parts,
        }
    )
    body = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_700_000_000,
        "model": "gpt-4.1-mini-2025-04-14",
        "status": status,
        "incomplete_details": {"reason": reason} if reason else None,
        "error": None,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 2048,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 300,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 2348,
        },
    }
    Response.model_validate(body)  # the fixture is a real Responses API shape
    return body


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def test_chat_ok() -> None:
    out = get_task("classify").parse(CHAT, 200, chat_body(json.dumps(GOOD_CLASSIFY)))
    assert out.status == "ok" and out.ok
    assert out.parsed == {**GOOD_CLASSIFY, "topics": ["revenue", "profitability"]}
    assert out.error is None and out.refusal is None
    assert out.finish_reason == "stop"
    assert out.raw_text == json.dumps(GOOD_CLASSIFY)
    assert out.usage == {"input_tokens": 812, "output_tokens": 64}
    assert get_task("classify").record(out.parsed) == out.parsed


def test_responses_ok_skips_reasoning_items() -> None:
    text = json.dumps(GOOD_SUMMARY)
    body = responses_body([text_part(text[:40]), text_part(text[40:])], reasoning=True)
    out = get_task("summary").parse(RESPONSES, 200, body)
    assert out.status == "ok", out.error
    assert out.parsed == GOOD_SUMMARY
    assert out.raw_text == text
    assert out.finish_reason == "completed"
    assert out.usage == {"input_tokens": 2048, "output_tokens": 300}


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
def test_invalid_json(endpoint: str) -> None:
    raw = '{"section_type": "guidance", "topics": [revenue]}'
    body = chat_body(raw) if endpoint == CHAT else responses_body([text_part(raw)])
    out = get_task("classify").parse(endpoint, 200, body)
    assert out.status == "invalid_json"
    assert out.parsed is None and out.raw_text == raw
    assert "not valid JSON" in out.error and "line 1 column 41 (char 40)" in out.error


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
def test_schema_violation(endpoint: str) -> None:
    bad = {**GOOD_CLASSIFY, "section_type": "weather", "confidence": 1.7, "extra": 1}
    raw = json.dumps(bad)
    body = chat_body(raw) if endpoint == CHAT else responses_body([text_part(raw)])
    out = get_task("classify").parse(endpoint, 200, body)
    assert out.status == "schema_violation"
    assert out.parsed is None and out.raw_text == raw
    assert "ChunkClassification" in out.error
    for field in ("section_type", "confidence", "extra"):
        assert field in out.error
    missing = get_task("risks").parse(
        endpoint, 200, chat_body("{}") if endpoint == CHAT else responses_body([text_part("{}")])
    )
    assert missing.status == "schema_violation" and "risk_factors: Field required" in missing.error


def test_nested_schema_violation_names_the_path() -> None:
    bad = {
        "risk_factors": [
            {
                "category": "market",
                "description": "d",
                "severity": "extreme",
                "likelihood": "high",
                "quote": "q",
            }
        ],
        "entities": [],
    }
    out = get_task("risks").parse(CHAT, 200, chat_body(json.dumps(bad)))
    assert out.status == "schema_violation"
    assert "risk_factors.0.severity" in out.error


def test_refusals() -> None:
    out = get_task("risks").parse(CHAT, 200, chat_body(None, refusal="I can't help with that."))
    assert out.status == "refusal" and out.refusal == "I can't help with that."
    assert "refused" in out.error and out.parsed is None
    body = responses_body([{"type": "refusal", "refusal": "No."}])
    out = get_task("summary").parse(RESPONSES, 200, body)
    assert out.status == "refusal" and out.refusal == "No."
    out = get_task("classify").parse(CHAT, 200, chat_body(None, finish="content_filter"))
    assert out.status == "refusal" and out.refusal == "content_filter"
    body = responses_body([text_part('{"summ')], status="incomplete", reason="content_filter")
    out = get_task("summary").parse(RESPONSES, 200, body)
    assert out.status == "refusal" and out.finish_reason == "content_filter"


def test_truncated() -> None:
    partial = json.dumps(GOOD_CLASSIFY)[:30]
    out = get_task("classify").parse(CHAT, 200, chat_body(partial, finish="length"))
    assert out.status == "truncated"
    assert out.finish_reason == "length" and out.raw_text == partial
    assert "max_output_tokens" in out.error
    body = responses_body([text_part(partial)], status="incomplete", reason="max_output_tokens")
    out = get_task("summary").parse(RESPONSES, 200, body)
    assert out.status == "truncated" and out.finish_reason == "max_output_tokens"
    assert out.usage["output_tokens"] == 300


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
def test_http_errors(endpoint: str) -> None:
    body = {
        "error": {
            "message": "Invalid schema for response_format",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "invalid_json_schema",
        }
    }
    out = get_task("classify").parse(endpoint, 400, body)
    assert out.status == "http_error"
    assert (
        "HTTP 400" in out.error
        and "Invalid schema" in out.error
        and "invalid_json_schema" in out.error
    )
    out = get_task("classify").parse(endpoint, 500, None)
    assert out.status == "http_error" and "HTTP 500" in out.error


def test_responses_failed_status_is_an_error() -> None:
    body = responses_body([], status="failed")
    body["error"] = {"code": "server_error", "message": "The model failed."}
    out = get_task("summary").parse(RESPONSES, 200, body)
    assert out.status == "http_error" and "The model failed." in out.error


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT, None),
        (CHAT, {}),
        (CHAT, {"choices": []}),
        (CHAT, {"choices": "nonsense"}),
        (CHAT, {"choices": [{"message": None, "finish_reason": "stop"}]}),
        (RESPONSES, {"output": []}),
        (RESPONSES, {"output": [{"type": "message", "content": None}]}),
        (
            RESPONSES,
            {"output": [{"type": "message", "content": [{"type": "output_text", "text": 5}]}]},
        ),
        (RESPONSES, {"output": "garbage", "usage": "garbage"}),
    ],
)
def test_empty_and_malformed_bodies(endpoint: str, body: Any) -> None:
    out = get_task("classify").parse(endpoint, 200, body)
    assert out.status == "empty"
    assert out.error and out.parsed is None


@pytest.mark.parametrize("content", ["", "   \n "])
def test_empty_content(content: str) -> None:
    out = get_task("classify").parse(CHAT, 200, chat_body(content))
    assert out.status == "empty" and out.raw_text == content
    out = get_task("summary").parse(RESPONSES, 200, responses_body([text_part(content)]))
    assert out.status == "empty"


def test_unknown_endpoint_is_a_caller_error() -> None:
    with pytest.raises(ConfigError):
        get_task("classify").parse("/v1/embeddings", 200, {})


def test_outcome_row_and_statuses() -> None:
    assert set(PARSE_STATUSES) == {
        "ok",
        "http_error",
        "refusal",
        "truncated",
        "invalid_json",
        "schema_violation",
        "empty",
    }
    row = ParseOutcome("ok", parsed={"a": 1}).as_row()
    assert list(row) == [
        "status",
        "parsed",
        "raw_text",
        "finish_reason",
        "refusal",
        "error",
        "input_tokens",
        "output_tokens",
    ]
    assert row["input_tokens"] is None and row["output_tokens"] is None
    bad = get_task("classify").parse(RESPONSES, 200, {"output": [], "usage": "garbage"})
    assert bad.usage == {"input_tokens": None, "output_tokens": None}
