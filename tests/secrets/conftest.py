"""Fixtures for the secrets tests: sentinel secrets, a local S3 server, DEBUG capture of every logger."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import pytest

from tests.s3.conftest import bucket, s3  # noqa: F401  (shared fixtures)
from tests.secrets.leaks import SERVER_SIDE_LOGGERS, Sentinels


@pytest.fixture
def sentinels() -> Sentinels:
    tag = secrets.token_hex(8)
    return Sentinels(
        api_key=f"sk-SENTINEL-{tag}",
        s3_key=f"AKIASENTINEL{tag.upper()}",
        s3_secret=f"s3SENTINELsecret{tag}",
        milvus_token=f"root:SENTINEL-milvus-{tag}",
        mongo_password=f"SENTINELmongo{tag}",
        server_key=f"sk-SENTINEL-server-{tag}",
    )


def _import_the_stack() -> None:
    """Import what the pipeline uses so that every logger exists before levels are set."""
    import aiobotocore.endpoint  # noqa: F401
    import botocore.endpoint  # noqa: F401
    import fastapi  # noqa: F401
    import httpx  # noqa: F401
    import openai  # noqa: F401
    import pymilvus  # noqa: F401
    import s3fs  # noqa: F401
    import uvicorn  # noqa: F401

    import batchyard.clients.batch_api
    import batchyard.clients.milvus
    import batchyard.clients.mongo
    import batchyard.jobs.embeddings
    import batchyard.jobs.inference
    import batchyard.localapi.runner  # noqa: F401


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record at DEBUG: the root logger, and every logger that set its own
    level, was disabled, or does not propagate (e.g. uvicorn's) gets DEBUG and the capture."""
    _import_the_stack()
    caplog.set_level(logging.DEBUG)
    saved: list[tuple[logging.Logger, int, bool, bool]] = []
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or name.startswith(SERVER_SIDE_LOGGERS):
            continue
        saved.append((lg, lg.level, lg.disabled, lg.propagate))
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        if not lg.propagate:
            lg.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        for lg, level, disabled, propagate in saved:
            lg.setLevel(level)
            lg.disabled = disabled
            if not propagate:
                lg.removeHandler(caplog.handler)
