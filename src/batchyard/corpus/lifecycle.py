"""What a run does with its scope's corpus state: select and claim, prune, materialize partition
keys, finish (cursors, counts, retry set) or release (cancel).

The runner calls these at fixed points; everything here is idempotent, so a crash and a resume
repeat a step harmlessly.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.corpus.claims import Claims, held_by_others
from batchyard.corpus.detect import Detection, detect, target_hash
from batchyard.corpus.keys import buckets_for, company_of, key_expr
from batchyard.corpus.store import Corpus
from batchyard.stages.partition import plan_bins, unmatched_targets
from batchyard.storage.runs import driver_id, utcnow

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.runs import PartitionStore, RunStore

log = logging.getLogger(__name__)

RETRY = pl.Schema({"chunk_id": pl.String, "id_kind": pl.String, "company_id": pl.String, "unit_id": pl.String})
HISTORY = 20
PAYLOAD_KEYS = 100


# --------------------------------------------------------------------------- selecting


def select_units(ctx: RunContext, job: Job, run: RunStore, corpus: Corpus, *, dry: bool) -> dict[str, Any]:
    """Detect what to read, fix the bins, and register the run as open (call under the lease).

    Records in run.json: `detection` (so a resumed snapshot reads exactly the same), `partitions`
    (the bins, with their keys), `corpus` (the prune decision, the retry parts consumed).
    """
    s = ctx.settings
    registry = corpus.companies()
    retry = corpus.read_retry()
    det = detect(ctx.store.chunks, job.targets, s.mongo.fields, registry, s.corpus, full_scan=s.corpus.full_scan,
                 version=job.selection_version, retry=retry)
    new = {c: {"buckets": buckets_for(n, s.run.partition_max_chunks)} for c, n in det.counts.items()
           if "buckets" not in registry.get(c, {})}
    if new:
        registry = corpus.update_companies(new)
    buckets = {c: int(registry.get(c, {}).get("buckets", 1)) for c in det.counts}
    specs = plan_bins(det.candidates, job.targets.company_ids, buckets, s.run.partition_max_chunks)
    by_document = {(c, d): n for c, d, n in det.by_document}
    unmatched = unmatched_targets(job.targets, det.counts, by_document)
    for target in unmatched:
        log.warning("target %s matched no chunk in %s", target, ctx.store.label)
    retry_rows = retry.filter(pl.col("company_id").is_in(list(det.since))) if retry.height else RETRY.to_frame()
    if retry_rows.height:
        run.staging.write_parquet(run.rel("retry.parquet"), retry_rows)
    for company, why in sorted(det.reasons.items()):
        log.info("corpus %s: %s: %s", corpus.scope, company, why)
    info = run.update_run(
        partitions=[spec.to_json() for spec in specs], detection=det.to_json(), targets_unmatched=unmatched,
        document_store=ctx.store.label,
        corpus={"scope": corpus.scope, "prune": s.corpus.prune and not dry, "full_scan": s.corpus.full_scan,
                "retry_runs": corpus.retry_parts()},
    )
    if not dry:
        corpus.register(run.run_id, job=job.name)
    return info


def claims_for(ctx: RunContext, job: Job, run: RunStore, corpus: Corpus) -> Claims:
    """The units other open runs of the scope hold now."""
    return held_by_others(corpus, exclude=run.run_id, ttl_s=ctx.settings.corpus.claim_ttl_s,
                          unit_ids=job.unit_ids, result_key=job.result_key)


def prune_run(ctx: RunContext, job: Job, run: RunStore, det: Detection, *, dry: bool) -> dict[str, Any]:
    """Prune after a complete snapshot, when the run's recorded decision says so."""
    from batchyard.corpus.prune import prune

    decided = run.read_run().get("corpus", {}).get("prune", False)
    if dry or not decided:
        return {}
    selected = selected_companies(run)
    new = new_units(ctx, job, run)
    registry = Corpus(ctx.staging, run.read_run()["corpus"]["scope"]).companies()
    targets = {tg.company_id: tg for tg in job.targets.companies}
    extra = []
    for c, n in selected.items():
        if c in det.reconcile or c not in targets:
            continue
        recorded = registry.get(c, {}).get("counts", {}).get(target_hash(targets[c]))
        # edits keep their ids; a chunk that vanished while others came shows as a count that did
        # not grow by the new chunks the run selected (a re-chunked document)
        if recorded is None or det.counts.get(c, 0) - recorded != new.get(c, 0):
            extra.append(c)
            det.reasons.setdefault(c, f"reconciled: {n} chunk(s) selected, {new.get(c, 0)} new, count "
                                      f"{recorded} -> {det.counts.get(c, 0)}")
    det.reconcile = [*det.reconcile, *extra]
    receipt = prune(ctx, job, run, det)
    if receipt.get("pruned") and not receipt.get("keys_recorded"):
        record_prune(ctx, job, run)
        receipt["keys_recorded"] = True
    run.update_run(pruned=receipt)
    return receipt


def record_prune(ctx: RunContext, job: Job, run: RunStore) -> None:
    """A prune changes what the sink holds for the keys it touched: each gets a new version."""
    from batchyard.corpus.keys import bucket_of, key_of
    from batchyard.corpus.prune import pruned_units

    pruned = pruned_units(run)
    corpus = Corpus(ctx.staging, run.read_run()["corpus"]["scope"])
    registry = corpus.companies()
    document_units = job.kind == "inference" and job.task.unit == "document"  # type: ignore[attr-defined]
    by_key: dict[str, list[str]] = {}
    for unit, company in pruned.select("unit_id", "company_id").iter_rows():
        n = int(registry.get(company, {}).get("buckets", 1))
        basis = unit
        if document_units:
            from urllib.parse import unquote

            basis = "/".join(unquote(p) for p in unit.split("/", 1))
        by_key.setdefault(key_of(company, bucket_of(basis, n), n), []).append(unit)
    now = utcnow().isoformat()
    for key, units in by_key.items():
        prev = corpus.read_partition(key) or {"key": key, "company": company_of(key), "scope": corpus.scope}
        blob = "\n".join([prev.get("data_version", ""), "pruned", *sorted(units)])
        latest: dict[str, Any] = {"run_id": run.run_id, "bin": None, "materialized_at": now, "units": len(units), "results": 0,
                  "failures": 0, "pruned": len(units), "cancelled": False, "checks_failed": []}
        corpus.write_partition(key, {**prev, "data_version": hashlib.sha256(blob.encode()).hexdigest(),
                                     "latest": latest,
                                     "history": [*prev.get("history", []), {"run_id": run.run_id, "materialized_at": now,
                                                                            "results": 0, "failures": 0,
                                                                            "pruned": len(units)}][-HISTORY:]})


def new_units(ctx: RunContext, job: Job, run: RunStore) -> dict[str, int]:
    """Per company, the units this run selected that the sink never had: chunks without a mark for
    the space (embeddings; recorded once in `<run>/new_units.parquet`, before the loads mark them),
    or units without a result of any version (inference)."""
    st = run.staging
    rel = run.rel("new_units.parquet")
    if not st.exists(rel):
        rels = [p.rel("chunks", n) for p in run.partitions() for n in st.list(p.rel("chunks"), ".parquet")]
        frame = pl.DataFrame(schema={"unit_id": pl.String, "company_id": pl.String})
        if rels:
            chunks = st.scan_parquet(rels).select("chunk_id", "id_kind", "company_id", "document_id").collect()
            chunks = chunks.with_columns(unit_id=job.unit_ids(chunks)).unique("unit_id")
            seen = _units_with_sink_record(ctx, job, chunks)
            frame = chunks.filter(~pl.col("unit_id").is_in(list(seen))).select("unit_id", "company_id")
        st.write_parquet(rel, frame)
    counts = st.read_parquet(rel).group_by("company_id").len()
    return {str(c): int(n) for c, n in counts.iter_rows()}


def _units_with_sink_record(ctx: RunContext, job: Job, chunks: pl.DataFrame) -> set[str]:
    """The units among `chunks` the sink already holds a record of (a mark, or any result)."""
    from batchyard.stages.snapshot import mark_path, mongo_id

    out: set[str] = set()
    if job.kind == "embeddings":
        fields = ctx.settings.mongo.fields
        path = mark_path(fields, job.emb.space)  # type: ignore[attr-defined]
        rows = chunks.select("chunk_id", "id_kind").rows()
        for i in range(0, len(rows), 1_000):
            ids = [mongo_id(c, k or "str") for c, k in rows[i : i + 1_000]]
            for doc in ctx.store.chunks.find({fields.chunk_id: {"$in": ids}, path: {"$exists": True}},
                                             {fields.chunk_id: 1}):
                out.add(str(doc.get("_id") if fields.chunk_id == "_id" else doc.get(fields.chunk_id)))
        return out
    coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
    units = chunks["unit_id"].unique().to_list()
    for i in range(0, len(units), 1_000):
        out.update(str(d["unit_id"]) for d in coll.find({"task": job.task.name,  # type: ignore[attr-defined]
                                                         "unit_id": {"$in": units[i : i + 1_000]}}, {"unit_id": 1}))
    return out


def selected_companies(run: RunStore) -> dict[str, int]:
    """Chunks the run's snapshot selected, per company."""
    st = run.staging
    rels = [p.rel("chunks", n) for p in run.partitions() for n in st.list(p.rel("chunks"), ".parquet")]
    if not rels:
        return {}
    counts = st.scan_parquet(rels).group_by("company_id").len().collect()
    return {str(c): int(n) for c, n in counts.iter_rows()}


# --------------------------------------------------------------------------- partition keys


def unit_keys(job: Job, part: PartitionStore) -> pl.DataFrame:
    """Each unit of a bin with its partition key: unit_id, company_id, pkey."""
    st = part.staging
    rels = [part.rel("chunks", n) for n in st.list(part.rel("chunks"), ".parquet")]
    if not rels:
        return pl.DataFrame(schema={"unit_id": pl.String, "company_id": pl.String, "pkey": pl.String})
    chunks = st.scan_parquet(rels).select("chunk_id", "company_id", "document_id").collect()
    buckets = {str(c): int(n) for c, n in part.read_state().get("buckets", {}).items()}
    keyed = chunks.with_columns(unit_id=job.unit_ids(chunks), pkey=key_expr(job.bucket_key(), buckets))
    return keyed.select("unit_id", "company_id", "pkey").unique("unit_id", keep="first")


def _content(job: Job, results: pl.DataFrame) -> pl.DataFrame:
    """unit_id and what a unit's result says (the text hash of a vector, a parsed answer)."""
    key = job.result_key
    col = "text_sha256" if job.kind == "embeddings" else "parsed"
    if results.height == 0 or col not in results.columns:
        return pl.DataFrame(schema={"unit_id": pl.String, "content": pl.String})
    return results.select(pl.col(key).cast(pl.String).alias("unit_id"), pl.col(col).cast(pl.String).alias("content"))


def materialize_keys(ctx: RunContext, job: Job, part: PartitionStore, *, cancelled: bool) -> dict[str, Any]:
    """Record the latest materialization of every key the bin had units of.

    A key's data version chains: sha256 over its previous version, the code versions and the
    sorted (unit, content) pairs this run settled for it. Returns the bin's per-key figures (at
    most `PAYLOAD_KEYS` listed), for the asset events.
    """
    from batchyard.assets import ASSETS, read_manifest

    st = part.staging
    keys = unit_keys(job, part)
    if keys.height == 0:
        return {"keys": 0}
    results = [st.read_parquet(part.rel("results", f"{n}.parquet")) for n in part.parts("results")]
    results = [r for r in results if r.height]
    content = pl.concat([_content(job, r) for r in results]) if results else _content(job, pl.DataFrame())
    fails = [st.read_parquet(part.rel("failures", f"{n}.parquet")).select("unit_id", "code") for n in part.parts("failures")]
    failures = pl.concat(fails) if fails else pl.DataFrame(schema={"unit_id": pl.String, "code": pl.String})
    ok = keys.join(content, on="unit_id", how="inner")
    bad = keys.join(failures, on="unit_id", how="inner")
    lines = ok.select("pkey", pl.concat_str(["unit_id", "content"], separator=":").alias("line"))
    digests = {str(k): "\n".join(sorted(v)) for k, v in lines.group_by("pkey").agg("line").iter_rows()}
    n_ok = {str(k): int(n) for k, n in ok.group_by("pkey").len().iter_rows()}
    n_bad = {str(k): int(n) for k, n in bad.group_by("pkey").len().iter_rows()}
    n_units = {str(k): int(n) for k, n in keys.group_by("pkey").len().iter_rows()}
    manifests = {a.key: read_manifest(part, a.key) or {} for a in ASSETS}
    code = {a.key: a.code_version for a in ASSETS}
    checks_failed = sorted({c["name"] for m in manifests.values() for c in m.get("checks", []) if not c.get("passed")})
    corpus = Corpus.of(ctx, job)
    now = utcnow().isoformat()
    figures: dict[str, Any] = {}
    for key in sorted(n_units):
        prev = corpus.read_partition(key) or {}
        blob = "\n".join([prev.get("data_version", ""), repr(sorted(code.items())), job.selection_version,
                          digests.get(key, "")])
        version = hashlib.sha256(blob.encode()).hexdigest()
        latest = {"run_id": part.run_id, "bin": part.pid, "materialized_at": now, "units": n_units[key],
                  "results": n_ok.get(key, 0), "failures": n_bad.get(key, 0), "cancelled": cancelled,
                  "checks_failed": checks_failed}
        record = {
            "key": key, "company": company_of(key), "scope": corpus.scope, "data_version": version,
            "code_version": job.selection_version or code["results"], "latest": latest,
            "assets": {a: {"run_id": part.run_id, "bin": part.pid, "data_version": m.get("data_version"),
                           "materialized_at": m.get("materialized_at"),
                           "checks_failed": [c["name"] for c in m.get("checks", []) if not c.get("passed")]}
                       for a, m in manifests.items() if m},
            "history": [*prev.get("history", []), {k: latest[k] for k in ("run_id", "materialized_at", "results",
                                                                          "failures")}][-HISTORY:],
        }
        corpus.write_partition(key, record)
        if len(figures) < PAYLOAD_KEYS:
            figures[key] = {"data_version": version[:12], "results": latest["results"], "failures": latest["failures"]}
    return {"keys": len(n_units), "partition_keys": figures, "more_keys": max(0, len(n_units) - len(figures))}


# --------------------------------------------------------------------------- finishing


def _lower_bounds(corpus: Corpus, exclude: str) -> dict[str, str | None]:
    """Per company, the lowest query bound among the other open runs (None: one reads it in full)."""
    from batchyard.storage.runs import RunStore

    out: dict[str, str | None] = {}
    for reg in corpus.open_runs():
        if reg["run_id"] == exclude:
            continue
        other = RunStore(corpus.staging, reg["job"], reg["run_id"])
        if not other.exists():
            continue
        det = other.read_run().get("detection")
        if not det:
            continue
        for c in det.get("full", []):
            out[c] = None
        for c, bound in det.get("since", {}).items():
            if c in out and out[c] is None:
                continue
            out[c] = bound if c not in out else min(str(out[c]), bound)
    return out


def finish_run(ctx: RunContext, job: Job, run: RunStore, *, cancelled: bool) -> dict[str, Any]:
    """A run ended: a finished one moves the cursors, records counts and its retry set; either
    way it stops claiming. Returns the target figures for the summary."""
    info = run.read_run()
    meta = info.get("corpus")
    if meta is None:  # a run staged before the corpus state existed
        return {}
    corpus = Corpus(ctx.staging, meta["scope"])
    det = Detection.from_json(info["detection"])
    if cancelled:
        corpus.unregister(run.run_id)
        return {}
    owner = driver_id()
    reconciled = set((info.get("pruned") or {}).get("reconciled", [])) if meta.get("prune") else set()
    touched = sorted(set(selected_companies(run)) | reconciled)
    known = corpus.companies()
    # what the sink holds per company follows from what this run added, where the registry knows it
    # from before and nothing was reconciled; a reconciled or new company is counted in the sink
    measure = [c for c in touched if c in reconciled or "rows" not in known.get(c, {}).get("sink_rows", {})]
    targets_now = target_rows(ctx, job, touched=measure) if touched else {}
    if touched:
        added = _added_per_company(job, run)
        pruned = _pruned_per_company(run)
        for c in touched:
            if c not in measure:
                targets_now["by_company"][c] = (int(known[c]["sink_rows"]["rows"]) + added.get(c, 0)
                                                - pruned.get(c, 0))
    with corpus.lease(owner, wait_s=ctx.settings.corpus.select_wait_s):
        bounds = _lower_bounds(corpus, run.run_id)
        changes: dict[str, dict[str, Any]] = {}
        registry = corpus.companies()
        for target in job.targets.companies:
            c = target.company_id
            if c not in det.counts:
                continue
            th = target_hash(target)
            entry = registry.get(c, {})
            cursors = dict(entry.get("cursors", {}))
            # the cursor moves to the newest change seen at detection, never past the lower bound of
            # another open run (a run cancelled later leaves its window to be read again)
            if det.high_water is not None and not (c in bounds and bounds[c] is None):
                bound = bounds.get(c)
                safe = det.safe_bound or det.high_water
                cursors[th] = safe if bound is None else _iso_min(safe, bound)
            full_at = dict(entry.get("full_at", {}))
            if c in det.full:
                full_at[th] = det.started_at
            counts = {**entry.get("counts", {}), th: det.counts[c]}
            sink = {**entry.get("sink_rows", {}), **({"rows": targets_now["by_company"][c]}
                                                      if c in targets_now.get("by_company", {}) else {})}
            reconciled_at = dict(entry.get("reconciled_at", {}))
            if c in reconciled:
                reconciled_at[th] = det.started_at
            changes[c] = {"cursors": cursors, "full_at": full_at, "counts": counts, "version": det.version,
                          "sink_rows": sink, "last_run": run.run_id, "reconciled_at": reconciled_at}
        corpus.update_companies(changes)
        corpus.write_retry(run.run_id, retry_rows(job, run))
        corpus.drop_retry([r for r in meta.get("retry_runs", []) if r != run.run_id])
        corpus.unregister(run.run_id)
    return targets_now


def _added_per_company(job: Job, run: RunStore) -> dict[str, int]:
    """Units new to the sink (see `new_units`) that this run loaded, per company."""
    st = run.staging
    rel = run.rel("new_units.parquet")
    if not st.exists(rel):
        return {}
    new = st.read_parquet(rel)
    loaded = []
    for part in run.partitions():
        rels = [part.rel("results", f"{n}.parquet") for n in part.parts("results")]
        rels = [r for r in rels if st.count_rows(r)]
        if rels:
            loaded.append(st.scan_parquet(rels).select(pl.col(job.result_key).cast(pl.String).alias("unit_id")).collect())
    if not loaded:
        return {}
    got = new.join(pl.concat(loaded).unique(), on="unit_id", how="semi").group_by("company_id").len()
    return {str(c): int(n) for c, n in got.iter_rows()}


def _pruned_per_company(run: RunStore) -> dict[str, int]:
    from batchyard.corpus.prune import pruned_units

    got = pruned_units(run).group_by("company_id").len()
    return {str(c): int(n) for c, n in got.iter_rows()}


def retry_rows(job: Job, run: RunStore) -> pl.DataFrame:
    """Chunks of the units this run failed in its batches (they are read again next time)."""
    st = run.staging
    frames = []
    for part in run.partitions():
        names = [n for n in part.parts("failures") if not n.startswith(("snapshot-", "duplicates", "plan"))]
        if not names:
            continue
        failed = pl.concat([st.read_parquet(part.rel("failures", f"{n}.parquet")).select("unit_id") for n in names])
        rels = [part.rel("chunks", n) for n in st.list(part.rel("chunks"), ".parquet")]
        if not rels or failed.height == 0:
            continue
        chunks = st.scan_parquet(rels).select("chunk_id", "id_kind", "company_id", "document_id").collect()
        chunks = chunks.with_columns(unit_id=job.unit_ids(chunks))
        frames.append(chunks.join(failed.unique(), on="unit_id", how="semi").select(RETRY.names()))
    return pl.concat(frames) if frames else RETRY.to_frame()


def release_run(run: RunStore) -> None:
    """A run was cancelled (or discarded): it claims nothing any more."""
    meta = run.read_run().get("corpus")
    if meta:
        Corpus(run.staging, meta["scope"]).unregister(run.run_id)


def reregister(run: RunStore) -> None:
    """A cancelled or dry run goes on: its selection is a claim again, and it will finish anew."""
    info = run.read_run()
    meta = info.get("corpus")
    if meta:
        Corpus(run.staging, meta["scope"]).register(run.run_id, job=info["job"])
        if meta.get("finished_at"):
            run.update_run(corpus={k: v for k, v in meta.items() if k not in ("finished_at", "targets")})


def target_rows(ctx: RunContext, job: Job, *, touched: list[str]) -> dict[str, Any]:
    """What the target collection holds now: rows in total and per touched company (counted once)."""
    from batchyard.corpus.prune import held_units

    targets = [t for t in job.targets.companies if t.company_id in set(touched)]
    by: dict[str, int] = {}
    for i in range(0, len(targets), 500):
        by.update({c: len(ids) for c, ids in held_units(ctx, job, targets[i : i + 500]).items()})
    if job.kind == "embeddings":
        from batchyard.clients.milvus import count

        client = ctx.milvus
        name = job.collection  # type: ignore[attr-defined]
        total = count(client, name) if client.has_collection(name) else 0
        return {"target": name, "rows": total, "by_company": by}
    coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
    base = {"task": job.task.name, "task_version": job.task_version, "deleted_at": None}  # type: ignore[attr-defined]
    return {"target": job.results_collection, "rows": int(coll.count_documents(base)),  # type: ignore[attr-defined]
            "by_company": by}


def _iso_min(a: str, b: str) -> str:
    return a if datetime.fromisoformat(a) <= datetime.fromisoformat(b) else b
