"""The background worker: moves batches through OpenAI's lifecycle and runs their requests.

One thread steps every non-terminal batch in turn (round robin, one chunk of requests per
step), so several batches progress together and cancels are seen quickly::

    validating -> failed | in_progress -> finalizing -> completed
                           in_progress -> expired            (fault: expire_after_requests)
    validating | in_progress | finalizing -> cancelling -> cancelled

Processed request lines are appended (and fsync'ed) to `progress/<batch>.jsonl` as each chunk
finishes, so a new worker on the same state_dir resumes a batch without re-running them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchyard.localapi import shapes
from batchyard.localapi.executors import (
    ExecResult,
    Executor,
    error_result,
    make_executor,
    marker_error,
)
from batchyard.localapi.faults import request_error_hit
from batchyard.localapi.progress import Job, ProgressEntry, scan_progress
from batchyard.localapi.store import open_private
from batchyard.localapi.validation import RequestLine, token_limit_message, validate_input

if TYPE_CHECKING:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.store import Store

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25
"""Longest sleep of the worker when nothing is due (a create or cancel wakes it at once)."""
EMBEDDING_INPUTS_PER_CHUNK = 2048
CHAT_REQUESTS_PER_CHUNK = 64
DEFAULT_FILE_TTL_S = shapes.BATCH_FILE_TTL_S
EXPIRY_SWEEP_S = 60.0
"""How often the worker deletes expired files."""


def _counts(job: Job, factor: float = 1.0) -> tuple[dict[str, int], dict[str, Any]]:
    return (
        {"total": len(job.requests), "completed": job.completed, "failed": job.failed},
        shapes.usage(round(job.input_tokens * factor), job.output_tokens),
    )


class Worker:
    """Runs batches of one Store in a background thread."""

    def __init__(self, store: Store, config: LocalApiConfig) -> None:
        self.store = store
        self.config = config
        self.faults = config.faults
        self._jobs: dict[str, Job] = {}
        self._executors: dict[str, Executor] = {
            ep: make_executor(config, ep) for ep in shapes.SUPPORTED_ENDPOINTS
        }
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_sweep = 0.0
        self._thread: threading.Thread | None = None
        for rec in store.batch_records():  # progress files of finished batches are not needed
            if rec["batch"]["status"] in shapes.TERMINAL_STATUSES:
                store.progress_path(rec["batch"]["id"]).unlink(missing_ok=True)

    def executor(self, endpoint: str) -> Executor:
        """The executor of `endpoint` (the synchronous endpoints share the worker's)."""
        return self._executors[endpoint]

    # ------------------------------------------------------------------ thread control
    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._loop, name="localapi-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make the worker look at the batches now (after a create or cancel)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; close progress files and executors."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in self._jobs.values():
            job.close()
        self._jobs.clear()
        for ex in self._executors.values():
            ex.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            delay = self.run_once()
            if delay > 0 and self._wake.wait(delay):
                self._wake.clear()

    def run_once(self) -> float:
        """Step every active batch once; seconds until something is due (0: work now).

        Every EXPIRY_SWEEP_S, files past their `expires_at` are deleted (not only when next
        looked at): an expired file must not keep holding disk or its owner's storage cap.
        """
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + EXPIRY_SWEEP_S
            try:
                self.store.delete_expired()
            except OSError:
                log.exception("could not delete expired files")
        now = time.time()
        due = now + IDLE_WAIT_S
        for batch_id in self.store.active_batch_ids():
            if self._stop.is_set():
                return 0.0
            try:
                due = min(due, self._step(batch_id))
            except Exception as exc:  # a bug must not wedge the worker: fail that batch
                log.exception("local batch %s failed in the worker", batch_id)
                try:
                    self._fail(
                        batch_id, [shapes.batch_error("server_error", f"Internal error: {exc}")]
                    )
                except Exception:
                    log.exception("could not mark local batch %s failed", batch_id)
                    continue
                due = now
        return max(0.0, min(due - time.time(), IDLE_WAIT_S))

    # ------------------------------------------------------------------ state machine
    def _step(self, batch_id: str) -> float:
        rec = self.store.get_batch(batch_id)
        if rec is None:
            return time.time() + IDLE_WAIT_S
        status, t, now = rec["batch"]["status"], rec["t"], time.time()
        if status == "validating":
            due = t["created"] + self.config.validating_s
            return due if now < due else self._validate(batch_id, rec)
        if status == "in_progress":
            return self._progress(batch_id, rec)
        if status == "finalizing":
            due = t["finalizing"] + self.config.finalizing_s
            return due if now < due else self._finish(batch_id, "completed")
        if status == "cancelling":
            due = t["cancelling"] + self.faults.cancelling_s
            return due if now < due else self._finish(batch_id, "cancelled")
        return now + IDLE_WAIT_S

    def _fail(self, batch_id: str, errors: list[dict[str, Any]], model: str | None = None) -> None:
        def apply(r: dict[str, Any]) -> None:
            b = r["batch"]
            if b["status"] in shapes.TERMINAL_STATUSES:
                return
            b.update(
                status="failed", failed_at=int(time.time()), errors=shapes.batch_errors(errors)
            )
            b["model"] = b["model"] or model

        self.store.update_batch(batch_id, apply)
        job = self._jobs.pop(batch_id, None)
        if job is not None:
            job.close()

    def _validate(self, batch_id: str, rec: dict[str, Any]) -> float:
        b = rec["batch"]
        if self.store.get_file(b["input_file_id"]) is None:
            self._fail(
                batch_id,
                [
                    shapes.batch_error(
                        "invalid_file",
                        f"The input file {b['input_file_id']} no longer exists.",
                        param="input_file_id",
                    )
                ],
            )
            return time.time()
        result = validate_input(self.store.read_file(b["input_file_id"]), b["endpoint"])
        errors = list(result.errors)
        f = self.faults
        if (
            not errors
            and f.validation_failure
            and (
                f.validation_fail_batches is None
                or self.store.counters()["validation_failed"] < f.validation_fail_batches
            )
        ):
            self.store.bump("validation_failed")
            errors = [
                shapes.batch_error(
                    "invalid_request", "The batch input file failed validation (injected fault)."
                )
            ]
        if not errors and f.enqueued_token_cap is not None:
            queued = sum(
                r["tokens"]
                for r in self.store.batch_records()
                if r["batch"]["id"] != batch_id
                and r["batch"]["status"] in ("in_progress", "finalizing", "cancelling")
                and r["batch"]["model"] == result.model
            )
            if queued + round(result.total_tokens * f.token_count_factor) > f.enqueued_token_cap:
                self.store.bump("token_limit_failed")
                errors = [
                    shapes.batch_error(
                        "token_limit_exceeded",
                        token_limit_message(result.model or "", f.enqueued_token_cap),
                    )
                ]
        if errors:
            self._fail(batch_id, errors, result.model)
            return time.time()

        def apply(r: dict[str, Any]) -> bool:
            b = r["batch"]
            if b["status"] != "validating":  # cancelled meanwhile
                return False
            b.update(
                status="in_progress",
                in_progress_at=int(time.time()),
                model=result.model,
                request_counts={"total": len(result.requests), "completed": 0, "failed": 0},
            )
            r["tokens"] = round(result.total_tokens * self.faults.token_count_factor)
            return True

        job = Job(result.requests, self.store.progress_path(batch_id))
        if self.store.update_batch(batch_id, apply):
            self._jobs[batch_id] = job
        else:
            job.close()
        return time.time()

    def _job(self, batch_id: str, rec: dict[str, Any]) -> Job | None:
        """The running job of a batch, rebuilt from its input and progress file after a restart."""
        job = self._jobs.get(batch_id)
        if job is not None:
            return job
        b = rec["batch"]
        if self.store.get_file(b["input_file_id"]) is None:
            self._fail(
                batch_id,
                [
                    shapes.batch_error(
                        "invalid_file",
                        f"The input file {b['input_file_id']} was deleted while the batch ran.",
                        param="input_file_id",
                    )
                ],
            )
            return None
        result = validate_input(self.store.read_file(b["input_file_id"]), b["endpoint"])
        job = Job(result.requests, self.store.progress_path(batch_id))
        self._jobs[batch_id] = job
        return job

    def _fault_due(
        self, limit: int | None, quota: int | None, counter: str, processed: int
    ) -> bool:
        if limit is None or processed < limit:
            return False
        return quota is None or self.store.counters()[counter] < quota

    def _progress(self, batch_id: str, rec: dict[str, Any]) -> float:
        job = self._job(batch_id, rec)
        if job is None:
            return time.time()
        f, now = self.faults, time.time()
        processed = len(job.done)
        if job.remaining and self._fault_due(
            _threshold(f.cancel_after_requests, f.cancel_after_fraction, len(job.requests)), f.cancel_batches,
            "cancelled_by_server", processed
        ):
            self.store.bump("cancelled_by_server")
            self._set_cancelling(batch_id, "server")
            return now
        if job.remaining and self._fault_due(
            _threshold(f.expire_after_requests, f.expire_after_fraction, len(job.requests)), f.expire_batches,
            "expired", processed
        ):
            self.store.bump("expired")
            return self._finish(batch_id, "expired")
        if not job.remaining:
            started = rec["batch"].get("in_progress_at") or now
            if now < started + self.config.in_progress_s:  # the provider's batch latency
                return started + self.config.in_progress_s

            def to_finalizing(r: dict[str, Any]) -> None:
                if r["batch"]["status"] == "in_progress":
                    r["batch"].update(status="finalizing", finalizing_at=int(now))
                    r["t"]["finalizing"] = now

            self.store.update_batch(batch_id, to_finalizing)
            return now
        if now < job.next_at:
            return job.next_at
        chunk = job.next_chunk(*self._chunk_limits(rec["batch"]["endpoint"], processed, len(job.requests)))
        results = self._execute(rec["batch"]["endpoint"], chunk, batch_id)
        job.record(chunk, results)
        total_processed = self.store.bump("processed_requests", len(chunk))
        counts, usage = _counts(job, self.faults.token_count_factor)

        def apply(r: dict[str, Any]) -> None:
            r["batch"]["request_counts"] = counts
            r["batch"]["usage"] = usage

        self.store.update_batch(batch_id, apply)
        if self.config.seconds_per_request > 0:
            job.next_at = time.time() + self.config.seconds_per_request
        self._maybe_exit(total_processed)
        return time.time()

    def _chunk_limits(self, endpoint: str, processed: int, total: int) -> tuple[int, int | None]:
        """(max requests, max embedding inputs) of the next chunk, stopping at fault thresholds."""
        f = self.faults
        if self.config.seconds_per_request > 0:
            max_requests = 1
        elif endpoint == "/v1/embeddings":
            max_requests = 512
        elif self.config.chat_executor == "forward":
            max_requests = 2 * self.config.forward_concurrency
        else:
            max_requests = CHAT_REQUESTS_PER_CHUNK
        for limit in (_threshold(f.cancel_after_requests, f.cancel_after_fraction, total),
                      _threshold(f.expire_after_requests, f.expire_after_fraction, total)):
            if limit is not None and processed < limit:
                max_requests = min(max_requests, limit - processed)
        if f.exit_after_requests is not None and not self.store.counters()["exit_kills"]:
            left = f.exit_after_requests - self.store.counters()["processed_requests"]
            if left > 0:
                max_requests = min(max_requests, left)
        inputs = EMBEDDING_INPUTS_PER_CHUNK if endpoint == "/v1/embeddings" else None
        return max_requests, inputs

    def _maybe_exit(self, total_processed: int) -> None:
        f = self.faults
        if (
            f.exit_after_requests is not None
            and total_processed >= f.exit_after_requests
            and not self.store.counters()["exit_kills"]
        ):
            self.store.bump("exit_kills")
            log.warning("exit_after_requests=%s reached: killing the server", f.exit_after_requests)
            os.kill(os.getpid(), signal.SIGKILL)

    def _execute(self, endpoint: str, items: list[RequestLine], batch_id: str) -> list[ExecResult]:
        """Answers of a chunk: injected request faults first, the executor for the rest."""
        f = self.faults
        results: list[ExecResult | None] = [None] * len(items)
        run: list[int] = []
        for pos, item in enumerate(items):
            marked = marker_error(endpoint, item.body, text_markers=f.text_markers)
            if marked is not None:
                results[pos] = marked
            elif request_error_hit(
                f.seed, item.custom_id, f.request_error_rate, None if f.request_error_sticky else batch_id
            ):
                results[pos] = error_result(f.request_error_status)
            else:
                run.append(pos)
        if run:
            try:
                answers = self._executors[endpoint].run([items[p] for p in run])
            except Exception as exc:  # the executor broke: these requests fail with a 500
                log.exception("executor for %s failed", endpoint)
                answers = [error_result(500, f"The local executor failed: {exc}") for _ in run]
            for pos, ans in zip(run, answers, strict=True):
                results[pos] = ans
        return [r for r in results if r is not None]

    def _set_cancelling(self, batch_id: str, reason: str) -> None:
        def apply(r: dict[str, Any]) -> None:
            if r["batch"]["status"] in ("validating", "in_progress", "finalizing"):
                now = time.time()
                r["batch"].update(status="cancelling", cancelling_at=int(now))
                r["t"]["cancelling"] = now
                r["cancel_reason"] = reason

        self.store.update_batch(batch_id, apply)
        self.wake()

    # ------------------------------------------------------------------ finishing
    def _finish(self, batch_id: str, status: str) -> float:
        """Write output/error files and move the batch to `status` (completed/expired/cancelled)."""
        rec = self.store.get_batch(batch_id)
        assert rec is not None
        b = rec["batch"]
        now = time.time()
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[
            status
        ]
        job = self._job(batch_id, rec) if b["in_progress_at"] is not None else None
        if b["in_progress_at"] is not None and job is None:
            return now  # _job failed the batch
        fields: dict[str, Any] = {"status": status, stamp: int(now)}
        if job is not None:
            fields.update(self._write_results(batch_id, rec, job, status))
            counts, usage = _counts(job, self.faults.token_count_factor)
            fields.update(request_counts=counts, usage=usage)

        def apply(r: dict[str, Any]) -> None:
            if r["batch"]["status"] not in shapes.TERMINAL_STATUSES:
                r["batch"].update(fields)

        self.store.update_batch(batch_id, apply)
        if job is not None:
            job.close()
            self._jobs.pop(batch_id, None)
        self.store.progress_path(batch_id).unlink(missing_ok=True)
        return now

    def _write_results(
        self, batch_id: str, rec: dict[str, Any], job: Job, status: str
    ) -> dict[str, Any]:
        """Output and error files of a batch; their ids (None when a file would be empty)."""
        entries = scan_progress(job.progress)
        ok = [e for e in entries if e.ok]
        bad = [e for e in entries if not e.ok]
        done = {e.index for e in entries}
        extra: list[str] = []
        if status in ("expired", "cancelled"):
            code, msg = (
                ("batch_expired", shapes.EXPIRED_MESSAGE)
                if status == "expired"
                else ("batch_cancelled", shapes.CANCELLED_MESSAGE)
            )
            extra = [
                shapes.failed_line(r.custom_id, code, msg) + "\n"
                for r in job.requests
                if r.index not in done
            ]
        rng = random.Random(batch_id)
        if self.config.shuffle_output:
            rng.shuffle(ok)
        ttl = rec.get("output_expires_after") or DEFAULT_FILE_TTL_S
        owner = rec.get("owner")  # the batch's output and error files belong to its owner
        out_id = self._write_file(batch_id, "output", job.progress, ok, [], ttl, owner)
        err_lines: list[ProgressEntry | str] = [*bad, *extra]
        if self.config.shuffle_output:
            rng.shuffle(err_lines)
        err_id = self._write_file(batch_id, "error", job.progress, [], err_lines, ttl, owner)
        return {"output_file_id": out_id, "error_file_id": err_id}

    def _write_file(
        self,
        batch_id: str,
        kind: str,
        progress: Path,
        entries: list[ProgressEntry],
        mixed: list[ProgressEntry | str],
        ttl: int,
        owner: str | None,
    ) -> str | None:
        items: list[ProgressEntry | str] = [*entries, *mixed]
        if not items:
            return None
        file_id = "file-" + _stable_hex(f"{batch_id}:{kind}")
        tmp = self.store.tmp_blob_path(file_id)
        with open(progress, "rb") as src, open_private(tmp, "wb") as dst:
            for item in items:
                if isinstance(item, str):
                    dst.write(item.encode("utf-8"))
                else:
                    src.seek(item.offset)
                    dst.write(src.read(item.length))
            dst.flush()
            os.fsync(dst.fileno())
        self.store.register_file(
            tmp,
            file_id=file_id,
            filename=f"{batch_id}_{kind}.jsonl",
            purpose="batch_output",
            expires_after_s=ttl,
            owner=owner,
        )
        return file_id


def _threshold(count: int | None, fraction: float | None, total: int) -> int | None:
    """Requests after which a fault hits: an absolute count, or a share of the batch (rounded down)."""
    if count is not None:
        return count
    if fraction is not None:
        return int(fraction * total)
    return None


def _stable_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]
