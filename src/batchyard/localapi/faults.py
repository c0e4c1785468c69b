"""Pure helpers of fault injection: text markers and deterministic per-request draws."""

from __future__ import annotations

import hashlib
import re

MARKER_KINDS = ("error400", "error500", "refusal", "truncated", "invalid_json", "schema_violation")
"""Marker kinds in precedence order (the first one found in a text wins)."""

_MARKER = re.compile(r"\[\[fault:([a-z0-9_]+)\]\]")


def find_marker(text: str) -> str | None:
    """The highest-precedence `[[fault:<kind>]]` marker in `text`, or None."""
    found = set(_MARKER.findall(text))
    for kind in MARKER_KINDS:
        if kind in found:
            return kind
    return None


def strip_markers(text: str) -> str:
    """`text` without fault markers."""
    return _MARKER.sub(" ", text)


def unit_draw(seed: int, key: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) from (seed, key, salt)."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def request_error_hit(seed: int, custom_id: str, rate: float, batch_id: str | None = None) -> bool:
    """Whether the request-error fault hits this custom_id.

    Sticky (no `batch_id`): the same custom_id fails in every batch. Otherwise the draw also
    depends on the batch, so a retry in a new batch gets a fresh chance, like a real transient error.
    """
    key = custom_id if batch_id is None else f"{batch_id}\x00{custom_id}"
    return rate > 0 and unit_draw(seed, key, "request_error") < rate
