"""Vector math of the `hash` embeddings executor and fast JSON/base64 encodings of vectors (pure)."""

from __future__ import annotations

import base64
import hashlib
from functools import cache

import numpy as np

_FLOAT_BLOCK_ROWS = 256


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def hash_embedding(text: str, dimensions: int) -> np.ndarray:
    """Deterministic unit vector of `text`: float32, L2 norm 1.

    Algorithm (stable, the pipeline's tests rely on it): seed = first 8 bytes (little-endian) of
    sha256(UTF-8 text); v = numpy.random.default_rng(seed).standard_normal(dimensions, float32);
    return v / ||v|| (computed in float32).
    """
    vec = np.random.default_rng(_seed(text)).standard_normal(dimensions, dtype=np.float32)
    vec /= np.linalg.norm(vec)
    return vec


def hash_embeddings(texts: list[str], dimensions: int) -> np.ndarray:
    """`hash_embedding` of each text (bit-identical), stacked into an (n, dimensions) matrix."""
    out = np.empty((len(texts), dimensions), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i] = hash_embedding(text, dimensions)
    return out


@cache
def _digit_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ASCII digits of 0..99999 (5 wide) and 0..9999 (4 wide), and powers of ten."""
    lut5 = np.frombuffer("".join(f"{i:05d}" for i in range(100_000)).encode(), np.uint8)
    lut4 = np.frombuffer("".join(f"{i:04d}" for i in range(10_000)).encode(), np.uint8)
    return lut5.reshape(-1, 5), lut4.reshape(-1, 4), 10.0 ** np.arange(-80, 81)


def _format_block(x: np.ndarray) -> np.ndarray:
    """Fixed-width ASCII (`s d.dddddddd e±dd ,` = 16 bytes) of each element of a 2-D array."""
    lut5, lut4, pow10 = _digit_tables()
    a = np.abs(x.astype(np.float64))
    nz = a > 0
    exp = np.floor(np.log10(a, where=nz, out=np.zeros_like(a))).astype(np.int32)
    for _ in range(3):  # fix log10 rounding at decade edges
        mant = np.rint(a * pow10[80 + 8 - exp]).astype(np.int64)
        low, high = nz & (mant < 10**8), mant >= 10**9
        if not (low.any() or high.any()):
            break
        exp[low] -= 1
        exp[high] += 1
    hi, lo = np.divmod(mant.astype(np.int32), 10_000)
    head, tail = lut5[hi], lut4[lo]
    out = np.empty((*a.shape, 16), dtype=np.uint8)
    out[..., 0] = np.where(np.signbit(x), ord("-"), ord(" "))
    out[..., 1] = head[..., 0]
    out[..., 2] = ord(".")
    out[..., 3:7] = head[..., 1:]
    out[..., 7:11] = tail
    out[..., 11] = ord("e")
    out[..., 12] = np.where(exp < 0, ord("-"), ord("+"))
    out[..., 13:15] = lut4[np.abs(exp)][..., 2:]
    out[..., 15] = ord(",")
    return out


def float_json_rows(matrix: np.ndarray) -> list[str]:
    """Each row of a float matrix as a JSON array text, vectorised.

    Numbers carry 9 significant digits, so parsing them back into float32 gives the exact
    original values (FLT_DECIMAL_DIG = 9).
    """
    rows: list[str] = []
    n, d = matrix.shape
    if d == 0:
        return ["[]"] * n
    for start in range(0, n, _FLOAT_BLOCK_ROWS):
        block = _format_block(matrix[start : start + _FLOAT_BLOCK_ROWS])
        flat = block.reshape(block.shape[0], -1)
        for row in flat:
            rows.append("[" + row[:-1].tobytes().decode("ascii") + "]")
    return rows


def base64_rows(matrix: np.ndarray) -> list[str]:
    """Each row as base64 of its little-endian float32 bytes (OpenAI's `encoding_format=base64`)."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in data]


def native_dimensions(model: str) -> int:
    """Default vector size of an embedding model (3072 for *-3-large, else 1536)."""
    return 3072 if "3-large" in model else 1536
