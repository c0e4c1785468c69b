"""Prompt tokens of a request body, counted as the provider bills them (pure).

Why: the plan's token count is the run's cost estimate, its enqueued-token budget and the
real-time lane's rate; it must be what the provider reports in `usage`, not the length of the
JSON that carries the prompt. Counting a chat or responses body as JSON text counts its keys,
quotes, model name and parameters, and none of OpenAI's per-message tokens: against the local
server, which counted only the message texts, the estimate was 27-48% above the reported usage.

OpenAI counts a chat prompt as its cookbook's `num_tokens_from_messages` does (the notebook
checks it against the API's `usage.prompt_tokens`: 129 for its example on gpt-4-0613): every
message costs 3 tokens plus its role, its content and its name (a name 1 more), and 3 more prime
the reply. A responses body is the same prompt: `instructions` is a system message before
`input` (a string is one user message). A structured-output format (`response_format`, or
`text` in a responses body) is billed as input too; OpenAI renders it in a form it does not
publish, so it counts here as its compact JSON, the one part that stays an approximation.

`prompt_parts` is the rule for one body (the local server reports it as usage); the planner
counts a column of bodies with `prompt_token_counts`, which tokenizes the same texts with
`tokens.token_counts` (a repeated system prompt or schema is counted once, big columns on every
core), so the two agree token for token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np
import polars as pl

from batchyard.tokens import count_tokens, token_counts

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
EMBEDDINGS = "/v1/embeddings"


def content_texts(content: Any) -> list[str]:
    """Texts of a message content: a string, or parts with `text` (input_text, text, ...)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p if isinstance(p, str) else p["text"] for p in content
                if isinstance(p, str) or (isinstance(p, Mapping) and isinstance(p.get("text"), str))]
    return []


def _messages(endpoint: str, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if endpoint == "/v1/chat/completions":
        msgs = body.get("messages")
        return [m for m in msgs if isinstance(m, Mapping)] if isinstance(msgs, list) else []
    out: list[Mapping[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    inp = body.get("input")
    if isinstance(inp, str):
        out.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        out += [it for it in inp if isinstance(it, Mapping)]
    return out


def prompt_parts(endpoint: str, body: Mapping[str, Any]) -> tuple[list[str], int]:
    """(the texts the provider tokenizes for the prompt, the tokens it adds to them).

    Embeddings: each input, nothing added. Chat and responses: per message its role, content
    and name, plus 3 tokens (+1 for a name); 3 priming the reply; the structured-output format
    as compact JSON.
    """
    if endpoint == EMBEDDINGS:
        inp = body.get("input")
        return ([inp] if isinstance(inp, str) else [x for x in inp if isinstance(x, str)]
                if isinstance(inp, list) else []), 0
    texts: list[str] = []
    extra = REPLY_PRIMING
    for msg in _messages(endpoint, body):
        extra += TOKENS_PER_MESSAGE
        if isinstance(msg.get("role"), str):
            texts.append(msg["role"])
        texts += content_texts(msg.get("content"))
        if isinstance(msg.get("name"), str):
            texts.append(msg["name"])
            extra += TOKENS_PER_NAME
    fmt = body.get("response_format") if endpoint == "/v1/chat/completions" else body.get("text")
    if isinstance(fmt, Mapping) and fmt:
        texts.append(msgspec.json.encode(fmt).decode())
    return texts, extra


def prompt_tokens(endpoint: str, body: Mapping[str, Any], encoding: str) -> int:
    """Prompt tokens of one request body (see `prompt_parts`)."""
    texts, extra = prompt_parts(endpoint, body)
    return sum(count_tokens(texts, encoding)) + extra


def prompt_token_counts(bodies: pl.Series, endpoint: str, encoding: str) -> pl.Series:
    """`prompt_tokens` of every JSON body of a column (Int64, same order), tokenized together."""
    decode = msgspec.json.Decoder(dict[str, Any]).decode
    parts = [prompt_parts(endpoint, decode(b)) for b in bodies.to_list()]
    sizes = np.fromiter((len(t) for t, _ in parts), np.int64, count=len(parts))
    texts = pl.Series("text", [t for ts, _ in parts for t in ts], dtype=pl.String)
    counts = token_counts(texts, encoding).to_numpy() if texts.len() else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(parts)), sizes)
    total = np.bincount(rows, weights=counts, minlength=len(parts)).astype(np.int64)
    extra = np.fromiter((e for _, e in parts), np.int64, count=len(parts))
    return pl.Series(bodies.name, total + extra, dtype=pl.Int64)
