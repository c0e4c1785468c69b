"""`audit` and `audit --id` on a run staged on S3: the same reconciliation, object by object."""

from __future__ import annotations

from typing import Any

import pytest

from batchyard import runner
from batchyard.audit import audit_run
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.storage.runs import find_run
from batchyard.trail import trail
from tests.helpers import seed
from tests.s3.moto_s3 import S3Endpoint

pytestmark = pytest.mark.s3


def test_audit_and_trail_read_an_s3_run_and_catch_a_deleted_output_line(
    settings_factory: Any, s3: S3Endpoint, bucket: str
) -> None:
    s = settings_factory(staging=s3.staging(bucket, "runs"),
                         limits={"max_inputs_per_batch": 30, "max_inputs_per_request": 10})
    with RunContext(s) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 60)))
    with RunContext(s) as ctx:
        run = find_run(ctx.staging, info["run_id"])
        report = audit_run(ctx, run)
        assert report.ok, [str(d) for d in report.differences]
        assert sum(r["found"] for r in report.tables["loaded"] if r["sink"] == "milvus") == 60
        part = run.partitions()[0]
        out = trail(ctx, run, part.staging.read_parquet(part.rel("inputs.parquet"))["chunk_id"][0])
        assert out["differences"] == [] and out["attempts"][0]["raw"]["file"].startswith("outputs/")
        rel = part.rel("outputs", "s00000.1.jsonl")
        lines = ctx.staging.read_bytes(rel).splitlines(keepends=True)
        ctx.staging.write_bytes(rel, b"".join(lines[1:]))
        broken = audit_run(ctx, run)
        assert ctx._api is None
    assert [d.check for d in broken.differences] == ["p0000/s00000.1: answered lines",
                                                     "p0000/s00000.1: outcomes re-derived from the staged output/error files"]
