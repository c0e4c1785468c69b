"""The real-time lane against the local server's synchronous endpoints, through the real SDK.

Rates are checked from the server's side, over exact windows: it records when each call arrived.
The client's limiter grants a call a few ms before the server sees it, and those delays vary
(a burst of calls queues at the server), so the lane counts each window `MARGIN_S` longer
(`arrival_margin_s`) and calls delayed unevenly by up to that still arrive within the rates.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import openai
import polars as pl
import pytest

from batchyard.clients.realtime import (
    LaneResult,
    RateLimits,
    RealtimeSettings,
    compact_json,
    merge_embeddings,
    parse_lines,
    plan_calls,
    retry_after_s,
    run_shard,
    usage_of,
)
from batchyard.errors import ApiTerminalError
from batchyard.localapi.sync import SyncCall
from batchyard.schemas import CHUNKS
from batchyard.settings import LimitsSettings
from batchyard.stages import plan
from batchyard.stages.join import (
    dedupe,
    embedding_outcomes,
    inference_outcomes,
    read_embedding_lines,
    read_json_lines,
)
from batchyard.tasks import get_task
from batchyard.tokens import count_tokens

if TYPE_CHECKING:
    from batchyard.localapi.runner import LocalServer
    from conftest import ServerFactory

REPO_PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
MARGIN_S = 0.3
DIMS = 8
FAST = {"backoff_base_s": 0.02, "backoff_max_s": 0.1}


# --------------------------------------------------------------------------- request rows
def embedding_rows(n: int, per_request: int = 2, prefix: str = "text") -> pl.DataFrame:
    """Planned `/v1/embeddings` request rows (custom_id, unit_ids, tokens, line, ...)."""
    texts = [f"{prefix} {i}: revenue rose {i}% in quarter {i % 4 + 1}" for i in range(n)]
    chunks = pl.DataFrame(
        {
            "chunk_id": [f"acme/doc/{i:05d}" for i in range(n)],
            "source_id": [f"'acme/doc/{i:05d}'" for i in range(n)],
            "id_kind": ["str"] * n,
            "company_id": ["acme"] * n,
            "document_id": ["doc"] * n,
            "chunk_index": list(range(n)),
            "text": texts,
            "text_sha256": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
        },
        schema=CHUNKS,
    )
    limits = LimitsSettings(max_inputs_per_request=per_request)
    ok, _ = plan.prepare_inputs(chunks, limits=limits, encoding="cl100k_base")
    return plan.embedding_requests(ok, model="text-embedding-3-small", dimensions=DIMS, limits=limits)


def classify_rows(texts: Sequence[str]) -> pl.DataFrame:
    """Planned `classify` request rows (one per chunk)."""
    task = get_task("classify")
    units = pl.DataFrame(
        {
            "unit_id": [f"c{i}" for i in range(len(texts))],
            "company_id": ["acme"] * len(texts),
            "document_id": ["d1"] * len(texts),
            "text": list(texts),
        }
    )
    bodies = task.request_bodies(
        units, model="gpt-4o-mini", endpoint=None, temperature=0.0, max_output_tokens=300,
        prompts_dir=REPO_PROMPTS,
    )
    bodies = bodies.with_columns(tokens=pl.Series(count_tokens(bodies["body"].to_list()), dtype=pl.Int64))
    return plan.inference_requests(bodies, endpoint=task.endpoint)


def pairs(rows: pl.DataFrame) -> list[tuple[str, int]]:
    return list(zip(rows["line"].to_list(), rows["tokens"].to_list(), strict=True))


# --------------------------------------------------------------------------- the two lanes
def sdk(server: LocalServer, key: str = "test") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key)


def lane(server: LocalServer, rows: pl.DataFrame, **settings: Any) -> LaneResult:
    return run_shard(sdk(server), pairs(rows), RealtimeSettings(**settings))


def batch_lane(server: LocalServer, rows: pl.DataFrame, endpoint: str) -> tuple[bytes, bytes]:
    """Output and error bytes of the same lines sent as one batch."""
    client = sdk(server)
    file_id = client.files.create(file=("s.jsonl", plan.shard_bytes(rows["line"])), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    deadline = time.monotonic() + 20
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"

    def content(file_id: str | None) -> bytes:
        return client.files.content(file_id).content if file_id else b""

    return content(batch.output_file_id), content(batch.error_file_id)


# --------------------------------------------------------------------------- reading the bytes
class _Line(msgspec.Struct):
    custom_id: str
    response: dict[str, msgspec.Raw] | None = None
    error: dict[str, Any] | None = None


def lines_of(data: bytes) -> list[_Line]:
    return msgspec.json.Decoder(_Line).decode_lines(data)


def raw_bodies(data: bytes) -> dict[str, bytes]:
    """custom_id -> the exact bytes of `response.body`."""
    return {ln.custom_id: bytes(ln.response["body"]) for ln in lines_of(data) if ln.response}


def assert_each_once(rows: pl.DataFrame, result: LaneResult) -> None:
    """Every planned custom_id is in exactly one line of the output or the errors."""
    seen = Counter(ln.custom_id for ln in lines_of(result.output) + lines_of(result.errors))
    assert sorted(seen) == sorted(rows["custom_id"].to_list())
    assert set(seen.values()) == {1}


def embedding_join(rows: pl.DataFrame, output: bytes, errors: bytes) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What `EmbeddingsJob.parse_attempt` does with an attempt's files: vectors and outcomes."""
    out, a1 = read_embedding_lines(output, "output")
    err, a2 = read_embedding_lines(errors, "errors")
    lines, a3 = dedupe(pl.concat([out, err]), rows["custom_id"], "shard")
    assert a1.height == a2.height == a3.height == 0
    return embedding_outcomes(rows, lines, dims=DIMS, batch_ended_as="completed")


def outcome_of(outcomes: pl.DataFrame) -> dict[str, tuple[str, str | None]]:
    return {r["custom_id"]: (r["outcome"], r["code"]) for r in outcomes.iter_rows(named=True)}


# --------------------------------------------------------------------------- server-side checks
def busiest(calls: list[SyncCall], window_s: float, weight: Callable[[SyncCall], int] = lambda c: 1) -> int:
    """The most calls (or tokens) that arrived within any window of `window_s` seconds."""
    return max(
        (sum(weight(d) for d in calls[i:] if d.at < c.at + window_s) for i, c in enumerate(calls)),
        default=0,
    )


def settled_calls(server: LocalServer, attempts: int) -> list[SyncCall]:
    """The server's record once it holds `attempts` calls (a slow call is recorded when answered)."""
    deadline = time.monotonic() + 5
    while len(calls := server.sync_calls()) < attempts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(calls) == attempts
    return calls


def by_body(calls: list[SyncCall]) -> dict[str, list[SyncCall]]:
    out: dict[str, list[SyncCall]] = {}
    for c in calls:
        out.setdefault(c.digest, []).append(c)
    return out


# =========================================================================== same answers
def test_embeddings_lane_gives_the_batch_lanes_bodies_byte_for_byte(start_server: ServerFactory) -> None:
    server = start_server()
    rows = embedding_rows(9, per_request=2)
    assert rows.height == 5
    batch_out, batch_err = batch_lane(server, rows, "/v1/embeddings")
    result = lane(server, rows, concurrency=3)
    assert batch_err == b"" and result.errors == b""
    assert_each_once(rows, result)
    assert raw_bodies(result.output) == raw_bodies(batch_out)
    # the join reads both unchanged: the same vectors, every request ok
    (v1, o1), (v2, o2) = embedding_join(rows, batch_out, b""), embedding_join(rows, result.output, b"")
    assert set(o2["outcome"]) == {"ok"} and o1.sort("custom_id").equals(o2.sort("custom_id"))
    assert v1.sort("unit_id").equals(v2.sort("unit_id")) and v2.height == 9
    line = json.loads(result.output.splitlines()[0])
    assert line.keys() == {"id", "custom_id", "response", "error"} and line["error"] is None
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
    assert result.stats.requests == result.stats.attempts == result.stats.succeeded == 5


def test_chat_lane_gives_the_batch_lanes_parsed_outputs(start_server: ServerFactory) -> None:
    server = start_server(faults={"text_markers": True})
    rows = classify_rows([
        "Revenue grew 5% to EUR 10m on strong demand.",
        "The board approved a new buyback programme.",
        "Refuse this one [[fault:refusal]]",
        "Bad request here [[fault:error400]]",
    ])
    task = get_task("classify")

    def parse(output: bytes, errors: bytes) -> tuple[pl.DataFrame, dict[str, tuple[str, str | None]]]:
        """What `InferenceJob.parse_attempt` does with an attempt's files."""
        lines = read_json_lines(output, "output")[0] + read_json_lines(errors, "errors")[0]
        parsed, outcomes = inference_outcomes(task, task.endpoint, rows, lines, batch_ended_as="completed")
        return parsed.sort("custom_id"), outcome_of(outcomes)

    in_batch = parse(*batch_lane(server, rows, task.endpoint))
    result = lane(server, rows)
    in_lane = parse(result.output, result.errors)
    assert in_lane[0].equals(in_batch[0]) and in_lane[0].height == 3
    assert in_lane[1] == in_batch[1]
    assert in_lane[1]["u-c0"] == ("ok", None)
    assert in_lane[1]["u-c2"] == ("fail", "refusal")
    assert in_lane[1]["u-c3"][0] == "fail"  # a 400 is final...
    assert result.stats.retries == Counter()  # ...and not retried


# =========================================================================== rates
def test_a_429_storm_finishes_within_the_rates_and_stores_each_result_once(
    start_server: ServerFactory,
) -> None:
    server = start_server(faults={"sync_429_rate": 0.5, "sync_retry_after_s": 0.5, "seed": 11})
    rows = embedding_rows(32, per_request=2)
    settings = {"requests_per_minute": 600, "rate_window_s": 1.0, "arrival_margin_s": MARGIN_S,
                "concurrency": 8, "max_retries": 8, **FAST}
    result = lane(server, rows, **settings)

    assert result.errors == b"" and result.stats.succeeded == rows.height == 16
    assert_each_once(rows, result)
    calls = server.sync_calls()
    throttled = [c for c in calls if c.status == 429]
    assert len(throttled) >= 10  # a storm indeed
    assert result.stats.retries == Counter({"429": len(throttled)})
    assert result.stats.attempts == len(calls) == rows.height + len(throttled)
    # never more than 600/min, enforced per second (10), as the server saw the calls arrive
    assert busiest(calls, 1.0) <= 10
    # every retry came no sooner than Retry-After (retry-after-ms: 500) after the 429
    for seq in by_body(calls).values():
        assert [c.status for c in seq][-1] == 200
        assert all(b.at - a.at >= 0.5 for a, b in itertools.pairwise(seq))
    outcomes = embedding_join(rows, result.output, result.errors)[1]
    assert set(outcomes["outcome"]) == {"ok"}


def test_tokens_per_minute_bound_the_lane(start_server: ServerFactory) -> None:
    server = start_server()
    rows = embedding_rows(16, per_request=2)
    per_request = max(rows["tokens"].to_list())
    budget = 3 * per_request  # tokens per second: three requests at most
    t0 = time.monotonic()
    result = lane(
        server, rows, tokens_per_minute=budget * 60, rate_window_s=1.0, arrival_margin_s=MARGIN_S, concurrency=8
    )
    elapsed = time.monotonic() - t0
    assert result.errors == b""
    calls = server.sync_calls()
    total = int(rows["tokens"].sum())
    assert sum(c.tokens for c in calls) == total  # the server counts the tokens the plan did
    assert busiest(calls, 1.0, lambda c: c.tokens) <= budget
    # `budget` tokens per second: all of them took at least ceil(total / budget) - 1 seconds
    assert elapsed >= (math.ceil(total / budget) - 1) * (1.0 + MARGIN_S) >= 1
    assert result.stats.rate_wait_s > 0


def test_rate_limits_grant_requests_and_tokens_together() -> None:
    limits = RateLimits(
        RealtimeSettings(requests_per_minute=1200, tokens_per_minute=6000, rate_window_s=0.5, arrival_margin_s=0.1)
    )
    assert (limits.max_requests, limits.max_tokens, limits.unit) == (10, 50, 1)
    granted: list[tuple[float, int]] = []
    lock = threading.Lock()

    def take(tokens: int) -> None:
        for _ in range(8):
            limits.acquire(tokens)
            with lock:
                granted.append((time.monotonic(), tokens))

    threads = [threading.Thread(target=take, args=(t,)) for t in (1, 1, 9, 9)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted.sort()
    window = 0.5  # windows are counted 0.5 + 0.1 s long: a thread may record its grant late
    for i, (at, _) in enumerate(granted):
        inside = [tok for t, tok in granted[i:] if t < at + window]
        assert len(inside) <= 10 and sum(inside) <= 50
    # 160 tokens, 50 per (0.5 + 0.1) s: the last ones wait for three windows to pass
    assert time.monotonic() - t0 >= 3 * 0.6


def test_token_units_keep_the_log_small_and_the_sum_within_budget() -> None:
    limits = RateLimits(RealtimeSettings(tokens_per_minute=60_000_000))
    assert limits.unit == 600 and limits.max_tokens // limits.unit == 100_000
    assert limits.fits(60_000_000) and not limits.fits(60_000_001)


# =========================================================================== errors and retries
def test_5xx_and_timeouts_are_retried_and_stored_once(start_server: ServerFactory) -> None:
    server = start_server(faults={"sync_5xx_rate": 0.3, "sync_slow_rate": 0.25, "sync_slow_s": 0.6, "seed": 5})
    rows = embedding_rows(24, per_request=2)
    result = lane(server, rows, timeout_s=0.3, max_retries=10, concurrency=6, **FAST)
    assert result.errors == b"" and result.stats.succeeded == 12
    assert_each_once(rows, result)
    reasons = result.stats.retries
    assert reasons["timeout"] >= 1 and sum(n for r, n in reasons.items() if r.startswith("5")) >= 1
    calls = settled_calls(server, result.stats.attempts)
    # a timed-out call was still answered 200 by the server: the output holds it only once
    assert sum(c.status == 200 for c in calls) > 12


def test_retries_that_run_out_become_error_lines_the_join_retries(start_server: ServerFactory) -> None:
    server = start_server(faults={"sync_429_rate": 1.0, "sync_retry_after_s": 0.05})
    rows = embedding_rows(6, per_request=2)
    result = lane(server, rows, max_retries=2, **FAST)
    assert result.output == b"" and result.stats.errors == 3
    assert_each_once(rows, result)
    for raw in result.errors.splitlines():
        response = json.loads(raw)["response"]
        assert response["status_code"] == 429
        assert response["body"]["error"]["code"] == "rate_limit_exceeded"
    calls = server.sync_calls()
    assert len(calls) == 9 and result.stats.retries == Counter({"429": 6})
    for seq in by_body(calls).values():  # retry-after-ms: 50 honoured
        assert all(b.at - a.at >= 0.05 for a, b in itertools.pairwise(seq))
    assert set(outcome_of(embedding_join(rows, b"", result.errors)[1]).values()) == {
        ("retry", "rate_limit_exceeded")
    }

    slow = start_server(faults={"sync_slow_rate": 1.0, "sync_slow_s": 0.4})
    timed_out = lane(slow, rows, timeout_s=0.1, max_retries=1, **FAST)
    assert timed_out.output == b"" and timed_out.stats.retries == Counter({"timeout": 3})
    codes = {ln.error["code"] for ln in lines_of(timed_out.errors) if ln.error}
    assert codes == {"timeout"}
    assert {o for o, _ in outcome_of(embedding_join(rows, b"", timed_out.errors)[1]).values()} == {"retry"}


def test_a_retry_after_in_whole_seconds_is_honoured(start_server: ServerFactory) -> None:
    server = start_server(faults={"sync_429_rate": 1.0, "sync_retry_after_s": 1})
    rows = embedding_rows(2, per_request=1)
    result = lane(server, rows, max_retries=1, **FAST)
    assert result.stats.errors == 2 and result.stats.retries == Counter({"429": 2})
    for seq in by_body(server.sync_calls()).values():
        assert len(seq) == 2 and seq[1].at - seq[0].at >= 1.0


def test_a_retry_after_beyond_the_cap_is_left_to_the_join(start_server: ServerFactory) -> None:
    server = start_server(faults={"sync_429_rate": 1.0, "sync_retry_after_s": 30})
    rows = embedding_rows(4, per_request=1)
    t0 = time.monotonic()
    result = lane(server, rows, max_retry_after_s=5)
    assert time.monotonic() - t0 < 5
    assert result.stats.errors == 4 and not result.stats.retries
    assert len(server.sync_calls()) == 4


def test_a_bad_key_stops_the_lane_without_failing_units(start_server: ServerFactory) -> None:
    key, wrong = "k" * 24, "w" * 24
    server = start_server(api_keys=[key])
    rows = embedding_rows(12, per_request=1)
    with pytest.raises(ApiTerminalError) as ei:
        run_shard(sdk(server, wrong), pairs(rows), RealtimeSettings(concurrency=2))
    assert ei.value.status == 401 and wrong not in str(ei.value)
    assert server.sync_calls() == []
    ok = run_shard(sdk(server, key), pairs(rows), RealtimeSettings())
    assert ok.stats.succeeded == 12


def test_cancel_keeps_what_finished_and_requeues_the_rest(start_server: ServerFactory) -> None:
    server = start_server()
    rows = embedding_rows(30, per_request=1)
    cancel = threading.Event()
    threading.Timer(0.6, cancel.set).start()
    result = run_shard(
        sdk(server), pairs(rows), RealtimeSettings(requests_per_minute=600, rate_window_s=1.0), cancel=cancel
    )
    assert_each_once(rows, result)
    assert 0 < result.stats.succeeded < 30 and result.stats.succeeded == len(server.sync_calls())
    outcomes = outcome_of(embedding_join(rows, result.output, result.errors)[1])
    assert Counter(o for o, _ in outcomes.values()) == {"ok": result.stats.succeeded, "requeue": 30 - result.stats.succeeded}


def test_a_request_over_the_window_budget_is_not_sent(start_server: ServerFactory) -> None:
    server = start_server()
    rows = embedding_rows(3, per_request=1)
    tokens = rows["tokens"].to_list()
    lines = [(rows["line"][0], 10_000), *zip(rows["line"].to_list()[1:], tokens[1:], strict=True)]
    result = run_shard(sdk(server), lines, RealtimeSettings(tokens_per_minute=6000, rate_window_s=1.0))
    assert result.stats.succeeded == 2 and len(server.sync_calls()) == 2
    (err,) = lines_of(result.errors)
    assert err.custom_id == rows["custom_id"][0] and err.error is not None
    assert err.error["code"] == "request_too_large" and "10000 tokens" in err.error["message"]
    # no retry can fix it: the join fails it at once, and says which setting to raise
    outcomes = embedding_join(rows, result.output, result.errors)[1]
    assert outcome_of(outcomes)[rows["custom_id"][0]] == ("fail", "request_too_large")
    assert "lane.realtime.tokens_per_minute to at least 600000" in err.error["message"]


def test_an_embeddings_request_over_the_window_is_sent_in_calls_and_answered_in_one_line(
    start_server: ServerFactory,
) -> None:
    # every 4th call is refused; one window admits half of a request
    server = start_server(faults={"sync_429_every": 4, "sync_retry_after_s": 0.05})
    rows = embedding_rows(40, per_request=20)
    assert rows.height == 2
    budget = max(rows["tokens"].to_list()) // 2
    settings = {"tokens_per_minute": budget * 60, "rate_window_s": 1.0, "arrival_margin_s": MARGIN_S,
                "split_tokens": budget // 2, "max_retries": 8, **FAST}
    batch_out, batch_err = batch_lane(server, rows, "/v1/embeddings")
    result = lane(server, rows, **settings)

    assert result.errors == b"" and batch_err == b""
    assert_each_once(rows, result)  # one line per request, however many calls it took
    assert result.stats.requests == 2 and result.stats.split == 2 and result.stats.calls >= 6
    for line in map(json.loads, result.output.splitlines()):
        parts = line["parts"]
        assert [p["first"] for p in parts] == list(itertools.accumulate([0] + [p["inputs"] for p in parts[:-1]]))
        assert sum(p["inputs"] for p in parts) == 20 and {p["status_code"] for p in parts} == {200}
        assert sorted(d["index"] for d in line["response"]["body"]["data"]) == list(range(20))
    # the join maps every input back by custom_id and index: the batch lane's vectors, all ok
    (v1, o1), (v2, o2) = embedding_join(rows, batch_out, b""), embedding_join(rows, result.output, b"")
    assert set(o1["outcome"]) == set(o2["outcome"]) == {"ok"} and v2.height == 40
    assert v1.sort("unit_id").equals(v2.sort("unit_id"))
    # as the server saw it: calls within the window, 429s retried, the usage is what it counted
    calls = server.sync_calls()
    assert [c.status for c in calls].count(429) == len(calls) // 4 >= 1
    assert busiest(calls, 1.0, lambda c: c.tokens) <= budget
    assert max(c.tokens for c in calls) <= budget // 2
    answered = sum(c.tokens for c in calls if c.status == 200)
    assert usage_of(result.output)["input_tokens"] == answered == int(rows["tokens"].sum())


def test_a_chat_request_that_can_never_fit_fails_naming_the_setting(start_server: ServerFactory) -> None:
    server = start_server()
    chat = classify_rows(["Revenue grew 5% to EUR 10m on strong demand."])
    emb = embedding_rows(3, per_request=3)
    settings = RealtimeSettings(tokens_per_minute=600, rate_window_s=1.0)  # 10 tokens per window
    result = run_shard(sdk(server), pairs(chat) + pairs(emb), settings)
    assert result.output == b"" and server.sync_calls() == [], "nothing that cannot fit is sent"
    errors = {ln.custom_id: ln.error for ln in lines_of(result.errors)}
    cid = chat["custom_id"][0]
    assert errors[cid] is not None and errors[cid]["code"] == "request_too_large"
    assert f"request {cid} has {chat['tokens'][0]} tokens" in errors[cid]["message"]
    assert "raise lane.realtime.tokens_per_minute" in errors[cid]["message"]
    emb_error = errors[emb["custom_id"][0]]
    assert emb_error is not None and emb_error["message"].startswith(f"input 0 of request {emb['custom_id'][0]}")
    task = get_task("classify")
    lines = read_json_lines(result.errors, "errors")[0]
    _, outcomes = inference_outcomes(task, task.endpoint, chat, [ln for ln in lines if ln["custom_id"] == cid],
                                     batch_ended_as="completed")
    assert outcome_of(outcomes) == {cid: ("fail", "request_too_large")}


def test_each_call_fits_the_window_whatever_split_tokens_says() -> None:
    limits = RateLimits(RealtimeSettings(tokens_per_minute=6000, rate_window_s=1.0))  # 100 tokens a window
    inputs = ["word " * 30] * 10  # 31 tokens each
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "text-embedding-3-small", "input": inputs}})
    (req,) = parse_lines([(line, 310)])
    calls = plan_calls(req, limits, split_tokens=10_000)
    assert isinstance(calls, list)
    assert [(c.first, c.inputs, c.tokens) for c in calls] == [(0, 3, 93), (3, 3, 93), (6, 3, 93), (9, 1, 31)]
    assert [c.body["input"] for c in calls] == [inputs[0:3], inputs[3:6], inputs[6:9], inputs[9:]]


def test_merged_embeddings_keep_every_field_and_shift_each_index() -> None:
    a = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"AAAA"},' \
        b'{"object":"embedding","index":1,"embedding":"BBBB"}],"model":"m","usage":{"prompt_tokens":5,"total_tokens":5}}'
    b = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"CCCC","extra":[1.5e-7]}],' \
        b'"model":"m2","usage":{"prompt_tokens":3,"total_tokens":3}}'
    merged = json.loads(merge_embeddings([a, b], [0, 2]))
    assert [(d["index"], d["embedding"]) for d in merged["data"]] == [(0, "AAAA"), (1, "BBBB"), (2, "CCCC")]
    assert merged["data"][2]["extra"] == [1.5e-7] and merged["model"] == "m" and merged["object"] == "list"
    assert merged["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert usage_of(b'{"custom_id":"x","response":{"status_code":200,"body":{"usage":{"prompt_tokens":4,'
                    b'"completion_tokens":2,"total_tokens":6}}}}\n') == {
        "input_tokens": 4, "output_tokens": 2, "total_tokens": 6}


# =========================================================================== pure helpers
def test_retry_after_headers() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "-2"}) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (retry_after_s({"retry-after": date}) or 0) <= 31


def test_request_lines_are_checked_up_front() -> None:
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}})
    assert parse_lines([(good, 1)])[0].path == "/embeddings"
    bad = {
        "not JSON": [("{", 1)],
        "no custom_id": [(json.dumps({"url": "/v1/embeddings"}), 1)],
        "'/v1/moderations' is not one of": [(good.replace("/v1/embeddings", "/v1/moderations"), 1)],
        "custom_id repeats": [(good, 1), (good, 1)],
        "tokens must be an integer >= 0": [(good, -1)],
    }
    for message, lines in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_lines(lines)


def test_a_pretty_printed_body_is_kept_token_for_token_on_one_line() -> None:
    assert compact_json(b'{\n  "a": 1.0e-5,\n  "s": "x \\u00e9 y"\n}') == b'{"a":1.0e-5,"s":"x \\u00e9 y"}'
