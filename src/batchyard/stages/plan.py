"""Plan: turn staged units into Batch API request lines and shards (pure Polars, no I/O).

Embeddings pack many inputs per request; inference sends one unit per request. Both end in the
same request table, which `assign_shards` cuts into batch files under every limit:

- per request (embeddings): at most `max_inputs_per_request` inputs and `max_tokens_per_request`
  tokens; every input non-empty and at most `max_tokens_per_input` tokens (truncated or skipped);
- per shard: at most `max_requests_per_batch` requests, `max_bytes_per_batch * safety_margin`
  bytes, `max_inputs_per_batch` inputs and `max_tokens_per_batch` tokens.

Limits are enforced with running sums: a group keyed by `exclusive_running_sum // (cap - largest
item)` can never exceed `cap` (see `_bucket`). Groups are nested, so each later cut only splits
groups that already satisfy the earlier limits; the cut that usually binds goes first, so shards
stay full. `check_shards` verifies the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from batchyard.schemas import FAILURES
from batchyard.tokens import count_tokens, truncate_to_tokens

if TYPE_CHECKING:
    from batchyard.settings import LimitsSettings

REQUESTS = pl.Schema(
    {
        "custom_id": pl.String,
        "shard": pl.String,
        "attempt": pl.Int64,
        "spent": pl.Int64,  # attempts that used retry budget before this one
        "unit_ids": pl.List(pl.String),
        "n_inputs": pl.Int64,
        "tokens": pl.Int64,
        "bytes": pl.Int64,
        "line": pl.String,
    }
)


@dataclass(frozen=True)
class ShardLimits:
    """The limits one batch file must respect (resolved from `LimitsSettings`)."""

    max_requests: int
    max_bytes: int
    max_inputs: int
    max_tokens: int

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> ShardLimits:
        """Apply the safety margin and the default token cap (the enqueued-token budget)."""
        return cls(
            max_requests=limits.max_requests_per_batch,
            max_bytes=int(limits.max_bytes_per_batch * limits.safety_margin),
            max_inputs=limits.max_inputs_per_batch,
            max_tokens=limits.max_tokens_per_batch or limits.enqueued_token_budget,
        )


def _bucket(values: pl.Expr, cap: int, largest: int, over: list[str]) -> pl.Expr:
    """Group index such that each group's sum of `values` is at most `cap`.

    With `start` the exclusive running sum inside `over`, `start // (cap - largest)` puts items in
    groups whose starts span less than `cap - largest`; the last item adds at most `largest`.
    """
    step = cap - largest
    if step <= 0:  # one item per group
        return pl.int_range(pl.len()).over(over) if over else pl.int_range(pl.len())
    start = values.cast(pl.Int64).cum_sum() - values.cast(pl.Int64)
    if over:
        start = start.over(over)
    return start // step


def _dense_key(cols: list[str]) -> pl.Expr:
    """0, 1, 2, ... for each change of the (already ordered) key columns."""
    changed = pl.any_horizontal([pl.col(c).diff().fill_null(1) != 0 for c in cols])
    return changed.cast(pl.Int64).cum_sum() - 1


def _hash_id(prefix: str, parts: pl.Expr) -> pl.Expr:
    return parts.map_elements(
        lambda s: f"{prefix}-{hashlib.sha256(s.encode()).hexdigest()[:40]}", return_dtype=pl.String
    )


# embeddings


def prepare_inputs(
    chunks: pl.DataFrame, *, limits: LimitsSettings, encoding: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate texts, count tokens, truncate or skip over-limit inputs.

    Returns (inputs with `tokens` and `truncated`, rejects in the FAILURES schema).
    """
    blank = pl.col("text").is_null() | (pl.col("text").str.strip_chars().str.len_bytes() == 0)
    empty = chunks.filter(blank)
    ok = chunks.filter(~blank)
    ok = ok.with_columns(tokens=token_counts(ok["text"], encoding), truncated=pl.lit(False))
    cap = limits.max_tokens_per_input
    over = ok.filter(pl.col("tokens") > cap)
    ok = ok.filter(pl.col("tokens") <= cap)
    rejects = [
        _rejects(empty, "empty_text", pl.lit("text is empty or whitespace only")),
    ]
    if over.height and limits.over_limit == "truncate":
        cut = [truncate_to_tokens(t, cap, encoding) for t in over["text"].to_list()]
        over = over.with_columns(text=pl.Series(cut, dtype=pl.String), truncated=pl.lit(True))
        over = over.with_columns(tokens=pl.Series(count_tokens(cut, encoding), dtype=pl.Int64))
        ok = pl.concat([ok, over])
    elif over.height:
        msg = pl.format("text has {} tokens; the limit per input is {}", pl.col("tokens"), pl.lit(cap))
        rejects.append(_rejects(over, "too_many_tokens", msg))
    return ok, pl.concat(rejects)


def token_counts(texts: pl.Series, encoding: str, *, slice_rows: int = 20_000) -> pl.Series:
    """Exact token count of every text, converting only a slice at a time to Python strings."""
    parts = [
        pl.Series(count_tokens(texts.slice(i, slice_rows).to_list(), encoding), dtype=pl.Int64)
        for i in range(0, texts.len(), slice_rows)
    ]
    return pl.concat(parts) if parts else pl.Series([], dtype=pl.Int64)


def _rejects(frame: pl.DataFrame, code: str, message: pl.Expr) -> pl.DataFrame:
    return frame.select(
        unit_id=pl.col("chunk_id"),
        stage=pl.lit("plan"),
        code=pl.lit(code),
        message=pl.format("chunk {}: ", pl.col("chunk_id")) + message,
        attempt=pl.lit(None, pl.Int64),
        batch_id=pl.lit(None, pl.String),
        raw=pl.lit(None, pl.String),
    ).cast(FAILURES)  # type: ignore[arg-type]


def embedding_requests(
    inputs: pl.DataFrame,
    *,
    model: str,
    dimensions: int | None,
    limits: LimitsSettings,
) -> pl.DataFrame:
    """Pack inputs into `/v1/embeddings` request lines (REQUESTS schema, shard unset).

    custom_id is `emb-` + a hash of the model, dimensions and the ordered (chunk_id, text sha256)
    pairs of the request: stable across reruns of the same input, unique within a batch.
    """
    if inputs.height == 0:
        return REQUESTS.to_frame()
    df = inputs.sort("company_id", "document_id", "chunk_index", "chunk_id")
    # tokens bind first on typical text (2,048 inputs x ~200 tokens > 300k), so cut by tokens
    # over the whole stream, then by input count inside each token group
    largest = int(df["tokens"].max())  # type: ignore[arg-type]
    df = df.with_columns(g_tok=_bucket(pl.col("tokens"), limits.max_tokens_per_request, largest, []))
    df = df.with_columns(g_count=pl.int_range(pl.len()).over("g_tok") // limits.max_inputs_per_request)
    df = df.with_columns(req=_dense_key(["g_tok", "g_count"]))
    body: dict[str, pl.Expr] = {"model": pl.lit(model), "input": pl.col("texts"), "encoding_format": pl.lit("base64")}
    if dimensions is not None:
        body["dimensions"] = pl.lit(dimensions)
    reqs = (
        df.group_by("req", maintain_order=True)
        .agg(
            unit_ids=pl.col("chunk_id"),
            texts=pl.col("text"),
            tokens=pl.col("tokens").sum(),
            key=pl.format("{}:{}", pl.col("chunk_id"), pl.col("text_sha256")).str.join("|"),
        )
        .with_columns(
            custom_id=_hash_id("emb", pl.lit(f"{model}|{dimensions}|") + pl.col("key")),
            n_inputs=pl.col("unit_ids").list.len().cast(pl.Int64),
        )
    )
    return _finish_lines(reqs, "/v1/embeddings", pl.struct(**body))


def inference_requests(bodies: pl.DataFrame, *, endpoint: str) -> pl.DataFrame:
    """One request per unit from pre-built JSON bodies (`unit_id`, `body`, `tokens`)."""
    if bodies.height == 0:
        return REQUESTS.to_frame()
    ok_id = pl.col("unit_id").str.contains(r"^[A-Za-z0-9_.:/@-]{1,60}$")
    df = bodies.with_columns(
        custom_id=pl.when(ok_id).then("u-" + pl.col("unit_id")).otherwise(_hash_id("h", pl.col("unit_id"))),
        unit_ids=pl.concat_list(pl.col("unit_id")),
        n_inputs=pl.lit(1, pl.Int64),
    )
    # custom_ids are plain ASCII without quotes or backslashes, so they need no JSON escaping
    line = pl.concat_str(
        [
            pl.lit('{"custom_id":"'),
            pl.col("custom_id"),
            pl.lit(f'","method":"POST","url":"{endpoint}","body":'),
            pl.col("body"),
            pl.lit("}"),
        ]
    )
    return _with_bytes(df.with_columns(line=line))


def _finish_lines(reqs: pl.DataFrame, url: str, body: pl.Expr) -> pl.DataFrame:
    line = pl.struct(
        pl.col("custom_id"), method=pl.lit("POST"), url=pl.lit(url), body=body
    ).struct.json_encode()
    return _with_bytes(reqs.with_columns(line=line))


def _with_bytes(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(
        bytes=pl.col("line").str.len_bytes().cast(pl.Int64) + 1,  # + "\n"
        shard=pl.lit(None, pl.String),
        attempt=pl.lit(1, pl.Int64),
        spent=pl.lit(0, pl.Int64),
        tokens=pl.col("tokens").cast(pl.Int64),
    ).select(REQUESTS.names())


# shards


def assign_shards(requests: pl.DataFrame, limits: ShardLimits, *, prefix: str = "s") -> pl.DataFrame:
    """Cut requests (in order) into shards `s00000`, `s00001`, ... under every shard limit."""
    if requests.height == 0:
        return requests
    largest_bytes = int(requests["bytes"].max())  # type: ignore[arg-type]
    largest_inputs = int(requests["n_inputs"].max())  # type: ignore[arg-type]
    largest_tokens = int(requests["tokens"].max())  # type: ignore[arg-type]
    if largest_bytes > limits.max_bytes:
        raise ValueError(f"a request line has {largest_bytes} bytes, over the shard limit {limits.max_bytes}")
    # the cut that binds most goes first (tokens, for embeddings against the enqueued budget):
    # later cuts only split a group where they bind too, so fewer, fuller shards
    df = requests.with_columns(k0=_bucket(pl.col("tokens"), limits.max_tokens, largest_tokens, []))
    df = df.with_columns(k1=_bucket(pl.col("n_inputs"), limits.max_inputs, largest_inputs, ["k0"]))
    df = df.with_columns(k2=_bucket(pl.col("bytes"), limits.max_bytes, largest_bytes, ["k0", "k1"]))
    df = df.with_columns(k3=pl.int_range(pl.len()).over(["k0", "k1", "k2"]) // limits.max_requests)
    df = df.with_columns(shard=pl.format("{}{}", pl.lit(prefix), _dense_key(["k0", "k1", "k2", "k3"]).cast(pl.String).str.zfill(5)))
    return df.drop("k0", "k1", "k2", "k3")


def shard_stats(requests: pl.DataFrame) -> pl.DataFrame:
    """Per shard: requests, bytes, inputs, tokens."""
    return (
        requests.group_by("shard", maintain_order=True)
        .agg(
            n_requests=pl.len(),
            bytes=pl.col("bytes").sum(),
            n_inputs=pl.col("n_inputs").sum(),
            tokens=pl.col("tokens").sum(),
        )
        .sort("shard")
    )


def check_shards(requests: pl.DataFrame, limits: ShardLimits) -> None:
    """Raise if any shard breaks a limit or a custom_id repeats within a shard."""
    stats = shard_stats(requests)
    for col, cap in (
        ("n_requests", limits.max_requests),
        ("bytes", limits.max_bytes),
        ("n_inputs", limits.max_inputs),
        ("tokens", limits.max_tokens),
    ):
        bad = stats.filter(pl.col(col) > cap)
        if bad.height and not (col == "tokens" and (bad["n_requests"] == 1).all()):
            raise AssertionError(f"shard {bad['shard'][0]} has {col}={bad[col][0]} over {cap}")
    dup = requests.group_by("shard", "custom_id").len().filter(pl.col("len") > 1)
    if dup.height:
        raise AssertionError(f"custom_id {dup['custom_id'][0]} repeats in shard {dup['shard'][0]}")


def shard_bytes(lines: pl.Series) -> bytes:
    """The exact file content of a shard: one line per request, newline-terminated."""
    return b"\n".join(lines.cast(pl.Binary).to_list()) + b"\n"
