"""`batchyard audit` and `--dry-run` through the command line, on the embedded defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batchyard.localapi.executors import hash_embedding

pytestmark = pytest.mark.e2e


def cli(args: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    env.update({"BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.1",
                "COLUMNS": "250", **extra})
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_audit_reconciles_a_run_traces_a_chunk_and_names_a_deleted_output_line(tmp_path: Path) -> None:
    assert cli(["seed", "--chunks", "60", "--companies", "3"], tmp_path).returncode == 0
    run = cli(["embed", "--targets", "targets.yaml", "--engine", "local", "--max-inputs-per-batch", "20", "--json"],
              tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    run_id = json.loads(run.stdout)["run_id"]

    audit = cli(["audit", run_id, "--json"], tmp_path)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    report = json.loads(audit.stdout)
    assert report["ok"] and report["differences"] == [] and report["checks"] > 20
    assert sum(r["found"] for r in report["loaded"] if r["sink"] == "milvus") == 60
    assert all(r["sha256_ok"] and r["batch_id"] for r in report["sent"])

    part = next((tmp_path / "staging" / "embeddings" / run_id).glob("p=*"))
    requests = pl.read_parquet(part / "requests.parquet")
    victim = requests.row(0, named=True)
    chunk = victim["unit_ids"][-1]
    shard = f"{victim['shard']}.1"
    ledger = json.loads((part / "ledger" / f"{shard}.json").read_text())
    output = (part / "outputs" / f"{shard}.jsonl").read_text().splitlines()
    raw = next(line for line in output if victim["custom_id"] in line)
    trail = cli(["audit", run_id, "--id", chunk], tmp_path)
    assert trail.returncode == 0, trail.stderr
    text = trail.stdout
    flat = " ".join(text.replace("│", " ").split())  # the table's rows, wrapped lines joined
    for expected in (victim["custom_id"], ledger["batch_id"], ledger["file_id"], f"attempt {shard}",
                     f"outputs/{shard}.jsonl line {output.index(raw) + 1}", "chunks_text_embedding_3_small_256", chunk):
        assert expected in flat, expected
    # the chunk's own input and vector, not the whole request and output lines (every input's)
    position = victim["unit_ids"].index(chunk)
    own_text = json.loads(victim["line"])["body"]["input"][position]
    assert " ".join(own_text.split()) in flat
    neighbour = json.loads(victim["line"])["body"]["input"][position - 1]
    assert " ".join(neighbour.split()) not in flat
    vector = hash_embedding(own_text, 256)
    assert f"data[{position}]: 256 dimensions, norm {np.linalg.norm(vector):.6f}" in flat
    assert f"first values [{vector[0]:.6f}, {vector[1]:.6f}," in flat
    assert len(text) < 8_000 < len(raw), "one chunk's trail, not its request's"
    full = cli(["audit", run_id, "--id", chunk, "--full"], tmp_path)
    assert full.returncode == 0, full.stderr
    assert raw in full.stdout.replace("\n", ""), "the exact raw output line"
    assert victim["line"] in full.stdout.replace("\n", ""), "the exact request line"

    # on an 80-column terminal every column of every table is there, values whole
    narrow = cli(["audit", run_id], tmp_path, COLUMNS="80")
    assert narrow.returncode == 0, narrow.stderr
    assert max(map(len, narrow.stdout.splitlines())) <= 80
    for label in ("shard attempt", "state", "sha256 (verified)", "file id", "batch id", "requests", "inputs",
                  "provider counts", "output lines", "of which unfinished", "anomalies", "rewritten later"):
        assert label in narrow.stdout, label
    assert ledger["batch_id"] in narrow.stdout and ledger["file_id"] in narrow.stdout
    assert f"{victim['shard']}.1" in narrow.stdout and "…" not in narrow.stdout.replace("… ✓", "")

    # delete that request's output line: the audit exits 5 and names the chunk
    (part / "outputs" / f"{shard}.jsonl").write_text("".join(f"{line}\n" for line in output if line != raw))
    broken = cli(["audit", run_id, "--json"], tmp_path)
    assert broken.returncode == 5, broken.stderr
    found = json.loads(broken.stdout)
    assert not found["ok"]
    assert any(chunk in d["units"] for d in found["differences"]), found["differences"]
    table = cli(["audit", run_id], tmp_path)
    assert table.returncode == 5 and chunk in table.stdout and "answered lines" in table.stdout
    for name in ("selected", "planned", "sent", "received", "parsed", "loaded", "difference(s)"):
        assert name in table.stdout
    assert cli(["audit", run_id, "--id", "no-such-chunk"], tmp_path).returncode == 2


class _Counting(BaseHTTPRequestHandler):
    hits: list[str] = []

    def _any(self) -> None:
        type(self).hits.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.end_headers()

    do_GET = do_POST = do_DELETE = _any

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def provider() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that only counts what reaches it (standing in for the Batch API provider)."""
    _Counting.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Counting.hits
    finally:
        server.shutdown()
        server.server_close()


def test_embed_dry_run_reports_tokens_and_cost_and_the_provider_sees_no_request(
    tmp_path: Path, provider: tuple[str, list[str]]
) -> None:
    base_url, hits = provider
    assert cli(["seed", "--chunks", "50", "--companies", "2"], tmp_path).returncode == 0
    env = {"BATCHYARD_PROVIDER__BASE_URL": base_url, "BATCHYARD_PROVIDER__API_KEY": "sk-test-never-used-123"}
    out = cli(["embed", "--targets", "targets.yaml", "--dry-run", "--json"], tmp_path, **env)
    assert out.returncode == 0, out.stderr[-2000:]
    est = json.loads(out.stdout)
    assert est["state"] == "dry_run" and est["requests"] > 0 and est["shards"] >= 1
    assert est["input_tokens"] > 0 and est["cost_batch_usd"] > 0 and est["priced"]
    assert est["cost_realtime_usd"] == pytest.approx(2 * est["cost_batch_usd"], abs=2e-6)
    assert hits == [], f"the provider was contacted: {hits}"
    table = cli(["embed", "--targets", "targets.yaml", "--dry-run"], tmp_path, **env)
    assert table.returncode == 0 and "cost at batch prices" in table.stdout and hits == []
    infer = cli(["infer", "summary", "--targets", "targets.yaml", "--dry-run", "--json"], tmp_path, **env)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert json.loads(infer.stdout)["output_tokens_max"] == json.loads(infer.stdout)["requests"] * 1024
    assert hits == []
    # the counter works: a real call reaches it
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base_url}/files", timeout=5)
    assert hits == ["GET /v1/files"]


def test_money_is_printed_with_fixed_decimals(tmp_path: Path) -> None:
    assert cli(["seed", "--chunks", "8", "--companies", "1"], tmp_path).returncode == 0
    run = cli(["embed", "--targets", "targets.yaml", "--engine", "local"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    (run_dir,) = (tmp_path / "staging" / "embeddings").iterdir()
    final = json.loads((run_dir / "run.json").read_text())["final"]
    assert 0 < final["cost_estimate_usd"] < 1e-4, "a cost Python would write as 1.2e-05"
    table = " ".join(run.stdout.split())
    assert "e-0" not in table
    assert f"cost_estimate_usd=${final['cost_estimate_usd']:.6f}" in table
    assert f"batch: {final['usage']['input_tokens']:,} input tokens, ${final['cost_reported_usd']:.6f}" in table
