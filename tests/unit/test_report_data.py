"""The report's derivations from ledger histories and datasets (pure)."""

from __future__ import annotations

import polars as pl
import pytest

from batchyard.report.data import (
    attempt_spans,
    check_queue_samples,
    failures_by_code,
    inflight_series,
    summary_rows,
    time_unit,
)


def ev(status: str, second: int) -> dict[str, str]:
    return {"status": status, "at": f"2026-12-01T10:00:{second:02d}+00:00", "note": None}


T0 = attempt_spans("k", "batch", 1, [ev("creating", 0)], None)[0].start  # 10:00:00 as epoch


def test_a_requeued_attempt_has_one_span_per_submission_from_create_to_terminal_status() -> None:
    history = [ev("planned", 0), ev("uploading", 1), ev("uploaded", 2), ev("creating", 3), ev("submitted", 4),
               ev("batch:failed", 5),  # refused: token_limit_exceeded
               ev("uploaded", 6), ev("creating", 9), ev("submitted", 10), ev("batch:in_progress", 11),
               ev("batch:expired", 20), ev("collected", 21)]
    spans = attempt_spans("p0000/s00000.1", "batch", 500, history, "expired")
    assert [(s.submission, s.queued_from - T0, s.start - T0, s.end - T0, s.status) for s in spans] == [  # type: ignore[operator]
        (1, 0, 3, 5, "failed"), (2, 5, 9, 20, "expired")]


def test_a_realtime_attempt_runs_from_its_first_call_to_ended_and_an_open_one_has_no_end() -> None:
    rt = attempt_spans("p/s1.2", "realtime", 10, [ev("planned", 0), ev("submitted", 2), ev("ended", 7)], "completed")
    assert [(s.start - T0, s.end - T0, s.status) for s in rt] == [(2, 7, "completed")]  # type: ignore[operator]
    live = attempt_spans("p/s2.1", "batch", 10, [ev("planned", 0), ev("creating", 1), ev("submitted", 1),
                                                  ev("batch:in_progress", 3)], "in_progress")
    assert [(s.end, s.status) for s in live] == [(None, "in flight")]
    assert attempt_spans("p/s3.1", "batch", 10, [ev("planned", 0), ev("uploading", 1)], None) == []


def test_inflight_tokens_sum_batch_submissions_between_submit_and_end_leaving_out_refusals_and_realtime() -> None:
    a = attempt_spans("a", "batch", 100, [ev("creating", 0), ev("batch:completed", 10)], "completed")
    b = attempt_spans("b", "batch", 50, [ev("creating", 5), ev("batch:in_progress", 6)], "in_progress")
    refused = attempt_spans("c", "batch", 70, [ev("creating", 2), ev("batch:failed", 3)], "failed")
    rt = attempt_spans("d", "realtime", 30, [ev("submitted", 1), ev("ended", 4)], "completed")
    times, values = inflight_series([*a, *b, *refused, *rt], now=T0 + 30)
    assert [(t - T0, v) for t, v in zip(times, values, strict=True)] == [(0, 100), (5, 150), (10, 50), (30, 0)]


def test_failures_group_by_code_most_frequent_first_with_a_few_examples() -> None:
    frame = pl.DataFrame({
        "unit_id": [f"u{i}" for i in range(7)],
        "stage": ["batch"] * 5 + ["parse"] * 2,
        "code": ["http_400"] * 5 + ["invalid_json"] * 2,
        "message": [f"unit u{i}: bad" for i in range(7)],
    })
    groups = failures_by_code(frame, examples=3)
    assert [(g["code"], g["count"], [e["unit_id"] for e in g["examples"]]) for g in groups] == [
        ("http_400", 5, ["u0", "u1", "u2"]), ("invalid_json", 2, ["u5", "u6"])]
    assert failures_by_code(frame.head(0)) == []


def test_queue_samples_need_every_column_and_are_sorted_by_time() -> None:
    frame = pl.DataFrame({"t": [2.0, 1.0], "reserved_tokens": [5, 3], "cap_tokens": [10, 10],
                          "run_inflight_tokens": [4, 2], "run_waiting_tokens": [0, 1], "extra": [0, 0]})
    assert check_queue_samples(frame)["t"].to_list() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"queue\.parquet lacks column\(s\) cap_tokens"):
        check_queue_samples(frame.drop("cap_tokens"))


def test_summary_rows_per_stage_and_time_units() -> None:
    rows = summary_rows({"plan": {"tokens": 590657, "cost_saved_usd": 0.000376, "by": {"x": 1}},
                         "final": {"checks_failed": [], "results": 3}})
    assert rows == {"plan": [("tokens", "590,657"), ("cost_saved_usd", "$0.000376")],
                    "final": [("checks_failed", "none"), ("results", "3")]}
    assert [time_unit(s)[0] for s in (30, 3600, 86_400)] == ["s", "min", "h"]
