"""`batchyard assets`: every partition key of every scope, its latest materialization across
runs, and its state now.

A key is **fresh** when nothing says otherwise. It is **stale**, with the reasons, when:

- the source has units the job would select now (new or changed chunks, units without a
  result): read like a run reads, so it costs what a no-op run costs (the changes only, where
  the source has a change field);
- its version moved: the task version (a prompt, a schema, a model parameter) or a setting
  that shapes results (model, dimensions, truncation) differs from the latest materialization;
- its latest materialization failed a check;
- the sink no longer holds what was loaded: Milvus' count for the company against the count
  recorded when the last run of the scope finished (a cheap `count(*)` per company; a split
  company's buckets share the company's figure).

Units an open run holds are reported (`in_flight`) but do not make a key stale by themselves.
`check=True` (`batchyard assets --check`) also compares the sink with the source unit by unit:
every chunk with a current mark has its vector, and every vector its chunk.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.corpus.claims import held_by_others
from batchyard.corpus.detect import detect, selection_clause
from batchyard.corpus.keys import key_expr, keys_of
from batchyard.corpus.store import ROOT, Corpus, source_id

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job

log = logging.getLogger(__name__)

RESULT_PARAMS = ("model", "dimensions", "endpoint", "temperature", "max_output_tokens", "document_token_budget")
RESULT_LIMITS = ("max_tokens_per_input", "over_limit")


@dataclass
class KeyStatus:
    """One partition key of one scope: latest materialization and state now."""

    scope: str
    key: str
    company: str
    run_id: str | None
    materialized_at: str | None
    data_version: str | None
    results: int = 0
    failures: int = 0
    pending: int = 0
    in_flight: int = 0
    sink_rows: int | None = None
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "partition": self.key, "company": self.company, "run_id": self.run_id,
                "materialized_at": self.materialized_at, "data_version": self.data_version,
                "results": self.results, "failures": self.failures, "pending": self.pending,
                "in_flight": self.in_flight, "sink_rows": self.sink_rows,
                "status": "stale" if self.reasons else "fresh", "reasons": self.reasons}


def scopes(ctx: RunContext) -> list[str]:
    """Every scope with corpus state in the staging root that reads the configured source."""
    st = ctx.staging
    here = source_id(ctx)
    out = []
    for job in st.list_dirs(ROOT):
        for space in st.list_dirs(f"{ROOT}/{job}"):
            for source in st.list_dirs(f"{ROOT}/{job}/{space}"):
                if source == here:
                    out.append(f"{job}/{space}/{source}")
    return sorted(out)


def job_for_scope(ctx: RunContext, scope: str, companies: list[str]) -> Job | None:
    """The job a scope is about, with today's settings, over every company it knows (None:
    the scope is of another embedding space than the one configured)."""
    from batchyard.targets import CompanyTarget, Targets

    name, space, _ = scope.split("/", 2)
    targets = Targets(companies=[CompanyTarget(company_id=c) for c in companies])
    if name == "embeddings":
        from batchyard.jobs.embeddings import EmbeddingsJob

        if space != ctx.settings.embedding.space:
            return None
        return EmbeddingsJob(ctx, targets)
    from batchyard.jobs.inference import InferenceJob

    return InferenceJob(ctx, targets, name.removeprefix("inference-"))


def _drift(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = [f"{k} {recorded.get(k)!r} -> {current.get(k)!r}" for k in RESULT_PARAMS
           if k in current and k in recorded and recorded.get(k) != current.get(k)]
    rl, cl = recorded.get("limits", {}), current.get("limits", {})
    out += [f"limits.{k} {rl.get(k)!r} -> {cl.get(k)!r}" for k in RESULT_LIMITS if k in rl and rl.get(k) != cl.get(k)]
    return out


def pending_by_key(ctx: RunContext, job: Job, corpus: Corpus, buckets: dict[str, int]) -> dict[str, int]:
    """Units a run would select now, per partition key (read like a run reads; claims ignored)."""
    s = ctx.settings
    det = detect(ctx.store.chunks, job.targets, s.mongo.fields, corpus.companies(), s.corpus, full_scan=False,
                 version=job.selection_version, retry=corpus.read_retry())
    out: dict[str, int] = defaultdict(int)
    companies = [c for c in job.targets.company_ids if det.candidates.get(c)]
    for i in range(0, len(companies), 200):
        group = companies[i : i + 200]
        targets = job.targets.model_copy(update={"companies": [t for t in job.targets.companies if t.company_id in group]})
        extra = selection_clause(det, group, s.mongo.fields, [])
        for chunks, _ in job.source_pages(targets, extra):
            if chunks.height == 0:
                continue
            keyed = chunks.with_columns(unit_id=job.unit_ids(chunks), pkey=key_expr(job.bucket_key(), buckets))
            for key, n in keyed.group_by("pkey").agg(pl.col("unit_id").n_unique()).iter_rows():
                out[str(key)] += int(n)
    return dict(out)


def _sink_counts(ctx: RunContext, job: Job, companies: list[str]) -> dict[str, int]:
    """What the sink holds per company now (one pass over the sink per 500 companies)."""
    from batchyard.corpus.prune import held_units

    targets = [t for t in job.targets.companies if t.company_id in set(companies)]
    out: dict[str, int] = {}
    for i in range(0, len(targets), 500):
        out.update({c: len(ids) for c, ids in held_units(ctx, job, targets[i : i + 500]).items()})
    return out


def scope_status(ctx: RunContext, scope: str, *, check: bool = False) -> list[KeyStatus]:
    """Every partition key of one scope."""
    corpus = Corpus(ctx.staging, scope)
    registry = corpus.companies()
    records = corpus.partitions()
    job = job_for_scope(ctx, scope, sorted(registry))
    if job is None:
        return [KeyStatus(scope, key, rec["company"], rec["latest"]["run_id"], rec["latest"]["materialized_at"],
                          rec["data_version"], reasons=["not the configured embedding space"])
                for key, rec in sorted(records.items())]
    buckets = {c: int(e.get("buckets", 1)) for c, e in registry.items()}
    pending = pending_by_key(ctx, job, corpus, buckets)
    claims = held_by_others(corpus, exclude="", ttl_s=ctx.settings.corpus.claim_ttl_s, unit_ids=job.unit_ids,
                            result_key=job.result_key)
    sinks = _sink_counts(ctx, job, sorted(registry))
    current = job.params()
    out: list[KeyStatus] = []
    for company in sorted(registry):
        entry = registry[company]
        for key in keys_of(company, buckets.get(company, 1)):
            rec = records.get(key)
            latest = (rec or {}).get("latest", {})
            row = KeyStatus(scope, key, company, latest.get("run_id"), latest.get("materialized_at"),
                            (rec or {}).get("data_version"), results=int(latest.get("results", 0)),
                            failures=int(latest.get("failures", 0)), pending=pending.get(key, 0),
                            sink_rows=sinks.get(company))
            if rec is None and not row.pending:
                continue  # a key that never had a unit (a bucket of a small delta)
            if rec is None:
                row.reasons.append("never materialized")
            recorded_version = (rec or {}).get("code_version")
            if recorded_version and job.selection_version and recorded_version != job.selection_version:
                # every unit is pending then: the version is the reason
                row.reasons.append(f"task version changed: {recorded_version} -> {job.selection_version}")
            elif row.pending:
                row.reasons.append(f"{row.pending} new or changed unit(s) in the source")
            if latest.get("checks_failed"):
                row.reasons.append(f"failed check(s): {', '.join(latest['checks_failed'])}")
            recorded = entry.get("sink_rows", {}).get("rows")
            if recorded is not None and row.sink_rows is not None and row.sink_rows != recorded:
                what = "vector(s)" if job.kind == "embeddings" else "result(s)"
                gap = recorded - row.sink_rows
                row.reasons.append(f"{abs(gap)} {what} {'missing from' if gap > 0 else 'more in'} the sink since "
                                   f"run {entry.get('last_run')} (company {company}: {row.sink_rows} of {recorded})")
            out.append(row)
    drift = _drift(_latest_params(ctx, records), current)
    for row in out:
        row.reasons += [f"settings changed: {d}" for d in drift]
    if claims.held:
        held = claims.units.with_columns(pkey=key_expr(job.bucket_key(), buckets))
        by_key = {str(k): int(n) for k, n in held.group_by("pkey").len().iter_rows()}
        for row in out:
            row.in_flight = by_key.get(row.key, 0)
    if check:
        for company, problems in check_sinks(ctx, job, sorted(registry)).items():
            for row in out:
                if row.company == company:
                    row.reasons += problems
    return out


def _latest_params(ctx: RunContext, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from batchyard.storage.runs import find_run

    run_ids = sorted({r["latest"]["run_id"] for r in records.values() if r.get("latest")})
    if not run_ids:
        return {}
    try:
        return dict(find_run(ctx.staging, run_ids[-1]).read_run().get("params", {}))
    except FileNotFoundError:
        return {}


def check_sinks(ctx: RunContext, job: Job, companies: list[str]) -> dict[str, list[str]]:
    """Unit by unit, per company: every chunk with a current mark has its vector in Milvus, and
    every vector a chunk in the source (embeddings); every result a unit (inference)."""
    from batchyard.corpus.prune import held_units, source_units
    from batchyard.stages.snapshot import get_path, iter_id_pages, mark_path, text_sha256

    out: dict[str, list[str]] = {}
    fields = ctx.settings.mongo.fields
    targets = [t for t in job.targets.companies if t.company_id in set(companies)]
    for i in range(0, len(targets), 500):
        batch = targets[i : i + 500]
        held = held_units(ctx, job, batch)
        source = source_units(ctx, job, batch)
        marked: dict[str, set[str]] = defaultdict(set)
        if job.kind == "embeddings":
            path = mark_path(fields, job.emb.space)  # type: ignore[attr-defined]
            proj = {fields.text: 1, path: 1, fields.chunk_id: 1, fields.company: 1}
            query = {fields.company: {"$in": [t.company_id for t in batch]}}
            for docs in iter_id_pages(ctx.store.chunks, query, proj, ctx.page_size):
                for doc in docs:
                    text = get_path(doc, fields.text)
                    sha = get_path(doc, f"{path}.text_sha256")
                    if isinstance(text, str) and sha is not None and sha == _sha(text_sha256, text):
                        cid = doc.get("_id") if fields.chunk_id == "_id" else get_path(doc, fields.chunk_id)
                        marked[str(get_path(doc, fields.company))].add(str(cid))
        for target in batch:
            c = target.company_id
            problems: list[str] = []
            missing = marked.get(c, set()) - held.get(c, set())
            extra = held.get(c, set()) - source.get(c, set())
            what = "vector(s)" if job.kind == "embeddings" else "result(s)"
            if missing:
                problems.append(f"check: {len(missing)} marked chunk(s) without a vector (e.g. {sorted(missing)[0]})")
            if extra:
                problems.append(f"check: {len(extra)} {what} without a source unit (e.g. {sorted(extra)[0]})")
            if problems:
                out[c] = problems
    return out


def _sha(fn: Any, text: str) -> str | None:
    try:
        return str(fn(text))
    except UnicodeEncodeError:
        return None


def asset_status(ctx: RunContext, *, job_name: str | None = None, check: bool = False) -> list[dict[str, Any]]:
    """Every partition key of every scope (of `job_name` only, if given), as dicts."""
    out: list[dict[str, Any]] = []
    for scope in scopes(ctx):
        if job_name is not None and scope.split("/", 1)[0] != job_name:
            continue
        out += [row.to_json() for row in scope_status(ctx, scope, check=check)]
    return out
