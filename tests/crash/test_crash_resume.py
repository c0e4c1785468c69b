"""Crash safety: SIGKILL the pipeline (a real subprocess) at each crash point, then resume.

The Batch API server runs in its own process (`batchyard serve`), so it outlives the pipeline,
as OpenAI would. After the resume: every chunk is in Milvus exactly once with its vector, every
unit has exactly one result or failure, and the server holds exactly one batch per shard attempt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchyard.crash import CRASH_POINTS
from batchyard.localapi.runner import ServerProcess

pytestmark = pytest.mark.crash

N = 240  # 4 partitions (60 chunks each at most), about 48 shards of 5 inputs


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    env = {"BATCHYARD_PROVIDER__LOCAL__SECONDS_PER_REQUEST": "0.01"}
    with ServerProcess(tmp_path / "server", env=env) as proc:
        yield proc.base_url


def pipeline_env(tmp_path: Path, server: str, crash: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    env.update({
        "BATCHYARD_STAGING__ROOT": str(tmp_path / "staging"),
        "BATCHYARD_PROVIDER__BASE_URL": server,
        "BATCHYARD_PROVIDER__API_KEY": "sk-crash-test",
        "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.1",
        "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT",
        "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
        "BATCHYARD_LIMITS__MAX_INPUTS_PER_BATCH": "5",
        "BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST": "5",
        "BATCHYARD_RUN__PARTITION_MAX_CHUNKS": "60",
    })
    if crash:
        env["BATCHYARD_CRASH_AT"] = crash
    return env


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def settings_for(tmp_path: Path, server: str) -> Any:
    from batchyard.settings import Settings

    return Settings(_env_file=None, staging={"root": str(tmp_path / "staging")},
                    provider={"base_url": server, "api_key": "sk-crash-test"},
                    milvus={"index_type": "FLAT"}, embedding={"dimensions": 16})


def only_run(tmp_path: Path, job: str) -> str:
    runs = sorted(p.name for p in (tmp_path / "staging" / job).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_embeddings_crash_then_resume(tmp_path: Path, server: str, point: str) -> None:
    env = pipeline_env(tmp_path, server, None)
    seeded = cli(["seed", "--chunks", str(N), "--companies", "4", "--targets-out", "t.yaml"], env, tmp_path)
    assert seeded.returncode == 0, seeded.stderr
    crashed = cli(["embed", "--targets", "t.yaml", "--engine", "local"], pipeline_env(tmp_path, server, point), tmp_path)
    assert crashed.returncode == -signal.SIGKILL, f"expected a SIGKILL at {point}: {crashed.stderr[-2000:]}"
    run_id = only_run(tmp_path, "embeddings")
    resumed = cli(["resume", run_id, "--engine", "local"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.storage.runs import RunStore
    from tests.helpers import (
        assert_every_unit_settled_once,
        assert_one_batch_per_submission,
        assert_vectors_match,
    )

    with RunContext(settings_for(tmp_path, server)) as ctx:
        run = RunStore(ctx.staging, "embeddings", run_id)
        info = run.read_run()
        assert info["state"] == "finished"
        assert len(info["partitions"]) >= 4 and info["plan"]["shards"] >= 40
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
        from batchyard.clients.milvus import count, ensure_collection

        ensure_collection(ctx.milvus, job.collection, dim=job.dims, index_type="FLAT", metric_type="COSINE")
        assert count(ctx.milvus, job.collection) == N
        assert_vectors_match(ctx, results, job.collection, job.dims)
        marked = ctx.store.chunks.count_documents({f"batchyard.{job.emb.space}": {"$exists": True}})
        assert marked == N


@pytest.mark.parametrize("point", ["after_create", "during_download", "during_load"])
def test_inference_crash_then_resume(tmp_path: Path, server: str, point: str) -> None:
    env = pipeline_env(tmp_path, server, None)
    assert cli(["seed", "--chunks", "30", "--companies", "1", "--targets-out", "t.yaml"], env, tmp_path).returncode == 0
    crashed = cli(["infer", "classify", "--targets", "t.yaml", "--engine", "local", "--max-requests-per-batch", "10"],
                  pipeline_env(tmp_path, server, point), tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    run_id = only_run(tmp_path, "inference-classify")
    resumed = cli(["resume", run_id, "--engine", "local"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    from batchyard.context import RunContext
    from batchyard.storage.runs import RunStore
    from tests.helpers import assert_every_unit_settled_once, assert_one_batch_per_submission

    with RunContext(settings_for(tmp_path, server)) as ctx:
        run = RunStore(ctx.staging, "inference-classify", run_id)
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == 30 and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        stored = ctx.store.collection("inference_results").count_documents({"task": "classify"})
        assert stored == 30


def test_a_crash_inside_a_prune_prunes_on_resume(tmp_path: Path, server: str) -> None:
    env = pipeline_env(tmp_path, server, None)
    assert cli(["seed", "--chunks", "120", "--companies", "3", "--targets-out", "t.yaml"], env, tmp_path).returncode == 0
    assert cli(["embed", "--targets", "t.yaml", "--engine", "local"], env, tmp_path).returncode == 0

    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob

    with RunContext(settings_for(tmp_path, server)) as ctx:
        gone = [d["_id"] for d in ctx.store.chunks.find({}).sort("_id", 1)][::10]  # 12 chunks, 3 companies
        ctx.store.chunks.delete_many({"_id": {"$in": gone}})
        ctx.store.save()
    crashed = cli(["embed", "--targets", "t.yaml", "--engine", "local"], pipeline_env(tmp_path, server, "during_prune"),
                  tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    run_id = sorted(p.name for p in (tmp_path / "staging" / "embeddings").iterdir())[-1]
    resumed = cli(["resume", run_id, "--engine", "local", "--json"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    with RunContext(settings_for(tmp_path, server)) as ctx:
        job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
        ctx.milvus.load_collection(job.collection)
        held = {r["chunk_id"] for r in ctx.milvus.query(job.collection, filter='chunk_id != ""',
                                                         output_fields=["chunk_id"], limit=1000)}
        assert held == {str(d["_id"]) for d in ctx.store.chunks.find({}, {"_id": 1})}
        assert not held & {str(g) for g in gone}
        from batchyard.storage.runs import RunStore

        info = RunStore(ctx.staging, "embeddings", run_id).read_run()
        assert info["state"] == "finished" and info["final"]["pruned"] == len(gone)
def test_a_crash_while_replanning_a_shard_over_the_providers_limit_then_resume(tmp_path: Path) -> None:
    # default limits: one shard of ~14k tokens per partition; the provider's cap is 5,000. The
    # pipeline dies after a refused shard's follow-ups are written, before it is collected
    env = {"BATCHYARD_PROVIDER__LOCAL__SECONDS_PER_REQUEST": "0.01",
           "BATCHYARD_PROVIDER__LOCAL__FAULTS__ENQUEUED_TOKEN_CAP": "5000"}
    with ServerProcess(tmp_path / "server", env=env) as proc:
        base = {k: v for k, v in pipeline_env(tmp_path, proc.base_url, None).items()
                if not k.startswith("BATCHYARD_LIMITS__")}
        seeded = cli(["seed", "--chunks", str(N), "--companies", "4", "--targets-out", "t.yaml"], base, tmp_path)
        assert seeded.returncode == 0, seeded.stderr
        crashed = cli(["embed", "--targets", "t.yaml", "--engine", "local"],
                      {**base, "BATCHYARD_CRASH_AT": "before_collect"}, tmp_path)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
        run_id = only_run(tmp_path, "embeddings")
        ledgers = [json.loads(p.read_text()) for p in (tmp_path / "staging").glob(f"embeddings/{run_id}/*/ledger/*")]
        cut = [r for r in ledgers if r["state"] == "ended" and r["split_cap"] == 5000]
        assert cut and any(r["split_from"] for r in ledgers), "the crash came mid-split: follow-ups written"
        resumed = cli(["resume", run_id, "--engine", "local"], base, tmp_path)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

        from batchyard.audit import audit_run
        from batchyard.context import RunContext
        from batchyard.storage.ledger import run_records
        from batchyard.storage.runs import RunStore
        from tests.helpers import assert_every_unit_settled_once, assert_one_batch_per_submission

        with RunContext(settings_for(tmp_path, proc.base_url)) as ctx:
            run = RunStore(ctx.staging, "embeddings", run_id)
            results, failures = assert_every_unit_settled_once(ctx, run)
            assert results.height == N and failures.height == 0
            assert_one_batch_per_submission(ctx, run)
            records = run_records(run)
            over = [r for r in records if r.attempt == 1 and r.tokens > 5000]
            assert over and all(r.split_into and r.submission == 1 for r in over)
            assert all(r.tokens <= 5000 for r in records if r.split_from)
            report = audit_run(ctx, run)
            assert report.ok, [str(d) for d in report.differences]
