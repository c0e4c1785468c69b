"""Two lanes, one pipeline: the same planned requests through the Batch API or real-time calls."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from batchyard import runner
from batchyard.audit import audit_run
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.pricing import DEFAULT_PRICES
from batchyard.storage.ledger import run_records
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_vectors_match,
    planned_run,
    run_of,
    seed,
    server_batches,
)

COLS = ["chunk_id", "company_id", "document_id", "chunk_index", "text_sha256", "sent_sha256", "truncated",
        "vector_source"]


FAST = {"requests_per_minute": 100_000, "tokens_per_minute": 100_000_000}


def embed(settings_factory: Any, root: Path, n: int, **lane: Any) -> tuple[RunContext, dict[str, Any]]:
    s = settings_factory(staging={"root": str(root)}, lane={"realtime": FAST, **lane},
                         limits={"max_inputs_per_batch": 400, "max_inputs_per_request": 100})
    ctx = RunContext(s)
    info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, n, seed=11)))
    return ctx, info


def milvus_rows(ctx: RunContext) -> pl.DataFrame:
    job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
    ctx.milvus.load_collection(job.collection)
    rows = ctx.milvus.query(job.collection, filter="chunk_index >= -1", output_fields=["*"], limit=16384)
    return pl.DataFrame([{**r, "vector": [float(x) for x in r["vector"]]} for r in rows]).drop("run_id").sort("chunk_id")


def test_batch_and_realtime_give_identical_results_and_sinks(settings_factory: Any, tmp_path: Path) -> None:
    a, batch = embed(settings_factory, tmp_path / "batch", 2_000, mode="batch")
    b, realtime = embed(settings_factory, tmp_path / "realtime", 2_000, mode="realtime")
    try:
        assert batch["final"]["results"] == realtime["final"]["results"] == 2_000
        ra = assert_every_unit_settled_once(a, run_of(a, batch))[0].sort("chunk_id")
        rb = assert_every_unit_settled_once(b, run_of(b, realtime))[0].sort("chunk_id")
        assert ra.select(COLS).equals(rb.select(COLS))
        assert np.array_equal(np.stack(ra["vector"].to_numpy()), np.stack(rb["vector"].to_numpy()))
        assert set(ra["lane"]) == {"batch"} and set(rb["lane"]) == {"realtime"}
        assert milvus_rows(a).equals(milvus_rows(b))
        # the ledger names the lane; the provider holds no batch of the real-time run
        assert {r.lane for r in run_records(run_of(b, realtime))} == {"realtime"}
        assert server_batches(b, realtime["run_id"]) == [] and server_batches(a, batch["run_id"])
        lanes = realtime["final"]["lanes"]
        assert set(lanes) == {"realtime"} and lanes["realtime"]["usd"] > batch["final"]["lanes"]["batch"]["usd"]
        # rerun works the same on a real-time run: re-parse the staged answers, reload
        again = runner.rematerialize(b, realtime["run_id"], start="results")
        assert again["final"]["results"] == 2_000 and again["final"]["checks_failed"] == []
    finally:
        a.close()
        b.close()


def test_auto_sends_a_small_run_realtime_and_a_large_one_batch(settings_factory: Any, tmp_path: Path) -> None:
    small, info_small = embed(settings_factory, tmp_path / "small", 50, mode="auto", auto_max_tokens=50_000)
    large, info_large = embed(settings_factory, tmp_path / "large", 600, mode="auto", auto_max_tokens=50_000)
    try:
        assert info_small["plan"]["tokens"] < 50_000 <= info_large["plan"]["tokens"]
        assert info_small["lane"] == "realtime" and info_large["lane"] == "batch"
        assert {r.lane for r in run_records(run_of(small, info_small))} == {"realtime"}
        assert {r.lane for r in run_records(run_of(large, info_large))} == {"batch"}
        assert info_small["final"]["results"] == 50 and info_large["final"]["results"] == 600
    finally:
        small.close()
        large.close()


def test_auto_finishes_the_tail_of_an_expiring_backfill_realtime(settings_factory: Any, tmp_path: Path) -> None:
    # every batch expires half done; the tail goes real-time instead of waiting for batch windows
    s = settings_factory(
        lane={"mode": "auto", "auto_max_tokens": 0, "tail_max_tokens": 10**9, "realtime": FAST},
        provider={"local": {"faults": {"expire_after_fraction": 0.5}}, "requeue_backoff_s": 30.0},
        limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10},
    )
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 120)))
        assert info["lane"] == "batch" and runner.exit_code(info) == 0
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert results.height == 120 and failures.height == 0
        lanes = {r.lane for r in run_records(run_of(ctx, info))}
        assert lanes == {"batch", "realtime"}
        assert set(results["lane"]) == {"batch", "realtime"}
        assert_vectors_match(ctx, results, EmbeddingsJob(ctx, None).collection, 16)  # type: ignore[arg-type]
        assert info["timings"].get("wait", 0) < 30, "the tail did not wait out a 30 s requeue backoff"


def test_auto_fits_the_tail_to_the_lanes_window(settings_factory: Any) -> None:
    # batches keep expiring: requests past the requeue limit go real-time, where one window admits
    # less than one request (10 inputs): they are sent in calls that fit, not failed
    s = settings_factory(
        lane={"mode": "auto", "auto_max_tokens": 0, "tail_max_tokens": 0,
              "realtime": {"tokens_per_minute": 60 * 1_000, "rate_window_s": 1.0, "requests_per_minute": 60_000}},
        provider={"local": {"faults": {"expire_after_fraction": 0.5}}},
        limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10, "max_requeues": 1},
    )
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 60)))
        records = run_records(run_of(ctx, info))
        tail = [r for r in records if r.lane == "realtime"]
        assert tail and max(r.tokens / r.n_requests for r in tail) > 1_000, "tail requests exceed a window"
        assert runner.exit_code(info) == 0 and info["final"]["failures_by_code"] == {}
        assert sum(r.realtime["split"] for r in tail if r.realtime) > 0
        results, _ = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert results.height == 60 and set(results["lane"]) == {"batch", "realtime"}
        assert_vectors_match(ctx, results, EmbeddingsJob(ctx, None).collection, 16)  # type: ignore[arg-type]


def test_a_crash_mid_shard_resends_at_most_one_window_of_tokens(
    settings_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchyard.stages import batches

    window = 3_000  # tokens a window admits: 180k a minute, counted per second
    lane = {"mode": "realtime", "realtime": {"tokens_per_minute": 60 * window, "rate_window_s": 1.0,
                                             "requests_per_minute": 60_000}}
    s = settings_factory(lane=lane, limits={"max_inputs_per_batch": 400, "max_inputs_per_request": 4})
    with RunContext(s) as ctx:
        run = planned_run(ctx, EmbeddingsJob(ctx, seed(ctx, 60)))
        (rec,) = run_records(run)
        part, client = run.partition(rec.partition), ctx.api.client

        def crash(point: str) -> None:
            if point == "during_realtime":
                raise RuntimeError("power cut")

        monkeypatch.setattr(batches, "crashpoint", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            batches.run_realtime(part, client, rec.name, s.lane)
        monkeypatch.undo()
        (first,) = ctx.staging.list(part.rel("outputs", f"{rec.name}.rt"), ".jsonl")
        lo, hi = (int(x) for x in first.removesuffix(".jsonl").split("-"))
        plan = batches.attempt_requests(part, rec.shard, rec.attempt)
        assert lo == 0 and 0 < hi < plan.height and int(plan["tokens"][:hi].sum()) <= window
        done = batches.run_realtime(part, client, rec.name, s.lane)
        assert done.state == "ended" and done.request_counts == {"total": plan.height, "completed": plan.height,
                                                                 "failed": 0}
        # nothing was sent twice across the crash: each call's body reached the server once
        calls = ctx._server.sync_calls()  # type: ignore[union-attr]
        assert {c.status for c in calls} == {200} and len({c.digest for c in calls}) == len(calls)
        assert done.realtime is not None and done.realtime["calls"] == len(calls) >= plan.height
        assert done.usage is not None and done.usage["input_tokens"] == int(plan["tokens"].sum())


def test_realtime_under_a_429_storm_stores_each_result_once(settings_factory: Any) -> None:
    s = settings_factory(
        lane={"mode": "realtime", "slice_requests": 5,
              "realtime": {"requests_per_minute": 6000, "tokens_per_minute": 100_000_000, "rate_window_s": 1.0,
                           "backoff_base_s": 0.01, "max_retries": 20}},
        provider={"local": {"faults": {"sync_429_rate": 0.5, "sync_retry_after_s": 0.05, "seed": 4}}},
        limits={"max_inputs_per_batch": 20, "max_inputs_per_request": 2},
    )
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 80)))
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert results.height == 80 and failures.height == 0
        calls = ctx._server.sync_calls()  # type: ignore[union-attr]
        assert sum(1 for c in calls if c.status == 429) > 0, "the storm happened"
        assert sum(1 for c in calls if c.status == 200) == info["plan"]["requests"], "each request answered once"
        job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
        from batchyard.clients.milvus import count

        assert count(ctx.milvus, job.collection) == 80


def test_a_realtime_run_reports_the_providers_usage_is_audited_and_creates_no_batch(
    settings_factory: Any, tmp_path: Path
) -> None:
    ctx, info = embed(settings_factory, tmp_path / "rt", 300, mode="realtime")
    try:
        final, tokens = info["final"], info["plan"]["tokens"]
        assert final["results"] == 300 and runner.exit_code(info) == 0
        # every staged answer carries its usage: the summary reports it, priced real-time
        assert final["usage"]["input_tokens"] == tokens > 0
        price = DEFAULT_PRICES["text-embedding-3-small"].input_per_1m
        assert final["cost_reported_usd"] == pytest.approx(tokens * price / 1e6, abs=1e-6)
        assert final["lanes"] == {"realtime": {"input_tokens": tokens, "output_tokens": 0,
                                               "usd": final["cost_reported_usd"]}}
        # no batch was created, and the summary does not claim one
        assert final["batches"] == 0 and final["realtime_requests"] == info["plan"]["requests"]
        assert "Batch API" not in info["provider"] and "real-time endpoints" in info["provider"]
        assert server_batches(ctx, info["run_id"]) == []
        records = run_records(run_of(ctx, info))
        assert all(r.usage and r.usage["input_tokens"] == r.tokens for r in records)
        assert sum(r.realtime["calls"] for r in records if r.realtime) == info["plan"]["requests"]
        # the audit checks real-time attempts by what they have, and passes
        report = audit_run(ctx, run_of(ctx, info))
        assert report.ok, [str(d) for d in report.differences]
        assert all(row["lane"] == "realtime" and row["file_id"] is None for row in report.tables["sent"])
        # ... and still bites: an answer removed from the joined output is named
        rec = records[0]
        part = run_of(ctx, info).partition(rec.partition)
        out = part.rel("outputs", f"{rec.name}.jsonl")
        ctx.staging.write_bytes(out, b"".join(ctx.staging.read_bytes(out).splitlines(keepends=True)[1:]))
        broken = audit_run(ctx, run_of(ctx, info), sinks=False)
        checks = {d.check for d in broken.differences}
        assert {f"{rec.key}: outputs = real-time slices", f"{rec.key}: real-time answers",
                f"{rec.key}: real-time usage"} <= checks
    finally:
        ctx.close()


def test_a_realtime_inference_run_prices_input_and_output(settings_factory: Any, tmp_path: Path) -> None:
    shutil.copytree(Path(__file__).resolve().parents[2] / "prompts", tmp_path / "prompts")
    s = settings_factory(prompts_dir=str(tmp_path / "prompts"), lane={"mode": "realtime", "realtime": FAST})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, InferenceJob(ctx, seed(ctx, 40), "classify"))
        final = info["final"]
        assert final["results"] == 40 and runner.exit_code(info) == 0
        used = final["usage"]
        assert used["input_tokens"] == info["plan"]["tokens"] > 0 and used["output_tokens"] > 0
        price = DEFAULT_PRICES["gpt-4.1-mini"]
        usd = (used["input_tokens"] * price.input_per_1m + used["output_tokens"] * price.output_per_1m) / 1e6
        lane = final["lanes"]["realtime"]
        assert (lane["input_tokens"], lane["output_tokens"]) == (used["input_tokens"], used["output_tokens"])
        assert lane["usd"] == final["cost_reported_usd"] == pytest.approx(usd, abs=1e-6)
        report = audit_run(ctx, run_of(ctx, info))
        assert report.ok, [str(d) for d in report.differences]

