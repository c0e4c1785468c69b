"""The asset graph, declared as data (Dagster style), and per-asset manifests.

Each asset is a named table or set of files in a run's staging folder. A stage that
materializes an asset writes `manifests/<asset>.json` with a data version: a sha256 over the
asset's code version, the run parameters and its inputs' data versions (for the root asset, the
content of the snapshot itself). Prefect tasks materialize these assets (see
`batchyard.orchestration`), and `batchyard status` shows them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    from batchyard.storage.runs import RunStore


@dataclass(frozen=True)
class AssetSpec:
    """One asset: key, upstream keys, hand-bumped code version, files, description."""

    key: str
    deps: tuple[str, ...]
    code_version: str
    paths: tuple[str, ...]
    description: str


ASSETS: tuple[AssetSpec, ...] = (
    AssetSpec("chunks", (), "1", ("chunks.parquet", "rejects.parquet"),
              "Selected source rows from MongoDB, with the sha256 of each text; rejected rows with reasons."),
    AssetSpec("requests", ("chunks",), "1", ("requests.parquet", "shards/*.jsonl"),
              "Planned request lines and their shard files, under every Batch API limit."),
    AssetSpec("batches", ("requests",), "1", ("ledger/*.json", "outputs/*.jsonl", "errors/*.jsonl", "parsed/*.parquet"),
              "Submitted batches: ledger records, raw output and error files, per-attempt joined outcomes."),
    AssetSpec("results", ("batches",), "1", ("results.parquet", "failures.parquet", "anomalies.parquet"),
              "One row per unit that succeeded; every other planned unit in failures with its reason."),
    AssetSpec("sinks", ("results",), "1", ("loads/*.json",),
              "Vectors upserted into Milvus and marks or results written to MongoDB."),
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


def _file_sha256(run: RunStore, rel: str) -> str:
    h = hashlib.sha256()
    if run.staging.exists(rel):
        with run.staging.fs.open(run.staging.path(rel), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_manifest(run: RunStore, key: str) -> dict[str, Any] | None:
    """An asset's manifest, or None when it has not been materialized."""
    rel = run.rel("manifests", f"{key}.json")
    return dict(run.staging.read_json(rel)) if run.staging.exists(rel) else None


def data_version(code_version: str, params: dict[str, Any], inputs: dict[str, str], content: str = "") -> str:
    """sha256 over code version, parameters, input data versions and (root assets) content."""
    blob = json.dumps({"code": code_version, "params": params, "inputs": inputs, "content": content},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(run: RunStore, key: str, *, rows: int, seconds: float, params: dict[str, Any]) -> dict[str, Any]:
    """Record a materialization of `key` in this run."""
    spec = ASSET_BY_KEY[key]
    inputs = {d: (read_manifest(run, d) or {}).get("data_version", "missing") for d in spec.deps}
    content = _file_sha256(run, run.rel(spec.paths[0])) if not spec.deps else ""
    manifest = {
        "asset": key,
        "run_id": run.run_id,
        "job": run.job,
        "code_version": spec.code_version,
        "data_version": data_version(spec.code_version, params, inputs, content),
        "inputs": inputs,
        "rows": rows,
        "paths": [run.rel(p) for p in spec.paths],
        "seconds": round(seconds, 3),
        "materialized_at": utcnow().isoformat(),
    }
    run.staging.write_json(run.rel("manifests", f"{key}.json"), manifest)
    return manifest


_KEY_FORBIDDEN = re.compile(r"[\s#?&%\"'<>\[\]{}|\\^`]")


def asset_key(job: Any, key: str, root: str) -> str:
    """The asset key of one of a job's assets in one staging root.

    `batchyard://<job kind>/<space or task@version>/<asset>@<staging root>`, e.g.
    `batchyard://embeddings/text-embedding-3-small_256/results@/data/staging`: runs of
    different embedding spaces, tasks or staging roots never share a key. Characters Prefect
    refuses in keys become `_`.
    """
    if job.kind == "embeddings":
        scope = f"embeddings/{job.emb.space}"
    else:
        scope = f"inference/{job.task.name}@{job.task_version}"
    where = root.removeprefix("s3://")
    return _KEY_FORBIDDEN.sub("_", f"batchyard://{scope}/{key}@{where}")[:512]
