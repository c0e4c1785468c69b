"""End to end through the command line, as a user runs it, on the embedded defaults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    full.update({"BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "COLUMNS": "200", **env})
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)


def test_demo_runs_on_the_embedded_defaults(tmp_path: Path) -> None:
    out = cli(["demo"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "MongoDB stand-in" in text  # labelled as a stand-in wherever it is used
    # the neighbour query (`batchyard search`) shows 5 distinct passages, not copies of boilerplate
    found = text[text.index("2. batch embeddings"):text.index("3. batch inference")]
    rows = [cells for line in found.splitlines() if line.startswith("│")
            for cells in [[c.strip() for c in line.split("│")[1:-1]]]
            if any(re.fullmatch(r"-?\d\.\d{4}", c) for c in cells)]  # a row with a similarity
    similarities = [c for r in rows for c in r if re.fullmatch(r"-?\d\.\d{4}", c)]
    assert len(rows) == 5 and similarities[0] == "1.0000"
    assert similarities.count("1.0000") == 1  # only the passage itself: no copies of boilerplate
    assert len({r[-1] for r in rows}) == 5  # five distinct passages
    assert "results=300" in text  # every seeded chunk embedded
    assert "a few parsed results" in text and "section_type" in text
    assert (tmp_path / "staging" / "embeddings").is_dir()


def test_20k_chunks_in_10_plus_shards_exactly_once_then_nothing(tmp_path: Path) -> None:
    assert cli(["seed", "--chunks", "20000"], tmp_path).returncode == 0
    first = cli(["embed", "--targets", "targets.yaml", "--engine", "local", "--max-inputs-per-batch", "1500"],
                tmp_path, BATCHYARD_PROVIDER__POLL_INTERVAL_S="0.3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = cli(["embed", "--targets", "targets.yaml", "--engine", "local"], tmp_path)
    assert second.returncode == 0 and "requests=0, shards=0" in second.stdout.replace("\n", " ").replace("│", "")

    from batchyard.clients.milvus import count, ensure_collection
    from batchyard.context import RunContext
    from batchyard.localapi.executors import hash_embedding
    from batchyard.settings import Settings
    from batchyard.storage.ledger import run_records
    from batchyard.storage.runs import list_runs

    s = Settings(_env_file=None, staging={"root": str(tmp_path / "staging")}, milvus={"index_type": "FLAT"})
    with RunContext(s) as ctx:
        runs = list_runs(ctx.staging)
        assert len(runs) == 2
        recs = run_records(runs[0])
        assert len(recs) >= 10 and all(r.n_inputs <= 1500 for r in recs)
        assert run_records(runs[1]) == []  # the second run submitted no batch
        name = f"chunks_{s.embedding.space}"
        ensure_collection(ctx.milvus, name, dim=256, index_type="FLAT", metric_type="COSINE")
        assert count(ctx.milvus, name) == 20000
        space = s.embedding.space
        assert ctx.store.chunks.count_documents({f"batchyard.{space}.text_sha256": {"$exists": True}}) == 20000
        sample = list(ctx.store.chunks.find({}, {"text": 1}).limit(50))
        got = {r["chunk_id"]: r["vector"] for r in ctx.milvus.get(name, ids=[d["_id"] for d in sample])}
        for d in sample:
            np.testing.assert_allclose(np.asarray(got[d["_id"]], dtype=np.float32), hash_embedding(d["text"], 256),
                                       atol=1e-6)


def test_config_show_masks_secrets_and_profiles_load(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "staging.env").write_text("BATCHYARD_EMBEDDING__DIMENSIONS=512\n")
    out = cli(["--profile", "staging", "config", "show"], tmp_path, BATCHYARD_PROVIDER__API_KEY="sk-SENTINEL-123",
              BATCHYARD_MONGO__URI="mongodb://u:pw-SENTINEL@db:27017")
    assert out.returncode == 0, out.stderr
    assert "SENTINEL" not in out.stdout and "**********" in out.stdout
    assert '"dimensions": 512' in out.stdout
    missing = cli(["--profile", "nope", "config", "show"], tmp_path)
    assert missing.returncode != 0 and "profiles/nope.env" in (missing.stdout + missing.stderr)


def test_bad_targets_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("companies:\n  - company_id: ''\n")
    out = cli(["embed", "--targets", "t.yaml", "--engine", "local"], tmp_path)
    assert out.returncode == 2  # a usage error
    assert out.stderr.count("\n") == 1 and "t.yaml" in out.stderr and "Traceback" not in out.stdout + out.stderr


def test_tasks_and_status_print_tables(tmp_path: Path) -> None:
    tasks = cli(["tasks"], tmp_path)
    assert tasks.returncode == 0
    for name in ("summary", "classify", "risks"):
        assert name in tasks.stdout
    assert "/v1/responses" in tasks.stdout and "/v1/chat/completions" in tasks.stdout
    assert cli(["seed", "--chunks", "50"], tmp_path).returncode == 0
    run = cli(["embed", "--targets", "targets.yaml", "--engine", "local", "--max-inputs-per-batch", "20"], tmp_path)
    assert run.returncode == 0, run.stderr
    listing = cli(["status"], tmp_path)
    assert "embeddings" in listing.stdout and "finished" in listing.stdout
    run_id = next(p.name for p in (tmp_path / "staging" / "embeddings").iterdir())
    shards = cli(["status", run_id, "--shards"], tmp_path)
    assert shards.returncode == 0 and "p0000/s00000.1" in shards.stdout and "completed" in shards.stdout
    assert run_id in shards.stdout  # never cut
    missing = cli(["status", "nope"], tmp_path)
    assert missing.returncode == 2 and "run 'nope' not found" in missing.stderr


def test_the_shard_size_flag_keeps_the_configured_request_size(tmp_path: Path) -> None:
    # --max-inputs-per-batch used to set the request size to the shard size as well, overriding
    # the environment: 300-input shards were then one request each, and a provider that ends
    # batches half done could never finish one of them (benchmarks/reliability.py)
    assert cli(["seed", "--chunks", "200", "--companies", "1"], tmp_path).returncode == 0
    args = ["embed", "--targets", "targets.yaml", "--dry-run", "--json", "--max-inputs-per-batch", "100"]
    configured = cli(args, tmp_path, BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST="10")
    assert configured.returncode == 0, configured.stderr[-2000:]
    est = json.loads(configured.stdout)
    assert est["shards"] >= 2 and est["requests"] >= est["units"] // 10 >= 15
    # the default (2,048 per request) does not fit a 100-input shard: it is lowered to fit
    default = json.loads(cli(args, tmp_path).stdout)
    assert default["shards"] == est["shards"] and default["requests"] == default["shards"]
