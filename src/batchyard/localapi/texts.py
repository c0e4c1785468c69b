"""Text extraction from request bodies (token estimates, fault markers, output seeding)."""

from __future__ import annotations

from typing import Any


def _content_texts(content: Any) -> list[str]:
    """Texts of a message `content`: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


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


def prompt_texts(endpoint: str, body: dict[str, Any]) -> list[str]:
    """Every prompt text of a request (embeddings inputs; all message/input texts + instructions)."""
    if endpoint == "/v1/embeddings":
        return embedding_inputs(body)
    texts = [t for _, content in _items(endpoint, body) for t in _content_texts(content)]
    if isinstance(body.get("instructions"), str):
        texts.append(body["instructions"])
    return texts


def user_text(endpoint: str, body: dict[str, Any]) -> str:
    """The user-supplied text of a request: embeddings inputs, or user-role message texts."""
    if endpoint == "/v1/embeddings":
        return "\n".join(embedding_inputs(body))
    return "\n".join(
        t
        for role, content in _items(endpoint, body)
        if role in (None, "user")
        for t in _content_texts(content)
    )
