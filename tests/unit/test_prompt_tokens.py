"""Prompt tokens as the provider bills them: OpenAI's own published count, both endpoints, a column."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from batchyard.prompt_tokens import prompt_parts, prompt_token_counts, prompt_tokens
from batchyard.tasks import get_task
from batchyard.tokens import count_tokens

CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"
PROMPTS = Path(__file__).resolve().parents[2] / "prompts"

# OpenAI cookbook, "How to count tokens with tiktoken": the API reported 129 prompt tokens for
# these messages on gpt-4-0613 and gpt-3.5-turbo-0613 (cl100k_base)
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
                                  "into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do "
                                                               "better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]


def test_a_chat_prompt_counts_what_openai_reported() -> None:
    body = {"model": "gpt-4", "messages": COOKBOOK, "temperature": 0, "max_tokens": 1}
    assert prompt_tokens(CHAT, body, "cl100k_base") == 129


def test_a_responses_prompt_is_the_same_prompt_and_the_schema_counts_as_its_json() -> None:
    fmt = {"type": "json_schema", "name": "verdict", "strict": True,
           "schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                      "additionalProperties": False}}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Revenue rose 5%."}]}
    responses = {"model": "gpt-4o-mini", "instructions": "Be brief.", "input": "Revenue rose 5%."}
    plain = prompt_tokens(CHAT, chat, "o200k_base")
    assert plain == prompt_tokens(RESPONSES, responses, "o200k_base")
    assert plain == 2 * 3 + 3 + sum(count_tokens(["system", "Be brief.", "user", "Revenue rose 5%."], "o200k_base"))
    schema = count_tokens([json.dumps(fmt, separators=(",", ":"))], "o200k_base")[0]
    assert prompt_tokens(RESPONSES, {**responses, "text": fmt}, "o200k_base") == plain + schema
    parts = [{"type": "input_text", "text": "Revenue rose 5%."}]
    as_items = {**responses, "input": [{"role": "user", "content": parts}]}
    assert prompt_tokens(RESPONSES, as_items, "o200k_base") == plain
    assert prompt_parts("/v1/embeddings", {"input": ["a", "b"]}) == (["a", "b"], 0)


def test_a_column_of_task_bodies_counts_each_body_as_the_server_does() -> None:
    for name in ("classify", "summary"):
        task = get_task(name)
        units = pl.DataFrame({"unit_id": ["u1", "u2", "u3"], "company_id": ["acme"] * 3, "document_id": ["d"] * 3,
                              "text": ["Revenue grew 8% to $1.2 billion.", "Café margins — ünchanged.", ""]})
        bodies = task.request_bodies(units, model="gpt-4.1-mini", endpoint=None, temperature=0.0,
                                     max_output_tokens=300, prompts_dir=PROMPTS)["body"]
        counts = prompt_token_counts(bodies, task.endpoint, "o200k_base").to_list()
        assert counts == [prompt_tokens(task.endpoint, json.loads(b), "o200k_base") for b in bodies]
        # neither the JSON around the prompt nor the model and its parameters are billed
        assert all(c < n for c, n in zip(counts, count_tokens(bodies.to_list(), "o200k_base"), strict=True))
