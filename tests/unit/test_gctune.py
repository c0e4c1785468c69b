"""The GC thresholds are raised for a bulk stage and restored after it, nested or threaded."""

from __future__ import annotations

import gc
import threading

from batchyard.gctune import BULK_THRESHOLDS, fewer_collections


def test_thresholds_are_raised_inside_and_restored_after_nesting_and_errors() -> None:
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold()[0] >= BULK_THRESHOLDS[0]
        with fewer_collections():
            assert gc.get_threshold()[0] >= BULK_THRESHOLDS[0]
        assert gc.get_threshold()[0] >= BULK_THRESHOLDS[0], "the inner exit keeps the outer raise"
    assert gc.get_threshold() == before
    try:
        with fewer_collections():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.get_threshold() == before


def test_overlapping_threads_restore_the_original_once_both_are_done() -> None:
    before = gc.get_threshold()
    inside, release = threading.Barrier(3), threading.Event()

    def stage() -> None:
        with fewer_collections():
            inside.wait(10)
            release.wait(10)

    threads = [threading.Thread(target=stage) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(10)
    assert gc.get_threshold()[0] >= BULK_THRESHOLDS[0]
    release.set()
    for t in threads:
        t.join(10)
    assert gc.get_threshold() == before
