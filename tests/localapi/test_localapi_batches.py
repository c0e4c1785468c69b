"""Batches API: lifecycle, output format, embeddings, validation and listing."""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING

import httpx
import numpy as np
import openai
import pytest

from batchyard.localapi.executors import float_json_rows, hash_embedding
from batchyard.localapi.validation import validate_input

if TYPE_CHECKING:
    from conftest import Api, MakeApi


def test_lifecycle_to_completed_with_shuffled_output(api: Api) -> None:
    lines = [api.emb(f"req-{i:03d}", f"text number {i}") for i in range(50)]
    created = api.submit(lines, metadata={"run": "t1"})
    assert created.status == "validating" and created.id.startswith("batch_")
    assert created.expires_at == created.created_at + 24 * 3600
    assert created.request_counts is not None and created.request_counts.total == 0
    b = api.wait(created.id)
    assert b.status == "completed" and b.errors is None and b.error_file_id is None
    assert b.model == "text-embedding-3-small" and b.metadata == {"run": "t1"}
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at  # type: ignore[operator]
    assert b.failed_at is b.expired_at is b.cancelled_at is b.cancelling_at is None
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
        50,
        50,
        0,
    )
    assert b.usage is not None and b.usage.input_tokens > 0 and b.usage.output_tokens == 0
    assert b.usage.total_tokens == b.usage.input_tokens
    out_file = api.client.files.retrieve(b.output_file_id)  # type: ignore[arg-type]
    assert out_file.purpose == "batch_output" and out_file.filename == f"{b.id}_output.jsonl"
    out = api.lines(b.output_file_id)
    ids = [line["custom_id"] for line in out]
    assert sorted(ids) == [f"req-{i:03d}" for i in range(50)]
    assert ids != sorted(ids)  # shuffled
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"}
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["object"] == "list" and body["model"] == "text-embedding-3-small"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert (
        sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
        == b.usage.input_tokens
    )


def test_output_order_kept_without_shuffle(make_api: MakeApi) -> None:
    api = make_api(shuffle_output=False)
    b = api.run([api.emb(f"r{i:02d}", f"t{i}") for i in range(30)])
    assert [line["custom_id"] for line in api.lines(b.output_file_id)] == [
        f"r{i:02d}" for i in range(30)
    ]


def test_embeddings_float_base64_and_dimensions(api: Api) -> None:
    texts = ["alpha beta", "gamma", "délta ünicode ✓"]
    lines = [
        api.emb("float-default", texts[0]),
        api.emb("b64-default", texts[0], encoding_format="base64"),
        api.emb("float-64", texts, dimensions=64, encoding_format="float"),
        api.emb("b64-64", texts, dimensions=64, encoding_format="base64"),
        api.emb("too-big", "x", dimensions=5000),
    ]
    b = api.run(lines)
    assert (
        b.status == "completed" and b.request_counts.completed == 4 and b.request_counts.failed == 1
    )  # type: ignore[union-attr]
    out = api.by_id(b.output_file_id)

    def vectors(cid: str) -> list[np.ndarray]:
        data = out[cid]["response"]["body"]["data"]
        assert [d["index"] for d in data] == list(range(len(data)))
        assert all(d["object"] == "embedding" for d in data)
        return [
            np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            if isinstance(d["embedding"], str)
            else np.asarray(d["embedding"], dtype=np.float32)
            for d in data
        ]

    for cid in ("float-default", "b64-default"):
        (vec,) = vectors(cid)
        assert vec.shape == (1536,)
        np.testing.assert_array_equal(vec, hash_embedding(texts[0], 1536))
    for cid in ("float-64", "b64-64"):
        got = vectors(cid)
        assert len(got) == 3
        for text, vec in zip(texts, got, strict=True):
            np.testing.assert_array_equal(vec, hash_embedding(text, 64))
    err = api.by_id(b.error_file_id)["too-big"]
    assert err["error"] is None and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_embeddings_large_model_default_dimensions(api: Api) -> None:
    b = api.run([api.emb("a", "hello", model="text-embedding-3-large", encoding_format="base64")])
    (line,) = api.lines(b.output_file_id)
    vec = np.frombuffer(
        base64.b64decode(line["response"]["body"]["data"][0]["embedding"]), dtype="<f4"
    )
    np.testing.assert_array_equal(vec, hash_embedding("hello", 3072))


def test_hash_embedding_is_deterministic_unit_float32() -> None:
    v = hash_embedding("some text", 256)
    assert v.dtype == np.float32 and v.shape == (256,)
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-6
    np.testing.assert_array_equal(v, hash_embedding("some text", 256))
    assert not np.array_equal(v, hash_embedding("some text!", 256))


def test_float_json_rows_round_trip_exactly() -> None:
    rng = np.random.default_rng(7)
    m = (rng.standard_normal((40, 33)) * 10.0 ** rng.integers(-40, 37, (40, 33))).astype(np.float32)
    m[0, :4] = [0.0, -0.0, 1.0, -1.0]
    rows = float_json_rows(m)
    back = np.array([json.loads(r) for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(back, m)


def test_batch_create_rejections(api: Api) -> None:
    c = api.client
    fid = api.upload([api.emb("a", "x")])
    bad = [
        {"completion_window": "1h"},
        {"endpoint": "/v1/unknown"},
        {"endpoint": "/v1/completions"},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"metadata": {"k" * 65: "v"}},
        {"metadata": {"k": "v" * 513}},
        {"input_file_id": "file-doesnotexist"},
        {"output_expires_after": {"anchor": "created_at", "seconds": 10}},
    ]
    for override in bad:
        params = {
            "input_file_id": fid,
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            **override,
        }
        with pytest.raises(openai.BadRequestError):
            c.batches.create(**params)  # type: ignore[arg-type]
    wrong_purpose = c.files.create(file=("u.jsonl", b"{}"), purpose="user_data").id
    with pytest.raises(openai.BadRequestError) as exc:
        c.batches.create(
            input_file_id=wrong_purpose, endpoint="/v1/embeddings", completion_window="24h"
        )
    assert exc.value.param == "input_file_id"
    r = httpx.post(f"{api.server.base_url}/batches", json={"endpoint": "/v1/embeddings"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        c.batches.cancel("batch_nope")
    ok = c.batches.create(
        input_file_id=fid,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={f"k{i}": "v" * 512 for i in range(16)},
        output_expires_after={"anchor": "created_at", "seconds": 3600},
    )
    done = api.wait(ok.id)
    assert done.status == "completed"
    out = c.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert out.expires_at == out.created_at + 3600
    with pytest.raises(openai.BadRequestError):
        c.batches.cancel(done.id)


def test_batch_list_newest_first_with_cursor(api: Api) -> None:
    c = api.client
    fid = api.upload([api.emb("a", "x")])
    ids = [
        c.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h").id
        for _ in range(5)
    ]
    page = c.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more is True
    nxt = c.batches.list(limit=2, after=ids[3])
    assert [b.id for b in nxt.data] == [ids[2], ids[1]] and nxt.has_more is True
    last = c.batches.list(limit=2, after=ids[1])
    assert [b.id for b in last.data] == [ids[0]] and last.has_more is False
    assert [b.id for b in c.batches.list(limit=2)] == ids[::-1]  # SDK auto-pagination
    raw = httpx.get(f"{api.server.base_url}/batches", params={"limit": 2}).json()
    assert (raw["object"], raw["first_id"], raw["last_id"]) == ("list", ids[4], ids[3])
    with pytest.raises(openai.BadRequestError):
        c.batches.list(limit=101)


def _errors(
    api: Api, lines: list[object], endpoint: str = "/v1/embeddings"
) -> list[dict[str, object]]:
    b = api.run(lines, endpoint)
    assert b.status == "failed" and b.failed_at is not None and b.in_progress_at is None
    assert b.output_file_id is None and b.errors is not None and b.errors.object == "list"
    return [e.model_dump() for e in b.errors.data or []]


def test_validation_failures_report_codes_and_lines(api: Api) -> None:
    good = api.emb("ok-1", "fine")
    errs = _errors(
        api,
        [
            good,  # line 1
            '{"custom_id": "broken", "method": ',  # line 2: not JSON
            api.emb("ok-1", "again"),  # line 3: duplicate
            {**api.emb("url", "x"), "url": "/v1/chat/completions"},  # line 4: wrong url
            {**api.emb("get", "x"), "method": "GET"},  # line 5: wrong method
            {"custom_id": "nobody", "method": "POST", "url": "/v1/embeddings"},  # line 6: no body
            {**api.emb("nocid", "x"), "custom_id": None},  # line 7: no custom_id
        ],
    )
    by_line = {e["line"]: e for e in errs}
    assert by_line[2]["code"] == "invalid_json_line"
    assert by_line[2]["message"] == "This line is not parseable as valid JSON."
    assert by_line[3]["code"] == "duplicate_custom_id" and by_line[3]["param"] == "custom_id"
    assert by_line[4]["code"] == "url_mismatch"
    assert by_line[5]["param"] == "method"
    assert by_line[6]["code"] == "missing_required_parameter" and by_line[6]["param"] == "body"
    assert by_line[7]["param"] == "custom_id"
    assert 1 not in by_line


def test_validation_two_models_empty_input_too_many_inputs_empty_file(api: Api) -> None:
    (e,) = _errors(api, [api.emb("a", "x"), api.emb("b", "y", model="text-embedding-3-large")])
    assert (e["code"], e["line"], e["param"]) == ("model_mismatch", 2, "body.model")
    (e,) = _errors(api, [api.emb("a", "x"), api.emb("b", ["fine", ""])])
    assert (e["line"], e["param"]) == (2, "body.input") and "empty" in str(e["message"])
    (e,) = _errors(api, [api.emb("a", ["w"] * 2049)])
    assert e["line"] == 1 and "2048" in str(e["message"])
    (e,) = _errors(api, ["", "  "])
    assert e["code"] == "empty_file"
    (e,) = _errors(api, [api.chat("c", "hi")], "/v1/embeddings")
    assert e["code"] == "url_mismatch"


def test_validate_input_limits_on_tokens_and_total_inputs() -> None:
    long = "hello " * 9000
    res = validate_input(
        json.dumps(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "text-embedding-3-small", "input": ["ok", long]},
            }
        ).encode(),
        "/v1/embeddings",
    )
    assert not res.ok and "8192" in res.errors[0]["message"] and res.errors[0]["line"] == 1
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "m", "input": ["a"] * 2000},
            }
        )
        for i in range(26)
    ]
    res = validate_input("\n".join(lines).encode(), "/v1/embeddings")
    assert [e["code"] for e in res.errors] == ["too_many_inputs"]
    ok = validate_input("\n".join(lines[:25]).encode(), "/v1/embeddings")
    assert ok.ok and ok.model == "m" and len(ok.requests) == 25 and ok.total_tokens == 50_000


def test_slow_phases_are_observable(make_api: MakeApi) -> None:
    api = make_api(validating_s=0.3, finalizing_s=0.3, seconds_per_request=0.05)
    b = api.submit([api.emb(f"r{i}", f"t{i}") for i in range(6)])
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cur = api.client.batches.retrieve(b.id)
        if not seen or seen[-1] != cur.status:
            seen.append(cur.status)
        if cur.status == "completed":
            break
        time.sleep(0.02)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
