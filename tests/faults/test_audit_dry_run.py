"""`--dry-run`: snapshot and plan with no Batch API client, an estimate at batch prices, and a
kept plan that a later run submits exactly; prices are per model, overridable in settings."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchyard import runner
from batchyard.audit import audit_run
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.pricing import DEFAULT_PRICES, PricingSettings, plan_cost
from batchyard.settings import Settings
from batchyard.storage.ledger import run_records
from batchyard.storage.runs import find_run
from tests.helpers import assert_one_batch_per_submission, run_of, seed, server_batches


def test_a_dry_run_plans_and_estimates_without_any_batch_api_client(settings_factory: Any) -> None:
    s = settings_factory(limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})
    with RunContext(s) as ctx:
        targets = seed(ctx, 75)
        info = runner.dry_run(ctx, EmbeddingsJob(ctx, targets))
        assert ctx._api is None and ctx._server is None, "the provider must see no request"
        assert not ctx.staging.exists(".localapi"), "not even the embedded server's state"
        assert (info["state"], info["phase"]) == ("dry_run", "plan")
        est = info["dry_run"]
        records = run_records(run_of(ctx, info))
        assert est["shards"] == len(records) == info["plan"]["shards"] >= 3
        assert est["requests"] == info["plan"]["requests"] and est["inputs"] == sum(r.n_inputs for r in records)
        assert est["input_tokens"] == info["plan"]["tokens"] == sum(r.tokens for r in records) > 0
        assert est["output_tokens_max"] == 0
        price = DEFAULT_PRICES["text-embedding-3-small"].input_per_1m
        assert est["cost_batch_usd"] == pytest.approx(est["input_tokens"] * price / 1e6 * 0.5, abs=1e-6)
        assert est["cost_realtime_usd"] == pytest.approx(2 * est["cost_batch_usd"], abs=2e-6)
        assert all(r.state == "planned" and r.file_id is None for r in records)
        report = audit_run(ctx, run_of(ctx, info))
        assert report.ok, [str(d) for d in report.differences]


def test_a_kept_dry_run_is_submitted_exactly_as_planned(settings_factory: Any) -> None:
    s = settings_factory(limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})
    with RunContext(s) as ctx:
        targets = seed(ctx, 60)
        dry = runner.dry_run(ctx, EmbeddingsJob(ctx, targets))
        run = run_of(ctx, dry)
        planned = {r.name: r.sha256 for r in run_records(run)}
        # a second dry run of the same id only re-reports it
        again = runner.dry_run(ctx, EmbeddingsJob(ctx, targets), run_id=dry["run_id"])
        assert again["dry_run"] == dry["dry_run"] and {r.name: r.sha256 for r in run_records(run)} == planned
        # ... the source changes meanwhile: the kept plan is what gets submitted
        late = {**ctx.store.chunks.find_one({}), "_id": "late-chunk", "text": "added after the dry run"}
        ctx.store.chunks.insert_one(late)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets), run_id=dry["run_id"])
        assert info["state"] == "finished" and info["final"]["results"] == 60
        sent = {r.name: r.sha256 for r in run_records(run)}
        assert sent == planned
        assert_one_batch_per_submission(ctx, run)
        for b in server_batches(ctx, run.run_id):
            data = ctx.api.content(b["input_file_id"])
            assert hashlib.sha256(data).hexdigest() == b["metadata"]["sha256"] == planned[
                f"{b['metadata']['shard']}.{b['metadata']['attempt']}"]
        assert info["final"]["cost_estimate_usd"] == dry["dry_run"]["cost_batch_usd"]
        assert info["final"]["cost_reported_usd"] == info["final"]["cost_estimate_usd"]  # exact token counts
        assert runner.execute(ctx, EmbeddingsJob(ctx, targets))["final"]["results"] == 1  # the late chunk, next run


def test_the_tracker_leaves_a_dry_run_alone_and_resume_submits_it(settings_factory: Any, tmp_path: Path) -> None:
    from batchyard.orchestration.flows import tracker_flow

    s = settings_factory()
    with RunContext(s) as ctx:
        dry = runner.dry_run(ctx, EmbeddingsJob(ctx, seed(ctx, 20)))
    # the scheduled tracker's body (no Prefect engine needed: it drives nothing here)
    overrides = {"staging": {"root": s.staging.root}, "milvus": {"index_type": "FLAT"}, "embedding": {"dimensions": 16}}
    assert tracker_flow.fn(overrides=overrides) == []
    with RunContext(s) as ctx:
        assert run_records(find_run(ctx.staging, dry["run_id"]))[0].state == "planned"
    with RunContext(s) as ctx:
        done = runner.resume(ctx, dry["run_id"])
        assert done["state"] == "finished" and done["final"]["results"] == 20
        assert audit_run(ctx, find_run(ctx.staging, dry["run_id"])).ok


def test_inference_output_tokens_are_estimated_from_max_output_tokens(settings_factory: Any, tmp_path: Path) -> None:
    shutil.copytree(Path(__file__).resolve().parents[2] / "prompts", tmp_path / "prompts")
    s = settings_factory(prompts_dir=str(tmp_path / "prompts"), inference={"max_output_tokens": 300})
    with RunContext(s) as ctx:
        targets = seed(ctx, 30)
        info = runner.dry_run(ctx, InferenceJob(ctx, targets, "classify"))
        est = info["dry_run"]
        assert est["requests"] == 30 and est["output_tokens_max"] == 30 * 300
        price = DEFAULT_PRICES["gpt-4.1-mini"]
        expected = (est["input_tokens"] * price.input_per_1m + 30 * 300 * price.output_per_1m) / 1e6 * 0.5
        assert est["cost_batch_usd"] == pytest.approx(expected, abs=1e-6)
        # the real run's summary puts that estimate next to the provider's reported usage
        done = runner.execute(ctx, InferenceJob(ctx, targets, "classify"), run_id=info["run_id"])
        final = done["final"]
        assert final["cost_estimate_usd"] == est["cost_batch_usd"]
        assert final["cost_estimate_tokens"] == {"input": est["input_tokens"], "output_max": 9000}
        assert 0 < final["usage"]["output_tokens"] <= 9000
        assert 0 < final["cost_reported_usd"] < final["cost_estimate_usd"]
        # the plan counts each prompt as the provider bills it (the local server as OpenAI does)
        assert final["usage"]["input_tokens"] == est["input_tokens"]
        lane = final["lanes"]["batch"]
        assert (lane["input_tokens"], lane["output_tokens"]) == (est["input_tokens"], final["usage"]["output_tokens"])
        assert lane["usd"] == final["cost_reported_usd"]


def test_prices_are_per_model_and_overrides_keep_the_other_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHYARD_PRICING__MODELS", '{"my-model": {"input_per_1m": 1.0, "output_per_1m": 4.0},'
                                                     ' "gpt-4o": {"input_per_1m": 2.0}}')
    monkeypatch.setenv("BATCHYARD_PRICING__BATCH_DISCOUNT", "0.4")
    pricing = Settings(_env_file=None).pricing  # type: ignore[call-arg]
    assert pricing.models["text-embedding-3-large"] == DEFAULT_PRICES["text-embedding-3-large"]
    assert pricing.models["gpt-4o"].input_per_1m == 2.0
    cost = plan_cost(pricing, "my-model", input_tokens=1_000_000, requests=10, max_output_tokens=100_000)
    assert cost["batch_usd"] == pytest.approx((1.0 + 4.0) * 0.4) and cost["output_tokens"] == 1_000_000
    unpriced = plan_cost(PricingSettings(), "who-knows", input_tokens=10)
    assert unpriced["priced"] is False and unpriced["batch_usd"] == 0.0
