"""Decode embeddings batch output fast: typed line parsing and base64 vectors in blocks (pure).

A backfill's output file holds hundreds of MB of base64 vectors in a few JSON fields. Two costs
dominate a naive join: building a Python (or Polars) string per vector, and decoding each vector
in its own call. This module avoids both:

- `parse_lines` decodes each line with a typed `msgspec` decoder. The `embedding` field stays a
  `msgspec.Raw`: a view of the JSON token in the input buffer, not a copy.
- `decode_vectors` groups the vectors whose JSON token has exactly the length of a canonical
  base64 `dims`-float vector, checks them with a few numpy column tests (quotes, padding,
  canonical trailing bits), and decodes a block of thousands of them in one SIMD `pybase64`
  call straight into the rows of one float32 matrix. Padding sits at the same columns in every
  row, so it is replaced with `A` before the call and the padded bytes are cut off after it.
- Anything else (another length, JSON escapes, characters outside the alphabet, a `null`) goes
  through the reference path one value at a time: `msgspec` unescapes the JSON string and Polars
  decodes it with `str.decode("base64", strict=False)`, the decoder the join always used. So both
  paths agree: strict standard base64 with canonical padding, anything else is "not a vector".

Nothing here keeps state between calls, so a worker process can run it per shard.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
import polars as pl
import pybase64

# the line shape of an `/v1/embeddings` batch output or error file; unknown fields are ignored
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Item(msgspec.Struct):
    """One `data[]` entry; `embedding` is the raw JSON token (a base64 string when valid)."""

    index: _Int64 | None = None
    embedding: msgspec.Raw = msgspec.Raw(b"null")


class ErrorBody(msgspec.Struct):
    message: str | None = None
    code: str | int | None = None  # a numeric code is kept (as text), not a malformed line


class Body(msgspec.Struct):
    data: list[Item] | None = None
    error: ErrorBody | None = None


class Response(msgspec.Struct):
    status_code: _Int64 | None = None
    body: Body | None = None


class Line(msgspec.Struct):
    custom_id: str
    response: Response | None = None
    error: ErrorBody | None = None


_LINE = msgspec.json.Decoder(Line)

_QUOTE, _PAD, _ZERO = ord('"'), ord("="), ord("A")
# value of each base64 character, 255 for bytes outside the standard alphabet
_VALUE = np.full(256, 255, np.uint8)
_VALUE[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", np.uint8)] = (
    np.arange(64, dtype=np.uint8)
)
# bits of the last data character that must be zero in canonical base64, by padding length
_TRAILING_BITS = {1: 0b11, 2: 0b1111}
BLOCK_CHARS = 4 << 20  # base64 characters decoded per call: big enough, still cache friendly


@dataclass(frozen=True)
class Malformed:
    """A non-empty line that is not a batch output line."""

    line: int
    reason: str


def parse_lines(data: bytes) -> tuple[list[Line], list[Malformed]]:
    """Parsed lines of a JSONL file (blank lines skipped) and the lines that do not parse."""
    try:
        return _LINE.decode_lines(data), []
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    lines: list[Line] = []
    bad: list[Malformed] = []
    for no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(_LINE.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            bad.append(Malformed(no, str(exc)))
    return lines, bad


def decode_vectors(
    raws: Sequence[msgspec.Raw], rows: np.ndarray, out: np.ndarray, *, block_chars: int = BLOCK_CHARS
) -> np.ndarray:
    """Decode base64 JSON strings into rows of a float32 matrix.

    Args:
        raws: JSON tokens, each expected to be a string holding `dims` little-endian float32s.
        rows: the row of `out` for each token.
        out: C-contiguous float32 matrix of shape (n, dims); row `rows[i]` is written when
            token i decodes to exactly `dims * 4` bytes, other rows are left as they are.
        block_chars: base64 characters per decoding call.

    Returns:
        Decoded byte length per token, -1 when it is not a valid base64 string.
    """
    width = out.shape[1] * 4
    chars = 4 * -(-width // 3)
    nbytes = np.full(len(raws), -1, np.int64)
    lengths = np.fromiter(map(len, raws), np.int64, count=len(raws))
    candidates = np.flatnonzero(lengths == chars + 2)  # two quotes around the base64 text
    step = max(1, block_chars // chars)
    flat = out.view(np.uint8).reshape(len(out), width)
    for start in range(0, len(candidates), step):
        block = candidates[start : start + step]
        done, decoded = _decode_block([raws[i] for i in block], width)
        flat[rows[block[done]]] = decoded
        nbytes[block[done]] = width
    rest = np.flatnonzero(nbytes < 0)
    for i, value in zip(rest, reference_decode([raws[int(i)] for i in rest]), strict=True):
        if value is None:
            continue
        nbytes[i] = len(value)
        if len(value) == width:
            flat[rows[i]] = np.frombuffer(value, np.uint8)
    return nbytes


def _decode_block(raws: list[msgspec.Raw], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical base64 strings of `width` bytes among same-length tokens, decoded in one call.

    Returns the positions decoded and their bytes, shape (len(positions), width).
    """
    tokens = np.frombuffer(b"".join(raws), np.uint8).reshape(len(raws), -1)
    text = tokens[:, 1:-1]
    decoded_width = text.shape[1] // 4 * 3  # padding included
    pad = decoded_width - width
    ok = (tokens[:, 0] == _QUOTE) & (tokens[:, -1] == _QUOTE)
    if pad:
        ok &= (text[:, -pad:] == _PAD).all(axis=1)
        ok &= (_VALUE[text[:, -pad - 1]] & _TRAILING_BITS[pad]) == 0
    done = np.flatnonzero(ok)
    body = text[done]  # a contiguous copy we may write into
    body[:, text.shape[1] - pad :] = _ZERO  # padding decodes as zero bits, cut off below
    decoded = _b64decode(body)
    if decoded is None:  # a character outside the alphabet somewhere: keep the clean rows
        clean = (_VALUE[body] != 255).all(axis=1)
        done, body = done[clean], body[clean]
        decoded = _b64decode(body)
        assert decoded is not None, "rows of alphabet characters decode"
    return done, decoded.reshape(len(done), decoded_width)[:, :width]


def _b64decode(body: np.ndarray) -> np.ndarray | None:
    """Decoded bytes of rows of base64 text without padding, None if any character is invalid."""
    if not body.size:
        return np.empty(0, np.uint8)
    try:
        decoded = pybase64.b64decode(body, validate=True)  # type: ignore[arg-type]
    except binascii.Error:
        return None
    # a "=" left in the text (a shorter value) may end the input early instead of raising
    return np.frombuffer(decoded, np.uint8) if len(decoded) == body.size // 4 * 3 else None


def reference_decode(raws: Sequence[msgspec.Raw]) -> list[bytes | None]:
    """Bytes of each base64 JSON string, one at a time (None for a non-string or invalid base64)."""
    texts: list[str | None] = []
    for raw in raws:
        try:
            texts.append(msgspec.json.decode(raw, type=str))
        except (msgspec.DecodeError, msgspec.ValidationError):
            texts.append(None)
    return pl.Series(texts, dtype=pl.String).str.decode("base64", strict=False).to_list()
