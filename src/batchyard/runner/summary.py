"""A run's outcome: its summary (results, failures, usage, cost), the finish step, exit codes and
the tables `status` prints."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import polars as pl

from batchyard.assets import write_run_manifests
from batchyard.corpus.lifecycle import finish_run
from batchyard.quota import TOKEN_LIMIT_CODE
from batchyard.runner.loads import receipts, sink_totals, unloaded_parts
from batchyard.schemas import FAILURES
from batchyard.storage.ledger import Ledger, run_records
from batchyard.storage.runs import RunStore, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from batchyard.context import RunContext
    from batchyard.jobs.base import Job
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.runs import PartitionStore

    Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- finish and summary


def _count_rows(ctx: RunContext, rels: list[str]) -> int:
    return sum(ctx.staging.count_rows(r) for r in rels)


def run_summary(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """Counts over the run's datasets and ledger: results, failures by code, usage, cost.

    Usage and the reported cost are what the provider accepted and finished, lane by lane: each
    shard attempt's own usage (a batch's `usage`; on the real-time lane, the sum of its answers'
    usage), priced at its lane's price, input and output. A batch refused before it ran, or the
    lines an expired or cancelled batch never ran, report none, so nothing is counted twice when
    their requests come back in a follow-up attempt or after a resume. `batches` counts the
    batches created on the Batch API, `realtime_requests` the requests sent real-time.
    """
    from batchyard.storage.ledger import run_records

    st = ctx.staging
    results = _count_rows(ctx, [r for r in run.dataset_parts("results")])
    failure_parts = run.dataset_parts("failures")
    codes = (
        pl.concat([st.read_parquet(r).select("code") for r in failure_parts]).group_by("code").len()
        if failure_parts else pl.DataFrame(schema={"code": pl.String, "len": pl.UInt32})
    )
    by_code = {str(c): int(n) for c, n in codes.sort("code").iter_rows()}
    records = run_records(run)
    parts = {p.pid: p for p in run.partitions()}
    usage: dict[str, int] = defaultdict(int)
    used: dict[str, dict[str, int]] = defaultdict(lambda: {"input_tokens": 0, "output_tokens": 0})
    from_plan = 0
    for rec in records:
        got = attempt_usage(parts[rec.partition], rec)
        if got is None:
            continue
        tokens, reported = got
        from_plan += not reported
        for k, v in tokens.items():
            usage[k] += v
            if k in ("input_tokens", "output_tokens"):
                used[rec.lane][k] += v
    cost = plan_cost_of(ctx, job, run.read_run().get("plan", {}))
    by_lane = {lane: {**n, "usd": lane_cost(ctx, job, lane, n)} for lane, n in sorted(used.items())}
    out: dict[str, Any] = {
        "results": results,
        "failures": sum(by_code.values()),
        "failures_by_code": by_code,
        "anomalies": _count_rows(ctx, run.dataset_parts("anomalies")),
        "shards": len({(r.partition, r.shard) for r in records}),
        "shard_attempts": len(records),
        "batches": sum(1 for r in records if r.batch_id and r.lane == "batch") + sum(len(r.past_batches) for r in records),
        "realtime_requests": sum(r.n_requests for r in records if r.lane == "realtime" and r.state in ("ended", "collected")),
        "usage": dict(usage),
        "cost_estimate_usd": cost["batch_usd"],
        "cost_estimate_realtime_usd": cost["realtime_usd"],
        "cost_estimate_tokens": {"input": cost["input_tokens"], "output_max": cost["output_tokens"]},
        "cost_reported_usd": round(sum(v["usd"] for v in by_lane.values()), 6),
        "lanes": by_lane,
    }
    if from_plan:
        out["usage_from_plan"] = from_plan
    return out


def attempt_usage(part: PartitionStore, rec: ShardRecord) -> tuple[dict[str, int], bool] | None:
    """What one shard attempt used: (tokens, reported by the provider), or None when it ran nothing.

    The provider's usage when it gave one; otherwise, once the attempt is collected, the planned
    tokens of its requests that came back `ok` (and the output tokens their answers state), so a
    provider without batch usage is still priced for what it finished, never for what it did not.
    """
    if rec.state not in ("ended", "collected") or rec.batch_status == "failed":
        return None
    if rec.usage and isinstance(rec.usage.get("input_tokens"), int):
        return {k: v for k, v in rec.usage.items() if isinstance(v, int) and not isinstance(v, bool)}, True
    parsed_rel = part.rel("parsed", f"{rec.name}.parquet")
    if rec.state != "collected" or not part.staging.exists(parsed_rel):
        return None
    from batchyard.stages.batches import attempt_requests

    parsed = part.staging.read_parquet(parsed_rel)
    ok = parsed.filter(pl.col("outcome") == "ok")
    plan = attempt_requests(part, rec.shard, rec.attempt).select("custom_id", "tokens")
    tokens = int(plan.join(ok.select("custom_id").unique(), on="custom_id", how="semi")["tokens"].sum() or 0)
    out = int(ok.unique("custom_id")["output_tokens"].sum() or 0) if "output_tokens" in ok.columns else 0
    return {"input_tokens": tokens, "output_tokens": out, "total_tokens": tokens + out}, False


def lane_cost(ctx: RunContext, job: Job, lane: str, tokens: dict[str, int]) -> float:
    """USD of `tokens` (input and output) at the lane's price: batch, or real-time."""
    from batchyard.pricing import estimate

    cost = estimate(ctx.settings.pricing, job.model, input_tokens=tokens.get("input_tokens", 0),
                    output_tokens=tokens.get("output_tokens", 0))
    return float(cost["batch_usd" if lane == "batch" else "realtime_usd"])


def plan_cost_of(ctx: RunContext, job: Job, plan_stats: dict[str, Any]) -> dict[str, Any]:
    """The estimated cost of a run's plan at batch prices (inference: at most `max_output_tokens`
    per request on the output side)."""
    from batchyard.pricing import plan_cost

    return plan_cost(ctx.settings.pricing, job.model, input_tokens=int(plan_stats.get("tokens", 0)),
                     requests=int(plan_stats.get("requests", 0)),
                     max_output_tokens=int(job.params().get("max_output_tokens") or 0))


def finish(ctx: RunContext, job: Job, run: RunStore) -> dict[str, Any]:
    """Phase `done`: once every partition is done, the run's summary, manifests and state."""
    info = run.read_run()
    parts = run.partitions()
    if any(p.read_state().get("phase") != "done" for p in parts):
        return info
    # cancelled only when the cancel left work undone in some partition (not when it arrived
    # after the last batch had finished)
    cancelled = info.get("state") == "cancelled" and any(p.read_state().get("cancelled") for p in parts)
    summary = run_summary(ctx, job, run)
    manifests = write_run_manifests(run)
    summary["checks_failed"] = sorted({c for m in manifests.values() for c in m["checks_failed"]})
    loads = [st for p in parts for st in receipts(p)]
    if ctx.settings.provider.delete_remote_files and not cancelled:
        delete_remote_files(ctx, run)
    meta = dict(info.get("corpus") or {})
    if meta and not meta.get("finished_at"):
        meta["targets"] = finish_run(ctx, job, run, cancelled=cancelled)
        meta["finished_at"] = utcnow().isoformat()
    summary["pruned"] = int((info.get("pruned") or {}).get("pruned", 0))
    summary["held_by_open_runs"] = info.get("held_by_open_runs", {})
    if meta.get("targets"):
        figures = meta["targets"]
        summary["targets"] = {"target": figures["target"], "rows": figures["rows"],
                              "companies_touched": len(figures.get("by_company", {}))}
    queue_rel = run.rel("queue.parquet")
    if run.staging.exists(queue_rel):
        from batchyard.provider_queue import mean_fill

        summary["queue"] = mean_fill(run.staging.read_parquet(queue_rel))
        summary["queue"]["refusals"] = sum(1 for r in run_records(run) for h in r.history
                                           if h.note and TOKEN_LIMIT_CODE in h.note)
    lanes = set(summary["lanes"]) or {str(info.get("lane", "batch"))}
    return run.update_run(phase="done", state="cancelled" if cancelled else "finished", final=summary,
                          loads=sink_totals(loads), provider=ctx.provider_label_for(lanes),
                          **({"corpus": meta} if meta else {}))


def delete_remote_files(ctx: RunContext, run: RunStore) -> int:
    """Delete a run's remote input, output and error files; returns how many were deleted."""
    from batchyard.storage.ledger import run_records

    n = 0
    for rec in run_records(run):
        for fid in (rec.file_id, rec.output_file_id, rec.error_file_id):
            if fid:
                ctx.api.delete_file(fid)
                n += 1
    return n


def exit_code(info: dict[str, Any]) -> int:
    """The process exit code a run's outcome maps to (see `batchyard --help`).

    0: every unit succeeded; 3: the run finished but some units failed; 4: the run was
    cancelled or is unfinished (e.g. detached with `--no-wait`); 5: an integrity check failed.
    """
    if info.get("state") == "cancelled" or info.get("phase") != "done":
        return 4
    final = info.get("final", {})
    if final.get("checks_failed"):
        return 5
    return 3 if final.get("failures", 0) else 0


def partition_table(run: RunStore) -> list[dict[str, Any]]:
    """Per bin: its partition keys, phase, chunks, requests, shards, results, failures."""
    out = []
    records = defaultdict(list)
    for part in run.partitions():
        for rec in Ledger(part).all():
            records[part.pid].append(rec)
    for part in run.partitions():
        state = part.read_state()
        recs = records[part.pid]
        keys = state.get("keys") or state.get("companies", [])
        out.append({
            "partition": part.pid,
            "companies": ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else ""),
            "phase": state.get("phase", "snapshot"),
            "chunks": state.get("snapshot", {}).get("chunks", 0),
            "requests": state.get("plan", {}).get("requests", 0),
            "shards": f"{sum(1 for r in recs if r.state == 'collected')}/{len(recs)}",
            "waiting": sum(1 for r in recs if r.waiting_note),
            "results": sum(part.staging.count_rows(part.rel("results", f"{n}.parquet")) for n in part.parts("results")),
            "loaded_parts": len(part.parts("results")) - len(unloaded_parts(part)),
        })
    return out


def failures_frame(run: RunStore) -> pl.DataFrame:
    """The run's failures dataset as one frame."""
    return run.read_dataset("failures", FAILURES)


def results_frame(run: RunStore) -> pl.DataFrame:
    """The run's results dataset as one frame."""
    return run.read_dataset("results")


