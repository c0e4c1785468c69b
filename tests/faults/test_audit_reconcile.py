"""`audit`: every count of a run reconciles after each kind of batch outcome, and tampering with
any staged file or sink is caught and names the units. No Batch API client is ever opened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchyard import runner
from batchyard.audit import AuditReport, audit_run
from batchyard.clients import milvus_lite
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.settings import Settings
from batchyard.storage.ledger import run_records
from batchyard.storage.runs import RunStore, find_run
from batchyard.targets import CompanyTarget, Targets
from tests.helpers import run_of, seed, seed_repeated_ids

N = 90


def audited(settings: Settings, run_id: str, *, sinks: bool = True) -> AuditReport:
    """Audit in a fresh context, and check it never opened the Batch API."""
    with RunContext(settings) as ctx:
        report = audit_run(ctx, find_run(ctx.staging, run_id), sinks=sinks)
        assert ctx._api is None and ctx._server is None
    return report


def assert_reconciles(report: AuditReport) -> None:
    assert report.ok, "\n".join(str(d) for d in report.differences)
    assert report.checks > 10


FAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "expiry": ({"expire_after_requests": 2, "expire_batches": 2}, {}),
    "server_cancel": ({"cancel_after_requests": 1, "cancel_batches": 1, "cancelling_s": 0.2}, {}),
    "sticky_errors": ({"request_error_rate": 0.3, "seed": 3, "request_error_sticky": True}, {"max_attempts": 2}),
    "http_400": ({"request_error_rate": 1.0, "request_error_status": 400}, {}),
    "validation_failure": ({"validation_failure": True, "validation_fail_batches": 1}, {}),
    # batches refused with token_limit_exceeded are resubmitted (submission 2, an earlier batch id)
    "token_limit": ({"enqueued_token_cap": 12_000}, {"enqueued_token_budget": 40_000, "max_tokens_per_batch": 8_000}),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_count_reconciles_after_each_batch_outcome(settings_factory: Any, fault: str) -> None:
    faults, limits = FAULTS[fault]
    s = settings_factory(provider={"local": {"faults": faults, "seconds_per_request": 0.02}},
                         limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10, **limits})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, N)))
        recs = run_records(run_of(ctx, info))
    report = audited(s, info["run_id"])
    assert_reconciles(report)
    sent = report.tables["sent"]
    assert len(sent) == len(recs) and all(r["sha256_ok"] for r in sent)
    received = {(r["shard"], r["attempt"]): r for r in report.tables["received"]}
    for rec in recs:
        if rec.batch_status in ("expired", "cancelled"):
            got = received[(rec.shard, rec.attempt)]
            assert got["unfinished"] > 0 and got["sent"] == got["output"] + got["error"] + got["missing"]
    if fault == "expiry":
        assert any(r["attempt"] == 2 for r in sent), "follow-up attempts are reconciled too"
    if fault == "token_limit":
        assert any(r["past_batches"] for r in sent), "a resubmitted shard attempt keeps its earlier batch"
    if fault in ("sticky_errors", "http_400"):
        assert report.tables["failed"], "failures by code"


def test_aliases_reused_vectors_repeated_ids_rejects_and_orphans_reconcile(settings_factory: Any) -> None:
    s = settings_factory(limits={"max_tokens_per_input": 50, "over_limit": "skip"})
    boiler = "Forward-looking statements involve risks and uncertainties."
    with RunContext(s) as ctx:
        rows = [{"_id": f"acme/d/{i}", "company_id": "acme", "document_id": "d", "chunk_index": i,
                 "text": boiler if i % 3 == 0 else f"unique passage number {i}"} for i in range(12)]
        rows += [{"_id": "acme/d/blank", "company_id": "acme", "document_id": "d", "chunk_index": 50, "text": "  "},
                 {"_id": "acme/d/long", "company_id": "acme", "document_id": "d", "chunk_index": 52,
                  "text": "liquidity " * 200},
                 {"_id": "acme/d/orphan", "document_id": "d", "chunk_index": 51, "text": "no company"}]
        ctx.store.chunks.insert_many(rows)
        targets = Targets(companies=[CompanyTarget(company_id="acme", documents=["d"])])
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert first["plan"]["inputs_deduplicated"] == 3
        ctx.store.chunks.insert_one({"_id": "acme/d/99", "company_id": "acme", "document_id": "d",
                                     "chunk_index": 99, "text": boiler})
        second = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert second["plan"]["inputs_reused"] == 1
    for info in (first, second):
        report = audited(s, info["run_id"])
        assert_reconciles(report)
    codes = {(r["stage"], r["code"]) for r in audited(s, first["run_id"]).tables["rejected"]}
    assert codes == {("snapshot", "empty_text"), ("snapshot", "missing_company"), ("plan", "too_many_tokens")}
    assert audited(s, second["run_id"]).tables["planned"][0]["reused"] == 1


def test_repeated_source_ids_reconcile(settings_factory: Any) -> None:
    s = settings_factory(mongo={"fields": {"chunk_id": "uid"}})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed_repeated_ids(ctx)))
    report = audited(s, info["run_id"])
    assert_reconciles(report)
    assert report.tables["selected"][0]["repeated_ids"] == 2
    assert report.tables["rejected"] == [{"stage": "duplicates", "code": "duplicate_chunk_id", "units": 2}]


def test_a_partitioned_run_reconciles_partition_by_partition(settings_factory: Any) -> None:
    s = settings_factory(run={"partition_max_chunks": 40},
                         limits={"max_inputs_per_batch": 20, "max_inputs_per_request": 5})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 150, companies=4)))
    report = audited(s, info["run_id"])
    assert_reconciles(report)
    assert len(report.tables["selected"]) >= 4
    assert sum(r["found"] for r in report.tables["loaded"] if r["sink"] == "milvus") == 150
    # a unit that two partitions plan would be sent and loaded twice: named
    with RunContext(s) as ctx:
        first, second = find_run(ctx.staging, info["run_id"]).partitions()[:2]
        a, b = (pl.read_parquet(Path(s.staging.root) / p.rel("inputs.parquet")) for p in (first, second))
        pl.concat([b, a.head(1)]).write_parquet(Path(s.staging.root) / second.rel("inputs.parquet"))
    twice = _difference(audited(s, info["run_id"], sinks=False), "run: units planned by one partition each")
    assert twice.units == [a["chunk_id"][0]]


def test_a_cancelled_run_reconciles_before_and_after_resume(settings_factory: Any) -> None:
    from tests.helpers import cancelled_run

    s = settings_factory(provider={"local": {"seconds_per_request": 0.05, "faults": {"cancelling_s": 0.2}}},
                         limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 3})
    with RunContext(s) as ctx:
        run, _ = cancelled_run(ctx, EmbeddingsJob(ctx, seed(ctx, N)))
    cancelled = audited(s, run.run_id)
    assert_reconciles(cancelled)
    assert {r["code"] for r in cancelled.tables["failed"]} == {"run_cancelled"}
    with RunContext(s) as ctx:
        assert runner.resume(ctx, run.run_id)["state"] == "finished"
    assert_reconciles(audited(s, run.run_id))


def test_inference_chunk_and_document_units_reconcile(settings_factory: Any, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "prompts", tmp_path / "prompts")
    s = settings_factory(prompts_dir=str(tmp_path / "prompts"), limits={"max_attempts": 2},
                         provider={"local": {"faults": {"request_error_rate": 0.2, "seed": 4, "text_markers": True}}})
    texts = {"ok": "Revenue grew 8% to $1.2 billion.", "bad": "[[fault:invalid_json]] Margins expanded.",
             "blank": "   ", "e500": "[[fault:error500]] Liquidity is strong."}
    with RunContext(s) as ctx:
        ctx.store.chunks.insert_many([
            {"_id": f"acme/{doc}/{k}", "company_id": "acme", "document_id": doc, "chunk_index": i, "text": t}
            for doc in ("10k", "10q") for i, (k, t) in enumerate(texts.items())
        ])
        targets = Targets(companies=[CompanyTarget(company_id="acme")])
        infos = [runner.execute(ctx, InferenceJob(ctx, targets, task)) for task in ("classify", "summary")]
    for info in infos:
        report = audited(s, info["run_id"])
        assert_reconciles(report)
        assert report.tables["loaded"][0]["sink"] == "mongo.results"


# --------------------------------------------------------------------------- tampering


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One finished embeddings run (60 chunks, 2 shards of 3 requests), staged under its own root."""
    root = tmp_path_factory.mktemp("clean") / "staging"
    with RunContext(_settings(root)) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 60)))
    assert milvus_lite.wait_stopped(root / "milvus.db"), "Milvus Lite still serves the clean run"
    return root, info["run_id"]


def _settings(root: Path) -> Settings:
    return Settings(_env_file=None, staging={"root": str(root)}, milvus={"index_type": "FLAT"},  # type: ignore[call-arg]
                    embedding={"dimensions": 16}, provider={"poll_interval_s": 0.05},
                    limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})


@pytest.fixture
def copy(clean_run: tuple[Path, str], tmp_path: Path) -> tuple[Settings, RunStore]:
    """A private copy of the clean run's staging root (Milvus Lite and the stand-in included)."""
    root, run_id = clean_run
    shutil.copytree(root, tmp_path / "staging", ignore=shutil.ignore_patterns(".milvus-lite"))
    s = _settings(tmp_path / "staging")
    with RunContext(s) as ctx:
        run = find_run(ctx.staging, run_id)
    return s, run


def _path(s: Settings, run: RunStore, *parts: str) -> Path:
    return Path(s.staging.root) / run.partitions()[0].rel(*parts)


def _difference(report: AuditReport, check: str) -> Any:
    found = [d for d in report.differences if check in d.check]
    assert found, f"no difference {check!r} in {[str(d) for d in report.differences]}"
    return found[0]


def test_the_clean_run_reconciles(copy: tuple[Settings, RunStore]) -> None:
    s, run = copy
    assert_reconciles(audited(s, run.run_id))


def test_a_deleted_output_line_names_the_request_and_its_units(copy: tuple[Settings, RunStore]) -> None:
    s, run = copy
    path = _path(s, run, "outputs", "s00001.1.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    cid = json.loads(lines[1])["custom_id"]
    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    report = audited(s, run.run_id)
    assert not report.ok
    counts = _difference(report, "s00001.1: answered lines")
    assert counts.expected.endswith("completed+failed=3") and counts.actual.endswith("=2")
    outcomes = _difference(report, "s00001.1: outcomes re-derived")
    assert cid in outcomes.expected and "missing_output" in outcomes.actual
    requests = pl.read_parquet(_path(s, run, "requests.parquet"))
    units = requests.filter(pl.col("custom_id") == cid)["unit_ids"][0].to_list()
    assert sorted(outcomes.units) == sorted(units)


def test_a_changed_vector_in_an_output_line_is_caught(copy: tuple[Settings, RunStore]) -> None:
    s, run = copy
    path = _path(s, run, "outputs", "s00000.1.jsonl")
    lines = path.read_text().splitlines()
    line = json.loads(lines[0])
    data = line["response"]["body"]["data"]
    data[0]["embedding"], data[1]["embedding"] = data[1]["embedding"], data[0]["embedding"]
    path.write_text("\n".join([json.dumps(line), *lines[1:]]) + "\n")
    report = audited(s, run.run_id)
    diff = _difference(report, "s00000.1: payload re-derived")
    requests = pl.read_parquet(_path(s, run, "requests.parquet"))
    units = requests.filter(pl.col("custom_id") == line["custom_id"])["unit_ids"][0].to_list()
    assert sorted(diff.units) == sorted(units[:2])


def test_a_changed_shard_file_fails_its_sha256(copy: tuple[Settings, RunStore]) -> None:
    s, run = copy
    path = _path(s, run, "shards", "s00000.1.jsonl")
    path.write_bytes(path.read_bytes().replace(b"\"input\":[", b"\"input\": [", 1))
    report = audited(s, run.run_id)
    diff = _difference(report, "s00000.1: shard file sha256")
    assert diff.expected.startswith("ledger sha256=") and diff.actual.startswith("sha256 of shards/s00000.1.jsonl=")
    assert not next(r for r in report.tables["sent"] if r["shard"] == "s00000")["sha256_ok"]


def test_a_lost_result_row_and_a_lost_receipt_are_named(copy: tuple[Settings, RunStore]) -> None:
    s, run = copy
    path = _path(s, run, "results", "s00000.1.parquet")
    frame = pl.read_parquet(path)
    lost = frame["chunk_id"][0]
    frame.slice(1).write_parquet(path)
    _path(s, run, "loads", "s00001.1.json").unlink()
    report = audited(s, run.run_id)
    assert _difference(report, "s00000.1: ok units = results").units == [lost]
    assert _difference(report, "planned = results + failures").units == [lost]
    assert "loads/s00001.1.json" in _difference(report, "results/s00001.1: load receipt").expected
    assert _difference(report, "run: results").actual == "results rows=59"


def test_vectors_and_marks_missing_from_the_sinks_are_named(copy: tuple[Settings, RunStore]) -> None:
    s, run = copy
    results = pl.read_parquet(_path(s, run, "results", "s00001.1.parquet"))
    gone, unmarked = results["chunk_id"][0], results["chunk_id"][1]
    with RunContext(s) as ctx:
        ctx.milvus.delete(EmbeddingsJob(ctx, None).collection, ids=[gone])  # type: ignore[arg-type]
        ctx.store.chunks.update_one({"_id": unmarked}, {"$unset": {"batchyard": ""}})
        ctx.store.save()
    report = audited(s, run.run_id)
    assert _difference(report, "s00001.1: in milvus").units == [gone]
    assert _difference(report, "s00001.1: in mongo.marks").units == [unmarked]
    assert_reconciles(audited(s, run.run_id, sinks=False))  # staging alone still agrees
