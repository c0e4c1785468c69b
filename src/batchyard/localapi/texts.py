"""Text extraction from request bodies (fault markers, output seeding); prompt tokens are counted
by `batchyard.prompt_tokens`, as the provider bills them."""

from __future__ import annotations

from typing import Any

from batchyard.prompt_tokens import content_texts


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    """The `input` of an embeddings body as a list of strings (non-strings are skipped)."""
    inp = body.get("input")
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list):
        return [x for x in inp if isinstance(x, str)]
    return []


def _items(endpoint: str, body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """(role, content) pairs of a chat or responses body."""
    if endpoint == "/v1/chat/completions":
        msgs = body.get("messages")
        return (
            [(m.get("role"), m.get("content")) for m in msgs if isinstance(m, dict)]
            if isinstance(msgs, list)
            else []
        )
    inp = body.get("input")
    if isinstance(inp, str):
        return [("user", inp)]
    if isinstance(inp, list):
        return [(it.get("role"), it.get("content")) for it in inp if isinstance(it, dict)]
    return []


def user_text(endpoint: str, body: dict[str, Any]) -> str:
    """The user-supplied text of a request: embeddings inputs, or user-role message texts."""
    if endpoint == "/v1/embeddings":
        return "\n".join(embedding_inputs(body))
    return "\n".join(
        t
        for role, content in _items(endpoint, body)
        if role in (None, "user")
        for t in content_texts(content)
    )
