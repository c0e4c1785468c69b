"""The asset graph: data versions that chain, checks that run, staleness that tells why."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from batchyard import runner
from batchyard.assets import ASSETS, read_manifest
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from tests.helpers import planned_run, run_of, seed

REPO = Path(__file__).resolve().parents[2]


def statuses(ctx: RunContext, **kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(job kind, partition key) -> that key's row of `batchyard assets`."""
    return {(r["scope"].split("/")[0].split("-")[0], r["partition"]): r for r in runner.asset_status(ctx, **kwargs)}


def test_the_manifest_chain_walks_from_sinks_back_to_chunks(settings_factory: Any) -> None:
    with RunContext(settings_factory(run={"partition_max_chunks": 30})) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 60)))
        run = run_of(ctx, info)
        assert len(run.partitions()) >= 2
        for store in (run, *run.partitions()):
            manifest = read_manifest(store, "sinks")
            chain = ["sinks"]
            while manifest is not None and manifest["inputs"]:
                assert "missing" not in manifest["inputs"].values(), (store.rel(), manifest["asset"])
                (upstream,) = manifest["inputs"]
                manifest = read_manifest(store, upstream)
                chain.append(upstream)
            assert chain == ["sinks", "results", "batches", "requests", "chunks"]
            assert manifest is not None and manifest["data_version"] != "missing"
        checks = {c["name"]: c["passed"] for p in run.partitions() for a in ASSETS
                  for c in (read_manifest(p, a.key) or {}).get("checks", [])}
        assert checks == {"unique_custom_ids": True, "every_unit_once": True, "vectors_valid": True,
                          "sinks_match_results": True}
        assert info["final"]["checks_failed"] == [] and runner.exit_code(info) == 0


def test_assets_go_stale_with_new_chunks_and_fresh_after_the_next_run(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 40, companies=1)
        (company,) = targets.company_ids
        runner.execute(ctx, EmbeddingsJob(ctx, targets))
        rows = statuses(ctx)
        assert set(rows) == {("embeddings", company)} and rows["embeddings", company]["status"] == "fresh"
        assert rows["embeddings", company]["results"] == 40
        # a new chunk in the targeted company: its partition key is stale, with the count
        first = ctx.store.chunks.find_one({})
        ctx.store.chunks.insert_one({**first, "_id": first["_id"] + "-new", "text": "a brand new passage"})
        ctx.store.save()
        assert statuses(ctx)["embeddings", company]["reasons"] == ["1 new or changed unit(s) in the source"]
        # a changed text is seen too
        ctx.store.chunks.update_one({"_id": first["_id"]}, {"$set": {"text": first["text"] + " (restated)"}})
        ctx.store.save()
        assert statuses(ctx)["embeddings", company]["reasons"] == ["2 new or changed unit(s) in the source"]
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        after = statuses(ctx)["embeddings", company]
        assert after["status"] == "fresh" and after["run_id"] == info["run_id"] and after["results"] == 2
        # a setting that shapes the vectors
        ctx.settings.limits.max_tokens_per_input = 700
        reasons = statuses(ctx)["embeddings", company]["reasons"]
        assert any("limits.max_tokens_per_input 8192 -> 700" in r for r in reasons)


def test_assets_observe_the_sinks_and_check_them_unit_by_unit(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 60, companies=2)
        job = EmbeddingsJob(ctx, targets)
        runner.execute(ctx, job)
        assert {r["status"] for r in statuses(ctx, check=True).values()} == {"fresh"}
        victim = sorted(targets.company_ids)[0]
        ids = [d["_id"] for d in ctx.store.chunks.find({"company_id": victim}).limit(3)]
        ctx.milvus.delete(job.collection, ids=ids)
        row = statuses(ctx)["embeddings", victim]
        assert row["status"] == "stale" and row["sink_rows"] == row["results"] - 3
        assert any(r.startswith("3 vector(s) missing from the sink") for r in row["reasons"]), row["reasons"]
        other = statuses(ctx)["embeddings", sorted(targets.company_ids)[1]]
        assert other["status"] == "fresh"
        checked = statuses(ctx, check=True)["embeddings", victim]["reasons"]
        assert any(r.startswith("check: 3 marked chunk(s) without a vector") for r in checked), checked


def test_editing_a_prompt_makes_the_task_assets_stale(settings_factory: Any, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts-copy"
    shutil.copytree(REPO / "prompts", prompts)
    with RunContext(settings_factory(prompts_dir=str(prompts))) as ctx:
        targets = seed(ctx, 12, companies=1)
        (company,) = targets.company_ids
        first = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        assert {r["status"] for r in statuses(ctx).values()} == {"fresh"}
        old = first["params"]["task_version"]
        prompt = next((prompts / "classify").glob("*.md"))
        source = prompt.read_text()
        # the maintainer notes are not sent: editing them changes no version and re-sends nothing
        prompt.write_text(source.replace("Notes for maintainers", "Notes for maintainers (reviewed)", 1))
        assert {r["status"] for r in statuses(ctx).values()} == {"fresh"}
        again = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        assert again["plan"]["requests"] == 0
        # what is sent changed: the reason is the task version, not "new or changed source units"
        prompt.write_text(source + "\nBe concise.\n")
        new = InferenceJob(ctx, targets, "classify").task_version
        assert new != old
        row = statuses(ctx)["inference", company]
        assert row["status"] == "stale" and row["reasons"] == [f"task version changed: {old} -> {new}"]
        runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        assert statuses(ctx)["inference", company]["status"] == "fresh"


def test_a_failed_check_marks_the_asset_stale_and_the_run_exits_5(settings_factory: Any) -> None:
    with RunContext(settings_factory()) as ctx:
        targets = seed(ctx, 30, companies=1)
        (company,) = targets.company_ids
        job = EmbeddingsJob(ctx, targets)
        run = planned_run(ctx, job)
        # a source chunk is deleted while the run is in flight: its vector loads, its mark cannot
        gone = ctx.store.chunks.find_one({})["_id"]
        ctx.store.chunks.delete_one({"_id": gone})
        runner.drive(ctx, job, run)
        info = runner.finish(ctx, job, run)
        assert info["final"]["checks_failed"] == ["sinks_match_results"] and runner.exit_code(info) == 5
        row = statuses(ctx)["embeddings", company]
        assert row["status"] == "stale" and "failed check(s): sinks_match_results" in row["reasons"]
        detail = read_manifest(run.partition("p0000"), "sinks")["checks"][0]["detail"]
        assert "marks=29" in detail and "milvus=30" in detail
        # the next run prunes the orphan vector and the key is fresh again
        again = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert again["final"]["pruned"] == 1 and statuses(ctx)["embeddings", company]["status"] == "fresh"


def test_load_receipts_and_the_sinks_asset_count_units_not_rows_summed_over_sinks(settings_factory: Any) -> None:
    # embeddings load each unit into two sinks (Milvus and the MongoDB marks): the top-level
    # `rows` of a receipt and of the sinks asset are the units loaded, the per-sink rows stay per sink
    with RunContext(settings_factory(run={"partition_max_chunks": 30},
                                     limits={"max_inputs_per_batch": 20, "max_inputs_per_request": 10})) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 60)))
        run = run_of(ctx, info)
        assert info["final"]["results"] == 60
        for part in run.partitions():
            receipts = [ctx.staging.read_json(part.rel("loads", n))
                        for n in ctx.staging.list(part.rel("loads"), ".json")]
            assert receipts
            for receipt in receipts:
                part_rows = ctx.staging.count_rows(part.rel("results", f"{receipt['part']}.parquet"))
                assert receipt["rows"] == part_rows
                assert {s["sink"]: s["rows"] for s in receipt["sinks"]} == {"milvus": part_rows,
                                                                           "mongo.marks": part_rows}
            results = sum(ctx.staging.count_rows(part.rel("results", f"{n}.parquet")) for n in part.parts("results"))
            assert read_manifest(part, "sinks")["rows"] == results
        assert read_manifest(run, "sinks")["rows"] == 60
        assert {t["sink"]: t["rows"] for t in info["loads"]} == {"milvus": 60, "mongo.marks": 60}
