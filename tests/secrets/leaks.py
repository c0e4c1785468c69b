"""Sentinel secrets and the checks that none of them leaked."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Loggers of the *test's* S3 server (moto and its werkzeug HTTP server): they are the stand-in
# for AWS's side of the wire, which necessarily sees the access key id; not batchyard's logs.
SERVER_SIDE_LOGGERS = ("werkzeug", "moto")


@dataclass(frozen=True)
class Sentinels:
    """Unique, greppable fake secrets."""

    api_key: str
    s3_key: str
    s3_secret: str
    milvus_token: str
    mongo_password: str
    server_key: str
    """A key the local Batch API server accepts (`provider.local.api_keys`)."""

    def values(self) -> list[str]:
        return [self.api_key, self.s3_key, self.s3_secret, self.milvus_token, self.mongo_password,
                self.server_key]

    def forms(self) -> list[str]:
        """Each secret and its base64 (gRPC and basic-auth headers carry base64)."""
        out = []
        for v in self.values():
            out += [v, base64.b64encode(v.encode()).decode()]
        return out

    def found_in(self, data: str | bytes) -> list[str]:
        """The forms of any secret that occur in data."""
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return [f for f in self.forms() if f in text]


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record (message, rendered args, exception text), server side excluded."""
    parts = []
    for rec in caplog.records:
        if rec.name.startswith(SERVER_SIDE_LOGGERS):
            continue
        parts.append(f"{rec.name}: {rec.getMessage()}")
        if rec.exc_info:
            parts.append(logging.Formatter().formatException(rec.exc_info))
        if rec.exc_text:
            parts.append(rec.exc_text)
    return "\n".join(parts)


def no_leak(sent: Sentinels, where: str, data: Any) -> None:
    """Assert that no form of any sentinel occurs in data (str, bytes or anything repr-able)."""
    if not isinstance(data, str | bytes):
        data = repr(data)
    found = sent.found_in(data)
    assert not found, f"a secret leaked into {where}: {found}"


def no_leak_in_files_logs_or_output(sent: Sentinels, files: Iterable[Path], caplog: pytest.LogCaptureFixture,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    """No sentinel in any of the files, the captured log records, or stdout/stderr so far."""
    for path in files:
        no_leak(sent, str(path), path.read_bytes())
    no_leak(sent, "log records", log_text(caplog))
    out, err = capfd.readouterr()
    no_leak(sent, "stdout", out)
    no_leak(sent, "stderr", err)
