"""Inference end to end on the local server: mixed outcomes, incremental reruns, prompt versions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.inference import InferenceJob
from batchyard.storage.ledger import run_records
from batchyard.targets import CompanyTarget, Targets
from tests.helpers import assert_every_unit_settled_once, assert_one_batch_per_submission, run_of

REPO = Path(__file__).resolve().parents[2]

MARKERS = {
    "ok-1": "Revenue grew 8% to $1.2 billion in fiscal 2025, driven by services.",
    "ok-2": "We face intense competition from larger firms with more resources.",
    "bad-json": "[[fault:invalid_json]] Operating margin expanded 120 basis points.",
    "schema": "[[fault:schema_violation]] The board approved a $500 million buyback.",
    "refusal": "[[fault:refusal]] Litigation with a former supplier remains pending.",
    "length": "[[fault:truncated]] Guidance for 2026 assumes stable input costs.",
    "http400": "[[fault:error400]] Our ESG report covers scope 1 and 2 emissions.",
    "http500": "[[fault:error500]] Liquidity remains strong at $3.4 billion.",
}


def insert_chunks(ctx: RunContext, texts: dict[str, str], company: str = "acme") -> Targets:
    f = ctx.settings.mongo.fields
    docs = [
        {"_id": f"{company}/acme-10k-2025/{key}", f.company: company, f.document: "acme-10k-2025",
         f.chunk_index: i, f.text: text}
        for i, (key, text) in enumerate(texts.items())
    ]
    ctx.store.chunks.insert_many(docs)
    return Targets(companies=[CompanyTarget(company_id=company, documents=None)])


@pytest.fixture
def ctx(settings_factory: Any, tmp_path: Path) -> Any:
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", prompts)
    s = settings_factory(prompts_dir=str(prompts), limits={"max_attempts": 2},
                         provider={"local": {"faults": {"text_markers": True}}})  # MARKERS below
    c = RunContext(s)
    yield c
    c.close()


def test_mixed_batch_stores_valid_results_and_records_every_failure(ctx: RunContext) -> None:
    targets = insert_chunks(ctx, MARKERS)
    job = InferenceJob(ctx, targets, "classify")
    info = runner.execute(ctx, job)
    run = run_of(ctx, info)
    results, failures = assert_every_unit_settled_once(ctx, run)
    assert_one_batch_per_submission(ctx, run)
    assert sorted(results["unit_id"].to_list()) == ["acme/acme-10k-2025/ok-1", "acme/acme-10k-2025/ok-2"]
    codes = dict(zip(failures["unit_id"].str.split("/").list.last(), failures["code"], strict=True))
    assert codes["bad-json"] == "invalid_json"
    assert codes["schema"] == "schema_violation"
    assert codes["refusal"] == "refusal"
    assert codes["length"] == "truncated"
    assert codes["http400"] not in ("ok",) and failures.filter(pl.col("unit_id").str.ends_with("http400"))["attempt"][0] == 1
    assert failures.filter(pl.col("unit_id").str.ends_with("http500"))["attempt"][0] == 2  # retried once
    raw = dict(zip(failures["unit_id"].str.split("/").list.last(), failures["raw"], strict=True))
    assert raw["bad-json"] and raw["schema"], "the raw model text is kept for invalid output"
    stored = list(ctx.store.collection(job.results_collection).find({"task": "classify"}))
    assert sorted(d["unit_id"] for d in stored) == sorted(results["unit_id"].to_list())
    assert all(d["task_version"] == job.task_version and d["result"]["section_type"] for d in stored)


@pytest.mark.parametrize("task", ["summary", "classify", "risks"])
def test_each_task_runs_end_to_end_and_reruns_submit_nothing(ctx: RunContext, task: str) -> None:
    from batchyard.seed import seed_store, targets_for

    report = seed_store(ctx.store, 40, fields=ctx.settings.mongo.fields, seed=2, n_companies=2)
    targets = targets_for(report)
    info = runner.execute(ctx, InferenceJob(ctx, targets, task))
    results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
    assert results.height > 0 and failures.height == 0
    again = runner.execute(ctx, InferenceJob(ctx, targets, task))
    assert again["plan"]["requests"] == 0


def test_changing_the_prompt_redoes_only_that_task(ctx: RunContext) -> None:
    targets = insert_chunks(ctx, {k: v for k, v in MARKERS.items() if k.startswith("ok")})
    for task in ("classify", "risks"):
        runner.execute(ctx, InferenceJob(ctx, targets, task))
    prompt = Path(ctx.settings.prompts_dir) / "classify" / "v1.md"
    prompt.write_text(prompt.read_text() + "\nBe concise.\n")
    redo = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
    same = runner.execute(ctx, InferenceJob(ctx, targets, "risks"))
    assert redo["plan"]["requests"] == 2 and same["plan"]["requests"] == 0
    versions = ctx.store.collection(ctx.settings.mongo.results_collection).distinct("task_version", {"task": "classify"})
    assert len(versions) == 2


def test_template_syntax_in_chunk_text_reaches_the_model_verbatim(ctx: RunContext) -> None:
    import json

    nasty = "Costs {name} rose {{ x }} and {% if y %}z{% endif %} $var ${HOME} {{text}} \\n 東京"
    targets = insert_chunks(ctx, {"nasty": nasty})
    info = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
    part = run_of(ctx, info).partitions()[0]
    shard = ctx.staging.list(part.rel("shards"), ".jsonl")[0]
    line = json.loads(ctx.staging.read_bytes(part.rel("shards", shard)).splitlines()[0])
    user = line["body"]["messages"][1]["content"]
    assert nasty in user


BATCH_FAULTS = {
    "request_errors": ({"request_error_rate": 0.3, "seed": 2}, {"max_attempts": 5}),
    "expiry": ({"expire_after_requests": 3, "expire_batches": 1}, {}),
    "server_cancel": ({"cancel_after_requests": 2, "cancel_batches": 1, "cancelling_s": 0.2}, {}),
    "validation_failure": ({"validation_failure": True, "validation_fail_batches": 1}, {}),
    # the server counts 10k-17k tokens per shard (8 prompts with their schema): one shard fits the cap,
    # two do not
    "token_limit": ({"enqueued_token_cap": 20_000}, {"enqueued_token_budget": 1_000_000}),
    "transient_http": ({"transient_error_rate": 0.3, "seed": 9}, {}),
}


@pytest.mark.parametrize("fault", sorted(BATCH_FAULTS))
def test_inference_survives_every_batch_outcome(settings_factory: Any, tmp_path: Path, fault: str) -> None:
    from batchyard.seed import seed_store, targets_for

    faults, limits = BATCH_FAULTS[fault]
    local = {"faults": faults, "seconds_per_request": 0.02 if fault == "token_limit" else 0.0}
    prompts = tmp_path / "prompts-copy"
    shutil.copytree(REPO / "prompts", prompts)
    s = settings_factory(prompts_dir=str(prompts), provider={"local": local},
                         limits={"max_requests_per_batch": 8, **limits})
    with RunContext(s) as c:
        report = seed_store(c.store, 30, fields=s.mongo.fields, seed=5, n_companies=1)
        info = runner.execute(c, InferenceJob(c, targets_for(report), "risks"))
        run = run_of(c, info)
        results, failures = assert_every_unit_settled_once(c, run)
        assert_one_batch_per_submission(c, run)
        assert results.height + failures.height == 30
        assert results.height >= 27, failures.select("unit_id", "code", "message").to_dicts()
        records = run_records(run)
        seen = {h.status for r in records for h in r.history}
        expected = {"expiry": "batch:expired", "server_cancel": "batch:cancelled",
                    "validation_failure": "batch:failed", "token_limit": "batch:failed"}.get(fault)
        if expected:
            assert expected in seen, sorted(seen)
        if fault == "token_limit":
            assert any(r.submission > 1 for r in records), "a token-limit failure must requeue the shard"
