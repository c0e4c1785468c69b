"""The embeddings join before `stages/decode.py`: `bench_join.py`'s reference row, and the oracle
of the equivalence test in `tests/unit/test_join.py`.

This is `read_embedding_lines` + `embedding_outcomes` as they were until the msgspec/block-base64
rewrite: Polars parses the whole nested NDJSON struct (base64 text included), explodes the
`data` lists, decodes with `str.decode("base64")`, joins on string keys and reinterprets the
bytes as `Array(Float32, dims)`. `dedupe`, `_request_outcomes` and the `wrong_dimensions` rows
did not change, so they come from the pipeline. Nothing in `src/` uses this module.
"""

from __future__ import annotations

import io

import polars as pl

from batchyard.stages.join import _anomalies, _request_outcomes, split_lines, wrong_dimensions

_ERR = pl.Struct({"message": pl.String, "code": pl.String, "type": pl.String})
_EMB_LINE = pl.Schema(
    {
        "custom_id": pl.String,
        "response": pl.Struct(
            {
                "status_code": pl.Int64,
                "body": pl.Struct(
                    {
                        "data": pl.List(pl.Struct({"index": pl.Int64, "embedding": pl.String})),
                        "model": pl.String,
                        "usage": pl.Struct({"prompt_tokens": pl.Int64, "total_tokens": pl.Int64}),
                        "error": _ERR,
                    }
                ),
            }
        ),
        "error": pl.Struct({"code": pl.String, "message": pl.String}),
    }
)


def read_embedding_lines(data: bytes, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The previous `join.read_embedding_lines`: Polars NDJSON, line checks when malformed."""
    if not data.strip():
        return _EMB_LINE.to_frame(), _anomalies([])
    try:
        return pl.read_ndjson(io.BytesIO(data), schema=_EMB_LINE), _anomalies([])
    except Exception:
        good, bad = split_lines(data, source)
        frame = (
            pl.read_ndjson(io.BytesIO(b"\n".join(good)), schema=_EMB_LINE)
            if good
            else _EMB_LINE.to_frame()
        )
        return frame, _anomalies(bad)


def embedding_outcomes(
    requests: pl.DataFrame, lines: pl.DataFrame, *, dims: int, batch_ended_as: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The previous `join.embedding_outcomes`: same arguments (lines in `_EMB_LINE` schema), same results."""
    resp = pl.col("response")
    flat = lines.select(
        "custom_id",
        status_code=resp.struct.field("status_code"),
        data=resp.struct.field("body").struct.field("data"),
        http_code=resp.struct.field("body").struct.field("error").struct.field("code"),
        http_msg=resp.struct.field("body").struct.field("error").struct.field("message"),
        err_code=pl.col("error").struct.field("code"),
        err_msg=pl.col("error").struct.field("message"),
    )
    ok_lines = flat.filter(pl.col("status_code") == 200)
    got = (
        ok_lines.select("custom_id", "data")
        .explode("data")
        .unnest("data")
        .filter(pl.col("index").is_not_null())
        .unique(["custom_id", "index"], keep="first")
        .select("custom_id", "index", raw=pl.col("embedding").str.decode("base64", strict=False))
        .with_columns(nbytes=pl.col("raw").bin.size())
    )
    # one row per planned input of an answered request: (custom_id, unit_id, index)
    items = (
        requests.select("custom_id", "unit_ids")
        .join(ok_lines.select("custom_id"), on="custom_id", how="semi")
        .with_columns(index=pl.int_ranges(pl.col("unit_ids").list.len()))
        .explode("unit_ids", "index")
        .rename({"unit_ids": "unit_id"})
        .join(got, on=["custom_id", "index"], how="left")
    )
    items = items.with_columns(
        vector=pl.when(pl.col("nbytes") == dims * 4)
        .then(pl.col("raw"))
        .otherwise(None)
        .bin.reinterpret(dtype=pl.Array(pl.Float32, dims), endianness="little"),
    ).drop("raw")
    bad_items = items.filter(pl.col("vector").is_null())
    # a request is ok only when every input came back with the right length
    bad_reqs = bad_items.group_by("custom_id").agg(
        n=pl.len(), first=pl.col("index").first(), nbytes=pl.col("nbytes").first()
    )
    vectors = items.filter(~pl.col("custom_id").is_in(bad_reqs["custom_id"].implode())).select(
        "custom_id", "unit_id", "vector"
    )
    outcomes = _request_outcomes(requests, flat, batch_ended_as)
    wrong = wrong_dimensions(bad_reqs, dims)
    outcomes = pl.concat(
        [outcomes.filter(~pl.col("custom_id").is_in(wrong["custom_id"].implode())), wrong]
    )
    return vectors, outcomes
