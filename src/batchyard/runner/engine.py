"""How a run's steps execute (`Engine`: plain Python or Prefect), and the memory and timing
bookkeeping every stage shares."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from batchyard.storage.runs import RunStore

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job

    Progress = Callable[[dict[str, Any]], None]


T = TypeVar("T")

PHASES = ("snapshot", "plan", "batches", "done")
LEASE_TTL_MIN_S = 120.0
class Engine(Protocol):
    """Runs the steps of a run.

    `map` runs a mappable CPU step over items, possibly in other processes: `plan` (items:
    partition ids) and `collect` (items: (partition id, shard-attempt name) pairs); one result
    per item, in order. `run` runs an I/O step of a round (`track`, `load`, `submit`) once, in
    this process (under Prefect: one task run per call, whatever the number of shards).
    """

    def map(self, step: str, items: Sequence[Any]) -> list[Any]: ...

    def run(self, step: str, fn: Callable[[], T]) -> T: ...


class LocalEngine:
    """The plain-Python engine: the steps in this process, one after another."""

    def __init__(self, ctx: RunContext, job: Job, run: RunStore) -> None:
        self.ctx, self.job, self.store = ctx, job, run

    def map(self, step: str, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        from batchyard.runner.driver import STEPS

        fn = STEPS[step]

        def one(item: Any) -> Any:
            args = item if isinstance(item, tuple) else (item,)
            return fn(self.ctx, self.job, self.store, *args)

        # one at a time: memory stays bounded by a partition (plan) or a shard attempt (collect).
        # Threads would not add cores: the tokenizer and the JSON decoder hold the GIL, and
        # token counting already uses every core through its own process pool.
        out = [one(item) for item in items]
        trim_memory()
        return out

    def run(self, step: str, fn: Callable[[], T]) -> T:
        return fn()


def trim_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them otherwise): a long run
    that works partition after partition then stays at the size of one."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_timings(run: RunStore, raised: dict[str, float] | None = None, **seconds: float) -> None:
    """Add seconds spent per stage to run.json's `timings` (they accumulate across resumes).

    `raised`: the process's peak RSS (MB) at the end of each stage that raised it, kept in
    `peak_rss_mb`, so a run says which stage set its memory high-water mark.
    """
    info = run.read_run()
    timings = dict(info.get("timings", {}))
    for stage, s in seconds.items():
        timings[stage] = round(timings.get(stage, 0.0) + s, 3)
    peaks = dict(info.get("peak_rss_mb", {}))
    for stage, mb in (raised or {}).items():
        peaks[stage] = round(max(peaks.get(stage, 0.0), mb), 1)
    run.update_run(timings=timings, peak_rss_mb=peaks)


def emit(on_progress: Progress | None, stage: str, completed: int, total: int | None, **extra: Any) -> None:
    if on_progress is not None:
        on_progress({"stage": stage, "completed": completed, "total": total, **extra})

