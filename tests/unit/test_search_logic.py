"""`batchyard search`: the pure parts (filters, distinct texts, id candidates, query checks)."""

from __future__ import annotations

import pytest
from bson import ObjectId

from batchyard.errors import ConfigError
from batchyard.search import check_query, id_candidates, new_texts, scope_filter


def test_scope_filter_quotes_values_as_json_literals() -> None:
    assert scope_filter(None, None) == ""
    assert scope_filter("acme", None) == 'company_id == "acme"'
    assert scope_filter('a"b', "d\\1") == 'company_id == "a\\"b" and document_id == "d\\\\1"'


def test_new_texts_keeps_the_best_hit_of_each_text_in_rank_order() -> None:
    hits = [{"chunk_id": "a", "text_sha256": "x", "distance": 1.0},
            {"chunk_id": "b", "text_sha256": "x", "distance": 1.0},
            {"chunk_id": "c", "text_sha256": "y", "distance": 0.5},
            {"chunk_id": "d", "text_sha256": "x", "distance": 0.4}]
    seen: dict[str, dict[str, object]] = {}
    assert new_texts(hits, seen) == 2
    assert [h["chunk_id"] for h in seen.values()] == ["a", "c"]
    assert new_texts([{"chunk_id": "e", "text_sha256": "y", "distance": 0.3}], seen) == 0


def test_id_candidates_cover_string_objectid_and_int_ids() -> None:
    oid = ObjectId()
    assert id_candidates("acme/doc/00001") == ["acme/doc/00001"]
    assert id_candidates(str(oid)) == [str(oid), oid]
    assert id_candidates("42") == ["42", 42]


def test_a_query_must_have_text_and_fit_one_input() -> None:
    with pytest.raises(ConfigError, match="the search text is empty"):
        check_query("  \n", max_tokens=10, encoding="cl100k_base")
    with pytest.raises(ConfigError, match=r"the search text is \d+ tokens; an embeddings input takes at most 5"):
        check_query("one two three four five six seven", max_tokens=5, encoding="cl100k_base")
    check_query("one two", max_tokens=5, encoding="cl100k_base")
