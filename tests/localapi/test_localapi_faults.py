"""Fault injection: every batch outcome the pipeline must handle."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import openai

from batchyard.localapi.faults import request_error_hit
from batchyard.localapi.shapes import EXPIRED_MESSAGE

if TYPE_CHECKING:
    from conftest import Api, MakeApi


def _emb_lines(api: Api, n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [api.emb(f"{prefix}{i:02d}", f"text {prefix} {i}") for i in range(n)]


def test_expiry_delivers_partial_output(make_api: MakeApi) -> None:
    api = make_api(faults={"expire_after_requests": 3, "expire_batches": 1})
    b = api.run(_emb_lines(api, 10))
    assert b.status == "expired" and b.expired_at is not None and b.completed_at is None
    assert b.request_counts.completed == 3 and b.request_counts.total == 10  # type: ignore[union-attr]
    out, err = api.by_id(b.output_file_id), api.by_id(b.error_file_id)
    assert (
        len(out) == 3 and len(err) == 7 and set(out) | set(err) == {f"r{i:02d}" for i in range(10)}
    )
    for line in err.values():
        assert line["response"] is None
        assert line["error"] == {"code": "batch_expired", "message": EXPIRED_MESSAGE}
    again = api.run(_emb_lines(api, 10))  # only the first batch expires
    assert again.status == "completed"
    assert api.server.store.counters()["expired"] == 1


def test_cancel_by_client_keeps_partial_results(make_api: MakeApi) -> None:
    api = make_api(seconds_per_request=0.03, faults={"cancelling_s": 0.4})
    b = api.submit(_emb_lines(api, 40))
    api.wait(b.id, ("in_progress",))
    time.sleep(0.2)
    cancelled = api.client.batches.cancel(b.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    time.sleep(0.15)
    assert api.client.batches.retrieve(b.id).status == "cancelling"  # held for cancelling_s
    assert api.client.batches.cancel(b.id).status == "cancelling"  # idempotent
    done = api.wait(b.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    out, err = api.by_id(done.output_file_id), api.by_id(done.error_file_id)
    assert 0 < len(out) < 40 and len(out) + len(err) == 40
    assert {line["error"]["code"] for line in err.values()} == {"batch_cancelled"}
    assert done.request_counts.completed == len(out)  # type: ignore[union-attr]


def test_cancel_while_validating(make_api: MakeApi) -> None:
    api = make_api(validating_s=5)
    b = api.submit(_emb_lines(api, 3))
    assert api.client.batches.cancel(b.id).status == "cancelling"
    done = api.wait(b.id)
    assert done.status == "cancelled" and done.in_progress_at is None
    assert done.output_file_id is None and done.error_file_id is None


def test_server_initiated_cancel(make_api: MakeApi) -> None:
    api = make_api(faults={"cancel_after_requests": 4, "cancel_batches": 1, "cancelling_s": 0.3})
    b = api.submit(_emb_lines(api, 12))
    seen = api.wait(b.id, ("cancelling", "cancelled", "completed"))
    assert seen.status == "cancelling"
    done = api.wait(b.id)
    assert done.status == "cancelled"
    assert len(api.lines(done.output_file_id)) == 4 and len(api.lines(done.error_file_id)) == 8
    assert api.run(_emb_lines(api, 12)).status == "completed"  # only the first batch
    assert api.server.store.counters()["cancelled_by_server"] == 1


def test_enqueued_token_cap(make_api: MakeApi) -> None:
    api = make_api(seconds_per_request=0.15, faults={"enqueued_token_cap": 60})
    slow = api.submit([api.emb(f"a{i}", "one two three four five") for i in range(8)])  # 40 tokens
    api.wait(slow.id, ("in_progress",))
    blocked = api.run([api.emb(f"b{i}", "one two three four five") for i in range(5)])  # +25 > 60
    assert blocked.status == "failed" and blocked.errors is not None
    (err,) = blocked.errors.data or []
    assert err.code == "token_limit_exceeded"
    assert err.message is not None and err.message.startswith(
        "Enqueued token limit reached for text-embedding-3-small"
    )
    other_model = api.run([api.emb("c", "one two three", model="text-embedding-3-large")])
    assert other_model.status == "completed"
    too_big = api.run(
        [
            api.emb(
                f"d{i}",
                "one two three four five six seven eight nine ten",
                model="text-embedding-ada-002",
            )
            for i in range(7)
        ]
    )
    assert too_big.status == "failed"  # 70 tokens alone exceed the cap
    assert api.wait(slow.id).status == "completed"
    fits = api.run([api.emb(f"e{i}", "one two three four five") for i in range(5)])
    assert fits.status == "completed"  # the earlier batch no longer counts


def test_validation_failure_fault_first_batch_only(make_api: MakeApi) -> None:
    api = make_api(faults={"validation_failure": True, "validation_fail_batches": 1})
    first = api.run(_emb_lines(api, 2))
    assert first.status == "failed" and first.errors.data[0].code == "invalid_request"  # type: ignore[union-attr,index]
    assert api.run(_emb_lines(api, 2)).status == "completed"


def test_request_error_rate_is_deterministic(make_api: MakeApi) -> None:
    api = make_api(faults={"request_error_rate": 0.3, "request_error_status": 503, "seed": 11,
                           "request_error_sticky": True})
    lines = _emb_lines(api, 40)
    b = api.run(lines)
    expected = {x["custom_id"] for x in lines if request_error_hit(11, x["custom_id"], 0.3)}
    assert 0 < len(expected) < 40
    err = api.by_id(b.error_file_id)
    assert set(err) == expected
    assert b.request_counts.failed == len(expected)  # type: ignore[union-attr]
    for line in err.values():
        assert line["response"]["status_code"] == 503 and line["error"] is None
        assert line["response"]["body"]["error"]["type"] == "server_error"


def test_all_requests_failed_is_completed_without_output(make_api: MakeApi) -> None:
    api = make_api(faults={"request_error_rate": 1.0})
    b = api.run(_emb_lines(api, 5))
    assert b.status == "completed" and b.output_file_id is None
    assert len(api.lines(b.error_file_id)) == 5
    assert (b.request_counts.completed, b.request_counts.failed) == (0, 5)  # type: ignore[union-attr]


def test_transient_errors_seen_raw_and_absorbed_by_sdk(make_api: MakeApi) -> None:
    api = make_api(max_retries=12, faults={"transient_error_rate": 0.3, "seed": 3})
    statuses: Counter[int] = Counter()
    with httpx.Client() as raw:
        for _ in range(60):
            r = raw.get(f"{api.server.base_url}/batches")
            statuses[r.status_code] += 1
            if r.status_code != 200:
                assert r.json()["error"]["message"]
            if r.status_code == 429:
                assert r.headers["retry-after"] == "0"
    assert statuses[200] > 0 and {429, 500, 503} <= set(statuses)
    b = api.run(_emb_lines(api, 5))  # upload, create, polls, downloads: all retried by the SDK
    assert b.status == "completed" and len(api.lines(b.output_file_id)) == 5
    no_retry = openai.OpenAI(base_url=api.server.base_url, api_key="k", max_retries=0)
    errors = 0
    for _ in range(20):
        try:
            no_retry.batches.list()
        except (openai.RateLimitError, openai.InternalServerError):
            errors += 1
    assert errors > 0
