"""A run that stops before it finishes says why in its state, and `resume` continues it.

`failed` with the cause in one line when a service it needs cannot be reached (here Milvus,
looked up for reusable vectors at snapshot time); left alone when another live process drives
it (RunBusy), and never over a state that is final. Ctrl-C and SIGTERM (`interrupted`) are
driven through the CLI in `tests/e2e/test_operating.py`.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.errors import RunBusy
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.runs import driver_id, list_runs
from tests.helpers import planned_run, seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_run_stopped_by_an_unreachable_service_is_failed_with_the_cause_and_resumes(
    settings_factory: Any,
) -> None:
    good = settings_factory()
    with RunContext(good) as ctx:
        targets = seed(ctx, 20, companies=1)
    port = free_port()
    down = settings_factory(milvus={"uri": f"http://127.0.0.1:{port}"})
    with RunContext(down) as ctx, pytest.raises(Exception) as stopped:
        runner.execute(ctx, EmbeddingsJob(ctx, targets))
    [run] = list_runs(RunContext(good).staging)
    info = run.read_run()
    assert info["state"] == "failed" and info["phase"] == "snapshot"
    assert info["error"].startswith(f"Milvus at http://127.0.0.1:{port} is unreachable: "), info["error"]
    assert runner.describe_state(info) == f"failed: {info['error']}"
    assert stopped.value.batchyard_run == ("embeddings", run.run_id, "failed")  # type: ignore[attr-defined]

    with RunContext(good) as ctx:  # Milvus is back: the run goes on from its recorded phase
        done = runner.resume(ctx, run.run_id)
    assert (done["state"], done["error"], done["final"]["results"]) == ("finished", None, 20)


def test_a_run_another_process_drives_is_left_as_it_is(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 10, companies=1)
        job = EmbeddingsJob(ctx, targets)
        run = planned_run(ctx, job)
        for part in run.partitions():
            part.claim(driver_id(), 120)  # a live driver (this very process, another owner)
        with pytest.raises(RunBusy):
            runner.execute(ctx, job, run_id=run.run_id)
    assert run.read_run()["state"] == "running" and "error" not in run.read_run()


def test_a_finished_run_stays_finished_whatever_fails_after_it(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 10, companies=1)))
        run = runner.find_run(ctx.staging, info["run_id"])
        with pytest.raises(RuntimeError), runner.recording_stop(run):
            raise RuntimeError("the summary artifact could not be written")
    assert run.read_run()["state"] == "finished" and "error" not in run.read_run()


def test_the_recorded_cause_names_the_service_without_its_credentials(settings_factory: Any, tmp_path: Any) -> None:
    from batchyard.targets import CompanyTarget, Targets

    port = free_port()
    secret = "s3cr3t-in-the-uri"
    s = settings_factory(mongo={"uri": f"mongodb://ops:{secret}@127.0.0.1:{port}/db", "server_selection_timeout_s": 0.5})
    with RunContext(s) as ctx, pytest.raises(Exception) as stopped:
        runner.execute(ctx, EmbeddingsJob(ctx, Targets(companies=[CompanyTarget(company_id="acme")])))
    [run] = list_runs(RunContext(settings_factory()).staging)
    error = run.read_run()["error"]
    assert error.startswith(f"MongoDB at mongodb://127.0.0.1:{port} is unreachable: ") and "within 0.5 s" in error
    staged = "".join(p.read_text(errors="replace") for p in (tmp_path / "staging").rglob("*.json"))
    assert secret not in staged and secret not in str(stopped.value.batchyard_run)  # type: ignore[attr-defined]
