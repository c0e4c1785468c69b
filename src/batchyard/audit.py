"""Audit a run: what was selected, rejected, planned, sent, received, parsed, failed and loaded,
with every count reconciled against the staged files and the sinks (`batchyard audit RUN`).

Staging is the system of record, so the audit trusts no summary: it re-reads the files each
stage wrote and checks that the next stage accounts for all of it, partition by partition and
shard attempt by shard attempt (memory is bounded by a partition and a shard, as in the run):

```
chunks ─▶ units + plan rejects      every selected chunk (less repeated ids) is planned or rejected
units ─▶ requests.parquet           every unit that is sent is in exactly one request (aliases and
                                    reused vectors are not sent: their representative / donor is)
requests ─▶ shards/<s>.<n>.jsonl    the file's sha256 is the ledger's, its lines are the plan's
shard ─▶ outputs + errors           lines sent = output + error lines + missing; the provider's
                                    request_counts agree with the answered lines
                                    (real-time lane: no file or batch to upload, so every line
                                    is answered, the staged slices make up the output and error
                                    files, and the ledger's usage is what the answers carry)
outputs ─▶ parsed/<s>.<n>           the job's own `parse_attempt` re-derives every outcome (and
                                    vector or parsed answer) from the raw files: they must match
parsed ─▶ results, failures,        ok units are in the attempt's results part, failed ones in its
          followups/<s>.<n+1>       failures part, pending ones in the next attempt's plan
planned ─▶ results + failures       every planned unit settled exactly once (partition done)
results ─▶ loads/<part>.json        each sink's receipt holds the part's rows
loads ─▶ Milvus, MongoDB            the part's ids are in the collection / carry their mark
```

Nothing here opens a Batch API client: an audit costs no API call and works long after the
provider deleted its files. A difference names the counts that differ and the units involved.
`trail` follows one chunk or unit through the same files (`batchyard audit RUN --id ID`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import polars as pl

from batchyard.stages.join import REQUEUE_CODES, next_attempt
from batchyard.stages.plan import shard_bytes
from batchyard.storage.ledger import Ledger, ShardRecord

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.runs import PartitionStore, RunStore

MAX_NAMED = 20  # units named per difference (the count of the others is given)
SINK_BATCH = 1_000  # ids per sink lookup
TABLES = ("selected", "rejected", "planned", "sent", "received", "parsed", "failed", "loaded")
_UPLOADED = frozenset({"uploaded", "creating", "submitted", "ended", "collected"})
_CREATED = frozenset({"submitted", "ended", "collected"})
_REJECT_PARTS = ("snapshot-", "duplicates", "plan")
SINKS = {"embeddings": ("milvus", "mongo.marks"), "inference": ("mongo.results",)}


# --------------------------------------------------------------------------- the report


@dataclass
class Difference:
    """One reconciliation that does not hold: the two sides and the units involved."""

    check: str
    expected: str
    actual: str
    units: list[str] = field(default_factory=list)
    more: int = 0

    def __str__(self) -> str:
        named = f"; units: {', '.join(self.units)}" + (f" (+{self.more} more)" if self.more else "")
        return f"{self.check}: {self.expected}, but {self.actual}" + (named if self.units else "")


@dataclass
class AuditReport:
    """Tables of what the run did, how many counts were reconciled, and what differs."""

    run: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]]
    checks: int
    differences: list[Difference]
    notes: list[str]

    @property
    def ok(self) -> bool:
        """Whether every count reconciles."""
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON types."""
        return {"run": self.run, "ok": self.ok, "checks": self.checks,
                "differences": [asdict(d) for d in self.differences], "notes": self.notes, **self.tables}


# --------------------------------------------------------------------------- raw lines


class _Error(msgspec.Struct):
    code: str | int | None = None


class _Response(msgspec.Struct):
    status_code: int | None = None


class LineHead(msgspec.Struct):
    """The part of a batch output or error line the audit needs (the body is skipped)."""

    custom_id: str
    response: _Response | None = None
    error: _Error | None = None

    @property
    def unfinished(self) -> bool:
        """An expired or cancelled request: the provider never processed it."""
        return self.response is None and self.error is not None and self.error.code in REQUEUE_CODES


_HEAD = msgspec.json.Decoder(LineHead)


def line_heads(data: bytes) -> tuple[list[tuple[int, LineHead]], int]:
    """(line number, head) of each line of an output/error file, and the count of malformed lines."""
    heads: list[tuple[int, LineHead]] = []
    bad = 0
    for no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            heads.append((no, _HEAD.decode(raw)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            bad += 1
    return heads, bad


def find_line(data: bytes, custom_id: str) -> tuple[int, str] | None:
    """(line number, exact text) of the first line of a staged file for `custom_id`."""
    needle = custom_id.encode()
    for no, raw in enumerate(data.splitlines(), start=1):
        if needle not in raw:
            continue
        try:
            if _HEAD.decode(raw).custom_id == custom_id:
                return no, raw.decode("utf-8", errors="replace")
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return None


# --------------------------------------------------------------------------- small readers


def read_staged(part: PartitionStore, folder: str, name: str, suffix: str = ".jsonl") -> bytes | None:
    """A staged file of a shard attempt (None when it does not exist)."""
    rel = part.rel(folder, f"{name}{suffix}")
    return part.staging.read_bytes(rel) if part.staging.exists(rel) else None


def _frame(part: PartitionStore, *path: str) -> pl.DataFrame | None:
    rel = part.rel(*path)
    return part.staging.read_parquet(rel) if part.staging.exists(rel) else None


def _ids(frame: pl.DataFrame | None, column: str) -> pl.Series:
    if frame is None or frame.height == 0 or column not in frame.columns:
        return pl.Series(column, [], dtype=pl.String)
    return frame[column].cast(pl.String).rename("unit_id")


def planned_table(job: Job, part: PartitionStore, *, where: pl.Expr | None = None) -> pl.DataFrame | None:
    """The partition's planned units, without their text: `inputs.parquet` (embeddings) or
    `units.parquet` (inference); only the rows matching `where` when given."""
    rel = part.rel("inputs.parquet" if job.kind == "embeddings" else "units.parquet")
    if not part.staging.exists(rel):
        return None
    scan = part.staging.scan_parquet([rel])
    scan = scan.select(pl.exclude("text")) if "text" in scan.collect_schema().names() else scan
    return (scan.filter(where) if where is not None else scan).collect()


def expected_units(job: Job, chunks: pl.DataFrame) -> pl.Series:
    """Unit ids the selected chunks (repeated ids removed) must plan or reject."""
    if job.kind == "inference" and job.task.unit == "document":  # type: ignore[attr-defined]
        from batchyard.tasks.units import document_unit_id

        docs = chunks.filter(pl.col("document_id").is_not_null()).select("company_id", "document_id").unique()
        ids = [document_unit_id(c, d) for c, d in docs.iter_rows()]
        loose = chunks.filter(pl.col("document_id").is_null())["chunk_id"].to_list()
        return pl.Series("unit_id", ids + loose, dtype=pl.String)
    return chunks["chunk_id"].rename("unit_id")


def _named(ids: Iterable[Any]) -> tuple[list[str], int]:
    out = sorted({str(i) for i in ids})
    return out[:MAX_NAMED], max(0, len(out) - MAX_NAMED)


# --------------------------------------------------------------------------- the auditor


class _Auditor:
    """Walks one run; each `same*` call is one reconciled count (a difference when it fails)."""

    def __init__(self, ctx: RunContext, run: RunStore, *, sinks: bool) -> None:
        from batchyard.runner import job_for_run

        self.ctx, self.run, self.sinks = ctx, run, sinks
        self.info = run.read_run()
        self.job = job_for_run(ctx, run)  # the run's own model, dimensions and limits
        self.tables: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        self.differences: list[Difference] = []
        self.notes: list[str] = []
        self.checks = 0
        self.loaded: dict[tuple[str, str], dict[str, Any]] = {}
        self.failed_codes: dict[tuple[str, str], int] = defaultdict(int)
        self.rejected_codes: dict[tuple[str, str], int] = defaultdict(int)
        self.firsts: list[ShardRecord] = []  # first-attempt ledger records of every partition

    # the two kinds of reconciliation

    def same(self, check: str, left: tuple[str, Any], right: tuple[str, Any], units: Iterable[Any] = ()) -> bool:
        """Two counts (or values) that must be equal."""
        self.checks += 1
        if left[1] == right[1]:
            return True
        named, more = _named(units)
        self.differences.append(Difference(check, f"{left[0]}={left[1]}", f"{right[0]}={right[1]}", named, more))
        return False

    def same_units(self, check: str, left: tuple[str, pl.Series], right: tuple[str, pl.Series]) -> bool:
        """Two lists of unit ids that must hold the same units, each once."""
        self.checks += 1
        a, b = left[1].cast(pl.String), right[1].cast(pl.String)
        only_a = set(a.unique().to_list()) - set(b.unique().to_list())
        only_b = set(b.unique().to_list()) - set(a.unique().to_list())
        twice = set(a.filter(a.is_duplicated()).to_list()) | set(b.filter(b.is_duplicated()).to_list())
        if not (only_a or only_b or twice):
            return True
        named, more = _named(only_a | only_b | twice)
        extra = []
        if only_a:
            extra.append(f"{len(only_a)} only in {left[0]}")
        if only_b:
            extra.append(f"{len(only_b)} only in {right[0]}")
        if twice:
            extra.append(f"{len(twice)} more than once")
        self.differences.append(Difference(
            check, f"{left[0]}={a.len()}", f"{right[0]}={b.len()} ({', '.join(extra)})", named, more))
        return False

    def differ(self, check: str, expected: str, actual: str, units: Iterable[Any] = ()) -> None:
        """A check that failed for a reason other than two counts."""
        self.checks += 1
        named, more = _named(units)
        self.differences.append(Difference(check, expected, actual, named, more))

    # the run

    def walk(self) -> AuditReport:
        self.run_level()
        for part in self.run.partitions():
            self.partition(part)
        self.totals()
        run = {k: self.info.get(k) for k in ("run_id", "job", "kind", "state", "phase", "created_at")}
        return AuditReport(run, self.tables, self.checks, self.differences, self.notes)

    def run_level(self) -> None:
        st, run = self.run.staging, self.run
        snap = self.info.get("snapshot", {})
        orphans = st.count_rows(run.rel("failures", "snapshot-orphans.parquet"))
        if snap:
            self.same("run: orphan chunks", ("run.json snapshot.orphans", snap.get("orphans", 0)),
                      ("rows of failures/snapshot-orphans.parquet", orphans))
        for name in st.list(run.rel("failures"), ".parquet"):
            for (code,), rows in st.read_parquet(run.rel("failures", name)).group_by(["code"]):
                self.rejected_codes[("snapshot", str(code))] += rows.height
        dups = st.count_rows(run.rel("duplicates.parquet"))
        copies = sum(st.count_rows(p.rel("failures", "duplicates.parquet")) for p in run.partitions())
        self.same("run: repeated chunk ids", ("rows of duplicates.parquet", dups),
                  ("duplicate_chunk_id failures in the partitions", copies))
        self._unit_in_one_partition()

    def _unit_in_one_partition(self) -> None:
        """A unit id is planned by one partition only (else it is sent and loaded twice)."""
        key = "chunk_id" if self.job.kind == "embeddings" else "unit_id"
        name = "inputs.parquet" if self.job.kind == "embeddings" else "units.parquet"
        rels = [p.rel(name) for p in self.run.partitions() if p.staging.exists(p.rel(name))]
        if not rels:
            return
        scan = self.run.staging.scan_parquet(rels, include_file_paths="_path").select(key, "_path")
        twice = scan.group_by(key).agg(pl.col("_path").n_unique().alias("n")).filter(pl.col("n") > 1).collect()
        self.checks += 1
        if twice.height:
            named, more = _named(twice[key].to_list())
            self.differences.append(Difference(
                "run: units planned by one partition each", "each unit in 1 partition",
                f"{twice.height} unit(s) planned in several partitions", named, more))

    def totals(self) -> None:
        done = self.info.get("phase") == "done"
        final = self.info.get("final", {})
        if done and final:
            results = sum(self.run.staging.count_rows(r) for r in self.run.dataset_parts("results"))
            failures = sum(self.run.staging.count_rows(r) for r in self.run.dataset_parts("failures"))
            self.same("run: results", ("run.json final.results", final.get("results")), ("results rows", results))
            self.same("run: failures", ("run.json final.failures", final.get("failures")), ("failures rows", failures))
        elif not done:
            self.notes.append(f"run is in phase {self.info.get('phase')!r} (state {self.info.get('state')!r}): "
                              "units of open partitions are not checked for settlement or loading")
        plan = self.info.get("plan", {})
        if plan:
            self.same("run: shards", ("run.json plan.shards", plan.get("shards", 0)),
                      ("first-attempt ledger records", len(self.firsts)))
            self.same("run: requests", ("run.json plan.requests", plan.get("requests", 0)),
                      ("requests in first-attempt ledger records", sum(r.n_requests for r in self.firsts)))
        for table, book in (("rejected", self.rejected_codes), ("failed", self.failed_codes)):
            self.tables[table] = [{"stage": st, "code": c, "units": n} for (st, c), n in sorted(book.items())]
        self.tables["loaded"] = [{"sink": s, "target": t, **v} for (s, t), v in sorted(self.loaded.items())]

    # one partition

    def partition(self, part: PartitionStore) -> None:
        state = part.read_state()
        pid = part.pid
        units = self.selected(part, state)
        if units is None:
            return
        requests = _frame(part, "requests.parquet")
        self.planned(part, units, requests)
        records = Ledger(part).all()
        self.firsts += [r for r in records if r.attempt == 1]
        if requests is not None:
            firsts = {r.shard for r in records if r.attempt == 1}
            shards = set(requests["shard"].unique().to_list()) if requests.height else set()
            self.same(f"{pid}: shards", ("shards in requests.parquet", len(shards)),
                      ("first-attempt ledger records", len(firsts)), units=shards ^ firsts)
        for rec in records:
            plan = requests.filter(pl.col("shard") == rec.shard) if rec.attempt == 1 and requests is not None \
                else _frame(part, "followups", f"{rec.name}.parquet")
            self.attempt(part, rec, plan)
        if state.get("phase") == "done":
            self.settled(part, units)
        self.loads(part, done=state.get("phase") == "done")

    def selected(self, part: PartitionStore, state: dict[str, Any]) -> pl.DataFrame | None:
        """Snapshot → planned units + plan rejects; returns the planned table (None: not planned)."""
        st, pid = part.staging, part.pid
        rels = [part.rel("chunks", n) for n in st.list(part.rel("chunks"), ".parquet")]
        cols = ["chunk_id", "company_id", "document_id"]
        chunks = (st.scan_parquet(rels).select(cols).collect() if rels
                  else pl.DataFrame(schema=dict.fromkeys(cols, pl.String)))
        snap = state.get("snapshot", {})
        rejected = 0
        for name in part.parts("failures"):
            frame = st.read_parquet(part.rel("failures", f"{name}.parquet"))
            stage = "snapshot" if name.startswith("snapshot-") else name if name in ("duplicates", "plan", "final") \
                else "batch"
            book = self.rejected_codes if name.startswith(_REJECT_PARTS) else self.failed_codes
            for (code,), rows in frame.group_by(["code"]):
                book[(stage, str(code))] += rows.height
            if name.startswith("snapshot-"):
                rejected += frame.height
        if snap:
            self.same(f"{pid}: selected chunks", ("partition.json snapshot.chunks", snap.get("chunks", 0)),
                      ("rows of chunks/*.parquet", chunks.height))
            self.same(f"{pid}: snapshot rejects", ("partition.json snapshot.rejected", snap.get("rejected", 0)),
                      ("rows of failures/snapshot-*.parquet", rejected))
        dup_rel = self.run.rel("duplicates.parquet")
        repeated = st.read_parquet(dup_rel).select("chunk_id").unique() if st.exists(dup_rel) else None
        copies = chunks.join(repeated, on="chunk_id", how="semi") if repeated is not None else chunks.clear()
        self.same(f"{pid}: repeated chunk ids", ("selected chunks whose id repeats", copies.height),
                  ("rows of failures/duplicates.parquet", st.count_rows(part.rel("failures", "duplicates.parquet"))))
        units = planned_table(self.job, part)
        plan_rejects = _frame(part, "failures", "plan.parquet")
        self.tables["selected"].append({
            "partition": part.pid, "companies": state.get("companies", []), "chunks": chunks.height,
            "repeated_ids": copies.height, "snapshot_rejects": rejected,
            "planned": units.height if units is not None else None,
            "plan_rejects": plan_rejects.height if plan_rejects is not None else None,
        })
        if units is None:
            self.notes.append(f"{pid} is not planned yet (phase {state.get('phase')!r})")
            return None
        kept = chunks.join(repeated, on="chunk_id", how="anti") if repeated is not None else chunks
        key = "chunk_id" if self.job.kind == "embeddings" else "unit_id"
        self.same_units(f"{pid}: selected = planned + plan rejects",
                        ("units of the selected chunks", expected_units(self.job, kept)),
                        ("planned + plan rejects", pl.concat([_ids(units, key), _ids(plan_rejects, "unit_id")])))
        return units.rename({key: "unit_id"}) if key != "unit_id" else units

    def planned(self, part: PartitionStore, units: pl.DataFrame, requests: pl.DataFrame | None) -> None:
        """Planned units → first-attempt requests (aliases and reused vectors are not sent)."""
        pid = part.pid
        sent = requests.select(pl.col("unit_ids").explode().alias("unit_id"))["unit_id"] if requests is not None \
            else pl.Series("unit_id", [], dtype=pl.String)
        req = requests if requests is not None else pl.DataFrame(schema={"shard": pl.String, "tokens": pl.Int64})
        row: dict[str, Any] = {"partition": part.pid, "units": units.height, "requests": req.height,
                               "shards": req["shard"].n_unique(), "tokens": int(req["tokens"].sum())}
        if "route" in units.columns:  # embeddings: request | alias | reused
            routes = {str(r): n for r, n in units.group_by("route").len().iter_rows()}
            row.update(sent=routes.get("request", 0), aliases=routes.get("alias", 0), reused=routes.get("reused", 0))
            self.same_units(f"{pid}: planned inputs sent = request inputs",
                            ("inputs routed `request`", units.filter(pl.col("route") == "request")["unit_id"]),
                            ("unit_ids of requests.parquet", sent))
            reps = units.filter(pl.col("route") == "alias")
            orphan = reps.join(units.filter(pl.col("route") == "request").select(rep="unit_id"), on="rep", how="anti")
            self.same(f"{pid}: aliases served by a sent input", ("aliases", reps.height),
                      ("aliases whose representative is sent", reps.height - orphan.height), units=orphan["unit_id"])
            reused = _frame(part, "results", "reused.parquet")
            self.same_units(f"{pid}: reused vectors", ("inputs routed `reused`",
                                                       units.filter(pl.col("route") == "reused")["unit_id"]),
                            ("rows of results/reused.parquet", _ids(reused, "chunk_id")))
        else:
            self.same_units(f"{pid}: planned units = request units", ("units.parquet", units["unit_id"]),
                            ("unit_ids of requests.parquet", sent))
        self.tables["planned"].append(row)

    # one shard attempt

    def attempt(self, part: PartitionStore, rec: ShardRecord, plan: pl.DataFrame | None) -> None:
        key, name = rec.key, rec.name
        if plan is None:
            where = f"followups/{name}.parquet" if rec.attempt > 1 else "requests.parquet"
            self.differ(f"{key}: plan", "the attempt's plan", f"no {where}")
            return
        data = read_staged(part, "shards", name)
        sha = hashlib.sha256(data).hexdigest() if data is not None else None
        sha_ok = self.same(f"{key}: shard file sha256", ("ledger sha256", rec.sha256),
                           (f"sha256 of shards/{name}.jsonl", sha))
        self.same(f"{key}: shard lines = plan lines", ("ledger sha256", rec.sha256),
                  ("sha256 of the plan's request lines", hashlib.sha256(shard_bytes(plan["line"])).hexdigest()))
        lines = len(data.splitlines()) if data is not None else 0
        self.same(f"{key}: requests", ("ledger n_requests", rec.n_requests), (f"lines of shards/{name}.jsonl", lines))
        unsent = bool(rec.split_into) and rec.batch_id is None  # re-planned before it was sent
        if rec.lane == "realtime":  # no uploaded file: its lines went straight to the endpoints
            self.realtime_files(part, rec)
        elif rec.state in _UPLOADED and not rec.file_id and not unsent:
            self.differ(f"{key}: file id", f"a file id (state {rec.state})", "none in the ledger")
        if rec.state in _CREATED and not rec.batch_id and not unsent:
            self.differ(f"{key}: batch id", f"a batch id (state {rec.state})", "none in the ledger")
        self.tables["sent"].append({
            "partition": rec.partition, "shard": rec.shard, "attempt": rec.attempt, "lane": rec.lane,
            "state": rec.state,
            "sha256": rec.sha256, "sha256_ok": sha_ok, "file_id": rec.file_id, "batch_id": rec.batch_id,
            "past_batches": rec.past_batches, "requests": rec.n_requests, "inputs": rec.n_inputs,
            "tokens": rec.tokens, "request_counts": rec.request_counts,
        })
        if rec.state != "collected":
            return
        parsed = _frame(part, "parsed", f"{name}.parquet")
        if parsed is None:
            self.differ(f"{key}: parsed", "parsed/ for a collected attempt", f"no parsed/{name}.parquet")
            return
        if rec.batch_status != "failed" and not unsent:
            self.received(part, rec, plan, parsed)
        self.parsed(part, rec, plan, parsed)

    def realtime_files(self, part: PartitionStore, rec: ShardRecord) -> None:
        """A real-time attempt that ended: its output and error files are the answers staged
        slice by slice (`<folder>/<name>.rt/`), in order, and nothing else."""
        if rec.state not in ("ended", "collected"):
            return
        st, name = part.staging, rec.name
        for folder in ("outputs", "errors"):
            joined = read_staged(part, folder, name)
            if joined is None:
                self.differ(f"{rec.key}: {folder} file", f"{folder}/{name}.jsonl (real-time answers)",
                            "it is not staged")
                continue
            slices = st.list(part.rel(folder, f"{name}.rt"), ".jsonl")
            staged = b"".join(st.read_bytes(part.rel(folder, f"{name}.rt", n)) for n in slices)
            self.same(f"{rec.key}: {folder} = real-time slices",
                      (f"sha256 of {folder}/{name}.rt/*.jsonl ({len(slices)} slice(s))",
                       hashlib.sha256(staged).hexdigest()),
                      (f"sha256 of {folder}/{name}.jsonl", hashlib.sha256(joined).hexdigest()))

    def received(self, part: PartitionStore, rec: ShardRecord, plan: pl.DataFrame, parsed: pl.DataFrame) -> None:
        """Output and error lines against the lines sent, the provider's counts and the parsed part."""
        key, name = rec.key, rec.name
        staged = {folder: read_staged(part, folder, name) for folder in ("outputs", "errors")}
        for folder, file_id in (("outputs", rec.output_file_id), ("errors", rec.error_file_id)):
            if file_id and staged[folder] is None:
                self.differ(f"{key}: {folder} file", f"{folder}/{name}.jsonl (file {file_id})", "it is not staged")
        output, errors = staged["outputs"] or b"", staged["errors"] or b""
        planned = set(plan["custom_id"].to_list())
        out_heads, bad_out = line_heads(output)
        err_heads, bad_err = line_heads(errors)
        seen: set[str] = set()
        counts = {"output": 0, "error": 0, "unfinished": 0, "anomalies": bad_out + bad_err}
        for kind, heads in (("output", out_heads), ("error", err_heads)):
            for _, head in heads:
                if head.custom_id not in planned or head.custom_id in seen:
                    counts["anomalies"] += 1
                    continue
                seen.add(head.custom_id)
                counts[kind] += 1
                counts["unfinished"] += head.unfinished
        missing = plan.height - counts["output"] - counts["error"]
        self.tables["received"].append({"partition": rec.partition, "shard": rec.shard, "attempt": rec.attempt,
                                        "lane": rec.lane, "status": rec.batch_status, "sent": plan.height, **counts,
                                        "missing": missing})
        if rec.lane == "realtime":
            self.realtime_answers(rec, plan, out_heads + err_heads, output)
        rc = rec.request_counts or {}
        if rc.get("total"):
            self.same(f"{key}: provider total", ("provider request_counts.total", rc.get("total")),
                      ("requests sent", plan.height))
            answered = counts["output"] + counts["error"] - counts["unfinished"]
            self.same(f"{key}: answered lines",
                      ("provider request_counts.completed+failed", rc.get("completed", 0) + rc.get("failed", 0)),
                      (f"answered lines in outputs/{name}.jsonl + errors/{name}.jsonl", answered))
        self.rederive(rec, plan, parsed, output, errors)

    def realtime_answers(self, rec: ShardRecord, plan: pl.DataFrame, heads: list[tuple[int, LineHead]],
                         output: bytes) -> None:
        """The real-time lane answers every request line exactly once, and the ledger's usage is
        the usage its answers carry (there is no batch to report it)."""
        from batchyard.clients.realtime import usage_of

        lines = pl.Series("custom_id", [h.custom_id for _, h in heads], dtype=pl.String)
        self.same_units(f"{rec.key}: real-time answers", ("requests sent", plan["custom_id"]),
                        ("custom_ids of the output and error lines", lines))
        used = usage_of(output)
        ledger = rec.usage or {}
        self.same(f"{rec.key}: real-time usage",
                  ("ledger usage input/output tokens", (ledger.get("input_tokens"), ledger.get("output_tokens"))),
                  (f"usage of the answers in outputs/{rec.name}.jsonl",
                   (used["input_tokens"], used["output_tokens"])))

    def rederive(
        self, rec: ShardRecord, plan: pl.DataFrame, parsed: pl.DataFrame, output: bytes, errors: bytes
    ) -> None:
        """The job's own parser over the staged files must give the outcomes the parsed part holds."""
        key = rec.key
        limits = self.ctx.settings.limits  # the run's limits (job_for_run applied them)
        payload, outcomes, _ = self.job.parse_attempt(plan, output, errors, rec)
        _, failed = next_attempt(plan, outcomes, max_attempts=limits.max_attempts, max_requeues=limits.max_requeues)
        derived = outcomes.join(failed.select("custom_id", f_code="code"), on="custom_id", how="left").select(
            "custom_id", "outcome", code=pl.coalesce("f_code", "code"),
            final=pl.when(pl.col("outcome") == "ok").then(pl.lit("ok"))
            .when(pl.col("custom_id").is_in(failed["custom_id"].implode())).then(pl.lit("fail"))
            .otherwise(pl.lit("pending")),
        )
        recorded = parsed.select("custom_id", "outcome", "code", "final").unique()
        both = derived.join(recorded, on="custom_id", how="full", suffix="_parsed", coalesce=True)
        differs = both.filter(pl.any_horizontal(~pl.col(c).eq_missing(pl.col(f"{c}_parsed"))
                                                for c in ("outcome", "final", "code")))
        self.checks += 1
        if differs.height:
            units = plan.filter(pl.col("custom_id").is_in(differs["custom_id"].implode()))["unit_ids"].explode()
            first = differs.row(0, named=True)
            named, more = _named(units.to_list())
            self.differences.append(Difference(
                f"{key}: outcomes re-derived from the staged output/error files",
                f"parsed/{rec.name}.parquet: request {first['custom_id']} {first['outcome_parsed']} "
                f"({first['final_parsed']})",
                f"the staged files give {first['outcome']} ({first['code'] or first['final']}); "
                f"{differs.height} request(s) differ", named, more))
        self.same_payload(key, payload, parsed.filter(pl.col("final") == "ok"), f"parsed/{rec.name}.parquet",
                          "payload re-derived from the staged files")

    def same_payload(self, key: str, left: pl.DataFrame, right: pl.DataFrame, right_label: str, what: str) -> None:
        """The job's payload columns (vector, parsed answer, ...) agree on the rows both hold."""
        keys = [k for k in self.job.payload_keys() if k in left.columns and k in right.columns]
        cols = [c for c in self.job.payload_schema() if c in left.columns and c in right.columns]
        if not keys or not cols or left.height == 0 or right.height == 0:
            return
        joined = left.select(*keys, *cols).join(right.select(*keys, *cols), on=keys, how="inner", suffix="_r")
        bad = pl.lit(False)
        for c in cols:
            bad = bad | ~pl.col(c).eq_missing(pl.col(f"{c}_r"))
        differs = joined.filter(bad)
        self.checks += 1
        if differs.height:
            unit_col = "unit_id" if "unit_id" in differs.columns else keys[0]
            named, more = _named(differs[unit_col].to_list())
            self.differences.append(Difference(f"{key}: {what}", f"{', '.join(cols)} as in {right_label}",
                                               f"{differs.height} row(s) differ", named, more))

    def parsed(self, part: PartitionStore, rec: ShardRecord, plan: pl.DataFrame, parsed: pl.DataFrame) -> None:
        """parsed → this attempt's results and failures parts, and the next attempt's plan."""
        key, name = rec.key, rec.name
        per_request = parsed.select("custom_id", "outcome").unique("custom_id")
        outcomes = {str(o): n for o, n in per_request.group_by("outcome").len().iter_rows()}
        finals = {str(f): n for f, n in parsed.group_by("final").len().iter_rows()}
        self.tables["parsed"].append({"partition": rec.partition, "shard": rec.shard, "attempt": rec.attempt,
                                      **{o: outcomes.get(o, 0) for o in ("ok", "requeue", "retry", "fail")},
                                      **{f"units_{f}": finals.get(f, 0) for f in ("ok", "fail", "pending")}})
        self.same_units(f"{key}: requests parsed", ("requests sent", plan["custom_id"]),
                        (f"requests in parsed/{name}.parquet", per_request["custom_id"]))
        ok, failed = (parsed.filter(pl.col("final") == f) for f in ("ok", "fail"))
        results = _frame(part, "results", f"{name}.parquet")
        self.same_units(f"{key}: ok units = results", ("ok units in parsed", ok["unit_id"]),
                        (f"results/{name}.parquet", _ids(results, self.job.result_key)))
        if results is not None and results.height:
            res = results.rename({self.job.result_key: "unit_id"}) if self.job.result_key != "unit_id" else results
            self.same_payload(key, ok, res, f"results/{name}.parquet", "results rows = parsed ok rows")
        failures = _frame(part, "failures", f"{name}.parquet")
        self.same_units(f"{key}: failed units = failures", ("failed units in parsed", failed["unit_id"]),
                        (f"failures/{name}.parquet", _ids(failures, "unit_id")))
        if rec.split_into:
            self.split(part, rec, parsed)
            return
        pending = parsed.filter(pl.col("final") == "pending")["custom_id"].unique()
        nxt = f"{rec.shard}.{rec.attempt + 1}"
        followup = _frame(part, "followups", f"{nxt}.parquet")
        if pending.len() or followup is not None:
            self.same_units(f"{key}: pending requests = next attempt", ("pending requests in parsed", pending),
                            (f"followups/{nxt}.parquet", _ids(followup, "custom_id")))
            if not Ledger(part).exists(nxt):
                self.differ(f"{key}: next attempt", f"a ledger record for {nxt}", "none")

    def split(self, part: PartitionStore, rec: ShardRecord, parsed: pl.DataFrame) -> None:
        """A re-planned attempt (over the provider's limit): its pending units are the units of the
        shards it was re-planned into, each in exactly one (their custom_ids may differ)."""
        key = rec.key
        pending = parsed.filter(pl.col("final") == "pending")["unit_id"]
        plans = [_frame(part, "followups", f"{n}.parquet") for n in rec.split_into]
        units = [p.select(pl.col("unit_ids").explode())["unit_ids"] for p in plans if p is not None]
        self.same_units(f"{key}: pending units = re-planned shards", ("pending units in parsed", pending),
                        (f"units of followups/{{{','.join(rec.split_into)}}}",
                         pl.concat(units) if units else pl.Series("unit_id", [], pl.String)))
        missing = [n for n, p in zip(rec.split_into, plans, strict=True) if p is None or not Ledger(part).exists(n)]
        if missing:
            self.differ(f"{key}: re-planned shards", f"a plan and a ledger record for each of {rec.split_into}",
                        f"none for {missing}")

    # settlement and loading

    def settled(self, part: PartitionStore, units: pl.DataFrame) -> None:
        """Every planned unit of a finished partition is in exactly one of results and failures."""
        st = part.staging
        ids = [_ids(st.read_parquet(part.rel("results", f"{n}.parquet")), self.job.result_key)
               for n in part.parts("results")]
        ids += [_ids(st.read_parquet(part.rel("failures", f"{n}.parquet")), "unit_id")
                for n in part.parts("failures") if not n.startswith(_REJECT_PARTS)]
        self.same_units(f"{part.pid}: planned = results + failures", ("planned units", units["unit_id"]),
                        ("results + batch failures", pl.concat(ids) if ids else pl.Series("unit_id", [], pl.String)))

    def loads(self, part: PartitionStore, *, done: bool) -> None:
        """Each results part has a receipt per sink with its rows, and the sinks hold them."""
        st, pid = part.staging, part.pid
        for name in part.parts("results"):
            frame = st.read_parquet(part.rel("results", f"{name}.parquet"))
            ids = frame[self.job.result_key].unique() if frame.height else pl.Series([], dtype=pl.String)
            rel = part.rel("loads", f"{name}.json")
            if not st.exists(rel):
                if done:
                    self.differ(f"{pid} results/{name}: load receipt", f"loads/{name}.json", "none",
                                units=ids.to_list())
                continue
            by_sink = {r["sink"]: r for r in st.read_json(rel).get("sinks", [])}
            for sink in SINKS[self.job.kind]:
                entry = by_sink.get(sink, {})
                target = str(entry.get("target") or self.default_target(sink))
                got = int(entry.get("rows", 0))
                self.same(f"{pid} results/{name}: {sink} {target}", ("rows of the results part", ids.len()),
                          (f"rows in loads/{name}.json", got))
                tally = self.loaded.setdefault((sink, target), {"parts": 0, "rows": 0, "receipt_rows": 0,
                                                                "found": None, "superseded": None})
                tally["parts"] += 1
                tally["rows"] += ids.len()
                tally["receipt_rows"] += got
                if self.sinks and ids.len():
                    self.in_sink(part, name, sink, target, frame, tally)

    def default_target(self, sink: str) -> str:
        """Where a sink of this job writes, when no receipt names it."""
        if sink == "milvus":
            return str(self.job.collection)  # type: ignore[attr-defined]
        if sink == "mongo.marks":
            return self.ctx.settings.mongo.chunks_collection
        return str(self.job.results_collection)  # type: ignore[attr-defined]

    def in_sink(self, part: PartitionStore, name: str, sink: str, target: str, frame: pl.DataFrame,
                tally: dict[str, Any]) -> None:
        found: dict[str, str | None] = {}
        for batch in _batches(frame, self.job.result_key):
            found.update(sink_rows(self.ctx, self.job, sink, batch))
        ids = frame[self.job.result_key].unique().to_list()
        absent = [i for i in ids if i not in found]
        tally["found"] = (tally["found"] or 0) + len(ids) - len(absent)
        # a later run may have rewritten a vector or answer (the text changed): present, not ours
        tally["superseded"] = (tally["superseded"] or 0) + sum(
            1 for i in ids if i in found and found[i] != self.run.run_id)
        self.same(f"{part.pid} results/{name}: in {sink} {target}", ("rows of the results part", len(ids)),
                  ("found in the sink", len(ids) - len(absent)), units=absent)


def _batches(frame: pl.DataFrame, key: str) -> Iterator[pl.DataFrame]:
    frame = frame.unique(key, keep="last")
    for start in range(0, frame.height, SINK_BATCH):
        yield frame.slice(start, SINK_BATCH)


def sink_rows(ctx: RunContext, job: Job, sink: str, rows: pl.DataFrame) -> dict[str, str | None]:
    """Which of `rows` (result rows) a sink holds: unit id -> the run id that wrote it."""
    if sink == "milvus":
        coll = job.collection  # type: ignore[attr-defined]
        client = ctx.milvus
        if not client.has_collection(coll):
            return {}
        from batchyard.clients.milvus import get_rows

        client.load_collection(coll)
        got = get_rows(client, coll, rows["chunk_id"].to_list(), ["chunk_id", "run_id"])
        return {g["chunk_id"]: g.get("run_id") for g in got}
    if sink == "mongo.marks":
        from batchyard.stages.snapshot import get_path, mark_path, mongo_id

        fields = ctx.settings.mongo.fields
        path = mark_path(fields, job.emb.space)  # type: ignore[attr-defined]
        originals = {mongo_id(c, k or "str"): c for c, k in rows.select("chunk_id", "id_kind").iter_rows()}
        docs = ctx.store.chunks.find({fields.chunk_id: {"$in": list(originals)}, path: {"$exists": True}},
                                     {fields.chunk_id: 1, path: 1})
        return {originals[get_path(d, fields.chunk_id)]: get_path(d, f"{path}.run_id") for d in docs}
    coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
    docs = coll.find({"task": job.task.name, "task_version": job.task_version,  # type: ignore[attr-defined]
                      "unit_id": {"$in": rows["unit_id"].to_list()}}, {"unit_id": 1, "run_id": 1})
    return {d["unit_id"]: d.get("run_id") for d in docs}


def audit_run(ctx: RunContext, run: RunStore, *, sinks: bool = True) -> AuditReport:
    """Reconcile every count of a run from its staged files (and, with `sinks`, Milvus/MongoDB)."""
    return _Auditor(ctx, run, sinks=sinks).walk()


def report_json(report: AuditReport) -> str:
    """The report as indented JSON text."""
    return json.dumps(report.to_json(), indent=2, sort_keys=True, default=str)
