"""Two processes drive different partitions of one run at once (S3 staging, a shared provider
and a Milvus server); nothing is submitted twice and every unit settles once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchyard.localapi.runner import ServerProcess
from tests.s3.moto_s3 import S3Endpoint

pytestmark = [pytest.mark.s3, pytest.mark.milvus_server]

N = 240


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[str]:
    with ServerProcess(tmp_path / "provider", env={"BATCHYARD_PROVIDER__LOCAL__SECONDS_PER_REQUEST": "0.05"}) as p:
        yield p.base_url


def env_for(tmp_path: Path, s3: S3Endpoint, bucket: str, provider: str, milvus_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    staging = s3.staging(bucket, "runs")
    env.update({
        "BATCHYARD_STAGING__ROOT": staging["root"],
        "BATCHYARD_STAGING__S3_ENDPOINT_URL": staging["s3_endpoint_url"],
        "BATCHYARD_STAGING__S3_ACCESS_KEY_ID": staging["s3_access_key_id"],
        "BATCHYARD_STAGING__S3_SECRET_ACCESS_KEY": staging["s3_secret_access_key"],
        "BATCHYARD_STAGING__S3_REGION": staging["s3_region"],
        "BATCHYARD_PROVIDER__BASE_URL": provider,
        "BATCHYARD_PROVIDER__API_KEY": "sk-workers-test",
        "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.2",
        "BATCHYARD_MILVUS__URI": milvus_uri,
        "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT",
        "BATCHYARD_MILVUS__COLLECTION_PREFIX": "workers",
        "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
        "BATCHYARD_LIMITS__MAX_INPUTS_PER_BATCH": "10",
        "BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST": "5",
        "BATCHYARD_RUN__PARTITION_MAX_CHUNKS": "60",
        "BATCHYARD_RUN__PARTITIONS_PER_DRIVER": "2",
    })
    return env


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_two_drivers_share_the_partitions_of_one_run(
    tmp_path: Path, s3: S3Endpoint, bucket: str, provider: str, milvus_server: Any
) -> None:
    env = env_for(tmp_path, s3, bucket, provider, milvus_server.uri)
    assert cli(["seed", "--chunks", str(N), "--companies", "4", "--targets-out", "t.yaml"], env, tmp_path).returncode == 0
    started = cli(["embed", "--targets", "t.yaml", "--engine", "local", "--no-wait", "--json"], env, tmp_path)
    assert started.returncode == 4, started.stderr[-2000:]
    run_id = json.loads(started.stdout)["run_id"]
    drivers = [subprocess.Popen([sys.executable, "-m", "batchyard.cli", "resume", run_id, "--engine", "local",
                                 "--json"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outs = [d.communicate(timeout=600) for d in drivers]
    codes = sorted(d.returncode for d in drivers)
    assert codes in ([0, 0], [0, 4]), [o[1][-2000:] for o in outs]  # the first to finish its share may stop early

    from batchyard.context import RunContext
    from batchyard.settings import Settings
    from batchyard.storage.runs import find_run
    from tests.helpers import assert_every_unit_settled_once, assert_one_batch_per_submission

    settings = Settings(_env_file=None, staging=s3.staging(bucket, "runs"),
                        provider={"base_url": provider, "api_key": "sk-workers-test"},
                        milvus={"uri": milvus_server.uri, "collection_prefix": "workers"},
                        embedding={"dimensions": 16})
    with RunContext(settings) as ctx:
        run = find_run(ctx.staging, run_id)
        info = run.read_run()
        assert info["state"] == "finished" and len(info["partitions"]) >= 4
        results, failures = assert_every_unit_settled_once(ctx, run)
        assert results.height == N and failures.height == 0
        assert_one_batch_per_submission(ctx, run)
        owners = {p.pid: p.read_state()["drivers"] for p in run.partitions()}
        resume_pids = {d.pid for d in drivers}
        driven = {int(o.split(":")[1]) for os_ in owners.values() for o in os_} & resume_pids
        assert driven == resume_pids, f"both processes drove partitions: {owners}"
        from batchyard.clients.milvus import count
        from batchyard.jobs.embeddings import EmbeddingsJob

        collection = EmbeddingsJob(ctx, None).collection  # type: ignore[arg-type]
        try:
            assert count(ctx.milvus, collection) == N
        finally:
            ctx.milvus.drop_collection(collection)
