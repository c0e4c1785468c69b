"""Planning: limits at their edges, packing, custom_id round trip, odd texts (pure Polars)."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest

from batchyard.schemas import CHUNKS
from batchyard.settings import LimitsSettings
from batchyard.stages import plan
from batchyard.tokens import count_tokens, ensure_tiktoken_offline


def chunks(texts: list[str | None], company: str = "acme") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "chunk_id": [f"{company}/doc/{i:05d}" for i in range(len(texts))],
            "source_id": [f"'{company}/doc/{i:05d}'" for i in range(len(texts))],
            "id_kind": ["str"] * len(texts),
            "company_id": [company] * len(texts),
            "document_id": ["doc"] * len(texts),
            "chunk_index": list(range(len(texts))),
            "text": texts,
            "text_sha256": [hashlib.sha256((t or "").encode()).hexdigest() for t in texts],
        },
        schema=CHUNKS,
    )


def build(df: pl.DataFrame, limits: LimitsSettings, dims: int | None = 8) -> pl.DataFrame:
    ok, _ = plan.prepare_inputs(df, limits=limits, encoding="cl100k_base")
    reqs = plan.embedding_requests(ok, model="text-embedding-3-small", dimensions=dims, limits=limits)
    plan.check_shards(reqs, plan.ShardLimits.from_settings(limits))
    return reqs


def test_token_counts_match_tiktoken() -> None:
    import tiktoken

    ensure_tiktoken_offline()
    enc = tiktoken.get_encoding("cl100k_base")
    texts = ["Revenue rose 12% to €4.2bn.", "naïve café — 東京 📈", "", "a" * 5000, "\x00 tab\tnew\nline"]
    assert count_tokens(texts) == [len(enc.encode_ordinary(t)) for t in texts]


def test_empty_and_whitespace_texts_are_rejected_with_reason() -> None:
    df = chunks(["real text", "", "   \n\t", None])
    ok, rejects = plan.prepare_inputs(df, limits=LimitsSettings(), encoding="cl100k_base")
    assert ok["chunk_id"].to_list() == ["acme/doc/00000"]
    assert sorted(rejects["unit_id"].to_list()) == ["acme/doc/00001", "acme/doc/00002", "acme/doc/00003"]
    assert set(rejects["code"]) == {"empty_text"}
    assert all("acme/doc/0000" in m for m in rejects["message"])


@pytest.mark.parametrize("mode", ["truncate", "skip"])
def test_over_limit_inputs_truncated_or_skipped(mode: str) -> None:
    limits = LimitsSettings(max_tokens_per_input=50, over_limit=mode)
    long = "word " * 400
    ok, rejects = plan.prepare_inputs(chunks(["short", long]), limits=limits, encoding="cl100k_base")
    if mode == "truncate":
        row = ok.filter(pl.col("chunk_id") == "acme/doc/00001").row(0, named=True)
        assert row["truncated"] and row["tokens"] <= 50
        assert count_tokens([row["text"]])[0] == row["tokens"]
        assert long.startswith(row["text"])
    else:
        assert ok.height == 1
        assert rejects["code"].to_list() == ["too_many_tokens"]
        assert "limit per input is 50" in rejects["message"][0]


def test_packing_respects_inputs_and_tokens_per_request() -> None:
    limits = LimitsSettings(max_inputs_per_request=4, max_tokens_per_request=60, max_tokens_per_input=25)
    texts = [("alpha beta gamma " * (1 + i % 5)).strip() for i in range(41)]
    reqs = build(chunks(texts), limits)
    assert reqs["n_inputs"].max() <= 4
    assert reqs["tokens"].max() <= 60
    # every input exactly once, in order
    assert reqs["unit_ids"].explode().to_list() == [f"acme/doc/{i:05d}" for i in range(41)]


def test_request_lines_are_valid_embedding_requests() -> None:
    texts = ["Ünïcödé “quotes” \\ back\\slash", 'JSON {"a": 1}', "newline\nand\ttab"]
    reqs = build(chunks(texts), LimitsSettings())
    line = json.loads(reqs["line"][0])
    assert line["method"] == "POST" and line["url"] == "/v1/embeddings"
    assert line["body"] == {"model": "text-embedding-3-small", "input": texts, "encoding_format": "base64",
                            "dimensions": 8}
    assert line["custom_id"] == reqs["custom_id"][0]
    assert reqs["bytes"][0] == len(reqs["line"][0].encode()) + 1


def test_dimensions_omitted_when_not_passed() -> None:
    reqs = build(chunks(["x"]), LimitsSettings(), dims=None)
    assert "dimensions" not in json.loads(reqs["line"][0])["body"]


def test_custom_id_is_stable_short_and_content_derived() -> None:
    a = build(chunks(["one", "two", "three"]), LimitsSettings(max_inputs_per_request=2))
    b = build(chunks(["one", "two", "three"]), LimitsSettings(max_inputs_per_request=2))
    c = build(chunks(["one", "two", "CHANGED"]), LimitsSettings(max_inputs_per_request=2))
    assert a["custom_id"].to_list() == b["custom_id"].to_list()
    assert a["custom_id"][0] == c["custom_id"][0] and a["custom_id"][1] != c["custom_id"][1]
    assert all(len(cid) <= 64 and cid.isascii() for cid in a["custom_id"])


@pytest.mark.parametrize(
    ("limit", "value"),
    [("max_requests_per_batch", 7), ("max_inputs_per_batch", 10), ("max_bytes_per_batch", 3000),
     ("max_tokens_per_batch", 90)],
)
def test_each_shard_limit_holds_at_its_edge(limit: str, value: int) -> None:
    kw = {limit: value, "max_inputs_per_request": 3, "safety_margin": 1.0}
    limits = LimitsSettings(**kw)
    texts = [f"chunk number {i} " + "lorem ipsum " * (i % 7) for i in range(120)]
    reqs = build(chunks(texts), limits)
    stats = plan.shard_stats(reqs)
    col = {"max_requests_per_batch": "n_requests", "max_inputs_per_batch": "n_inputs",
           "max_bytes_per_batch": "bytes", "max_tokens_per_batch": "tokens"}[limit]
    assert stats[col].max() <= value
    assert stats.height > 1  # the limit actually cut
    # shards fill reasonably: no shard holds a single request unless it had to
    assert stats["n_requests"].mean() > 1


def test_shard_bytes_match_file_bytes() -> None:
    reqs = build(chunks([f"text {i}" for i in range(30)]), LimitsSettings(max_bytes_per_batch=2000, safety_margin=1.0,
                                                                          max_inputs_per_request=2))
    for _, part in reqs.group_by(["shard"]):
        data = plan.shard_bytes(part["line"])
        assert len(data) == part["bytes"].sum() <= 2000
        assert data.count(b"\n") == part.height


def test_check_shards_catches_duplicate_custom_ids() -> None:
    reqs = build(chunks(["a", "b"]), LimitsSettings(max_inputs_per_request=1))
    dup = pl.concat([reqs, reqs.head(1)])
    with pytest.raises(AssertionError, match="repeats"):
        plan.check_shards(dup, plan.ShardLimits.from_settings(LimitsSettings()))


def test_inference_custom_ids_map_back_and_hash_long_ids() -> None:
    bodies = pl.DataFrame({"unit_id": ["acme/doc/00001", "x" * 100, "has space"], "body": ['{"m":1}'] * 3,
                           "tokens": [1, 2, 3]})
    reqs = plan.inference_requests(bodies, endpoint="/v1/responses")
    lines = [json.loads(x) for x in reqs["line"]]
    assert lines[0]["custom_id"] == "u-acme/doc/00001"
    assert lines[1]["custom_id"].startswith("h-") and len(lines[1]["custom_id"]) <= 64
    assert lines[2]["custom_id"].startswith("h-")
    assert reqs["unit_ids"].to_list() == [["acme/doc/00001"], ["x" * 100], ["has space"]]
    assert all(ln["url"] == "/v1/responses" and ln["body"] == {"m": 1} for ln in lines)


def test_byte_running_sum_does_not_wrap_past_4gib() -> None:
    # len_bytes is UInt32; sums must be Int64 (ENVIRONMENT.md)
    big = pl.DataFrame({"bytes": [2_000_000_000] * 4, "n_inputs": [1] * 4, "tokens": [1] * 4,
                        "custom_id": list("abcd")}, schema_overrides={"bytes": pl.UInt32})
    out = plan.assign_shards(big, plan.ShardLimits(max_requests=100, max_bytes=4_100_000_000, max_inputs=100,
                                                   max_tokens=100))
    sums = out.group_by("shard").agg(pl.col("bytes").cast(pl.Int64).sum())["bytes"]
    assert sums.max() <= 4_100_000_000
    assert out["shard"].to_list() == ["s00000", "s00000", "s00001", "s00001"]


def test_embedding_shards_fill_a_small_token_budget() -> None:
    # issue: with a 25,000-token budget, 62 requests became 57 shards (44% average fill)
    limits = LimitsSettings(enqueued_token_budget=25_000)
    cap = plan.ShardLimits.from_settings(limits).max_tokens
    assert cap == int(25_000 * plan.QUEUE_SHARE)  # two shards fill the queue, with room to spare
    texts = [f"segment {i}: " + "revenue margin guidance " * (20 + (i * 37) % 300) for i in range(600)]
    reqs = build(chunks(texts), limits)
    stats = plan.shard_stats(reqs)
    assert stats["tokens"].max() <= cap
    full = stats.head(stats.height - 1)  # the last shard holds what is left
    assert full["tokens"].mean() / cap >= 0.95
    assert reqs["tokens"].max() <= cap, "a request never exceeds the shard's token cap"


def test_request_level_packing_fills_shards_when_requests_are_under_half_the_cap() -> None:
    import random

    rng = random.Random(7)
    n = 400
    tokens = [rng.randint(500, 12_499) for _ in range(n)]  # all under half of 25,000
    reqs = pl.DataFrame({"custom_id": [f"u-{i}" for i in range(n)], "tokens": tokens, "n_inputs": [1] * n,
                         "bytes": [t * 4 for t in tokens]})
    limits = plan.ShardLimits(max_requests=50_000, max_bytes=10**9, max_inputs=50_000, max_tokens=25_000)
    out = plan.assign_shards(reqs, limits)
    stats = out.group_by("shard").agg(pl.col("tokens").sum()).sort("shard")
    assert stats["tokens"].max() <= 25_000
    assert stats["tokens"].head(stats.height - 1).mean() / 25_000 >= 0.8
    assert sorted(out["custom_id"]) == sorted(reqs["custom_id"])


def test_nul_characters_are_sent_unchanged_and_round_trip() -> None:
    text = "before\x00after \x00\x00 end"
    reqs = build(chunks([text]), LimitsSettings())
    line = reqs["line"][0]
    assert "\\u0000" in line  # JSON escapes it
    assert json.loads(line)["body"]["input"] == [text]
    assert json.loads(plan.shard_bytes(reqs["line"]).decode().strip())["body"]["input"][0] == text


def test_repeated_texts_are_planned_once() -> None:
    df = chunks(["boilerplate text", "unique one", "boilerplate text", "boilerplate text"])
    ok, _ = plan.prepare_inputs(df, limits=LimitsSettings(), encoding="cl100k_base")
    reps, aliases = plan.split_duplicates(ok)
    assert reps["chunk_id"].to_list() == ["acme/doc/00000", "acme/doc/00001"]
    assert dict(zip(aliases["chunk_id"], aliases["rep_chunk_id"], strict=True)) == {
        "acme/doc/00002": "acme/doc/00000", "acme/doc/00003": "acme/doc/00000"}
