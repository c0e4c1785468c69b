"""Named crash points, for crash-safety tests.

`crashpoint("after_create")` kills the process with SIGKILL when the environment variable
`BATCHYARD_CRASH_AT` names that point: no cleanup, no `finally`, exactly like a power cut.
The tests run the pipeline in a subprocess with it set, then resume without it.
"""

from __future__ import annotations

import os
import signal

CRASH_POINTS = (
    "after_snapshot",
    "after_upload",
    "after_create",
    "during_poll",
    "during_download",
    "before_collect",
    "during_load",
    "before_receipt",
)
REALTIME_CRASH_POINTS = ("during_realtime",)
PRUNE_CRASH_POINTS = ("during_prune",)
"""Inside a prune, between deleting vectors (or flagging results) and its receipt."""


def crashpoint(name: str) -> None:
    """SIGKILL this process if `BATCHYARD_CRASH_AT` equals `name`."""
    if os.environ.get("BATCHYARD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
