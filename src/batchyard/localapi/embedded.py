"""The embedded Batch API server, shared by every process of a project directory.

With no API key, a run starts batchyard's own server in its process, on the state folder under
the staging root (`.localapi/`): its batches must outlive the process (a resumed run finds them)
and one server at a time may own that folder (its lock). A second process of the same project
directory (a second run, `batchyard search`, the tracker) must not start another: it uses the
running one. So the owner publishes where it listens, with its key, in an owner-only file
(`endpoint.json`, 0600 in a 0700 folder: other local users cannot read it), and the others
connect there.

When the owner exits first, the others' next call fails to connect: they take the state folder
over (`take_over`): the first to get its lock starts the server in its own process (batches in
progress continue from their persisted progress) and publishes the new endpoint; the others read
it. A process never sees two servers on one folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from batchyard.localapi.store import StateDirLockedError

if TYPE_CHECKING:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.runner import LocalServer

log = logging.getLogger(__name__)

ENDPOINT = "endpoint.json"
WAIT_S = 30.0


class EmbeddedServerError(RuntimeError):
    """Another process owns the state folder but says nowhere where it listens."""


@dataclass
class Embedded:
    """Where this process reaches the embedded server, and the server if it owns it."""

    base_url: str
    key: str
    server: LocalServer | None
    owner_pid: int


def _endpoint(state_dir: Path) -> Path:
    return state_dir / ENDPOINT


def _publish(state_dir: Path, base_url: str, key: str) -> None:
    path = _endpoint(state_dir)
    tmp = path.with_name(f".{ENDPOINT}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"base_url": base_url, "key": key, "pid": os.getpid()}, fh)
    os.replace(tmp, path)


def unpublish(state_dir: str | os.PathLike[str]) -> None:
    """Forget this process's endpoint (it stops serving)."""
    path = _endpoint(Path(state_dir))
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _read(state_dir: Path) -> tuple[str, str, int] | None:
    try:
        data = json.loads(_endpoint(state_dir).read_text())
        return str(data["base_url"]), str(data["key"]), int(data["pid"])
    except (OSError, ValueError, KeyError):
        return None


def start_or_attach(config: LocalApiConfig, state_dir: str | os.PathLike[str], *, avoid: str = "") -> Embedded:
    """Serve the state folder in this process, or use the process that already serves it (never
    the endpoint `avoid`: a server that stopped answering)."""
    from batchyard.localapi.auth import generate_key
    from batchyard.localapi.runner import LocalServer

    folder = Path(state_dir)
    deadline = time.monotonic() + WAIT_S
    while True:
        # a key of this server only, and an admin key: it sees the batches earlier processes made
        key = generate_key()
        local = config.model_copy(update={"api_keys": [], "admin_api_keys": [SecretStr(key)], "api_keys_file": None})
        server = LocalServer(local, folder)
        try:
            server.start()
        except StateDirLockedError:
            found = _read(folder)
            if found is not None and found[0] != avoid:
                base_url, other_key, pid = found
                log.info("embedded local Batch API server of process %d at %s: shared", pid, base_url)
                return Embedded(base_url, other_key, None, pid)
            if time.monotonic() >= deadline:  # its owner is starting, or died holding the lock
                raise EmbeddedServerError(f"the embedded Batch API server's state {folder} is held by another "
                                          "process that publishes no endpoint") from None
            time.sleep(0.1)
            continue
        _publish(folder, server.base_url, key)
        log.info("embedded local Batch API server at %s", server.base_url)
        return Embedded(server.base_url, key, server, os.getpid())


def take_over(config: LocalApiConfig, state_dir: str | os.PathLike[str], lost: str) -> Embedded:
    """The server at `lost` stopped answering (its process exited): serve the folder here, or use
    whoever took it over first."""
    folder = Path(state_dir)
    found = _read(folder)
    if found is not None and found[0] != lost:
        return Embedded(found[0], found[1], None, found[2])
    log.warning("the embedded Batch API server at %s is gone: taking its state over", lost)
    return start_or_attach(config, folder, avoid=lost)
