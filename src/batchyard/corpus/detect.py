"""Change detection: which chunks of the targets a run must read from the source.

Per targeted company, a run either reads it in **full** (every targeted chunk; marks then say
what is new or changed) or reads only its **changes**: chunks whose change field
(`mongo.fields.updated_at`) is after the company's cursor, chunks without the field, and the
scope's retry set. The cursor a finished run leaves is the time its detection started less
`corpus.change_slack_s` (writers' clock skew and commit delays): a chunk changed before it was
visible then, so it was read, and one that was not is read next time. A company is read in full when the
source has no change field, on `--full-scan`, when the scope has no cursor for exactly this
target of the company (first run, a new company, a new document list, a new task version), or
when its last full read is older than `corpus.full_scan_every_s`.

Deletes do not show in a change query: a company whose chunk count moved since the last
finished run is **reconciled** (its sinks are compared with the source and pruned; see
`prune.py`), and so is, after the snapshot, every company the run selected new or changed
units of (a re-chunked document is new ids and vanished ones). So is a company seen for the
first time, on `--full-scan`, after a new task version, and every `corpus.full_scan_every_s`
(the periodic full reconcile, which catches what no count or change shows).

`detect` reads three cheap things from the source: chunk counts per company (one `$group`),
the newest change (one sorted, limited query), and, for the companies read by their changes,
change counts per company (one `$group` over the change query). Nothing here reads a text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from batchyard.stages.partition import size_targets
from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    import polars as pl

    from batchyard.settings import CorpusSettings, MongoFields
    from batchyard.targets import CompanyTarget, Targets

log = logging.getLogger(__name__)

WHOLE = "*"


def target_hash(target: CompanyTarget) -> str:
    """`*` for a whole company, else a short hash of its sorted document list."""
    if target.documents is None:
        return WHOLE
    blob = json.dumps(sorted(target.documents)).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class Detection:
    """What a run reads from the source, recorded in run.json (`detection`) so a resumed run
    reads exactly the same thing."""

    started_at: str
    high_water: str | None
    """The newest change among the targeted chunks when detection started (ISO), if any."""
    safe_bound: str = ""
    """`started_at` less `corpus.change_slack_s`: every chunk changed at or before it was visible to
    this detection (writers' clocks and commits are at most that late), so the next run only
    reads changes after it: the cursor a finished run leaves."""
    full: list[str] = field(default_factory=list)
    """Companies read in full."""
    since: dict[str, str] = field(default_factory=dict)
    """Companies read by their changes: the query's lower bound (ISO)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Targeted chunks per company now."""
    candidates: dict[str, int] = field(default_factory=dict)
    """Chunks each company will read (all of them, or its changes and retries)."""
    reconcile: list[str] = field(default_factory=list)
    """Companies whose sinks are compared with the source after the snapshot."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each company is read in full, or reconciled."""
    by_document: list[tuple[str, str, int]] = field(default_factory=list)
    """Chunk counts of listed documents (company, document, count), for unmatched targets (not
    kept in run.json: a targets file may list thousands of documents)."""
    version: str = ""
    kind: str = "aware"
    """How the source stores the change field (see `value_kind`)."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "by_document"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Detection:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def since_of(self, company: str) -> datetime | None:
        """The change query's lower bound for a company (None: read in full)."""
        value = self.since.get(company)
        return None if value is None else datetime.fromisoformat(value)


def newest_change(collection: Any, query: dict[str, Any], change_field: str) -> Any:
    """The largest change-field value among the chunks `query` selects (None: no chunk has one)."""
    docs = list(collection.find({"$and": [query, {change_field: {"$ne": None}}]}, {change_field: 1, "_id": 0})
                .sort(change_field, -1).limit(1))
    if not docs:
        return None
    value = docs[0].get(change_field)
    return value if isinstance(value, datetime | int | float) and not isinstance(value, bool) else None


def change_clause(change_field: str, since: Any) -> dict[str, Any]:
    """Chunks changed at or after `since`, and chunks without the field (always read)."""
    return {"$or": [{change_field: {"$gte": since}}, {change_field: None}]}


def value_kind(value: Any) -> str:
    """How the source stores its change field: `aware` or `naive` (UTC) datetimes, or `number`."""
    if isinstance(value, datetime):
        return "naive" if value.tzinfo is None else "aware"
    return "number"


def as_query_value(value: datetime, kind: str) -> Any:
    """A cursor in the type the source stores (so the query compares like with like)."""
    if kind == "number":
        return value.timestamp()
    if kind == "naive":
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def detect(
    collection: Any,
    targets: Targets,
    fields: MongoFields,
    companies: dict[str, dict[str, Any]],
    settings: CorpusSettings,
    *,
    full_scan: bool,
    version: str,
    retry: pl.DataFrame,
) -> Detection:
    """Decide, per targeted company, full read or changes only, and which to reconcile.

    `companies` is the scope's registry (`Corpus.companies()`); `retry` the retry set
    (chunk_id, company_id, ...); `version` what the cursors are only valid for (the task
    version of an inference scope).
    """
    now = utcnow()
    by_company, by_document = size_targets(collection, targets, fields)
    change_field = fields.updated_at or None
    high: Any = newest_change(collection, targets.mongo_filter(fields), change_field) if change_field else None
    high_iso = _iso(high)
    det = Detection(started_at=now.isoformat(), high_water=high_iso, counts=dict(by_company),
                    safe_bound=(now - timedelta(seconds=settings.change_slack_s)).isoformat(),
                    by_document=[(c, d, n) for (c, d), n in by_document.items()], version=version,
                    kind=value_kind(high))
    retry_counts = retry.group_by("company_id").len().rows() if retry.height else []
    retries = {str(c): int(n) for c, n in retry_counts}
    since: dict[str, datetime] = {}
    for target in targets.companies:
        c = target.company_id
        if not by_company.get(c):
            continue
        entry = companies.get(c, {})
        th = target_hash(target)
        cursor = entry.get("cursors", {}).get(WHOLE) or entry.get("cursors", {}).get(th)
        full_at = entry.get("full_at", {}).get(WHOLE) or entry.get("full_at", {}).get(th)
        reason = None
        if change_field is None:
            reason = "the source has no change field"
        elif high is None:
            reason = f"no targeted chunk has {change_field!r}"
        elif full_scan:
            reason = "--full-scan"
        elif entry.get("version", version) != version:
            reason = f"version changed: {entry.get('version')} -> {version}"
        elif cursor is None:
            reason = "first read of this target"
        elif full_at is None or (now - datetime.fromisoformat(full_at)).total_seconds() > settings.full_scan_every_s:
            reason = f"last full read over {settings.full_scan_every_s:.0f} s ago (corpus.full_scan_every_s)"
        if reason is not None:
            det.full.append(c)
            det.reasons[c] = f"read in full: {reason}"
            det.candidates[c] = by_company[c]
            continue
        since[c] = datetime.fromisoformat(cursor)
        det.since[c] = since[c].isoformat()
    if since:
        det.candidates.update(_change_counts(collection, targets, fields, since, det.kind))
        for c in since:
            det.candidates[c] = det.candidates.get(c, 0) + retries.get(c, 0)
    every = settings.full_scan_every_s
    for target in targets.companies:
        c = target.company_id
        if c not in by_company:
            continue
        entry = companies.get(c, {})
        th = target_hash(target)
        recorded = entry.get("counts", {}).get(th)
        reconciled_at = entry.get("reconciled_at", {}).get(WHOLE) or entry.get("reconciled_at", {}).get(th)
        why = None
        if full_scan:
            why = "--full-scan"
        elif recorded is None:
            why = "first read of this target"
        elif entry.get("version", version) != version:
            why = f"version changed: {entry.get('version')} -> {version}"
        elif reconciled_at is None or (now - datetime.fromisoformat(reconciled_at)).total_seconds() > every:
            why = f"last reconcile over {every:.0f} s ago (corpus.full_scan_every_s)"
        elif recorded != by_company[c]:
            why = f"chunk count {recorded} -> {by_company[c]}"
        if why is not None:
            det.reconcile.append(c)
            det.reasons[c] = f"{det.reasons[c]}; " if c in det.reasons else ""
            det.reasons[c] += f"reconciled: {why}"
    return det


def _change_counts(collection: Any, targets: Targets, fields: MongoFields, since: dict[str, datetime],
                   kind: str) -> dict[str, int]:
    """Chunks per company in the change query (one `$group` per distinct lower bound)."""
    change_field = fields.updated_at or ""
    groups: dict[datetime, list[str]] = {}
    for c, s in since.items():
        groups.setdefault(s, []).append(c)
    out: dict[str, int] = {}
    for bound, cs in groups.items():
        restricted = targets.model_copy(update={"companies": [t for t in targets.companies if t.company_id in cs]})
        match = {"$and": [restricted.mongo_filter(fields), change_clause(change_field, as_query_value(bound, kind))]}
        for rec in collection.aggregate([{"$match": match}, {"$group": {"_id": f"${fields.company}", "n": {"$sum": 1}}}]):
            key = rec["_id"]
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            if isinstance(key, str):
                out[key] = out.get(key, 0) + int(rec["n"])
    return out


def selection_clause(det: Detection, companies: list[str], fields: MongoFields,
                     retry_ids: list[Any]) -> dict[str, Any] | None:
    """What a snapshot query over `companies` adds to the targets filter (None: nothing, read all).

    Full companies are read whole; the others by their change clause; retried chunks by id.
    """
    change_field = fields.updated_at or ""
    full = [c for c in companies if c in det.full]
    changed = [c for c in companies if c not in det.full]
    if not changed:
        return None
    clauses: list[dict[str, Any]] = []
    if full:
        clauses.append({fields.company: {"$in": full}})
    groups: dict[str, list[str]] = {}
    for c in changed:
        groups.setdefault(det.since[c], []).append(c)
    for bound, cs in groups.items():
        clauses.append({"$and": [{fields.company: {"$in": cs}},
                                 change_clause(change_field, as_query_value(datetime.fromisoformat(bound), det.kind))]})
    if retry_ids:
        clauses.append({fields.chunk_id: {"$in": retry_ids}})
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:  # BSON dates come back naive (UTC) unless tz_aware
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    return datetime.fromtimestamp(float(value), tz=UTC).isoformat()
