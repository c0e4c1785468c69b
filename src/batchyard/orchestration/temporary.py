"""The Prefect API a command talks to: the configured server, or a temporary one started early.

With no `PREFECT_API_URL`, Prefect starts a temporary API server (a uvicorn subprocess over a
SQLite file in `PREFECT_HOME`) the first time a client needs it, and waits for it: 5-25 s of
every command on a 2-core machine, during which nothing else happens and nothing is shown. A
failed start (an unwritable `PREFECT_HOME`, say) is reported only after the whole start-up
timeout, as "did not start in time".

`PrefectApi.start()` starts that same server as soon as a command knows it will need Prefect,
before Prefect is even imported, so that it comes up while the command loads its settings,
opens its stores and starts its own servers. Its URL is known at once (the port is chosen
first), so it goes into `PREFECT_API_URL` of this process (and its children) right away, and
Prefect can be imported meanwhile (`preload`): Prefect's clients, log and event workers all use
that URL instead of starting a server of their own, and nothing contacts it before `wait()`
has seen it answer. If the server exits during start-up, `wait()` raises at once with the last
line it printed (its output goes to a file, never to the terminal).

That server is shared by the commands of one `PREFECT_HOME` (`SharedServer`): the first one
starts it under a small supervisor process, the next ones attach while it runs, and it stops
`GRACE_S` (20 s) after the last command that used it ended. A script of many commands (or the
test suite) pays for one start-up.

With `PREFECT_API_URL` set (a real server), `start()` checks its health in the background
instead, so a server that is down is a one-line error, not a traceback.

No Prefect import here: this module must load in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from batchyard.infra import InfraError, InfraFailure, mask_url

STARTUP_TIMEOUT_S = 90.0
"""How long a temporary server may take to answer its health check, unless Prefect's own
`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` says otherwise (a loaded 2-core machine took
up to 31 s)."""


def startup_timeout() -> float:
    try:
        return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or STARTUP_TIMEOUT_S)
    except ValueError:
        return STARTUP_TIMEOUT_S

_LOGGING_OVERRIDES = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL",
                      "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL")


class PrefectUnavailable(InfraError):
    """The Prefect API cannot be used: a temporary server did not start, or a server is down."""


def prefect_home() -> Path:
    """Where Prefect keeps its settings and the temporary server's database."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def configured_api_url() -> str | None:
    """`PREFECT_API_URL` from the environment, else from the active profile of
    `$PREFECT_HOME/profiles.toml` (what `prefect config set PREFECT_API_URL=...` writes).

    Read without importing Prefect. Prefect has further sources (a `prefect.toml`, `.env`);
    `PrefectApi.adopt_settings` checks against Prefect's own settings once it is imported.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    path = prefect_home() / "profiles.toml"
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")
    return str(value) if value else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _last_line(log: IO[bytes]) -> str:
    log.seek(0)
    lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def check_home(home: Path) -> None:
    """Raise PrefectUnavailable when Prefect cannot write its home (its database lives there)."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".batchyard-write-check-"):
            pass
    except OSError as exc:
        raise PrefectUnavailable(InfraFailure(
            "Prefect", f"PREFECT_HOME {home}",
            f"{type(exc).__name__}: {exc.strerror or exc}; set PREFECT_HOME (or HOME) to a writable "
            "directory, or use --engine local", problem="cannot write its home")) from None


class TemporaryServer:
    """Prefect's temporary API server, run by this process (same command line and settings as
    Prefect's own `SubprocessASGIServer`, its output in an anonymous file)."""

    def __init__(self, port: int | None = None, log: IO[bytes] | None = None) -> None:
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = log or tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, closed by stop()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:  # pragma: no cover - broken install
            raise PrefectUnavailable(InfraFailure("Prefect", "this Python", "prefect is not installed",
                                                  problem="cannot start"))
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and k not in _LOGGING_OVERRIDES}
        env.update(PREFECT_UI_ENABLED="0", PREFECT_SERVER_UI_ENABLED="false", PREFECT__SERVER_EPHEMERAL="1",
                   PREFECT__SERVER_FINAL="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.submodule_search_locations[0]).parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # a Ctrl-C in the terminal stops the command, which then stops this
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def wait(self, timeout: float | None = None, cancelled: threading.Event | None = None) -> str:
        """The API URL once the server answers; PrefectUnavailable if it exits or times out."""
        assert self.proc is not None
        timeout = startup_timeout() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancelled is not None and cancelled.is_set():
                raise PrefectUnavailable(InfraFailure("Prefect", self.api_url, "stopped", problem="was"))
            code = self.proc.poll()
            if code is not None:
                raise PrefectUnavailable(InfraFailure(
                    "Prefect's temporary API server", f"127.0.0.1:{self.port}",
                    f"exited with code {code} during start-up: {_last_line(self._log)}", problem="did not start"))
            if _healthy(self.api_url, timeout=1.0):
                return self.api_url
            time.sleep(0.1)
        last = _last_line(self._log)
        self.stop()
        raise PrefectUnavailable(InfraFailure(
            "Prefect's temporary API server", f"127.0.0.1:{self.port}",
            f"no answer within {timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; last output: "
            f"{last}); run again, raise that timeout, use a Prefect server (PREFECT_API_URL), or --engine local",
            problem="did not start"))

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        with contextlib.suppress(OSError):
            self._log.close()


class PrefectApi:
    """The Prefect API of one command: started (or checked) in the background, awaited once."""

    def __init__(self) -> None:
        self.server: SharedServer | None = None
        self.url: str | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._preload: threading.Thread | None = None
        self.started_at = time.monotonic()

    @property
    def temporary(self) -> bool:
        return self.server is not None

    def start(self) -> PrefectApi:
        """Begin: check the configured server, or start a temporary one (non-blocking)."""
        configured = configured_api_url()
        if configured is None:
            check_home(prefect_home())
            self.server = SharedServer(prefect_home())
            self.server.acquire()
            os.environ["PREFECT_API_URL"] = self.server.api_url  # before Prefect reads its settings
        self._thread = threading.Thread(target=self._run, args=(configured,), name="batchyard-prefect-api",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self, configured: str | None) -> None:
        try:
            if self.server is not None:
                self.url = self.server.wait(cancelled=self._stop)
            else:
                assert configured is not None
                if not _healthy(configured.rstrip("/"), timeout=5.0):
                    raise PrefectUnavailable(InfraFailure(
                        "Prefect API", mask_url(configured.rstrip("/")),
                        "no answer to its health check; start the server, unset PREFECT_API_URL to use a "
                        "temporary one, or use --engine local"))
                self.url = configured
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str:
        """The API URL (put into `PREFECT_API_URL` of this process); raises what the start raised."""
        self._done.wait(timeout)
        if self.error is not None:
            raise self.error
        if self.url is None:
            raise PrefectUnavailable(InfraFailure("Prefect API", "?", "not ready", problem="is"))
        return self.url

    def preload(self, module: str) -> None:
        """Import `module` (Prefect, 2-4 s) on a background thread while the server starts.

        A command that exits must wait for it first (`settle`): a daemon thread killed inside an
        extension module's initialisation at interpreter exit aborts the process ("FATAL:
        exception not rethrown"), and Prefect's exit hooks cannot be registered any more then."""
        import importlib

        def load() -> None:
            with contextlib.suppress(Exception):  # imported again, and its error raised, where it is used
                importlib.import_module(module)

        if self._preload is None:
            self._preload = threading.Thread(target=load, name="batchyard-prefect-import", daemon=True)
            self._preload.start()

    def settle(self) -> None:
        """Wait for the background import (`preload`): Prefect registers exit hooks as it
        loads, which fails noisily once the interpreter has begun to exit."""
        if self._preload is not None:
            self._preload.join(60)

    def stop(self) -> None:
        self._stop.set()
        self.settle()
        if self.server is not None:
            self.server.release()


# --------------------------------------------------------------------------- one server per PREFECT_HOME

GRACE_S = 20.0
"""How long the shared temporary server outlives the last command that used it."""
SHARED = "batchyard-temporary-api"
"""Its folder in `PREFECT_HOME`: `server.json` (URL and supervisor pid), `clients/<pid>`,
`lock`, `server.log`."""


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: the supervisor's spawner never reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class SharedServer:
    """Prefect's temporary API server, shared by every command of one `PREFECT_HOME`.

    Started once (by a small supervisor process, `python -m batchyard.orchestration.temporary`),
    then attached to by every command that needs it while it runs: a script or a test suite
    that runs twenty commands pays for one start-up, not twenty (3-25 s each on 2 cores). Each
    command registers its pid under the folder's lock (`clients/<pid>`); the supervisor stops
    the server once no registered command has been alive for `GRACE_S`, and a command that is
    killed simply stops counting. The URL is known at once (the port is chosen before the
    start), so a command can set `PREFECT_API_URL` and import Prefect while it comes up.
    """

    def __init__(self, home: Path, grace_s: float = GRACE_S) -> None:
        self.folder = home / SHARED
        self.grace_s = grace_s
        self.api_url = ""
        self.supervisor: int | None = None
        self._spawned: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.folder / "clients").mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _info(self) -> dict[str, Any] | None:
        try:
            info = json.loads((self.folder / "server.json").read_text())
            return info if _pid_alive(int(info["supervisor"])) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> str:
        """Register this process and return the server's URL, starting its supervisor when no
        server runs (it may still be starting: `wait`)."""
        with self._locked():
            info = self._info()
            if info is None:
                port = _free_port()
                log = open(self.folder / "server.log", "wb")  # noqa: SIM115 - handed to the child
                with log:
                    self._spawned = subprocess.Popen(
                        [sys.executable, "-m", "batchyard.orchestration.temporary", str(self.folder), str(port),
                         str(self.grace_s)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                info = {"url": f"http://127.0.0.1:{port}/api", "supervisor": self._spawned.pid}
                part = self.folder / "server.json.part"
                part.write_text(json.dumps(info))
                os.replace(part, self.folder / "server.json")
            (self.folder / "clients" / str(os.getpid())).touch()
        self.api_url, self.supervisor = str(info["url"]), int(info["supervisor"])
        return self.api_url

    def _alive(self) -> bool:
        if self._spawned is not None:
            return self._spawned.poll() is None
        return self.supervisor is not None and _pid_alive(self.supervisor)

    def wait(self, timeout: float | None = None, cancelled: threading.Event | None = None) -> str:
        """The API URL once the server answers; PrefectUnavailable if it stops or times out."""
        timeout = startup_timeout() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancelled is not None and cancelled.is_set():
                raise PrefectUnavailable(InfraFailure("Prefect", self.api_url, "stopped", problem="was"))
            if _healthy(self.api_url, timeout=1.0):
                return self.api_url
            if not self._alive():
                raise PrefectUnavailable(InfraFailure(
                    "Prefect's temporary API server", self.api_url.removesuffix("/api").removeprefix("http://"),
                    f"exited during start-up: {self._last_line()}", problem="did not start"))
            time.sleep(0.1)
        raise PrefectUnavailable(InfraFailure(
            "Prefect's temporary API server", self.api_url.removesuffix("/api").removeprefix("http://"),
            f"no answer within {timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; last output: "
            f"{self._last_line()}); run again, raise that timeout, use a Prefect server (PREFECT_API_URL), or "
            "--engine local", problem="did not start"))

    def _last_line(self) -> str:
        try:
            with open(self.folder / "server.log", "rb") as log:
                return _last_line(log)
        except OSError:
            return "no output"

    def release(self) -> None:
        """Unregister this process (the supervisor stops the server `grace_s` after the last)."""
        with contextlib.suppress(OSError), self._locked():
            (self.folder / "clients" / str(os.getpid())).unlink(missing_ok=True)

    def clients(self) -> list[int]:
        """Registered processes that still run (call under the lock; dead ones are removed)."""
        alive = []
        for entry in (self.folder / "clients").glob("*"):
            if entry.name.isdigit() and _pid_alive(int(entry.name)):
                alive.append(int(entry.name))
            else:
                entry.unlink(missing_ok=True)
        return alive


def supervise(folder: Path, port: int, grace_s: float) -> int:
    """The supervisor: run the temporary server until no command has used it for `grace_s`."""
    shared = SharedServer(folder.parent, grace_s)
    with open(folder / "server.log", "ab") as log:
        server = TemporaryServer(port, log)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        server.start()
        try:
            server.wait(cancelled=stop)
        except PrefectUnavailable as exc:
            print(f"supervisor: {exc}", file=sys.stderr, flush=True)
            with shared._locked():
                (folder / "server.json").unlink(missing_ok=True)
            return 1
        idle_since: float | None = None
        try:
            while not stop.wait(0.5):
                if server.proc is None or server.proc.poll() is not None:
                    print("supervisor: the server exited", file=sys.stderr, flush=True)
                    with shared._locked():
                        (folder / "server.json").unlink(missing_ok=True)
                    return 1
                with shared._locked():
                    if shared.clients():
                        idle_since = None
                        continue
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= grace_s:
                        (folder / "server.json").unlink(missing_ok=True)  # nobody attaches any more
                        return 0
        finally:
            server.stop()
            with shared._locked():
                info = folder / "server.json"
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(info.read_text()).get("supervisor") == os.getpid():
                        info.unlink()
        return 0


if __name__ == "__main__":  # pragma: no cover - the supervisor process
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
