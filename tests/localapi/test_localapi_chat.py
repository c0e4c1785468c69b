"""Chat completions and Responses batches: schema-valid output and text-marker faults."""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any, Literal

import pytest
from openai.lib._pydantic import to_strict_json_schema
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel, Field, ValidationError

from batchyard.localapi.schema_gen import generate_value

if TYPE_CHECKING:
    from conftest import Api


class Entity(BaseModel):
    name: str = Field(min_length=3, max_length=40)
    kind: Literal["person", "place", "thing"]
    score: float = Field(ge=0, le=1)


class Facts(BaseModel):
    title: str
    year: int = Field(ge=1900, le=2030)
    tags: list[str] = Field(min_length=1, max_length=4)
    entities: list[Entity]
    primary: Entity | None
    confident: bool
    note: str | None


SCHEMA = to_strict_json_schema(Facts)
TEXTS = [
    "The harbour bridge opened in nineteen thirty two and changed the city forever.",
    "Marie studied radioactivity in Paris with remarkable persistence.",
    "A small robot vacuum mapped the kitchen before lunch.",
]


def _content(line: dict[str, Any]) -> str:
    return line["response"]["body"]["choices"][0]["message"]["content"]


def test_chat_schema_output_is_valid_and_deterministic(api: Api) -> None:
    assert "$defs" in SCHEMA  # the nested model is a $ref
    lines = [api.chat(f"c{i}", TEXTS[i % 3] + f" item {i}", SCHEMA) for i in range(20)]
    b = api.run(lines, "/v1/chat/completions")
    assert b.status == "completed" and b.request_counts.completed == 20  # type: ignore[union-attr]
    assert b.model == "gpt-4o-mini"
    out = api.by_id(b.output_file_id)
    words = set(re.findall(r"[a-z]+", " ".join(TEXTS).lower()))
    for cid, line in out.items():
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and choice.message.refusal is None
        facts = Facts.model_validate_json(choice.message.content or "")
        assert set(facts.title.split()) <= words | {"item"}, (
            cid,
            facts.title,
        )  # words of the prompt
        assert completion.usage is not None and completion.usage.prompt_tokens > 0
        assert completion.usage.completion_tokens > 0
    assert b.usage is not None
    assert b.usage.output_tokens == sum(
        line["response"]["body"]["usage"]["completion_tokens"] for line in out.values()
    )
    again = api.by_id(api.run(lines, "/v1/chat/completions").output_file_id)
    assert {k: _content(v) for k, v in again.items()} == {k: _content(v) for k, v in out.items()}
    assert len({_content(v) for v in out.values()}) > 1


def test_responses_schema_output_is_valid(api: Api) -> None:
    lines = [api.resp(f"r{i}", TEXTS[i % 3], SCHEMA) for i in range(8)]
    b = api.run(lines, "/v1/responses")
    assert b.status == "completed" and b.request_counts.completed == 8  # type: ignore[union-attr]
    for line in api.lines(b.output_file_id):
        body = line["response"]["body"]
        assert "output_text" not in body  # an SDK convenience, not in the raw body
        resp = Response.model_validate(body)
        assert resp.status == "completed" and resp.id.startswith("resp_")
        msg = resp.output[0]
        assert msg.type == "message" and msg.content[0].type == "output_text"  # type: ignore[union-attr]
        Facts.model_validate_json(resp.output_text)
        assert (
            resp.usage is not None
            and resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
        )


def test_plain_text_and_json_object_without_schema(api: Api) -> None:
    lines = [
        api.chat("plain", "Tell me about tea gardens"),
        api.chat("obj", "Tell me about tea gardens", response_format={"type": "json_object"}),
        api.chat("two", "Tell me about tea gardens", n=2),
    ]
    out = api.by_id(api.run(lines, "/v1/chat/completions").output_file_id)
    assert _content(out["plain"]).startswith("Local answer:")
    assert isinstance(json.loads(_content(out["obj"])), dict)
    assert len(out["two"]["response"]["body"]["choices"]) == 2


def test_chat_text_markers(marked_api: Api) -> None:
    api = marked_api
    kinds = ["refusal", "invalid_json", "schema_violation", "truncated", "error400", "error500"]
    lines = [api.chat(k, f"Some text [[fault:{k}]] here", SCHEMA) for k in kinds]
    lines.append(api.chat("clean", "Some clean text", SCHEMA))
    b = api.run(lines, "/v1/chat/completions")
    assert b.status == "completed"
    assert (b.request_counts.completed, b.request_counts.failed) == (5, 2)  # type: ignore[union-attr]
    out, err = api.by_id(b.output_file_id), api.by_id(b.error_file_id)
    msg = out["refusal"]["response"]["body"]["choices"][0]["message"]
    assert msg["content"] is None and msg["refusal"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(_content(out["invalid_json"]))
    violated = _content(out["schema_violation"])
    json.loads(violated)
    with pytest.raises(ValidationError):
        Facts.model_validate_json(violated)
    trunc = out["truncated"]["response"]["body"]["choices"][0]
    assert trunc["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(trunc["message"]["content"])
    Facts.model_validate_json(_content(out["clean"]))
    for kind, status in (("error400", 400), ("error500", 500)):
        line = err[kind]
        assert line["error"] is None and line["response"]["status_code"] == status
        assert set(line["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    assert err["error400"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert err["error500"]["response"]["body"]["error"]["type"] == "server_error"


def test_responses_text_markers(marked_api: Api) -> None:
    api = marked_api
    lines = [api.resp(k, f"x [[fault:{k}]]", SCHEMA) for k in ("refusal", "truncated", "error400")]
    b = api.run(lines, "/v1/responses")
    out, err = api.by_id(b.output_file_id), api.by_id(b.error_file_id)
    refusal = Response.model_validate(out["refusal"]["response"]["body"])
    assert refusal.output[0].content[0].type == "refusal"  # type: ignore[union-attr]
    trunc = Response.model_validate(out["truncated"]["response"]["body"])
    assert trunc.status == "incomplete" and trunc.incomplete_details is not None
    assert trunc.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(json.JSONDecodeError):
        json.loads(trunc.output_text)
    assert err["error400"]["response"]["status_code"] == 400


def test_embeddings_error_markers_fail_the_whole_request(marked_api: Api) -> None:
    api = marked_api
    lines = [
        api.emb("e400", ["fine", "bad [[fault:error400]]"]),
        api.emb("e500", "bad [[fault:error500]]"),
        api.emb("ok", ["fine", "also fine"]),
    ]
    b = api.run(lines)
    err = api.by_id(b.error_file_id)
    assert {k: v["response"]["status_code"] for k, v in err.items()} == {"e400": 400, "e500": 500}
    assert list(api.by_id(b.output_file_id)) == ["ok"]


def test_markers_are_ignored_unless_turned_on(api: Api) -> None:
    """A chunk's text reaches the server: by default no text can make its request fail."""
    b = api.run(
        [
            api.chat("r", "x [[fault:refusal]]", SCHEMA),
            api.chat("e", "x [[fault:error500]]", SCHEMA),
        ],
        "/v1/chat/completions",
    )
    out = api.by_id(b.output_file_id)
    assert set(out) == {"r", "e"} and b.error_file_id is None
    Facts.model_validate_json(_content(out["r"]))
    e = api.run([api.emb("e500", "bad [[fault:error500]]"), api.emb("e400", ["x", "[[fault:error400]]"])])
    assert set(api.by_id(e.output_file_id)) == {"e500", "e400"} and e.error_file_id is None


def test_schema_generator_covers_keywords() -> None:
    schema = {
        "type": "object",
        "properties": {
            "c": {"const": "fixed"},
            "e": {"enum": [1, 2, 3]},
            "s": {"type": "string", "minLength": 30, "maxLength": 35},
            "short": {"type": "string", "maxLength": 2},
            "i": {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 8},
            "m": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 7},
            "n": {"type": "number", "minimum": -1.5, "maximum": -1.0},
            "arr": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
            "nul": {"type": "null"},
            "multi": {"type": ["string", "null"]},
            "one": {"oneOf": [{"type": "integer"}, {"$ref": "#/definitions/node"}]},
            "date": {"type": "string", "format": "date-time"},
            "tree": {"$ref": "#/definitions/node"},
        },
        "required": [
            "c",
            "e",
            "s",
            "short",
            "i",
            "m",
            "n",
            "arr",
            "nul",
            "multi",
            "one",
            "date",
            "tree",
        ],
        "additionalProperties": False,
        "definitions": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/definitions/node"}},
                },
                "required": ["v", "kids"],
                "additionalProperties": False,
            }
        },
    }
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(30):
        value = generate_value(schema, random.Random(seed), ["alpha", "beta", "gamma"])
        jsonschema.validate(value, schema)
        assert value["c"] == "fixed" and 5 < value["i"] < 8 and value["m"] % 7 == 0
