"""Logging: batchyard's own lines in, known noise out, in the CLI and in Prefect flows alike.

- `configure_logging(level)`: the CLI's handler for batchyard's loggers (the only one that
  prints them: they do not propagate to the root logger, where Prefect's console handler would
  print each warning a second time), and the noise filters; `terminal_level()` is the level it
  set. A flow run still gets batchyard's INFO records (its handler sits on the same logger).
- `OneLineErrors`: without `--verbose`, Prefect's flow and task run loggers keep the one line
  of a batchyard error (whose message names what failed) but not its traceback: the CLI
  prints that error as one line anyway.
- `silence_noise()`: loggers of libraries that are chatty or print spurious tracebacks:
  Milvus Lite answers a client probe (`AllocTimestamp`) it does not implement, and gRPC logs
  that as an ERROR with a traceback on every load; HTTP client request lines; uvicorn access
  lines; Prefect's telemetry notice and events-worker warnings.
"""

from __future__ import annotations

import logging

_terminal: dict[str, int] = {}

NOISY = {
    "httpx": logging.WARNING,
    "httpx2": logging.WARNING,
    "openai": logging.WARNING,
    "uvicorn": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "uvicorn.error": logging.WARNING,
    "pymilvus": logging.WARNING,
    "grpc._server": logging.CRITICAL,
    "botocore": logging.WARNING,
    "aiobotocore": logging.WARNING,
    "s3fs": logging.WARNING,
    "fsspec": logging.WARNING,
    "werkzeug": logging.WARNING,
    "prefect.events.clients": logging.CRITICAL,
    "EventsWorker": logging.ERROR,  # Prefect's queue services log under their class name
    "prefect._internal.events.worker": logging.CRITICAL,
    "prefect.server.services.telemetry": logging.CRITICAL,
    "prefect.telemetry": logging.CRITICAL,
}


PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class OneLineErrors(logging.Filter):
    """Drops the traceback of a record whose exception is a `BatchyardError` (the line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from batchyard.errors import BatchyardError

        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if isinstance(exc, BatchyardError):
            record.exc_info, record.exc_text = None, None
        return True


def silence_noise() -> None:
    """Raise the level of the known noisy loggers (idempotent)."""
    for name, level in NOISY.items():
        logging.getLogger(name).setLevel(level)


def terminal_level() -> int | None:
    """The level `configure_logging` set for this process (None: it was not called)."""
    return _terminal.get("level")


FOR_PREFECT_ONLY = {"terminal": False}
"""`extra=` of a record meant for a flow run's logs, not for the terminal of the CLI that started
it, which prints the same facts its own way (the summary's failures, the audit's differences)."""


class _NotForTerminal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "terminal", True) is not False


def configure_logging(level: int = logging.WARNING) -> None:
    """One stderr handler for batchyard's loggers at `level`, and the noise silenced."""
    silence_noise()
    _terminal["level"] = level
    root = logging.getLogger("batchyard")
    root.setLevel(level)
    # printed by this handler only: Prefect's root console handler would print every warning again
    root.propagate = False
    if not any(getattr(h, "_batchyard", False) for h in root.handlers):
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_NotForTerminal())
        handler._batchyard = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        if getattr(handler, "_batchyard", False):
            handler.setLevel(level)
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, OneLineErrors)]:
            logger.removeFilter(f)
        if level > logging.INFO:  # --verbose keeps the tracebacks
            logger.addFilter(OneLineErrors())
