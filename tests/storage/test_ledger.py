"""Ledger: every transition, illegal ones refused, records survive as whole files."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchyard.errors import LedgerError
from batchyard.stages.batches import Throttle, select_submittable
from batchyard.storage.ledger import Ledger, ShardRecord, parse_shard_name
from batchyard.storage.runs import RunStore
from batchyard.storage.staging import Staging


def record(shard: str = "s00000", attempt: int = 1, tokens: int = 100, model: str = "m") -> ShardRecord:
    return ShardRecord(run_id="r1", job="embeddings", partition="p0000", shard=shard, attempt=attempt,
                       endpoint="/v1/embeddings", model=model, sha256="ab" * 32, n_requests=2, n_inputs=5,
                       bytes=100, tokens=tokens)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    run = RunStore(Staging(str(tmp_path / "st")), "embeddings", "r1")
    return Ledger(run.partition("p0000"))


def test_full_lifecycle_is_recorded_with_history(ledger: Ledger) -> None:
    rec = ledger.create(record())
    rec = ledger.move(rec, "uploading", intent_at="2026-01-01T00:00:00+00:00")
    rec = ledger.move(rec, "uploaded", file_id="file-1")
    rec = ledger.move(rec, "creating")
    rec = ledger.move(rec, "submitted", batch_id="batch_1", batch_status="validating")
    rec = ledger.observe(rec, {"status": "in_progress", "request_counts": {"total": 2, "completed": 1, "failed": 0}})
    assert rec.state == "submitted"
    rec = ledger.observe(rec, {"status": "completed", "output_file_id": "file-o", "error_file_id": None})
    assert rec.state == "ended"
    rec = ledger.move(rec, "collected", outcome={"ok": 2})
    again = ledger.load("s00000.1")
    assert again == rec
    assert [h.status for h in again.history] == ["planned", "uploading", "uploaded", "creating", "submitted",
                                                 "batch:in_progress", "batch:completed", "collected"]


@pytest.mark.parametrize(("start", "target"), [("planned", "ended"), ("uploading", "creating"),
                                                ("collected", "planned"), ("submitted", "uploading")])
def test_illegal_transitions_are_refused(ledger: Ledger, start: str, target: str) -> None:
    rec = ledger.create(record())
    rec = rec.model_copy(update={"state": start})
    with pytest.raises(LedgerError, match=f"illegal transition {start} -> {target}"):
        ledger.move(rec, target)  # type: ignore[arg-type]


def test_create_is_idempotent_and_keeps_progress(ledger: Ledger) -> None:
    rec = ledger.create(record())
    ledger.move(rec, "uploading")
    assert ledger.create(record()).state == "uploading"


def test_requeue_bumps_submission_and_changes_metadata(ledger: Ledger) -> None:
    rec = ledger.create(record())
    for state in ("uploading", "uploaded", "creating"):
        rec = ledger.move(rec, state)  # type: ignore[arg-type]
    rec = ledger.move(rec, "submitted", batch_id="batch_1")
    first_meta = rec.metadata()
    rec = ledger.observe(rec, {"status": "failed", "errors": {"data": [{"code": "token_limit_exceeded"}]}})
    rec = ledger.requeue(rec, "token_limit_exceeded", not_before=1000.0, since=900.0)
    assert rec.state == "uploaded" and rec.submission == 2 and rec.not_before == 1000.0
    assert rec.batch_id is None and rec.past_batches == ["batch_1"] and rec.token_limit_since == 900.0
    assert rec.metadata()["submission"] == "2" != first_meta["submission"]
    assert rec.metadata()["partition"] == "p0000"
    assert not rec.in_flight
    assert rec.waiting_note and "token limit" in rec.waiting_note


def test_corrupt_or_missing_record_is_a_clear_error(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no ledger record"):
        ledger.load("s00009.1")
    ledger.part.staging.write_bytes(ledger.part.rel("ledger", "s00001.1.json"), b"{not json")
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.load("s00001.1")


def test_write_is_atomic_no_temp_files_left(ledger: Ledger) -> None:
    ledger.create(record())
    folder = Path(ledger.part.staging.path(ledger.part.rel("ledger")))
    assert sorted(p.name for p in folder.iterdir()) == ["s00000.1.json"]


@pytest.mark.parametrize("bad", ["s00000", "s00000.x", "s00000.0", ".3"])
def test_shard_names_are_validated(bad: str) -> None:
    with pytest.raises(LedgerError):
        parse_shard_name(bad)
    assert parse_shard_name("s00000.12") == ("s00000", 12)


def test_throttle_keeps_tokens_in_flight_under_budget() -> None:
    recs = [record(f"s{i:05d}", tokens=400) for i in range(6)]
    recs[0] = recs[0].model_copy(update={"state": "submitted"})
    chosen = select_submittable(recs, Throttle(token_budget=1000, batches_per_hour=100, max_live=50), now=0)
    assert [r.shard for r in chosen] == ["s00001"]  # 400 in flight + 400 fits; + another 400 would not


def test_throttle_keeps_each_model_under_the_lower_of_budget_and_stated_limit() -> None:
    recs = [record(f"s{i:05d}", tokens=400) for i in range(4)] + [record("s00009", tokens=400, model="other")]
    recs[0] = recs[0].model_copy(update={"state": "submitted"})
    recs[4] = recs[4].model_copy(update={"state": "submitted"})
    throttle = Throttle(token_budget=1000, batches_per_hour=100, max_live=50, learned={"m": 700})
    assert throttle.budget("m") == 700 and throttle.budget("other") == 1000
    assert select_submittable(recs, throttle, now=0) == []  # 400 in flight + 400 is over the stated 700
    lower = Throttle(token_budget=1000, batches_per_hour=100, max_live=50, learned={"m": 5000})
    assert [r.shard for r in select_submittable(recs, lower, now=0)] == ["s00001"]  # the budget is lower
    # an attempt being re-planned is never sent
    recs[1] = recs[1].model_copy(update={"split_cap": 300})
    assert [r.shard for r in select_submittable(recs, lower, now=0)] == ["s00002"]


def test_a_split_moves_waiting_or_refused_attempts_to_collected_after_recording_the_cap(ledger: Ledger) -> None:
    rec = ledger.create(record())
    rec = ledger.intend_split(rec, 500, "not sent: over the limit")
    assert (rec.state, rec.split_cap) == ("planned", 500) and ledger.load(rec.name).split_cap == 500
    rec = ledger.move(rec, "collected", split_into=["s00000-1.2"])
    assert rec.split_into == ["s00000-1.2"]
    with pytest.raises(LedgerError):
        ledger.intend_split(rec, 400, "again")


def test_throttle_admits_a_lone_oversized_shard_and_respects_hourly_cap() -> None:
    recs = [record(f"s{i:05d}", tokens=5000) for i in range(3)]
    chosen = select_submittable(recs, Throttle(token_budget=1000, batches_per_hour=100, max_live=50), now=0)
    assert len(chosen) == 1
    recs = [record(f"s{i:05d}", tokens=1) for i in range(5)]
    recs[0] = recs[0].model_copy(update={"state": "collected", "created_at": 1000.0})
    chosen = select_submittable(recs, Throttle(token_budget=10**9, batches_per_hour=3, max_live=50), now=1500.0)
    assert len(chosen) == 2


def test_throttle_resumes_interrupted_submissions_and_honours_backoff() -> None:
    recs = [record("s00000").model_copy(update={"state": "creating"}),
            record("s00001").model_copy(update={"state": "uploaded", "not_before": 100.0}),
            record("s00002", model="other")]
    chosen = select_submittable(recs, Throttle(token_budget=10**6, batches_per_hour=100, max_live=50), now=50.0)
    assert [r.shard for r in chosen] == ["s00000", "s00002"]  # s00001 waits for its backoff
    chosen = select_submittable(recs, Throttle(token_budget=10**6, batches_per_hour=100, max_live=50), now=100.0)
    assert [r.shard for r in chosen] == ["s00000", "s00001", "s00002"]


def test_requeue_backoff_doubles_and_is_capped() -> None:
    from batchyard.stages.batches import Retries

    r = Retries(max_attempts=3, max_requeues=3, backoff_s=30, backoff_max_s=100, token_budget=10, token_limit_wait_s=5)
    assert [r.delay(n) for n in (1, 2, 3, 4)] == [30, 60, 100, 100]


def test_validation_errors_with_line_numbers_fail_only_those_lines() -> None:
    import polars as pl

    from batchyard.stages.batches import _validation_outcomes

    requests = pl.DataFrame({"custom_id": ["a", "b", "c"], "line": ["{}", "{}", "{}"]})
    rec = record().model_copy(update={"batch_id": "batch_x", "errors": [
        {"code": "invalid_json", "message": "line 2 is not JSON", "line": 2}]})
    out = {r["custom_id"]: r for r in _validation_outcomes(requests, rec).iter_rows(named=True)}
    assert out["b"]["outcome"] == "fail" and "line 2" in out["b"]["message"] and "(b)" in out["b"]["message"]
    assert out["a"]["outcome"] == out["c"]["outcome"] == "requeue"
    whole = record().model_copy(update={"batch_id": "batch_y", "errors": [{"code": "invalid_request", "message": "x"}]})
    assert set(_validation_outcomes(requests, whole)["outcome"]) == {"retry"}
