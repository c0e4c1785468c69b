"""Claims: the units open runs of a scope have selected and not yet settled.

A run's claim is its own staged selection: the units in its bins' chunk parts, less the units
its results and failures parts settle. Nothing else has to be written or kept in sync, and a
run resumed by another process or machine keeps its claims. A claim ends when the run finishes
(it unregisters), is cancelled, or is abandoned (no activity for `corpus.claim_ttl_s`: its
run.json and bin leases untouched that long).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.storage.runs import RunStore, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from batchyard.corpus.store import Corpus

log = logging.getLogger(__name__)

UNIT_COLUMNS = ("chunk_id", "company_id", "document_id")


@dataclass
class Claims:
    """Units held by other open runs of a scope."""

    units: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(
        schema={"unit_id": pl.String, **dict.fromkeys(UNIT_COLUMNS, pl.String), "run_id": pl.String}))
    """unit_id, one of its chunks (chunk_id, company_id, document_id) and the run holding it."""
    held: dict[str, int] = field(default_factory=dict)
    """Units each open run holds (run id -> count)."""
    abandoned: list[str] = field(default_factory=list)
    """Open runs whose claims expired (no activity for `corpus.claim_ttl_s`)."""


def last_activity(run: RunStore) -> datetime | None:
    """The newest of run.json's `updated_at` and the run's lease heartbeats."""
    times: list[str] = []
    try:
        times.append(str(run.read_run().get("updated_at", "")))
    except FileNotFoundError:
        return None
    for part in run.partitions():
        lease = part._lease.read()  # its heartbeat is the activity we want
        if lease:
            times.append(str(lease.get("heartbeat_at", "")))
    lease = run._lease.read()
    if lease:
        times.append(str(lease.get("heartbeat_at", "")))
    stamps = [datetime.fromisoformat(t) for t in times if t]
    return max(stamps) if stamps else None


def selected_units(run: RunStore, unit_ids: Callable[[pl.DataFrame], pl.Series]) -> pl.DataFrame:
    """Every unit in the run's chunk parts: unit_id, and one of its chunks (chunk_id,
    company_id, document_id), from which its partition key follows."""
    st = run.staging
    rels = [p.rel("chunks", n) for p in run.partitions() for n in st.list(p.rel("chunks"), ".parquet")]
    if not rels:
        return pl.DataFrame(schema={"unit_id": pl.String, **dict.fromkeys(UNIT_COLUMNS, pl.String)})
    chunks = st.scan_parquet(rels).select(*UNIT_COLUMNS).collect()
    return chunks.with_columns(unit_id=unit_ids(chunks)).unique("unit_id", keep="first")


def settled_units(run: RunStore, result_key: str) -> pl.DataFrame:
    """Units the run's results or failures parts settle (column unit_id)."""
    st = run.staging
    frames: list[pl.DataFrame] = []
    for part in run.partitions():
        res = [part.rel("results", f"{n}.parquet") for n in part.parts("results")]
        res = [r for r in res if st.count_rows(r)]
        if res:
            frames.append(st.scan_parquet(res).select(pl.col(result_key).alias("unit_id")).collect())
        fails = [part.rel("failures", f"{n}.parquet") for n in part.parts("failures")]
        if fails:
            frames.append(st.scan_parquet(fails).select("unit_id").collect())
    if not frames:
        return pl.DataFrame(schema={"unit_id": pl.String})
    return pl.concat(frames).unique()


def held_by_others(corpus: Corpus, *, exclude: str, ttl_s: float,
                   unit_ids: Callable[[pl.DataFrame], pl.Series], result_key: str) -> Claims:
    """What the other open runs of the scope hold now.

    Registrations of runs that are gone, finished or cancelled are cleaned up on the way.
    """
    out = Claims()
    frames: list[pl.DataFrame] = []
    now = utcnow()
    for reg in corpus.open_runs():
        run_id = reg["run_id"]
        if run_id == exclude:
            continue
        run = RunStore(corpus.staging, reg["job"], run_id)
        if not run.exists():
            corpus.unregister(run_id)
            continue
        info: dict[str, Any] = run.read_run()
        if info.get("state") in ("finished", "cancelled", "dry_run"):
            corpus.unregister(run_id)
            continue
        active = last_activity(run)
        if active is not None and (now - active).total_seconds() > ttl_s:
            log.warning("run %s has had no activity since %s: its claims are ignored (corpus.claim_ttl_s); "
                        "`batchyard cancel %s` releases them for good", run_id, active.isoformat(), run_id)
            out.abandoned.append(run_id)
            continue
        held = selected_units(run, unit_ids).join(settled_units(run, result_key), on="unit_id", how="anti")
        if held.height:
            out.held[run_id] = held.height
            frames.append(held.with_columns(run_id=pl.lit(run_id)))
    if frames:
        out.units = pl.concat(frames).unique("unit_id", keep="first")
    return out
