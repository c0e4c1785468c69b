"""`batchyard cancel` and `batchyard resume`: nothing lost, nothing submitted twice."""

from __future__ import annotations

from typing import Any

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.ledger import run_records
from batchyard.storage.runs import find_run
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_one_batch_per_submission,
    planned_run,
    seed,
)

N = 90


def slow_ctx(settings_factory: Any, **provider: Any) -> RunContext:
    s = settings_factory(
        provider={"local": {"seconds_per_request": 0.05, "faults": {"cancelling_s": 0.2}}, **provider},
        limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 3},
    )
    return RunContext(s)


def test_cancel_records_what_finished_and_resume_completes(settings_factory: Any) -> None:
    ctx = slow_ctx(settings_factory)
    try:
        targets = seed(ctx, N)
        job = EmbeddingsJob(ctx, targets)
        run = planned_run(ctx, job)
        runner.drive(ctx, job, run, max_rounds=3, poll_interval=0.1)
        live = [r for r in run_records(run) if r.state == "submitted"]
        assert live, "some batches must be live when we cancel"
        out = runner.cancel(ctx, run.run_id)
        assert out["cancelled_batches"] == len(live)
        info = runner.continue_run(ctx, job, run)
        assert info["state"] == "cancelled"
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height < N and set(failures["code"]) == {"run_cancelled"}
        statuses = {r.batch_status for r in run_records(run) if r.attempt == 1}
        assert "cancelled" in statuses
        # resume re-plans only what did not finish and completes the run
        done = runner.resume(ctx, run.run_id)
        assert done["state"] == "finished"
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
    finally:
        ctx.close()


def test_remote_files_are_deleted_after_a_successful_load_when_configured(settings_factory: Any) -> None:
    s = settings_factory(provider={"delete_remote_files": True}, limits={"max_inputs_per_batch": 30,
                                                                         "max_inputs_per_request": 10})
    ctx = RunContext(s)
    try:
        targets = seed(ctx, 60)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["state"] == "finished"
        ids = {fid for r in run_records(find_run(ctx.staging, info["run_id"]))
               for fid in (r.file_id, r.output_file_id, r.error_file_id) if fid}
        assert ids
        remaining = {f.id for f in ctx.api.client.files.list()}
        assert not ids & remaining
    finally:
        ctx.close()


def test_cancel_of_a_finished_run_changes_nothing(settings_factory: Any) -> None:
    with RunContext(settings_factory(limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 30)))
        assert info["state"] == "finished" and runner.exit_code(info) == 0
        out = runner.cancel(ctx, info["run_id"])
        assert out["ended"] == "finished" and out["cancelled_batches"] == 0
        run = find_run(ctx.staging, info["run_id"])
        after = run.read_run()
        assert (after["state"], after["phase"], runner.exit_code(after)) == ("finished", "done", 0)
        assert run.cancel_requested() is None, "no cancel request is left behind for a later resume"
        assert all(not p.read_state().get("cancelled") for p in run.partitions())


def test_a_cancel_that_arrives_after_the_last_batch_finished_ends_the_run_finished(settings_factory: Any) -> None:
    import time

    with slow_ctx(settings_factory) as ctx:
        job = EmbeddingsJob(ctx, seed(ctx, N))
        run = planned_run(ctx, job)
        runner.drive(ctx, job, run, max_rounds=1, poll_interval=0.05)  # every shard submitted
        records = run_records(run)
        assert records and all(r.state == "submitted" for r in records)
        ids = {r.batch_id for r in records}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the provider finishes every batch; nobody has polled yet
            if all(ctx.api.retrieve(b)["status"] == "completed" for b in ids):
                break
            time.sleep(0.1)
        # the cancel reaches the driver's next round, after the last batch finished
        run.request_cancel(by="test")
        info = runner.continue_run(ctx, job, run)
        assert (info["state"], runner.exit_code(info)) == ("finished", 0), info.get("final")
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert all(not p.read_state().get("cancelled") for p in run.partitions())
