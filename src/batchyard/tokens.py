"""Exact token counts for OpenAI models, offline, on every core.

Counting uses the `bpe-openai` Rust tokenizer, which ships the cl100k_base and o200k_base
vocabularies and gives the same counts as tiktoken (a test checks that on varied text; the 1M-chunk
benchmark checks the totals) about 2.5x faster. Truncation encodes and decodes with the same tokenizer.

`token_counts` counts a Polars column. The tokenizer holds the GIL, so threads do not help: large
inputs go to a persistent process pool (one per process, created on first use, one worker per
usable core, shut down at exit). The parent writes the column once as an Arrow IPC file in memory
(a Linux memfd) and each task only names a slice of it, which the worker memory-maps: the parent
never builds a million Python strings, and no text goes through the pool's pipes
(benchmarks/bench_tokens.py compares this with pickled lists of str and pickled Series slices).
The pool starts workers with `forkserver` (`spawn` where that is missing), never plain `fork`:
callers run inside Prefect flows with threads, an embedded uvicorn server and Milvus Lite's gRPC
threads. Like any spawned worker, each one imports the caller's main module, so a script that
counts at import time needs an `if __name__ == "__main__":` guard (without one the workers die,
and counting falls back to this process).

Counting stays in this process, with the same results, when the input is small (the pool starts
from `POOL_START_MIN_BYTES` of text and, once running, is used from `POOL_MIN_BYTES`), and, with
one DEBUG log line, when `BATCHYARD_TOKEN_WORKERS=1`, on a single core, inside a daemonic process
(Dask workers: `multiprocessing` refuses them children), or once the pool has failed (that
failure logs a WARNING).

Repeated texts (filings repeat boilerplate) are counted once: Polars finds each text's first
occurrence, comparing the strings themselves, so counts stay exact. That pays where long texts
repeat; on the synthetic 1M-chunk corpus it costs a little more than it saves (5.8% of the texts
repeat, but they are short: 1.2% of the bytes), and `dedupe=False` skips it.

A text of at most `limit` UTF-8 bytes has at most `limit` tokens (every token covers at least one
byte), so `tokens_over` only tokenizes the texts longer than the limit in bytes, and stops each
count one token past the limit.

`ensure_tiktoken_offline()` copies the bundled vocabularies into tiktoken's cache so that stock
tiktoken works without network (used by the benchmark baselines and the cross-check test).
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import logging
import multiprocessing
import os
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import cache
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from bpe_openai import _bindings

log = logging.getLogger(__name__)

WORKERS_ENV = "BATCHYARD_TOKEN_WORKERS"
POOL_MIN_BYTES = 16 * 2**20
"""A running pool counts inputs from this many bytes of text (~18k chunks): a call costs it
6-10 ms more, and on a busy 2-core box it won reliably from ~45 MiB, not always below."""
POOL_START_MIN_BYTES = 32 * 2**20
"""The pool is started for inputs from this many bytes (~36k chunks). Starting two workers took
0.8-2.6 s and two cores save at most ~9.5 ms per MiB, so one call pays for the start only from
~90 MiB; but the pool lives for the process, and a backfill counts partition after partition
(at most `run.partition_max_chunks`, 100k chunks, ~90 MiB each). At 128 MiB it never started for
one: the 1M-chunk plan counted on one core (tokens 18.6 s) instead of two (11.8 s, bench_plan.py)."""
TASK_ROWS = 20_000
"""Most texts per pool task: enough to amortise a task's cost, small enough to balance the load."""

_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


def encoding_for_model(model: str) -> str:
    """Tokenizer encoding of a model (o200k_base for gpt-4o and later, else cl100k_base)."""
    m = model.lower()
    if m.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")):
        return "o200k_base"
    return "cl100k_base"


@cache
def _tokenizer(encoding: str) -> _bindings.PyTokenizer:
    # imported on first use: loading the vocabularies costs ~0.6 s, which a run with nothing to
    # count (a no-op, a status) never needs to pay
    from bpe_openai import _bindings

    return _bindings.tokenizer_for_encoding(encoding)


def count_tokens(texts: Iterable[str], encoding: str = "cl100k_base") -> list[int]:
    """Exact token count of each text."""
    count = _tokenizer(encoding).count
    return [count(t) for t in texts]


def truncate_to_tokens(text: str, max_tokens: int, encoding: str = "cl100k_base") -> str:
    """The longest prefix of `text` (on a token boundary) that has at most `max_tokens` tokens."""
    tok = _tokenizer(encoding)
    ids = tok.encode(text)
    if len(ids) <= max_tokens:
        return text
    # a cut may split a multi-byte character; back off until it decodes and still fits
    for end in range(max_tokens, max(0, max_tokens - 8), -1):
        try:
            prefix = tok.decode(ids[:end])
        except Exception:
            continue
        if tok.count(prefix) <= max_tokens:
            return prefix
    return ""


def ensure_tiktoken_offline(cache_dir: str | None = None) -> str:
    """Put bpe-openai's bundled vocabularies into tiktoken's cache; returns the cache dir."""
    import bpe_openai.data as data

    target = Path(
        cache_dir
        or os.environ.get("TIKTOKEN_CACHE_DIR")
        or Path(tempfile.gettempdir()) / "batchyard-tiktoken"
    )
    target.mkdir(parents=True, exist_ok=True)
    src = Path(data.__file__).parent
    for name in ("cl100k_base", "o200k_base"):
        key = hashlib.sha1(_TIKTOKEN_URL.format(name=name).encode()).hexdigest()
        dest = target / key
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            tmp.write_bytes(gzip.decompress((src / f"{name}.tiktoken.gz").read_bytes()))
            tmp.replace(dest)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(target)
    return str(target)


def total_tokens(texts: Sequence[str], encoding: str = "cl100k_base") -> int:
    """Sum of token counts."""
    return sum(count_tokens(texts, encoding))


# counting a column, in this process or in the pool


def token_counts(
    texts: pl.Series,
    encoding: str = "cl100k_base",
    *,
    workers: int | None = None,
    dedupe: bool = True,
    min_pool_bytes: int | None = None,
) -> pl.Series:
    """Exact token count of every text (Int64, same order and name; null for a null text).

    Args:
        texts: a String column.
        encoding: the tokenizer encoding (`encoding_for_model`).
        workers: processes that count; `None` reads `BATCHYARD_TOKEN_WORKERS`, else one per
            usable core. 1 counts in this process.
        dedupe: count each distinct text once and give its repeats the same count.
        min_pool_bytes: use the pool from this many bytes of text to count; `None` uses
            `POOL_MIN_BYTES` once the pool runs and `POOL_START_MIN_BYTES` to start it.
    """
    texts, n = texts.cast(pl.String), texts.len()
    todo = texts.is_not_null()
    first = _first_index(texts) if dedupe and n > 1 else None
    if first is not None:
        todo = todo & (first == pl.int_range(n, dtype=pl.Int64, eager=True))
    counts = _count(texts, todo, encoding, None, workers=workers, min_pool_bytes=min_pool_bytes)
    if counts.len() < n:  # nulls and repeats were not counted: put each count in its row
        counts = pl.repeat(None, n, dtype=pl.Int64, eager=True).scatter(todo.arg_true(), counts)
        if first is not None:
            counts = counts.gather(first)  # a repeat takes the count of the first equal text
    return counts.alias(texts.name)


def tokens_over(
    texts: pl.Series,
    limit: int,
    encoding: str = "cl100k_base",
    *,
    workers: int | None = None,
    min_pool_bytes: int | None = None,
) -> pl.Series:
    """Whether each text has more than `limit` tokens (Boolean, same order; null for a null text).

    Only texts longer than `limit` UTF-8 bytes are tokenized, and each of those counts stops one
    token past the limit: against the 8,192-token input limit this costs next to nothing on
    typical chunks. Arguments as for `token_counts`.
    """
    texts = texts.cast(pl.String)
    longer = (texts.str.len_bytes() > limit).fill_null(False)
    over = pl.repeat(False, texts.len(), dtype=pl.Boolean, eager=True)
    if longer.any():
        capped = _count(
            texts, longer, encoding, limit, workers=workers, min_pool_bytes=min_pool_bytes
        )
        over = over.scatter(longer.arg_true(), capped.is_null())
    return pl.select(pl.when(texts.is_not_null()).then(over)).to_series().alias(texts.name)


def _first_index(texts: pl.Series) -> pl.Series:
    """Row index of the first text equal to each text (Polars compares the strings themselves)."""
    frame = texts.alias("text").to_frame().with_row_index("row")
    return frame.select(pl.col("row").first().over("text").cast(pl.Int64)).to_series()


def _count(
    texts: pl.Series,
    keep: pl.Series,
    encoding: str,
    limit: int | None,
    *,
    workers: int | None,
    min_pool_bytes: int | None,
) -> pl.Series:
    """Counts of the kept texts, in order; with `limit`, null where a text has more tokens."""
    lengths = texts.str.len_bytes().cast(pl.Int64)
    n_bytes = int(lengths.filter(keep).sum())
    mask = None if keep.all() else keep
    if mask is not None and 2 * n_bytes < int(lengths.sum()):  # few to count: ship only those
        texts, mask = texts.filter(mask), None
    size = worker_count(workers)
    reason = _in_process_reason(size, n_bytes, min_pool_bytes)
    if reason is None:
        try:
            return _pool_counts(texts, mask, encoding, limit, size)
        except (BrokenProcessPool, OSError) as exc:  # a worker died, or none could be started
            _drop_pool(broken=True)
            log.warning("token counting: the process pool failed (%r); counting here", exc)
    elif reason != "small input":
        log.debug("token counting in this process: %s", reason)
    return _count_slices(texts, mask, encoding, limit, rows=TASK_ROWS)


def worker_count(workers: int | None = None) -> int:
    """Processes to count with: `workers`, else `BATCHYARD_TOKEN_WORKERS`, else the usable cores."""
    if workers is None:
        raw = os.environ.get(WORKERS_ENV, "").strip()
        if not raw:
            return _usable_cores()
        if not raw.isdigit() or int(raw) < 1:
            msg = f"{WORKERS_ENV}={raw!r} is not a positive integer"
            raise ValueError(msg)
        return int(raw)
    if workers < 1:
        msg = f"workers={workers} must be at least 1"
        raise ValueError(msg)
    return workers


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (containers, taskset)
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _in_process_reason(size: int, n_bytes: int, min_bytes: int | None) -> str | None:
    """Why counting stays in this process, or None to use the pool."""
    if min_bytes is None:
        running = _pool is not None and _pool_size == size
        min_bytes = POOL_MIN_BYTES if running else POOL_START_MIN_BYTES
    if n_bytes < min_bytes:
        return "small input"
    if size <= 1:
        return f"one worker ({WORKERS_ENV}=1, workers=1 or a single core)"
    if multiprocessing.current_process().daemon:
        return "a daemonic process may not have children"
    if _pool_broken:
        return "the process pool failed earlier"
    return None


def _slices(
    texts: pl.Series, mask: pl.Series | None, rows: int
) -> Iterable[tuple[pl.Series, pl.Series | None]]:
    for i in range(0, texts.len(), rows):
        yield texts.slice(i, rows), None if mask is None else mask.slice(i, rows)


def _count_slices(
    texts: pl.Series, mask: pl.Series | None, encoding: str, limit: int | None, *, rows: int
) -> pl.Series:
    """In this process, a slice at a time (only one slice is ever held as Python strings)."""
    parts = [_count_slice(t, m, encoding, limit) for t, m in _slices(texts, mask, rows)]
    return pl.concat(parts) if parts else pl.Series(dtype=pl.Int64)


def _count_slice(
    texts: pl.Series, mask: pl.Series | None, encoding: str, limit: int | None
) -> pl.Series:
    """Counts of the texts where `mask` is true (all if None)."""
    return _count_values((texts if mask is None else texts.filter(mask)).to_list(), encoding, limit)


def _count_values(values: list[str], encoding: str, limit: int | None) -> pl.Series:
    tok = _tokenizer(encoding)
    if limit is None:
        count = tok.count
        return pl.Series([count(t) for t in values], dtype=pl.Int64)
    till = tok.count_till_limit  # None past the limit
    return pl.Series([till(t, limit) for t in values], dtype=pl.Int64)


# the process pool


_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_broken = False
_pool_lock = threading.Lock()


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _get_pool(size: int) -> ProcessPoolExecutor:
    """The process's pool of `size` workers, created on first use (another size replaces it)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)  # tasks already submitted still finish
            context = multiprocessing.get_context(_start_method())
            _pool, _pool_size = ProcessPoolExecutor(size, mp_context=context), size
        return _pool


def _pool_counts(
    texts: pl.Series, mask: pl.Series | None, encoding: str, limit: int | None, size: int
) -> pl.Series:
    """Count in a pool of `size` workers: tasks of at most `TASK_ROWS` rows, four or more each.

    The column (and the mask) is written once as an uncompressed Arrow IPC file in memory; each
    task is only (path, offset, length), and its worker memory-maps that slice. Pickling the
    slices instead costs more CPU, and pushing ~1 GB through the pool's pipes in 64 KiB steps is
    slow on a busy machine (bench_tokens.py).
    """
    n = texts.len()
    if n == 0:
        return pl.Series(dtype=pl.Int64)
    rows = max(1, min(TASK_ROWS, -(-n // (4 * size))))
    frame = texts.alias("text").to_frame()
    if mask is not None:
        frame = frame.with_columns(keep=mask)
    with _memory_file() as path:
        # large_string (the oldest layout) so that the workers can filter it with pyarrow
        frame.write_ipc(path, compression="uncompressed", compat_level=pl.CompatLevel.oldest())
        offsets = range(0, n, rows)
        args = (repeat(path), offsets, repeat(rows), repeat(encoding), repeat(limit))
        return pl.concat(list(_get_pool(size).map(_count_file_slice, *args)))


@contextmanager
def _memory_file() -> Iterator[str]:
    """A path to a new file in memory that the workers can open, removed afterwards.

    On Linux an anonymous memory file (`memfd`): it never reaches a disk, is not bounded by a
    small /dev/shm (containers), and is freed even if this process is killed. Elsewhere a
    temporary file.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("batchyard-tokens")
        try:
            yield f"/proc/{os.getpid()}/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="batchyard-tokens-", suffix=".arrow")
    os.close(fd)
    try:
        yield path
    finally:
        Path(path).unlink(missing_ok=True)


def _count_file_slice(
    path: str, offset: int, length: int, encoding: str, limit: int | None
) -> pl.Series:
    """A pool task: count rows [offset, offset + length) of the memory file (where `keep`)."""
    with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all().slice(offset, length)
        texts = table.column("text")
        if "keep" in table.column_names:
            texts = texts.filter(table.column("keep"))
        values = texts.to_pylist()
    return _count_values(values, encoding, limit)


def _drop_pool(*, broken: bool = False) -> None:
    global _pool, _pool_broken
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=not broken, cancel_futures=True)
            _pool = None
        _pool_broken = _pool_broken or broken


def shutdown_pool() -> None:
    """Stop the worker processes (also done at exit); a later large count starts a new pool."""
    _drop_pool()


atexit.register(shutdown_pool)
