"""A real local S3 endpoint for tests: moto's threaded server on loopback (see ENVIRONMENT.md)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec

# moto accepts any credentials; the ones the tests use to create and inspect buckets are these,
# distinct from whatever a test configures batchyard with
ADMIN_KEY = "moto-admin-key"
ADMIN_SECRET = "moto-admin-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Endpoint:
    """A running moto S3 server."""

    url: str

    def admin_fs(self) -> Any:
        """A fresh s3fs filesystem (no instance or listing cache) with the admin keys."""
        return fsspec.filesystem(
            "s3", endpoint_url=self.url, key=ADMIN_KEY, secret=ADMIN_SECRET,
            skip_instance_cache=True, use_listings_cache=False,
        )

    def new_bucket(self) -> str:
        """Create a bucket with a unique name (at least 3 characters, as S3 requires)."""
        name = f"by-{secrets.token_hex(4)}"
        self.admin_fs().mkdir(name)
        return name

    def staging(self, bucket: str, prefix: str = "runs", **keys: str) -> dict[str, Any]:
        """`staging` settings for `s3://bucket/prefix` on this endpoint."""
        return {
            "root": f"s3://{bucket}/{prefix}",
            "s3_endpoint_url": self.url,
            "s3_access_key_id": keys.get("key", ADMIN_KEY),
            "s3_secret_access_key": keys.get("secret", ADMIN_SECRET),
            "s3_region": REGION,
        }


@contextmanager
def moto_s3() -> Iterator[S3Endpoint]:
    """Start moto's S3 server on a free loopback port; stop it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Endpoint(f"http://{host}:{port}")
    finally:
        server.stop()
        os.environ.update(saved)
