"""The `on_cancellation` hook: a flow run cancelled in Prefect cancels its batchyard run.

Here the hook is called as Prefect calls it (flow, flow run, Cancelling state), on a real flow
run of the harness's API and a run whose batches are live on a slow embedded server. The whole
path (a worker kills the flow run's process, then runs the hook) runs in `tests/deploy`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_flows import overrides, seed_targets

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]


def flow_run_of(flow: Any, parameters: dict[str, Any], tags: list[str]) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run(flow, parameters=parameters, tags=tags)


def test_the_hook_cancels_the_live_batches_of_the_tagged_run(tmp_path: Path) -> None:
    from prefect.states import Cancelling

    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.orchestration.flows import RUN_TAG, cancel_batchyard_run, embeddings_flow
    from batchyard.settings import Settings
    from batchyard.storage.ledger import run_records
    from batchyard.targets import load_targets
    from tests.helpers import planned_run, server_batches

    targets = seed_targets(tmp_path, 60)  # two shards of three requests; each request takes 30 s
    over = overrides(tmp_path, provider={"poll_interval_s": 0.05, "local": {"seconds_per_request": 30}})
    settings = Settings(_env_file=None, **over)
    with RunContext(settings) as ctx:  # a run whose batches are in progress, and nobody drives it
        job = EmbeddingsJob(ctx, load_targets(targets))
        run = planned_run(ctx, job)
        runner.drive(ctx, job, run, max_rounds=1)
    live = [r for r in run_records(run) if r.state == "submitted"]
    assert len(live) >= 2

    flow_run = flow_run_of(embeddings_flow, {"targets": targets, "overrides": over}, ["batchyard", RUN_TAG + run.run_id])
    cancel_batchyard_run(embeddings_flow, flow_run, Cancelling())

    assert run.read_run()["state"] == "cancelled" and run.cancel_requested() is None
    assert {r.batch_status for r in run_records(run) if r.batch_id} == {"cancelling"}
    with RunContext(settings) as ctx:  # the server goes on from its state on disk
        deadline = time.monotonic() + 30
        while {b["status"] for b in server_batches(ctx, run.run_id)} != {"cancelled"}:
            assert time.monotonic() < deadline, server_batches(ctx, run.run_id)
            time.sleep(0.2)
        assert {b["id"] for b in server_batches(ctx, run.run_id)} == {r.batch_id for r in live}


def test_a_flow_run_cancelled_before_its_run_existed_cancels_nothing(tmp_path: Path) -> None:
    from prefect.states import Cancelling

    from batchyard.orchestration.flows import cancel_batchyard_run, embeddings_flow

    flow_run = flow_run_of(embeddings_flow, {"targets": "t.yaml", "overrides": overrides(tmp_path)}, ["batchyard"])
    cancel_batchyard_run(embeddings_flow, flow_run, Cancelling())
    assert not (tmp_path / "staging").exists()
