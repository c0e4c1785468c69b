"""`embed --lane realtime` on the default lane, plan and limit settings (issue 16.1-16.3): a plan
request larger than the lane's window is split, every 429 waited out, every chunk settled with
the batch lane's vectors, the audit clean and the provider's usage reported. In a file of its own:
the lane's one-minute window makes it the longest test, and whole files go to one worker."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.e2e.test_audit import cli

pytestmark = pytest.mark.e2e


def milvus_vectors(root: Path) -> pl.DataFrame:
    """chunk_id -> vector of every entity the run's embedding space holds in Milvus (Lite, under `root`)."""
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.settings import Settings

    with RunContext(Settings(_env_file=None, staging={"root": str(root / "staging")})) as ctx:  # type: ignore[call-arg]
        coll = EmbeddingsJob(ctx, None).collection  # type: ignore[arg-type]
        ctx.milvus.load_collection(coll)
        rows = ctx.milvus.query(coll, filter="chunk_index >= -1", output_fields=["chunk_id", "vector"], limit=16384)
    return pl.DataFrame({"chunk_id": [r["chunk_id"] for r in rows],
                         "vector": [[float(x) for x in r["vector"]] for r in rows]}).sort("chunk_id")


@pytest.mark.timeout(1200)
def test_realtime_on_default_settings_settles_every_chunk_audits_clean_and_reports_usage(tmp_path: Path) -> None:
    # the lane, plan and limit settings are the defaults; the provider answers every 4th call 429
    realtime, batch = tmp_path / "realtime", tmp_path / "batch"
    for folder in (realtime, batch):
        folder.mkdir()
        assert cli(["seed", "--chunks", "1200"], folder).returncode == 0  # about 232k tokens
    run = cli(["embed", "--targets", "targets.yaml", "--lane", "realtime", "--engine", "local"], realtime,
              BATCHYARD_PROVIDER__LOCAL__FAULTS__SYNC_429_EVERY="4")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    (run_dir,) = (realtime / "staging" / "embeddings").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    final, tokens = info["final"], info["plan"]["tokens"]
    assert final["results"] == 1200 and final["failures"] == 0
    assert tokens > 200_000, "more tokens than one window of the lane's default 200k tokens per minute"
    # the lane split the plan's requests to fit its window and waited out every 429
    ledgers = [json.loads(p.read_text()) for p in run_dir.glob("p=*/ledger/*.json")]
    assert {rec["lane"] for rec in ledgers} == {"realtime"}
    assert sum(rec["realtime"]["split"] for rec in ledgers) >= 1
    assert sum(rec["realtime"]["retries"].get("429", 0) for rec in ledgers) >= 1
    # the summary reports the provider's usage, real-time, and no batch
    assert final["usage"]["input_tokens"] == tokens and final["batches"] == 0
    assert final["lanes"]["realtime"]["input_tokens"] == tokens
    table = " ".join(run.stdout.split())
    assert f"provider usage: input_tokens={tokens:,}" in table and "Batch API" not in table
    assert "e-0" not in table and f"reported ${final['cost_reported_usd']:,.6f}" in table
    audit = cli(["audit", run_dir.name, "--json"], realtime)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    assert json.loads(audit.stdout)["ok"]
    # the same vectors as the batch lane stores
    done = cli(["embed", "--targets", "targets.yaml", "--engine", "local"], batch)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = milvus_vectors(realtime), milvus_vectors(batch)
    assert a.height == 1200 and a.equals(b)
