"""Bulk import into a real Milvus server (the session's embedded 2.3.5), and the S3 writer side
against moto: new ids are imported, known ids upserted, failures and timeouts are clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from batchyard.clients import milvus as mv
from batchyard.errors import ConfigError
from batchyard.settings import MilvusSettings
from batchyard.stages.load import load_vectors
from tests.milvus_server import MilvusServerInfo
from tests.s3.moto_s3 import ADMIN_KEY, ADMIN_SECRET, S3Endpoint
from tests.sinks.vectors import vector_frame

pytestmark = pytest.mark.milvus_server

DIM = 16
NAME = "chunks_bulk_16"


def _config(server: MilvusServerInfo, tmp_path: Path, **overrides: Any) -> mv.BulkImportConfig:
    settings = MilvusSettings(
        uri=server.uri, bulk_import_min_rows=100, bulk_local_dir=str(tmp_path / "bulk"), **overrides
    )
    cfg = mv.BulkImportConfig.from_settings(settings)
    assert cfg is not None
    return cfg


def _s3_config(server: MilvusServerInfo, s3: S3Endpoint, bucket: str, **overrides: Any) -> mv.BulkImportConfig:
    cfg = mv.BulkImportConfig.from_settings(
        MilvusSettings(
            uri=server.uri, bulk_import_min_rows=1, bulk_storage="s3", bulk_s3_bucket=bucket,
            bulk_s3_endpoint_url=s3.url, bulk_s3_access_key_id=ADMIN_KEY,
            bulk_s3_secret_access_key=ADMIN_SECRET, **overrides,
        )
    )
    assert cfg is not None
    return cfg


def _load(client: Any, frame: pl.DataFrame, run_id: str, cfg: mv.BulkImportConfig | None) -> Any:
    return load_vectors(client, NAME, frame, run_id=run_id, batch_rows=64, max_request_bytes=1 << 20, bulk=cfg)


def _stored(client: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = client.query(NAME, filter=mv.id_filter(ids), output_fields=[*mv.FIELDS], consistency_level="Strong")
    return {r["chunk_id"]: r for r in rows}


def test_bulk_import_loads_new_ids_and_upserts_known_ones(
    server_milvus: Any, milvus_server: MilvusServerInfo, tmp_path: Path
) -> None:
    mv.ensure_collection(server_milvus, NAME, dim=DIM, index_type="HNSW", metric_type="COSINE")
    cfg = _config(milvus_server, tmp_path)
    first = vector_frame(300, dim=DIM, seed=1)

    r1 = _load(server_milvus, first, "run-1", cfg)
    assert (r1.method, r1.rows, r1.imported, r1.upserted, r1.batches) == ("bulk_import", 300, 300, 0, 1)
    # visible as soon as the load returns, with every field as written
    assert mv.count(server_milvus, NAME) == 300
    got = _stored(server_milvus, first["chunk_id"].to_list()[:5])
    for i, cid in enumerate(first["chunk_id"].to_list()[:5]):
        row = got[cid]
        assert (row["company_id"], row["document_id"], row["chunk_index"], row["text_sha256"], row["run_id"]) == (
            first["company_id"][i], first["document_id"][i], first["chunk_index"][i], first["text_sha256"][i], "run-1"
        )
        np.testing.assert_allclose(row["vector"], first["vector"][i].to_numpy(), rtol=1e-6)
    # imported rows are found by company (the partition key), unlike 2.3.5 upserts (see upsert_frame)
    per_company = first.group_by("company_id").len()
    for company, n in per_company.iter_rows():
        assert mv.count(server_milvus, NAME, filter=f'company_id == "{company}"') == n

    # the same 300 ids again (new vectors) plus 150 new ones: import inserts, so the known ids
    # must go through upsert or they would exist twice
    again = pl.concat([vector_frame(300, dim=DIM, seed=2), vector_frame(150, dim=DIM, seed=3, start=300)])
    r2 = _load(server_milvus, again, "run-2", cfg)
    assert (r2.method, r2.rows, r2.imported, r2.upserted) == ("bulk_import", 450, 150, 300)
    assert r2.batches == 5 + 1  # 300 known ids in upserts of 64, one import file
    assert mv.count(server_milvus, NAME) == 450
    assert mv.count(server_milvus, NAME, filter='run_id == "run-2"') == 450
    for company, n in again.group_by("company_id").len().iter_rows():
        assert mv.count(server_milvus, NAME, filter=f'company_id == "{company}"') == n
    target = again.row(7, named=True)
    hit = mv.search(server_milvus, NAME, target["vector"], limit=1)[0]
    assert hit["chunk_id"] == target["chunk_id"] and hit["distance"] == pytest.approx(1.0, abs=1e-4)

    # a third identical load imports nothing and changes nothing; the import files are gone
    r3 = _load(server_milvus, again, "run-3", cfg)
    assert (r3.imported, r3.upserted) == (0, 450) and mv.count(server_milvus, NAME) == 450
    assert list((tmp_path / "bulk").iterdir()) == []


def test_small_loads_upsert_and_ids_with_quotes_are_matched(
    server_milvus: Any, milvus_server: MilvusServerInfo, tmp_path: Path
) -> None:
    mv.ensure_collection(server_milvus, NAME, dim=DIM, index_type="FLAT", metric_type="COSINE")
    cfg = _config(milvus_server, tmp_path)
    small = vector_frame(99, dim=DIM)
    receipt = _load(server_milvus, small, "r", cfg)
    assert (receipt.method, receipt.upserted, receipt.imported) == ("upsert", 99, 0)

    odd = ['a"b', "a'b", "back\\slash", "ünï/ß", "tab\tx", "new\nline"]
    frame = vector_frame(len(odd), dim=DIM, start=500).with_columns(pl.Series("chunk_id", odd))
    _load(server_milvus, frame, "r", None)
    assert mv.existing_ids(server_milvus, NAME, [*odd, "absent", "a"]) == set(odd)
    bulk_again = pl.concat([frame, vector_frame(100, dim=DIM, start=600)])
    receipt = _load(server_milvus, bulk_again, "r2", cfg)
    assert (receipt.method, receipt.upserted, receipt.imported) == ("bulk_import", len(odd), 100)
    assert mv.count(server_milvus, NAME) == 99 + len(odd) + 100


def test_bulk_import_applies_only_to_servers_and_checks_its_settings() -> None:
    server = "http://127.0.0.1:19530"
    on = {"bulk_import_min_rows": 5}
    assert MilvusSettings().bulk_import_min_rows is None  # off by default (benchmarks/README.md)
    assert mv.BulkImportConfig.from_settings(MilvusSettings(uri=server)) is None
    assert mv.BulkImportConfig.from_settings(MilvusSettings(**on)) is None  # Milvus Lite
    assert mv.BulkImportConfig.from_settings(MilvusSettings(uri="./milvus.db", **on)) is None
    # Milvus 2.3 imports into the default database only
    assert mv.BulkImportConfig.from_settings(MilvusSettings(uri=server, db_name="other", **on)) is None
    cfg = mv.BulkImportConfig.from_settings(MilvusSettings(uri=server, db_name="default", **on))
    assert cfg is not None and cfg.min_rows == 5 and cfg.storage == "local"
    with pytest.raises(ConfigError, match="bulk_s3_bucket"):
        mv.BulkImportConfig.from_settings(MilvusSettings(uri=server, bulk_storage="s3", **on))
    assert mv.bulk_import_unavailable() is None  # the test extra installs the bulk writer


def test_remote_writer_puts_parquet_files_in_the_bucket(
    milvus_server: MilvusServerInfo, s3: S3Endpoint, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    cfg = _s3_config(milvus_server, s3, bucket)
    frame = vector_frame(250, dim=DIM).with_columns(pl.lit("run-s3").alias("run_id"))
    scalars, vectors = mv._prepared(frame, NAME)
    groups = mv.write_import_files(NAME, scalars, vectors, cfg, str(tmp_path))
    assert len(groups) == 1 and len(groups[0]) == 1
    key = groups[0][0]
    assert key.startswith("batchyard-bulk/") and key.endswith(".parquet")
    fs = s3.admin_fs()
    with fs.open(f"{bucket}/{key}", "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == 250 and set(table.column_names) == set(mv.FIELDS)
    assert table.column("chunk_id").to_pylist() == frame["chunk_id"].to_list()
    assert set(table.column("run_id").to_pylist()) == {"run-s3"}
    np.testing.assert_array_equal(np.array(table.column("vector").to_pylist(), dtype=np.float32), vectors)
    # uploaded, then removed locally
    assert not any(p.is_file() for p in tmp_path.rglob("*"))

    with pytest.raises(mv.BulkImportError, match=r"bucket 'no-such-bucket' does not exist at http://"):
        mv.write_import_files(NAME, scalars, vectors, _s3_config(milvus_server, s3, "no-such-bucket"), str(tmp_path))


def test_a_failed_import_names_the_collection_and_the_reason(
    server_milvus: Any, milvus_server: MilvusServerInfo, s3: S3Endpoint
) -> None:
    # the embedded server reads its local disk, not this bucket: the import task fails
    mv.ensure_collection(server_milvus, NAME, dim=DIM, index_type="FLAT", metric_type="COSINE")
    bucket = s3.new_bucket()
    cfg = _s3_config(milvus_server, s3, bucket)
    with pytest.raises(mv.BulkImportError) as info:
        _load(server_milvus, vector_frame(20, dim=DIM), "r", cfg)
    message = str(info.value)
    assert NAME in message and "batchyard-bulk/" in message
    assert ADMIN_SECRET not in message and ADMIN_KEY not in message
    assert mv.count(server_milvus, NAME) == 0
    assert s3.admin_fs().find(bucket) == []  # the uploaded files were removed


def test_an_import_that_does_not_finish_in_time_is_a_clear_error(
    server_milvus: Any, milvus_server: MilvusServerInfo, tmp_path: Path
) -> None:
    mv.ensure_collection(server_milvus, NAME, dim=DIM, index_type="FLAT", metric_type="COSINE")
    cfg = _config(milvus_server, tmp_path, bulk_import_timeout_s=0.001)
    with pytest.raises(mv.BulkImportError, match=rf"{NAME}.*1 import task\(s\) not completed after 0.001 s"):
        _load(server_milvus, vector_frame(200, dim=DIM), "r", cfg)
    # the task goes on on the server; Milvus 2.3 keeps its only DataNode busy until the task
    # completes, which it never does once its collection is dropped: the next test's import
    # would be refused for 15 minutes. Let it finish first.
    _wait_for_the_server_imports(milvus_server, NAME)


def _wait_for_the_server_imports(server: MilvusServerInfo, name: str, timeout_s: float = 120.0) -> None:
    import time

    from pymilvus import BulkInsertState, connections, utility

    done = {BulkInsertState.ImportCompleted, BulkInsertState.ImportFailed, BulkInsertState.ImportFailedAndCleaned}
    connections.connect(alias="wait-imports", uri=server.uri)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tasks = utility.list_bulk_insert_tasks(collection_name=name, using="wait-imports")
            if all(t.state in done for t in tasks):
                return
            time.sleep(0.5)
        raise AssertionError(f"imports into {name} still running after {timeout_s:g} s")
    finally:
        connections.disconnect("wait-imports")
