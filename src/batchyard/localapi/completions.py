"""Simulated chat completions / responses: deterministic, schema-valid answers and their bodies."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from batchyard.localapi import shapes
from batchyard.localapi.faults import find_marker, strip_markers
from batchyard.localapi.schema_gen import generate_value, violate, words_from
from batchyard.localapi.texts import user_text

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


def dumps(obj: Any) -> str:
    """Compact JSON (the form used in output files)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


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
    endpoint: str, body: dict[str, Any], *, choice: int = 0, text_markers: bool
) -> Completion:
    """Deterministic answer honouring the output format, seeded by the prompt and `choice`.

    The answer depends on the request body alone (like a model at temperature 0), so the same
    body gets the same answer in a batch and on the synchronous endpoint.
    """
    prompt = user_text(endpoint, body)
    marker = find_marker(prompt) if text_markers else None
    if marker == "refusal":
        return Completion(None, REFUSAL_TEXT)
    material = f"{choice}\x00" + dumps(body.get("messages") or body.get("input") or "")
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
