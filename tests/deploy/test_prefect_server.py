"""The README's deploy section, run as written, against a real Prefect server and process worker.

The module fixture copies what a fresh clone deploys (`prefect.yaml`, `flows/`) into a temporary
directory and runs every command of the README's "Deploying with Prefect" blocks there, with
the port replaced by a free one and a temporary PREFECT_HOME: the server and the worker in the
background, the rest in turn. The tests then check what those commands did (the embeddings
run, the tracker tick, the flow runs' logs, the worker's terminal) and cancel a flow run through
Prefect to check that its batches are cancelled (the worker runs `on_cancellation` hooks once it
has killed the flow run's process; the test harness has no worker, so this is where they fire).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.server import clean_env, free_port, healthy, stop, wait_for

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
README_PORT = "4200"
BACKGROUND = (" server start", " worker start")


def readme_commands() -> list[str]:
    """The commands of the README's deploy section, in order (fenced `bash` blocks)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Deploying with Prefect\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


@dataclass
class Stack:
    """What the README's commands started and printed."""

    workdir: Path
    env: dict[str, str]
    api: str
    outputs: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def sh(self, cmd: str, timeout: float = 240) -> str:
        done = subprocess.run(cmd, shell=True, cwd=self.workdir, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"`{cmd}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, deployment: str) -> list[dict[str, Any]]:
        return list(self.post("/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}}))

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.api}/flow_runs/{flow_run_id}", timeout=30).json())

    def run_logs(self, flow_run_id: str, until: str) -> list[dict[str, Any]]:
        """The flow run's log records, once one contains `until` (a flow run sends them in batches)."""
        def read() -> list[dict[str, Any]] | None:
            logs = list(self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}))
            return logs if any(until in r["message"] for r in logs) else None

        return list(wait_for(f"a log line with {until!r}", read, 30))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The README's deploy commands, run in a copy of the repo's deployable files."""
    base = tmp_path_factory.mktemp("deploy")
    workdir = base / "repo"
    workdir.mkdir()
    shutil.copy(REPO / "prefect.yaml", workdir / "prefect.yaml")
    shutil.copytree(REPO / "flows", workdir / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    port = str(free_port())
    stack = Stack(workdir=workdir, env=clean_env(base / "prefect-home"), api=f"http://127.0.0.1:{port}/api")
    background: list[subprocess.Popen[bytes]] = []
    try:
        for cmd in readme_commands():
            cmd = cmd.replace(README_PORT, port)
            if any(b in cmd for b in BACKGROUND):
                name = "server" if "server start" in cmd else "worker"
                log = stack.logs[name] = base / f"{name}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, shell=True, cwd=workdir, env=stack.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                background.append(proc)
                if name == "server":
                    wait_for("the Prefect server", lambda p=proc: p.poll() is None and healthy(stack.api), 120)
                continue
            stack.outputs[cmd] = stack.sh(cmd)
        yield stack
    finally:
        for proc in reversed(background):
            stop(proc)


def _one(runs: list[dict[str, Any]], state: str) -> dict[str, Any]:
    done = [r for r in runs if r["state_type"] == state]
    assert len(done) == 1, [(r["name"], r["state_type"]) for r in runs]
    return done[0]


def _batchyard_status(stack: Stack, *args: str) -> Any:
    return json.loads(stack.sh(" ".join(["batchyard", "status", *args, "--json"])))


def test_readme_commands_are_the_documented_path() -> None:
    commands = readme_commands()
    assert commands[0].startswith("prefect server start") and README_PORT in commands[0]
    assert "prefect --no-prompt deploy --all" in commands
    assert "prefect worker start --pool batchyard" in commands
    assert any(c.startswith("prefect deployment run 'batchyard-embeddings/embeddings-backfill'") for c in commands)
    assert any(c.startswith("prefect deployment run 'batchyard-tracker/tracker'") for c in commands)


def test_readme_deploy_section_runs_as_written(stack: Stack) -> None:
    seed = next(c for c in stack.outputs if c.startswith("batchyard seed"))
    chunks = int(re.search(r"--chunks (\d+)", seed).group(1))  # type: ignore[union-attr]
    runs = _batchyard_status(stack)
    assert [(r["job"], r["state"], r["phase"], r["results"], r["failures"]) for r in runs] == [
        ("embeddings", "finished", "done", chunks, 0)]
    run_id = runs[0]["run"]

    embed = _one(stack.flow_runs("embeddings-backfill"), "COMPLETED")
    assert f"batchyard-run:{run_id}" in embed["tags"]
    assert embed["parameters"]["options"]["targets"] == "targets.yaml"
    _one(stack.flow_runs("tracker"), "COMPLETED")

    # batchyard's lines reach the flow run's logs: one per stage, batch status changes, rounds
    lines = [(r["name"], r["message"]) for r in stack.run_logs(embed["id"], until=f"run {run_id}: finished")]
    ours = [m for n, m in lines if n.startswith("batchyard")]
    for needle in (f"run {run_id} snapshot:", f"run {run_id} plan:", f"run {run_id} shard attempts:",
                   "created (validating)", "is completed", f"run {run_id}: finished (phase done)"):
        assert any(needle in m for m in ours), (needle, ours)
    assert not [m for _, m in lines if "AllocTimestamp" in m]

    # and no known noise reaches the worker's terminal (it shows the flow runs' output)
    worker_out = stack.logs["worker"].read_text()
    assert f"run {run_id} snapshot:" in worker_out
    for noise in ("AllocTimestamp", "Method not implemented", "EventsWorker"):
        assert noise not in worker_out


def test_cancelling_a_flow_run_cancels_its_batches(stack: Stack) -> None:
    """Through Prefect: the profile Variable switches the deployment, the cancel reaches the batches."""
    from batchyard.context import RunContext
    from batchyard.settings import Settings
    from batchyard.storage.ledger import run_records
    from batchyard.storage.runs import RunStore
    from batchyard.storage.staging import Staging

    stack.sh("prefect variable set batchyard_profile dev")  # the production switch, with `dev`
    out = stack.sh(
        "prefect deployment run 'batchyard-inference/inference-classify'"
        """ --param options='{"targets": "targets.yaml", "max_requests_per_batch": 100}'"""
        """ --job-variable env='{"BATCHYARD_PROVIDER__LOCAL__SECONDS_PER_REQUEST": "2"}'""")
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]

    def tagged_run() -> str | None:
        tags = stack.flow_run(flow_run_id)["tags"]
        return next((t.split(":", 1)[1] for t in tags if t.startswith("batchyard-run:")), None)

    run_id = wait_for("the flow run's batchyard run", tagged_run, 120)
    staging = Staging.from_settings(Settings(_env_file=None, staging={"root": str(stack.workdir / "staging")}).staging)
    run = RunStore(staging, "inference-classify", run_id)
    wait_for("live batches", lambda: run.exists() and any(r.state == "submitted" for r in run_records(run)), 120)

    stack.sh(f"prefect flow-run cancel {flow_run_id}")
    wait_for("the flow run to be cancelled", lambda: stack.flow_run(flow_run_id)["state_type"] == "CANCELLED", 120)

    info = run.read_run()
    assert (info["state"], info["profile"]) == ("cancelled", "dev")
    with_batch = [r for r in run_records(run) if r.batch_id]
    assert with_batch and all(r.batch_status in ("cancelling", "cancelled") for r in with_batch), [
        (r.name, r.state, r.batch_status) for r in with_batch]
    stack.run_logs(flow_run_id, until=f"run {run_id} cancelled with its flow run")

    # on the server (its state persists on disk; it finishes cancelling once it runs again)
    settings = Settings(_env_file=None, staging={"root": str(stack.workdir / "staging")})
    with RunContext(settings) as ctx:
        def statuses() -> dict[str, str] | None:
            every = ctx.api.client.batches.list(limit=100)
            mine = {b.id: b.status for b in every if (b.metadata or {}).get("batchyard_run") == run_id}
            return mine if mine and set(mine.values()) == {"cancelled"} else None

        cancelled = wait_for("the batches to be cancelled on the server", statuses, 60)
    assert set(cancelled) == {r.batch_id for r in with_batch}
