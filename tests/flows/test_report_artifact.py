"""A flow run ends by writing the run's report and linking it as a Prefect artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.test_flows import overrides, seed_targets

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]


def test_an_embeddings_flow_run_links_its_report(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from batchyard.orchestration.flows import embeddings_flow

    info = embeddings_flow(targets=seed_targets(tmp_path, 40), overrides=overrides(tmp_path))
    assert info["state"] == "finished"
    report = tmp_path / "staging" / "embeddings" / info["run_id"] / "report.html"
    assert report.is_file() and info["run_id"] in report.read_text()
    key = f"{info['run_id'].lower()}-report"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert len(artifacts) == 1
    assert report.as_uri() in str(artifacts[0].data)
    assert artifacts[0].flow_run_id is not None
