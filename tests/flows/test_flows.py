"""Flows under the Prefect test harness: stages as materializing tasks, shards as mapped tasks."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchyard.assets import ASSETS, check_graph

pytestmark = [pytest.mark.flows, pytest.mark.usefixtures("prefect_harness")]

REPO = Path(__file__).resolve().parents[2]


def overrides(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "staging": {"root": str(tmp_path / "staging")},
        "milvus": {"index_type": "FLAT"},
        "provider": {"poll_interval_s": 0.05},
        "embedding": {"dimensions": 16},
        "limits": {"max_inputs_per_batch": 30, "max_inputs_per_request": 10},
        **extra,
    }


def seed_targets(tmp_path: Path, n: int) -> str:
    from batchyard.context import RunContext
    from batchyard.seed import seed_store, targets_for
    from batchyard.settings import Settings
    from batchyard.targets import write_targets

    with RunContext(Settings(_env_file=None, **overrides(tmp_path))) as ctx:
        report = seed_store(ctx.store, n, fields=ctx.settings.mongo.fields, seed=4, n_companies=2)
        ctx.store.save()
    path = tmp_path / "targets.yaml"
    write_targets(path, targets_for(report))
    return str(path)


def test_embeddings_flow_materializes_every_asset(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from batchyard.orchestration.flows import embeddings_flow

    targets = seed_targets(tmp_path, 80)
    info = embeddings_flow(targets=targets, overrides=overrides(tmp_path))
    assert info["state"] == "finished" and info["final"]["results"] == 80
    assert info["plan"]["shards"] >= 3
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    names = {r.name for r in runs}
    assert {"submit", "track", "load"} <= names
    assert {f"{a}-p0000" for a in ("chunks", "requests", "batches", "results", "sinks")} <= names
    assert any(n.startswith("plan-p0000") for n in names) and any(n.startswith("collect-p0000-s0000") for n in names)
    standin = f"mongodb://standin{tmp_path / 'staging' / '.mongo-standin'}/batchyard/chunks"
    milvus = f"milvus://lite{tmp_path}/staging/milvus.db/"
    events = asset_events(info["run_id"], expect=("chunks", "requests", "batches", "results", "sinks"),
                          prefixes=(milvus, f"{standin}/batchyard."))
    by_key = {e.resource.id.split("@")[0]: e for e in events}
    space = "text_embedding_3_small_16"
    for asset in ("chunks", "requests", "batches", "results", "sinks"):
        event = by_key[f"batchyard://embeddings/{space}/{asset}"]
        payload = event.payload
        assert payload["run_id"] == info["run_id"] and payload["bin"] == "p0000"
        assert payload["data_version"] and payload["code_version"] and payload["staging_path"]
        assert set(payload["partition_keys"]) == set(info["detection"]["counts"])  # the companies
        assert isinstance(payload["rows"], int)
    assert by_key[f"batchyard://embeddings/{space}/results"].payload["failures_by_code"] == {}
    assert by_key[f"batchyard://embeddings/{space}/results"].payload["checks"]["every_unit_once"] == "passed"
    assert by_key[f"batchyard://embeddings/{space}/requests"].payload["tokens"] > 0
    upstream = {r.id for r in by_key[f"batchyard://embeddings/{space}/chunks"].related}
    assert standin in upstream  # the source collection is an asset, named by the store it lives in
    assert any(k.startswith(milvus) for k in by_key)  # so are the targets
    assert any(k.startswith(f"{standin}/batchyard.") for k in by_key)
    # a second flow run finds nothing new; a third, after an edit, materializes the same keys
    again = embeddings_flow(targets=targets, overrides=overrides(tmp_path))
    assert again["plan"]["requests"] == 0
    edit_one_chunk(tmp_path)
    third = embeddings_flow(targets=targets, overrides=overrides(tmp_path))
    assert third["final"]["results"] == 1
    later = asset_events(third["run_id"], expect=("chunks", "requests", "batches", "results", "sinks"))
    stage_keys = {e.resource.id for e in events if e.resource.id.startswith("batchyard://")}
    assert {e.resource.id for e in later if e.resource.id.startswith("batchyard://")} == stage_keys
    assert {e.payload["bin"] for e in later if "bin" in e.payload} == {"p0000"}


def edit_one_chunk(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from batchyard.context import RunContext
    from batchyard.settings import Settings

    with RunContext(Settings(_env_file=None, **overrides(tmp_path))) as ctx:
        doc = ctx.store.chunks.find_one({})
        ctx.store.chunks.update_one({"_id": doc["_id"]}, {"$set": {"text": doc["text"] + " (edited)",
                                                                  "updated_at": datetime.now(UTC)}})
        ctx.store.save()


def test_a_failed_check_fails_its_materialization(tmp_path: Path) -> None:
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.orchestration.flows import embeddings_flow, outcome
    from batchyard.settings import Settings
    from batchyard.targets import load_targets
    from tests.helpers import planned_run

    targets = seed_targets(tmp_path, 30)
    with RunContext(Settings(_env_file=None, **overrides(tmp_path))) as ctx:
        run = planned_run(ctx, EmbeddingsJob(ctx, load_targets(targets)))
        # a source chunk is deleted while the run is in flight: its vector loads, its mark cannot
        ctx.store.chunks.delete_one({"_id": ctx.store.chunks.find_one({})["_id"]})
        ctx.store.save()
    state = embeddings_flow(targets=targets, run_id=run.run_id, overrides=overrides(tmp_path), return_state=True)
    assert state.is_failed(), "an integrity failure (exit 5) fails the flow run"
    info = outcome(state)
    assert info["final"]["checks_failed"] == ["sinks_match_results"] and runner.exit_code(info) == 5
    failed = asset_events(run.run_id, expect=("sinks",), name="prefect.asset.materialization.failed")
    (event,) = [e for e in failed if e.resource.id.split("@")[0].endswith("/sinks")]
    assert event.payload["checks"]["sinks_match_results"].startswith("failed:")


def asset_events(run_id: str, *, expect: tuple[str, ...] = ("batches", "results", "sinks"),
                 wait_s: float = 30.0, name: str = "prefect.asset.materialization.succeeded",
                 prefixes: tuple[str, ...] = ()) -> list[Any]:
    """The asset materialization events of a run (events reach the API a few seconds late), once
    those of the `expect` assets and of an asset key starting with each of `prefixes` arrived."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.monotonic() + wait_s
    found: list[Any] = []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
        found = [e for e in events if e.payload.get("run_id") == run_id]
        names = {e.resource.id.split("@")[0].rsplit("/", 1)[-1] for e in found}
        keys = [e.resource.id for e in found]
        if set(expect) <= names and all(any(k.startswith(p) for k in keys) for p in prefixes):
            break
        time.sleep(0.5)
    return found


def test_inference_flow_runs_a_task(tmp_path: Path) -> None:
    from batchyard.orchestration.flows import inference_flow

    targets = seed_targets(tmp_path, 20)
    info = inference_flow(task_name="risks", targets=targets, overrides=overrides(tmp_path))
    assert info["final"]["results"] == 20 and info["final"]["failures"] == 0


def test_prefect_yaml_entrypoints_import_and_asset_graph_is_acyclic() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        path, fn = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, fn)
        params = set(dep.get("parameters", {}))
        assert params <= set(flow.parameters.properties), f"{dep['name']}: unknown parameters"
    assert check_graph() == [a.key for a in ASSETS]


def test_tracker_flow_drives_open_runs_to_the_end(tmp_path: Path) -> None:
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.orchestration.flows import tracker_flow
    from batchyard.settings import Settings
    from batchyard.storage.runs import RunStore
    from batchyard.targets import load_targets
    from tests.helpers import planned_run

    targets = seed_targets(tmp_path, 40)
    over = overrides(tmp_path)
    with RunContext(Settings(_env_file=None, **over)) as ctx:
        job = EmbeddingsJob(ctx, load_targets(targets))
        run = planned_run(ctx, job)
    # the embedded server persists its state under the staging root, so each tick picks up
    for _ in range(30):
        out = tracker_flow(overrides=over, rounds=1)
        with RunContext(Settings(_env_file=None, **over)) as ctx:
            info = RunStore(ctx.staging, "embeddings", run.run_id).read_run()
        if info["phase"] == "done":
            break
    assert info["state"] == "finished" and info["final"]["results"] == 40
    assert out and out[0]["run_id"] == run.run_id
    # the tracker emits what a flow emits when it finishes a run: materializations with metadata
    events = {e.resource.id.split("@")[0].rsplit("/", 1)[-1]: e for e in asset_events(run.run_id)}
    assert {"batches", "results", "sinks"} <= set(events)
    assert events["results"].payload["rows"] == 40 and events["sinks"].payload["checks"]["sinks_match_results"] == "passed"
