"""Synthetic chunk corpus for the benchmarks: a Parquet file with the `CHUNKS` schema.

Texts come from `batchyard.seed.generate_chunks` (realistic business text: long-tailed lengths,
boilerplate, non-ASCII), so token counts and JSON escaping behave like real data. The file is
written in row groups of 100k while generating (memory stays flat) and cached as
`benchmarks/.data/chunks-<n>-s<seed>.parquet`; later runs with the same size and seed reuse it.

Usage:
    python benchmarks/data.py --chunks 1000000 [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from batchyard.schemas import CHUNKS
from batchyard.seed import generate_chunks

DATA_DIR = Path(__file__).resolve().parent / ".data"
ROW_GROUP = 100_000


def corpus_path(n_chunks: int, seed: int = 0) -> Path:
    """Where the corpus of this size and seed is cached."""
    return DATA_DIR / f"chunks-{n_chunks}-s{seed}.parquet"


def _frames(n_chunks: int, seed: int) -> Iterator[pl.DataFrame]:
    """The corpus in frames of `ROW_GROUP` rows (CHUNKS schema)."""
    docs = generate_chunks(n_chunks, seed=seed)
    while batch := list(itertools.islice(docs, ROW_GROUP)):
        texts = [d["text"] for d in batch]
        yield pl.DataFrame(
            {
                "chunk_id": [d["_id"] for d in batch],
                "source_id": [repr(d["_id"]) for d in batch],
                "id_kind": ["str"] * len(batch),
                "company_id": [d["company_id"] for d in batch],
                "document_id": [d["document_id"] for d in batch],
                "chunk_index": [d["chunk_index"] for d in batch],
                "text": texts,
                "text_sha256": [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts],
            },
            schema=CHUNKS,
        )


def ensure_corpus(n_chunks: int, seed: int = 0, *, quiet: bool = False) -> Path:
    """Path of the cached corpus, generating it first when missing."""
    path = corpus_path(n_chunks, seed)
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    start = time.perf_counter()
    writer: pq.ParquetWriter | None = None
    try:
        for frame in _frames(n_chunks, seed):
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    if not quiet:
        print(f"generated {path.name} ({n_chunks:,} chunks) in {time.perf_counter() - start:.1f} s")
    return path


def describe(path: Path) -> dict[str, float]:
    """Rows, text bytes and text length percentiles of a corpus file."""
    lengths = pl.read_parquet(path, columns=["text"]).select(
        pl.col("text").str.len_bytes().cast(pl.Int64)
    )["text"]
    return {
        "rows": lengths.len(),
        "text_mb": round(int(lengths.sum()) / 2**20, 1),
        "text_bytes_p50": float(lengths.quantile(0.5) or 0),
        "text_bytes_p99": float(lengths.quantile(0.99) or 0),
        "text_bytes_max": float(lengths.max() or 0),  # type: ignore[arg-type]
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = ensure_corpus(args.chunks, args.seed)
    print(path, describe(path))


if __name__ == "__main__":
    main()
