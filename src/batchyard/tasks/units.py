"""Request units of an inference task: one chunk, or one document assembled from its chunks.

`build_units` is pure: staged chunks in (`batchyard.schemas.CHUNKS`), units and plan rejects out.

- chunk unit: `unit_id` = chunk_id; text over the token budget is truncated on a token boundary.
- document unit: `unit_id` = `document_unit_id(company_id, document_id)`, so that two companies'
  documents of the same name are two units; the document's non-empty chunks, in chunk_index order
  (chunk_id breaks ties), joined with a blank line while they fit in the budget. Chunks past the
  budget are left out and `truncated` is set; if even the first chunk is over budget, it is
  truncated. Empty chunks inside a document are skipped silently (they add nothing).

Rejects (`batchyard.schemas.FAILURES`, stage `plan`):
- `empty_text`: chunk unit with empty/whitespace text; document unit whose chunks all are.
- `missing_document_id`: document unit over chunks without a document_id.
"""

from __future__ import annotations

import hashlib
from typing import Literal
from urllib.parse import quote

import polars as pl

from batchyard.schemas import FAILURES
from batchyard.tokens import count_tokens, truncate_to_tokens

SEPARATOR = "\n\n"

UNITS = pl.Schema(
    {
        "unit_id": pl.String(),
        "company_id": pl.String(),
        "document_id": pl.String(),
        "chunk_ids": pl.List(pl.String()),
        "text": pl.String(),
        "text_sha256": pl.String(),
        "n_tokens": pl.Int64(),
        "truncated": pl.Boolean(),
    }
)


def document_unit_id(company_id: str, document_id: str) -> str:
    """The unit id of a document: `<company>/<document>`, each part percent-encoded.

    Unambiguous (a `/` inside an id is encoded), readable for plain ids, and unique across
    companies: `acme/10-K` and `globex/10-K` are two units.
    """
    return f"{quote(company_id, safe='')}/{quote(document_id, safe='')}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _rejects(frame: pl.DataFrame, code: str, message: str) -> pl.DataFrame:
    """FAILURES rows for the `unit_id` column of `frame`."""
    return frame.select(
        pl.col("unit_id").cast(pl.String),
        pl.lit("plan").alias("stage"),
        pl.lit(code).alias("code"),
        pl.lit(message).alias("message"),
        pl.lit(None, dtype=pl.Int64).alias("attempt"),
        pl.lit(None, dtype=pl.String).alias("batch_id"),
        pl.lit(None, dtype=pl.String).alias("raw"),
    ).cast(dict(FAILURES))  # type: ignore[arg-type]


def _settle_cut(
    parts: list[str], k: int, n_k: int, budget: int, encoding: str
) -> tuple[int, str, int, bool]:
    """Exact greedy cut of one document around the estimate `k` (`n_k`: tokens of that join).

    Returns (chunks kept, text, its tokens, whether the first chunk itself was truncated).
    """

    def count(j: int) -> int:
        return count_tokens([SEPARATOR.join(parts[:j])], encoding)[0]

    n = n_k if k else 0
    while k > 1 and n > budget:
        k -= 1
        n = count(k)
    while k < len(parts):
        n_next = count(k + 1)
        if n_next > budget:
            break
        k, n = k + 1, n_next
    if k == 0 or n > budget:  # even the first chunk is over budget
        text = truncate_to_tokens(parts[0], budget, encoding)
        return 1, text, count_tokens([text], encoding)[0], True
    return k, SEPARATOR.join(parts[:k]), n, False


def build_units(
    chunks: pl.DataFrame,
    unit: Literal["chunk", "document"],
    *,
    token_budget: int,
    encoding: str,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(units, rejects) for a task's unit kind; see the module docstring for the rules."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    blank = pl.col("text").is_null() | (pl.col("text").str.strip_chars().str.len_chars() == 0)
    if unit == "chunk":
        return _chunk_units(chunks, blank, token_budget, encoding)
    if unit == "document":
        return _document_units(chunks, blank, token_budget, encoding)
    raise ValueError(f"unknown unit {unit!r}; expected 'chunk' or 'document'")


def _chunk_units(
    chunks: pl.DataFrame, blank: pl.Expr, budget: int, encoding: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    rejects = _rejects(
        chunks.filter(blank).select(pl.col("chunk_id").alias("unit_id")),
        "empty_text",
        "chunk text is empty or whitespace only",
    )
    kept = chunks.filter(~blank)
    texts = kept.get_column("text").to_list()
    n_tokens = count_tokens(texts, encoding)
    over = [i for i, n in enumerate(n_tokens) if n > budget]
    for i in over:  # only the over-budget chunks are touched in Python
        texts[i] = truncate_to_tokens(texts[i], budget, encoding)
        n_tokens[i] = count_tokens([texts[i]], encoding)[0]
    over_set = set(over)
    units = kept.select(
        pl.col("chunk_id").alias("unit_id"),
        "company_id",
        "document_id",
        pl.concat_list(pl.col("chunk_id")).alias("chunk_ids"),
        pl.Series("text", texts, dtype=pl.String),
        pl.Series("text_sha256", [_sha256(t) for t in texts], dtype=pl.String),
        pl.Series("n_tokens", n_tokens, dtype=pl.Int64),
        pl.Series("truncated", [i in over_set for i in range(len(texts))], dtype=pl.Boolean),
    )
    return units.cast(dict(UNITS)), rejects  # type: ignore[arg-type]


def _document_units(
    chunks: pl.DataFrame, blank: pl.Expr, budget: int, encoding: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    rejects: list[pl.DataFrame] = []
    no_doc = chunks.filter(pl.col("document_id").is_null())
    if no_doc.height:
        rejects.append(
            _rejects(
                no_doc.select(pl.col("chunk_id").alias("unit_id")),
                "missing_document_id",
                "chunk has no document_id, so it cannot be part of a document unit",
            )
        )
    chunks = chunks.filter(pl.col("document_id").is_not_null())
    keys = chunks.select("company_id", "document_id").unique()
    keys = keys.with_columns(
        unit_id=pl.Series(
            [document_unit_id(c, d) for c, d in keys.iter_rows()], dtype=pl.String
        )
    )
    chunks = chunks.join(keys, on=["company_id", "document_id"], how="left")
    doc_has_text = (~blank).any().over("unit_id")
    empty_docs = (
        chunks.filter(~doc_has_text)
        .select("unit_id")
        .unique(maintain_order=True)
    )
    if empty_docs.height:
        rejects.append(
            _rejects(
                empty_docs, "empty_text", "every chunk of the document is empty or whitespace only"
            )
        )

    kept = chunks.filter(~blank).sort(["unit_id", "chunk_index", "chunk_id"], nulls_last=True)
    sep_tokens = count_tokens([SEPARATOR], encoding)[0]
    # running token count of the joined text (estimate: chunk tokens + separator tokens);
    # the exact count of each joined text is checked below
    kept = kept.with_columns(
        pl.Series("n", count_tokens(kept.get_column("text").to_list(), encoding), dtype=pl.Int64)
    ).with_columns(cum=(pl.col("n") + sep_tokens).cum_sum().over("unit_id") - sep_tokens)
    fits_estimate = pl.col("cum") <= budget
    docs = kept.group_by("unit_id", maintain_order=True).agg(
        pl.col("company_id").first(),
        pl.col("document_id").first(),
        pl.col("chunk_id").filter(fits_estimate).alias("chunk_ids"),
        pl.col("text").filter(fits_estimate).str.join(SEPARATOR).alias("text"),
        pl.len().alias("n_chunks"),
    )
    doc_ids = docs.get_column("unit_id").to_list()
    chunk_ids = docs.get_column("chunk_ids").to_list()
    texts = docs.get_column("text").to_list()
    n_chunks = docs.get_column("n_chunks").to_list()
    n_tokens = count_tokens(texts, encoding)
    truncated = [False] * len(doc_ids)
    # The running sum is an estimate (BPE can merge across the separator): settle the cut exactly
    # for the documents that are cut or over budget, usually with one or two counts each.
    fix = [
        i for i in range(len(doc_ids)) if len(chunk_ids[i]) < n_chunks[i] or n_tokens[i] > budget
    ]
    parts_of: dict[str, tuple[list[str], list[str]]] = {}
    if fix:
        cut_docs = kept.filter(pl.col("unit_id").is_in([doc_ids[i] for i in fix]))
        parts_of = {
            d: (ids, parts)
            for d, ids, parts in cut_docs.group_by("unit_id", maintain_order=True)
            .agg("chunk_id", "text")
            .iter_rows()
        }
    for i in fix:
        all_ids, parts = parts_of[doc_ids[i]]
        k, texts[i], n_tokens[i], cut = _settle_cut(
            parts, len(chunk_ids[i]), n_tokens[i], budget, encoding
        )
        chunk_ids[i] = list(all_ids[:k])
        truncated[i] = cut or k < len(all_ids)
    units = pl.DataFrame(
        {
            "unit_id": doc_ids,
            "company_id": docs.get_column("company_id"),
            "document_id": docs.get_column("document_id"),
            "chunk_ids": chunk_ids,
            "text": texts,
            "text_sha256": [_sha256(t) for t in texts],
            "n_tokens": n_tokens,
            "truncated": truncated,
        },
        schema=UNITS,
    )
    reject_frame = pl.concat(rejects) if rejects else FAILURES.to_frame()
    return units, reject_frame
