"""Loading results parts into the sinks, and the load receipts that say it happened."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchyard.crash import crashpoint
from batchyard.runner.engine import trim_memory
from batchyard.storage.runs import PartitionStore, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job

    Progress = Callable[[dict[str, Any]], None]


def unloaded_parts(part: PartitionStore) -> list[str]:
    """Results parts of a partition that have no load receipt yet."""
    done = {n[: -len(".json")] for n in part.staging.list(part.rel("loads"), ".json")}
    return [n for n in part.parts("results") if n not in done]


def load_parts(ctx: RunContext, job: Job, parts: Sequence[PartitionStore]) -> list[dict[str, Any]]:
    """Load every results part that has no receipt; receipts are written after the sinks are
    saved, so a crash anywhere in between only means loading that part again (upserts).

    A receipt's `rows` is the units the part loaded (each goes to every sink of the job); the
    per-sink receipts under `sinks` keep their own rows.
    """
    loaded: list[tuple[PartitionStore, str, int, list[dict[str, Any]]]] = []
    for part in parts:
        for name in unloaded_parts(part):
            frame = part.staging.read_parquet(part.rel("results", f"{name}.parquet"))
            receipts = job.load_part(part, frame) if frame.height else []
            units = frame[job.result_key].n_unique() if frame.height else 0
            loaded.append((part, name, units, receipts))
    if not loaded:
        return []
    ctx.store.save()
    trim_memory()
    crashpoint("before_receipt")
    out = []
    for part, name, units, receipts in loaded:
        receipt = {"part": name, "partition": part.pid, "rows": units, "sinks": receipts, "at": utcnow().isoformat()}
        part.staging.write_json(part.rel("loads", f"{name}.json"), receipt)
        out.append(receipt)
    return out


def receipts(part: PartitionStore) -> list[dict[str, Any]]:
    st = part.staging
    return [dict(st.read_json(part.rel("loads", n))) for n in st.list(part.rel("loads"), ".json")]


def sink_totals(receipts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sink (milvus, mongo.marks, mongo.results): rows, upserted, modified, imported (Milvus
    bulk import), parts."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for receipt in receipts:
        for r in receipt.get("sinks", []):
            t = totals.setdefault((r["sink"], r["target"]), {"sink": r["sink"], "target": r["target"], "rows": 0,
                                                             "upserted": 0, "modified": 0, "imported": 0,
                                                             "parts": 0})
            for k in ("rows", "upserted", "modified", "imported"):
                t[k] += int(r.get(k, 0))
            t["parts"] += 1
    return list(totals.values())


