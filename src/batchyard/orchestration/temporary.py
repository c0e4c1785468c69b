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
line it printed (its output goes to a file, never to the terminal); `stop()` ends it when the
command is done.

With `PREFECT_API_URL` set (a real server), `start()` checks its health in the background
instead, so a server that is down is a one-line error, not a traceback.

No Prefect import here: this module must load in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
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
from pathlib import Path
from typing import IO

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

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, closed by stop()

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
        self.server: TemporaryServer | None = None
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
            self.server = TemporaryServer()
            self.server.start()
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
            self.server.stop()
