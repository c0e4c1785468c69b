"""Strict schemas and request bodies for both endpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params as responses_params
from pydantic import TypeAdapter
from task_helpers import units_frame

from batchyard.errors import ConfigError
from batchyard.tasks import get_task, list_tasks

ROWS = [
    {
        "unit_id": "c1",
        "company_id": "acme",
        "document_id": "d1",
        "text": "Revenue grew 5% to EUR 10m.",
    },
    {"unit_id": "c2", "company_id": "acme", "document_id": "d1", "text": 'He said "no" \\ {x}\n'},
    {"unit_id": "c3", "company_id": "beta", "document_id": "d2", "text": "Größe 📈"},
]


def _walk_objects(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append((path, node))
        for key, value in node.items():
            found += _walk_objects(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _walk_objects(value, f"{path}[{i}]")
    return found


def test_json_schemas_are_strict() -> None:
    for task in list_tasks():
        schema = task.json_schema()
        objects = _walk_objects(schema)
        assert objects and objects[0][0] == "$", task.name
        if task.name in ("summary", "risks"):
            assert len(objects) >= 2, task.name  # nested models are checked too
        for path, obj in objects:
            assert obj.get("additionalProperties") is False, (task.name, path)
            assert set(obj.get("required", [])) == set(obj["properties"]), (task.name, path)
        text = json.dumps(schema)
        assert '"default"' not in text  # strict mode rejects defaults
        assert schema is not task.json_schema()  # callers get their own copy


def test_schemas_carry_the_enums_and_bounds() -> None:
    classify = get_task("classify").json_schema()
    props = classify["properties"]
    assert "boilerplate" in props["section_type"]["enum"]
    assert props["topics"]["minItems"] == 1 and props["topics"]["maxItems"] == 5
    assert props["confidence"]["minimum"] == 0 and props["confidence"]["maximum"] == 1
    risks = get_task("risks").json_schema()
    risk = risks["$defs"]["RiskFactor"]["properties"]
    assert "supply_chain" in risk["category"]["enum"]
    assert risk["severity"]["enum"] == ["low", "medium", "high"]
    summary = get_task("summary").json_schema()
    assert summary["properties"]["outlook"]["enum"] == [
        "positive",
        "neutral",
        "negative",
        "mixed",
        "not_stated",
    ]
    assert summary["$defs"]["KeyFigure"]["properties"]["value"]["type"] == "number"


def _bodies(
    task_name: str, endpoint: str | None, prompts_dir: Path, **kw: Any
) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"model": "gpt-4.1-mini", "temperature": 0.2, "max_output_tokens": 321}
    args.update(kw)
    frame = get_task(task_name).request_bodies(
        units_frame(ROWS), endpoint=endpoint, prompts_dir=prompts_dir, **args
    )
    assert frame.columns == ["unit_id", "body"]
    assert frame.schema["body"] == pl.String
    assert frame["unit_id"].to_list() == [r["unit_id"] for r in ROWS]
    bodies = []
    for raw in frame["body"].to_list():
        body = json.loads(raw)
        assert (
            json.dumps(body, separators=(",", ":"), ensure_ascii=False) == raw
        )  # compact, round-trips
        bodies.append(body)
    return bodies


@pytest.mark.parametrize("task_name", ["summary", "classify", "risks"])
def test_chat_bodies(task_name: str, prompts_dir: Path) -> None:
    task = get_task(task_name)
    for body in _bodies(task_name, "/v1/chat/completions", prompts_dir):
        assert list(body) == [
            "model",
            "messages",
            "temperature",
            "max_completion_tokens",
            "response_format",
        ]
        assert body["model"] == "gpt-4.1-mini"
        assert body["temperature"] == 0.2
        assert body["max_completion_tokens"] == 321
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": task.name, "schema": task.json_schema(), "strict": True},
        }


@pytest.mark.parametrize("task_name", ["summary", "classify", "risks"])
def test_responses_bodies(task_name: str, prompts_dir: Path) -> None:
    task = get_task(task_name)
    for row, body in zip(ROWS, _bodies(task_name, "/v1/responses", prompts_dir), strict=True):
        assert list(body) == [
            "model",
            "instructions",
            "input",
            "temperature",
            "max_output_tokens",
            "text",
        ]
        assert body["max_output_tokens"] == 321
        assert row["text"] in body["input"]
        assert body["instructions"].startswith("You are")
        assert body["text"] == {
            "format": {
                "type": "json_schema",
                "name": task.name,
                "schema": task.json_schema(),
                "strict": True,
            }
        }


def test_default_endpoint_is_the_tasks_own(prompts_dir: Path) -> None:
    assert "text" in _bodies("summary", None, prompts_dir)[0]
    assert "response_format" in _bodies("classify", None, prompts_dir)[0]


def test_temperature_none_is_left_out(prompts_dir: Path) -> None:
    body = _bodies("classify", None, prompts_dir, temperature=None, model="o4-mini")[0]
    assert "temperature" not in body
    assert body["model"] == "o4-mini"


def test_empty_units_give_empty_bodies(prompts_dir: Path) -> None:
    out = get_task("risks").request_bodies(
        units_frame([]),
        model="m",
        endpoint=None,
        temperature=0.0,
        max_output_tokens=5,
        prompts_dir=prompts_dir,
    )
    assert out.height == 0 and out.columns == ["unit_id", "body"]


def test_missing_columns_and_bad_endpoint_are_config_errors(prompts_dir: Path) -> None:
    task = get_task("classify")
    with pytest.raises(ConfigError, match="company_id"):
        task.request_bodies(
            pl.DataFrame({"unit_id": ["a"], "text": ["t"], "document_id": ["d"]}),
            model="m",
            endpoint=None,
            temperature=0.0,
            max_output_tokens=5,
            prompts_dir=prompts_dir,
        )
    with pytest.raises(ConfigError, match="endpoint"):
        task.request_bodies(
            units_frame(ROWS),
            model="m",
            endpoint="/v1/embeddings",
            temperature=0.0,
            max_output_tokens=5,
            prompts_dir=prompts_dir,
        )


def test_bodies_match_openai_request_types(prompts_dir: Path) -> None:
    chat_keys = set(chat_params.CompletionCreateParamsBase.__annotations__)
    responses_keys = set(responses_params.ResponseCreateParamsBase.__annotations__)
    chat_adapter = TypeAdapter(chat_params.CompletionCreateParamsNonStreaming)
    responses_adapter = TypeAdapter(responses_params.ResponseCreateParamsNonStreaming)
    for task in list_tasks():
        chat = _bodies(task.name, "/v1/chat/completions", prompts_dir)[0]
        assert set(chat) <= chat_keys
        chat_adapter.validate_python(chat)
        responses = _bodies(task.name, "/v1/responses", prompts_dir)[0]
        assert set(responses) <= responses_keys
        responses_adapter.validate_python(responses)
    # the check has teeth: a misshapen response_format is rejected
    with pytest.raises(ValueError):
        chat_adapter.validate_python({**chat, "response_format": {"type": "json_schema"}})
