"""Token counts of a column: exact in the pool and in-process, order, repeats, fallbacks, reuse."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import signal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchyard import tokens
from batchyard.tokens import count_tokens, token_counts, tokens_over

ENCODINGS = ["cl100k_base", "o200k_base"]

VARIED = [
    "Revenue rose 12% to €4.2bn in FY2025, driven by services.",
    "naïve café — Zürich, São Paulo, Kraków",
    "東京証券取引所に上場している企業の決算短信。",
    "삼성전자 2025년 3분기 실적 발표",
    "Выручка выросла на 12%.",
    "عائدات الشركة ارتفعت",
    "📈📉🚀 growth 👩‍👩‍👧‍👦 family 🇺🇸🇯🇵",
    "e\u0301 combining a\u030a marks",
    "",
    " ",
    "     \t\t\n\n\n   ",
    "\n" * 50,
    "word " * 3_000,
    "x" * 20_000,
    "<|endoftext|> special-token text is ordinary text here <|fim_prefix|>",
    "\x00 nul \x1b[31m escape \r\n crlf",
    "1234567890" * 100,
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    ("The Company's risk factors include competition, regulation and currency. " * 400),
]


def corpus(n: int, seed: int = 7) -> list[str]:
    """`n` texts: the varied ones, random mixes of them, and repeats."""
    rng = random.Random(seed)
    out = list(VARIED)
    while len(out) < n:
        parts = rng.sample(VARIED, k=rng.randint(1, 4))
        out.append(" ".join(p[: rng.randint(0, len(p))] for p in parts))
        if rng.random() < 0.2:
            out.append(rng.choice(out))
    return out[:n]


def in_process(texts: list[str], encoding: str) -> list[int]:
    return count_tokens(texts, encoding)


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No pool left over from another test; restore the module's pool state afterwards."""
    tokens.shutdown_pool()
    monkeypatch.setattr(tokens, "_pool_broken", False)
    yield
    tokens.shutdown_pool()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dedupe", [True, False], ids=["dedupe", "no-dedupe"])
def test_pool_counts_equal_in_process_counts(encoding: str, dedupe: bool, fresh_pool: Any) -> None:
    texts = corpus(600)
    got = token_counts(
        pl.Series("text", texts), encoding, workers=2, dedupe=dedupe, min_pool_bytes=0
    )
    assert got.dtype == pl.Int64 and got.name == "text"
    assert got.to_list() == in_process(texts, encoding)
    assert len(multiprocessing.active_children()) == 2  # it did run in the pool


def test_in_process_path_gives_the_same_counts() -> None:
    texts = corpus(300)
    got = token_counts(pl.Series(texts), "cl100k_base", workers=1)
    assert got.to_list() == in_process(texts, "cl100k_base")


def test_order_is_kept_across_tasks(fresh_pool: Any) -> None:
    # 1..n repetitions of one token give counts 1..n; shuffled, each count must stay in its row
    texts = ["a" + " a" * (i - 1) for i in range(1, 2_001)]
    assert in_process(texts[:5], "cl100k_base") == [1, 2, 3, 4, 5]
    random.Random(1).shuffle(texts)
    got = token_counts(pl.Series(texts), "cl100k_base", workers=2, min_pool_bytes=0)
    assert got.to_list() == [t.count("a") for t in texts]


@pytest.mark.parametrize("dedupe", [True, False])
def test_repeats_are_counted_once(monkeypatch: pytest.MonkeyPatch, dedupe: bool) -> None:
    seen: list[str] = []
    real = tokens._tokenizer("cl100k_base")

    class Spy:  # the real tokenizer, recording what it is asked to count
        def count(self, text: str) -> int:
            seen.append(text)
            return real.count(text)

    monkeypatch.setattr(tokens, "_tokenizer", lambda encoding: Spy())
    texts = ["boilerplate disclaimer", "unique one", "boilerplate disclaimer", None, "", ""]
    texts += ["boilerplate disclaimer"] * 10
    got = token_counts(pl.Series(texts), "cl100k_base", workers=1, dedupe=dedupe)
    assert got.to_list() == [None if t is None else real.count(t) for t in texts]
    present = [t for t in texts if t is not None]
    assert sorted(seen) == sorted(set(present) if dedupe else present)


def test_nulls_and_empty_input(fresh_pool: Any) -> None:
    assert token_counts(pl.Series([], dtype=pl.String)).to_list() == []
    assert token_counts(pl.Series([None, None], dtype=pl.String)).to_list() == [None, None]
    assert token_counts(pl.Series([None, None])).to_list() == [None, None]  # dtype Null
    assert tokens_over(pl.Series([None]), 5).to_list() == [None]
    texts = [None, "a b", None, "a b", "c"]
    for workers in (1, 2):
        got = token_counts(pl.Series(texts), workers=workers, min_pool_bytes=0)
        assert got.to_list() == [None, 2, None, 2, 1]


def test_env_var_one_counts_in_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_pool: Any
) -> None:
    monkeypatch.setenv(tokens.WORKERS_ENV, "1")
    texts = corpus(200)
    with caplog.at_level(logging.DEBUG, logger="batchyard.tokens"):
        got = token_counts(pl.Series(texts), min_pool_bytes=0)
    assert got.to_list() == in_process(texts, "cl100k_base")
    assert multiprocessing.active_children() == []
    lines = [r for r in caplog.records if r.name == "batchyard.tokens"]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert "in this process" in lines[0].getMessage()


@pytest.mark.parametrize("raw", ["0", "two", "-3"])
def test_bad_env_var_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(tokens.WORKERS_ENV, raw)
    with pytest.raises(ValueError, match=f"BATCHYARD_TOKEN_WORKERS='{raw}'"):
        token_counts(pl.Series(["x"]))


def _count_in_daemon(texts: list[str], queue: Any) -> None:
    """Runs in a daemonic child: count with the pool requested, report counts and log lines."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(f"{r.levelname}: {r.getMessage()}")  # type: ignore[method-assign]
    log = logging.getLogger("batchyard.tokens")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:  # the premise: multiprocessing refuses this process any child
        multiprocessing.get_context("spawn").Process(target=print).start()
        refused = ""
    except AssertionError as exc:
        refused = str(exc)
    counts = token_counts(pl.Series(texts), workers=2, min_pool_bytes=0).to_list()
    queue.put((counts, records, refused))


def test_daemonic_process_counts_in_process() -> None:
    texts = corpus(200)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_count_in_daemon, args=(texts, queue), daemon=True)
    child.start()
    counts, records, refused = queue.get(timeout=120)
    child.join(timeout=30)
    assert "daemonic processes are not allowed to have children" in refused
    assert counts == in_process(texts, "cl100k_base")
    assert records == [
        "DEBUG: token counting in this process: a daemonic process may not have children"
    ]


def test_pool_is_reused_across_calls(fresh_pool: Any) -> None:
    texts = pl.Series(corpus(400))
    token_counts(texts, workers=2, min_pool_bytes=0)
    first = sorted(p.pid for p in multiprocessing.active_children())
    for _ in range(3):
        token_counts(texts, workers=2, min_pool_bytes=0)
        tokens_over(texts, 10, workers=2, min_pool_bytes=0)
    assert len(first) == 2
    assert sorted(p.pid for p in multiprocessing.active_children()) == first


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux-only")
def test_pool_leaves_no_memory_file_open(fresh_pool: Any) -> None:
    token_counts(pl.Series(corpus(300)), workers=2, min_pool_bytes=0)
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the fd listing itself is closed meanwhile
            links.append(os.readlink(fd))
    assert [x for x in links if "batchyard-tokens" in x] == []


def test_running_pool_is_used_from_the_lower_threshold(fresh_pool: Any) -> None:
    small = pl.Series(corpus(50))  # far below both thresholds
    token_counts(small, workers=2)
    assert multiprocessing.active_children() == []  # too small to start the pool
    token_counts(small, workers=2, min_pool_bytes=0)
    assert len(multiprocessing.active_children()) == 2


def test_broken_pool_falls_back_and_stays_exact(
    caplog: pytest.LogCaptureFixture, fresh_pool: Any
) -> None:
    texts = corpus(300)
    token_counts(pl.Series(texts), workers=2, min_pool_bytes=0)
    for p in multiprocessing.active_children():
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=10)
    with caplog.at_level(logging.DEBUG, logger="batchyard.tokens"):
        got = token_counts(pl.Series(texts), workers=2, min_pool_bytes=0)
        again = token_counts(pl.Series(texts), workers=2, min_pool_bytes=0)
    assert got.to_list() == again.to_list() == in_process(texts, "cl100k_base")
    messages = [r.getMessage() for r in caplog.records if r.name == "batchyard.tokens"]
    assert "process pool failed" in messages[0]
    assert messages[1:] == ["token counting in this process: the process pool failed earlier"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_utf8_bytes_bound_token_counts(encoding: str) -> None:
    texts = corpus(400)
    for text, n in zip(texts, in_process(texts, encoding), strict=True):
        assert n <= len(text.encode("utf-8"))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("limit", [0, 1, 5, 50, 4_000])
def test_tokens_over_matches_counts(workers: int, limit: int, fresh_pool: Any) -> None:
    texts = [*corpus(300), None]
    counts = token_counts(pl.Series(texts), workers=1)
    got = tokens_over(pl.Series(texts), limit, workers=workers, min_pool_bytes=0)
    assert got.dtype == pl.Boolean
    assert got.to_list() == [None if c is None else c > limit for c in counts.to_list()]


def test_tokens_over_at_the_exact_limit() -> None:
    text = "a" + " a" * 99  # 100 tokens, 199 bytes
    assert in_process([text], "cl100k_base") == [100]
    got = tokens_over(pl.Series([text, text, "a"]), 100).to_list()
    assert got == [False, False, False]
    assert tokens_over(pl.Series([text]), 99).to_list() == [True]


def test_tokens_over_only_tokenizes_texts_longer_than_the_limit_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    real = tokens._tokenizer("cl100k_base")

    class Spy:
        def count_till_limit(self, text: str, limit: int) -> int | None:
            seen.append(text)
            return real.count_till_limit(text, limit)

    monkeypatch.setattr(tokens, "_tokenizer", lambda encoding: Spy())
    texts = ["short", "x" * 8_192, "é" * 4_097, "word " * 9_000]
    got = tokens_over(pl.Series(texts), 8_192, workers=1).to_list()
    assert got == [False, False, False, True]
    assert seen == ["é" * 4_097, "word " * 9_000]  # 8,194 and 45,000 bytes
