"""Join: outputs back to planned requests on custom_id; every planned input exactly once."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import polars as pl
import pytest

from batchyard.localapi.executors import hash_embedding
from batchyard.stages import join

DIMS = 8


def requests(n: int, per: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "custom_id": [f"emb-{i}" for i in range(n)],
            "unit_ids": [[f"c{i}-{j}" for j in range(per)] for i in range(n)],
            "attempt": [1] * n,
            "spent": [0] * n,
        }
    )


def ok_line(cid: str, units: list[str], dims: int = DIMS, drop: int | None = None) -> dict:
    data = [
        {"object": "embedding", "index": j,
         "embedding": base64.b64encode(hash_embedding(u, dims).astype("<f4").tobytes()).decode()}
        for j, u in enumerate(units) if j != drop
    ]
    random.Random(cid).shuffle(data)
    return {"id": "batch_req_x", "custom_id": cid, "response": {"status_code": 200, "request_id": "r",
            "body": {"object": "list", "data": data, "model": "m", "usage": {"prompt_tokens": 3, "total_tokens": 3}}},
            "error": None}


def err_line(cid: str, status: int | None, code: str) -> dict:
    if status is None:
        return {"id": "x", "custom_id": cid, "response": None, "error": {"code": code, "message": f"{code} happened"}}
    return {"id": "x", "custom_id": cid, "error": None, "response": {"status_code": status, "request_id": "r",
            "body": {"error": {"message": f"{code} happened", "type": "invalid_request_error", "code": code}}}}


def to_bytes(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def outcomes_for(reqs: pl.DataFrame, lines: list[dict], ended: str = "completed") -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    frame, anomalies = join.read_embedding_lines(to_bytes(lines), "outputs/x.jsonl")
    frame, dup = join.dedupe(frame, reqs["custom_id"], "shard x")
    vectors, outcomes = join.embedding_outcomes(reqs, frame, dims=DIMS, batch_ended_as=ended)
    return vectors, outcomes, pl.concat([anomalies, dup])


def test_shuffled_output_maps_every_vector_to_its_chunk() -> None:
    reqs = requests(20)
    lines = [ok_line(c, u) for c, u in zip(reqs["custom_id"], reqs["unit_ids"], strict=True)]
    random.Random(1).shuffle(lines)
    vectors, outcomes, anomalies = outcomes_for(reqs, lines)
    assert vectors.height == 60 and set(outcomes["outcome"]) == {"ok"} and anomalies.height == 0
    for row in vectors.iter_rows(named=True):
        np.testing.assert_array_equal(np.asarray(row["vector"], dtype=np.float32), hash_embedding(row["unit_id"], DIMS))


def test_missing_duplicate_unknown_and_malformed_lines_are_recorded() -> None:
    reqs = requests(4)
    ids, units = reqs["custom_id"].to_list(), reqs["unit_ids"].to_list()
    lines = [ok_line(ids[0], units[0]), ok_line(ids[0], units[0]), ok_line("emb-unknown", ["z"]),
             ok_line(ids[2], units[2])]
    data = to_bytes(lines) + b"{not json\n" + to_bytes([ok_line(ids[3], units[3])])
    frame, anomalies = join.read_embedding_lines(data, "outputs/x.jsonl")
    frame, dup = join.dedupe(frame, reqs["custom_id"], "shard x")
    vectors, outcomes = join.embedding_outcomes(reqs, frame, dims=DIMS, batch_ended_as="completed")
    codes = sorted(pl.concat([anomalies, dup])["code"].to_list())
    assert codes == ["duplicate_output", "malformed_line", "unknown_custom_id"]
    assert "line 5" in anomalies["message"][0]
    by = dict(zip(outcomes["custom_id"], outcomes["outcome"], strict=True))
    assert by == {ids[0]: "ok", ids[1]: "retry", ids[2]: "ok", ids[3]: "ok"}
    assert outcomes.filter(pl.col("custom_id") == ids[1])["code"][0] == "missing_output"
    assert vectors.height == 9


def test_wrong_dimensions_and_missing_index_fail_the_request() -> None:
    reqs = requests(3)
    ids, units = reqs["custom_id"].to_list(), reqs["unit_ids"].to_list()
    lines = [ok_line(ids[0], units[0], dims=DIMS + 1), ok_line(ids[1], units[1], drop=1), ok_line(ids[2], units[2])]
    vectors, outcomes, _ = outcomes_for(reqs, lines)
    fails = outcomes.filter(pl.col("outcome") == "fail").sort("custom_id")
    assert fails["custom_id"].to_list() == [ids[0], ids[1]]
    assert set(fails["code"]) == {"wrong_dimensions"}
    assert "8-dim" in fails["message"][0]
    assert vectors["custom_id"].unique().to_list() == [ids[2]]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [(None, "batch_expired", "requeue"), (None, "batch_cancelled", "requeue"), (429, "rate_limit_exceeded", "retry"),
     (500, "server_error", "retry"), (503, "x", "retry"), (400, "invalid_request", "fail"), (401, "bad_key", "fail"),
     (None, "weird", "retry")],
)
def test_error_lines_are_classified(status: int | None, code: str, expected: str) -> None:
    reqs = requests(1)
    _, outcomes, _ = outcomes_for(reqs, [err_line("emb-0", status, code)])
    row = outcomes.row(0, named=True)
    assert row["outcome"] == expected and row["code"] == code
    assert "emb-0" in row["message"]


def test_missing_line_after_expiry_is_requeued_not_retried() -> None:
    reqs = requests(2)
    _, outcomes, _ = outcomes_for(reqs, [ok_line("emb-0", reqs["unit_ids"][0].to_list())], ended="expired")
    assert outcomes.filter(pl.col("custom_id") == "emb-1")["outcome"][0] == "requeue"


def test_next_attempt_spends_budget_only_on_retries() -> None:
    reqs = requests(4).with_columns(spent=pl.Series([0, 2, 2, 0]), requeues=pl.lit(0, pl.Int64), line=pl.lit("{}"))
    outcomes = pl.DataFrame(
        [("emb-0", "requeue", "batch_expired", "m", None), ("emb-1", "requeue", "batch_expired", "m", None),
         ("emb-2", "retry", "server_error", "m", 500), ("emb-3", "fail", "invalid_request", "m", 400)],
        schema=join.OUTCOMES, orient="row",
    )
    nxt, failed = join.next_attempt(reqs, outcomes, max_attempts=3, max_requeues=3)
    assert nxt["custom_id"].to_list() == ["emb-0", "emb-1"]
    assert nxt["attempt"].to_list() == [2, 2] and nxt["spent"].to_list() == [0, 2]
    assert nxt["requeues"].to_list() == [1, 1]
    assert failed.sort("custom_id")["custom_id"].to_list() == ["emb-2", "emb-3"]


def test_requeues_are_bounded_by_max_requeues() -> None:
    reqs = requests(2).with_columns(spent=pl.lit(0, pl.Int64), requeues=pl.Series([2, 3]), line=pl.lit("{}"))
    outcomes = pl.DataFrame(
        [("emb-0", "requeue", "batch_expired", "m", None), ("emb-1", "requeue", "batch_cancelled", "m", None)],
        schema=join.OUTCOMES, orient="row",
    )
    nxt, failed = join.next_attempt(reqs, outcomes, max_attempts=3, max_requeues=3)
    assert nxt["custom_id"].to_list() == ["emb-0"] and nxt["requeues"].to_list() == [3]
    row = failed.row(0, named=True)
    assert row["custom_id"] == "emb-1" and row["code"] == "requeue_limit"
    assert "came back unfinished 4 times (last: batch_cancelled)" in row["message"]
