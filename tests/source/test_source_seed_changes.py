"""Changes to a seeded corpus (`batchyard.seed_changes`): what they touch, and that the change
field finds exactly that."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from batchyard.clients.mongo import open_document_store
from batchyard.seed import seed_store
from batchyard.seed_changes import (
    add_chunks,
    delete_chunks,
    edit_chunks,
    pick_chunks,
    rechunk_document,
)
from batchyard.settings import MongoFields, MongoSettings

SEEDED = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
LATER = datetime(2026, 4, 2, 9, 0, tzinfo=UTC)


def _words(texts: list[str]) -> list[str]:
    return re.findall(r"\S+", " ".join(texts))


@pytest.mark.parametrize("custom", [False, True])
def test_changes_are_what_the_change_field_finds(tmp_path: Path, custom: bool) -> None:
    f = (MongoFields(chunk_id="uid", company="meta.company", document="doc", text="body", updated_at="meta.changed")
         if custom else MongoFields())
    settings = MongoSettings(fields=f)
    with open_document_store(settings, standin_dir=tmp_path) as store:
        report = seed_store(store, 1_500, fields=f, seed=3, updated_at=SEEDED)
        chunks = store.chunks
        marked = pick_chunks(store, 40, seed=9)
        chunks.update_many({"_id": {"$in": marked}}, {"$set": {f"{f.marks}.space.text_sha256": "x"}})

        before = {d["_id"]: d for d in chunks.find()}
        edited = edit_chunks(store, 7, fields=f, seed=1, at=LATER)
        deleted = delete_chunks(store, 5, seed=2)
        added = add_chunks(store, 6, fields=f, seed=3, at=LATER)
        company = next(iter(report.catalog))
        document = report.catalog[company][0]
        old_texts = [d[f.text] for d in chunks.find({f.company: company, f.document: document}).sort(f.chunk_index, 1)]
        rechunked = rechunk_document(store, company, document, fields=f, at=LATER, target_chars=2_500)

        assert len(edited.edited) == 7 and len(deleted.deleted) == 5 and len(added.added) == 6
        assert pick_chunks(store, 7, seed=1) == pick_chunks(store, 7, seed=1)  # deterministic
        changed = {d["_id"] for d in chunks.find({f.updated_at: {"$gte": LATER}}, {"_id": 1})}
        survivors = set(edited.edited) - set(deleted.deleted) - set(rechunked.deleted)
        assert changed == survivors | set(added.added) | set(rechunked.added)
        assert not chunks.count_documents({"_id": {"$in": deleted.deleted + rechunked.deleted}})
        assert chunks.count_documents({}) == (1_500 - len(set(deleted.deleted))
                                              + 6 - len(set(rechunked.deleted) - set(deleted.deleted))
                                              + len(rechunked.added))
        for chunk_id in survivors:
            doc = chunks.find_one({"_id": chunk_id})
            assert doc[f.text] != before[chunk_id][f.text]
        for chunk_id in added.added:  # the document's next chunk, its metadata, no marks
            doc = chunks.find_one({"_id": chunk_id})
            company_id, document_id, index = chunk_id.split("/")
            assert _get(doc, f.company) == company_id and doc[f.document] == document_id
            assert doc[f.chunk_index] == int(index) and f.marks not in doc
            assert doc["company_name"] and doc["title"]
            if custom:
                assert doc["uid"] == chunk_id
        new = list(chunks.find({"_id": {"$in": rechunked.added}}).sort(f.chunk_index, 1))
        assert [d[f.chunk_index] for d in new] == list(range(len(new)))
        assert 1 <= len(new) < len(rechunked.deleted)
        assert _words([d[f.text] for d in new]) == _words(old_texts)  # the same text, cut elsewhere
        assert {_get(d, f.updated_at) for d in new} == {LATER}
        assert all(_get(d, f.updated_at) == SEEDED for d in chunks.find({"_id": {"$in": marked}})
                   if d["_id"] not in survivors)


def _get(doc: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        doc = doc[key]
    return doc
