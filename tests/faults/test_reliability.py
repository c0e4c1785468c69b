"""Reliability when the provider misbehaves: bounded requeues, shared quotas, odd source data.

Each test runs the real pipeline against the local Batch API server (its fault injection plays
the misbehaving provider) and checks the invariants: every unit settled exactly once, one batch
per submission, the right vectors in Milvus.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.ledger import run_records
from batchyard.targets import CompanyTarget, Targets
from tests.helpers import (
    assert_every_unit_settled_once,
    assert_one_batch_per_submission,
    assert_vectors_match,
    run_of,
    seed,
    seed_repeated_ids,
)

N = 120


def settings_with(settings_factory: Any, faults: dict[str, Any], **extra: Any) -> Any:
    local = {"faults": faults, **extra.pop("local", {})}
    return settings_factory(
        provider={"local": local, "requeue_backoff_s": 0.05, **extra.pop("provider", {})},
        limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10, **extra.pop("limits", {})},
        **extra,
    )


@pytest.mark.parametrize("fault", [{"expire_after_fraction": 0.5},
                                   {"cancel_after_fraction": 0.5, "cancelling_s": 0.05}],
                         ids=["repeated_expiry", "repeated_server_cancel"])
def test_a_provider_that_keeps_ending_batches_unfinished_cannot_keep_a_run_open(
    settings_factory: Any, fault: dict[str, Any]
) -> None:
    # every batch ends (expired, or cancelled by the server) with half of its requests done
    with RunContext(settings_with(settings_factory, fault)) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, N)))
        assert info["phase"] == "done" and runner.exit_code(info) == 3
        run = run_of(ctx, info)
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert_one_batch_per_submission(ctx, run)
        assert results.height >= N // 2, "finished work is kept and loaded"
        assert failures.height and set(failures["code"]) == {"requeue_limit"}
        for uid, message in zip(failures["unit_id"], failures["message"], strict=True):
            assert message.startswith(f"unit {uid}: ") and "came back unfinished 4 times" in message
        job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
        assert_vectors_match(ctx, results, job.collection, job.dims)
        # successive requeues of one shard wait longer each time (0.05 s, 0.1 s, 0.2 s)
        chains: dict[str, list[Any]] = {}
        for rec in run_records(run):
            chains.setdefault(f"{rec.partition}/{rec.shard}", []).append(rec)
        longest = max(chains.values(), key=len)
        assert [r.requeues for r in sorted(longest, key=lambda r: r.attempt)] == [0, 1, 2, 3]
        assert max(r.attempt for r in run_records(run)) == 4  # 1 + max_requeues


def test_two_runs_sharing_one_token_cap_both_finish(settings_factory: Any, tmp_path: Path) -> None:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.runner import LocalServer

    # one provider (one organisation's enqueued-token quota) for two concurrent runs: each
    # shard fits the cap alone, both runs together do not
    # every batch stays in progress at least 1.5 s (each run sends about 13), so the two runs
    # overlap on a loaded machine too, whichever starts first
    config = LocalApiConfig(seconds_per_request=0.5, in_progress_s=1.5, faults={"enqueued_token_cap": 6_000})
    with LocalServer(config, tmp_path / "provider") as server:
        infos: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def one(name: str) -> None:
            s = settings_factory(
                staging={"root": str(tmp_path / name)},
                provider={"base_url": server.base_url, "api_key": "sk-shared-org-key",
                          "requeue_backoff_s": 0.05, "requeue_backoff_max_s": 0.3},
                limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 10,
                        "enqueued_token_budget": 5_000},
            )
            try:
                with RunContext(s) as ctx:
                    info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 80, seed=3 if name == "a" else 4)))
                    assert_every_unit_settled_once(ctx, run_of(ctx, info))
                    infos[name] = {**info, "records": run_records(run_of(ctx, info))}
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not errors, errors
    for name, info in infos.items():
        assert info["final"]["results"] == 80 and info["final"]["failures"] == 0, (name, info["final"])
    requeued = [r for info in infos.values() for r in info["records"] if r.submission > 1]
    assert requeued, "some shard must have met the shared cap and waited"
    assert all(r.token_limit_since is not None for r in requeued)


def test_repeated_source_ids_fail_every_copy_and_a_second_run_submits_nothing(settings_factory: Any) -> None:
    s = settings_factory(mongo={"fields": {"chunk_id": "uid"}})
    with RunContext(s) as ctx:
        targets = seed_repeated_ids(ctx)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert results["chunk_id"].to_list() == ["u-2"]
        dup = failures.filter(pl.col("code") == "duplicate_chunk_id")
        assert dup["unit_id"].to_list() == ["u-1", "u-1"]
        assert all("_id 1, 3" in m for m in dup["message"])  # names both source documents
        assert runner.exit_code(info) == 3
        again = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert again["plan"]["requests"] == 0 and run_records(run_of(ctx, again)) == []
        assert again["final"]["failures_by_code"] == {"duplicate_chunk_id": 2}


def test_targets_that_match_nothing_are_reported_and_orphan_chunks_rejected(
    settings_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with RunContext(settings_factory()) as ctx:
        ctx.store.chunks.insert_many([
            {"_id": "acme/d1/0", "company_id": "acme", "document_id": "d1", "chunk_index": 0, "text": "ok"},
            {"_id": "acme/d1/1", "document_id": "d1", "chunk_index": 1, "text": "no company"},
        ])
        targets = Targets(companies=[CompanyTarget(company_id="ghost"),
                                     CompanyTarget(company_id="acme", documents=["d1", "missing-doc"])])
        with caplog.at_level(logging.WARNING, logger="batchyard"):
            info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["targets_unmatched"] == ["ghost", "acme/missing-doc"]
        assert "target ghost matched no chunk" in caplog.text
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert results["chunk_id"].to_list() == ["acme/d1/0"]
        assert failures.select("unit_id", "code").rows() == [("acme/d1/1", "missing_company")]


def test_truncation_is_visible_per_chunk_and_the_source_sha_is_marked(settings_factory: Any) -> None:
    import hashlib

    with RunContext(settings_factory(limits={"max_tokens_per_input": 50})) as ctx:
        long = "liquidity " * 400
        ctx.store.chunks.insert_many([
            {"_id": "acme/d/0", "company_id": "acme", "document_id": "d", "chunk_index": 0, "text": long},
            {"_id": "acme/d/1", "company_id": "acme", "document_id": "d", "chunk_index": 1, "text": "short"},
        ])
        targets = Targets(companies=[CompanyTarget(company_id="acme")])
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["plan"]["truncated"] == 1
        results = run_of(ctx, info).read_dataset("results").sort("chunk_id")
        row = results.row(0, named=True)
        source_sha = hashlib.sha256(long.encode()).hexdigest()
        assert row["truncated"] and row["text_sha256"] == source_sha and row["sent_sha256"] != source_sha
        assert not results.row(1, named=True)["truncated"]
        job = EmbeddingsJob(ctx, targets)
        stored = ctx.milvus.get(job.collection, ids=["acme/d/0"], output_fields=["text_sha256"])[0]
        assert stored["text_sha256"] == row["sent_sha256"]  # Milvus: what the vector was made from
        mark = ctx.store.chunks.find_one({"_id": "acme/d/0"})["batchyard"][job.emb.space]
        assert mark["text_sha256"] == source_sha  # the marks: the source text, so it is not re-selected
        assert runner.execute(ctx, EmbeddingsJob(ctx, targets))["plan"]["requests"] == 0


def test_a_text_already_embedded_in_the_space_is_reused_not_sent(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        boiler = "Forward-looking statements involve risks and uncertainties."
        rows = [{"_id": f"acme/d/{i}", "company_id": "acme", "document_id": "d", "chunk_index": i,
                 "text": boiler if i % 2 else f"unique passage {i}"} for i in range(10)]
        ctx.store.chunks.insert_many(rows)
        targets = Targets(companies=[CompanyTarget(company_id="acme")])
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        # within the run: the repeated passage is sent once, its vector serves the other 4 chunks
        assert first["plan"]["inputs_deduplicated"] == 4 and first["plan"]["tokens_saved"] > 0
        results = run_of(ctx, first).read_dataset("results")
        assert results.height == 10
        assert results.filter(pl.col("vector_source").str.starts_with("dedup:")).height == 4
        # a later run: a new chunk with the same passage takes the stored vector, nothing is sent
        ctx.store.chunks.insert_one({"_id": "acme/d/99", "company_id": "acme", "document_id": "d",
                                     "chunk_index": 99, "text": boiler})
        second = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert second["plan"]["requests"] == 0 and second["plan"]["inputs_reused"] == 1
        row = run_of(ctx, second).read_dataset("results").row(0, named=True)
        assert row["chunk_id"] == "acme/d/99" and row["vector_source"].startswith(f"reused:{first['run_id']}/")
        job = EmbeddingsJob(ctx, targets)
        assert_vectors_match(ctx, run_of(ctx, second).read_dataset("results"), job.collection, job.dims)
        assert ctx.store.chunks.count_documents({f"batchyard.{job.emb.space}": {"$exists": True}}) == 11


def test_a_document_id_shared_by_two_companies_is_two_units(settings_factory: Any) -> None:
    from batchyard.jobs.inference import InferenceJob

    with RunContext(settings_factory()) as ctx:
        for company in ("XONE", "XTWO"):
            ctx.store.chunks.insert_many([
                {"_id": f"{company}/SHARED-10K/{i}", "company_id": company, "document_id": "SHARED-10K",
                 "chunk_index": i, "text": f"{company} revenue grew in year {i}."} for i in range(3)
            ])
        one = Targets(companies=[CompanyTarget(company_id="XONE")])
        first = runner.execute(ctx, InferenceJob(ctx, one, "summary"))
        assert first["final"]["results"] == 1
        both = Targets(companies=[CompanyTarget(company_id="XONE"), CompanyTarget(company_id="XTWO")])
        second = runner.execute(ctx, InferenceJob(ctx, both, "summary"))
        assert second["final"]["results"] == 1, "XTWO's document of the same name is its own unit"
        stored = ctx.store.collection(ctx.settings.mongo.results_collection).find({"task": "summary"})
        assert sorted((d["unit_id"], d["company_id"]) for d in stored) == [
            ("XONE/SHARED-10K", "XONE"), ("XTWO/SHARED-10K", "XTWO")]


def test_a_split_company_keeps_each_document_unit_in_one_partition(settings_factory: Any) -> None:
    from batchyard.jobs.inference import InferenceJob

    with RunContext(settings_factory(run={"partition_max_chunks": 20})) as ctx:
        ctx.store.chunks.insert_many([
            {"_id": f"acme/d{d}/{i:03d}", "company_id": "acme", "document_id": f"d{d}", "chunk_index": i,
             "text": f"document {d} paragraph {i}: revenue and margins."}
            for d in range(3) for i in range(20)
        ])
        targets = Targets(companies=[CompanyTarget(company_id="acme")])
        info = runner.execute(ctx, InferenceJob(ctx, targets, "summary"))
        assert len(info["partitions"]) >= 3  # 60 chunks of one company, hash-split
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert sorted(results["unit_id"]) == ["acme/d0", "acme/d1", "acme/d2"] and failures.height == 0
        assert all(len(ids) == 20 for ids in results["chunk_ids"]), "each summary saw its whole document"
