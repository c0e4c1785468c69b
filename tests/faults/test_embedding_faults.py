"""Fault matrix for embeddings, driven by the local server's fault injection.

Each test runs the real pipeline (plain engine) against the embedded local Batch API server
through the openai SDK, then checks: every unit settled exactly once, one batch per shard
attempt on the server, and every result in Milvus with the right vector.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.ledger import run_records
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_one_batch_per_submission,
    assert_vectors_match,
    run_of,
    seed,
)

N = 120


def run_embeddings(settings_factory: Any, faults: dict[str, Any], *, n: int = N, **extra: Any) -> tuple[RunContext, Any, dict[str, Any]]:
    local = {"faults": faults, **extra.pop("local", {})}
    settings = settings_factory(
        provider={"local": local, "poll_interval_s": 0.05, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                  "requeue_backoff_s": 0.05},
        limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10, **extra.pop("limits", {})},
        **extra,
    )
    ctx = RunContext(settings)
    targets = seed(ctx, n)
    info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
    return ctx, targets, info


def check(ctx: RunContext, info: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    run = run_of(ctx, info)
    results, failures = assert_every_unit_settled_once(ctx, run)
    assert_one_batch_per_submission(ctx, run)
    job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
    if results.height:
        assert_vectors_match(ctx, results, job.collection, job.dims)
    return results, failures


def test_clean_run_embeds_everything(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {})
    try:
        results, failures = check(ctx, info)
        assert results.height == N and failures.height == 0
        assert info["plan"]["shards"] >= 3
    finally:
        ctx.close()


def test_per_request_errors_are_retried_within_budget(settings_factory: Any) -> None:
    # 30% of requests fail with HTTP 500, drawn afresh in every batch (like real transient errors).
    # The draw depends on the batch id, so use 60 requests: with 12, no request failing at all
    # (0.7^12, 1.4%) happened on CI.
    ctx, _, info = run_embeddings(settings_factory, {"request_error_rate": 0.3, "seed": 3},
                                  limits={"max_attempts": 4, "max_inputs_per_request": 2})
    try:
        results, failures = check(ctx, info)
        run = run_of(ctx, info)
        assert any(r.attempt > 1 for r in run_records(run)), "failed requests must get follow-up attempts"
        assert results.height + failures.height == N
        assert results.height >= 0.8 * N  # a request fails for good only after 4 draws of 30%
        assert results["attempt"].max() > 1
        if failures.height:
            assert set(failures["code"]) == {"server_error"} and (failures["attempt"] == 4).all()
    finally:
        ctx.close()


def test_sticky_request_errors_exhaust_the_budget_and_keep_the_last_error(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"request_error_rate": 0.3, "seed": 3,
                                                     "request_error_sticky": True}, limits={"max_attempts": 2})
    try:
        results, failures = check(ctx, info)
        assert failures.height > 0 and results.height > 0
        assert (failures["attempt"] == 2).all() and set(failures["code"]) == {"server_error"}
        assert all("HTTP 500" in m for m in failures["message"])
    finally:
        ctx.close()


def test_all_requests_failing_gives_completed_batches_without_output(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"request_error_rate": 1.0, "request_error_status": 400})
    try:
        results, failures = check(ctx, info)
        assert results.height == 0 and failures.height == N
        assert (failures["attempt"] == 1).all(), "a 400 is not retried"
        from batchyard.storage.ledger import run_records

        recs = run_records(run_of(ctx, info))
        assert all(r.batch_status == "completed" and r.output_file_id is None and r.error_file_id for r in recs)
    finally:
        ctx.close()


def test_expired_batch_keeps_finished_lines_and_requeues_the_rest(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"expire_after_requests": 2, "expire_batches": 1})
    try:
        results, failures = check(ctx, info)
        assert results.height == N and failures.height == 0
        from batchyard.storage.ledger import run_records

        recs = run_records(run_of(ctx, info))
        expired = [r for r in recs if r.batch_status == "expired"]
        assert len(expired) == 1 and expired[0].outcome.get("ok", 0) == 2
        follow = [r for r in recs if r.key == f"{expired[0].partition}/{expired[0].shard}.2"]
        assert follow and follow[0].n_requests == expired[0].n_requests - 2
        # expiry does not spend the retry budget
        part = run_of(ctx, info).partition(follow[0].partition)
        plan = ctx.staging.read_parquet(part.rel("followups", f"{follow[0].name}.parquet"))
        assert (plan["spent"] == 0).all()
    finally:
        ctx.close()


def test_server_cancelled_batch_delivers_partial_results(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"cancel_after_requests": 1, "cancel_batches": 1,
                                                     "cancelling_s": 0.3})
    try:
        results, _ = check(ctx, info)
        assert results.height == N
        from batchyard.storage.ledger import run_records

        recs = run_records(run_of(ctx, info))
        cancelled = [r for r in recs if r.batch_status == "cancelled"]
        assert len(cancelled) == 1
        assert "batch:cancelling" in [h.status for h in cancelled[0].history]
    finally:
        ctx.close()


def test_validation_failure_is_recorded_and_retried(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"validation_failure": True, "validation_fail_batches": 2})
    try:
        results, _ = check(ctx, info)
        assert results.height == N
        from batchyard.storage.ledger import run_records

        failed = [r for r in run_records(run_of(ctx, info)) if r.batch_status == "failed"]
        assert len(failed) == 2 and all(r.errors and r.errors[0]["code"] == "invalid_request" for r in failed)
    finally:
        ctx.close()


def test_validation_failure_every_time_ends_in_failures_with_reason(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"validation_failure": True}, limits={"max_attempts": 2})
    try:
        results, failures = check(ctx, info)
        assert results.height == 0 and failures.height == N
        assert set(failures["code"]) == {"batch_failed"}
        assert "failed validation" in failures["message"][0]
    finally:
        ctx.close()


def test_token_limit_failures_requeue_after_in_flight_work_drains(settings_factory: Any) -> None:
    # the server's cap is below what the planner thinks it may queue: batches fail token_limit_exceeded
    ctx, _, info = run_embeddings(
        settings_factory, {"enqueued_token_cap": 12_000},
        local={"seconds_per_request": 0.02},
        limits={"enqueued_token_budget": 40_000, "max_tokens_per_batch": 8_000},
    )
    try:
        results, failures = check(ctx, info)
        assert results.height == N and failures.height == 0
        from batchyard.storage.ledger import run_records

        recs = run_records(run_of(ctx, info))
        requeued = [r for r in recs if r.submission > 1]
        assert requeued, "some shard must have hit the token limit and been requeued"
        assert all(r.attempt == 1 for r in requeued), "a token-limit failure is not a data error"
    finally:
        ctx.close()


def test_transient_http_errors_on_every_endpoint_are_retried(settings_factory: Any) -> None:
    ctx, _, info = run_embeddings(settings_factory, {"transient_error_rate": 0.3, "seed": 5})
    try:
        results, failures = check(ctx, info)
        assert results.height == N and failures.height == 0
    finally:
        ctx.close()


def test_second_run_submits_nothing_and_changed_text_is_reembedded(settings_factory: Any) -> None:
    ctx, targets, _ = run_embeddings(settings_factory, {})
    try:
        job = EmbeddingsJob(ctx, targets)
        again = runner.execute(ctx, job)
        assert again["plan"]["requests"] == 0 and again["plan"]["shards"] == 0
        some = ctx.store.chunks.find_one({})
        ctx.store.chunks.update_one({"_id": some["_id"]}, {"$set": {"text": some["text"] + " (restated)"}})
        third = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert third["final"]["results"] == 1
        assert ctx.milvus.get(job.collection, ids=[some["_id"]])[0]["run_id"] == third["run_id"]
        from batchyard.clients.milvus import count

        assert count(ctx.milvus, job.collection) == N
    finally:
        ctx.close()
