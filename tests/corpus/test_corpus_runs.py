"""The corpus across runs: stable partition keys, claims, pruning, change detection.

Every test runs the real pipeline (embedded Batch API server over HTTP, Milvus Lite, the
MongoDB stand-in) through the runner, several runs on one staging root.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from batchyard import runner
from batchyard.clients.milvus import count
from batchyard.context import RunContext
from batchyard.corpus.store import Corpus
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.storage.ledger import run_records
from tests.helpers import run_of, seed

pytestmark = pytest.mark.e2e


def stamp(ctx: RunContext, when: datetime | None = None) -> None:
    """Stamp every chunk's change field one minute apart up to `when` (a corpus written over time)."""
    ids = [d["_id"] for d in ctx.store.chunks.find({}, {"_id": 1}).sort("_id", 1)]
    end = when or datetime.now(UTC)
    for i, cid in enumerate(ids):
        ctx.store.chunks.update_one({"_id": cid}, {"$set": {"updated_at": end - timedelta(minutes=len(ids) - i)}})
    ctx.store.save()


def milvus_ids(ctx: RunContext, job: EmbeddingsJob) -> set[str]:
    ctx.milvus.load_collection(job.collection)
    rows = ctx.milvus.query(job.collection, filter='chunk_id != ""', output_fields=["chunk_id"], limit=16_000)
    return {r["chunk_id"] for r in rows}


def source_ids(ctx: RunContext) -> set[str]:
    return {str(d["_id"]) for d in ctx.store.chunks.find({}, {"_id": 1})}


def sent_inputs(run: Any) -> int:
    return sum(r.n_inputs for r in run_records(run) if r.batch_id or r.past_batches)


def test_partition_keys_are_the_same_in_every_run_and_a_no_op_writes_no_version(settings_factory: Any) -> None:
    # a company larger than the cap is split into fixed buckets: `company/NN`
    with RunContext(settings_factory(run={"partition_max_chunks": 40})) as ctx:
        targets = seed(ctx, 150, companies=3)
        stamp(ctx, datetime.now(UTC) - timedelta(days=1))
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        corpus = Corpus.of(ctx, EmbeddingsJob(ctx, targets))
        keys1 = set(corpus.partitions())
        assert any("/" in k for k in keys1), keys1  # a split company
        versions1 = {k: r["data_version"] for k, r in corpus.partitions().items()}
        # a second full run: nothing to do, no key gets a new version
        second = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert second["plan"].get("units", 0) == 0 and second["snapshot"]["read"] == "changes"
        assert {k: r["data_version"] for k, r in corpus.partitions().items()} == versions1
        # a corpus written a day ago is not read again: nothing changed since the first run
        assert sum(second["detection"]["candidates"].values()) == 0 and second["snapshot"]["chunks"] == 0
        assert second["snapshot"]["partitions"] == 0
        # the company grows far past the cap: its bucket count, and so its keys, stay
        big = max(first["detection"]["counts"], key=first["detection"]["counts"].get)
        doc = ctx.store.chunks.find_one({"company_id": big})
        ctx.store.chunks.insert_many([{**doc, "_id": f"{doc['_id']}-grown-{i}", "text": f"grown passage {i}",
                                       "updated_at": datetime.now(UTC), "batchyard": {}} for i in range(60)])
        ctx.store.save()
        third = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert third["final"]["results"] == 60
        keys3 = set(corpus.partitions())
        assert keys3 == keys1
        touched = {k for k, r in corpus.partitions().items() if r["data_version"] != versions1[k]}
        assert touched and all(k.startswith(big) for k in touched)
        # the target's rows are what the collection holds, counted once
        job = EmbeddingsJob(ctx, targets)
        assert third["final"]["targets"]["rows"] == count(ctx.milvus, job.collection) == 210
        rows = runner.asset_status(ctx)
        assert {r["partition"] for r in rows} == keys1
        assert {r["status"] for r in rows} == {"fresh"}, [r for r in rows if r["status"] != "fresh"]


def test_a_second_run_leaves_units_an_open_run_holds_then_resume_settles_them(settings_factory: Any) -> None:
    over = {"provider": {"local": {"seconds_per_request": 0.02}}}
    with RunContext(settings_factory(**over)) as ctx:
        targets = seed(ctx, 120, companies=3)
        stamp(ctx)
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets), wait=False)
    assert first["phase"] != "done"
    with RunContext(settings_factory(**over)) as ctx:
        second = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert second["state"] == "finished"
        assert second["held_by_open_runs"] == {first["run_id"]: 120}
        assert second["snapshot"]["held_by_open_runs"] == 120 and second["final"]["results"] == 0
        assert run_records(run_of(ctx, second)) == []
    with RunContext(settings_factory(**over)) as ctx:
        done = runner.resume(ctx, first["run_id"])
        assert done["state"] == "finished" and done["final"]["results"] == 120
        sent = sent_inputs(run_of(ctx, first)) + sent_inputs(run_of(ctx, second))
        assert sent <= 120
        job = EmbeddingsJob(ctx, targets)
        assert milvus_ids(ctx, job) == source_ids(ctx)
        assert Corpus.of(ctx, job).open_runs() == []  # the finished run claims nothing


def test_claims_end_with_cancel_and_expire_when_a_run_is_abandoned(settings_factory: Any) -> None:
    over = {"provider": {"local": {"seconds_per_request": 0.05}}}
    with RunContext(settings_factory(**over)) as ctx:
        targets = seed(ctx, 40, companies=2)
        stamp(ctx)
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets), wait=False)
    with RunContext(settings_factory(**over, corpus={"claim_ttl_s": 0.001})) as ctx:
        expired = runner.execute(ctx, EmbeddingsJob(ctx, targets), run_id="expired-claims")
        assert expired["held_by_open_runs"] == {} and expired["final"]["results"] == 40
    with RunContext(settings_factory(**over)) as ctx:
        runner.cancel(ctx, first["run_id"])
        assert Corpus.of(ctx, EmbeddingsJob(ctx, targets)).open_runs() == []


def test_deleted_and_added_chunks_leave_milvus_holding_exactly_the_source(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 200, companies=4)
        stamp(ctx, datetime.now(UTC) - timedelta(days=1))
        runner.execute(ctx, EmbeddingsJob(ctx, targets))
        job = EmbeddingsJob(ctx, targets)
        assert milvus_ids(ctx, job) == source_ids(ctx)
        docs = list(ctx.store.chunks.find({}).sort("_id", 1))
        gone = [d["_id"] for d in docs[::5][:40]]
        ctx.store.chunks.delete_many({"_id": {"$in": gone}})
        ctx.store.chunks.insert_many([{**docs[i], "_id": f"{docs[i]['_id']}-added", "text": f"an added passage {i}",
                                       "updated_at": datetime.now(UTC), "batchyard": {}} for i in range(1, 41, 2)])
        ctx.store.save()
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["final"]["results"] == 20 and info["final"]["pruned"] == 40
        assert milvus_ids(ctx, job) == source_ids(ctx)
        pruned = pl.concat([ctx.staging.read_parquet(run_of(ctx, info).rel("prune", n))
                            for n in ctx.staging.list(run_of(ctx, info).rel("prune"), ".parquet")])
        assert set(pruned["unit_id"]) == {str(g) for g in gone} and set(pruned["reason"]) == {"deleted"}
        # a chunk that becomes invalid (empty text) loses its vector and its mark
        victim = docs[1]["_id"]
        ctx.store.chunks.update_one({"_id": victim}, {"$set": {"text": "  ", "updated_at": datetime.now(UTC)}})
        ctx.store.save()
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["final"]["pruned"] == 1 and victim not in milvus_ids(ctx, job)
        assert ctx.store.chunks.find_one({"_id": victim}).get("batchyard", {}) == {}


def test_a_re_chunked_document_loses_its_old_vectors_and_keep_deleted_keeps_them(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 60, companies=1)
        stamp(ctx, datetime.now(UTC) - timedelta(days=1))
        runner.execute(ctx, EmbeddingsJob(ctx, targets))
        job = EmbeddingsJob(ctx, targets)
        doc_id = ctx.store.chunks.find_one({})["document_id"]
        old = list(ctx.store.chunks.find({"document_id": doc_id}))
        ctx.store.chunks.delete_many({"document_id": doc_id})
        ctx.store.chunks.insert_many([{**old[0], "_id": f"{doc_id}/v2/{i}", "chunk_index": i, "text": f"v2 part {i}",
                                       "updated_at": datetime.now(UTC), "batchyard": {}} for i in range(3)])
        ctx.store.save()
    with RunContext(settings_factory(corpus={"prune": False})) as ctx:
        kept = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert kept["final"]["pruned"] == 0 and {str(d["_id"]) for d in old} <= milvus_ids(ctx, job)
    with RunContext(settings_factory(corpus={"full_scan": True})) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["final"]["pruned"] == len(old)
        assert milvus_ids(ctx, job) == source_ids(ctx)


def test_an_incomplete_snapshot_prunes_nothing(settings_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunContext(settings_factory(mongo={"page_size": 10})) as ctx:
        targets = seed(ctx, 80, companies=2)
        stamp(ctx)
        runner.execute(ctx, EmbeddingsJob(ctx, targets))
        job = EmbeddingsJob(ctx, targets)
        before = milvus_ids(ctx, job)
        ctx.store.chunks.delete_many({"_id": {"$in": sorted(before)[:5]}})
        ctx.store.chunks.update_many({}, {"$set": {"updated_at": datetime.now(UTC)}})  # everything changed
        ctx.store.save()
        from batchyard.stages import snapshot as snap

        real = snap.iter_id_pages

        def failing(*args: Any, **kwargs: Any) -> Any:
            for i, page in enumerate(real(*args, **kwargs)):
                if i == 1:
                    raise ConnectionError("the source went away mid-scan")
                yield page

        monkeypatch.setattr(snap, "iter_id_pages", failing)
        with pytest.raises(ConnectionError):
            runner.execute(ctx, EmbeddingsJob(ctx, targets), run_id="broken")
        assert milvus_ids(ctx, job) == before


def test_changes_only_are_read_and_a_failed_unit_is_read_again(settings_factory: Any) -> None:
    # one input per request, so the fault fails one chunk, not its whole request
    over = {"provider": {"local": {"faults": {"text_markers": True}}}, "limits": {"max_inputs_per_request": 1}}
    with RunContext(settings_factory(**over)) as ctx:
        targets = seed(ctx, 100, companies=3)
        stamp(ctx, datetime.now(UTC) - timedelta(days=1))
        # one chunk fails in the first run (a model-output fault marker), and is retried later
        bad = ctx.store.chunks.find_one({})
        ctx.store.chunks.update_one({"_id": bad["_id"]}, {"$set": {"text": bad["text"] + " [[fault:error400]]"}})
        ctx.store.save()
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert first["final"]["failures"] == 1
        corpus = Corpus.of(ctx, EmbeddingsJob(ctx, targets))
        assert corpus.read_retry()["chunk_id"].to_list() == [str(bad["_id"])]
        edited = [d["_id"] for d in ctx.store.chunks.find({"_id": {"$ne": bad["_id"]}}).limit(3)]
        for cid in edited:
            ctx.store.chunks.update_one({"_id": cid}, {"$set": {"text": f"restated {cid}", "updated_at": datetime.now(UTC)}})
        ctx.store.chunks.update_one({"_id": bad["_id"]}, {"$set": {"text": bad["text"]}})  # fixed, not re-stamped
        ctx.store.save()
        second = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert second["snapshot"]["read"] == "changes"
        # 3 edits + 1 retry, not 100
        assert sum(second["detection"]["candidates"].values()) == 4 and second["snapshot"]["chunks"] == 4
        assert second["final"]["results"] == 4 and second["final"]["failures"] == 0
        assert corpus.read_retry().height == 0


def test_a_cancelled_run_leaves_its_window_to_be_read_again(settings_factory: Any) -> None:
    over = {"provider": {"local": {"seconds_per_request": 0.05}}}
    with RunContext(settings_factory(**over)) as ctx:
        targets = seed(ctx, 30, companies=1)
        stamp(ctx, datetime.now(UTC) - timedelta(days=1))
        runner.execute(ctx, EmbeddingsJob(ctx, targets))
        for d in list(ctx.store.chunks.find({}).limit(5)):
            ctx.store.chunks.update_one({"_id": d["_id"]}, {"$set": {"text": d["text"] + " v2",
                                                                    "updated_at": datetime.now(UTC)}})
        ctx.store.save()
        held = runner.execute(ctx, EmbeddingsJob(ctx, targets), wait=False)
    with RunContext(settings_factory(**over)) as ctx:
        other = runner.execute(ctx, EmbeddingsJob(ctx, targets))  # finishes while `held` is open
        assert other["held_by_open_runs"] == {held["run_id"]: 5}
        runner.cancel(ctx, held["run_id"])
        again = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert again["final"]["results"] == 5  # the cursor did not move past the cancelled run's window


def test_inference_results_of_deleted_units_are_flagged_or_removed(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 30, companies=1)
        stamp(ctx)
        runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        results = ctx.store.collection("inference_results")
        gone = [d["_id"] for d in ctx.store.chunks.find({}).limit(3)]
        ctx.store.chunks.delete_many({"_id": {"$in": gone}})
        ctx.store.save()
        info = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        assert info["final"]["pruned"] == 3
        flagged = list(results.find({"unit_id": {"$in": [str(g) for g in gone]}}))
        assert len(flagged) == 3 and all(d["deleted_by_run"] == info["run_id"] for d in flagged)
        ctx.store.chunks.delete_many({"_id": {"$in": [d["_id"] for d in ctx.store.chunks.find({}).limit(2)]}})
        ctx.store.save()
    with RunContext(settings_factory(inference={"on_deleted": "remove"})) as ctx:
        info = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        assert info["final"]["pruned"] == 2
        assert results_count(ctx) == 30 - 2  # 3 flagged stay, 2 removed


def results_count(ctx: RunContext) -> int:
    return int(ctx.store.collection("inference_results").count_documents({}))
