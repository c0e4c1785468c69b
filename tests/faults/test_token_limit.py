"""The provider's stated enqueued-token limit (`token_limit_exceeded`: "... Limit: 30,000 enqueued
tokens ...") against the local server's token cap.

A shard larger than the stated limit can never be queued as it is, however long it waits: it is
re-planned into follow-up shards that fit (embedding inputs re-packed, inference requests kept
whole), the limit is remembered, and the throttle keeps the queue under it. A unit too large
on its own fails as `token_limit_unfittable`, naming the limit. Exactly-once holds throughout,
and `batchyard audit` reconciles the run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchyard import quota, runner
from batchyard.audit import audit_run
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.storage.ledger import run_records
from batchyard.trail import trail
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_one_batch_per_submission,
    assert_vectors_match,
    planned_run,
    run_of,
    seed,
    server_batches,
)

REPO = Path(__file__).resolve().parents[2]


def refused(ctx: RunContext, run_id: str) -> list[dict[str, Any]]:
    """The run's batches the provider failed with token_limit_exceeded."""
    return [b for b in server_batches(ctx, run_id) if b["status"] == "failed"
            and any(e["code"] == "token_limit_exceeded" for e in (b["errors"] or {}).get("data") or [])]


@pytest.mark.parametrize("message", [
    "Enqueued token limit reached for text-embedding-3-small in organization org-abc. Limit: 3,000,000 enqueued "
    "tokens. Please try submitting an existing batch once some in_progress batches have been completed.",
    "Enqueued token limit reached for m in organization org-local. Limit: 3000000 enqueued tokens. Please try again",
    "Limit: 3 000 000 enqueued tokens.", "Limit: 3.000.000 enqueued tokens.", "enqueued limit of 3M tokens",
])
def test_the_stated_limit_is_read_with_or_without_separators(message: str) -> None:
    assert quota.stated_limit(message) == 3_000_000
    assert quota.refusal_limit([{"code": "other", "message": "Limit: 5 tokens"},
                                {"code": "token_limit_exceeded", "message": message}]) == 3_000_000


def test_no_stated_limit_and_the_configured_budget_when_lower() -> None:
    assert quota.stated_limit("Enqueued token limit reached. Please try again later.") is None
    assert quota.effective_cap(3_000_000, None) == 3_000_000
    assert quota.effective_cap(3_000_000, 30_000) == 30_000
    assert quota.effective_cap(20_000, 30_000) == 20_000  # the user's lower budget is kept


@pytest.mark.timeout(120)  # before the fix the run never ended: every shard waited, backing off, up to 24 h
def test_with_default_limits_a_cap_below_every_shard_ends_with_every_chunk_embedded(settings_factory: Any) -> None:
    # default limits: each partition plans one shard of 1 or 2 requests (~50k tokens); the
    # provider's cap is below every one of them. Default requeue backoff (30 s): the run must
    # not lean on waiting.
    cap = 20_000
    s = settings_factory(provider={"local": {"faults": {"enqueued_token_cap": cap}}, "requeue_backoff_s": 30.0},
                         run={"partition_max_chunks": 250})
    assert s.limits.model_dump() == type(s.limits)().model_dump()
    with RunContext(s) as ctx:
        job = EmbeddingsJob(ctx, seed(ctx, 600))
        info = runner.execute(ctx, job)
        run = run_of(ctx, info)
        records = run_records(run)
        firsts = [r for r in records if r.attempt == 1]
        assert len(firsts) >= 2 and all(r.tokens > cap for r in firsts), [r.tokens for r in firsts]
        assert (info["state"], runner.exit_code(info)) == ("finished", 0), info["final"]
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == 600 and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        assert_vectors_match(ctx, results, job.collection, job.dims)
        # every first shard was refused once and re-planned; no re-planned shard was refused
        assert all(r.split_into and r.split_cap == cap for r in firsts)
        children = [r for r in records if r.split_from]
        assert {c.name for c in children} == {n for r in firsts for n in r.split_into}
        assert all(c.tokens <= cap and c.submission == 1 and c.batch_status == "completed" for c in children)
        assert len(refused(ctx, run.run_id)) == len(firsts)
        limits = run.read_run()["provider_limits"]["embedded"]
        assert limits[s.embedding.model]["enqueued_tokens"] == cap
        report = audit_run(ctx, run)
        assert report.ok, [str(d) for d in report.differences]
        # one chunk's trail: the refused shard, then the shard it was re-planned into, ok
        chunk = results["chunk_id"][0]
        steps = trail(ctx, run, chunk)
        assert not steps["differences"], steps["differences"]
        assert [(a["attempt"], a["batch_status"]) for a in steps["attempts"]] == [(1, "failed"), (2, "completed")]
        assert steps["attempts"][0]["outcome"]["code"] == "token_limit_exceeded"
        assert steps["attempts"][1]["outcome"]["final"] == "ok" and "-" in steps["attempts"][1]["shard"]


def test_a_learned_limit_replans_waiting_shards_before_they_are_sent(settings_factory: Any) -> None:
    # a resumed run already knows the provider's limit (run.json): shards over it are re-planned
    # without being sent, so the provider refuses nothing
    s = settings_factory(provider={"local": {"faults": {"enqueued_token_cap": 20_000}}},
                         run={"partition_max_chunks": 250})
    with RunContext(s) as ctx:
        job = EmbeddingsJob(ctx, seed(ctx, 600))
        run = planned_run(ctx, job)
        quota.learn(run, quota.provider_key(s.provider), s.embedding.model, 20_000, shard="earlier")
        runner.drive(ctx, job, run)
        info = runner.finish(ctx, job, run)
        assert (info["state"], runner.exit_code(info)) == ("finished", 0)
        firsts = [r for r in run_records(run) if r.attempt == 1]
        assert all(r.split_into and r.batch_id is None and r.file_id is None for r in firsts)
        assert refused(ctx, run.run_id) == []
        results, _ = assert_every_unit_settled_once(ctx, run)
        assert results.height == 600
        report = audit_run(ctx, run)
        assert report.ok, [str(d) for d in report.differences]


def test_the_configured_budget_is_kept_when_it_is_lower(settings_factory: Any) -> None:
    # the provider states 40k, the user allows 15k: re-planned shards fit 15k
    s = settings_factory(provider={"local": {"faults": {"enqueued_token_cap": 40_000}}},
                         limits={"enqueued_token_budget": 15_000, "max_tokens_per_batch": 60_000})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 300, companies=1)))
        run = run_of(ctx, info)
        assert runner.exit_code(info) == 0
        children = [r for r in run_records(run) if r.split_from]
        assert children and all(r.tokens <= 15_000 for r in children)
        assert {r.split_cap for r in run_records(run) if r.split_into} == {15_000}
        assert audit_run(ctx, run).ok


def test_an_input_over_the_limit_on_its_own_fails_as_unfittable_naming_the_limit(settings_factory: Any) -> None:
    s = settings_factory(provider={"local": {"faults": {"enqueued_token_cap": 1_500}}})
    with RunContext(s) as ctx:
        targets = seed(ctx, 40, companies=1)
        big = ctx.store.chunks.find_one({})
        ctx.store.chunks.update_one({"_id": big["_id"]}, {"$set": {"text": "quarterly revenue rose " * 1000}})
        ctx.store.save()
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        run = run_of(ctx, info)
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert (results.height, failures.height, runner.exit_code(info)) == (39, 1, 3)
        row = failures.row(0, named=True)
        assert (row["unit_id"], row["code"]) == (big["_id"], "token_limit_unfittable")
        assert "the provider's stated limit of 1,500 enqueued tokens" in row["message"], row["message"]
        assert audit_run(ctx, run).ok


@pytest.mark.parametrize(("budget", "limit"), [
    (None, "the provider's stated limit of 3,000 enqueued tokens"),
    (2_000, "limits.enqueued_token_budget (2,000 tokens)"),  # the user's lower budget is kept
])
def test_inference_requests_are_kept_whole_and_a_unit_too_large_fails_alone(
    settings_factory: Any, tmp_path: Path, budget: int | None, limit: str
) -> None:
    from batchyard.seed import seed_store, targets_for

    prompts = tmp_path / "prompts-copy"
    shutil.copytree(REPO / "prompts", prompts)
    # we count 1-2k tokens per request: 8 requests per planned shard are far over the 3,000-token
    # cap; a unit of ~5k tokens (and, under a 2,000 budget, some ordinary ones) can never be queued
    limits: dict[str, Any] = {"max_requests_per_batch": 8}
    if budget:
        limits |= {"enqueued_token_budget": budget, "max_tokens_per_batch": 50_000}
    s = settings_factory(prompts_dir=str(prompts), provider={"local": {"faults": {"enqueued_token_cap": 3_000}}},
                         limits=limits)
    cap = min(3_000, budget or 3_000)
    with RunContext(s) as ctx:
        report = seed_store(ctx.store, 16, fields=s.mongo.fields, seed=5, n_companies=1)
        big = ctx.store.chunks.find_one({})
        ctx.store.chunks.update_one({"_id": big["_id"]}, {"$set": {"text": "net income fell " * 1500}})
        ctx.store.save()
        info = runner.execute(ctx, InferenceJob(ctx, targets_for(report), "risks"))
        run = run_of(ctx, info)
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height + failures.height == 16 and results.height > 0
        assert big["_id"] in failures["unit_id"].to_list()
        assert set(failures["code"]) == {"token_limit_unfittable"}
        for message in failures["message"]:
            assert f"more than {limit}" in message and "it can never be queued" in message, message
        if budget is None:
            assert failures.height == 1
        records = {r.name: r for r in run_records(run)}
        children = [r for r in records.values() if r.split_from]
        assert children and all(r.tokens <= cap and r.submission == 1 for r in children)
        for rec in children:  # whole requests: a child's custom_ids are its parent's
            ids = ctx.staging.read_parquet(rec_part(run, rec).rel("followups", f"{rec.name}.parquet"))["custom_id"]
            assert set(ids.to_list()) <= set(_plan_ids(run, records[rec.split_from or ""]))
        assert_one_batch_per_submission(ctx, run)
        assert audit_run(ctx, run).ok


def rec_part(run: Any, rec: Any) -> Any:
    return run.partition(rec.partition)


def _plan_ids(run: Any, rec: Any) -> list[str]:
    from batchyard.stages.batches import attempt_requests

    frame: pl.DataFrame = attempt_requests(rec_part(run, rec), rec.shard, rec.attempt)
    return list(frame["custom_id"].to_list())


def test_a_shard_within_the_stated_limit_waits_while_others_hold_the_quota_then_fails(
    settings_factory: Any, tmp_path: Path
) -> None:
    import contextlib
    import json

    from batchyard.errors import ApiTerminalError
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.runner import LocalServer

    # another run of the organisation holds about 2,400 of the 3,000 enqueued tokens for a long time;
    # our shard (about 2,300 tokens) fits the stated limit alone: it is resubmitted with backoff,
    # and what cannot be queued fails when limits.token_limit_wait_s runs out
    config = LocalApiConfig(seconds_per_request=2.0, faults={"enqueued_token_cap": 3_000})
    with LocalServer(config, tmp_path / "provider") as server:
        s = settings_factory(provider={"base_url": server.base_url, "api_key": "sk-shared-org-key"},
                             limits={"token_limit_wait_s": 1.0})
        with RunContext(s) as ctx:
            lines = [json.dumps({"custom_id": f"other-{i}", "method": "POST", "url": "/v1/embeddings",
                                 "body": {"model": s.embedding.model, "input": ["capital expenditure " * 60]}})
                     for i in range(20)]  # about 2,400 tokens, in progress for 40 s
            other = ctx.api.create_batch(ctx.api.upload("other-run.jsonl", ("\n".join(lines) + "\n").encode()),
                                         "/v1/embeddings", {"owner": "another run"}, since=0)
            try:
                while ctx.api.retrieve(other["id"])["status"] == "validating":
                    pass
                targets = seed(ctx, 10, companies=1)
                info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
                run = run_of(ctx, info)
                records = run_records(run)
                (first,) = [r for r in records if r.attempt == 1]
                assert 2_300 <= first.tokens <= 3_000
                # it fits the stated limit alone: resubmitted with backoff, not re-planned at once
                # (a refusal raises the learned count ratio by at most 10%: after three, the
                # provider may count more than we do, and the rest is cut to fit)
                assert first.submission > 2, "resubmitted with backoff"
                assert all(r.tokens <= first.tokens for r in records)
                results, failures = assert_every_unit_settled_once(ctx, run)
                assert results.height + failures.height == 10 and failures.height > 0
                assert set(failures["code"]) == {"token_limit_exceeded"}
                assert "limits.token_limit_wait_s" in failures["message"][0]
                assert_one_batch_per_submission(ctx, run)
            finally:
                with contextlib.suppress(ApiTerminalError):
                    ctx.api.cancel(other["id"])
