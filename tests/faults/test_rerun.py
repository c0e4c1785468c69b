"""Re-materializing from staging alone: sinks and results come back without any API call."""

from __future__ import annotations

from typing import Any

import pytest

from batchyard import runner
from batchyard.clients.milvus import count
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from tests.helpers import seed, server_batches


def test_rerun_reloads_sinks_and_rebuilds_results_without_the_api(settings_factory: Any) -> None:
    s = settings_factory(limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})
    with RunContext(s) as ctx:
        targets = seed(ctx, 60)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        batches_before = len(server_batches(ctx, info["run_id"]))
        job = EmbeddingsJob(ctx, targets)
        ctx.milvus.drop_collection(job.collection)
        ctx.store.chunks.update_many({}, {"$unset": {"batchyard": ""}})
        ctx.store.save()
    # a fresh context: rerun must not even open a Batch API client
    with RunContext(s) as ctx:
        out = runner.rematerialize(ctx, info["run_id"], start="sinks")
        assert ctx._api is None
        assert out["state"] == "finished"
        assert count(ctx.milvus, EmbeddingsJob(ctx, targets).collection) == 60
        assert ctx.store.chunks.count_documents({f"batchyard.{s.embedding.space}": {"$exists": True}}) == 60
        ctx.staging.delete(runner.find_run(ctx.staging, info["run_id"]).rel("results.parquet"))
        again = runner.rematerialize(ctx, info["run_id"], start="results")
        assert ctx._api is None and again["final"]["results"] == 60
        with pytest.raises(ValueError, match="cannot re-materialize"):
            runner.rematerialize(ctx, info["run_id"], start="requests")
        assert len(server_batches(ctx, info["run_id"])) == batches_before
