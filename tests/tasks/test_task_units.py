"""Request units: chunk and document units, token budgets, truncation and plan rejects."""

from __future__ import annotations

import hashlib
import random

import polars as pl
import pytest
from task_helpers import chunks_frame

from batchyard.schemas import FAILURES
from batchyard.tasks import UNITS, build_units
from batchyard.tokens import count_tokens

ENC = "o200k_base"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tokens(text: str) -> int:
    return count_tokens([text], ENC)[0]


def _words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_chunk_units() -> None:
    chunks = chunks_frame(
        [
            {"chunk_id": "c1", "document_id": "d1", "chunk_index": 0, "text": "Revenue rose 5%."},
            {"chunk_id": "c2", "document_id": "d1", "chunk_index": 1, "text": _words("w", 200)},
            {"chunk_id": "c3", "document_id": None, "chunk_index": 0, "text": "No document."},
        ]
    )
    units, rejects = build_units(chunks, "chunk", token_budget=50, encoding=ENC)
    assert units.schema == UNITS
    assert rejects.height == 0 and rejects.schema == FAILURES
    assert units["unit_id"].to_list() == ["c1", "c2", "c3"]
    assert units["chunk_ids"].to_list() == [["c1"], ["c2"], ["c3"]]
    assert units["document_id"].to_list() == ["d1", "d1", None]
    assert units["truncated"].to_list() == [False, True, False]
    assert units["text"][0] == "Revenue rose 5%."
    long_text = units["text"][1]
    assert _words("w", 200).startswith(long_text) and len(long_text) < len(_words("w", 200))
    assert units["n_tokens"].to_list() == [_tokens(t) for t in units["text"]]
    assert units["n_tokens"][1] <= 50
    assert units["text_sha256"].to_list() == [_sha(t) for t in units["text"]]


def test_chunk_rejects_for_empty_text() -> None:
    chunks = chunks_frame(
        [
            {"chunk_id": "ok", "document_id": "d", "chunk_index": 0, "text": "x"},
            {"chunk_id": "empty", "document_id": "d", "chunk_index": 1, "text": ""},
            {"chunk_id": "blank", "document_id": "d", "chunk_index": 2, "text": " \n\t\u3000 "},
            {"chunk_id": "null", "document_id": "d", "chunk_index": 3, "text": None},
        ]
    )
    units, rejects = build_units(chunks, "chunk", token_budget=10, encoding=ENC)
    assert units["unit_id"].to_list() == ["ok"]
    assert rejects.schema == FAILURES
    assert rejects["unit_id"].to_list() == ["empty", "blank", "null"]
    assert set(rejects["stage"]) == {"plan"} and set(rejects["code"]) == {"empty_text"}
    assert (
        rejects["attempt"].null_count()
        == rejects["batch_id"].null_count()
        == rejects["raw"].null_count()
        == 3
    )
    assert all(rejects["message"].str.len_chars() > 0)


def test_document_units_join_chunks_in_chunk_index_order() -> None:
    chunks = chunks_frame(
        [
            {"chunk_id": "b2", "document_id": "B", "chunk_index": 2, "text": "third"},
            {"chunk_id": "a1", "document_id": "A", "chunk_index": 1, "text": "A second"},
            {"chunk_id": "b0", "document_id": "B", "chunk_index": 0, "text": "first"},
            {"chunk_id": "a0", "document_id": "A", "chunk_index": 0, "text": "A first"},
            {"chunk_id": "b1", "document_id": "B", "chunk_index": 1, "text": "  "},  # skipped
            {"chunk_id": "a10", "document_id": "A", "chunk_index": 10, "text": "A eleventh"},
        ]
    )
    units, rejects = build_units(chunks, "document", token_budget=1000, encoding=ENC)
    assert units.schema == UNITS and rejects.height == 0
    by_id = {r["document_id"]: r for r in units.iter_rows(named=True)}
    assert set(by_id) == {"A", "B"}
    assert by_id["A"]["chunk_ids"] == ["a0", "a1", "a10"]  # numeric, not string, order
    assert by_id["A"]["text"] == "A first\n\nA second\n\nA eleventh"
    assert by_id["B"]["chunk_ids"] == ["b0", "b2"]
    assert by_id["B"]["text"] == "first\n\nthird"
    for row in by_id.values():
        assert row["unit_id"] == f"acme/{row['document_id']}" and row["company_id"] == "acme"
        assert row["truncated"] is False
        assert row["n_tokens"] == _tokens(row["text"])
        assert row["text_sha256"] == _sha(row["text"])


def test_document_budget_cut_and_truncated_flag() -> None:
    parts = [_words(f"p{i}_", 30) for i in range(6)]
    chunks = chunks_frame(
        [
            {"chunk_id": f"c{i}", "document_id": "D", "chunk_index": i, "text": p}
            for i, p in enumerate(parts)
        ]
    )
    budget = _tokens("\n\n".join(parts[:3])) + 5  # room for three chunks, not four
    units, _ = build_units(chunks, "document", token_budget=budget, encoding=ENC)
    row = units.row(0, named=True)
    assert row["chunk_ids"] == ["c0", "c1", "c2"]
    assert row["text"] == "\n\n".join(parts[:3])
    assert row["truncated"] is True
    assert row["n_tokens"] <= budget
    # exactly fitting everything: not truncated
    full = _tokens("\n\n".join(parts))
    units, _ = build_units(chunks, "document", token_budget=full, encoding=ENC)
    assert units["truncated"].to_list() == [False]
    assert units["chunk_ids"].to_list() == [[f"c{i}" for i in range(6)]]


def test_document_first_chunk_over_budget_is_truncated() -> None:
    big = _words("big", 300)
    chunks = chunks_frame(
        [
            {"chunk_id": "c0", "document_id": "D", "chunk_index": 0, "text": big},
            {"chunk_id": "c1", "document_id": "D", "chunk_index": 1, "text": "small"},
        ]
    )
    units, _ = build_units(chunks, "document", token_budget=40, encoding=ENC)
    row = units.row(0, named=True)
    assert row["chunk_ids"] == ["c0"]
    assert big.startswith(row["text"]) and row["text"] != big
    assert 0 < row["n_tokens"] <= 40
    assert row["truncated"] is True
    assert row["text_sha256"] == _sha(row["text"])


def test_document_rejects() -> None:
    chunks = chunks_frame(
        [
            {"chunk_id": "e0", "document_id": "EMPTY", "chunk_index": 0, "text": " "},
            {"chunk_id": "e1", "document_id": "EMPTY", "chunk_index": 1, "text": None},
            {
                "chunk_id": "x0",
                "document_id": "SHARED",
                "chunk_index": 0,
                "text": "a",
                "company_id": "one",
            },
            {
                "chunk_id": "x1",
                "document_id": "SHARED",
                "chunk_index": 1,
                "text": "b",
                "company_id": "two",
            },
            {"chunk_id": "n0", "document_id": None, "chunk_index": 0, "text": "orphan"},
            {"chunk_id": "g0", "document_id": "GOOD", "chunk_index": 0, "text": "fine"},
        ]
    )
    units, rejects = build_units(chunks, "document", token_budget=100, encoding=ENC)
    # a document id shared by two companies is two units, one per company
    assert sorted(units["unit_id"].to_list()) == ["acme/GOOD", "one/SHARED", "two/SHARED"]
    assert rejects.schema == FAILURES
    got = dict(zip(rejects["unit_id"], rejects["code"], strict=True))
    assert got == {
        "acme/EMPTY": "empty_text",
        "n0": "missing_document_id",
    }
    assert set(rejects["stage"]) == {"plan"}


def test_document_unit_ids_are_unambiguous() -> None:
    from batchyard.tasks.units import document_unit_id

    assert document_unit_id("acme", "10-K 2025") == "acme/10-K%202025"
    assert document_unit_id("a/b", "c") != document_unit_id("a", "b/c")


def test_empty_input_and_bad_arguments() -> None:
    empty = chunks_frame([])
    for unit in ("chunk", "document"):
        units, rejects = build_units(empty, unit, token_budget=10, encoding=ENC)  # type: ignore[arg-type]
        assert units.height == 0 and units.schema == UNITS
        assert rejects.height == 0 and rejects.schema == FAILURES
    with pytest.raises(ValueError, match="unit"):
        build_units(empty, "page", token_budget=10, encoding=ENC)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_budget"):
        build_units(empty, "chunk", token_budget=0, encoding=ENC)


def test_document_units_invariants_on_random_documents() -> None:
    rng = random.Random(7)
    vocab = [
        "revenue",
        "margin",
        "EUR",
        "12.5%",
        "\n",
        "—",
        "größe",
        "売上",
        "  ",
        "Q3",
        "{x}",
        "📈",
    ]
    rows = []
    for d in range(40):
        n = rng.randint(1, 8)
        for i in rng.sample(range(100), n):
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 60)))
            rows.append(
                {"chunk_id": f"d{d}c{i}", "document_id": f"d{d}", "chunk_index": i, "text": text}
            )
    chunks = chunks_frame(rows)
    budget = 60
    units, rejects = build_units(chunks, "document", token_budget=budget, encoding=ENC)
    frame = chunks.with_columns(blank=pl.col("text").str.strip_chars().str.len_chars() == 0)
    for row in units.iter_rows(named=True):
        doc = frame.filter(pl.col("document_id") == row["document_id"], ~pl.col("blank")).sort(
            "chunk_index"
        )
        ids, texts = doc["chunk_id"].to_list(), doc["text"].to_list()
        k = len(row["chunk_ids"])
        assert row["chunk_ids"] == ids[:k] and k >= 1
        assert row["n_tokens"] == _tokens(row["text"]) <= budget
        if row["truncated"]:
            joined = "\n\n".join(texts[:k])
            assert k < len(ids) or row["text"] != joined
            if row["text"] == joined:  # cut at a chunk boundary: the next chunk did not fit
                assert _tokens("\n\n".join(texts[: k + 1])) > budget
            else:
                assert joined.startswith(row["text"])
        else:
            assert row["text"] == "\n\n".join(texts) and k == len(ids)
    rejected = set(rejects["unit_id"])
    assert rejected | set(units["unit_id"]) == {f"acme/{d}" for d in chunks["document_id"]}
    assert not rejected & set(units["unit_id"])
