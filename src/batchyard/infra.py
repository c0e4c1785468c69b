"""Infrastructure failures in one line: which component, at which address (no secret), and why.

A run touches five services besides its own code: the Prefect API, the staging root on S3,
Milvus, MongoDB and the Batch API provider. When one of them cannot be reached, its client
raises an error from deep inside its driver (gRPC, botocore, pymongo, httpx) whose message is
long (pymongo appends its whole topology description) and whose traceback fills a screen.
`describe(exc, settings)` walks the exception's chain and, when one of them comes from such a
client, names the component, its address with any credentials masked, and the shortest cause
the driver gave. The CLI prints that one line (exit 1); the run records it as `failed: <cause>`.

Pure logic: it reads exception types by module and name, so no driver is imported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchyard.settings import Settings

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def mask_url(text: str) -> str:
    """`text` with the `user:password@` of every URL in it replaced by `***@`."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


@dataclass(frozen=True)
class InfraFailure:
    """A service that could not be reached, or that this process cannot use as configured."""

    component: str
    address: str
    cause: str
    problem: str = "is unreachable"

    def __str__(self) -> str:
        return f"{self.component} at {self.address} {self.problem}: {self.cause}"


class InfraError(Exception):
    """An infrastructure failure found before or outside a driver's own error (one line)."""

    def __init__(self, failure: InfraFailure) -> None:
        self.failure = failure
        super().__init__(str(failure))


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts, each once; not the context of an error raised
    `from None` (it stands on its own: its message already says what failed)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        context = None if cur.__suppress_context__ else cur.__context__
        todo += [e for e in (cur.__cause__, context) if e is not None]


def _module(exc: BaseException) -> str:
    return type(exc).__module__ or ""


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _first_line(text: str, limit: int = 240) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _mongo_cause(exc: BaseException) -> str:
    """pymongo's message without its configured timeouts and topology description, and how long
    server selection waited (`mongo.server_selection_timeout_s`)."""
    full = str(exc)
    text = full.split(" (configured timeouts", 1)[0].split(", Timeout:", 1)[0]
    text = text.split(", Topology Description:", 1)[0]
    # "host:port: [Errno 111] Connection refused" -> the reason, per server
    parts = [p.split(": ", 1)[-1] for p in text.split(",") if p.strip()]
    cause = "; ".join(dict.fromkeys(p.strip() for p in parts))
    waited = re.search(r"Timeout: ([0-9.]+)s", full)
    if waited:
        cause += f" (no server answered within {float(waited.group(1)):g} s: mongo.server_selection_timeout_s)"
    return _first_line(cause, limit=320)


def _milvus_cause(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    if "Fail connecting to server" in message:
        return "no connection (server unavailable or wrong address)"
    details = getattr(exc, "details", None)
    if callable(details):  # a grpc.RpcError
        return _first_line(str(details()))
    return _first_line(message)


def _s3_cause(exc: BaseException) -> str:
    inner = getattr(exc, "kwargs", {}).get("error")
    if inner is not None:
        return _first_line(str(inner).rsplit(": ", 1)[-1])
    return _first_line(str(exc))


def _addresses(settings: Settings | None) -> dict[str, str]:
    """Where each component is, as settings name it (secrets masked)."""
    if settings is None:
        return {}
    from batchyard.clients.mongo import redact_uri

    mongo = settings.mongo.uri
    out = {
        "MongoDB": redact_uri(mongo.get_secret_value()) if mongo is not None else "the local stand-in",
        "Milvus": mask_url(settings.milvus.uri) if settings.milvus.uri else "Milvus Lite (local)",
        "S3": mask_url(settings.staging.s3_endpoint_url or "AWS") + f" ({settings.staging.root})",
        "Batch API": mask_url(settings.provider.base_url or "https://api.openai.com/v1"),
    }
    return out


def describe(exc: BaseException, settings: Settings | None = None) -> InfraFailure | None:
    """The component that could not be reached, if `exc` (or its chain) says one could not."""
    where = _addresses(settings)
    for e in chain(exc):
        module, names = _module(e), _names(e)
        if isinstance(e, InfraError):
            return e.failure
        if module.startswith("pymongo") and names & {"ConnectionFailure", "ServerSelectionTimeoutError",
                                                     "NetworkTimeout", "AutoReconnect"}:
            return InfraFailure("MongoDB", where.get("MongoDB", "the configured URI"), _mongo_cause(e))
        if type(e).__name__ == "DocumentStoreError" and "not reachable" in str(e):
            return InfraFailure("MongoDB", where.get("MongoDB", "the configured URI"),
                                _mongo_cause(Exception(str(e).split("not reachable: ", 1)[-1])))
        if module.startswith("pymilvus") and ("Fail connecting" in str(e) or "ConnectionNotExist" in names):
            return InfraFailure("Milvus", where.get("Milvus", "the configured URI"), _milvus_cause(e))
        if module.startswith("grpc") and "UNAVAILABLE" in str(getattr(e, "code", lambda: "")()):
            return InfraFailure("Milvus", where.get("Milvus", "the configured URI"), _milvus_cause(e))
        if module.startswith(("botocore", "aiobotocore")) and names & {
                "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"}:
            return InfraFailure("S3", where.get("S3", "the configured endpoint"), _s3_cause(e))
        if module.startswith(("botocore", "aiobotocore")) and "NoCredentialsError" in names:
            return InfraFailure("S3", where.get("S3", "the configured endpoint"),
                                "set BATCHYARD_STAGING__S3_ACCESS_KEY_ID and BATCHYARD_STAGING__S3_SECRET_ACCESS_KEY "
                                "(or the AWS_* variables)", problem="has no credentials")
        if module.startswith("httpx") and names & {"ConnectError", "ConnectTimeout"}:  # Prefect's client
            request = getattr(e, "_request", None)
            url = str(request.url).split("/api/", 1)[0] + "/api" if request is not None else "PREFECT_API_URL"
            return InfraFailure("Prefect API", mask_url(url), _first_line(str(e)))
        if module.startswith("openai") and "APIConnectionError" in names:
            return InfraFailure("Batch API", where.get("Batch API", "the configured URL"),
                                _first_line(str(e.__cause__ or e)))
        if isinstance(e, RuntimeError) and str(e).startswith("Failed to reach API at "):
            url = str(e)[len("Failed to reach API at "):].strip()
            return InfraFailure("Prefect API", mask_url(url.rstrip("/")), _prefect_cause(e))
    return None


def _prefect_cause(exc: BaseException) -> str:
    for e in chain(exc):
        if e is not exc and str(e).strip():
            return _first_line(str(e))
    return "no answer"


def one_line(exc: BaseException, settings: Settings | None = None) -> str:
    """The one line an operator reads for `exc`: the infrastructure failure it is, else its own
    first line (type name when empty), credentials in URLs masked."""
    found = describe(exc, settings)
    if found is not None:
        return mask_url(str(found))
    text = str(exc).strip()
    return mask_url(_first_line(text) if text else type(exc).__name__)
