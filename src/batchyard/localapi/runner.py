"""Running the local Batch API server: in a background thread (`LocalServer`) or blocking (`serve`).

Both apply the same rules before they bind (`auth`): configured keys must be usable, and an
address other than loopback needs keys unless the caller passes `insecure=True`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from batchyard.localapi.auth import (
    ServeError,
    ServeRefused,
    check_bind,
    load_admin_keys,
    load_api_keys,
)
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.guard import guarded_protocol, http_limits
from batchyard.localapi.server import create_app
from batchyard.localapi.store import Store
from batchyard.localapi.sync import SyncCall, SyncEndpoints
from batchyard.localapi.worker import Worker

__all__ = ["LocalServer", "ServeError", "ServeRefused", "ServerProcess", "announce", "serve"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0


def _check_access(config: LocalApiConfig, insecure: bool) -> tuple[list[str], list[str]]:
    """The configured tenant and admin keys; refuses unusable keys and a non-loopback bind
    without keys (only a warning when `insecure`)."""
    keys, admin_keys = load_api_keys(config), load_admin_keys(config)
    warning = check_bind(config.host, keys + admin_keys, insecure=insecure)
    if warning:
        log.warning(warning)
    return keys, admin_keys


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); ServeError when that fails.

    The socket is made with `IPPROTO_TCP`: asyncio sets TCP_NODELAY only on accepted sockets
    whose `proto` says TCP, and without it every answer on a kept-alive connection waited for
    the client's delayed ACK, about 44 ms (`benchmarks/bench_serve.py`). TCP_NODELAY is set on
    the listener too (Linux passes it on to accepted sockets).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _uvicorn_config(app: FastAPI, config: LocalApiConfig, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's settings for the app: h11 with the connection cap and header timeout of
    `guard.guarded_protocol`, kept-alive connections closed after `config.keep_alive_s`."""
    limits = http_limits(config)
    protocol = guarded_protocol(limits, app.state.rejections)
    return uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                          timeout_keep_alive=config.keep_alive_s, **kwargs)  # type: ignore[arg-type]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class LocalServer:
    """The local Batch API server in a daemon thread of this process.

    `LocalServer(config, state_dir).start()` binds `config.host` (a free port when
    `config.port == 0`), starts the worker and waits until the server answers;
    `base_url` is then `http://<host>:<port>/v1` for `openai.OpenAI(base_url=...)`.
    `stop()` stops the worker (after its current chunk) and the HTTP server. A new server on
    the same `state_dir` resumes unfinished batches. Do not set `faults.exit_after_requests`
    in-process: it SIGKILLs the whole process. With `config.api_keys` set, clients need one of
    them; without, a non-loopback `config.host` is refused (ServeRefused) unless `insecure`.
    """

    def __init__(self, config: LocalApiConfig, state_dir: str | Path, *, insecure: bool = False) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.insecure = insecure
        self.store: Store | None = None
        self.worker: Worker | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._sync: SyncEndpoints | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        """`http://<host>:<port>/v1` of the running server."""
        if self.port is None:
            raise RuntimeError("the local Batch API server is not running")
        return f"http://{_url_host(self.config.host)}:{self.port}/v1"

    def sync_calls(self) -> list[SyncCall]:
        """Every synchronous call the server received since it started, oldest first.

        Kept after `stop()`, so a test can read them once the server is down.
        """
        return self._sync.calls() if self._sync is not None else []

    def enqueued_tokens(self, model: str | None = None) -> int:
        """Tokens (in the server's count) of the batches its enqueued-token cap counts now: those
        in progress, finalizing or cancelling (of `model`, or of every model)."""
        if self.store is None:
            return 0
        return sum(int(r.get("tokens") or 0) for r in self.store.batch_records()
                   if r["batch"]["status"] in ("in_progress", "finalizing", "cancelling")
                   and (model is None or r["batch"].get("model") == model))

    def start(self) -> LocalServer:
        """Start the worker and the HTTP server; returns self once the server answers."""
        if self._thread is not None:
            return self
        keys = _check_access(self.config, self.insecure)
        self.store = Store(self.state_dir)
        try:
            self.worker = Worker(self.store, self.config)
            app = create_app(self.config, self.store, self.worker, *keys)
            self._sync = app.state.sync
            self._sock = _bind(self.config.host, self.config.port)
            self.port = self._sock.getsockname()[1]
            self._server = uvicorn.Server(_uvicorn_config(app, self.config, timeout_graceful_shutdown=2,
                                                          lifespan="off"))
            self.worker.start()
            sock = self._sock
            self._thread = threading.Thread(
                target=lambda: self._server.run(sockets=[sock]) if self._server else None,
                name="localapi-http",
                daemon=True,
            )
            self._thread.start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = self.base_url.removesuffix("/v1") + "/healthz"
        while time.monotonic() < deadline:
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the local Batch API server exited during start-up")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"the local Batch API server did not answer within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Stop the worker and the HTTP server, release the state_dir."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._server = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.port = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def announce(base_url: str) -> None:
    """Print where the server listens (an `on_ready` for `serve`)."""
    print(f"batchyard local Batch API listening on {base_url}", file=sys.stderr, flush=True)


def serve(
    config: LocalApiConfig,
    state_dir: str | Path,
    on_ready: Callable[[str], None] | None = None,
    *,
    insecure: bool = False,
) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM (for `batchyard serve`).

    `on_ready(base_url)` is called once the socket is bound (with the real port when
    `config.port == 0`); `announce` prints that URL on stderr.

    Raises:
        ServeRefused: unusable keys, or a non-loopback host without keys and not `insecure`.
        ServeError: the address cannot be bound.
        StateDirLockedError: another server holds `state_dir`.
    """
    keys = _check_access(config, insecure)
    store = Store(state_dir)
    worker = Worker(store, config)
    try:
        app = create_app(config, store, worker, *keys)
        sock = _bind(config.host, config.port)
        server = uvicorn.Server(_uvicorn_config(app, config, timeout_graceful_shutdown=5))
        worker.start()
        if on_ready is not None:
            on_ready(f"http://{_url_host(config.host)}:{sock.getsockname()[1]}/v1")
        server.run(sockets=[sock])
    finally:
        worker.stop()
        store.close()


class ServerProcess:
    """`batchyard serve` in a subprocess (it outlives a pipeline that is killed, like OpenAI does).

    `ServerProcess(state_dir, env={...}).start()` picks a free loopback port, waits until the
    server answers (any HTTP answer, 401 included) and exposes `base_url`; `stop()` sends
    SIGTERM. `args` are extra `serve` options; `output` (a path) keeps the server's stdout and
    stderr. Used by the crash tests, the soak benchmark and the `serve` tests.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        output: str | Path | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        self.output = Path(output) if output is not None else None
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self) -> ServerProcess:
        """Start the subprocess and wait until `/v1/batches` answers."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        cmd = [sys.executable, "-m", "batchyard.cli", "serve", "--port", str(port),
               "--state-dir", str(self.state_dir), *self.args]
        with open(self.output, "ab") if self.output else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=out)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"batchyard serve exited with code {code} during start-up")
            try:
                httpx.get(f"{self.base_url}/batches", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        raise RuntimeError(f"batchyard serve did not answer within {self.timeout_s} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in 10 s."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
