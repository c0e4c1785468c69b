"""Fast decoding of embeddings output: block base64 agrees with the one-at-a-time reference."""

from __future__ import annotations

import base64

import msgspec
import numpy as np
import pytest

from batchyard.localapi.executors import hash_embedding
from batchyard.stages.decode import decode_vectors, parse_lines, reference_decode

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(vec: np.ndarray) -> str:
    return base64.b64encode(vec.astype("<f4").tobytes()).decode()


def token(value: object) -> msgspec.Raw:
    """The raw JSON token of a value, as msgspec hands it over."""
    return msgspec.Raw(msgspec.json.encode(value))


def non_canonical(text: str) -> str:
    """Set a trailing bit that canonical base64 leaves zero (the bytes decode the same)."""
    pad = len(text) - len(text.rstrip("="))
    last = text[-pad - 1]
    return text[: -pad - 1] + ALPHABET[ALPHABET.index(last) | 1] + "=" * pad


def decode(tokens: list[msgspec.Raw], dims: int, block_chars: int = 64) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(tokens), dims), np.nan, np.float32)
    nbytes = decode_vectors(tokens, np.arange(len(tokens)), out, block_chars=block_chars)
    return nbytes, out


@pytest.mark.parametrize("dims", [6, 7, 8])  # 24, 28, 32 bytes: no padding, "==", "="
def test_blocks_decode_every_vector_across_block_boundaries(dims: int) -> None:
    vectors = [hash_embedding(f"u{i}", dims) for i in range(50)]
    rows = np.arange(49, -1, -1)  # tokens land in any rows
    out = np.zeros((50, dims), np.float32)
    nbytes = decode_vectors([token(b64(v)) for v in vectors], rows, out, block_chars=100)
    assert (nbytes == dims * 4).all()
    np.testing.assert_array_equal(out[rows], np.stack(vectors))


@pytest.mark.parametrize("dims", [6, 7, 8])
def test_odd_values_get_the_reference_answer(dims: int) -> None:
    good = b64(hash_embedding("a", dims))
    values: dict[str, object] = {
        "good": good,
        "whitespace": good[:4] + " " + good[4:],  # strict base64: not a vector
        "newline": good[:4] + "\n" + good[4:],
        "truncated": good[:-4],  # whole quads cut off: decodes, but too short
        "truncated mid-quad": good[:-1],
        "unpadded": good.rstrip("="),
        "bad char": "!" + good[1:],
        "url alphabet": good.replace("+", "-").replace("/", "_"),
        "longer": b64(hash_embedding("b", dims + 1)),
        "empty": "",
        "null": None,
        "number": 1234,
        "float list": [0.5] * dims,
    }
    if good.endswith("="):
        values["non-canonical bits"] = non_canonical(good)
        values["padding inside"] = good[:4] + "====" + good[8:]
    tokens = [token(v) for v in values.values()]
    nbytes, out = decode(tokens, dims)
    reference = reference_decode(tokens)
    for (name, _), n, ref, row in zip(values.items(), nbytes, reference, out, strict=True):
        assert n == (-1 if ref is None else len(ref)), name
        if n == dims * 4:
            np.testing.assert_array_equal(row, np.frombuffer(ref, "<f4"), err_msg=name)
        else:
            assert np.isnan(row).all(), f"{name}: row written without a full vector"
    assert nbytes[0] == dims * 4 and nbytes[1] == -1
    assert nbytes[3] == 3 * (len(good) // 4 - 1)  # a truncated vector reports what it holds


def test_json_escapes_are_unescaped_before_decoding() -> None:
    dims = 64
    vec = hash_embedding("escape", dims)
    text = b64(vec)
    assert "/" in text
    escaped = msgspec.Raw(('"' + text.replace("/", "\\/") + '"').encode())
    nbytes, out = decode([escaped, token(text)], dims)
    assert nbytes.tolist() == [dims * 4, dims * 4]
    np.testing.assert_array_equal(out[0], vec)
    np.testing.assert_array_equal(out[1], vec)


def test_a_bad_row_does_not_spoil_its_block() -> None:
    dims = 8
    vectors = [hash_embedding(f"v{i}", dims) for i in range(10)]
    texts = [b64(v) for v in vectors]
    texts[4] = "*" + texts[4][1:]  # same length, outside the alphabet
    nbytes, out = decode([token(t) for t in texts], dims, block_chars=10_000)
    assert nbytes.tolist() == [32] * 4 + [-1] + [32] * 5
    np.testing.assert_array_equal(np.delete(out, 4, axis=0), np.delete(np.stack(vectors), 4, axis=0))


def test_parse_lines_skips_blank_lines_and_reports_bad_ones_by_line_number() -> None:
    ok = b'{"custom_id": "a", "response": {"status_code": 200, "body": {"data": []}}}'
    lines, bad = parse_lines(ok + b"\r\n\n   \n" + ok + b"\r\n")
    assert [ln.custom_id for ln in lines] == ["a", "a"] and bad == []
    data = b"\n".join([ok, b"", b"{not json", b'{"custom_id": 7}', b'{"response": null}', b"[1]", ok])
    lines, bad = parse_lines(data)
    assert len(lines) == 2
    assert [m.line for m in bad] == [3, 4, 5, 6]
    assert "custom_id" in bad[1].reason and "custom_id" in bad[2].reason
