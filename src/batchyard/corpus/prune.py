"""Pruning: the sinks follow the source.

For each company the detection marked for reconciliation, the ids its sink holds (within the
targeted documents) are compared with the ids the source holds that are still valid:

- embeddings: vectors in Milvus whose chunk no longer exists in the targeted documents, or whose
  chunk this run's snapshot rejected (its text is now empty, say), are deleted; where such a
  chunk still exists in MongoDB (moved out of the targeted documents, or now invalid) its mark
  for the space is unset, so it is selected again once it is valid and targeted;
- inference: results of the task (any version) whose unit no longer exists are flagged
  (`deleted_at`, `deleted_by_run`) or removed, as `inference.on_deleted` (or the task) says.

The ids to prune are staged first (`<run>/prune/<batch>.parquet`), then the sink is changed,
then `<run>/prune/receipt.json` is written: a crash anywhere prunes again on resume (deletes by
id are idempotent). Pruning only ever follows a complete snapshot.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl
from bson import ObjectId

from batchyard.crash import crashpoint
from batchyard.stages.snapshot import get_path, iter_id_pages, mark_path

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.corpus.detect import Detection
    from batchyard.jobs.base import Job
    from batchyard.storage.runs import RunStore
    from batchyard.targets import CompanyTarget

log = logging.getLogger(__name__)
# Milvus Lite answers without a session timestamp; pymilvus' iterator falls back to a client-side
# one and warns about it on every call
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)

PRUNED = pl.Schema({"unit_id": pl.String, "company_id": pl.String, "reason": pl.String})
_BATCH = 1_000
_COMPANIES = 500  # company targets reconciled per pass (one source query, one Milvus iterator)


def _lookup_ids(chunk_id: str) -> list[Any]:
    """The MongoDB ids a stored chunk id may have come from (a string, an ObjectId, an int)."""
    out: list[Any] = [chunk_id]
    if len(chunk_id) == 24:
        with contextlib.suppress(Exception):  # not an ObjectId's hex form
            out.append(ObjectId(chunk_id))
    if chunk_id.lstrip("-").isdigit():
        out.append(int(chunk_id))
    return out


def rejected_units(run: RunStore) -> set[str]:
    """Units this run's snapshot rejected, and chunk ids that repeat in the source."""
    st = run.staging
    rels = [p.rel("failures", n) for p in run.partitions() for n in st.list(p.rel("failures"), ".parquet")
            if n.startswith(("snapshot-", "duplicates"))]
    rels += [run.rel("failures", n) for n in st.list(run.rel("failures"), ".parquet")]
    if not rels:
        return set()
    return set(st.scan_parquet(rels).select("unit_id").collect()["unit_id"].to_list())


def source_units(ctx: RunContext, job: Job, targets: list[CompanyTarget]) -> dict[str, set[str]]:
    """The unit ids the source holds for each company target (ids only; no text is read), in
    one pass over the companies' chunks."""
    fields = ctx.settings.mongo.fields
    projection = {fields.company: 1, fields.document: 1}
    if fields.chunk_id != "_id":
        projection[fields.chunk_id] = 1
    out: dict[str, set[str]] = {t.company_id: set() for t in targets}
    wanted = {t.company_id: (None if t.documents is None else set(t.documents)) for t in targets}
    document_units = job.kind == "inference" and job.task.unit == "document"  # type: ignore[attr-defined]
    if document_units:
        from batchyard.tasks.units import document_unit_id
    query = {"$or": [target_filter(t, fields) for t in targets]} if len(targets) > 1 else target_filter(targets[0], fields)
    for docs in iter_id_pages(ctx.store.chunks, query, projection, ctx.page_size):
        for doc in docs:
            c, d = get_path(doc, fields.company), get_path(doc, fields.document)
            if c not in wanted or (wanted[c] is not None and d not in wanted[c]):  # type: ignore[operator]
                continue
            if document_units:
                if isinstance(d, str) and d:
                    out[c].add(document_unit_id(c, d))
                continue
            raw = doc.get("_id") if fields.chunk_id == "_id" else get_path(doc, fields.chunk_id)
            if raw is not None:
                out[c].add(str(raw))
    return out


def target_filter(target: CompanyTarget, fields: Any) -> dict[str, Any]:
    """The source filter of one company target."""
    query: dict[str, Any] = {fields.company: target.company_id}
    if target.documents is not None:
        query[fields.document] = {"$in": list(target.documents)}
    return query


def milvus_expr(targets: list[CompanyTarget]) -> str:
    """A Milvus filter for the vectors of these company targets."""
    whole = [t.company_id for t in targets if t.documents is None]
    clauses = [f"company_id in {json.dumps(whole)}"] if whole else []
    clauses += [f"(company_id == {json.dumps(t.company_id)} and document_id in {json.dumps(list(t.documents))})"
                for t in targets if t.documents is not None]
    return " or ".join(clauses) if clauses else "company_id in []"


def milvus_units(client: Any, collection: str, targets: list[CompanyTarget]) -> dict[str, set[str]]:
    """The chunk ids Milvus holds for each company target, in one pass (a query iterator)."""
    out: dict[str, set[str]] = {t.company_id: set() for t in targets}
    it = client.query_iterator(collection, batch_size=16_384, filter=milvus_expr(targets),
                               output_fields=["chunk_id", "company_id"], consistency_level="Strong")
    try:
        while True:
            rows = it.next()
            if not rows:
                break
            for r in rows:
                out.setdefault(str(r["company_id"]), set()).add(str(r["chunk_id"]))
    finally:
        it.close()
    return out


def result_units(coll: Any, task: str, targets: list[CompanyTarget]) -> dict[str, set[str]]:
    """The units with a (not deleted) result of the task, per company target."""
    out: dict[str, set[str]] = {t.company_id: set() for t in targets}
    for target in targets:
        query: dict[str, Any] = {"task": task, "company_id": target.company_id, "deleted_at": None}
        if target.documents is not None:
            query["document_id"] = {"$in": list(target.documents)}
        out[target.company_id] = {str(d["unit_id"]) for d in coll.find(query, {"unit_id": 1, "_id": 0})}
    return out


def held_units(ctx: RunContext, job: Job, targets: list[CompanyTarget]) -> dict[str, set[str]]:
    """What the job's sink holds for each company target."""
    if job.kind == "embeddings":
        client = ctx.milvus
        name = job.collection  # type: ignore[attr-defined]
        if not client.has_collection(name):
            return {t.company_id: set() for t in targets}
        client.load_collection(name)
        return milvus_units(client, name, targets)
    return result_units(ctx.store.collection(job.results_collection), job.task.name, targets)  # type: ignore[attr-defined]


def rejected_in_sink(ctx: RunContext, job: Job, rejected: set[str]) -> pl.DataFrame:
    """Units this run's snapshot rejected (their text is now empty, say) that the sink still
    holds from when they were valid, whatever company they belong to."""
    ids = sorted(rejected)
    rows: list[tuple[str, str, str]] = []
    if job.kind == "embeddings":
        client = ctx.milvus
        name = job.collection  # type: ignore[attr-defined]
        if not client.has_collection(name):
            return PRUNED.to_frame()
        client.load_collection(name)
        for i in range(0, len(ids), _BATCH):
            for hit in client.get(name, ids=ids[i : i + _BATCH], output_fields=["company_id"]):
                rows.append((str(hit["chunk_id"]), str(hit["company_id"]), "rejected"))
    else:
        coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
        for i in range(0, len(ids), _BATCH):
            query = {"task": job.task.name, "unit_id": {"$in": ids[i : i + _BATCH]}, "deleted_at": None}  # type: ignore[attr-defined]
            rows += [(str(d["unit_id"]), str(d.get("company_id")), "rejected") for d in coll.find(query)]
    return pl.DataFrame(rows, schema=PRUNED, orient="row").unique("unit_id")


def stale_units(ctx: RunContext, job: Job, targets: list[CompanyTarget], rejected: set[str]) -> pl.DataFrame:
    """Units the sink holds for these company targets that the source no longer has (valid)."""
    source = source_units(ctx, job, targets)
    held = held_units(ctx, job, targets)
    rows: list[tuple[str, str, str]] = []
    for target in targets:
        c = target.company_id
        have, src = held.get(c, set()), source.get(c, set())
        rows += [(u, c, "deleted") for u in sorted(have - src)]
        rows += [(u, c, "rejected") for u in sorted(have & src & rejected)]
    return pl.DataFrame(rows, schema=PRUNED, orient="row")


def prune(ctx: RunContext, job: Job, run: RunStore, det: Detection) -> dict[str, Any]:
    """Reconcile the sinks of the detection's companies with the source; returns the receipt."""
    st = run.staging
    receipt_rel = run.rel("prune", "receipt.json")
    if st.exists(receipt_rel):
        return dict(st.read_json(receipt_rel))
    targets = {t.company_id: t for t in job.targets.companies}
    rejected = rejected_units(run)
    rel = run.rel("prune", "rejected.parquet")
    if rejected and not st.exists(rel):
        st.write_parquet(rel, rejected_in_sink(ctx, job, rejected))
    todo = [targets[c] for c in det.reconcile if c in targets]
    for i in range(0, len(todo), _COMPANIES):
        batch = todo[i : i + _COMPANIES]
        rel = run.rel("prune", f"{i // _COMPANIES:05d}.parquet")
        if not st.exists(rel):
            st.write_parquet(rel, stale_units(ctx, job, batch, rejected))
    pruned = pruned_units(run)
    marks_unset = _apply(ctx, job, run, pruned)
    by_reason = {str(r): int(n) for r, n in pruned.group_by("reason").len().rows()} if pruned.height else {}
    receipt = {"companies": len(det.reconcile), "reconciled": sorted(det.reconcile), "pruned": pruned.height,
               "by_reason": by_reason,
               "marks_unset": marks_unset, "sink": _sink_label(ctx, job),
               "at": datetime.now(UTC).isoformat()}
    st.write_json(receipt_rel, receipt)
    if pruned.height:
        log.warning("run %s pruned %d unit(s) the source no longer has (%s) from %s", run.run_id, pruned.height,
                    ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())), receipt["sink"])
    return receipt


def pruned_units(run: RunStore) -> pl.DataFrame:
    """Every unit a run's prune staged (unit_id, company_id, reason)."""
    st = run.staging
    rels = [run.rel("prune", n) for n in st.list(run.rel("prune"), ".parquet")]
    if not rels:
        return PRUNED.to_frame()
    return pl.concat([st.read_parquet(r) for r in rels]).unique("unit_id", keep="first")


def _sink_label(ctx: RunContext, job: Job) -> str:
    if job.kind == "embeddings":
        return f"Milvus collection {job.collection}"  # type: ignore[attr-defined]
    return f"MongoDB collection {job.results_collection}"  # type: ignore[attr-defined]


def _apply(ctx: RunContext, job: Job, run: RunStore, pruned: pl.DataFrame) -> int:
    """Change the sinks; returns how many marks were unset (embeddings)."""
    if pruned.height == 0:
        return 0
    ids = pruned["unit_id"].to_list()
    if job.kind == "embeddings":
        client = ctx.milvus
        name = job.collection  # type: ignore[attr-defined]
        for i in range(0, len(ids), _BATCH):
            client.delete(name, ids=ids[i : i + _BATCH])
            crashpoint("during_prune")
        fields = ctx.settings.mongo.fields
        path = mark_path(fields, job.emb.space)  # type: ignore[attr-defined]
        unset = 0
        for i in range(0, len(ids), _BATCH):
            lookup = [v for u in ids[i : i + _BATCH] for v in _lookup_ids(u)]
            res = ctx.store.chunks.update_many({fields.chunk_id: {"$in": lookup}, path: {"$exists": True}},
                                               {"$unset": {path: ""}})
            unset += int(res.modified_count)
        ctx.store.save()
        return unset
    coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
    task = job.task  # type: ignore[attr-defined]
    mode = getattr(task, "on_deleted", None) or ctx.settings.inference.on_deleted
    now = datetime.now(UTC)
    for i in range(0, len(ids), _BATCH):
        query = {"task": task.name, "unit_id": {"$in": ids[i : i + _BATCH]}}
        if mode == "remove":
            coll.delete_many(query)
        else:
            coll.update_many({**query, "deleted_at": None}, {"$set": {"deleted_at": now, "deleted_by_run": run.run_id}})
        crashpoint("during_prune")
    ctx.store.save()
    return 0
