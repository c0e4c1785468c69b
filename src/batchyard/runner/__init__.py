"""Run a job through every stage, partition by partition, resumably; the same code under Prefect
or plain Python.

```
create_run ─▶ snapshot ─▶ plan ─▶ drive (rounds) ─▶ finish
  run.json     partitions,   per partition   poll (one list call) · download ended batches ·
               chunk parts,  (mappable:      collect (mappable: parse, join, follow-ups) ·
               duplicates    CPU only)       load new results parts · submit · finalize
```

Every step records its progress in staging (run.json, partition.json, the ledger, load
receipts), so `resume` picks up wherever a crash, a cancel or a Ctrl-C left the run. Results
are loaded into the sinks as each shard attempt is collected, so a run whose tail is still
retrying already serves the finished vectors.

An `Engine` runs the CPU-heavy steps (plan per partition, collect per shard attempt): a thread
pool in plain Python (`LocalEngine`), or Prefect task runs, on threads or on Dask (see
`batchyard.orchestration`). The I/O steps (Batch API calls, sink writes) always run in the
driving process: Milvus Lite and the MongoDB stand-in allow one process.

The package, by responsibility:

| module | what |
|---|---|
| `engine.py` | `Engine` (how steps execute), `LocalEngine`, memory and timing bookkeeping |
| `phases.py` | create, snapshot, plan, and the dry run that stops after planning |
| `driver.py` | phase `batches`: the driver's rounds over its leased partitions |
| `loads.py` | loading results parts into the sinks; load receipts |
| `summary.py` | finish: the run's summary, cost, exit code, status tables |
| `control.py` | whole runs: execute, continue, cancel, reopen, resume, re-materialize |

Callers use `from batchyard import runner` and the names re-exported here. Asset status across
runs lives with the corpus state (`batchyard.corpus.status`).
"""

from batchyard.corpus.status import asset_status
from batchyard.runner.control import (
    REMATERIALIZE_FROM,
    STOPPED_STATES,
    cancel,
    continue_run,
    describe_state,
    execute,
    job_for_run,
    recording_stop,
    rematerialize,
    reopen,
    resume,
)
from batchyard.runner.driver import (
    STEPS,
    collect_one,
    drive,
    materialize_partition,
    poll_intervals,
    settled,
)
from batchyard.runner.engine import (
    LEASE_TTL_MIN_S,
    PHASES,
    Engine,
    LocalEngine,
    add_timings,
    peak_rss_mb,
    trim_memory,
)
from batchyard.runner.loads import load_parts, unloaded_parts
from batchyard.runner.phases import (
    choose_lane,
    create_run,
    dry_run,
    plan,
    plan_estimate,
    plan_one,
    prepare,
    snapshot,
)
from batchyard.runner.summary import (
    delete_remote_files,
    exit_code,
    failures_frame,
    finish,
    partition_table,
    plan_cost_of,
    results_frame,
    run_summary,
)
from batchyard.storage.runs import find_run

__all__ = [
    "LEASE_TTL_MIN_S", "PHASES", "REMATERIALIZE_FROM", "STEPS", "STOPPED_STATES", "Engine", "LocalEngine",
    "add_timings", "asset_status", "cancel", "choose_lane", "collect_one", "continue_run", "create_run",
    "delete_remote_files", "describe_state", "drive", "dry_run", "execute", "exit_code", "failures_frame",
    "find_run", "finish", "job_for_run", "load_parts", "materialize_partition", "partition_table", "peak_rss_mb",
    "plan", "plan_cost_of", "plan_estimate", "plan_one", "poll_intervals", "prepare", "recording_stop",
    "rematerialize", "reopen", "results_frame", "resume", "run_summary", "settled", "snapshot", "trim_memory",
    "unloaded_parts",
]
