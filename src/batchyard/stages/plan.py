"""Plan: turn staged units into Batch API request lines and shards (pure Polars, no I/O).

Embeddings pack many inputs per request; inference sends one unit per request. Both end in the
same request table, cut into shards (batch files) under every limit:

- per request (embeddings): at most `max_inputs_per_request` inputs and `max_tokens_per_request`
  tokens; every input non-empty and at most `max_tokens_per_input` tokens (truncated or skipped);
- per shard: at most `max_requests_per_batch` requests, `max_bytes_per_batch * safety_margin`
  bytes, `max_inputs_per_batch` inputs and `max_tokens_per_batch` tokens.

Packing is next-fit over exact sizes (`_next_fit`), in a small loop over integer arrays.
Embeddings are packed at the *input* level: an input goes into the current request and shard
while every request and shard limit still holds, else into a new request (in the same shard
when it fits) or a new shard. So a shard is cut where the binding limit is reached, whatever
the request boundaries, and shards stay full even when the token budget per batch is small
(a shard is as full as the budget minus one input). `check_shards` verifies the result.

Texts repeated within a partition are embedded once (`split_duplicates`): the first chunk of
each distinct sent text is planned and the others follow its vector.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from batchyard.schemas import FAILURES
from batchyard.tokens import count_tokens, truncate_to_tokens

if TYPE_CHECKING:
    from batchyard.settings import LimitsSettings

REQUESTS = pl.Schema(
    {
        "custom_id": pl.String(),
        "shard": pl.String(),
        "attempt": pl.Int64(),
        "spent": pl.Int64(),  # attempts that used retry budget before this one
        "requeues": pl.Int64(),  # times it came back unfinished (expired/cancelled) before this one
        "unit_ids": pl.List(pl.String()),
        "n_inputs": pl.Int64(),
        "tokens": pl.Int64(),
        "bytes": pl.Int64(),
        "line": pl.String(),
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
        """Apply the safety margin and the default token cap (`QUEUE_SHARE` of the budget)."""
        return cls(
            max_requests=limits.max_requests_per_batch,
            max_bytes=int(limits.max_bytes_per_batch * limits.safety_margin),
            max_inputs=limits.max_inputs_per_batch,
            max_tokens=limits.max_tokens_per_batch or max(1, int(limits.enqueued_token_budget * QUEUE_SHARE)),
        )


QUEUE_SHARE = 0.24
"""Default shard size, as a share of the enqueued-token budget: four shards fill the provider's
queue (96%, with room for it to count up to 3% more tokens than we do), and the room one frees is
taken by the next while the others still run. A shard as large as the budget would be refused as
soon as the provider counts a little more, then split, and the queue would idle between batches
(benchmarks/queue.py, cap 100k, 10 s batches: one run 76% full with shards of the budget, 88% at
45%, 94.6% at 32% (two runs together 88.4%), 94.4% at 24% (two runs together 94.6%))."""


def _hash_id(prefix: str, parts: pl.Expr) -> pl.Expr:
    return parts.map_elements(
        lambda s: f"{prefix}-{hashlib.sha256(s.encode()).hexdigest()[:40]}", return_dtype=pl.String
    )


# embeddings


def prepare_inputs(
    chunks: pl.DataFrame, *, limits: LimitsSettings, encoding: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate texts, count tokens, truncate or skip over-limit inputs.

    Tokens are counted once per distinct text. Returns (inputs, rejects in the FAILURES
    schema): inputs keep the chunk columns with `text` as it will be sent, plus `tokens`,
    `truncated` and `sent_sha256` (the sha256 of the sent text; the source's `text_sha256` is
    kept for the marks, so an unchanged source is not selected again).
    """
    blank = pl.col("text").is_null() | (pl.col("text").str.strip_chars().str.len_bytes() == 0)
    empty = chunks.filter(blank)
    ok = chunks.filter(~blank)
    distinct = ok.select("text_sha256", "text").unique("text_sha256", keep="first")
    distinct = distinct.with_columns(tokens=token_counts(distinct["text"], encoding, dedupe=False))
    ok = ok.join(distinct.select("text_sha256", "tokens"), on="text_sha256", how="left")
    ok = ok.with_columns(truncated=pl.lit(False), sent_sha256=pl.col("text_sha256"))
    cap = limits.max_tokens_per_input
    over = ok.filter(pl.col("tokens") > cap)
    ok = ok.filter(pl.col("tokens") <= cap)
    rejects = [
        _rejects(empty, "empty_text", pl.lit("text is empty or whitespace only")),
    ]
    if over.height and limits.over_limit == "truncate":
        cut = [truncate_to_tokens(t, cap, encoding) for t in over["text"].to_list()]
        over = over.with_columns(
            text=pl.Series(cut, dtype=pl.String),
            truncated=pl.lit(True),
            tokens=pl.Series(count_tokens(cut, encoding), dtype=pl.Int64),
            sent_sha256=pl.Series([hashlib.sha256(t.encode()).hexdigest() for t in cut], dtype=pl.String),
        )
        ok = pl.concat([ok, over])
    elif over.height:
        msg = pl.format("text has {} tokens; the limit per input is {}", pl.col("tokens"), pl.lit(cap))
        rejects.append(_rejects(over, "too_many_tokens", msg))
    return ok, pl.concat(rejects)


def token_counts(texts: pl.Series, encoding: str, *, dedupe: bool = True) -> pl.Series:
    """Exact token count of every text (on every core for large inputs: `batchyard.tokens`).

    Counts are needed for every input (they pack shards under the token budget), so the byte
    bound (`tokens_over`) cannot replace them here; `dedupe=False` when the texts are distinct.
    """
    from batchyard.tokens import token_counts as count_column

    return count_column(texts, encoding, dedupe=dedupe)


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


SORT_KEY = ["company_id", "document_id", "chunk_index", "chunk_id"]


def split_duplicates(inputs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(one input per distinct sent text, aliases: chunk_id -> rep_chunk_id of the same text).

    The representative of a text is its first chunk in (company, document, index, id) order,
    so the choice is stable across reruns of the same input.
    """
    df = inputs.sort(SORT_KEY, nulls_last=True)
    first = pl.col("chunk_id").first().over("sent_sha256")
    df = df.with_columns(rep_chunk_id=first)
    reps = df.filter(pl.col("chunk_id") == pl.col("rep_chunk_id")).drop("rep_chunk_id")
    aliases = df.filter(pl.col("chunk_id") != pl.col("rep_chunk_id"))
    return reps, aliases


_EMB_ID_LEN = len("emb-") + 40


def embedding_requests(
    inputs: pl.DataFrame,
    *,
    model: str,
    dimensions: int | None,
    limits: LimitsSettings,
    shard_limits: ShardLimits | None = None,
) -> pl.DataFrame:
    """Pack inputs into `/v1/embeddings` request lines and cut them into shards (REQUESTS schema).

    custom_id is `emb-` + a hash of the model, dimensions and the ordered (chunk_id, text sha256)
    pairs of the request: stable across reruns of the same input, unique within a batch.
    """
    if inputs.height == 0:
        return REQUESTS.to_frame()
    caps = shard_limits or ShardLimits.from_settings(limits)
    df = inputs.sort(SORT_KEY, nulls_last=True)
    body: dict[str, pl.Expr] = {"model": pl.lit(model), "input": pl.col("texts"), "encoding_format": pl.lit("base64")}
    if dimensions is not None:
        body["dimensions"] = pl.lit(dimensions)
    # exact JSON size of each input inside the line, and of a line with no input
    enc = pl.struct(pl.col("text").alias("t")).struct.json_encode().str.len_bytes().cast(pl.Int64) - len('{"t":}')
    df = df.with_columns(nbytes=enc)
    empty = pl.DataFrame({"custom_id": ["e" * _EMB_ID_LEN], "texts": [[]]}, schema={"custom_id": pl.String, "texts": pl.List(pl.String)})
    body_struct = pl.struct([expr.alias(name) for name, expr in body.items()])
    overhead = int(_lines(empty, "/v1/embeddings", body_struct)["line"].str.len_bytes()[0]) + 1
    req, shard = _next_fit(
        df["tokens"].to_numpy(), df["nbytes"].to_numpy(), overhead=overhead,
        max_inputs_per_request=limits.max_inputs_per_request,
        max_tokens_per_request=min(limits.max_tokens_per_request, caps.max_tokens),
        caps=caps,
    )
    df = df.with_columns(req=pl.Series(req, dtype=pl.Int64), shard_no=pl.Series(shard, dtype=pl.Int64))
    reqs = (
        df.group_by("req", maintain_order=True)
        .agg(
            shard_no=pl.col("shard_no").first(),
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
    out = _with_bytes(_lines(reqs, "/v1/embeddings", body_struct), keep=["shard_no"])
    return out.with_columns(shard=_shard_ids(pl.col("shard_no"))).select(REQUESTS.names())


def _next_fit(
    tokens: np.ndarray,
    nbytes: np.ndarray,
    *,
    overhead: int,
    max_inputs_per_request: int,
    max_tokens_per_request: int,
    caps: ShardLimits,
    inputs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Request and shard number of each item, filling requests and shards in order.

    An item (one input, or a whole request when `max_inputs_per_request` is 0) joins the open
    request if every request and shard limit still holds; otherwise it opens a new request, in
    the open shard if that shard can take one more request, else in a new shard. An item
    larger than a cap on its own gets a request (and shard) of its own. `inputs` is the number
    of embedding inputs each item carries (1 each by default).
    """
    n = len(tokens)
    req = np.empty(n, dtype=np.int64)
    shard = np.empty(n, dtype=np.int64)
    r = s = -1
    r_n = r_tok = 0
    s_req = s_in = s_tok = s_bytes = 0
    for i in range(n):
        t, b = int(tokens[i]), int(nbytes[i])
        k = 1 if inputs is None else int(inputs[i])
        joins = (
            r >= 0
            and r_n + k <= max_inputs_per_request
            and r_tok + t <= max_tokens_per_request
            and s_in + k <= caps.max_inputs
            and s_tok + t <= caps.max_tokens
            and s_bytes + b + 1 <= caps.max_bytes
        )
        if joins:
            r_n, r_tok = r_n + k, r_tok + t
            s_in, s_tok, s_bytes = s_in + k, s_tok + t, s_bytes + b + 1
        else:
            fits_shard = (
                s >= 0
                and s_req + 1 <= caps.max_requests
                and s_in + k <= caps.max_inputs
                and s_tok + t <= caps.max_tokens
                and s_bytes + overhead + b <= caps.max_bytes
            )
            if not fits_shard:
                s += 1
                s_req = s_in = s_tok = s_bytes = 0
            r += 1
            r_n, r_tok = k, t
            s_req, s_in, s_tok, s_bytes = s_req + 1, s_in + k, s_tok + t, s_bytes + overhead + b
        req[i] = r
        shard[i] = s
    return req, shard


def _shard_ids(number: pl.Expr | pl.Series, prefix: str = "s") -> pl.Expr:
    expr = number if isinstance(number, pl.Expr) else pl.lit(number)
    return pl.format("{}{}", pl.lit(prefix), expr.cast(pl.String).str.zfill(5))


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


def _lines(reqs: pl.DataFrame, url: str, body: pl.Expr) -> pl.DataFrame:
    line = pl.struct(
        pl.col("custom_id"), method=pl.lit("POST"), url=pl.lit(url), body=body
    ).struct.json_encode()
    return reqs.with_columns(line=line)


def _with_bytes(df: pl.DataFrame, keep: list[str] | None = None) -> pl.DataFrame:
    return df.with_columns(
        bytes=pl.col("line").str.len_bytes().cast(pl.Int64) + 1,  # + "\n"
        shard=pl.lit(None, pl.String),
        attempt=pl.lit(1, pl.Int64),
        spent=pl.lit(0, pl.Int64),
        requeues=pl.lit(0, pl.Int64),
        tokens=pl.col("tokens").cast(pl.Int64),
    ).select(*REQUESTS.names(), *(keep or []))


# shards


def assign_shards(requests: pl.DataFrame, limits: ShardLimits, *, prefix: str = "s", window: int = 32
                  ) -> pl.DataFrame:
    """Cut whole requests into shards `s00000`, `s00001`, ... under every limit.

    First-fit decreasing: requests go, largest first, into the first of the last `window`
    open shards that can take them, so shards stay full even when requests are large
    compared with the token budget (next-fit would leave a gap of up to one request per
    shard). The window bounds the cost at `window` checks per request.
    """
    if requests.height == 0:
        return requests
    largest_bytes = int(requests["bytes"].max())  # type: ignore[arg-type]
    if largest_bytes > limits.max_bytes:
        raise ValueError(f"a request line has {largest_bytes} bytes, over the shard limit {limits.max_bytes}")
    tokens = requests["tokens"].cast(pl.Int64).to_numpy()
    nbytes = requests["bytes"].cast(pl.Int64).to_numpy()
    inputs = requests["n_inputs"].cast(pl.Int64).to_numpy()
    order = np.argsort(-tokens, kind="stable")
    shard = np.empty(len(tokens), dtype=np.int64)
    bins: list[list[int]] = []  # [shard number, requests, inputs, tokens, bytes] of open shards
    for i in order:
        t, b, k = int(tokens[i]), int(nbytes[i]), int(inputs[i])
        for open_bin in bins[-window:]:
            _, n, ins, tok, byt = open_bin
            if (n + 1 <= limits.max_requests and ins + k <= limits.max_inputs and tok + t <= limits.max_tokens
                    and byt + b <= limits.max_bytes):
                open_bin[1:] = [n + 1, ins + k, tok + t, byt + b]
                shard[i] = open_bin[0]
                break
        else:
            bins.append([len(bins), 1, k, t, b])
            shard[i] = len(bins) - 1
    out = requests.with_columns(shard=_shard_ids(pl.Series(shard, dtype=pl.Int64), prefix))
    return out.sort("shard", maintain_order=True)


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
