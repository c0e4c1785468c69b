"""The driver lease: one process drives a run's batches; a crashed driver leaves no lease."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from batchyard.errors import RunBusy
from batchyard.storage.runs import RunStore, driver_id
from batchyard.storage.staging import Staging


@pytest.fixture
def run(tmp_path: Path) -> RunStore:
    r = RunStore(Staging(str(tmp_path)), "embeddings", "r1")
    r.write_run({"run_id": "r1", "state": "running"})
    return r


def test_a_live_driver_blocks_a_second_one(run: RunStore) -> None:
    me, other = driver_id(), driver_id()  # same live process, different drivers
    run.claim(me, ttl_s=60)
    with pytest.raises(RunBusy, match="being driven by"):
        run.claim(other, ttl_s=60)
    run.claim(me, ttl_s=60)  # re-entrant for the holder
    run.release(me)
    assert not run.staging.exists(run.rel("driver.json"))
    run.claim(other, ttl_s=60)
    run.update_run(state="cancelled")  # a concurrent cancel survives the driver's heartbeat
    run.heartbeat(other)
    assert run.read_run()["state"] == "cancelled"


def test_a_dead_driver_on_this_host_is_stale_at_once(run: RunStore) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{proc.stdout.strip()}:abcdef"
    run.staging.write_json(run.rel("driver.json"), {"owner": dead, "heartbeat_at": "2099-01-01T00:00:00+00:00"})
    run.claim(driver_id(), ttl_s=3600)


def test_an_old_heartbeat_from_another_host_expires(run: RunStore) -> None:
    run.staging.write_json(run.rel("driver.json"), {"owner": "elsewhere:1:abc", "heartbeat_at": "2020-01-01T00:00:00+00:00"})
    run.claim(driver_id(), ttl_s=60)
    run.staging.write_json(run.rel("driver.json"), {"owner": "elsewhere:1:abc", "heartbeat_at": "2999-01-01T00:00:00+00:00"})
    with pytest.raises(RunBusy):
        run.claim(driver_id(), ttl_s=60)
