"""Plan benchmark: chunks -> embedding request lines -> shard files, pipeline vs per-row baseline.

Variants (each in its own process, on the same cached corpus from `data.py`):

- `load`: only `pl.read_parquet` of the input; its peak RSS is the reference for "just the data".
- `pipeline`: the real plan functions with default `LimitsSettings`, as `EmbeddingsJob.plan` calls
  them: `prepare_inputs` (bpe-openai token counts, truncation) -> `embedding_requests` (packing,
  custom_ids, JSON lines) -> `assign_shards` + `check_shards` -> `shard_bytes` per shard, written
  to a temporary directory.
- `baseline`: the straightforward way: stock `tiktoken` `encode` per text (offline vocabularies via
  `ensure_tiktoken_offline()`), then one Python loop that packs inputs into requests under the same
  per-request limits, `json.dumps` each request line, cuts shards greedily under the same shard
  limits and writes the files.

Checks: both variants put the same set of chunk ids into their requests, and their token totals
agree (bpe-openai vs tiktoken). With `--baseline-chunks M` (M < N) the baseline and a second
pipeline run use the first M rows of the corpus; the speedup is then measured at M rows and
the pipeline's N-row figures are reported beside it.

Usage:
    python benchmarks/bench_plan.py --chunks 1000000 [--baseline-chunks 200000] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

import data
from batchyard.settings import LimitsSettings
from batchyard.stages.plan import (
    ShardLimits,
    check_shards,
    embedding_requests,
    prepare_inputs,
    shard_bytes,
    split_duplicates,
)
from batchyard.tokens import ensure_tiktoken_offline
from harness import (
    Stopwatch,
    comparison_table,
    console,
    emit,
    run_worker,
    stages_table,
    worker_result,
    write_result,
)

MODEL = "text-embedding-3-small"
DIMENSIONS = 256
ENCODING = "cl100k_base"
SORT_KEY = ["company_id", "document_id", "chunk_index", "chunk_id"]


# workers (each runs in its own process)


def run_load(path: Path, n_rows: int) -> dict[str, Any]:
    sw = Stopwatch()
    with sw.stage("read parquet"):
        chunks = pl.read_parquet(path, n_rows=n_rows)
    return worker_result(sw, chunks.height)


PARTITION = 100_000  # run.partition_max_chunks: the pipeline plans one partition at a time


def run_pipeline(path: Path, n_rows: int, out: Path) -> dict[str, Any]:
    """The real plan path, as `EmbeddingsJob.plan_partition` runs it, one partition after another.

    Each partition's rows are read from the Parquet file on their own (the pipeline reads a
    partition's snapshot parts), so memory is bounded by a partition; repeated texts are planned
    once (`split_duplicates`), and token counts run on the process pool of `batchyard.tokens`.
    """
    limits = LimitsSettings()
    shard_limits = ShardLimits.from_settings(limits)
    sw = Stopwatch()
    n_in = n_inputs = n_rejected = n_truncated = n_requests = n_shards = tokens = tokens_all = n_bytes = 0
    ids: list[pl.Series] = []
    for offset in range(0, n_rows, PARTITION):
        length = min(PARTITION, n_rows - offset)
        with sw.stage("read partition"):
            chunks = pl.scan_parquet(path).slice(offset, length).collect()
        with sw.stage("prepare_inputs (tokens)"):
            inputs, rejects = prepare_inputs(chunks, limits=limits, encoding=ENCODING)
            reps, aliases = split_duplicates(inputs)
        with sw.stage("embedding_requests (pack, shards, lines)"):
            requests = embedding_requests(reps, model=MODEL, dimensions=DIMENSIONS, limits=limits,
                                          shard_limits=shard_limits)
            check_shards(requests, shard_limits)
        with sw.stage("shard_bytes + write"):
            for (shard,), part in requests.group_by(["shard"], maintain_order=True):
                content = shard_bytes(part["line"])
                (out / f"p{offset // PARTITION:04d}-{shard}.jsonl").write_bytes(content)
                n_bytes += len(content)
        n_in += chunks.height
        n_inputs += inputs.height
        n_rejected += rejects.height
        n_truncated += int(inputs["truncated"].sum())
        n_requests += requests.height
        n_shards += requests["shard"].n_unique()
        tokens += int(requests["tokens"].sum())
        tokens_all += int(inputs["tokens"].sum())
        ids += [requests["unit_ids"].explode(), aliases["chunk_id"]]
        del chunks, inputs, reps, aliases, requests
    sw.stages = merge_stages(sw.stages)
    result = worker_result(
        sw, n_in, inputs=n_inputs, rejected=n_rejected, truncated=n_truncated, requests=n_requests,
        shards=n_shards, tokens=tokens_all, tokens_sent=tokens, shard_bytes=n_bytes,
    )
    pl.DataFrame({"chunk_id": pl.concat(ids) if ids else []}).write_parquet(out / "ids.parquet")
    return result


def merge_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per stage name, in first-seen order: seconds summed, peak RSS the highest."""
    merged: dict[str, dict[str, Any]] = {}
    for s in stages:
        m = merged.setdefault(str(s["stage"]), {"stage": s["stage"], "seconds": 0.0, "cpu_seconds": 0.0,
                                               "peak_rss_mb": 0.0})
        m["seconds"] = round(m["seconds"] + float(s["seconds"]), 3)
        m["cpu_seconds"] = round(m["cpu_seconds"] + float(s["cpu_seconds"]), 3)
        m["peak_rss_mb"] = max(m["peak_rss_mb"], float(s["peak_rss_mb"]))
    return list(merged.values())


def run_baseline(path: Path, n_rows: int, out: Path) -> dict[str, Any]:
    import tiktoken

    limits = LimitsSettings()
    shard_limits = ShardLimits.from_settings(limits)
    ensure_tiktoken_offline()
    enc = tiktoken.get_encoding(ENCODING)
    cap = limits.max_tokens_per_input
    sw = Stopwatch()
    with sw.stage("read parquet + sort"):
        rows = pl.read_parquet(path, n_rows=n_rows).sort(SORT_KEY).iter_rows(named=True)
    with sw.stage("tiktoken encode per text"):
        inputs: list[tuple[str, str, str, int]] = []  # chunk_id, text, text_sha256, tokens
        n_rows_seen = rejected = truncated = 0
        for row in rows:
            n_rows_seen += 1
            text = row["text"]
            if text is None or not text.strip():
                rejected += 1
                continue
            ids = enc.encode(text, disallowed_special=())
            if len(ids) > cap:
                text, truncated = enc.decode(ids[:cap]), truncated + 1
                ids = enc.encode(text, disallowed_special=())
            inputs.append((row["chunk_id"], text, row["text_sha256"], len(ids)))
    with sw.stage("pack + json.dumps + write"):
        stats = _pack_and_write(inputs, limits, shard_limits, out)
    result = worker_result(
        sw, n_rows_seen, inputs=len(inputs), rejected=rejected, truncated=truncated, **stats
    )
    pl.DataFrame({"chunk_id": [i[0] for i in inputs]}).write_parquet(out / "ids.parquet")
    return result


def _pack_and_write(
    inputs: list[tuple[str, str, str, int]],
    limits: LimitsSettings,
    shard_limits: ShardLimits,
    out: Path,
) -> dict[str, int]:
    """Greedy packing into requests, one `json.dumps` per line, greedy cutting into shard files."""
    n_requests = n_shards = total_tokens = total_bytes = 0
    shard = {"requests": 0, "bytes": 0, "inputs": 0, "tokens": 0}
    file = None

    def emit_request(req: list[tuple[str, str, str, int]]) -> None:
        nonlocal n_requests, n_shards, total_tokens, total_bytes, file
        key = "|".join(f"{cid}:{sha}" for cid, _, sha, _ in req)
        custom_id = "emb-" + hashlib.sha256(f"{MODEL}|{DIMENSIONS}|{key}".encode()).hexdigest()[:40]
        line = json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {
                    "model": MODEL,
                    "input": [text for _, text, _, _ in req],
                    "encoding_format": "base64",
                    "dimensions": DIMENSIONS,
                },
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        size = len(line.encode()) + 1
        tokens = sum(t for *_, t in req)
        if file is None or (
            shard["requests"] + 1 > shard_limits.max_requests
            or shard["bytes"] + size > shard_limits.max_bytes
            or shard["inputs"] + len(req) > shard_limits.max_inputs
            or shard["tokens"] + tokens > shard_limits.max_tokens
        ):
            if file is not None:
                file.close()
            file = (out / f"b{n_shards:05d}.jsonl").open("w", encoding="utf-8")
            n_shards += 1
            shard.update(requests=0, bytes=0, inputs=0, tokens=0)
        file.write(line + "\n")
        shard["requests"] += 1
        shard["bytes"] += size
        shard["inputs"] += len(req)
        shard["tokens"] += tokens
        n_requests += 1
        total_tokens += tokens
        total_bytes += size

    req: list[tuple[str, str, str, int]] = []
    req_tokens = 0
    for item in inputs:
        if req and (
            len(req) >= limits.max_inputs_per_request
            or req_tokens + item[3] > limits.max_tokens_per_request
        ):
            emit_request(req)
            req, req_tokens = [], 0
        req.append(item)
        req_tokens += item[3]
    if req:
        emit_request(req)
    if file is not None:
        file.close()
    return {
        "requests": n_requests,
        "shards": n_shards,
        "tokens": total_tokens,
        "shard_bytes": total_bytes,
    }


# driver


def measure(variant: str, path: Path, n_rows: int) -> dict[str, Any]:
    """Run one variant in a fresh process; its result, with its output chunk ids loaded."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-plan-{variant}-"))
    try:
        args = ["--worker", variant, "--path", str(path), "--rows", str(n_rows), "--out", str(out)]
        res = run_worker(Path(__file__), args)
        ids_file = out / "ids.parquet"
        res["_ids"] = pl.read_parquet(ids_file)["chunk_id"] if ids_file.exists() else None
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def check_same_output(pipeline: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Same chunk ids (as a set, each once: sent, or served by a repeated text's request) and the
    same token total over every input (the pipeline sends repeated texts once)."""
    p, b = pipeline["_ids"], baseline["_ids"]
    assert p.n_unique() == p.len() and b.n_unique() == b.len(), "a chunk id appears twice"
    assert p.sort().equals(b.sort()), "pipeline and baseline planned different chunk ids"
    assert pipeline["tokens"] == baseline["tokens"], (
        f"token totals differ: {pipeline['tokens']} vs {baseline['tokens']}"
    )


def bench(n_chunks: int, baseline_chunks: int | None, seed: int) -> dict[str, Any]:
    """Run every variant; returns the comparison rows and raw results."""
    path = data.ensure_corpus(n_chunks, seed)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    m = min(baseline_chunks or n_chunks, n_chunks)
    console.print(
        f"[bold]plan[/]: corpus {path.name}, pipeline on {n_chunks:,} rows, baseline on {m:,} rows"
    )
    runs: dict[str, dict[str, Any]] = {"load": measure("load", path, n_chunks)}
    runs["pipeline"] = measure("pipeline", path, n_chunks)
    if m < n_chunks:
        runs[f"pipeline@{m}"] = measure("pipeline", path, m)
    runs["baseline"] = measure("baseline", path, m)
    same = runs[f"pipeline@{m}"] if m < n_chunks else runs["pipeline"]
    check_same_output(same, runs["baseline"])
    console.print(f"[green]check ok[/]: same {m:,} chunk ids and {same['tokens']:,} tokens in both")
    rows = []
    if m < n_chunks:
        rows.append(
            {
                "stage": f"plan (pipeline {n_chunks:,} vs baseline prefix)",
                "rows": n_chunks,
                "pipeline": runs["pipeline"],
                "baseline": runs["baseline"],
                "baseline_prefix": m,
            }
        )
    rows.append({"stage": "plan", "rows": m, "pipeline": same, "baseline": runs["baseline"]})
    for r in runs.values():
        r.pop("_ids", None)
    return {
        "rows": rows,
        "runs": runs,
        "load_at_start": load_at_start,
        "corpus": {"path": path.name, **data.describe(path)},
    }


def report(result: dict[str, Any]) -> None:
    runs = result["runs"]
    load = runs["load"]
    console.print(
        stages_table(
            "plan: stages (peak RSS so far after each)",
            {k: v for k, v in runs.items() if k != "load"},
        )
    )
    console.print(comparison_table("plan: pipeline vs baseline", result["rows"]))
    console.print(
        f"reference: reading the input alone took {load['seconds']:.2f} s and peaked at "
        f"{load['peak_rss_mb']:,.0f} MB RSS (interpreter + libraries + data)"
    )
    for row in result["rows"]:
        if "baseline_prefix" in row:
            console.print(
                f"[yellow]note[/]: row '{row['stage']}' extrapolates: the baseline ran on the first "
                f"{row['baseline_prefix']:,} rows; its rows/s is applied to {row['rows']:,} rows"
            )
    p, b = result["rows"][-1]["pipeline"], result["rows"][-1]["baseline"]
    for name, r in (("pipeline", p), ("baseline", b)):
        console.print(
            f"{name}: {r['requests']:,} requests in {r['shards']:,} shards, {r['shard_bytes'] / 2**20:,.0f} MiB, "
            f"{r['tokens']:,} tokens" + (f" ({r['tokens_sent']:,} sent: repeated texts once)" if 'tokens_sent' in r else "")
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument(
        "--baseline-chunks", type=int, default=None, help="run the baseline on this prefix only"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["load", "pipeline", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "load":
        emit(run_load(args.path, args.rows))
    elif args.worker == "pipeline":
        emit(run_pipeline(args.path, args.rows, args.out))
    elif args.worker == "baseline":
        emit(run_baseline(args.path, args.rows, args.out))
    else:
        result = bench(args.chunks, args.baseline_chunks, args.seed)
        report(result)
        console.print(f"results: {write_result('plan', result)}")


if __name__ == "__main__":
    main()
