"""The trail of one chunk or unit through a run (`batchyard audit RUN --id ID`).

From the staged files alone (no Batch API call), then the sinks:

1. the source row(s): chunk id, source `_id`, company, document, text sha256;
2. how it was planned: sent, served by another chunk's request (`alias`), reused from an
   earlier run (`reused`), or rejected;
3. its request: custom_id, position in the request, and the unit's own input (its text in
   that request);
4. each shard attempt that carried the request: shard, attempt, file id, batch id, status, where
   the output or error line is (file, line number, bytes) and what it says about this unit (an
   embedding: its position in `data`, dimensions, first values and norm; an answer: its text),
   and the unit's parsed outcome;
5. its result or failure row;
6. where and when it was loaded: the load receipt, and what Milvus / MongoDB hold now.

One request carries up to 2,048 inputs and its output line as many vectors (megabytes), so
the whole request line and raw line are only included with `full=True` (`audit --id --full`).

Anything that contradicts the rest (a shard file that no longer matches its sha256, an `ok`
outcome with no output line, a result missing from a sink) is listed under `differences`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from batchyard.audit import find_line, planned_table, read_staged
from batchyard.errors import BatchyardError
from batchyard.storage.ledger import Ledger, ShardRecord

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.runs import PartitionStore, RunStore


VECTOR_HEAD = 8
"""Leading values of a vector shown in a trail."""

CLIP_CHARS = 2_000
"""Characters of an input, answer or error shown in a trail without `full` (the rest is counted)."""


class UnitNotFound(BatchyardError, KeyError):
    """The id names no chunk or unit of the run."""

    def __init__(self, ident: str, run_id: str) -> None:
        self.ident = ident
        self.run_id = run_id
        super().__init__(f"no chunk or unit {ident!r} in run {run_id} (not selected, planned or rejected)")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _rows(part: PartitionStore, folder: str, expr: pl.Expr, *, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows matching `expr` in the parts of one of the partition's folders, with their part name."""
    st = part.staging
    out = []
    for name in names if names is not None else part.parts(folder):
        rel = part.rel(folder, f"{name}.parquet")
        if not st.exists(rel):
            continue
        frame = st.scan_parquet([rel]).filter(expr).collect()
        out += [{"part": name, **{k: v for k, v in r.items() if k not in ("text", "vector")}}
                for r in frame.iter_rows(named=True)]
    return out


def _name(collection: Any) -> str:
    """`database.collection` of a MongoDB collection (never the URI)."""
    return str(getattr(collection, "full_name", collection.name))


def _iso(rec: ShardRecord, status: str) -> str | None:
    return next((h.at for h in rec.history if h.status == status), None)


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """`text`, or its first `limit` characters and how many more there are."""
    return text if len(text) <= limit else f"{text[:limit]}… (+{len(text) - limit:,} characters)"


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)


def own_input(line: str, position: int) -> dict[str, Any]:
    """What a request line sends for the unit at `position`: its own input, not its neighbours'.

    Embeddings: the `position`-th item of `body.input`. Chat and responses: the user's part of
    the prompt (the system prompt is the task's, the same for every unit: only its size is kept).
    """
    try:
        body = json.loads(line).get("body") or {}
    except (ValueError, AttributeError):
        return {"error": "the request line is not JSON"}
    out: dict[str, Any] = {"model": body.get("model"), "line_bytes": len(line.encode())}
    if "input" in body and isinstance(body["input"], list) and all(isinstance(i, str) for i in body["input"]):
        items = body["input"]
        out["input"] = items[position] if 0 <= position < len(items) else None
        return out
    messages = body.get("messages")
    if messages is None and isinstance(body.get("input"), list):
        messages = body["input"]
    if isinstance(messages, list):
        system = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
        user = [m for m in messages if isinstance(m, dict) and m.get("role") not in ("system", "developer")]
        out["system_chars"] = sum(len(_text_of(m.get("content"))) for m in system)
        out["input"] = clip("\n".join(_text_of(m.get("content")) for m in user))
    elif isinstance(body.get("input"), str):
        out["input"] = clip(body["input"])
    if isinstance(body.get("instructions"), str):  # the responses endpoint's system prompt
        out["system_chars"] = out.get("system_chars", 0) + len(body["instructions"])
    return out


def _vector(embedding: Any) -> np.ndarray | None:
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except ValueError:
            return None
        return np.frombuffer(raw, dtype="<f4") if len(raw) % 4 == 0 else None
    if isinstance(embedding, list):
        return np.asarray(embedding, dtype=np.float64)
    return None


def _answer(body: dict[str, Any]) -> str:
    """The text of a chat completion or a response body."""
    choices = body.get("choices")
    if isinstance(choices, list) and choices:
        return _text_of(((choices[0] or {}).get("message") or {}).get("content"))
    texts = [_text_of(c.get("text")) for item in body.get("output") or [] if isinstance(item, dict)
             for c in item.get("content") or [] if isinstance(c, dict)]
    return "".join(texts)


def own_output(text: str, position: int) -> dict[str, Any]:
    """What an output or error line says about the unit at `position` of its request.

    An embedding: its position in `data`, dimensions, first `VECTOR_HEAD` values and L2 norm
    (the whole line holds every input's vector). An answer: its text (clipped). An error: its
    code and message.
    """
    try:
        obj = json.loads(text)
    except ValueError:
        return {"error": "the line is not JSON"}
    response = obj.get("response") or {}
    body = response.get("body") or {}
    out: dict[str, Any] = {"status_code": response.get("status_code")}
    error = obj.get("error") or (body.get("error") if isinstance(body, dict) else None)
    if error:
        out["error"] = {"code": error.get("code"), "message": clip(str(error.get("message")))} \
            if isinstance(error, dict) else clip(str(error))
        return out
    if not isinstance(body, dict):
        return out
    data = body.get("data")
    if isinstance(data, list):
        item = next((d for d in data if isinstance(d, dict) and d.get("index") == position), None)
        vector = _vector((item or {}).get("embedding"))
        out["data_index"] = position
        if vector is None:
            out["vector"] = None
        else:
            out["vector"] = {"dims": int(vector.size), "head": [round(float(v), 6) for v in vector[:VECTOR_HEAD]],
                             "norm": round(float(np.linalg.norm(vector)), 6)}
        return out
    out["answer"] = clip(_answer(body))
    if body.get("usage"):
        out["usage"] = {k: v for k, v in body["usage"].items() if isinstance(v, int)}
    return out


class _Trail:
    def __init__(self, ctx: RunContext, run: RunStore, ident: str, *, full: bool = False) -> None:
        from batchyard.runner import job_for_run

        self.ctx, self.run, self.ident, self.full = ctx, run, ident, full
        self.job: Job = job_for_run(ctx, run)
        self.out: dict[str, Any] = {"id": ident, "run_id": run.run_id, "job": run.job, "differences": []}

    def differ(self, what: str) -> None:
        self.out["differences"].append(what)

    def locate(self) -> tuple[PartitionStore | None, dict[str, Any] | None]:
        """The partition that planned the id (or only selected or rejected it), and its plan row."""
        by_chunk = pl.col("chunk_id") == self.ident
        where = by_chunk if self.job.kind == "embeddings" else (
            (pl.col("unit_id") == self.ident) | pl.col("chunk_ids").list.contains(self.ident))
        first_seen = None
        for part in self.run.partitions():
            row = planned_table(self.job, part, where=where)
            if row is not None and row.height:
                return part, row.row(0, named=True)
            seen = _rows(part, "chunks", by_chunk) or _rows(part, "failures", pl.col("unit_id") == self.ident)
            if seen and first_seen is None:
                first_seen = part
        return first_seen, None

    def build(self) -> dict[str, Any]:
        part, planned = self.locate()
        unit = (planned or {}).get("unit_id", (planned or {}).get("chunk_id", self.ident))
        run_failures = self._run_failures()
        if part is None and not run_failures:
            raise UnitNotFound(self.ident, self.run.run_id)
        self.out.update(partition=part.pid if part else None, unit_id=unit, plan=planned)
        self.out["source"] = self.source(part, planned) if part else []
        self.out["failures"] = run_failures + (_rows(part, "failures", pl.col("unit_id") == unit) if part else [])
        self.out.update(request=None, attempts=[], result=None, loaded=None)
        if part is None or planned is None:
            return self.out
        self.request(part, planned, unit)
        self.result(part, unit)
        return self.out

    def _run_failures(self) -> list[dict[str, Any]]:
        st, out = self.run.staging, []
        for name in st.list(self.run.rel("failures"), ".parquet"):
            frame = st.read_parquet(self.run.rel("failures", name)).filter(pl.col("unit_id") == self.ident)
            out += [{"part": name[: -len(".parquet")], **r} for r in frame.iter_rows(named=True)]
        return out

    def source(self, part: PartitionStore, planned: dict[str, Any] | None) -> list[dict[str, Any]]:
        ids = (planned or {}).get("chunk_ids") or [self.ident]
        return _rows(part, "chunks", pl.col("chunk_id").is_in(ids))

    # the request and its attempts

    def request(self, part: PartitionStore, planned: dict[str, Any], unit: str) -> None:
        route = planned.get("route", "request")
        sent_as = unit
        if route == "alias":
            sent_as = planned["rep"]
            self.out["served_by"] = {"route": "alias", "chunk_id": sent_as,
                                     "why": f"same text as chunk {sent_as}: its request's vector serves this chunk"}
        elif route == "reused":
            self.out["served_by"] = {"route": "reused", "donor": planned["rep"],
                                     "why": f"the space already held this text's vector (run/chunk {planned['rep']})"}
            return
        hit = part.staging.scan_parquet([part.rel("requests.parquet")]).filter(
            pl.col("unit_ids").list.contains(sent_as)).collect()
        if hit.height == 0:
            self.differ(f"unit {sent_as} is planned but in no request of requests.parquet")
            return
        req = hit.row(0, named=True)
        position = req["unit_ids"].index(sent_as)
        self.out["request"] = {
            "custom_id": req["custom_id"], "shard": req["shard"], "position": position,
            "n_inputs": req["n_inputs"], "tokens": req["tokens"], "bytes": req["bytes"],
            "own": own_input(req["line"], position), **({"line": req["line"]} if self.full else {}),
        }
        ledger = Ledger(part)
        shard, attempt, custom_id = req["shard"], 1, req["custom_id"]
        while ledger.exists(f"{shard}.{attempt}"):
            rec = ledger.load(f"{shard}.{attempt}")
            if attempt > 1 and not _rows(part, "followups", pl.col("custom_id") == custom_id, names=[rec.name]):
                break  # settled in an earlier attempt
            self.out["attempts"].append(self.attempt(part, rec, custom_id, unit, sent_as, position))
            if rec.split_into:  # re-planned under the provider's limit: follow the unit into its new shard
                moved = _rows(part, "followups", pl.col("unit_ids").list.contains(sent_as), names=rec.split_into)
                if not moved:
                    break
                shard, custom_id = moved[0]["shard"], moved[0]["custom_id"]
                position = list(moved[0]["unit_ids"]).index(sent_as)  # its place in the re-packed request
            attempt += 1

    def attempt(
        self, part: PartitionStore, rec: ShardRecord, custom_id: str, unit: str, sent_as: str, position: int
    ) -> dict[str, Any]:
        data = read_staged(part, "shards", rec.name)
        sha_ok = data is not None and hashlib.sha256(data).hexdigest() == rec.sha256
        if not sha_ok:
            self.differ(f"{rec.key}: shards/{rec.name}.jsonl does not match the ledger's sha256 {rec.sha256}")
        raw: dict[str, Any] | None = None
        for folder in ("outputs", "errors"):
            staged = read_staged(part, folder, rec.name)
            found = find_line(staged, custom_id) if staged else None
            if found:
                raw = {"file": f"{folder}/{rec.name}.jsonl", "line_no": found[0],
                       "line_bytes": len(found[1].encode()), "own": own_output(found[1], position),
                       **({"text": found[1]} if self.full else {})}
                break
        parsed = _rows(part, "parsed", pl.col("unit_id").is_in([unit, sent_as]), names=[rec.name])
        mine = next((r for r in parsed if r["unit_id"] == unit), parsed[0] if parsed else None)
        outcome = {k: mine.get(k) for k in ("outcome", "code", "message", "final")} if mine else None
        if outcome and outcome["outcome"] == "ok" and (raw is None or not raw["file"].startswith("outputs/")):
            self.differ(f"{rec.key}: parsed says request {custom_id} is ok, but outputs/{rec.name}.jsonl "
                        "holds no line for it")
        return {
            "shard": rec.shard, "attempt": rec.attempt, "partition": rec.partition, "state": rec.state,
            "sha256": rec.sha256, "sha256_ok": sha_ok, "file_id": rec.file_id, "batch_id": rec.batch_id,
            "past_batches": rec.past_batches, "batch_status": rec.batch_status,
            "submitted_at": _iso(rec, "submitted"), "collected_at": _iso(rec, "collected"),
            "raw": raw, "outcome": outcome,
        }

    # result and sinks

    def result(self, part: PartitionStore, unit: str) -> None:
        key = self.job.result_key
        rows = _rows(part, "results", pl.col(key) == unit)
        if not rows:
            return
        row = rows[0]
        self.out["result"] = row
        rel = part.rel("loads", f"{row['part']}.json")
        receipt = part.staging.read_json(rel) if part.staging.exists(rel) else None
        loaded: dict[str, Any] = {"part": row["part"], "receipt": None}
        if receipt is not None:
            loaded["receipt"] = {"at": receipt.get("at"), "sinks": [
                {k: s.get(k) for k in ("sink", "target", "rows", "at")} for s in receipt.get("sinks", [])]}
        else:
            self.differ(f"results/{row['part']}.parquet holds the unit but has no load receipt")
        loaded.update(self.sinks(row))
        self.out["loaded"] = loaded

    def sinks(self, row: dict[str, Any]) -> dict[str, Any]:
        from batchyard.clients.milvus import get_rows
        from batchyard.stages.snapshot import get_path, mark_path, mongo_id

        ctx, job, run_id = self.ctx, self.job, self.run.run_id
        out: dict[str, Any] = {}
        if job.kind == "embeddings":
            coll = job.collection  # type: ignore[attr-defined]
            client = ctx.milvus
            got = []
            if client.has_collection(coll):
                client.load_collection(coll)
                got = get_rows(client, coll, [row["chunk_id"]],
                               ["chunk_id", "run_id", "text_sha256", "company_id", "document_id"])
            out["milvus"] = {"collection": coll, "found": bool(got), **(dict(got[0]) if got else {})}
            fields = ctx.settings.mongo.fields
            path = mark_path(fields, job.emb.space)  # type: ignore[attr-defined]
            chunks = ctx.store.chunks
            doc = chunks.find_one({fields.chunk_id: mongo_id(row["chunk_id"], row.get("id_kind") or "str")},
                                  {fields.chunk_id: 1, path: 1})
            mark = get_path(doc, path) if doc else None
            out["mongo"] = {"collection": _name(chunks), "filter": {fields.chunk_id: row["chunk_id"]},
                            "found": mark is not None, "mark_path": path, "mark": mark}
            checks = [(f"Milvus collection {coll}", got[0].get("run_id") if got else None, bool(got)),
                      (f"the mark {path} of MongoDB chunk {row['chunk_id']}", (mark or {}).get("run_id"),
                       mark is not None)]
        else:
            coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
            task = job.task  # type: ignore[attr-defined]
            flt = {"task": task.name, "task_version": job.task_version, "unit_id": row["unit_id"]}  # type: ignore[attr-defined]
            doc = coll.find_one(flt, {"result": 0, "raw_text": 0})
            out["mongo"] = {"collection": _name(coll), "filter": flt, "found": doc is not None,
                            "document": {k: str(v) if k == "_id" else v for k, v in (doc or {}).items()} or None}
            checks = [(f"MongoDB {out['mongo']['collection']}", (doc or {}).get("run_id"), doc is not None)]
        for where, writer, found in checks:
            if not found:
                self.differ(f"the result is not in {where}")
            elif writer != run_id:
                out.setdefault("superseded", []).append(f"{where} was last written by run {writer}")
        return out


def trail(ctx: RunContext, run: RunStore, ident: str, *, full: bool = False) -> dict[str, Any]:
    """The trail of one chunk or unit (see the module docstring). Raises UnitNotFound.

    `full`: also the exact request line (`request.line`) and each raw output or error line
    (`attempts[].raw.text`), whole.
    """
    return _Trail(ctx, run, ident, full=full).build()


def audit_or_trail(ctx: RunContext, run: RunStore, *, unit_id: str | None = None, sinks: bool = True,
                   full: bool = False) -> dict[str, Any]:
    """`batchyard audit` as plain JSON, whatever runs it (the CLI, or its Prefect flow): the
    trail of `unit_id` (`kind` "trail"), else the run's reconciliation (`kind` "audit"). Both
    carry `differences` (empty when everything agrees). Raises UnitNotFound."""
    if unit_id is not None:
        return {"kind": "trail", **trail(ctx, run, unit_id, full=full)}
    from batchyard.audit import audit_run

    return {"kind": "audit", **audit_run(ctx, run, sinks=sinks).to_json()}
