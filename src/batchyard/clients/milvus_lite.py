"""Milvus Lite in a process of its own (`python -m milvus_lite server`), reached over gRPC.

pymilvus runs Milvus Lite inside the calling process when it is given a `.db` path. At a million
256-dimension vectors Lite holds about 2 GB, and that memory stays with whatever process opened
it: the pipeline's own memory would then grow with the collection, not with a partition. So the
embedded default (`milvus.lite_mode = "process"`) starts Lite's own gRPC server as a child
process and connects to it like to any Milvus server. Side effects: its spurious gRPC
tracebacks stay in the child, and the data directory has one owner however many clients this
process opens.

Lite has no authentication, and on a loopback TCP port any local user could read and write the
vectors. So the child listens on a Unix socket in an owner-only folder (0700) next to the data
directory (`<staging>/.milvus-lite/`), and pymilvus connects to `unix:<path>`; a path too long
for a Unix socket (107 bytes) goes to a private temporary folder instead. The child runs under
a umask taken from the staging folder's mode (`perms.umask_for`), so its data files are as
private as the rest of staging. (`milvus.lite_mode = "thread"` runs Lite in this process,
where pymilvus binds it to a loopback TCP port: readable by local users during the run.)

One data directory, one server, shared by every process of the project directory (two runs at
once, `batchyard search` beside a run): Lite allows one process per data directory. So the
server is started by a small **supervisor** process (`python -m batchyard.clients.milvus_lite
<data dir>`), which every process that uses it registers with (`clients/<pid>` in the socket
folder). The supervisor stops Lite once no registered process has been alive for `GRACE_S`, so a
crashed pipeline never leaves a server holding the data directory; the Lite child gets SIGTERM if
the supervisor dies (`PR_SET_PDEATHSIG`). Starting, registering and stopping happen under one
lock file (`spawn.lock`), so a process never attaches to a server that is about to stop. Within
one process, every client of one data directory shares one registration (reference counted).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from batchyard.errors import TerminalError
from batchyard.storage.perms import file_mode_in, umask_for

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


class LiteServerError(TerminalError):
    """Milvus Lite's server process did not start."""

    def __init__(self, data_dir: str, reason: str) -> None:
        self.data_dir = data_dir
        super().__init__(f"Milvus Lite at {data_dir}: {reason}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


SOCKET_PATH_MAX = 107
"""Longest path of a Unix socket (`sun_path` holds 108 bytes with its NUL)."""
SOCKET_NAME = "milvus"
"""The child binds `unix:<folder>/milvus:0`: `milvus_lite server` joins `--host` and `--port`
with a colon, and for a `unix:` address gRPC takes all of it as the path."""


def _socket_folder(data_dir: Path) -> tuple[Path, bool]:
    """An owner-only folder for the child's socket, and whether it is a temporary one (the same
    for every process of a data directory: they find the server by it)."""
    folder = data_dir.parent / ".milvus-lite"
    if len(str(folder / f"{SOCKET_NAME}:0").encode()) > SOCKET_PATH_MAX:
        folder, temporary = Path(tempfile.gettempdir()) / f"batchyard-milvus-{_digest(data_dir)}", True
    else:
        temporary = False
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)  # whatever the umask or an older folder had
    return folder, temporary


def _reachable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class LiteServer:
    """One `milvus_lite server` child process serving one data directory on a Unix socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.refs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.folder: Path | None = None
        self._temporary = False

    @property
    def socket_path(self) -> Path:
        assert self.folder is not None, "not started"
        return self.folder / f"{SOCKET_NAME}:0"

    @property
    def uri(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.folder, self._temporary = _socket_folder(self.data_dir)
        if _reachable(self.socket_path):
            raise LiteServerError(str(self.data_dir), "another process serves it (its socket answers)")
        self.socket_path.unlink(missing_ok=True)  # a dead child's socket: gRPC does not replace it
        log_path = self.data_dir.parent / f".{self.data_dir.name}.server.log"
        umask = umask_for(self.data_dir.parent)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode_in(self.data_dir.parent))
        with os.fdopen(fd, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                 "--host", f"unix:{self.folder / SOCKET_NAME}", "--port", "0"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _child_setup(umask),
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self._remove_folder()
                raise LiteServerError(str(self.data_dir), f"the server exited during start-up: {tail[0]}")
            if _reachable(self.socket_path):
                os.chmod(self.socket_path, 0o600)  # the child's umask is staging's; the socket stays private
                log.info("Milvus Lite server for %s on %s (pid %d)", self.data_dir, self.uri, self.proc.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise LiteServerError(str(self.data_dir), f"the server did not listen within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        if self.folder is not None:
            self.socket_path.unlink(missing_ok=True)
        self._remove_folder()

    def _remove_folder(self) -> None:
        """The folder stays (its `clients/` and `spawn.lock` order the processes that share it)."""


def _child_setup(umask: int) -> None:  # pragma: no cover - runs in the child before exec
    os.umask(umask)  # the child's data files get staging's access
    if sys.platform == "linux":
        _die_with_parent()


_SERVERS: dict[Path, LiteServer] = {}  # the supervisor's own child
_REFS: dict[Path, int] = {}  # registrations of this process, per data directory
_LOCK = threading.Lock()
GRACE_S = 2.0
"""How long the supervisor keeps Lite up after its last registered process is gone."""


def _start(path: Path, attempts: int = 3) -> LiteServer:
    """Start a server, again if it dies at start-up: a child can die for reasons of the moment
    (gRPC's poller failing on a loaded machine, seen once in CI as `epoll_wait error: Bad file
    descriptor`)."""
    for attempt in range(1, attempts + 1):
        server = LiteServer(path)
        try:
            server.start()
            return server
        except LiteServerError as exc:
            if attempt == attempts or "exited during start-up" not in str(exc):
                raise
            log.warning("%s; starting it again (attempt %d of %d)", exc, attempt + 1, attempts)
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Registry:
    """The processes using one data directory's server (`clients/<pid>` files) and the lock that
    orders starting, registering and stopping."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.clients = folder / "clients"
        self.lock_path = folder / "spawn.lock"

    def __enter__(self) -> _Registry:
        self.clients.mkdir(mode=0o700, exist_ok=True)
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def add(self, pid: int) -> None:
        (self.clients / str(pid)).touch(mode=0o600)

    def remove(self, pid: int) -> None:
        (self.clients / str(pid)).unlink(missing_ok=True)

    def alive(self) -> list[int]:
        """Registered processes that still run (the files of dead ones are removed)."""
        out = []
        for entry in self.clients.glob("*"):
            if entry.name.isdigit() and _pid_alive(int(entry.name)):
                out.append(int(entry.name))
            else:
                entry.unlink(missing_ok=True)
        return out


def _folder_of(path: Path) -> Path:
    return _socket_folder(path)[0]


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def acquire(data_dir: str | os.PathLike[str]) -> str:
    """The URI of the Lite server of `data_dir`, registering this process with it and starting
    its supervisor when no process serves it yet."""
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        folder = _folder_of(path)
        sock = folder / f"{SOCKET_NAME}:0"
        with _Registry(folder) as registry:
            registry.add(os.getpid())
            if not _reachable(sock):
                _spawn_supervisor(path, folder, sock)
        _REFS[path] = _REFS.get(path, 0) + 1
        return f"unix:{sock}"


def server_pids(data_dir: str | os.PathLike[str]) -> dict[str, int]:
    """`{"supervisor": pid, "lite": pid}` of the server of `data_dir` (empty: none runs)."""
    import json

    info = _folder_of(Path(data_dir).expanduser().resolve()) / "server.json"
    try:
        return {k: int(v) for k, v in json.loads(info.read_text()).items()}
    except (OSError, ValueError):
        return {}


def wait_stopped(data_dir: str | os.PathLike[str], timeout_s: float = 30.0) -> bool:
    """Wait until no server serves `data_dir` (its last user gone and `GRACE_S` past), e.g. before
    copying a staging root; whether it stopped in time."""
    deadline = time.monotonic() + timeout_s
    while server_pids(data_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def release(data_dir: str | os.PathLike[str]) -> None:
    """Drop one reference; the last one of this process unregisters it (the supervisor stops Lite
    when no registered process is left)."""
    path = Path(data_dir).expanduser().resolve()
    with _LOCK:
        refs = _REFS.get(path, 0) - 1
        if refs > 0:
            _REFS[path] = refs
            return
        _REFS.pop(path, None)
        folder = _folder_of(path)
        with _Registry(folder) as registry:
            registry.remove(os.getpid())


def _spawn_supervisor(path: Path, folder: Path, sock: Path) -> None:
    """Start `python -m batchyard.clients.milvus_lite <data dir>` and wait until Lite answers."""
    log_path = path.parent / f".{path.name}.server.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode_in(path.parent))
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "batchyard.clients.milvus_lite", str(path), str(folder)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S * 3  # the supervisor tries up to 3 starts
    while time.monotonic() < deadline:
        if _reachable(sock) and (folder / "server.json").exists():
            log.info("Milvus Lite server for %s on unix:%s (supervisor pid %d)", path, sock, proc.pid)
            return
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LiteServerError(str(path), f"the server exited during start-up: {tail[0]}")
        time.sleep(0.05)
    proc.terminate()
    raise LiteServerError(str(path), f"the server did not listen within {START_TIMEOUT_S * 3:.0f} s")


def supervise(path: Path, folder: Path) -> int:
    """The supervisor: serve `path` with a Lite child until no registered process is alive."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor: %(message)s")
    server = _start(path)
    info = folder / "server.json"
    part = folder / "server.json.part"  # owner-only, and complete when it appears
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f'{{"supervisor": {os.getpid()}, "lite": {server.proc.pid if server.proc else 0}}}\n')
    os.replace(part, info)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    idle_since: float | None = None
    try:
        while not stop.wait(0.25):
            if server.proc is None or server.proc.poll() is not None:
                log.error("the Lite child exited (%s)", server.proc.returncode if server.proc else "?")
                return 1
            with _Registry(folder) as registry:
                if registry.alive():
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= GRACE_S:
                    server.stop()  # under the lock: nobody attaches to a server that is stopping
                    info.unlink(missing_ok=True)
                    log.info("no process uses %s any more: stopped", path)
                    return 0
    finally:
        server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover - the supervisor process
    sys.exit(supervise(Path(sys.argv[1]), Path(sys.argv[2])))
