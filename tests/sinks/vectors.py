"""Frames of embedded chunks for the Milvus sink tests (unit vectors, a few companies)."""

from __future__ import annotations

import numpy as np
import polars as pl


def vector_frame(
    n: int,
    *,
    dim: int,
    seed: int = 0,
    companies: int = 3,
    start: int = 0,
    as_list: bool = False,
) -> pl.DataFrame:
    """n rows with the sink's columns (no run_id); chunk ids numbered from `start`."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    idx = range(start, start + n)
    frame = pl.DataFrame(
        {
            "chunk_id": [f"co{i % companies}/doc{i // 10}/{i:05d}" for i in idx],
            "company_id": [f"co{i % companies}" for i in idx],
            "document_id": [f"doc{i // 10}" for i in idx],
            "chunk_index": list(idx),
            "text_sha256": [f"{i:064x}" for i in idx],
        }
    )
    if as_list:
        return frame.with_columns(pl.Series("vector", vectors.tolist(), dtype=pl.List(pl.Float32)))
    return frame.with_columns(pl.Series("vector", vectors, dtype=pl.Array(pl.Float32, dim)))
