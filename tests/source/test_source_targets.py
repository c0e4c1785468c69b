"""Targets files: YAML and CSV parsing, clear errors, the MongoDB filter, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchyard.errors import TargetsError
from batchyard.settings import MongoFields
from batchyard.targets import CompanyTarget, Targets, load_targets, write_targets


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_companies_with_and_without_documents(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "t.yaml",
        "companies:\n"
        "  - company_id: acme\n"
        "    documents: [acme-10k-2025, acme-10q-2025q2]\n"
        "  - company_id: globex\n"
        "  - company_id: 0700\n"  # stays the string "0700", not an int/octal
        "  - company_id: société-générale\n",
    )
    targets = load_targets(path)
    assert targets.company_ids == ["acme", "globex", "0700", "société-générale"]
    assert targets.companies[0].documents == ["acme-10k-2025", "acme-10q-2025q2"]
    assert targets.companies[1].documents is None


def test_csv_rows_per_document_and_blank_for_all(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "t.csv",
        "company_id,document_id\nacme,acme-10k-2025\nacme,acme-10q-2025q2\nglobex,\n\n initech , \n",
    )
    targets = load_targets(path)
    assert targets.company_ids == ["acme", "globex", "initech"]
    assert targets.companies[0].documents == ["acme-10k-2025", "acme-10q-2025q2"]
    assert targets.companies[1].documents is None
    assert targets.companies[2].documents is None


def test_csv_with_only_company_column(tmp_path: Path) -> None:
    targets = load_targets(_write(tmp_path, "t.csv", "company_id\nacme\nglobex\n"))
    assert [c.documents for c in targets.companies] == [None, None]


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("dup.yaml", "companies:\n  - company_id: acme\n  - company_id: acme\n", "duplicate company 'acme'"),
        ("empty.yaml", "companies:\n  - company_id: '  '\n", "companies entry 1: company_id is empty"),
        ("bad.yaml", "companies: [\n  - oops: {\n", "invalid YAML at line"),
        ("key.yaml", "companies:\n  - company_id: acme\n    docs: [a]\n", "unknown key(s): docs"),
        ("top.yaml", "targets: []\n", "unknown top-level key(s): targets"),
        ("nolist.yaml", "companies:\n  - company_id: acme\n    documents: []\n", "empty list"),
        ("dupdoc.yaml", "companies:\n  - company_id: acme\n    documents: [a, a]\n", "document 'a' is listed twice"),
        ("none.yaml", "companies: []\n", "no companies listed"),
        ("blank.yaml", "", "file is empty"),
        ("cols.csv", "company_id,document_id,note\nacme,a,x\n", "unknown column(s) 'note'"),
        ("nocompany.csv", "document_id\na\n", "missing required column 'company_id'"),
        ("emptyid.csv", "company_id,document_id\n,a\n", "line 2: empty company_id"),
        ("mixed.csv", "company_id,document_id\nacme,\nacme,a\n", "line 3: company 'acme' is listed with all"),
        ("duprow.csv", "company_id,document_id\nacme,a\nacme,a\n", "line 3: duplicate row acme,a"),
        ("extra.csv", "company_id,document_id\nacme,a,b\n", "line 2: 3 fields"),
        ("t.json", "{}", "unknown file type '.json'"),
    ],
)
def test_errors_name_the_file_and_the_entry(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(TargetsError) as info:
        load_targets(path)
    message = str(info.value)
    assert str(path) in message
    assert needle in message
    assert info.value.path == str(path)


def test_missing_file_is_a_targets_error(tmp_path: Path) -> None:
    with pytest.raises(TargetsError, match="does not exist"):
        load_targets(tmp_path / "nope.yaml")


def test_mongo_filter_combines_whole_companies_and_document_lists() -> None:
    fields = MongoFields(company="meta.company", document="doc")
    targets = Targets(
        companies=[
            CompanyTarget(company_id="acme", documents=["a1", "a2"]),
            CompanyTarget(company_id="globex"),
            CompanyTarget(company_id="initech"),
        ]
    )
    assert targets.mongo_filter(fields) == {
        "$or": [
            {"meta.company": {"$in": ["globex", "initech"]}},
            {"meta.company": "acme", "doc": {"$in": ["a1", "a2"]}},
        ]
    }
    only = Targets(companies=[CompanyTarget(company_id="globex")])
    assert only.mongo_filter(fields) == {"meta.company": "globex"}
    assert Targets().mongo_filter(fields) == {"meta.company": {"$in": []}}


def test_mongo_filter_selects_the_right_chunks(chunks, fields) -> None:  # type: ignore[no-untyped-def]
    chunks.insert_many(
        [
            {"_id": f"{c}/{d}/{i}", "company_id": c, "document_id": d, "text": "x"}
            for c, d in [("acme", "a1"), ("acme", "a2"), ("acme", "a3"), ("globex", "g1"), ("hooli", "h1")]
            for i in range(2)
        ]
    )
    targets = Targets(
        companies=[CompanyTarget(company_id="acme", documents=["a1", "a3"]), CompanyTarget(company_id="globex")]
    )
    found = sorted(d["_id"] for d in chunks.find(targets.mongo_filter(fields)))
    assert found == ["acme/a1/0", "acme/a1/1", "acme/a3/0", "acme/a3/1", "globex/g1/0", "globex/g1/1"]


@pytest.mark.parametrize("name", ["out.yaml", "out.csv"])
def test_write_then_load_round_trips(tmp_path: Path, name: str) -> None:
    targets = Targets(
        companies=[
            CompanyTarget(company_id="acme", documents=["acme-10k-2025", "acme, inc-pr"]),
            CompanyTarget(company_id="zürcher-energy"),
        ]
    )
    path = write_targets(tmp_path / "sub" / name, targets)
    assert load_targets(path) == targets
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
