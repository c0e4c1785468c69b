"""S3 fixtures: one moto server per test module, a fresh bucket per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3.moto_s3 import S3Endpoint, moto_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    """A real local S3 endpoint (moto's threaded server on loopback)."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3: S3Endpoint) -> str:
    """A new, empty bucket."""
    return s3.new_bucket()
