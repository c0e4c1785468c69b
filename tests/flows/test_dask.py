"""Scale-out on Prefect: tasks that pickle, Dask worker processes, one poll task run per round."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from tests.flows.test_flows import overrides, seed_targets

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]


def test_every_task_argument_pickles(tmp_path: Path) -> None:
    from batchyard.context import RunContext, context_for, run_ref
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.orchestration.flows import collect_task, plan_task
    from batchyard.settings import load_settings
    from batchyard.targets import load_targets
    from tests.helpers import planned_run

    targets = seed_targets(tmp_path, 30)
    over = overrides(tmp_path)
    with RunContext(load_settings(None, **over)) as ctx:
        from batchyard.context import register

        register(ctx, overrides=over)
        run = planned_run(ctx, EmbeddingsJob(ctx, load_targets(targets)))
        ref = run_ref(ctx, "embeddings", run.run_id)
        import inspect

        for task, args in ((plan_task, (ref, "p0000")), (collect_task, (ref, "p0000", "s00000.1"))):
            params = dict(zip(inspect.signature(task.fn).parameters, args, strict=True))
            back = pickle.loads(pickle.dumps(params))
            assert back == params
        # another process gets the reference, not the context: it rebuilds one from settings
        copy = pickle.loads(pickle.dumps(ref))
        object.__setattr__(copy, "token", "elsewhere")
        other = context_for(copy)
        assert other is not ctx and other.staging.root == ctx.staging.root
        other.close()


def test_dask_workers_give_the_same_results_as_the_local_engine(tmp_path: Path) -> None:
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.orchestration.flows import embeddings_flow, with_runner
    from batchyard.settings import Settings, load_settings
    from batchyard.targets import load_targets

    targets = seed_targets(tmp_path / "dask", 120)
    seed_targets(tmp_path / "local", 120)  # the same corpus (same seed) in a second root
    over = overrides(tmp_path / "dask", orchestration={"task_runner": "dask", "dask_workers": 2},
                     run={"partition_max_chunks": 40})
    info = with_runner(embeddings_flow, load_settings(None, **over))(targets=targets, overrides=over)
    assert info["state"] == "finished" and info["final"]["results"] == 120
    assert len(info["partitions"]) >= 3
    with RunContext(Settings(_env_file=None, **over)) as ctx:
        planners = {p.read_state()["planned_by"] for p in runner.find_run(ctx.staging, info["run_id"]).partitions()}
    assert f":{os.getpid()}" not in " ".join(planners), "plans ran in Dask worker processes, not in the flow's"

    local_settings = Settings(_env_file=None, **overrides(tmp_path / "local", run={"partition_max_chunks": 40}))
    with RunContext(local_settings) as ctx:
        local = runner.execute(ctx, EmbeddingsJob(ctx, load_targets(targets)))
        local_results = runner.results_frame(runner.find_run(ctx.staging, local["run_id"]))
        local_rows = milvus_rows(ctx)
    with RunContext(Settings(_env_file=None, **over)) as ctx:
        dask_results = runner.results_frame(runner.find_run(ctx.staging, info["run_id"]))
        dask_rows = milvus_rows(ctx)

    cols = ["chunk_id", "company_id", "document_id", "text_sha256", "sent_sha256", "vector_source"]
    a = local_results.select(*cols, "vector").sort("chunk_id")
    b = dask_results.select(*cols, "vector").sort("chunk_id")
    assert a.select(cols).equals(b.select(cols))
    assert np.array_equal(np.stack(a["vector"].to_numpy()), np.stack(b["vector"].to_numpy()))
    assert local_rows.drop("run_id").equals(dask_rows.drop("run_id"))


def milvus_rows(ctx: Any) -> pl.DataFrame:
    from batchyard.jobs.embeddings import EmbeddingsJob

    job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
    ctx.milvus.load_collection(job.collection)
    rows = ctx.milvus.query(job.collection, filter="chunk_index >= -1", output_fields=["*"], limit=16384)
    frame = pl.DataFrame([{**r, "vector": [float(x) for x in r["vector"]]} for r in rows])
    return frame.sort("chunk_id")
