"""A flow run that stops on an error: `Failed`, its batchyard run `failed` with the cause, and the
caller (the CLI, through `outcome`) gets the error with the run it stopped."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.flows.test_flows import overrides, seed_targets

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]


def test_a_flow_run_stopped_by_an_unreachable_service_is_failed_and_names_its_run(tmp_path: Path) -> None:
    from batchyard.orchestration import flows
    from batchyard.storage.runs import find_run
    from batchyard.storage.staging import Staging

    targets = seed_targets(tmp_path, 20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    over = overrides(tmp_path, milvus={"index_type": "FLAT", "uri": f"http://127.0.0.1:{port}"})
    state = flows.embeddings_flow(targets=targets, run_id="milvus-down", overrides=over, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as stopped:
        flows.outcome(state)
    assert stopped.value.batchyard_run == ("embeddings", "milvus-down", "failed")  # type: ignore[attr-defined]
    info = find_run(Staging(str(tmp_path / "staging")), "milvus-down").read_run()
    assert info["state"] == "failed"
    assert info["error"].startswith(f"Milvus at http://127.0.0.1:{port} is unreachable: ")
