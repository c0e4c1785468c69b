"""batchyard's errors: one base class, terminal vs transient markers, structured attributes.

Callers decide retry by marker: `TransientError` may succeed if tried again (429, 5xx, a
network blip); `TerminalError` will not (bad key, malformed input, unknown model). Constructors
take structured values and build the message themselves; messages never carry secrets.
"""

from __future__ import annotations

from typing import Any


class BatchyardError(Exception):
    """Base of every batchyard error."""

    def attrs(self) -> dict[str, Any]:
        """Public attributes, for logs and reports."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class TerminalError(BatchyardError):
    """Marker: retrying will not help."""


class TransientError(BatchyardError):
    """Marker: retrying later may succeed."""


class ConfigError(TerminalError, ValueError):
    """A setting or input file is invalid."""


class TargetsError(ConfigError):
    """The targets file is missing or malformed."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"targets file {path}: {reason}")


class ApiTerminalError(TerminalError):
    """The Batch API rejected a call in a way retrying cannot fix."""

    def __init__(self, operation: str, status: int | None, message: str) -> None:
        self.operation = operation
        self.status = status
        super().__init__(f"{operation} failed (HTTP {status}): {message}")


class ApiTransientError(TransientError):
    """The Batch API failed a call after every retry, but the failure is transient."""

    def __init__(self, operation: str, status: int | None, message: str) -> None:
        self.operation = operation
        self.status = status
        super().__init__(f"{operation} failed after retries (HTTP {status}): {message}")


class LedgerError(TerminalError):
    """A shard ledger record is missing, corrupt, or asked for an illegal transition."""

    def __init__(self, shard: str, reason: str) -> None:
        self.shard = shard
        self.reason = reason
        super().__init__(f"shard {shard}: {reason}")


def in_shard(exc: BatchyardError, run_id: str, shard: str) -> BatchyardError:
    """`exc`, its message now naming the run and the shard it failed on (type and attributes
    kept, so callers still tell terminal from transient and read `status`)."""
    prefix = f"run {run_id}, shard {shard}: "
    text = str(exc)
    if not text.startswith(prefix):
        exc.args = (prefix + text.removeprefix(f"shard {shard}: "),)  # a LedgerError names the shard
    return exc


class RunNotFound(TerminalError, FileNotFoundError):
    """No run with that id exists in the staging root."""

    def __init__(self, run_id: str, root: str) -> None:
        self.run_id = run_id
        self.root = root
        super().__init__(f"run {run_id!r} not found under {root}")


class TaskNotFound(ConfigError, KeyError):
    """No inference task with that name is registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown task {name!r}; known tasks: {', '.join(known) or 'none'}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class RunBusy(TransientError):
    """Another live process is driving this run (its lease is fresh)."""

    def __init__(self, run_id: str, owner: str, heartbeat_at: str) -> None:
        self.run_id = run_id
        self.owner = owner
        self.heartbeat_at = heartbeat_at
        super().__init__(
            f"run {run_id} is being driven by {owner} (last heartbeat {heartbeat_at}); "
            "wait for it, or stop that process first"
        )
