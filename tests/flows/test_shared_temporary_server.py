"""Commands of one PREFECT_HOME share Prefect's temporary API server (`SharedServer`): one start-up
for a script of many commands; it stops by itself once no command that used it is alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from batchyard.orchestration.temporary import SHARED, _healthy, _pid_alive

COMMAND = """
import sys
from pathlib import Path
from batchyard.orchestration.temporary import SharedServer
server = SharedServer(Path(sys.argv[1]), grace_s=1.0)
server.acquire()
print(server.wait(), flush=True)
sys.stdin.readline()
server.release()
"""


def command(home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen([sys.executable, "-c", COMMAND, str(home)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_two_commands_share_one_server_which_stops_after_the_last_one(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    first = command(home)
    url = first.stdout.readline().strip()  # type: ignore[union-attr]
    assert url.startswith("http://127.0.0.1:") and _healthy(url)
    info = json.loads((home / SHARED / "server.json").read_text())
    second = command(home)
    assert second.stdout.readline().strip() == url, "the second command attached to the running server"  # type: ignore[union-attr]
    assert json.loads((home / SHARED / "server.json").read_text()) == info, "and started no supervisor"
    first.communicate("\n", timeout=30)  # the first one ends: the second still uses the server
    time.sleep(2.0)
    assert _healthy(url)
    second.send_signal(signal.SIGKILL)  # the last user dies without releasing: it stops counting
    second.wait(10)
    deadline = time.monotonic() + 30
    while _pid_alive(info["supervisor"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pid_alive(info["supervisor"]) and not _healthy(url)
    assert not (home / SHARED / "server.json").exists()
    third = command(home)  # a new command starts a new server
    try:
        assert third.stdout.readline().strip().startswith("http://127.0.0.1:")  # type: ignore[union-attr]
        assert json.loads((home / SHARED / "server.json").read_text())["supervisor"] != info["supervisor"]
    finally:
        third.communicate("\n", timeout=30)
