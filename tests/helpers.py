"""Helpers shared by pipeline-level tests: seed a corpus, run a job, check the invariants."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from batchyard.context import RunContext
from batchyard.storage.runs import RunStore


def seed(ctx: RunContext, n: int, *, companies: int = 3, seed: int = 1) -> Any:
    """Seed n chunks into the context's document store; returns the targets."""
    from batchyard.seed import seed_store, targets_for

    report = seed_store(ctx.store, n, fields=ctx.settings.mongo.fields, seed=seed, n_companies=companies)
    ctx.store.save()
    return targets_for(report)


def seed_repeated_ids(ctx: RunContext) -> Any:
    """Three chunks of acme/d1 under a custom id field (`uid`): `u-1` twice (`_id` 1 and 3) and
    `u-2` once; returns the targets (acme). The settings must map `chunk_id` to `uid`."""
    from batchyard.targets import CompanyTarget, Targets

    base = {"company_id": "acme", "document_id": "d1"}
    ctx.store.chunks.insert_many([
        {"_id": 1, "uid": "u-1", **base, "chunk_index": 0, "text": "first copy"},
        {"_id": 2, "uid": "u-2", **base, "chunk_index": 1, "text": "unique"},
        {"_id": 3, "uid": "u-1", **base, "chunk_index": 2, "text": "second copy"},
    ])
    return Targets(companies=[CompanyTarget(company_id="acme")])


def planned_run(ctx: RunContext, job: Any) -> RunStore:
    """A new run of `job`, snapshotted and planned, with no batch submitted yet."""
    from batchyard import runner

    run = runner.create_run(ctx, job)
    runner.snapshot(ctx, job, run)
    runner.plan(ctx, job, run, runner.LocalEngine(ctx, job, run))
    return run


def cancelled_run(ctx: RunContext, job: Any) -> tuple[RunStore, dict[str, Any]]:
    """A new run of `job`, driven for three rounds, then cancelled while batches are live."""
    from batchyard import runner
    from batchyard.storage.ledger import run_records

    run = planned_run(ctx, job)
    runner.drive(ctx, job, run, max_rounds=3, poll_interval=0.1)
    assert any(r.state == "submitted" for r in run_records(run)), "batches must be live when we cancel"
    runner.cancel(ctx, run.run_id)
    info = runner.continue_run(ctx, job, run)
    assert info["state"] == "cancelled"
    return run, info


def run_of(ctx: RunContext, info: dict[str, Any]) -> RunStore:
    return RunStore(ctx.staging, info["job"], info["run_id"])


def tables(ctx: RunContext, run: RunStore) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The run's results and failures datasets."""
    from batchyard.runner import failures_frame, results_frame

    return results_frame(run), failures_frame(run)


def planned_units(ctx: RunContext, run: RunStore) -> set[str]:
    """Every unit the run's partitions planned."""
    from batchyard.runner import job_for_run

    job = job_for_run(ctx, run)
    return {u for part in run.partitions() for u in job.planned_units(part)["unit_id"].to_list()}


def assert_every_unit_settled_once(ctx: RunContext, run: RunStore) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every planned or rejected unit is in results or failures: never both, never neither.

    A chunk id that repeats in the source fails once per copy (`duplicate_chunk_id`).
    """
    results, failures = tables(ctx, run)
    planned = planned_units(ctx, run)
    rejected = set(failures.filter(pl.col("stage").is_in(["snapshot", "plan"]))["unit_id"].to_list())
    res_ids = results["unit_id" if "unit_id" in results.columns else "chunk_id"].to_list() if results.height else []
    fail_ids = failures.filter(pl.col("code") != "duplicate_chunk_id")["unit_id"].to_list()
    assert len(res_ids) == len(set(res_ids)), "a unit has two results"
    assert len(fail_ids) == len(set(fail_ids)), "a unit has two failures"
    fail_ids = failures["unit_id"].to_list()
    assert not set(res_ids) & set(fail_ids), "a unit is both a result and a failure"
    assert set(res_ids) | set(fail_ids) == planned | rejected, "a unit is neither a result nor a failure"
    assert failures["message"].null_count() == 0 and failures["code"].null_count() == 0
    return results, failures


def server_batches(ctx: RunContext, run_id: str) -> list[dict[str, Any]]:
    """Every batch the provider holds for this run (through the SDK)."""
    # through the pipeline's own retrying client: the server may be injecting transient errors
    every = ctx.api._call("list batches", lambda: [b.model_dump() for b in ctx.api.client.batches.list(limit=100)])
    return [b for b in every if (b["metadata"] or {}).get("batchyard_run") == run_id]


def assert_one_batch_per_submission(ctx: RunContext, run: RunStore) -> None:
    """The server holds exactly one batch per shard attempt submission the ledger knows."""
    from batchyard.storage.ledger import run_records

    batches = server_batches(ctx, run.run_id)
    keys = [(b["metadata"]["partition"], b["metadata"]["shard"], b["metadata"]["attempt"],
             b["metadata"]["submission"]) for b in batches]
    assert len(keys) == len(set(keys)), f"a shard attempt was submitted twice: {sorted(keys)}"
    expected = set()
    for rec in run_records(run):
        for sub in range(1, rec.submission + (1 if rec.batch_id else 0)):
            expected.add((rec.partition, rec.shard, str(rec.attempt), str(sub)))
    assert set(keys) == expected


def assert_vectors_match(ctx: RunContext, results: pl.DataFrame, collection: str, dims: int) -> None:
    """Milvus holds each result once, with the hash executor's vector of its chunk text."""
    from batchyard.clients.milvus import get_rows
    from batchyard.localapi.executors import hash_embedding

    client = ctx.milvus
    client.load_collection(collection)
    ids = results["chunk_id"].to_list()
    got = {}
    for i in range(0, len(ids), 500):
        for row in get_rows(client, collection, ids[i : i + 500], ["chunk_id", "vector"]):
            got[row["chunk_id"]] = np.asarray(row["vector"], dtype=np.float32)
    assert set(got) == set(ids)
    texts = {d["_id"]: d["text"] for d in ctx.store.chunks.find({"_id": {"$in": ids}}, {"text": 1})}
    for cid in ids:
        np.testing.assert_allclose(got[cid], hash_embedding(texts[cid], dims), rtol=1e-6, atol=1e-6)
