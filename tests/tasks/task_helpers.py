"""Helpers shared by the inference task tests (a uniquely named module, not conftest)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from batchyard.schemas import CHUNKS

REPO_PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


def chunks_frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    """A CHUNKS table from partial rows (id_kind, company_id and text_sha256 filled in)."""
    full = [{"id_kind": "str", "text_sha256": "", "company_id": "acme", **r} for r in rows]
    return pl.DataFrame(full, schema=CHUNKS)


def units_frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    """A minimal units frame for request building."""
    return pl.DataFrame(
        rows,
        schema={
            "unit_id": pl.String,
            "company_id": pl.String,
            "document_id": pl.String,
            "text": pl.String,
        },
    )
