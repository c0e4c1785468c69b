"""A small embeddings run end to end into Milvus Lite and into the session's Milvus server.

On the server, `milvus.bulk_import_min_rows` is lowered so that the run's load goes through bulk
import; a reload of the same run from staging must then upsert every id and import none.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchyard import runner
from batchyard.clients.milvus import count
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from tests.helpers import assert_every_unit_settled_once, assert_vectors_match, run_of, seed

CHUNKS = 60


def milvus_receipt(ctx: Any, run: Any) -> dict[str, Any]:
    """The run's Milvus load receipts (one per results part), summed."""
    total: dict[str, Any] = {"rows": 0, "upserted": 0, "imported": 0, "methods": set()}
    for part in run.partitions():
        for name in ctx.staging.list(part.rel("loads"), ".json"):
            for sink in ctx.staging.read_json(part.rel("loads", name))["sinks"]:
                if sink["sink"] == "milvus":
                    for key in ("rows", "upserted", "imported"):
                        total[key] += sink.get(key, 0)
                    total["methods"].add(sink["method"])
    return total


@pytest.mark.parametrize("store", ["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def test_an_embeddings_run_loads_milvus_and_a_reload_adds_nothing(
    store: str, request: pytest.FixtureRequest, settings_factory: Any
) -> None:
    milvus: dict[str, Any] = {"index_type": "FLAT"}
    if store == "server":
        server = request.getfixturevalue("milvus_server")
        milvus |= {"uri": server.uri, "bulk_import_min_rows": 20, "collection_prefix": "pipeline"}
    s = settings_factory(milvus=milvus, limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})
    method = "bulk_import" if store == "server" else "upsert"
    with RunContext(s) as ctx:
        targets = seed(ctx, CHUNKS)
        collection = EmbeddingsJob(ctx, targets).collection
        try:
            info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
            run = run_of(ctx, info)
            receipt = milvus_receipt(ctx, run)
            assert (receipt["methods"], receipt["rows"]) == ({method}, CHUNKS)
            assert receipt["imported" if store == "server" else "upserted"] == CHUNKS
            results, _ = assert_every_unit_settled_once(ctx, run)
            assert_vectors_match(ctx, results, collection, s.embedding.dimensions)
            assert count(ctx.milvus, collection) == CHUNKS

            runner.rematerialize(ctx, info["run_id"], start="sinks")
            again = milvus_receipt(ctx, run)
            assert (again["methods"], again["upserted"], again["imported"]) == ({method}, CHUNKS, 0)
            assert count(ctx.milvus, collection) == CHUNKS
        finally:
            if store == "server":
                ctx.milvus.drop_collection(collection)
