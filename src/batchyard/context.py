"""RunContext: the settings, staging area and lazily opened clients one run needs.

Clients open on first use and close with the context. With no API key configured, the batch
provider is the local Batch API server started in-process (state under the staging root), so
everything runs offline; it is reached over HTTP through the `openai` SDK like any provider,
with a random key made for this process (the port is reachable by every local user).

Local state (the embedded server's files and batches, the MongoDB stand-in, Milvus Lite) lives
in `staging.local_dir()`: the staging root itself when it is a directory, and
`./.batchyard/s3/<bucket>/<prefix>/` when the root is on S3 (see `Staging.local_dir`). With an
S3 root only the staged run files are shared; that local state stays on the machine that ran.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchyard.clients.batch_api import BatchApi
from batchyard.storage.staging import Staging

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from batchyard.clients.mongo import DocumentStore
    from batchyard.localapi.runner import LocalServer
    from batchyard.settings import Settings

log = logging.getLogger(__name__)


class RunContext:
    """Everything a stage needs besides its own inputs."""

    def __init__(self, settings: Settings, *, staging: Staging | None = None) -> None:
        self.settings = settings
        self.staging = staging or Staging.from_settings(settings.staging)
        self._api: BatchApi | None = None
        self._server: LocalServer | None = None
        self._store: DocumentStore | None = None
        self._milvus: MilvusClient | None = None

    # batch provider

    @property
    def api(self) -> BatchApi:
        """The Batch API client (starting the embedded server when no key is set)."""
        if self._api is None:
            provider = self.settings.provider
            if provider.embedded:
                from batchyard.localapi.embedded import start_or_attach, take_over

                local = provider.local
                state_dir = local.state_dir or str(self.staging.local_dir(".localapi"))
                embedded = start_or_attach(local, state_dir)
                self._server = embedded.server
                self._api = BatchApi.connect(provider, base_url=embedded.base_url, api_key=embedded.key)

                def follow(lost: str) -> tuple[str, str]:
                    moved = take_over(local, state_dir, lost)
                    if moved.server is not None:
                        self._server = moved.server
                    return moved.base_url, moved.key

                self._api.reconnect = follow
            else:
                self._api = BatchApi.connect(provider)
        return self._api

    @property
    def provider_label(self) -> str:
        """Where requests go, for reports (never with a key), by the configured lane mode."""
        mode = self.settings.lane.mode
        return self.provider_label_for({"batch", "realtime"} if mode == "auto" else {mode})

    def provider_label_for(self, lanes: set[str]) -> str:
        """Where requests of `lanes` (batch, realtime) went: the Batch API, the real-time
        endpoints, or both, on the embedded server or at the provider's URL."""
        p = self.settings.provider
        apis = " and ".join(name for lane, name in (("batch", "Batch API"), ("realtime", "real-time endpoints"))
                            if lane in lanes) or "Batch API"
        if p.embedded:
            return f"local server (embedded, in-process): {apis}"
        return f"{apis} at {p.base_url or 'https://api.openai.com/v1'}"

    # document store

    @property
    def store(self) -> DocumentStore:
        """MongoDB, or the persisted stand-in when no URI is configured."""
        if self._store is None:
            from batchyard.clients.mongo import open_document_store

            self._store = open_document_store(
                self.settings.mongo, standin_dir=str(self.staging.local_dir(".mongo-standin"))
            )
        return self._store

    @property
    def page_size(self) -> int:
        """Chunks per snapshot page (`mongo.page_size`); the stand-in answers `_id` pages from its
        indexes, so it pages like a server."""
        return self.settings.mongo.page_size

    def yield_store(self) -> bool:
        """Close the stand-in now if another process waits for it (two runs of one project directory
        take turns with it); the next use reopens it. Returns whether it was closed."""
        if self._store is not None and self._store.wanted():
            self.release_store()
            return True
        return False

    def release_store(self) -> None:
        """Close the document store now (a stand-in is saved and unlocked); the next use reopens it."""
        if self._store is not None:
            self._store.close()
            self._store = None

    # vector store

    @property
    def milvus(self) -> MilvusClient:
        """Milvus (Milvus Lite under the staging root by default)."""
        if self._milvus is None:
            from batchyard.clients.milvus import open_vector_store

            # Milvus Lite is a local directory: under a local root, or under the S3 root's
            # local_dir (`./.batchyard/s3/<bucket>/<prefix>/milvus.db`), never on S3 itself
            default = str(self.staging.local_dir() / "milvus.db")
            self._milvus = open_vector_store(self.settings.milvus, default_path=default)
        return self._milvus

    def close(self) -> None:
        """Close every client that was opened (saving the MongoDB stand-in)."""
        unregister(self)
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._server is not None:
            from batchyard.localapi.embedded import unpublish

            unpublish(self._server.state_dir)
            self._server.stop()
            self._server = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = None

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class RunRef:
    """A picklable pointer to a run and the settings it runs with (what a remote task gets).

    `token` names the `RunContext` registered in the process that created the reference;
    another process (a Dask worker) rebuilds an equivalent context from `profile` and
    `overrides` instead. Clients are never shipped: each process opens its own.
    """

    job: str
    run_id: str
    token: str
    profile: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.job, self.run_id, self.token))


_CONTEXTS: dict[str, RunContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def register(ctx: RunContext, *, profile: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    """Register a context in this process; returns the token a `RunRef` carries."""
    token = getattr(ctx, "_token", None)
    if token is None:
        token = secrets.token_hex(8)
        ctx._token = token  # type: ignore[attr-defined]
        ctx._ref_settings = (profile, dict(overrides or {}))  # type: ignore[attr-defined]
    with _CONTEXTS_LOCK:
        _CONTEXTS[token] = ctx
    return str(token)


def unregister(ctx: RunContext) -> None:
    """Forget a context (when it closes)."""
    token = getattr(ctx, "_token", None)
    with _CONTEXTS_LOCK:
        if token is not None:
            _CONTEXTS.pop(token, None)


def run_ref(ctx: RunContext, job: str, run_id: str) -> RunRef:
    """A reference to a run of this (registered) context."""
    token = register(ctx)
    profile, overrides = getattr(ctx, "_ref_settings", (None, {}))
    return RunRef(job=job, run_id=run_id, token=token, profile=profile, overrides=overrides)


def context_for(ref: RunRef) -> RunContext:
    """The context of a reference: the registered one in this process, else one rebuilt from
    the reference's profile and overrides (kept for later tasks of the same run)."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(ref.token)
        if ctx is None:
            from batchyard.settings import load_settings

            ctx = RunContext(load_settings(ref.profile, **ref.overrides))
            ctx._token = ref.token  # type: ignore[attr-defined]
            ctx._ref_settings = (ref.profile, ref.overrides)  # type: ignore[attr-defined]
            _CONTEXTS[ref.token] = ctx
        return ctx
