"""`Staging` on a real local S3 endpoint: round trips, listings, atomic writes, Polars scans."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from batchyard.settings import StagingSettings
from batchyard.storage.staging import Staging
from tests.s3.moto_s3 import ADMIN_KEY, ADMIN_SECRET, REGION, S3Endpoint

pytestmark = pytest.mark.s3

SCHEMA = pl.Schema({"id": pl.String, "n": pl.Int64, "v": pl.Array(pl.Float32, 3)})


def open_staging(s3: S3Endpoint, bucket: str, prefix: str = "runs") -> Staging:
    return Staging.from_settings(StagingSettings(**s3.staging(bucket, prefix)))


def page(start: int, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": [f"c{i:04d}" for i in range(start, start + n)], "n": list(range(start, start + n)),
         "v": [[float(i), 0.5, -1.0] for i in range(start, start + n)]},
        schema=SCHEMA,
    )


def keys(s3: S3Endpoint, bucket: str) -> list[str]:
    """Every object key in the bucket, straight from S3."""
    return sorted(p.split("/", 1)[1] for p in s3.admin_fs().find(bucket))


@pytest.fixture
def st(s3: S3Endpoint, bucket: str) -> Staging:
    return open_staging(s3, bucket)


def test_settings_open_an_s3_root_with_the_configured_endpoint_and_keys(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    assert st.is_s3 and st.root == f"s3://{bucket}/runs"
    assert st.path("a", "b.json") == f"s3://{bucket}/runs/a/b.json"
    assert repr(st) == f"Staging('s3://{bucket}/runs')"
    opts = st.polars_options()
    assert opts == {"aws_endpoint_url": s3.url, "aws_access_key_id": ADMIN_KEY,
                    "aws_secret_access_key": ADMIN_SECRET, "aws_region": REGION, "aws_allow_http": "true"}


def test_bytes_and_json_round_trip_as_s3_objects(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    st.write_bytes("job/r1/shards/s0.1.jsonl", b'{"a": 1}\n{"b": 2}\n')
    st.write_json("job/r1/run.json", {"phase": "plan", "n": 3, "nested": {"x": [1, 2]}})
    assert st.read_bytes("job/r1/shards/s0.1.jsonl") == b'{"a": 1}\n{"b": 2}\n'
    assert st.read_json("job/r1/run.json") == {"phase": "plan", "n": 3, "nested": {"x": [1, 2]}}
    assert keys(s3, bucket) == ["runs/job/r1/run.json", "runs/job/r1/shards/s0.1.jsonl"]
    # an overwrite replaces the whole object
    st.write_json("job/r1/run.json", {"phase": "done"})
    assert st.read_json("job/r1/run.json") == {"phase": "done"}


def test_parquet_round_trip(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    df = page(0, 50)
    st.write_parquet("job/r1/chunks.parquet", df)
    assert keys(s3, bucket) == ["runs/job/r1/chunks.parquet"]
    back = st.read_parquet("job/r1/chunks.parquet")
    assert back.schema == df.schema and back.equals(df)


def test_parquet_writer_writes_page_by_page(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    with st.parquet_writer("job/r1/chunks.parquet", SCHEMA) as out:
        for start in range(0, 1000, 250):
            out.write(page(start, 250))
            # nothing is visible until the block ends
            assert not st.exists("job/r1/chunks.parquet")
        out.write(page(0, 0))  # an empty page is fine
    assert out.rows == 1000
    back = st.read_parquet("job/r1/chunks.parquet")
    assert back.height == 1000 and back.schema == SCHEMA
    assert back.equals(pl.concat([page(s, 250) for s in range(0, 1000, 250)]))
    assert keys(s3, bucket) == ["runs/job/r1/chunks.parquet"]


def test_parquet_writer_with_no_pages_writes_an_empty_typed_file(st: Staging) -> None:
    with st.parquet_writer("job/r1/empty.parquet", SCHEMA) as out:
        pass
    assert out.rows == 0
    back = st.read_parquet("job/r1/empty.parquet")
    assert back.height == 0 and back.schema == SCHEMA


def test_a_failed_parquet_writer_leaves_no_object(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    with pytest.raises(RuntimeError, match="source went away"), st.parquet_writer("job/r1/chunks.parquet", SCHEMA) as out:
        out.write(page(0, 100))
        out.write(page(100, 100))
        raise RuntimeError("source went away")
    assert not st.exists("job/r1/chunks.parquet")
    assert keys(s3, bucket) == []
    assert not s3.admin_fs().list_multipart_uploads(bucket), "no dangling multipart upload"


def _pieces(n: int, fail_after: int | None = None) -> Iterator[bytes]:
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise ConnectionError("the download broke off")
        yield f"line {i}\n".encode() * 1000


def test_a_streamed_write_is_whole_or_absent(st: Staging, s3: S3Endpoint, bucket: str, tmp_path: Path) -> None:
    st.write_stream("job/r1/outputs/a.jsonl", _pieces(5))
    assert st.read_bytes("job/r1/outputs/a.jsonl") == b"".join(_pieces(5))
    with pytest.raises(ConnectionError):
        st.write_stream("job/r1/outputs/b.jsonl", _pieces(5, fail_after=3))
    assert [k.split("/", 1)[1] for k in keys(s3, bucket)] == ["job/r1/outputs/a.jsonl"], "a broken stream leaves no object"
    local = Staging(str(tmp_path / "staging"))
    local.write_stream("job/r1/a.jsonl", _pieces(5))
    assert local.read_bytes("job/r1/a.jsonl") == b"".join(_pieces(5))
    with pytest.raises(ConnectionError):
        local.write_stream("job/r1/b.jsonl", _pieces(5, fail_after=3))
    assert sorted(os.listdir(tmp_path / "staging" / "job" / "r1")) == ["a.jsonl"], "no partial or temporary file"


def test_a_failed_rewrite_keeps_the_previous_object(st: Staging) -> None:
    st.write_parquet("job/r1/chunks.parquet", page(0, 10))
    with pytest.raises(ValueError), st.parquet_writer("job/r1/chunks.parquet", SCHEMA) as out:
        out.write(page(0, 20))
        raise ValueError("boom")
    assert st.read_parquet("job/r1/chunks.parquet").equals(page(0, 10))


def test_a_page_of_the_wrong_type_fails_the_write_and_leaves_no_object(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    with pytest.raises(Exception), st.parquet_writer("job/r1/chunks.parquet", SCHEMA) as out:  # noqa: B017
        out.write(page(0, 10))
        out.write(pl.DataFrame({"id": ["x"], "n": ["not a number"], "v": [[1.0, 2.0, 3.0]]}))
    assert keys(s3, bucket) == []


def test_list_list_dirs_exists_and_delete(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    assert st.list("job/r1/ledger") == [] and st.list_dirs("") == [] and st.list_dirs("nope") == []
    assert not st.exists("job/r1/run.json")
    for name in ("s00002.1", "s00000.1", "s00001.2"):
        st.write_json(f"job/r1/ledger/{name}.json", {"name": name})
    st.write_bytes("job/r1/ledger/notes.txt", b"x")
    st.write_json("job/r2/run.json", {})
    st.write_json("other/r3/run.json", {})
    assert st.list("job/r1/ledger", ".json") == ["s00000.1.json", "s00001.2.json", "s00002.1.json"]
    assert st.list("job/r1/ledger") == ["notes.txt", "s00000.1.json", "s00001.2.json", "s00002.1.json"]
    assert st.list_dirs("") == ["job", "other"]
    assert st.list_dirs("job") == ["r1", "r2"]
    assert st.list_dirs("job/r1") == ["ledger"]
    assert st.exists("job/r1/ledger/s00000.1.json") and st.exists("job/r2/run.json")
    assert not st.exists("job/r1/ledger/s00009.1.json")

    st.delete("job/r1/ledger/s00001.2.json")
    st.delete("job/r1/ledger/never-written.json")  # missing is fine
    assert st.list("job/r1/ledger", ".json") == ["s00000.1.json", "s00002.1.json"]
    assert not st.exists("job/r1/ledger/s00001.2.json")
    assert "runs/job/r1/ledger/s00001.2.json" not in keys(s3, bucket)


def test_listings_see_files_written_after_a_listing(st: Staging) -> None:
    # the same Staging lists, writes, lists again
    assert st.list("job/r1/ledger", ".json") == []
    st.write_json("job/r1/ledger/a.json", {})
    assert st.list("job/r1/ledger", ".json") == ["a.json"]
    st.write_json("job/r1/ledger/b.json", {})
    assert st.list("job/r1/ledger", ".json") == ["a.json", "b.json"]
    assert st.list_dirs("job") == ["r1"]
    st.write_json("job/r2/run.json", {})
    assert st.list_dirs("job") == ["r1", "r2"]


def test_listings_see_files_another_process_wrote(st: Staging, s3: S3Endpoint, bucket: str) -> None:
    # another process (here: another s3fs filesystem) writes between two listings of this one;
    # with s3fs's listing cache on, the second listing and `exists` would be stale
    st.write_json("job/r1/ledger/a.json", {})
    assert st.list("job/r1/ledger") == ["a.json"]
    assert st.list_dirs("job") == ["r1"]
    other = s3.admin_fs()
    other.pipe_file(f"{bucket}/runs/job/r1/ledger/b.json", b"{}")
    other.pipe_file(f"{bucket}/runs/job/r2/run.json", b"{}")
    assert st.exists("job/r1/ledger/b.json")
    assert st.list("job/r1/ledger") == ["a.json", "b.json"]
    assert st.list_dirs("job") == ["r1", "r2"]
    other.rm_file(f"{bucket}/runs/job/r1/ledger/a.json")
    assert st.list("job/r1/ledger") == ["b.json"]
    assert not st.exists("job/r1/ledger/a.json")


def test_scan_parquet_of_several_files_is_lazy_and_uses_polars_s3_options(st: Staging) -> None:
    rels = []
    for i in range(3):
        rel = f"job/r1/parsed/s{i:05d}.1.parquet"
        st.write_parquet(rel, page(i * 10, 10))
        rels.append(rel)
    lf = st.scan_parquet(rels)
    assert isinstance(lf, pl.LazyFrame)
    got = lf.filter(pl.col("n") % 2 == 0).select("id", "n").sort("n").collect()
    assert got["n"].to_list() == list(range(0, 30, 2))
    assert lf.select(pl.len()).collect().item() == 30


def test_polars_reads_the_root_directly_with_polars_options(st: Staging) -> None:
    # Polars ignores s3fs's names `key`/`secret` (ENVIRONMENT.md): polars_options translates them
    st.write_parquet("job/r1/x.parquet", page(0, 3))
    good = pl.scan_parquet(st.path("job/r1/x.parquet"), storage_options=st.polars_options()).collect()
    assert good.height == 3
    assert all(k.startswith("aws_") for k in st.polars_options())


def test_two_prefixes_in_one_bucket_are_separate_roots(s3: S3Endpoint, bucket: str) -> None:
    a, b = open_staging(s3, bucket, "team-a"), open_staging(s3, bucket, "team-b/runs")
    a.write_json("job/r1/run.json", {"who": "a"})
    b.write_json("job/r1/run.json", {"who": "b"})
    assert a.read_json("job/r1/run.json") == {"who": "a"}
    assert b.read_json("job/r1/run.json") == {"who": "b"}
    assert keys(s3, bucket) == ["team-a/job/r1/run.json", "team-b/runs/job/r1/run.json"]


def test_local_dir_of_an_s3_root_is_per_root_under_the_working_directory(s3: S3Endpoint, bucket: str, tmp_path: Path) -> None:
    a, b = open_staging(s3, bucket, "team-a"), open_staging(s3, bucket, "team-b/runs")
    # the env-isolation fixture runs each test in tmp_path
    assert a.local_dir() == tmp_path / ".batchyard" / "s3" / bucket / "team-a"
    assert b.local_dir(".localapi") == tmp_path / ".batchyard" / "s3" / bucket / "team-b" / "runs" / ".localapi"
    assert b.local_dir(".localapi").is_dir()
    # nothing local becomes an object
    assert a.list_dirs("") == []
    custom = Staging(f"s3://{bucket}/team-a", storage_options={"endpoint_url": s3.url, "key": ADMIN_KEY,
                                                               "secret": ADMIN_SECRET}, local_root=tmp_path / "state")
    assert custom.local_dir("milvus.db").parent == tmp_path / "state" / "s3" / bucket / "team-a"


def test_local_roots_are_unchanged(tmp_path: Path) -> None:
    st = Staging(str(tmp_path / "staging"))
    assert not st.is_s3 and st.local_dir() == tmp_path / "staging"
    st.write_json("job/r1/ledger/a.json", {})
    assert st.list("job/r1/ledger") == ["a.json"] and st.list("job/none") == []
    assert st.list_dirs("") == ["job"] and st.list_dirs("missing") == []
    with pytest.raises(RuntimeError), st.parquet_writer("job/r1/c.parquet", SCHEMA) as out:
        out.write(page(0, 5))
        raise RuntimeError("x")
    assert sorted(os.listdir(tmp_path / "staging" / "job" / "r1")) == ["ledger"], "no temporary file is left behind"
    assert st.list("job/r1") == [] and st.list_dirs("job/r1") == ["ledger"]
    st.write_parquet("job/r1/p1.parquet", page(0, 5))
    st.write_parquet("job/r1/p2.parquet", page(5, 5))
    assert st.scan_parquet(["job/r1/p1.parquet", "job/r1/p2.parquet"]).collect().height == 10


def test_s3_credentials_are_masked_in_the_s3_clients_debug_logs(s3: S3Endpoint, bucket: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    key, secret = "AKIDLOGCHECK0000TEST", "s3-secret-logcheck-value"
    st = Staging.from_settings(StagingSettings(**s3.staging(bucket, key=key, secret=secret)))
    # batchyard.logs.silence_noise() (run by any earlier CLI test) raises botocore to WARNING
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="botocore"), \
            caplog.at_level(logging.DEBUG, logger="aiobotocore"):
        st.write_json("job/r1/run.json", {})
        assert st.read_json("job/r1/run.json") == {}
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Sending http request" in text, "botocore logged its requests (else this test proves nothing)"
    assert key not in text and secret not in text
