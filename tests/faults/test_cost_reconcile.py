"""Cost and usage reconcile: each lane counts what the provider accepted and finished, once.

A batch refused with `token_limit_exceeded`, the lines an expired or cancelled batch never ran,
and a cancelled run that is resumed must not add tokens: whatever the path, an embeddings run
that settles every chunk reports exactly its planned tokens (the local server counts as the
plan does), and its reported cost is its estimate.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.ledger import run_records
from tests.helpers import assert_every_unit_settled_once, cancelled_run, run_of, seed

N = 120

SCENARIOS = {
    # the server's enqueued-token cap is below what the planner queues: some batches are refused
    "token cap": ({"enqueued_token_cap": 12_000}, {"seconds_per_request": 0.02},
                  {"enqueued_token_budget": 40_000, "max_tokens_per_batch": 8_000}),
    # every batch expires half done, again and again
    "repeated expiry": ({"expire_after_fraction": 0.5, "expire_batches": 6}, {}, {}),
}


def assert_reconciled(info: dict[str, Any]) -> None:
    final, planned = info["final"], info["plan"]["tokens"]
    assert final["results"] == N and final["failures"] == 0
    assert final["usage"]["input_tokens"] == planned
    assert final["lanes"] == {"batch": {"input_tokens": planned, "output_tokens": 0,
                                        "usd": final["cost_estimate_usd"]}}
    assert final["cost_reported_usd"] == final["cost_estimate_usd"] > 0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_refused_and_unfinished_batches_are_not_counted(settings_factory: Any, name: str) -> None:
    faults, local, limits = SCENARIOS[name]
    s = settings_factory(provider={"local": {"faults": faults, **local}},
                         limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10, **limits})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, N)))
        records = run_records(run_of(ctx, info))
        resent = sum(r.tokens * len(r.past_batches) for r in records) + sum(r.tokens for r in records if r.attempt > 1)
        assert resent > 0, f"{name}: some tokens must have been submitted more than once"
        assert_reconciled(info)


def test_cancel_and_resume_count_each_finished_request_once(settings_factory: Any) -> None:
    s = settings_factory(provider={"local": {"seconds_per_request": 0.05, "faults": {"cancelling_s": 0.2}}},
                         limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 4})
    with RunContext(s) as ctx:
        run, cancelled = cancelled_run(ctx, EmbeddingsJob(ctx, seed(ctx, N)))
        assert cancelled["final"]["usage"]["input_tokens"] < cancelled["plan"]["tokens"]
        info = runner.resume(ctx, run.run_id)
        assert info["state"] == "finished"
        assert_every_unit_settled_once(ctx, run)
        assert_reconciled(info)


def test_without_batch_usage_the_plan_prices_what_finished(settings_factory: Any) -> None:
    # a provider that reports no batch usage: the planned tokens of the requests that came back ok
    faults, local, limits = SCENARIOS["repeated expiry"]
    s = settings_factory(provider={"local": {"faults": faults, **local}},
                         limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10, **limits})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, N)))
        run = run_of(ctx, info)
        ran = 0
        for rec in run_records(run):
            part = run.partition(rec.partition)
            ledger = part.rel("ledger", f"{rec.name}.json")
            ctx.staging.write_json(ledger, {**ctx.staging.read_json(ledger), "usage": None})
            ran += rec.state == "collected"
        final = runner.run_summary(ctx, runner.job_for_run(ctx, run), run)
        assert final["usage_from_plan"] == ran > 3
        assert final["lanes"]["batch"]["input_tokens"] == final["usage"]["input_tokens"] == info["plan"]["tokens"]
        assert final["cost_reported_usd"] == info["final"]["cost_estimate_usd"]
