"""The embedded server is shared by the processes of a project directory, and taken over when
the process that serves it exits."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from batchyard.clients.batch_api import BatchApi
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.embedded import start_or_attach, take_over
from batchyard.settings import ProviderSettings


def test_a_second_process_uses_the_running_server_and_takes_it_over_when_it_exits(tmp_path: Path) -> None:
    state = tmp_path / ".localapi"
    code = ("import sys, time\nfrom batchyard.localapi.config import LocalApiConfig\n"
            "from batchyard.localapi.embedded import start_or_attach\n"
            f"e = start_or_attach(LocalApiConfig(), {str(state)!r})\nprint(e.base_url, flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    servers: list[Any] = []  # what this process serves after the take-over
    try:
        assert owner.stdout is not None
        url = owner.stdout.readline().strip()
        endpoint = state / "endpoint.json"
        assert stat.S_IMODE(endpoint.stat().st_mode) == 0o600  # its key: the owner's user only
        attached = start_or_attach(LocalApiConfig(), state)
        assert attached.server is None and attached.base_url == url and attached.owner_pid == owner.pid
        api = BatchApi.connect(ProviderSettings(max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05),
                               base_url=attached.base_url, api_key=attached.key)
        moved: list[str] = []

        def follow(lost: str) -> tuple[str, str]:
            nxt = take_over(LocalApiConfig(), state, lost)
            moved.append(nxt.base_url)
            if nxt.server is not None:
                servers.append(nxt.server)
            return nxt.base_url, nxt.key

        api.reconnect = follow
        file_id = api.upload("a.jsonl", b'{"custom_id": "x"}\n')
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # the next call finds nobody at the old address: this process serves the state now
        assert api.find_file("a.jsonl", len(b'{"custom_id": "x"}\n'), since=0) == file_id
        assert moved and moved[-1] != url and servers
        assert json.loads(endpoint.read_text())["pid"] == os.getpid()
    finally:
        if owner.poll() is None:
            owner.kill()
        for server in servers:
            server.stop()
