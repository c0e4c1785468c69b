"""Fewer cyclic-GC passes while a stage decodes many short-lived containers.

CPython collects generation 0 every 700 new container objects. A snapshot page of 5,000 MongoDB
documents is 10,000 new dicts, so the default runs about 15 collections per page, and every
tenth of those walks generation 1, and so on up to full passes over everything the process
holds (the stand-in's indexes, Polars frames' Python objects). On the 200k-chunk no-op run this
was a third of the snapshot (4.95 s -> 3.3 s with the thresholds below).

Reference counting still frees each page as soon as it is dropped; only cycle detection runs
less often, so memory stays bounded by what the stage holds.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BULK_THRESHOLDS = (20_000, 50, 100)

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, int, int] | None = None


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Raise the GC thresholds for the duration (nesting and threads share one raise)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(*(max(a, b) for a, b in zip(_saved, BULK_THRESHOLDS, strict=True)))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
