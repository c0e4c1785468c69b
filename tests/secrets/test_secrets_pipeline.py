"""Sentinel secrets through whole runs: they reach the clients and nothing else.

Embeddings and one inference task run (plain engine) against a local Batch API server the test
starts, keyed with sentinel keys, with an S3 staging root on a local moto server and a Milvus
token, every secret a unique sentinel. Every log record at DEBUG, stdout/stderr, every staged
object, every local state file, run.json, manifests and the settings' reprs are then searched for
each sentinel (and its base64). A run on the embedded server is searched for the random key
batchyard made for it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer
from tests.helpers import assert_every_unit_settled_once, run_of, seed
from tests.s3.moto_s3 import S3Endpoint
from tests.secrets.leaks import Sentinels, log_text, no_leak, no_leak_in_files_logs_or_output

N = 24


@pytest.fixture
def server(tmp_path: Path, sentinels: Sentinels) -> Iterator[LocalServer]:
    """The local Batch API server, started by the test (not embedded by batchyard), accepting
    two sentinel keys: the pipeline's `provider.api_key` and another one."""
    keys = [SecretStr(sentinels.server_key), SecretStr(sentinels.api_key)]
    srv = LocalServer(LocalApiConfig(api_keys=keys), tmp_path / "localapi-state").start()
    yield srv
    srv.stop()


@pytest.fixture
def secret_settings(settings_factory: Any, sentinels: Sentinels, server: LocalServer, s3: S3Endpoint,
                    bucket: str) -> Any:
    return settings_factory(
        provider={"api_key": sentinels.api_key, "base_url": server.base_url,
                  "local": {"api_keys": [sentinels.server_key]}},
        staging=s3.staging(bucket, "runs", key=sentinels.s3_key, secret=sentinels.s3_secret),
        # Milvus Lite ignores the token (it has no authentication); it is accepted and unused
        milvus={"token": sentinels.milvus_token},
        limits={"max_inputs_per_batch": 10, "max_inputs_per_request": 5},
    )


def test_settings_never_show_secrets(secret_settings: Any, sentinels: Sentinels) -> None:
    s = secret_settings
    # the secrets are really in there
    assert s.provider.api_key.get_secret_value() == sentinels.api_key
    assert s.staging.s3_secret_access_key.get_secret_value() == sentinels.s3_secret
    masked = s.masked()
    assert masked["provider"]["api_key"] == "**********"
    assert masked["staging"]["s3_access_key_id"] == "**********"
    assert masked["staging"]["s3_secret_access_key"] == "**********"
    assert masked["milvus"]["token"] == "**********"
    assert masked["provider"]["local"]["api_keys"] == ["**********"]
    for where, text in {
        "repr(settings)": repr(s), "str(settings)": str(s), "settings.masked()": json.dumps(masked),
        "model_dump_json()": s.model_dump_json(), "repr(settings.staging)": repr(s.staging),
        "repr(settings.provider)": repr(s.provider), "repr(settings.milvus)": repr(s.milvus),
        "repr(settings.provider.local)": repr(s.provider.local),
    }.items():
        no_leak(sentinels, where, text)


def test_runs_leak_no_secret_anywhere(secret_settings: Any, sentinels: Sentinels, s3: S3Endpoint, bucket: str,
                                      server: LocalServer, tmp_path: Path, debug_logs: pytest.LogCaptureFixture,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    # the server really wants a key (else this test proves nothing about the keys)
    assert httpx.get(f"{server.base_url}/files").status_code == 401
    ctx = RunContext(secret_settings)
    try:
        targets = seed(ctx, N)
        emb = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        inf = runner.execute(ctx, InferenceJob(ctx, targets, "classify"))

        # the runs really used the secrets: the SDK client holds the key, S3 took the keys,
        # Milvus Lite took the token, and both runs completed
        assert ctx.api.client.api_key == sentinels.api_key
        assert ctx.staging.fs.key == sentinels.s3_key and ctx.staging.fs.secret == sentinels.s3_secret
        assert ctx.staging.is_s3 and ctx.milvus is not None
        for info in (emb, inf):
            assert info["state"] == "finished", info
            results, _ = assert_every_unit_settled_once(ctx, run_of(ctx, info))
            assert results.height > 0
        assert emb["final"]["results"] == N
        receipts = {r["sink"]: r for r in emb["loads"]}
        assert set(receipts) == {"milvus", "mongo.marks"}
        assert receipts["milvus"]["rows"] == N, "Milvus Lite accepted the token (and ignores it)"

        # run.json and manifests (explicitly, then with every other object)
        runs = [run_of(ctx, emb), run_of(ctx, inf)]
        for run in runs:
            no_leak(sentinels, f"{run.rel('run.json')}", ctx.staging.read_bytes(run.rel("run.json")))
            manifests = ctx.staging.list(run.rel("manifests"), ".json")
            assert len(manifests) == 5
            for name in manifests:
                no_leak(sentinels, name, ctx.staging.read_bytes(run.rel("manifests", name)))
        for where, obj in {"run info": [emb, inf], "provider label": ctx.provider_label,
                           "repr(staging)": repr(ctx.staging), "repr(fs)": repr(ctx.staging.fs),
                           "store label": ctx.store.label}.items():
            no_leak(sentinels, where, json.dumps(obj, default=str))
    finally:
        ctx.close()

    # every staged object in the bucket
    fs = s3.admin_fs()
    objects = fs.find(bucket)
    assert len(objects) > 40
    for path in objects:
        no_leak(sentinels, f"s3://{path}", fs.cat_file(path))

    # every local file: the MongoDB stand-in, Milvus Lite, the local server's state
    local = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(".mongo-standin" in str(p) for p in local) and any("milvus.db" in str(p) for p in local)
    assert any("localapi-state" in str(p) for p in local)
    for p in local:
        no_leak(sentinels, str(p), p.read_bytes())

    # every log record at DEBUG, and everything written to stdout/stderr
    logs = log_text(debug_logs)
    assert len(debug_logs.records) > 1000, "DEBUG capture works (else this test proves nothing)"
    assert "botocore.endpoint" in logs and "openai._base_client" in logs
    no_leak(sentinels, "log records", logs)
    out, err = capfd.readouterr()
    no_leak(sentinels, "stdout", out)
    no_leak(sentinels, "stderr", err)


def test_the_embedded_servers_key_leaks_nowhere(settings_factory: Any, sentinels: Sentinels, tmp_path: Path,
                                                debug_logs: pytest.LogCaptureFixture,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    settings = settings_factory(limits={"max_inputs_per_batch": 10, "max_inputs_per_request": 5})
    assert settings.provider.embedded
    ctx = RunContext(settings)
    try:
        targets = seed(ctx, N)
        info = runner.execute(ctx, EmbeddingsJob(ctx, targets))
        assert info["state"] == "finished" and info["final"]["results"] == N
        key = ctx.api.client.api_key
        assert ctx._server is not None
        state = ctx._server.state_dir
        assert httpx.get(f"{ctx._server.base_url}/files").status_code == 401
    finally:
        ctx.close()
    sent = dataclasses.replace(sentinels, server_key=key)
    local = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.is_relative_to(state) for p in local) and any(p.name == "run.json" for p in local)
    no_leak(sent, "run info", json.dumps(info, default=str))
    assert len(debug_logs.records) > 100, "DEBUG capture works"
    no_leak_in_files_logs_or_output(sent, local, debug_logs, capfd)
