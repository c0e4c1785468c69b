"""Two runs started together in one project directory, on the embedded defaults: they share the
embedded Batch API server, Milvus Lite and the MongoDB stand-in (taking turns with it), and
both settle every chunk once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    return {**base, "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.3", "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
            "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "PREFECT_HOME": str(tmp_path / ".prefect")}


def test_two_runs_in_one_project_directory_share_the_embedded_services(tmp_path: Path) -> None:
    seeded = subprocess.run([sys.executable, "-m", "batchyard.cli", "seed", "--chunks", "400", "--companies", "4"],
                            cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert seeded.returncode == 0, seeded.stderr
    companies = yaml.safe_load((tmp_path / "targets.yaml").read_text())["companies"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"companies": companies[:2]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"companies": companies[2:]}))
    runs = [subprocess.Popen([sys.executable, "-m", "batchyard.cli", "embed", "--targets", t, "--engine", "local",
                              "--json"], cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for t in ("a.yaml", "b.yaml")]
    outs = [r.communicate(timeout=600) for r in runs]
    for r, (_, err) in zip(runs, outs, strict=True):
        assert r.returncode == 0, err[-3000:]
    infos = [json.loads(out) for out, _ in outs]
    spans = sorted((i["created_at"], i["updated_at"]) for i in infos)
    assert spans[1][0] < spans[0][1], f"the runs did not overlap: {spans}"
    assert sum(i["final"]["results"] for i in infos) == 400 and all(i["final"]["failures"] == 0 for i in infos)

    from batchyard.clients.milvus import count
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.settings import Settings
    from tests.helpers import (
        assert_every_unit_settled_once,
        assert_one_batch_per_submission,
        run_of,
    )

    settings = Settings(_env_file=None, staging={"root": str(tmp_path / "staging")}, embedding={"dimensions": 16})
    with RunContext(settings) as ctx:
        for info in infos:
            _, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
            assert failures.height == 0
            assert_one_batch_per_submission(ctx, run_of(ctx, info))
        job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
        assert count(ctx.milvus, job.collection) == 400
        assert ctx.store.chunks.count_documents({f"batchyard.{job.emb.space}": {"$exists": True}}) == 400
