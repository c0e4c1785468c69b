"""Incremental embeds against the session's real Milvus server (2.3.5, Bounded consistency by
default): the integrity checks and the audit must see the rows a load just wrote.

The issue's reproduction: a full embed, then an embed of 20 new chunks, then a no-op embed; the
second exited 5 (`sinks_match_results: results=20, milvus=0`) because the check read back under
the collection's default (Bounded) consistency and did not see the fresh rows.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchyard import runner
from batchyard.audit import audit_run
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from tests.helpers import run_of, seed

pytestmark = pytest.mark.milvus_server


def _new_chunks(ctx: RunContext, targets: Any, n: int) -> None:
    some = ctx.store.chunks.find_one({"company_id": targets.companies[0].company_id})
    ctx.store.chunks.insert_many([
        {"_id": f"{some['_id']}-new-{i}", "company_id": some["company_id"], "document_id": some["document_id"],
         "chunk_index": 10_000 + i, "text": f"A late addendum, paragraph {i}: guidance raised by {i} percent."}
        for i in range(n)
    ])
    ctx.store.save()


@pytest.mark.parametrize("bulk", [False, True], ids=["upsert", "bulk_import"])
def test_full_then_20_new_then_noop_embeds_all_exit_0(
    milvus_server: Any, settings_factory: Any, bulk: bool
) -> None:
    milvus: dict[str, Any] = {"uri": milvus_server.uri, "index_type": "FLAT",
                              "collection_prefix": f"incr_{'bulk' if bulk else 'ups'}"}
    if bulk:
        milvus["bulk_import_min_rows"] = 10
    s = settings_factory(milvus=milvus)
    with RunContext(s) as ctx:
        targets = seed(ctx, 120)
        collection = EmbeddingsJob(ctx, targets).collection
        try:
            codes, runs = [], []
            for step in ("full", "new", "noop"):
                if step == "new":
                    _new_chunks(ctx, targets, 20)
                info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
                codes.append(runner.exit_code(info))
                runs.append(info)
                assert info["final"]["checks_failed"] == [], (step, info["final"])
            assert codes == [0, 0, 0]
            assert [r["final"]["results"] for r in runs] == [120, 20, 0]
            new_sinks = {t["sink"]: t for t in runs[1]["loads"]}
            assert new_sinks["milvus"]["rows"] == 20
            if bulk:  # the receipt totals say what bulk import wrote, not upserted=0, modified=0
                assert new_sinks["milvus"]["imported"] == 20
            for info in runs:
                report = audit_run(ctx, run_of(ctx, info))
                assert report.ok, [str(d) for d in report.differences]
        finally:
            ctx.milvus.drop_collection(collection)
