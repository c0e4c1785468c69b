"""Per-batch progress files: processed request lines appended (and fsync'ed) as they finish.

Each line is `<meta JSON>\t<output-file line>\n` with meta `{"i": index, "ok": 0|1, "in": input
tokens, "out": output tokens}`. A new server reads the file back to resume a batch without
re-running finished requests; finalisation copies the output lines into the result files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchyard.localapi import shapes
from batchyard.localapi.store import open_private
from batchyard.localapi.texts import embedding_inputs

if TYPE_CHECKING:
    from batchyard.localapi.executors import ExecResult
    from batchyard.localapi.validation import RequestLine


@dataclass
class ProgressEntry:
    """One processed request recorded in a progress file."""

    index: int
    ok: bool
    input_tokens: int
    output_tokens: int
    offset: int
    """Byte offset of the output line (after the metadata and tab)."""
    length: int
    """Length of the output line including its newline."""


def scan_progress(path: Path, *, repair: bool = False) -> list[ProgressEntry]:
    """Entries of a progress file (first one per request index wins).

    A torn last line (a crash mid-write) is ignored; with `repair` the file is truncated to the
    last complete line so appends continue cleanly.
    """
    entries: list[ProgressEntry] = []
    seen: set[int] = set()
    if not path.exists():
        return entries
    good_end = 0
    with open(path, "rb") as fh:
        pos = 0
        for raw in fh:
            start, pos = pos, pos + len(raw)
            if not raw.endswith(b"\n"):
                break
            meta_raw, sep, _ = raw.partition(b"\t")
            try:
                meta = json.loads(meta_raw)
            except ValueError:
                break
            good_end = pos
            if not sep or meta["i"] in seen:
                continue
            seen.add(meta["i"])
            head = len(meta_raw) + 1
            entries.append(
                ProgressEntry(
                    meta["i"],
                    bool(meta["ok"]),
                    meta["in"],
                    meta["out"],
                    start + head,
                    len(raw) - head,
                )
            )
    if repair and good_end < path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return entries


class Job:
    """In-memory state of a batch whose requests are running."""

    def __init__(self, requests: list[RequestLine], progress: Path) -> None:
        self.requests = requests
        self.progress = progress
        self.done: set[int] = set()
        self.completed = self.failed = self.input_tokens = self.output_tokens = 0
        self.next_at = 0.0
        self._cursor = 0
        for e in scan_progress(progress, repair=True):
            self._count(e.index, e.ok, e.input_tokens, e.output_tokens)
        self._fh = open_private(progress, "ab")  # closed in close()

    def _count(self, index: int, ok: bool, in_tok: int, out_tok: int) -> None:
        self.done.add(index)
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        self.input_tokens += in_tok
        self.output_tokens += out_tok

    @property
    def remaining(self) -> int:
        """Requests not processed yet."""
        return len(self.requests) - len(self.done)

    def next_chunk(self, max_requests: int, max_inputs: int | None = None) -> list[RequestLine]:
        """The next unprocessed requests (at most `max_requests`, or `max_inputs` embedding inputs)."""
        chunk: list[RequestLine] = []
        inputs = 0
        while self._cursor < len(self.requests) and len(chunk) < max_requests:
            req = self.requests[self._cursor]
            if req.index in self.done:
                self._cursor += 1
                continue
            n = len(embedding_inputs(req.body)) if max_inputs is not None else 0
            if chunk and max_inputs is not None and inputs + n > max_inputs:
                break
            chunk.append(req)
            inputs += n
            self._cursor += 1
        return chunk

    def record(self, items: list[RequestLine], results: list[ExecResult]) -> None:
        """Append processed lines to the progress file and fsync it."""
        parts: list[str] = []
        for item, res in zip(items, results, strict=True):
            ok = res.status_code == 200
            meta = f'{{"i":{item.index},"ok":{int(ok)},"in":{res.input_tokens},"out":{res.output_tokens}}}'
            parts.append(
                meta
                + "\t"
                + shapes.output_line(item.custom_id, res.status_code, res.body_json)
                + "\n"
            )
        self._fh.write("".join(parts).encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for item, res in zip(items, results, strict=True):
            self._count(item.index, res.status_code == 200, res.input_tokens, res.output_tokens)

    def close(self) -> None:
        """Close the progress file."""
        self._fh.close()
