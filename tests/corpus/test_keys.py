"""Partition keys and bins: stable, readable, bounded (pure)."""

from __future__ import annotations

import polars as pl
import pytest

from batchyard.corpus.keys import (
    bucket_of,
    buckets_for,
    company_of,
    encode_company,
    key_expr,
    key_file,
    key_of,
    keys_of,
)
from batchyard.stages.partition import PartitionSpec, plan_bins


def test_keys_are_one_path_segment_per_company_and_decode_back() -> None:
    for company in ("acme", "Société Générale", "a/b", "100%", "x y", "日本"):
        key = encode_company(company)
        assert "/" not in key and " " not in key
        assert company_of(key) == company
        assert company_of(key_of(company, 3, 12)) == company
    assert key_of("acme", 0, 1) == "acme"
    assert key_of("globex", 7, 12) == "globex/07"
    assert keys_of("globex", 3) == ["globex/00", "globex/01", "globex/02"]
    assert keys_of("globex", 120)[-1] == "globex/119"
    assert key_file("globex/07") == "globex%2F07.json" and key_file("a%2Fb") != key_file("a/b")


def test_bucket_counts_are_fixed_by_size_and_cap() -> None:
    assert buckets_for(100, 100) == 1
    assert buckets_for(101, 100) == 2  # 101 / 90
    assert buckets_for(1_000, 100) == 12
    with pytest.raises(ValueError):
        buckets_for(10, 0)


def test_the_key_expression_routes_rows_like_bucket_of() -> None:
    rows = pl.DataFrame({"company_id": ["acme"] * 50 + ["globex"] * 50,
                         "chunk_id": [f"c{i}" for i in range(100)]})
    keyed = rows.with_columns(pkey=key_expr(pl.col("chunk_id"), {"globex": 4, "acme": 1}))
    for company, chunk, key in keyed.iter_rows():
        expected = "acme" if company == "acme" else key_of("globex", bucket_of(chunk, 4), 4)
        assert key == expected
    assert keyed.filter(pl.col("company_id") == "globex")["pkey"].n_unique() == 4  # every bucket used


def test_bins_pack_small_companies_and_split_large_ones_by_their_fixed_buckets() -> None:
    order = ["a", "b", "c", "big", "d"]
    bins = plan_bins({"a": 30, "b": 40, "c": 50, "big": 250, "d": 5}, order, {"big": 3}, 100)
    assert [b.companies for b in bins] == [["a", "b"], ["c"], ["big"], ["big"], ["big"], ["d"]]
    assert [b.keys for b in bins[2:5]] == [["big/00"], ["big/01"], ["big/02"]]
    assert all(b.buckets == {"big": 3} for b in bins[2:5])
    # a large company with few changes goes whole into one bin, with all its keys
    small_delta = plan_bins({"a": 3, "big": 20}, order, {"big": 3}, 100)
    assert [b.keys for b in small_delta] == [["a", "big/00", "big/01", "big/02"]]
    # companies with nothing to read get no bin; the same input gives the same bins
    assert plan_bins({"a": 0}, order, {}, 100) == []
    assert plan_bins({"a": 30, "b": 40}, order, {}, 100) == plan_bins({"a": 30, "b": 40}, order, {}, 100)


def test_runs_staged_before_partition_keys_read_back() -> None:
    old = {"id": "p0003", "companies": ["globex"], "chunks": 90, "bucket": 1, "buckets": 4}
    spec = PartitionSpec.from_json(old)
    assert spec.keys == ["globex/01"] and spec.buckets == {"globex": 4}
    packed = PartitionSpec.from_json({"id": "p0000", "companies": ["a", "b"], "chunks": 9, "bucket": None,
                                      "buckets": 1})
    assert packed.keys == ["a", "b"] and packed.buckets == {}
