"""Join: map downloaded output and error lines back to planned requests on custom_id (pure).

Every planned request ends a shard attempt with exactly one outcome:

| outcome   | when                                                           | next                       |
|-----------|----------------------------------------------------------------|----------------------------|
| `ok`      | HTTP 200 and a valid body                                      | result                     |
| `requeue` | `batch_expired` / `batch_cancelled`, or no line after expiry,  | follow-up shard, budget    |
|           | cancellation or a failed batch                                 | not spent                  |
| `retry`   | 408/409/429/5xx, an unknown non-HTTP error, a missing line     | follow-up shard while the  |
|           | from a completed batch                                         | budget lasts               |
| `fail`    | any other 4xx, invalid output, wrong vector length, a request  | failures.parquet           |
|           | the real-time lane can never fit (`request_too_large`)         |                            |

Lines that match no planned request, repeat a custom_id, or are not JSON are anomalies: recorded,
never silently dropped.

Embeddings lines are parsed and their vectors decoded by `stages/decode.py` (msgspec, block
base64). The base64 text never becomes a Polars or Python string: the lines frame carries each
line's `data` entries as one Python object (a `pl.Object` cell of `msgspec.Raw` views), and
`embedding_outcomes` decodes them straight into one float32 matrix that becomes the `vector`
column without a copy.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from batchyard.stages.decode import Line, decode_vectors, parse_lines

if TYPE_CHECKING:
    from batchyard.tasks.base import InferenceTask

TOutcome = Literal["ok", "requeue", "retry", "fail"]

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
REQUEUE_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_canceled"})
FAIL_CODES = frozenset({"request_too_large"})
"""Non-HTTP errors no retry can fix: the real-time lane's request that can never fit its window."""

OUTCOMES = pl.Schema(
    {
        "custom_id": pl.String,
        "outcome": pl.String,
        "code": pl.String,
        "message": pl.String,
        "status_code": pl.Int64,
    }
)

ANOMALIES = pl.Schema(
    {"source": pl.String, "line": pl.Int64, "custom_id": pl.String, "code": pl.String, "message": pl.String}
)

EMB_LINES = pl.Schema(
    {
        "custom_id": pl.String,
        "status_code": pl.Int64,  # response.status_code
        "http_code": pl.String,  # response.body.error.code
        "http_msg": pl.String,  # response.body.error.message
        "err_code": pl.String,  # error.code (a line without response)
        "err_msg": pl.String,  # error.message
        "data": pl.Object,  # response.body.data: list[decode.Item] or None
    }
)


def classify(status_code: int | None, code: str | None) -> TOutcome:
    """Outcome of a failed request line."""
    if status_code is None:
        return "requeue" if code in REQUEUE_CODES else "fail" if code in FAIL_CODES else "retry"
    if status_code in RETRYABLE_STATUS or status_code >= 500:
        return "retry"
    return "fail"


def _anomalies(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=ANOMALIES) if rows else ANOMALIES.to_frame()


def split_lines(data: bytes, source: str) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Non-empty lines that parse as JSON objects with a string custom_id, plus anomalies."""
    good: list[bytes] = []
    bad: list[dict[str, Any]] = []
    for no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                raise ValueError("no string custom_id")
        except ValueError as exc:
            bad.append({"source": source, "line": no, "custom_id": None, "code": "malformed_line",
                        "message": f"{source} line {no} is not a valid batch output line: {exc}"[:500]})
            continue
        good.append(raw)
    return good, bad


def read_embedding_lines(data: bytes, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One `EMB_LINES` row per parsed line of an embeddings output/error file, plus anomalies."""
    lines, malformed = parse_lines(data)
    bad = [
        {"source": source, "line": m.line, "custom_id": None, "code": "malformed_line",
         "message": f"{source} line {m.line} is not a valid batch output line: {m.reason}"[:500]}
        for m in malformed
    ]
    return _lines_frame(lines), _anomalies(bad)


def _lines_frame(lines: list[Line]) -> pl.DataFrame:
    """Parsed lines as an `EMB_LINES` frame (one row per line)."""
    resp = [ln.response for ln in lines]
    body = [r.body if r else None for r in resp]
    http_err = [b.error if b else None for b in body]
    return pl.DataFrame(
        {
            "custom_id": [ln.custom_id for ln in lines],
            "status_code": [r.status_code if r else None for r in resp],
            "http_code": [_text(e.code) if e else None for e in http_err],
            "http_msg": [e.message if e else None for e in http_err],
            "err_code": [_text(ln.error.code) if ln.error else None for ln in lines],
            "err_msg": [ln.error.message if ln.error else None for ln in lines],
            "data": pl.Series([b.data if b else None for b in body], dtype=pl.Object),
        },
        schema=EMB_LINES,
    )


def _text(code: str | int | None) -> str | None:
    """An error code as text (some servers send numbers)."""
    return code if code is None or isinstance(code, str) else str(code)


def dedupe(lines: pl.DataFrame, planned: pl.Series, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Drop lines with unknown or repeated custom_ids (first wins), recording each as an anomaly."""
    lines = lines.with_row_index("_line", offset=1)
    unknown = lines.filter(~pl.col("custom_id").is_in(planned.implode()))
    known = lines.filter(pl.col("custom_id").is_in(planned.implode()))
    dup = known.filter(pl.col("custom_id").is_duplicated() & ~pl.col("custom_id").is_first_distinct())
    rows = [
        {"source": source, "line": int(r["_line"]), "custom_id": r["custom_id"], "code": code,
         "message": f"{source} line {r['_line']}: {msg} {r['custom_id']}"}
        for frame, code, msg in ((unknown, "unknown_custom_id", "custom_id matches no planned request:"),
                                 (dup, "duplicate_output", "second line for custom_id"))
        for r in frame.select("_line", "custom_id").iter_rows(named=True)
    ]
    kept = known.filter(pl.col("custom_id").is_first_distinct()).drop("_line")
    return kept, _anomalies(rows)


def embedding_outcomes(
    requests: pl.DataFrame, lines: pl.DataFrame, *, dims: int, batch_ended_as: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-input vectors and per-request outcomes of one shard attempt.

    Args:
        requests: the attempt's plan (custom_id, unit_ids, ...).
        lines: output and error lines together, deduplicated, `EMB_LINES` schema.
        dims: expected vector length.
        batch_ended_as: the batch's terminal status (decides what a missing line means).

    Returns:
        (vectors: custom_id, unit_id, vector; outcomes: OUTCOMES schema, one row per request)
    """
    ok_lines = lines.filter(pl.col("status_code") == 200).unique("custom_id", keep="first", maintain_order=True)
    answered = requests.select("custom_id", "unit_ids").join(
        ok_lines.select("custom_id", "data"), on="custom_id", how="inner", maintain_order="left"
    )
    # one slot per planned input of an answered request, in request order: (custom_id, unit_id, index)
    slots = answered.select(
        "custom_id", unit_id="unit_ids", index=pl.int_ranges(pl.col("unit_ids").list.len())
    ).explode("unit_id", "index")
    matrix = np.empty((slots.height, dims), np.float32)
    nbytes = _decode_answers(answered, matrix)
    slots = slots.with_columns(nbytes=pl.Series(nbytes), vector=pl.Series(matrix))  # no copy
    # a request is ok only when every input came back with the right length
    bad_reqs = (
        slots.filter(pl.col("nbytes") != dims * 4)
        .group_by("custom_id", maintain_order=True)
        .agg(n=pl.len(), first=pl.col("index").first(), nbytes=pl.col("nbytes").first())
    )
    vectors = slots.select("custom_id", "unit_id", "vector")
    if bad_reqs.height:
        vectors = vectors.filter(~pl.col("custom_id").is_in(bad_reqs["custom_id"].implode()))
    outcomes = _request_outcomes(requests, lines.drop("data"), batch_ended_as)
    wrong = wrong_dimensions(bad_reqs, dims)
    outcomes = pl.concat([outcomes.filter(~pl.col("custom_id").is_in(wrong["custom_id"].implode())), wrong])
    return vectors, outcomes


def wrong_dimensions(bad_reqs: pl.DataFrame, dims: int) -> pl.DataFrame:
    """`fail` outcomes for requests with inputs lacking a `dims`-float vector.

    `bad_reqs` has one row per such request: custom_id, n (inputs without a vector), first (the
    first such input) and nbytes (what that input decoded to; null or negative when nothing).
    """
    return bad_reqs.select(
        "custom_id",
        outcome=pl.lit("fail"),
        code=pl.lit("wrong_dimensions"),
        message=pl.format(
            "request {}: {} input(s) without a {}-dim vector (first: input {}, got {} bytes)",
            "custom_id", "n", pl.lit(dims), "first", pl.col("nbytes").clip(lower_bound=0).fill_null(0),
        ),
        status_code=pl.lit(200, pl.Int64),
    )


def _decode_answers(answered: pl.DataFrame, matrix: np.ndarray) -> np.ndarray:
    """Decode the answered requests' vectors into `matrix`, one row per planned input.

    Rows follow `answered` (request order), then input order: entry `data[k]` of request j goes
    to row `starts[j] + data[k].index`. The first entry for an index wins; later ones, and
    indexes outside the request, are ignored. Returns the decoded byte length per row, -1 where
    no entry or no valid base64 came back.
    """
    units = answered["unit_ids"].list.len().to_numpy().astype(np.int64)
    starts = np.cumsum(units) - units
    entries = [d or [] for d in answered["data"].to_list()]
    # flat arrays over all entries: which request, which index
    counts = np.fromiter(map(len, entries), np.int64, count=len(entries))
    request = np.repeat(np.arange(len(entries)), counts)
    index = np.fromiter(
        (-1 if it.index is None else it.index for items in entries for it in items), np.int64, count=int(counts.sum())
    )
    inside = np.flatnonzero((index >= 0) & (index < units[request]))
    rows, first = np.unique(starts[request[inside]] + index[inside], return_index=True)  # first entry per row
    raws = [it.embedding for items in entries for it in items]
    nbytes = np.full(len(matrix), -1, np.int64)
    nbytes[rows] = decode_vectors([raws[i] for i in inside[first]], rows, matrix)
    return nbytes


def _request_outcomes(requests: pl.DataFrame, flat: pl.DataFrame, batch_ended_as: str) -> pl.DataFrame:
    """One outcome per planned request from its line (or the lack of one)."""
    joined = requests.select("custom_id").join(flat, on="custom_id", how="left")
    missing_outcome = "retry" if batch_ended_as == "completed" else "requeue"
    rows: list[tuple[Any, ...]] = []
    for r in joined.iter_rows(named=True):
        sc, cid = r["status_code"], r["custom_id"]
        if sc == 200:
            rows.append((cid, "ok", None, None, 200))
        elif sc is not None:
            code = r["http_code"] or f"http_{sc}"
            rows.append((cid, classify(sc, code), code, f"request {cid}: HTTP {sc}: {r['http_msg'] or 'no message'}", sc))
        elif r["err_code"] is not None:
            code = r["err_code"]
            rows.append((cid, classify(None, code), code, f"request {cid}: {r['err_msg'] or code}", None))
        else:
            rows.append((cid, missing_outcome, "missing_output",
                         f"request {cid}: no output or error line after the batch ended {batch_ended_as}", None))
    return pl.DataFrame(rows, schema=OUTCOMES, orient="row")


# inference


def read_json_lines(data: bytes, source: str) -> tuple[list[dict[str, Any]], pl.DataFrame]:
    """Parsed JSON lines of an output/error file, plus anomalies for malformed ones."""
    good, bad = split_lines(data, source)
    return [json.loads(g) for g in good], _anomalies(bad)


INFERENCE_ROWS = pl.Schema(
    {
        "custom_id": pl.String,
        "parsed": pl.String,
        "raw_text": pl.String,
        "finish_reason": pl.String,
        "refusal": pl.String,
        "input_tokens": pl.Int64,
        "output_tokens": pl.Int64,
    }
)


def inference_outcomes(
    task: InferenceTask,
    endpoint: str,
    requests: pl.DataFrame,
    lines: list[dict[str, Any]],
    *,
    batch_ended_as: str,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Parsed results and per-request outcomes of one inference shard attempt.

    `lines` are output and error lines, already deduplicated on custom_id.
    """
    by_id = {ln["custom_id"]: ln for ln in lines}
    results: list[dict[str, Any]] = []
    flat_rows: list[dict[str, Any]] = []
    outcomes: list[tuple[Any, ...]] = []
    for cid in requests["custom_id"].to_list():
        line = by_id.get(cid)
        if line is None:
            flat_rows.append({"custom_id": cid, "status_code": None, "http_code": None, "http_msg": None,
                              "err_code": None, "err_msg": None})
            continue
        resp = line.get("response") or None
        err = line.get("error") or None
        if resp is None or resp.get("status_code") != 200:
            body = (resp or {}).get("body") or {}
            e = body.get("error") if isinstance(body, dict) else None
            flat_rows.append({
                "custom_id": cid,
                "status_code": (resp or {}).get("status_code"),
                "http_code": (e or {}).get("code"), "http_msg": (e or {}).get("message"),
                "err_code": (err or {}).get("code"), "err_msg": (err or {}).get("message"),
            })
            continue
        out = task.parse(endpoint, 200, resp.get("body"))
        results.append({
            "custom_id": cid,
            "parsed": json.dumps(out.parsed) if out.parsed is not None else None,
            "raw_text": out.raw_text,
            "finish_reason": out.finish_reason,
            "refusal": out.refusal,
            "input_tokens": (out.usage or {}).get("input_tokens"),
            "output_tokens": (out.usage or {}).get("output_tokens"),
        })
        if out.status == "ok":
            outcomes.append((cid, "ok", None, None, 200))
        else:
            outcomes.append((cid, "fail", out.status, f"request {cid}: {out.error or out.status}", 200))
    http = _request_outcomes(
        requests.filter(pl.col("custom_id").is_in([r["custom_id"] for r in flat_rows])),
        pl.DataFrame(flat_rows, schema={"custom_id": pl.String, "status_code": pl.Int64, "http_code": pl.String,
                                        "http_msg": pl.String, "err_code": pl.String, "err_msg": pl.String}),
        batch_ended_as,
    )
    parsed = pl.DataFrame(results, schema=INFERENCE_ROWS) if results else INFERENCE_ROWS.to_frame()
    oc = pl.DataFrame(outcomes, schema=OUTCOMES, orient="row") if outcomes else OUTCOMES.to_frame()
    return parsed, pl.concat([oc, http])


# follow-ups and final tables


def next_attempt(
    requests: pl.DataFrame, outcomes: pl.DataFrame, *, max_attempts: int, max_requeues: int,
    keep_over_limit: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Requests for the follow-up attempt, and requests that finally failed (with outcomes).

    `requests` carries `spent` (attempts that used budget so far) and `requeues` (times it came
    back unfinished). `retry` spends one attempt and fails with its last error once the budget
    is gone; `requeue` (expired, cancelled) spends none, but a request that comes back
    unfinished more than `max_requeues` times fails as `requeue_limit`, so a provider that
    keeps expiring batches cannot keep a run open forever. With `keep_over_limit` (the
    real-time lane takes such requests instead), they go to the follow-up, `requeues` above
    the limit.
    """
    j = requests.join(outcomes, on="custom_id", how="inner")
    requeue, retry = pl.col("outcome") == "requeue", pl.col("outcome") == "retry"
    j = j.with_columns(
        spent=pl.col("spent") + retry.cast(pl.Int64),
        requeues=pl.col("requeues") + requeue.cast(pl.Int64),
    )
    limit = pl.lit(True) if keep_over_limit else pl.col("requeues") <= max_requeues
    again = j.filter((requeue & limit) | (retry & (pl.col("spent") < max_attempts)))
    failed = j.filter(
        (pl.col("outcome") == "fail")
        | (retry & (pl.col("spent") >= max_attempts))
        | (requeue & ~limit)
    )
    over = requeue & (pl.col("requeues") > max_requeues)
    failed = failed.with_columns(
        code=pl.when(over).then(pl.lit("requeue_limit")).otherwise(pl.col("code")),
        message=pl.when(over)
        .then(
            pl.format(
                "request {} came back unfinished {} times (last: {}); limits.max_requeues is {}",
                "custom_id", "requeues", pl.col("code").fill_null("unfinished"), pl.lit(max_requeues),
            )
        )
        .otherwise(pl.col("message")),
    )
    nxt = again.select(requests.columns).with_columns(attempt=pl.col("attempt") + 1)
    return nxt, failed
