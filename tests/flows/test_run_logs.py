"""batchyard's log lines in the flow run's logs (read back through the API), the noise out of them
and out of the terminal."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_flows import overrides, seed_targets

NOTICE = "anonymous usage data"  # Prefect's first-run telemetry notice


class _Collect(logging.Handler):
    """Keeps every record it is given (on the logger itself: Prefect may reconfigure the root)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def flow_run_logs(flow_run_id: Any, until: str, timeout: float = 30) -> list[Any]:
    """The flow run's log records, once one of them contains `until` (they are sent in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = list(client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
            if any(until in r.message for r in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)


@pytest.mark.flows
@pytest.mark.usefixtures("prefect_harness")
def test_batchyard_lines_reach_the_flow_run_logs_and_the_grpc_noise_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.context
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from batchyard.orchestration.flows import embeddings_flow

    # whatever ran before in this session, the flow itself must silence Milvus Lite's gRPC noise
    monkeypatch.setattr(logging.getLogger("grpc._server"), "level", logging.NOTSET)
    grpc_records = _Collect()
    monkeypatch.setattr(logging.getLogger("grpc"), "handlers", [grpc_records])
    targets = seed_targets(tmp_path, 60)
    over = overrides(tmp_path, provider={"poll_interval_s": 0.05, "backoff_base_s": 0.01, "backoff_max_s": 0.02,
                                         "local": {"faults": {"transient_error_rate": 0.2, "seed": 3}}})
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: True}):
        # conftest turns logging to the API off; threads without a context read the global settings
        monkeypatch.setattr(prefect.context, "GLOBAL_SETTINGS_CONTEXT", prefect.context.get_settings_context())
        state = embeddings_flow(targets=targets, overrides=over, return_state=True)
        info = state.result()
        run_id = info["run_id"]
        logs = flow_run_logs(state.state_details.flow_run_id, until=f"run {run_id}: finished")

    assert info["final"]["results"] == 60 and info["plan"]["shards"] >= 2
    ours = [r.message for r in logs if r.name.startswith("batchyard")]
    for needle in (f"run {run_id} snapshot:", f"run {run_id} plan:", f"run {run_id} shard attempts: submitted",
                   f"run {run_id} shard attempts: collected", "created (validating)", "is completed",
                   "retrying ", f"run {run_id}: finished (phase done)"):
        assert any(needle in m for m in ours), (needle, ours)
    # batch status lines come from the driver's I/O threads too: they carry no run context
    assert sum("is completed" in m for m in ours) == info["plan"]["shards"]
    assert not [r for r in logs if "AllocTimestamp" in r.message]
    # Milvus Lite did load (and its gRPC server did answer the probe), yet nothing was logged
    assert info["loads"] and not grpc_records.records
    # the flow run names its batchyard run (what the cancellation hook reads)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert f"batchyard-run:{run_id}" in client.read_flow_run(state.state_details.flow_run_id).tags


def _tty_output(code: str, home: Path) -> str:
    """What `python -c code` prints on an interactive terminal (a pty), with a fresh PREFECT_HOME."""
    ci_vars = {"CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "TF_BUILD", "DRONE", "CI_NAME"}
    env = {k: v for k, v in os.environ.items() if k not in ci_vars and k != "DO_NOT_TRACK"}
    env["PREFECT_HOME"] = str(home)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=secondary, stdout=secondary, stderr=secondary,
                            env=env, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the pty closed: the process exited
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(primary)
    return b"".join(chunks).decode(errors="replace")


def test_no_telemetry_notice_on_a_terminal(tmp_path: Path) -> None:
    # the control: Prefect alone prints it on a terminal, the first time for a PREFECT_HOME
    assert NOTICE in _tty_output("import prefect", tmp_path / "control")
    for module in ("batchyard.orchestration.flows", "batchyard.cli"):
        out = _tty_output(f"import {module}; import prefect", tmp_path / module)
        assert NOTICE not in out, out
