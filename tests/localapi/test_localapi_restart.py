"""Persistence: a new server on the same state_dir resumes batches without re-running requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai

from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer
from batchyard.localapi.store import Store

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Api, MakeServer

    ApiFor = Callable[[LocalServer], Api]


def _progress_ids(state: Path, batch_id: str) -> dict[str, str]:
    """custom_id -> output line id of the requests already recorded as processed."""
    path = state / "progress" / f"{batch_id}.jsonl"
    out = {}
    for raw in path.read_text().splitlines():
        line = json.loads(raw.split("\t", 1)[1])
        out[line["custom_id"]] = line["id"]
    return out


def test_restart_mid_batch_resumes_without_rerunning(
    make_server: MakeServer, api_for: ApiFor, tmp_path: Path
) -> None:
    state = tmp_path / "shared"
    first = make_server(state_dir=state, seconds_per_request=0.03)
    api = api_for(first)
    lines = [api.emb(f"r{i:02d}", f"text {i}") for i in range(60)]
    b = api.submit(lines)
    api.wait(b.id, ("in_progress",))
    time.sleep(0.35)
    first.stop()
    before = _progress_ids(state, b.id)
    assert 0 < len(before) < 60
    persisted = json.loads((state / "batches" / f"{b.id}.json").read_text())["batch"]
    assert persisted["status"] == "in_progress"
    assert persisted["request_counts"]["completed"] == len(before)

    second = make_server(state_dir=state, seconds_per_request=0.0)
    api2 = api_for(second)
    done = api2.wait(b.id)
    assert done.status == "completed" and done.request_counts.completed == 60  # type: ignore[union-attr]
    out = api2.lines(done.output_file_id)
    ids = [line["custom_id"] for line in out]
    assert sorted(ids) == [f"r{i:02d}" for i in range(60)]  # each exactly once
    final = {line["custom_id"]: line["id"] for line in out}
    assert all(final[cid] == line_id for cid, line_id in before.items())  # not re-run
    assert second.store is not None
    assert second.store.counters()["processed_requests"] == 60
    assert not (state / "progress" / f"{b.id}.jsonl").exists()
    assert api2.client.files.retrieve(b.input_file_id).purpose == "batch"  # files persisted


def test_torn_progress_line_is_dropped_on_resume(
    make_server: MakeServer, api_for: ApiFor, tmp_path: Path
) -> None:
    state = tmp_path / "torn"
    first = make_server(state_dir=state, seconds_per_request=0.05)
    api = api_for(first)
    b = api.submit([api.emb(f"r{i}", f"t{i}") for i in range(20)])
    api.wait(b.id, ("in_progress",))
    time.sleep(0.2)
    first.stop()
    with open(state / "progress" / f"{b.id}.jsonl", "ab") as fh:
        fh.write(b'{"i":19,"ok":1,"in":1,"out":0}\t{"id":"batch_req_torn","custom_id":"r19"')
    second = make_server(state_dir=state)
    done = api_for(second).wait(b.id)
    out = api_for(second).lines(done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"r{i}" for i in range(20))
    assert "batch_req_torn" not in {line["id"] for line in out}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(config: LocalApiConfig, state: Path) -> subprocess.Popen[bytes]:
    code = textwrap.dedent(
        f"""
        from batchyard.localapi.config import LocalApiConfig
        from batchyard.localapi.runner import serve
        serve(LocalApiConfig.model_validate_json({config.model_dump_json()!r}), {str(state)!r})
        """
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)


def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            if httpx.get(base.removesuffix("/v1") + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("server did not come up")


def test_exit_after_requests_kills_process_and_restart_resumes(tmp_path: Path) -> None:
    port = _free_port()
    cfg = LocalApiConfig(
        port=port, validating_s=0, seconds_per_request=0.01, faults={"exit_after_requests": 7}
    )
    state = tmp_path / "proc"
    base = f"http://127.0.0.1:{port}/v1"
    proc = _spawn(cfg, state)
    try:
        _wait_up(base, proc)
        client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
        body = "\n".join(
            json.dumps(
                {
                    "custom_id": f"r{i:02d}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "text-embedding-3-small", "input": f"t{i}"},
                }
            )
            for i in range(20)
        )
        fid = client.files.create(file=("in.jsonl", body.encode()), purpose="batch").id
        b = client.batches.create(
            input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h"
        )
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    proc2 = _spawn(cfg, state)  # same config: the kill happens once per state_dir
    try:
        _wait_up(base, proc2)
        deadline = time.monotonic() + 20
        while (cur := client.batches.retrieve(b.id)).status != "completed":
            assert time.monotonic() < deadline, cur.status
            time.sleep(0.05)
        out = [json.loads(x) for x in client.files.content(cur.output_file_id).text.splitlines()]  # type: ignore[arg-type]
        assert sorted(x["custom_id"] for x in out) == [f"r{i:02d}" for i in range(20)]
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=15)
    store = Store(state)
    try:
        assert store.counters()["processed_requests"] == 20  # nothing ran twice
        assert store.counters()["exit_kills"] == 1
    finally:
        store.close()
    assert os.path.isdir(state / "blobs")


def test_local_server_context_manager(tmp_path: Path) -> None:
    with LocalServer(LocalApiConfig(), tmp_path / "cm") as srv:
        url = srv.base_url
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert httpx.get(f"{url}/batches").json()["data"] == []
    try:
        httpx.get(f"{url}/batches", timeout=1)
    except httpx.HTTPError:
        pass
    else:
        raise AssertionError("server still answering after stop()")
