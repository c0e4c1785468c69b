"""What a Prefect user sees of runs started from the command line, on a real Prefect server.

Each command runs as a shell would run it, against a `prefect server start` of its own: the
flow run's final state says what the exit code says (0 and 3 `Completed`, 3 with a warning
and a failures artifact, 4 `Cancelled` when the run was cancelled, 5 `Failed`), its log
records are the INFO records a deployment run sends (whatever the terminal shows), and `audit`
and `rerun` leave flow runs too.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.server import prefect_server, stop, wait_for

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(600)]


@dataclass
class Shell:
    """A working directory with a seeded stand-in, and the environment of a Prefect server."""

    workdir: Path
    env: dict[str, str]
    api: str

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["batchyard", *args], cwd=self.workdir, env={**self.env, **extra},
                              capture_output=True, text=True, timeout=300)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, run_id: str, flow: str) -> list[dict[str, Any]]:
        """The flow runs of one flow that drove (or read) batchyard run `run_id`."""
        return list(self.post("/flow_runs/filter", {
            "flow_runs": {"tags": {"all_": [f"batchyard-run:{run_id}"]}},
            "flows": {"name": {"any_": [flow]}}, "sort": "START_TIME_ASC"}))

    def logs(self, flow_run_id: str, until: str) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]] | None:
            logs = list(self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}))
            return logs if any(until in r["message"] for r in logs) else None

        return list(wait_for(f"a log line with {until!r}", read, 30))

    def artifact(self, key: str) -> dict[str, Any]:
        found = self.post("/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}})
        assert found, f"no artifact {key}"
        return dict(found[0])


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    base = tmp_path_factory.mktemp("states")
    with prefect_server(base) as (api, env):
        workdir = base / "work"
        workdir.mkdir()
        env = {**env, "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
               "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.1", "COLUMNS": "200"}
        sh = Shell(workdir, env, api)
        seeded = sh.run("seed", "--chunks", "30", "--companies", "2")
        assert seeded.returncode == 0, seeded.stderr
        yield sh


def _state(sh: Shell, run_id: str, flow: str) -> dict[str, Any]:
    runs = sh.flow_runs(run_id, flow)
    assert len(runs) == 1, [(r["name"], r["state_type"]) for r in runs]
    return runs[0]


def _change_source(sh: Shell, **change: Any) -> None:
    """Edit the stand-in between commands (no command holds it then)."""
    from batchyard.context import RunContext
    from batchyard.settings import Settings

    with RunContext(Settings(_env_file=None, staging={"root": str(sh.workdir / "staging")})) as ctx:
        chunks = ctx.store.chunks
        if "blank" in change:
            first = chunks.find_one({"_id": {"$ne": change["blank"]}})
            chunks.insert_one({**first, "_id": change["blank"], "text": "   "})
        if "delete" in change:
            chunks.delete_one({"_id": chunks.find_one({"text": {"$ne": "   "}})["_id"]})
        if "touch" in change:
            chunks.update_many({"text": {"$ne": "   "}}, {"$set": {"text": change["touch"]}})
        ctx.store.save()


def test_exit_codes_0_and_3_complete_with_the_cli_run_logs_in_prefect(shell: Shell) -> None:
    ok = shell.run("embed", "--targets", "targets.yaml", "--json")
    assert ok.returncode == 0, ok.stderr
    run_id = json.loads(ok.stdout)["run_id"]
    flow_run = _state(shell, run_id, "batchyard-embeddings")
    assert flow_run["state_type"] == "COMPLETED"
    # the INFO records a deployment run sends, though the terminal showed none of them
    logs = shell.logs(flow_run["id"], until=f"run {run_id}: finished (phase done)")
    ours = [r["message"] for r in logs if r["name"].startswith("batchyard")]
    for needle in (f"run {run_id} snapshot:", f"run {run_id} plan:", f"run {run_id} shard attempts:",
                   "is completed"):
        assert any(needle in m for m in ours), (needle, ours)
    assert any(r["name"] == "prefect.flow_runs" and r["level"] == 20 for r in logs), "Prefect's own INFO records"
    assert "snapshot:" not in ok.stderr and "Finished in state" not in ok.stderr

    _change_source(shell, blank="zz-blank")
    failed = shell.run("embed", "--targets", "targets.yaml", "--json")
    assert failed.returncode == 3, failed.stderr
    info = json.loads(failed.stdout)
    assert info["final"]["failures_by_code"] == {"empty_text": 1}
    flow_run = _state(shell, info["run_id"], "batchyard-embeddings")
    assert flow_run["state_type"] == "COMPLETED"
    warning = [r for r in shell.logs(flow_run["id"], until="failed unit(s)") if "failed unit(s)" in r["message"]]
    assert warning and warning[0]["level"] == 30 and "empty_text 1" in warning[0]["message"]
    artifact = shell.artifact(f"{info['run_id'].lower()}-failures")
    rows = json.loads(artifact["data"])
    assert [(r["unit_id"], r["code"]) for r in rows] == [("zz-blank", "empty_text")]

    # audit and rerun are flow runs too
    audited = shell.run("audit", run_id, "--json")
    assert audited.returncode == 0, audited.stderr
    assert _state(shell, run_id, "batchyard-audit")["state_type"] == "COMPLETED"
    rerun = shell.run("rerun", run_id, "--from", "sinks", "--json")
    assert rerun.returncode == 0, rerun.stderr
    rerun_run = _state(shell, run_id, "batchyard-rerun")
    assert rerun_run["state_type"] == "COMPLETED"
    shell.logs(rerun_run["id"], until=f"run {run_id}: re-materialized from sinks")


def test_exit_code_4_cancelled_is_a_cancelled_flow_run(shell: Shell) -> None:
    _change_source(shell, touch="text changed for the cancel test")
    run_id = "cancel-me"
    proc = subprocess.Popen(["batchyard", "embed", "--targets", "targets.yaml", "--run-id", run_id, "--json"],
                            cwd=shell.workdir, env={**shell.env, "BATCHYARD_PROVIDER__LOCAL__VALIDATING_S": "120"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def submitted() -> bool:
            status = shell.run("status", run_id, "--shards", "--json")
            return status.returncode == 0 and any(s["batch_id"] for s in json.loads(status.stdout)["shards"] or [])

        wait_for("a submitted batch", submitted, 120, every=1.0)
        cancelled = shell.run("cancel", run_id)
        assert cancelled.returncode == 0, cancelled.stderr
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)  # type: ignore[arg-type]
    assert proc.returncode == 4, err
    assert json.loads(out)["state"] == "cancelled"
    flow_run = _state(shell, run_id, "batchyard-embeddings")
    assert flow_run["state_type"] == "CANCELLED", flow_run["state"]


def test_exit_code_5_integrity_failure_is_a_failed_flow_run(shell: Shell) -> None:
    _change_source(shell, touch="text changed for the integrity test")
    detached = shell.run("embed", "--targets", "targets.yaml", "--no-wait", "--json",
                         BATCHYARD_PROVIDER__LOCAL__VALIDATING_S="3")
    assert detached.returncode == 4, detached.stderr
    run_id = json.loads(detached.stdout)["run_id"]
    assert _state(shell, run_id, "batchyard-embeddings")["state_type"] == "COMPLETED", "unfinished is not failed"
    # a source chunk is deleted while the run is in flight: its vector loads, its mark cannot
    _change_source(shell, delete=True)
    time.sleep(3)
    resumed = shell.run("resume", run_id, "--json")
    assert resumed.returncode == 5, resumed.stderr
    assert json.loads(resumed.stdout)["final"]["checks_failed"] == ["sinks_match_results"]
    flow_run = _state(shell, run_id, "batchyard-resume")
    assert flow_run["state_type"] == "FAILED"
    assert "integrity check(s) failed: sinks_match_results" in flow_run["state"]["message"]
