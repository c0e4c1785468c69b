"""Who may talk to the local Batch API server: Bearer keys, and where it may listen without them.

Why: `batchyard serve` is meant for other machines, and its routes hand out every uploaded shard
(the chunk texts) and every output file, and accept work. So:

- With keys configured (`provider.local.api_keys`, `provider.local.api_keys_file`), every
  request except `GET /healthz` needs `Authorization: Bearer <key>`. The check is an ASGI
  middleware in front of the whole app, so routes added later are covered without a line of
  their own. A missing or wrong key gets 401 in OpenAI's shape (`invalid_api_key`), and the
  key is never echoed, logged or kept.
- Keys are compared in constant time: the sha256 of the presented token against the sha256 of
  every configured key, always all of them, with `hmac.compare_digest`.
- Keys are tenants: what a key creates is tagged with its owner tag (`Store.owner_tag`, never
  the key), and a key sees only its own files and batches (`Principal`); others get 404, as if
  they did not exist. Admin keys (`provider.local.admin_api_keys`) see everything.
- Without keys the server only binds a loopback address; `check_bind` refuses anything else
  unless the caller explicitly accepts the risk (`batchyard serve --insecure`).
- The embedded server (started by batchyard inside a run) gets a fresh `generate_key()` key for
  the life of the process, so other local users cannot read a run's files through its port; it
  is an admin key, so a later process (a resume, with a key of its own) sees the earlier
  process's batches.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from batchyard.localapi import shapes

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from batchyard.localapi.config import LocalApiConfig

log = logging.getLogger(__name__)

KEY_MIN_CHARS = 16
OPEN_PATHS = frozenset({"/healthz"})
"""Paths answered without a key (liveness only: they reveal nothing)."""

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY_MESSAGE = (
    "Incorrect API key provided. This server accepts the keys set in provider.local.api_keys "
    "or provider.local.api_keys_file."
)


class ServeError(RuntimeError):
    """The server cannot start (the address is taken, the state_dir is in use, ...)."""


class ServeRefused(ServeError):
    """The server refuses to start as configured (unusable keys, an open bind without keys)."""


def generate_key() -> str:
    """A fresh random key (256 bits), e.g. for the embedded server of one process."""
    return "sk-local-" + secrets.token_urlsafe(32)


def _check_key(key: str, where: str) -> str:
    """The key, if usable in an HTTP header; the error names where it came from, never the key."""
    if len(key) < KEY_MIN_CHARS:
        raise ServeRefused(
            f"{where} is {len(key)} characters long; use at least {KEY_MIN_CHARS} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ServeRefused(f"{where} has spaces or characters that cannot go in an HTTP header")
    return key


def read_key_file(path: str | Path) -> list[str]:
    """The keys of a key file: one per line; blank lines and `#` comments are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ServeRefused(f"provider.local.api_keys_file {path}: cannot read it ({reason})") from None
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("provider.local.api_keys_file %s is readable by other users; chmod 600 it", path)
    keys = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_check_key(line, f"the key on line {lineno} of {path}"))
    if not keys:
        raise ServeRefused(f"provider.local.api_keys_file {path} holds no key")
    return keys


def load_api_keys(config: LocalApiConfig) -> list[str]:
    """The tenants' keys: `api_keys` plus those of `api_keys_file` (may be empty)."""
    keys = [
        _check_key(k.get_secret_value(), f"provider.local.api_keys[{i}]")
        for i, k in enumerate(config.api_keys)
    ]
    if config.api_keys_file:
        keys += read_key_file(config.api_keys_file)
    return keys


def load_admin_keys(config: LocalApiConfig) -> list[str]:
    """The admin keys (`admin_api_keys`): they see every tenant's files and batches."""
    return [
        _check_key(k.get_secret_value(), f"provider.local.admin_api_keys[{i}]")
        for i, k in enumerate(config.admin_api_keys)
    ]


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (`localhost`, 127.x, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host in ("", "*"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, keys: Sequence[str], *, insecure: bool = False) -> str | None:
    """Refuse a non-loopback `host` without keys (ServeRefused); with `insecure`, a warning instead."""
    if keys or is_loopback(host):
        return None
    if not insecure:
        raise ServeRefused(
            f"refusing to serve on {host} without API keys: set provider.local.api_keys "
            "(BATCHYARD_PROVIDER__LOCAL__API_KEYS) or provider.local.api_keys_file, "
            "bind 127.0.0.1, or pass --insecure"
        )
    return (
        f"serving on {host} without API keys (--insecure): anyone who can reach the port can "
        "read every uploaded and output file and submit batches"
    )


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the owner tag of its key, and whether that key is an admin's.

    A key sees (lists, reads, downloads, cancels, deletes) only the files and batches it owns,
    and an admin key everything; anything else is answered 404, as if it did not exist.
    """

    owner: str | None
    admin: bool = False

    def sees(self, owner: str | None) -> bool:
        """Whether this principal may see an object with that owner."""
        return self.admin or (owner is not None and owner == self.owner)


OPEN = Principal(owner=None, admin=True)
"""Every request of a server without keys (loopback only): one tenant that sees everything."""


class KeyRing:
    """The accepted keys, kept as sha256 digests only, each with the principal it stands for."""

    def __init__(self, keys: Iterable[str], admin_keys: Iterable[str] = (),
                 tag: Callable[[str], str] | None = None) -> None:
        tag = tag or (lambda key: "k-" + hashlib.sha256(key.encode()).hexdigest()[:24])
        self._entries = [(hashlib.sha256(k.encode()).digest(), Principal(tag(k))) for k in keys]
        self._entries += [(hashlib.sha256(k.encode()).digest(), Principal(tag(k), admin=True)) for k in admin_keys]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def accepts(self, token: bytes) -> Principal | None:
        """The principal of a key, or None; compares against every key, in constant time."""
        presented = hashlib.sha256(token).digest()
        found = None
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest):
                found = principal  # no early exit: the time does not say which key matched
        return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first `Authorization: Bearer <token>` header (raw ASGI headers)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


def unauthorized(message: str) -> JSONResponse:
    """OpenAI's 401 for a missing or wrong key."""
    body = shapes.error_body(message, "invalid_request_error", None, "invalid_api_key")
    return JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})


class BearerAuth:
    """ASGI middleware: every request outside OPEN_PATHS needs one of the keys."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)  # lifespan events, /healthz
            return
        token = bearer_token(scope["headers"])
        principal = self.keys.accepts(token) if token is not None else None
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation (403)
        else:
            message = MISSING_KEY_MESSAGE if token is None else WRONG_KEY_MESSAGE
            await unauthorized(message)(scope, receive, send)
