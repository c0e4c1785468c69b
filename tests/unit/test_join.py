"""Join: outputs back to planned requests on custom_id; every planned input exactly once."""

from __future__ import annotations

import base64
import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

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


# the msgspec/block-base64 join against the Polars join it replaced (benchmarks/join_reference.py)


def previous_join() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "join_reference.py"
    spec = importlib.util.spec_from_file_location("join_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAULTS = ["ok", "dup_line", "unknown", "missing", "http400", "http500", "http429_no_code", "expired", "weird",
          "longer", "shorter", "drop_index", "dup_index", "index_out_of_range", "negative_index", "null_index",
          "bad_char", "whitespace", "unpadded", "escaped_slash", "null_embedding", "float_list_embedding",
          "empty_data", "null_body"]


def faulty_line(fault: str, cid: str, units: list[str], dims: int) -> list[str]:
    """The output line(s) of one request with one fault (see FAULTS)."""
    line = ok_line(cid, units, dims=dims, drop=0 if fault == "drop_index" else None)
    data = line["response"]["body"]["data"]
    first = data[0] if data else {}
    extra = {"index": 0, "embedding": base64.b64encode(hash_embedding("x", dims).tobytes()).decode()}
    if fault == "longer" or fault == "shorter":
        first["embedding"] = base64.b64encode(hash_embedding("x", dims + (1 if fault == "longer" else -1)).tobytes()).decode()
    elif fault in ("dup_index", "index_out_of_range", "negative_index"):
        data.append({**extra, "index": {"dup_index": 0, "index_out_of_range": 99, "negative_index": -1}[fault]})
    elif fault == "null_index":
        first["index"] = None
    elif fault == "bad_char":
        first["embedding"] = "!" + first["embedding"][1:]
    elif fault == "whitespace":
        first["embedding"] = first["embedding"][:4] + " " + first["embedding"][4:]
    elif fault == "unpadded":
        first["embedding"] = first["embedding"].rstrip("=")
    elif fault.endswith("_embedding"):
        first["embedding"] = {"null_embedding": None, "float_list_embedding": [0.5] * dims}[fault]
    elif fault == "empty_data":
        data.clear()
    elif fault == "null_body":
        line["response"]["body"] = None
    elif fault in ("http400", "http500", "expired", "weird"):
        line = err_line(cid, int(fault[4:]) if fault.startswith("http") else None,
                        {"expired": "batch_expired", "weird": "weird"}.get(fault, "c" + fault))
    elif fault == "http429_no_code":
        line = err_line(cid, 429, "x")
        line["response"]["body"]["error"].update(code=None, message="")
    text = json.dumps(line)
    if fault == "escaped_slash":
        text = text.replace("/", "\\/")
    return {"missing": [], "dup_line": [text, text], "unknown": [text, text.replace(cid, cid + "-zz")]}.get(fault, [text])


def parse_with(module: ModuleType, reqs: pl.DataFrame, output: bytes, errors: bytes, dims: int, ended: str
               ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """`EmbeddingsJob.parse_attempt` with `module`'s read_embedding_lines and embedding_outcomes."""
    out_lines, a1 = module.read_embedding_lines(output, "outputs/x.jsonl")
    err_lines, a2 = module.read_embedding_lines(errors, "errors/x.jsonl")
    lines, a3 = join.dedupe(pl.concat([out_lines, err_lines]), reqs["custom_id"], "shard x")
    vectors, outcomes = module.embedding_outcomes(reqs, lines, dims=dims, batch_ended_as=ended)
    return vectors.sort("unit_id"), outcomes.sort("custom_id"), pl.concat([a1, a2, a3]).sort("source", "line")


@pytest.mark.parametrize(("dims", "ended"), [(6, "completed"), (7, "expired"), (8, "completed")])
def test_same_vectors_outcomes_and_anomalies_as_the_previous_polars_join(dims: int, ended: str) -> None:
    rng = random.Random(dims)
    reqs = pl.DataFrame({"custom_id": [f"emb-{i}" for i in range(3 * len(FAULTS))],
                         "unit_ids": [[f"c{i}-{j}" for j in range(rng.randint(1, 4))] for i in range(3 * len(FAULTS))]})
    lines = [text for i, (cid, units) in enumerate(zip(reqs["custom_id"], reqs["unit_ids"].to_list(), strict=True))
             for text in faulty_line(FAULTS[i % len(FAULTS)], cid, units, dims)]
    rng.shuffle(lines)
    cut = len(lines) * 2 // 3
    output = ("\n".join(lines[:cut]) + "\n").encode()
    errors = ("\n".join(lines[cut:]) + "\n{not json\n").encode()
    new = parse_with(join, reqs, output, errors, dims, ended)
    old = parse_with(previous_join(), reqs, output, errors, dims, ended)
    assert new[0].height > 0 and set(new[1]["code"].drop_nulls()) >= {"wrong_dimensions", "missing_output"}
    assert new[0].equals(old[0]) and new[1].equals(old[1])
    # the malformed line's message quotes the parser's own error, which differs
    assert new[2].drop("message").equals(old[2].drop("message"))
    assert "malformed_line" in new[2]["code"].to_list()


def test_lines_of_the_wrong_types_are_malformed_instead_of_failing_the_parse() -> None:
    reqs = requests(3)
    ids, units = reqs["custom_id"].to_list(), reqs["unit_ids"].to_list()
    bad_index = ok_line(ids[1], units[1])
    bad_index["response"]["body"]["data"][0]["index"] = "0"
    bad_status = err_line(ids[2], 500, "server_error")
    bad_status["response"]["status_code"] = "500"
    data = to_bytes([ok_line(ids[0], units[0]), bad_index, {"custom_id": 7}, bad_status])
    frame, anomalies = join.read_embedding_lines(data, "outputs/x.jsonl")
    assert anomalies["line"].to_list() == [2, 3, 4] and set(anomalies["code"]) == {"malformed_line"}
    assert "$.response.body.data[0].index" in anomalies["message"][0]
    assert "$.custom_id" in anomalies["message"][1]
    frame, _ = join.dedupe(frame, reqs["custom_id"], "shard x")
    vectors, outcomes = join.embedding_outcomes(reqs, frame, dims=DIMS, batch_ended_as="completed")
    assert dict(zip(outcomes["custom_id"], outcomes["code"], strict=True)) == {
        ids[0]: None, ids[1]: "missing_output", ids[2]: "missing_output"}
    assert vectors.height == 3


def test_a_numeric_error_code_is_kept_as_text() -> None:
    line = err_line("emb-0", None, "x")
    line["error"]["code"] = 1234
    _, outcomes, anomalies = outcomes_for(requests(1), [line])
    assert anomalies.height == 0
    assert outcomes.row(0) == ("emb-0", "retry", "1234", "request emb-0: x happened", None)


def test_a_truncated_vector_fails_its_request_with_the_bytes_it_held() -> None:
    reqs = requests(2)
    ids, units = reqs["custom_id"].to_list(), reqs["unit_ids"].to_list()
    cut = ok_line(ids[0], units[0])
    entry = next(d for d in cut["response"]["body"]["data"] if d["index"] == 1)
    entry["embedding"] = entry["embedding"][:-4]  # the last quad lost: 32 bytes -> 30
    vectors, outcomes, _ = outcomes_for(reqs, [cut, ok_line(ids[1], units[1])])
    row = outcomes.filter(pl.col("custom_id") == ids[0]).row(0, named=True)
    assert row["code"] == "wrong_dimensions"
    assert row["message"] == f"request {ids[0]}: 1 input(s) without a 8-dim vector (first: input 1, got 30 bytes)"
    assert vectors["custom_id"].unique().to_list() == [ids[1]]


def test_an_embedding_that_is_not_a_string_holds_no_bytes() -> None:
    # the Polars join read the number 1234 as the text "1234", which decodes to 3 bytes
    reqs = requests(1)
    line = ok_line("emb-0", reqs["unit_ids"][0].to_list())
    line["response"]["body"]["data"][0]["embedding"] = 1234
    _, outcomes, _ = outcomes_for(reqs, [line])
    assert outcomes["code"][0] == "wrong_dimensions" and outcomes["message"][0].endswith("got 0 bytes)")
