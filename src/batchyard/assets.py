"""The asset graph, declared as data (Dagster style): specs, data versions, checks, asset keys.

```
mongodb://…/<db>/<chunks collection>        (source, external)
   └─▶ chunks ─▶ requests ─▶ batches ─▶ results ─▶ sinks
                                                    └─▶ milvus://…/<collection>, mongodb://…/<collection>
```

Each pipeline asset is a set of files in one partition of a run (`p=<id>/`). A stage that
materializes it writes `p=<id>/manifests/<asset>.json`:

- `data_version`: sha256 over the asset's code version, the run parameters, its inputs' data
  versions and, where the content is not determined by the inputs, the content itself (the
  snapshot's parts for `chunks`, the downloaded output files for `batches`);
- `code_version`, `inputs`, `rows`, `paths`, timings, and the results of its **checks**.

The run keeps a roll-up `manifests/<asset>.json` over its partitions. What the corpus holds
across runs, per stable partition key, and whether it is fresh or stale, is the corpus state's
business (`batchyard.corpus`, `batchyard assets`).

Prefect materializes these assets with the same keys (`asset_key`) and the manifests'
figures as metadata (see `batchyard.orchestration`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.runs import PartitionStore, RunStore


@dataclass(frozen=True)
class AssetSpec:
    """One asset: key, upstream keys, hand-bumped code version, files, description, checks."""

    key: str
    deps: tuple[str, ...]
    code_version: str
    paths: tuple[str, ...]
    description: str
    checks: tuple[str, ...] = ()


ASSETS: tuple[AssetSpec, ...] = (
    AssetSpec("chunks", (), "2", ("chunks/*.parquet", "failures/snapshot-*.parquet", "failures/duplicates.parquet"),
              "Selected source rows from MongoDB, with the sha256 of each text; rejected rows with reasons."),
    AssetSpec("requests", ("chunks",), "2",
              ("requests.parquet", "shards/*.1.jsonl", "inputs.parquet", "units.parquet", "failures/plan.parquet"),
              "Planned request lines and their shard files, under every Batch API limit.",
              checks=("unique_custom_ids",)),
    AssetSpec("batches", ("requests",), "2",
              ("ledger/*.json", "outputs/*.jsonl", "errors/*.jsonl", "followups/*.parquet", "parsed/*.parquet"),
              "Submitted batches: ledger records, raw output and error files, per-attempt joined outcomes."),
    AssetSpec("results", ("batches",), "2", ("results/*.parquet", "failures/*.parquet", "anomalies/*.parquet"),
              "One row per unit that succeeded; every other planned unit in failures with its reason.",
              checks=("every_unit_once", "vectors_valid")),
    AssetSpec("sinks", ("results",), "2", ("loads/*.json",),
              "Vectors upserted into Milvus and marks or results written to MongoDB.",
              checks=("sinks_match_results",)),
)

ASSET_BY_KEY = {a.key: a for a in ASSETS}


def check_graph(assets: tuple[AssetSpec, ...] = ASSETS) -> list[str]:
    """Topological order of the graph; raises ValueError on unknown deps or a cycle."""
    keys = {a.key for a in assets}
    for a in assets:
        missing = set(a.deps) - keys
        if missing:
            raise ValueError(f"asset {a.key!r} depends on unknown {sorted(missing)}")
    order: list[str] = []
    pending = {a.key: set(a.deps) for a in assets}
    while pending:
        ready = sorted(k for k, d in pending.items() if d <= set(order))
        if not ready:
            raise ValueError(f"asset graph has a cycle among {sorted(pending)}")
        order.extend(ready)
        for k in ready:
            del pending[k]
    return order


# --------------------------------------------------------------------------- keys

_KEY_FORBIDDEN = re.compile(r"[\s#?&%\"'<>\[\]{}|\\^`]")


def _clean(key: str) -> str:
    return _KEY_FORBIDDEN.sub("_", key)[:512]


def job_scope(job: Any) -> str:
    """`embeddings/<space>` or `inference/<task>`: what one asset lineage is about.

    A task's version is not part of it: a prompt edit is a new version of the same asset (its
    materializations carry the task version as their code version), as in Dagster.
    """
    if job.kind == "embeddings":
        return f"embeddings/{job.emb.space}"
    return f"inference/{job.task.name}"


def asset_key(job: Any, key: str, root: str) -> str:
    """The asset key of one of a job's assets in one staging root.

    `batchyard://<job kind>/<space or task>/<asset>@<staging root>`, e.g.
    `batchyard://embeddings/text-embedding-3-small_256/results@/data/staging`: the same in every
    run; runs of different embedding spaces, tasks or staging roots never share a key.
    Characters Prefect refuses in keys become `_`.
    """
    return _clean(f"batchyard://{job_scope(job)}/{key}@{root.removeprefix('s3://')}")


def source_asset_key(ctx: RunContext) -> str:
    """`mongodb://<hosts or standin>/<db>/<chunks collection>` (never credentials)."""
    s = ctx.settings.mongo
    return _clean(f"mongodb://{_mongo_where(ctx)}/{s.database}/{s.chunks_collection}")


def target_asset_keys(ctx: RunContext, job: Any) -> list[str]:
    """Where results land: the Milvus collection and/or MongoDB collection of the job."""
    s = ctx.settings
    if job.kind == "embeddings":
        from batchyard.clients.milvus import is_local_uri

        uri = s.milvus.uri or str(ctx.staging.local_dir() / "milvus.db")
        where = ("lite/" + uri.replace("\\", "/").lstrip("/") if is_local_uri(uri)
                 else uri.split("://", 1)[-1].rpartition("@")[2])
        return [_clean(f"milvus://{where}/{job.collection}"),
                _clean(f"mongodb://{_mongo_where(ctx)}/{s.mongo.database}/{s.mongo.chunks_collection}"
                       f"/{s.mongo.fields.marks}.{job.emb.space}")]
    return [_clean(f"mongodb://{_mongo_where(ctx)}/{s.mongo.database}/{job.results_collection}")]


def _mongo_where(ctx: RunContext) -> str:
    """The hosts of a MongoDB URI, or `standin/<its folder>`: two stand-ins never share a key."""
    uri = ctx.settings.mongo.uri
    if uri is None:
        return "standin/" + str(ctx.staging.local_dir(".mongo-standin").resolve()).replace("\\", "/").lstrip("/")
    from batchyard.clients.mongo import redact_uri

    return redact_uri(uri.get_secret_value()).split("://", 1)[-1]


# --------------------------------------------------------------------------- data versions


def data_version(code_version: str, params: dict[str, Any], inputs: dict[str, str], content: str = "") -> str:
    """sha256 over code version, parameters, input data versions and (where needed) content."""
    blob = json.dumps({"code": code_version, "params": params, "inputs": inputs, "content": content},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _files_sha256(part: PartitionStore, folder: str, prefix: str = "", suffix: str = "") -> str:
    """sha256 over the names and bytes of the files of a partition folder (sorted)."""
    h = hashlib.sha256()
    st = part.staging
    for name in st.list(part.rel(folder), suffix):
        if name.startswith(prefix):
            h.update(name.encode())
            h.update(hashlib.sha256(st.read_bytes(part.rel(folder, name))).digest())
    return h.hexdigest()


CONTENT: dict[str, Callable[[PartitionStore], str]] = {
    "chunks": lambda p: _files_sha256(p, "chunks", suffix=".parquet") + _files_sha256(p, "failures", "snapshot-"),
    "batches": lambda p: _files_sha256(p, "outputs") + _files_sha256(p, "errors"),
}


def read_manifest(store: RunStore | PartitionStore, key: str) -> dict[str, Any] | None:
    """An asset's manifest (of a partition, or the run's roll-up), or None when not materialized."""
    rel = store.rel("manifests", f"{key}.json")
    return dict(store.staging.read_json(rel)) if store.staging.exists(rel) else None


def write_manifest(
    part: PartitionStore,
    key: str,
    *,
    rows: int,
    seconds: float,
    params: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    checks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Record a materialization of `key` in one partition."""
    spec = ASSET_BY_KEY[key]
    inputs = {d: (read_manifest(part, d) or {}).get("data_version", "missing") for d in spec.deps}
    content = CONTENT[key](part) if key in CONTENT else ""
    manifest = {
        "asset": key,
        "run_id": part.run_id,
        "job": part.run.job,
        "partition": part.pid,
        "code_version": spec.code_version,
        "data_version": data_version(spec.code_version, params, inputs, content),
        "inputs": inputs,
        "rows": rows,
        "paths": [part.staging.path(part.rel(p)) for p in spec.paths],
        "seconds": round(seconds, 3),
        "materialized_at": utcnow().isoformat(),
        "metadata": metadata or {},
        "checks": checks or [],
    }
    part.staging.write_json(part.rel("manifests", f"{key}.json"), manifest)
    return manifest


def write_run_manifests(run: RunStore) -> dict[str, dict[str, Any]]:
    """The run's roll-up manifests: per asset, a version over its partitions' versions."""
    out: dict[str, dict[str, Any]] = {}
    parts = run.partitions()
    for spec in ASSETS:
        manifests = [m for p in parts if (m := read_manifest(p, spec.key)) is not None]
        versions = {m["partition"]: m["data_version"] for m in manifests}
        inputs = {d: out[d]["data_version"] for d in spec.deps if d in out}
        checks = [c for m in manifests for c in m.get("checks", [])]
        roll = {
            "asset": spec.key,
            "run_id": run.run_id,
            "job": run.job,
            "code_version": spec.code_version,
            "data_version": hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()
            if len(versions) == len(parts) else "missing",
            "inputs": inputs,
            "partitions": versions,
            "rows": sum(int(m.get("rows", 0)) for m in manifests),
            "checks_failed": sorted({c["name"] for c in checks if not c["passed"]}),
            "materialized_at": max((m["materialized_at"] for m in manifests), default=None),
        }
        run.staging.write_json(run.rel("manifests", f"{spec.key}.json"), roll)
        out[spec.key] = roll
    return out


# --------------------------------------------------------------------------- checks


@dataclass
class CheckResult:
    """The outcome of one asset check on one partition."""

    name: str
    asset: str
    passed: bool
    detail: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "asset": self.asset, "passed": self.passed, "detail": self.detail,
                "metadata": self.metadata}


def _unique_custom_ids(ctx: RunContext, job: Job, part: PartitionStore) -> CheckResult:
    st = part.staging
    rels = [part.rel("requests.parquet")] if st.exists(part.rel("requests.parquet")) else []
    rels += [part.rel("followups", n) for n in st.list(part.rel("followups"), ".parquet")]
    frames = [st.read_parquet(r).select("shard", "attempt", "custom_id") for r in rels]
    if not frames:
        return CheckResult("unique_custom_ids", "requests", True, "no requests")
    dup = pl.concat(frames).group_by("shard", "attempt", "custom_id").len().filter(pl.col("len") > 1)
    if dup.height:
        row = dup.row(0, named=True)
        return CheckResult("unique_custom_ids", "requests", False,
                           f"custom_id {row['custom_id']} appears {row['len']} times in shard "
                           f"{row['shard']}.{row['attempt']}", {"repeated": dup.height})
    return CheckResult("unique_custom_ids", "requests", True, "every custom_id is unique within its shard")


def _every_unit_once(ctx: RunContext, job: Job, part: PartitionStore) -> CheckResult:
    st = part.staging
    planned = set(job.planned_units(part)["unit_id"].to_list())
    res = [st.read_parquet(part.rel("results", f"{n}.parquet")) for n in part.parts("results")]
    res_ids = [u for f in res if f.height for u in f[job.result_key].to_list()]
    fails = [st.read_parquet(part.rel("failures", f"{n}.parquet")) for n in part.parts("failures")]
    failures = pl.concat(fails) if fails else pl.DataFrame(schema={"unit_id": pl.String, "stage": pl.String,
                                                                  "code": pl.String})
    rejected = set(failures.filter(pl.col("stage").is_in(["snapshot", "plan"]))["unit_id"].to_list())
    fail_ids = failures.filter(pl.col("code") != "duplicate_chunk_id")["unit_id"].to_list()
    problems = {
        "twice_in_results": len(res_ids) - len(set(res_ids)),
        "twice_in_failures": len(fail_ids) - len(set(fail_ids)),
        "in_both": len(set(res_ids) & set(fail_ids)),
        "in_neither": len(planned - set(res_ids) - set(fail_ids)),
        "unplanned": len((set(res_ids) | set(fail_ids)) - planned - rejected),
    }
    bad = {k: v for k, v in problems.items() if v}
    detail = (", ".join(f"{k}={v}" for k, v in bad.items()) if bad
              else f"{len(planned)} planned units: {len(set(res_ids))} results, {len(set(fail_ids) & planned)} failures")
    return CheckResult("every_unit_once", "results", not bad, detail, problems)


def _vectors_valid(ctx: RunContext, job: Job, part: PartitionStore) -> CheckResult:
    if job.kind != "embeddings":
        return CheckResult("vectors_valid", "results", True, "not an embeddings job")
    dims = job.dims  # type: ignore[attr-defined]
    bad = 0
    rows = 0
    for name in part.parts("results"):
        frame = part.staging.read_parquet(part.rel("results", f"{name}.parquet"))
        if frame.height == 0:
            continue
        rows += frame.height
        vec = frame["vector"]
        if not isinstance(vec.dtype, pl.Array) or vec.dtype.size != dims:
            bad += frame.height
            continue
        arr = vec.to_numpy()
        finite = ~vec.is_null().to_numpy()
        if arr.size:
            finite &= (abs(arr.reshape(frame.height, dims)) < math.inf).all(axis=1)
        bad += int((~finite).sum())
    return CheckResult("vectors_valid", "results", bad == 0,
                       f"{rows} vectors of {dims} finite floats" if bad == 0 else f"{bad} of {rows} vectors are "
                       f"not {dims} finite floats", {"rows": rows, "bad": bad})


def _sinks_match_results(ctx: RunContext, job: Job, part: PartitionStore) -> CheckResult:
    st = part.staging
    frames = [st.read_parquet(part.rel("results", f"{n}.parquet")) for n in part.parts("results")]
    frames = [f for f in frames if f.height]
    if not frames:
        return CheckResult("sinks_match_results", "sinks", True, "nothing to load")
    results = pl.concat(frames, how="diagonal_relaxed")
    if job.kind == "embeddings":
        from batchyard.clients.milvus import get_rows

        ids = results["chunk_id"].to_list()
        found = 0
        client = ctx.milvus
        name = job.collection  # type: ignore[attr-defined]
        client.load_collection(name)  # a new process (a resumed run) starts with it released
        for i in range(0, len(ids), 1000):
            found += len(get_rows(client, name, ids[i : i + 1000], ["chunk_id"]))
        fields = ctx.settings.mongo.fields
        path = f"{fields.marks}.{job.emb.space}.run_id"  # type: ignore[attr-defined]
        marked = 0
        for i in range(0, len(ids), 1000):
            marked += ctx.store.chunks.count_documents({fields.chunk_id: {"$in": ids[i : i + 1000]},
                                                        path: {"$exists": True}})
        metadata = {"results": len(ids), "milvus": found, "marks": marked}
        ok = found == len(ids) == marked
    else:
        units = results["unit_id"].to_list()
        coll = ctx.store.collection(job.results_collection)  # type: ignore[attr-defined]
        task, version = job.task.name, job.task_version  # type: ignore[attr-defined]
        stored = sum(int(coll.count_documents({"task": task, "task_version": version,
                                               "unit_id": {"$in": units[i : i + 1000]}}))
                     for i in range(0, len(units), 1000))
        metadata = {"results": len(units), "mongo": stored}
        ok = stored == len(units)
    detail = ", ".join(f"{k}={v}" for k, v in metadata.items())
    return CheckResult("sinks_match_results", "sinks", ok, detail, metadata)


CHECKS: dict[str, Callable[[RunContext, Job, PartitionStore], CheckResult]] = {
    "unique_custom_ids": _unique_custom_ids,
    "every_unit_once": _every_unit_once,
    "vectors_valid": _vectors_valid,
    "sinks_match_results": _sinks_match_results,
}


def run_checks(ctx: RunContext, job: Job, part: PartitionStore, asset: str) -> list[CheckResult]:
    """Run the declared checks of an asset on one partition."""
    return [CHECKS[name](ctx, job, part) for name in ASSET_BY_KEY[asset].checks]
