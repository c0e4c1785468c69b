"""Soak run: a backfill under faults and crashes ends with zero lost and zero duplicated results.

Set-up:

- a `batchyard serve` subprocess with fault injection: a per-request error rate (drawn afresh in
  every batch), one expired batch and one server-cancelled batch;
- the pipeline as a separate subprocess (`batchyard embed --engine local`), killed with SIGKILL
  at two crash points, then resumed until it finishes.

Afterwards it counts, from staging, the server and the sinks:

- lost: planned units in neither results nor failures;
- duplicated: units in both, or twice in either;
- Milvus rows beyond one per result;
- batches beyond one per shard-attempt submission.

Usage:
    python benchmarks/soak.py --chunks 100000 --error-rate 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from batchyard.localapi.runner import ServerProcess

CRASHES = ("after_create", "during_download")


def start_server(work: Path, args: argparse.Namespace) -> ServerProcess:
    return ServerProcess(work / "server", env={
        "BATCHYARD_PROVIDER__LOCAL__FAULTS__REQUEST_ERROR_RATE": str(args.error_rate),
        "BATCHYARD_PROVIDER__LOCAL__FAULTS__SEED": "17",
        "BATCHYARD_PROVIDER__LOCAL__FAULTS__EXPIRE_AFTER_REQUESTS": "3",
        "BATCHYARD_PROVIDER__LOCAL__FAULTS__EXPIRE_BATCHES": "1",
        "BATCHYARD_PROVIDER__LOCAL__FAULTS__CANCEL_AFTER_REQUESTS": "2",
        "BATCHYARD_PROVIDER__LOCAL__FAULTS__CANCEL_BATCHES": "1",
    }).start()


def pipeline_env(work: Path, url: str, args: argparse.Namespace, crash: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    env.update({
        "BATCHYARD_STAGING__ROOT": str(work / "staging"),
        "BATCHYARD_PROVIDER__BASE_URL": url,
        "BATCHYARD_PROVIDER__API_KEY": "sk-soak",
        "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.5",
        "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT",
        "BATCHYARD_EMBEDDING__DIMENSIONS": str(args.dims),
        "BATCHYARD_LIMITS__MAX_INPUTS_PER_BATCH": str(args.inputs_per_batch),
        "BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST": "100",
        "BATCHYARD_LIMITS__MAX_ATTEMPTS": "4",
    })
    if crash:
        env["BATCHYARD_CRASH_AT"] = crash
    return env


def cli(args: list[str], env: dict[str, str], cwd: Path) -> int:
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False).returncode


def count(work: Path, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Lost, duplicated and per-batch counts of the (single) run in the staging root."""
    import polars as pl

    from batchyard.clients.milvus import count as milvus_count
    from batchyard.clients.milvus import ensure_collection
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.runner import failures_frame, job_for_run, results_frame
    from batchyard.settings import Settings
    from batchyard.storage.ledger import run_records
    from batchyard.storage.runs import list_runs

    s = Settings(_env_file=None, staging={"root": str(work / "staging")},
                 provider={"base_url": url, "api_key": "sk-soak"}, milvus={"index_type": "FLAT"},
                 embedding={"dimensions": args.dims})
    with RunContext(s) as ctx:
        (run,) = list_runs(ctx.staging)
        results, failures = results_frame(run), failures_frame(run)
        planned_job = job_for_run(ctx, run)
        planned = {u for part in run.partitions() for u in planned_job.planned_units(part)["unit_id"].to_list()}
        planned |= set(failures.filter(pl.col("stage").is_in(["snapshot", "plan"]))["unit_id"].to_list())
        res, fail = results["chunk_id"].to_list(), failures["unit_id"].to_list()
        job = EmbeddingsJob(ctx, None)  # type: ignore[arg-type]
        ensure_collection(ctx.milvus, job.collection, dim=job.dims, index_type="FLAT", metric_type="COSINE")
        in_milvus = milvus_count(ctx.milvus, job.collection)
        batches = [b for b in ctx.api.client.batches.list(limit=100)
                   if (b.metadata or {}).get("batchyard_run") == run.run_id]
        keys = Counter((b.metadata["partition"], b.metadata["shard"], b.metadata["attempt"], b.metadata["submission"])
                       for b in batches)
        recs = run_records(run)
        return {
            "run_id": run.run_id,
            "chunks planned": len(planned),
            "results": len(res),
            "failures": len(fail),
            "lost": len(planned - set(res) - set(fail)),
            "duplicated": (len(res) - len(set(res))) + (len(fail) - len(set(fail))) + len(set(res) & set(fail)),
            "milvus rows": in_milvus,
            "milvus rows beyond results": in_milvus - len(set(res)),
            "batches": len(batches),
            "batches submitted twice": sum(n - 1 for n in keys.values() if n > 1),
            "shard attempts": len(recs),
            "expired batches": sum(1 for b in batches if b.status == "expired"),
            "cancelled batches": sum(1 for b in batches if b.status == "cancelled"),
            "chunks embedded on a retry (attempt > 1)": int((results["attempt"] > 1).sum()),
            "failure codes": dict(Counter(failures["code"].to_list())),
            "max attempt": int(pl.Series(results["attempt"]).max() or 0),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--error-rate", type=float, default=0.1)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--inputs-per-batch", type=int, default=5_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    console = Console()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="batchyard-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    server = start_server(work, args)
    url = server.base_url
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        assert cli(["seed", "--chunks", str(args.chunks), "--targets-out", "t.yaml"],
                   pipeline_env(work, url, args), work) == 0
        timings["seed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rc = cli(["embed", "--targets", "t.yaml", "--engine", "local"], pipeline_env(work, url, args, CRASHES[0]), work)
        console.print(f"run 1 ended with {rc} (SIGKILL at {CRASHES[0]} is {-signal.SIGKILL})")
        run_id = sorted((work / "staging" / "embeddings").iterdir())[0].name
        rc = cli(["resume", run_id, "--engine", "local"], pipeline_env(work, url, args, CRASHES[1]), work)
        console.print(f"run 2 (resume) ended with {rc} (SIGKILL at {CRASHES[1]} is {-signal.SIGKILL})")
        rc = cli(["resume", run_id, "--engine", "local"], pipeline_env(work, url, args), work)
        console.print(f"run 3 (resume) ended with {rc}")
        timings["embed (3 processes, 2 crashes)"] = time.perf_counter() - t0
        counts = count(work, url, args)
    finally:
        server.stop()
    table = Table(title=f"soak: {args.chunks:,} chunks, {args.error_rate:.0%} request errors, 1 expiry, "
                        f"1 cancel, crashes at {', '.join(CRASHES)}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in {**counts, **{f"seconds: {k}": round(v, 1) for k, v in timings.items()}}.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **counts, "seconds": timings},
                              indent=2))
    console.print(f"written to {out}")
    ok = counts["lost"] == 0 and counts["duplicated"] == 0 and counts["milvus rows beyond results"] == 0 \
        and counts["batches submitted twice"] == 0
    console.print("[green]zero lost, zero duplicated[/green]" if ok else "[red]INVARIANT BROKEN[/red]")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
