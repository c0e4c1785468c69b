"""Bad input: each bad chunk is recorded with a reason naming it; the rest of the run goes on."""

from __future__ import annotations

from typing import Any

import polars as pl

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.targets import CompanyTarget, Targets
from tests.helpers import assert_every_unit_settled_once, run_of

GOOD = [f"Segment revenue for region {i} rose on higher volumes." for i in range(6)]


def bad_corpus(ctx: RunContext) -> Targets:
    f = ctx.settings.mongo.fields
    c = ctx.store.chunks
    docs = [{"_id": f"acme/d1/good{i}", f.company: "acme", f.document: "d1", f.chunk_index: i, f.text: t}
            for i, t in enumerate(GOOD)]
    bad = {
        "empty": "",
        "blank": "  \n\t ",
        "nul": "before\x00after",
        "huge": "liquidity " * 20_000,
        "number": 12345,
        "missing": None,
    }
    for i, (key, text) in enumerate(bad.items()):
        doc = {"_id": f"acme/d1/{key}", f.company: "acme", f.document: "d1", f.chunk_index: 100 + i}
        if text is not None:
            doc[f.text] = text
        docs.append(doc)
    docs.append({"_id": "acme/d1/nodoc", f.company: "acme", f.chunk_index: 200, f.text: "no document id"})
    c.insert_many(docs)
    return Targets(companies=[CompanyTarget(company_id="acme", documents=None)])


def test_bad_chunks_are_recorded_and_the_rest_is_embedded(settings_factory: Any) -> None:
    ctx = RunContext(settings_factory(limits={"max_tokens_per_input": 1000, "over_limit": "skip"}))
    try:
        targets = bad_corpus(ctx)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        # NUL is valid text (JSON carries it as \\u0000): embedded like any other chunk
        assert sorted(results["chunk_id"]) == [*(f"acme/d1/good{i}" for i in range(6)), "acme/d1/nul"]
        codes = dict(zip(failures["unit_id"], failures["code"], strict=True))
        assert codes["acme/d1/empty"] == "empty_text" and codes["acme/d1/blank"] == "empty_text"
        assert "acme/d1/nul" not in codes
        assert codes["acme/d1/huge"] == "too_many_tokens"
        assert codes["acme/d1/number"] == "text_not_string"
        assert codes["acme/d1/missing"] == "missing_text"
        assert codes["acme/d1/nodoc"] == "missing_document"
        for uid, msg in zip(failures["unit_id"], failures["message"], strict=True):
            assert uid in msg, f"the message must name the chunk: {msg}"
    finally:
        ctx.close()


def test_over_limit_chunks_are_truncated_when_configured(settings_factory: Any) -> None:
    ctx = RunContext(settings_factory(limits={"max_tokens_per_input": 1000, "over_limit": "truncate"}))
    try:
        targets = bad_corpus(ctx)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        results, _ = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert "acme/d1/huge" in results["chunk_id"].to_list()
        assert info["plan"]["truncated"] == 1
    finally:
        ctx.close()


def test_bad_chunks_in_inference_are_recorded_too(settings_factory: Any) -> None:
    ctx = RunContext(settings_factory())
    try:
        targets = bad_corpus(ctx)
        info = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))
        results, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
        assert results.filter(pl.col("unit_id").str.contains("good")).height == 6
        assert {"empty_text", "text_not_string", "missing_text"} <= set(failures["code"])
        assert results.filter(pl.col("unit_id") == "acme/d1/nul").height == 1
    finally:
        ctx.close()
