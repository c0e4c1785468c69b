"""The whole embeddings pipeline (plain engine) with the staging root on a local S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.ledger import run_records
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_one_batch_per_submission,
    assert_vectors_match,
    planned_run,
    run_of,
    seed,
)
from tests.s3.moto_s3 import S3Endpoint

pytestmark = pytest.mark.s3

N = 90


def s3_settings(settings_factory: Any, s3: S3Endpoint, bucket: str, **extra: Any) -> Any:
    return settings_factory(
        staging=s3.staging(bucket, "runs"),
        limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10, **extra.pop("limits", {})},
        **extra,
    )


def run_keys(s3: S3Endpoint, bucket: str, job: str, run_id: str) -> set[str]:
    """Every object of one run, relative to the run folder, straight from S3."""
    prefix = f"{bucket}/runs/{job}/{run_id}/"
    return {p[len(prefix):] for p in s3.admin_fs().find(prefix)}


def local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_embeddings_run_stages_every_artifact_on_s3(settings_factory: Any, s3: S3Endpoint, bucket: str,
                                                    tmp_path: Path) -> None:
    ctx = RunContext(s3_settings(settings_factory, s3, bucket))
    try:
        assert ctx.staging.is_s3
        targets = seed(ctx, N)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["state"] == "finished" and info["phase"] == "done"
        run = run_of(ctx, info)

        # results complete, one batch per submission, right vectors in Milvus
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        job = EmbeddingsJob(ctx, targets)
        assert_vectors_match(ctx, results, job.collection, job.dims)

        # every staged artifact is an S3 object
        got = run_keys(s3, bucket, "embeddings", info["run_id"])
        records = run_records(run)
        assert len(records) == info["plan"]["shards"] >= 3
        per_part = {
            f"p={r.partition}/{f}" for r in records
            for f in (f"shards/{r.name}.jsonl", f"ledger/{r.name}.json", f"outputs/{r.name}.jsonl",
                      f"parsed/{r.name}.parquet", f"results/{r.name}.parquet", f"failures/{r.name}.parquet",
                      f"loads/{r.name}.json")
        }
        partitions = {f"p={p.pid}/{f}" for p in run.partitions()
                      for f in ("partition.json", "inputs.parquet", "requests.parquet", "reuse.parquet",
                                "failures/plan.parquet",
                                *(f"manifests/{a}.json" for a in ("chunks", "requests", "batches", "results", "sinks")))}
        expected = {
            "run.json", "new_units.parquet", "queue.parquet", *(f"manifests/{a}.json" for a in ("chunks", "requests", "batches", "results", "sinks")),
            *per_part, *partitions,
        }
        assert expected <= got, f"missing on S3: {sorted(expected - got)}"
        unexpected = {k for k in got - expected
                      if not any(f"/{d}/" in k or k.startswith(f"{d}/")
                                 for d in ("errors", "anomalies", "followups", "chunks", "prune"))}
        assert not unexpected, f"unexpected objects: {sorted(unexpected)}"
        assert ctx.staging.read_json(run.rel("run.json"))["state"] == "finished"
        manifest = ctx.staging.read_json(run.rel("manifests", "results.json"))
        assert manifest["rows"] == N
        receipts = {r["sink"]: r for r in info["loads"]}
        assert receipts["milvus"]["rows"] == N

        # nothing of the run was staged locally; local state went to the root's local_dir
        local = ctx.staging.local_dir()
        assert local == tmp_path / ".batchyard" / "s3" / bucket / "runs"
        assert sorted(p.name for p in local.iterdir()) == [".localapi", ".milvus.db.server.log", ".mongo-standin", "milvus.db"]
        assert not (tmp_path / "staging").exists()
        staged_names = {"run.json", "partition.json", "inputs.parquet", "requests.parquet"}
        assert not [f for f in local_files(tmp_path) if Path(f).name in staged_names]

        # the run is listed and found through S3
        from batchyard.storage.runs import find_run, list_runs

        assert [r.run_id for r in list_runs(ctx.staging)] == [info["run_id"]]
        assert find_run(ctx.staging, info["run_id"]).job == "embeddings"
    finally:
        ctx.close()


def test_an_s3_staged_run_resumes_in_a_new_context(settings_factory: Any, s3: S3Endpoint, bucket: str) -> None:
    settings = s3_settings(settings_factory, s3, bucket, provider={"local": {"validating_s": 0.3}})
    ctx = RunContext(settings)
    try:
        targets = seed(ctx, N)
        job = EmbeddingsJob(ctx, targets)
        run = planned_run(ctx, job)
        partial = runner.drive(ctx, job, run, poll_interval=0, max_rounds=1)
        assert partial["by_state"].get("collected", 0) < partial["shards"], "the run must stop part-way"
        assert run.read_run()["phase"] == "batches"
        run_id = run.run_id
    finally:
        ctx.close()  # the process "dies": the embedded server stops, its state stays in local_dir

    # a new context (new Staging, new clients) finds the run on S3 and finishes it
    ctx = RunContext(s3_settings(settings_factory, s3, bucket))
    try:
        info = runner.resume(ctx, run_id)
        assert info["state"] == "finished" and info["phase"] == "done" and info["run_id"] == run_id
        run = run_of(ctx, info)
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        assert_vectors_match(ctx, results, job.collection, job.dims)
        got = run_keys(s3, bucket, "embeddings", run_id)
        assert {"manifests/sinks.json", "manifests/results.json"} <= got
        assert any(k.startswith("p=p0000/results/") for k in got) and any(k.startswith("p=p0000/loads/") for k in got)
        # a finished run resumes to the same result without new work
        again = runner.resume(ctx, run_id)
        assert again["final"] == info["final"]
    finally:
        ctx.close()
