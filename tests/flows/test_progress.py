"""The progress a flow reports runs to its end: after the last batch, the finishing stage (the
summary, each asset's materialization, the artifacts) moves the bar too, and ends full."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_flows import overrides, seed_targets

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]


def test_the_progress_goes_on_through_the_finishing_stage_to_its_end(tmp_path: Path) -> None:
    from batchyard.orchestration import flows

    events: list[dict[str, Any]] = []
    flows.PROGRESS_HOOKS.append(events.append)
    try:
        info = flows.embeddings_flow(targets=seed_targets(tmp_path, 40), overrides=overrides(tmp_path))
    finally:
        flows.PROGRESS_HOOKS.remove(events.append)
    assert info["state"] == "finished"
    last_batch = max(i for i, e in enumerate(events) if e["stage"] == "batches")
    after = events[last_batch + 1:]
    assert after and {e["stage"] for e in after} == {"finish"}, after
    assert [e["detail"] for e in after if "materializing" in e["detail"]] == [
        "materializing batches", "materializing results", "materializing sinks"]
    assert [e["completed"] for e in after] == sorted(e["completed"] for e in after)
    assert after[-1]["completed"] == after[-1]["total"]
