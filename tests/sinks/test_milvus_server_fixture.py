"""The embedded Milvus server's child process outlives a killed parent: the next start reaps it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.milvus_server import MilvusServerInfo, _alive, _reap_orphans

REPO = Path(__file__).resolve().parents[2]
OWNER = """
import sys, time
from tests.milvus_server import start_embedded_server
server, info = start_embedded_server()
print(info.pid, info.base_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.milvus_server
def test_a_server_left_by_a_killed_owner_is_reaped(milvus_server: MilvusServerInfo) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert owner.stdout is not None
        pid_text, base_dir = owner.stdout.readline().split()
        pid = int(pid_text)
        owner.send_signal(signal.SIGKILL)  # no teardown, no atexit
        owner.wait(timeout=30)
        time.sleep(0.5)
        assert _alive(pid), "the child should outlive its killed owner (else this test is moot)"
        _reap_orphans()
        assert not _alive(pid) and not Path(base_dir).exists()
        assert _alive(milvus_server.pid), "the live session's own server must be left alone"
    finally:
        if owner.poll() is None:
            owner.kill()
