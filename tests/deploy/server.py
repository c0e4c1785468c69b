"""A real Prefect server for the tests of this folder: free ports, a clean shell environment,
starting and stopping background commands, and waiting for what they do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    """A shell's environment: no Prefect or batchyard setting of the test session leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BATCHYARD_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        # offline machine and test speed, not part of the instructions
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        # no scheduled tracker tick at a 10-minute boundary in the middle of the test
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc): a worker starts flow runs in new sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a background command and every descendant of it: SIGTERM, then SIGKILL."""
    pids = [proc.pid, *descendants(proc.pid)]

    def alive() -> bool:
        return proc.poll() is None or any(Path(f"/proc/{p}").exists() for p in pids[1:])

    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive():
            return


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False



@contextlib.contextmanager
def prefect_server(base: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` on a free port with its own PREFECT_HOME under `base`: yields its
    API URL and a clean environment that points at it (stopped, with its children, after)."""
    port = free_port()
    env = clean_env(base / "prefect-home")
    api = f"http://127.0.0.1:{port}/api"
    with open(base / "server.log", "wb") as out:
        proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the Prefect server", lambda: proc.poll() is None and healthy(api), 120)
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        stop(proc)
