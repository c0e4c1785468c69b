"""What a run command opens before its run, all at once: the staging root and the stores.

Besides its settings, a run needs its staging root, the document store (the MongoDB stand-in
opens its file; a MongoDB server must answer) and Milvus (Milvus Lite starts a child process, a
few seconds; a server must answer), and, under Prefect, the Prefect API (a temporary server
takes 5-25 s to come up, see `orchestration.temporary`). Opened one after another, each only
when a stage first touches it, their start-up times add up, and an unreachable one is found
mid-run, after the run was created, as a traceback from its driver.

`Launch(settings).start()` opens them together on background threads while the command goes on
(the Prefect API starts meanwhile too); `ready()` waits for them and raises the first failure
as one line that names the component, its address and the cause (`batchyard.infra`). The
context stays open for the whole command: the local engine runs in it, and a Prefect flow of
this process is given it (`flows.provided_context`), so a command starts Milvus Lite, the
stand-in and the embedded Batch API server once, however many runs it makes (the demo makes
two, and queries Milvus in between).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from batchyard.infra import InfraError, describe

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.settings import Settings

log = logging.getLogger(__name__)


class Launch:
    """The run context of one command, its clients opened in the background."""

    def __init__(self, settings: Settings, *, sinks: bool = True, provider: bool = True) -> None:
        from batchyard.context import RunContext

        self.settings = settings
        self.ctx: RunContext = RunContext(settings)
        self.sinks, self.provider = sinks, provider
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="batchyard-launch")
        self._steps: dict[str, Future[Any]] = {}

    def start(self) -> Launch:
        """Open the staging root and, when `sinks`, the document store and Milvus (and, when
        `provider`, the embedded Batch API server) on background threads."""
        ctx = self.ctx
        self._steps["staging"] = self._pool.submit(lambda: ctx.staging.list(""))
        # several drivers of one run take turns with the stand-in: they open it for each load
        shared_standin = self.settings.mongo.uri is None and self.settings.run.partitions_per_driver is not None
        if self.sinks and not shared_standin:
            self._steps["document store"] = self._pool.submit(lambda: ctx.store.ping())
        if self.sinks:
            self._steps["Milvus"] = self._pool.submit(lambda: ctx.milvus.list_collections())
        if self.provider and self.settings.provider.embedded:
            self._steps["Batch API"] = self._pool.submit(lambda: ctx.api)
        return self

    def pending(self) -> list[str]:
        """What is still being opened."""
        return [name for name, f in self._steps.items() if not f.done()]

    def check(self) -> None:
        """Raise the first failure among the steps done so far (does not wait)."""
        for name, future in self._steps.items():
            if future.done() and future.exception() is not None:
                self._raise(name, future.exception())

    def ready(self) -> RunContext:
        """The context, once everything is open; raises the first failure, described in one line."""
        for name, future in self._steps.items():
            exc = future.exception()
            if exc is not None:
                self._raise(name, exc)
        return self.ctx

    def _raise(self, name: str, exc: BaseException | None) -> None:
        assert exc is not None
        found = describe(exc, self.settings)
        if found is not None:
            raise InfraError(found) from exc
        log.debug("opening the %s failed", name, exc_info=exc)
        raise exc

    def settle(self) -> None:
        """Wait for every background step, failed or not (before an exit: nothing more to log)."""
        for future in self._steps.values():
            future.exception()

    def close(self) -> None:
        """Close every client (waits for the background steps first)."""
        self._pool.shutdown(wait=True)
        self.ctx.close()

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
