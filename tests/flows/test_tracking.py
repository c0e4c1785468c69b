"""Cheap polling and detached runs on Prefect: the tracker finishes what `--no-wait` started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_flows import overrides, seed_targets

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]


def task_runs_of(state: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        return list(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))


@pytest.mark.parametrize("n_shards", [10, 100])
def test_a_poll_round_is_one_task_run_and_one_list_call_whatever_the_shards(tmp_path: Path, n_shards: int) -> None:
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.orchestration.flows import tracker_flow
    from batchyard.settings import Settings
    from batchyard.storage.ledger import run_records
    from batchyard.targets import load_targets
    from tests.helpers import planned_run

    targets = seed_targets(tmp_path, n_shards)
    # one input per shard; batches stay `validating`, so each round only polls
    over = overrides(tmp_path, limits={"max_inputs_per_batch": 1, "max_inputs_per_request": 1},
                     provider={"poll_interval_s": 0.05, "local": {"validating_s": 600}})
    with RunContext(Settings(_env_file=None, **over)) as ctx:
        job = EmbeddingsJob(ctx, load_targets(targets))
        run = planned_run(ctx, job)
        runner.drive(ctx, job, run, poll_interval=0, max_rounds=1)  # submits every shard
        live = [r for r in run_records(run) if r.state == "submitted"]
    assert len(live) == len(run_records(run)) >= 0.8 * n_shards  # repeated texts are sent once
    state = tracker_flow(overrides=over, rounds=1, return_state=True)
    names = sorted(t.name for t in task_runs_of(state))
    assert names == ["track"], names  # one task run records every batch's status
    with RunContext(Settings(_env_file=None, **over)) as ctx:
        assert not ctx.api.calls  # a fresh client: count what one round costs on the wire
        job = EmbeddingsJob(ctx, load_targets(targets))
        runner.drive(ctx, job, run, poll_interval=0, max_rounds=1)
        assert ctx.api.calls["list"] == 1 and ctx.api.calls["list_pages"] == 1 + (n_shards > 100)
        assert ctx.api.calls["retrieve"] == 0


def test_a_detached_run_is_finished_by_tracker_ticks_like_a_waiting_run(tmp_path: Path) -> None:
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.orchestration.flows import embeddings_flow, tracker_flow
    from batchyard.settings import Settings

    targets = seed_targets(tmp_path / "detached", 60)
    seed_targets(tmp_path / "waiting", 60)
    over = overrides(tmp_path / "detached", provider={"poll_interval_s": 0.05, "local": {"validating_s": 0.5}})
    started = embeddings_flow(targets=targets, overrides=over, wait=False)
    assert started["phase"] == "batches" and runner.exit_code(started) == 4
    for _ in range(60):
        tracker_flow(overrides=over, rounds=1)
        with RunContext(Settings(_env_file=None, **over)) as ctx:
            info = runner.find_run(ctx.staging, started["run_id"]).read_run()
        if info["phase"] == "done":
            break
    assert info["state"] == "finished" and runner.exit_code(info) == 0
    waited = embeddings_flow(targets=targets, overrides=overrides(tmp_path / "waiting"))
    assert info["final"]["results"] == waited["final"]["results"] == 60
    with RunContext(Settings(_env_file=None, **over)) as ctx:
        detached = runner.results_frame(runner.find_run(ctx.staging, info["run_id"]))
    with RunContext(Settings(_env_file=None, **overrides(tmp_path / "waiting"))) as ctx:
        waiting = runner.results_frame(runner.find_run(ctx.staging, waited["run_id"]))
    cols = ["chunk_id", "text_sha256", "vector"]
    assert detached.select(cols).sort("chunk_id").equals(waiting.select(cols).sort("chunk_id"))
