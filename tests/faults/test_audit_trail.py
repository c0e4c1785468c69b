"""`audit RUN --id ID`: the trail of one chunk or unit, from its source row to the sinks, read from
staging and the sinks only (no Batch API client)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.localapi.vectors import hash_embedding
from batchyard.settings import Settings
from batchyard.storage.ledger import Ledger
from batchyard.storage.runs import find_run
from batchyard.targets import CompanyTarget, Targets
from batchyard.trail import UnitNotFound, trail

BOILER = "Forward-looking statements involve risks and uncertainties."


def trail_of(s: Settings, run_id: str, ident: str, *, full: bool = False) -> dict[str, Any]:
    with RunContext(s) as ctx:
        out = trail(ctx, find_run(ctx.staging, run_id), ident, full=full)
        assert ctx._api is None and ctx._server is None
    return json.loads(json.dumps(out, default=str))  # what --json prints


def insert(ctx: RunContext, texts: list[str]) -> Targets:
    ctx.store.chunks.insert_many([{"_id": f"acme/d/{i}", "company_id": "acme", "document_id": "d",
                                   "chunk_index": i, "text": t} for i, t in enumerate(texts)])
    return Targets(companies=[CompanyTarget(company_id="acme")])


def test_a_sent_chunk_is_traced_from_source_to_milvus_and_mongodb(settings_factory: Any) -> None:
    # the first batch expires after one request: the chunks of the others are sent twice
    s = settings_factory(provider={"local": {"faults": {"expire_after_requests": 1, "expire_batches": 1}}},
                         limits={"max_inputs_per_request": 2})
    with RunContext(s) as ctx:
        targets = insert(ctx, [f"passage number {i} about revenue" for i in range(6)] + [BOILER, BOILER, "   "])
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        collection = EmbeddingsJob(ctx, targets).collection
        part = find_run(ctx.staging, info["run_id"]).partitions()[0]
        records = {r.name: r for r in Ledger(part).all()}
    out = trail_of(s, info["run_id"], "acme/d/5", full=True)
    assert out["differences"] == [] and out["partition"] == part.pid
    src = out["source"][0]
    assert (src["chunk_id"], src["company_id"], src["document_id"]) == ("acme/d/5", "acme", "d")
    assert len(src["text_sha256"]) == 64
    req = out["request"]
    assert req["custom_id"].startswith("emb-") and json.loads(req["line"])["custom_id"] == req["custom_id"]
    assert "passage number 5 about revenue" in json.loads(req["line"])["body"]["input"]
    attempts = out["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2], "expired, then sent again in the follow-up"
    first, second = attempts
    assert first["outcome"]["outcome"] == "requeue" and first["raw"]["file"].startswith("errors/")
    assert "batch_expired" in first["raw"]["text"]
    assert second["outcome"]["final"] == "ok" and second["raw"]["file"] == "outputs/s00000.2.jsonl"
    assert json.loads(second["raw"]["text"])["custom_id"] == req["custom_id"]
    # what the lines say about this chunk alone (all that is printed without --full)
    assert req["own"]["input"] == "passage number 5 about revenue" and req["position"] == 1
    assert first["raw"]["own"]["error"]["code"] == "batch_expired"
    vector = second["raw"]["own"]["vector"]
    assert second["raw"]["own"]["data_index"] == 1 and vector["dims"] == 16
    assert vector["norm"] == pytest.approx(1.0, abs=1e-5)
    assert vector["head"] == pytest.approx(hash_embedding("passage number 5 about revenue", 16)[:8], abs=1e-6)
    compact = trail_of(s, info["run_id"], "acme/d/5")
    assert "line" not in compact["request"] and all("text" not in a["raw"] for a in compact["attempts"])
    assert compact["request"]["own"] == req["own"] and compact["attempts"][1]["raw"]["own"] == second["raw"]["own"]
    for a in attempts:
        rec = records[f"{a['shard']}.{a['attempt']}"]
        assert (a["batch_id"], a["file_id"], a["sha256"], a["sha256_ok"]) == (rec.batch_id, rec.file_id, rec.sha256, True)
    assert out["result"]["attempt"] == 2 and out["result"]["batch_id"] == second["batch_id"]
    loaded = out["loaded"]
    assert loaded["part"] == "s00000.2" and loaded["receipt"]["at"]
    assert loaded["milvus"] == {**loaded["milvus"], "collection": collection, "found": True, "run_id": info["run_id"]}
    assert loaded["mongo"]["found"] and loaded["mongo"]["mark"]["run_id"] == info["run_id"]


def test_aliases_reused_vectors_and_rejects_say_how_they_were_served(settings_factory: Any) -> None:
    s = settings_factory()
    with RunContext(s) as ctx:
        targets = insert(ctx, [BOILER, "unique passage", BOILER, "  "])
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        ctx.store.chunks.insert_one({"_id": "acme/d/9", "company_id": "acme", "document_id": "d", "chunk_index": 9,
                                     "text": BOILER})
        second = runner.execute(ctx, EmbeddingsJob(ctx, targets))
    alias = trail_of(s, first["run_id"], "acme/d/2")
    assert alias["served_by"]["chunk_id"] == "acme/d/0" and alias["plan"]["route"] == "alias"
    rep = trail_of(s, first["run_id"], "acme/d/0")
    assert alias["request"]["custom_id"] == rep["request"]["custom_id"]
    assert alias["attempts"][0]["raw"] == rep["attempts"][0]["raw"]
    assert alias["result"]["vector_source"] == "dedup:acme/d/0" and alias["loaded"]["milvus"]["found"]
    reused = trail_of(s, second["run_id"], "acme/d/9")
    assert reused["served_by"]["route"] == "reused" and reused["request"] is None and reused["attempts"] == []
    assert reused["served_by"]["donor"] == f"{first['run_id']}/acme/d/0"
    assert reused["loaded"]["part"] == "reused" and reused["loaded"]["milvus"]["found"]
    blank = trail_of(s, first["run_id"], "acme/d/3")
    assert blank["request"] is None and [f["code"] for f in blank["failures"]] == ["empty_text"]
    with RunContext(s) as ctx, pytest.raises(UnitNotFound, match="no chunk or unit 'acme/d/404'"):
        trail(ctx, find_run(ctx.staging, first["run_id"]), "acme/d/404")


def test_a_document_unit_is_found_by_its_id_or_any_of_its_chunks(settings_factory: Any, tmp_path: Path) -> None:
    shutil.copytree(Path(__file__).resolve().parents[2] / "prompts", tmp_path / "prompts")
    s = settings_factory(prompts_dir=str(tmp_path / "prompts"))
    with RunContext(s) as ctx:
        targets = insert(ctx, ["Revenue grew 8%.", "Margins expanded.", "Debt fell."])
        info = runner.execute(ctx, InferenceJob(ctx, targets, "summary"))
    by_unit, by_chunk = trail_of(s, info["run_id"], "acme/d"), trail_of(s, info["run_id"], "acme/d/1")
    assert by_unit == {**by_chunk, "id": "acme/d"}
    assert by_unit["unit_id"] == "acme/d" and [r["chunk_id"] for r in by_unit["source"]] == [f"acme/d/{i}" for i in range(3)]
    assert by_unit["request"]["custom_id"] == "u-acme/d"
    assert by_unit["attempts"][0]["outcome"]["final"] == "ok"
    own = by_unit["request"]["own"]
    assert all(t in own["input"] for t in ("Revenue grew 8%.", "Margins expanded.", "Debt fell.")) and own["system_chars"]
    assert json.loads(by_unit["attempts"][0]["raw"]["own"]["answer"])  # the model's answer, parsed by the task
    mongo = by_unit["loaded"]["mongo"]
    assert mongo["found"] and mongo["filter"]["unit_id"] == "acme/d" and mongo["document"]["run_id"] == info["run_id"]
    assert by_unit["differences"] == []


def test_a_trail_that_contradicts_itself_lists_the_differences(settings_factory: Any) -> None:
    s = settings_factory()
    with RunContext(s) as ctx:
        targets = insert(ctx, ["one passage", "another passage"])
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        part = find_run(ctx.staging, info["run_id"]).partitions()[0]
        out_rel = part.rel("outputs", "s00000.1.jsonl")
        ctx.staging.write_bytes(out_rel, b"")
        ctx.milvus.delete(EmbeddingsJob(ctx, targets).collection, ids=["acme/d/1"])
    out = trail_of(s, info["run_id"], "acme/d/1")
    assert any("parsed says request" in d and "outputs/s00000.1.jsonl holds no line" in d for d in out["differences"])
    assert any("not in Milvus collection" in d for d in out["differences"])
