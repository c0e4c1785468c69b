"""A shard's uploaded input file that the provider no longer has (expired, deleted, purged).

The ledger holds the file id of a shard attempt between its upload and its batch: in `creating`
after a crash, or in `uploaded` while a requeued shard waits. When that file is gone, `resume`
uploads the shard again from staging (sha256 checked) and goes on; it must never POST a create
with the dead id again and again. Any error names the run and the shard.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchyard import runner
from batchyard.audit import audit_run
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.ledger import Ledger, ShardRecord, run_records
from batchyard.storage.runs import PartitionStore, RunStore, utcnow
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_one_batch_per_submission,
    planned_run,
    seed,
)

N = 40
LIMITS = {"max_inputs_per_batch": 20, "max_inputs_per_request": 5}


def lose_the_input_file(ctx: RunContext, run: RunStore, state: str) -> tuple[PartitionStore, ShardRecord]:
    """Upload the first shard attempt and leave it in `state` (uploaded or creating), as a crash or
    a requeue leaves it; then the provider loses the file."""
    part = run.partitions()[0]
    ledger = Ledger(part)
    rec = ledger.all()[0]
    rec = ledger.move(rec, "uploading", intent_at=utcnow().isoformat())
    data = part.staging.read_bytes(part.rel("shards", f"{rec.name}.jsonl"))
    rec = ledger.move(rec, "uploaded", file_id=ctx.api.upload(rec.upload_filename, data))
    if state == "creating":
        rec = ledger.move(rec, "creating", intent_at=utcnow().isoformat())
    ctx.api.delete_file(rec.file_id or "")
    return part, rec


@pytest.mark.parametrize("state", ["uploaded", "creating"])
def test_a_lost_input_file_is_uploaded_again_from_staging(settings_factory: Any, state: str) -> None:
    with RunContext(settings_factory(limits=LIMITS)) as ctx:
        job = EmbeddingsJob(ctx, seed(ctx, N, companies=1))
        run = planned_run(ctx, job)
        part, lost = lose_the_input_file(ctx, run, state)
        creates_before = ctx.api.calls["create"]
        info = runner.resume(ctx, run.run_id)
        assert (info["state"], runner.exit_code(info)) == ("finished", 0), info.get("final")
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        rec = Ledger(part).load(lost.name)
        assert rec.file_id and rec.file_id != lost.file_id and rec.batch_id
        assert any(h.note and lost.file_id in h.note and "gone" in h.note for h in rec.history)
        # one refused create with the dead id, then one create per shard attempt
        assert ctx.api.calls["create"] - creates_before == len(run_records(run)) + 1
        assert audit_run(ctx, run).ok


def test_a_lost_file_whose_staged_shard_changed_is_one_line_naming_the_run_and_the_shard(
    settings_factory: Any, tmp_path: Path
) -> None:
    s = settings_factory(limits=LIMITS)
    with RunContext(s) as ctx:
        job = EmbeddingsJob(ctx, seed(ctx, N, companies=1))
        run = planned_run(ctx, job)
        part, lost = lose_the_input_file(ctx, run, "creating")
        shard = part.staging.path(part.rel("shards", f"{lost.name}.jsonl"))
    Path(shard).write_bytes(Path(shard).read_bytes().replace(b'"input":["', b'"input":["edited ', 1))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": ":".join(sys.path),
           "BATCHYARD_STAGING__ROOT": s.staging.root, "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
           "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.1",
           "BATCHYARD_LIMITS__MAX_INPUTS_PER_BATCH": "20", "BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST": "5",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    out = subprocess.run([sys.executable, "-m", "batchyard.cli", "resume", run.run_id], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len([ln for ln in out.stderr.splitlines() if ln.strip()]) <= 5, out.stderr
    *_, error, last = out.stderr.strip().splitlines()
    assert f"run {run.run_id}" in error and f"shard {lost.key}" in error and "sha256" in error, error
    assert last == f"run {run.run_id} is failed; `batchyard resume {run.run_id}` continues it", last
    rec = json.loads(Path(part.staging.path(part.rel("ledger", f"{lost.name}.json"))).read_text())
    assert rec["batch_id"] is None, "nothing was submitted from a shard file that changed"
