"""`batchyard report` of a run staged on S3: the page is written through Staging, next to the run,
and neither it nor the command's output carries the S3 keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from tests.e2e.test_cli import cli
from tests.helpers import seed
from tests.s3.moto_s3 import REGION, S3Endpoint

pytestmark = pytest.mark.s3


def test_the_report_of_an_s3_run_is_written_next_to_it(settings_factory: Any, s3: S3Endpoint, bucket: str,
                                                        tmp_path: Path) -> None:
    key, secret = "AKIASENTINELREPORT42", "s3SENTINELreportSecret42"
    staging = s3.staging(bucket, "runs", key=key, secret=secret)
    with RunContext(settings_factory(staging=staging, limits={"max_inputs_per_batch": 10, "max_inputs_per_request": 5})) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 30)))
    assert info["state"] == "finished"

    env = {"BATCHYARD_STAGING__ROOT": staging["root"], "BATCHYARD_STAGING__S3_ENDPOINT_URL": s3.url,
           "BATCHYARD_STAGING__S3_ACCESS_KEY_ID": key, "BATCHYARD_STAGING__S3_SECRET_ACCESS_KEY": secret,
           "BATCHYARD_STAGING__S3_REGION": REGION}
    done = cli(["report", info["run_id"]], tmp_path, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    location = f"s3://{bucket}/runs/embeddings/{info['run_id']}/report.html"
    assert location in done.stdout.replace("\n", "")
    page = s3.admin_fs().cat_file(location).decode()
    assert info["run_id"] in page and page.count("<svg") >= 4
    assert not (tmp_path / "report.html").exists()
    for text in (page, done.stdout, done.stderr):
        assert key not in text and secret not in text
