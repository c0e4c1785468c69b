"""`batchyard search` through the command line, on Milvus Lite and on a real Milvus server."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli import cli

pytestmark = pytest.mark.e2e


def source_chunks(tmp_path: Path) -> list[dict[str, Any]]:
    """Every chunk in the test's MongoDB stand-in (read, then released for the CLI)."""
    from batchyard.context import RunContext
    from batchyard.settings import Settings

    with RunContext(Settings(_env_file=None, staging={"root": str(tmp_path / "staging")})) as ctx:
        return list(ctx.store.chunks.find({}, {"text": 1, "company_id": 1, "document_id": 1}))


def release(tmp_path: Path, env: dict[str, str]) -> None:
    """Release the space's collection (as a restarted server, or a new Lite process, has it)."""
    from batchyard.clients.milvus import collection_name, open_vector_store
    from batchyard.settings import MilvusSettings

    milvus = MilvusSettings(uri=env.get("BATCHYARD_MILVUS__URI"),
                            collection_prefix=env.get("BATCHYARD_MILVUS__COLLECTION_PREFIX", "chunks"))
    client = open_vector_store(milvus, default_path=str(tmp_path / "staging" / "milvus.db"))
    try:
        name = collection_name(milvus.collection_prefix, "text_embedding_3_small_64")
        client.release_collection(name)
        assert client.get_load_state(name)["state"].name == "NotLoad"
    finally:
        client.close()


def search(tmp_path: Path, env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    out = cli(["search", *args, "--json"], tmp_path, **env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return list(json.loads(out.stdout))


@pytest.mark.parametrize("store", ["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def test_search_finds_a_stored_chunks_own_text_first_and_shows_each_text_once(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    env = {"BATCHYARD_EMBEDDING__DIMENSIONS": "64", "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.3"}
    if store == "server":
        server = request.getfixturevalue("milvus_server")
        env |= {"BATCHYARD_MILVUS__URI": server.uri,
                "BATCHYARD_MILVUS__COLLECTION_PREFIX": "search_" + re.sub(r"\W", "_", tmp_path.name)}
    none_yet = cli(["search", "anything"], tmp_path, **env)
    assert none_yet.returncode == 1 and "no Milvus collection" in none_yet.stderr
    assert "run `batchyard embed" in none_yet.stderr and len(none_yet.stderr.strip().splitlines()) == 1

    assert cli(["seed", "--chunks", "300", "--companies", "4"], tmp_path, **env).returncode == 0
    embedded = cli(["embed", "--targets", "targets.yaml", "--engine", "local"], tmp_path, **env)
    assert embedded.returncode == 0, embedded.stdout[-2000:] + embedded.stderr[-2000:]
    try:
        chunks = source_chunks(tmp_path)
        copies = Counter(c["text"] for c in chunks)
        by_id = {c["_id"]: c for c in chunks}
        unique = next(c for c in chunks if copies[c["text"]] == 1 and len(c["text"]) > 200)
        boilerplate, n_boilerplate = copies.most_common(1)[0]
        assert n_boilerplate > 1

        release(tmp_path, env)  # search loads a released collection
        hits = search(tmp_path, env, unique["text"], "--k", "5")
        assert hits[0]["chunk_id"] == unique["_id"] and hits[0]["text"] == unique["text"]
        assert hits[0]["score"] >= 0.99 and hits[0]["count"] == 1
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert len({h["text"] for h in hits}) == 5  # every text once
        for h in hits:  # the text, company and document are the source's
            src = by_id[h["chunk_id"]]
            assert (h["text"], h["company"], h["document"]) == (src["text"], src["company_id"], src["document_id"])
            assert h["count"] == copies[h["text"]]

        repeated = search(tmp_path, env, boilerplate, "--k", "5")
        assert repeated[0]["text"] == boilerplate and repeated[0]["score"] >= 0.99
        assert repeated[0]["count"] == n_boilerplate  # shown once, with how many chunks carry it
        assert len({h["text"] for h in repeated}) == len(repeated) == 5

        company = unique["company_id"]
        scoped = search(tmp_path, env, boilerplate, "--k", "3", "--company", company)
        assert {h["company"] for h in scoped} == {company}
        in_company = sum(1 for c in chunks if c["company_id"] == company and c["text"] == scoped[0]["text"])
        assert scoped[0]["count"] == in_company

        table = cli(["search", unique["text"], "--k", "2"], tmp_path, COLUMNS="250", **env)
        assert table.returncode == 0 and unique["_id"] in table.stdout and "1.0000" in table.stdout

        unknown = cli(["search", "x", "--company", "no-such-co"], tmp_path, **env)
        assert unknown.returncode == 2 and "unknown company 'no-such-co'" in unknown.stderr
        empty = cli(["search", "   "], tmp_path, **env)
        assert empty.returncode == 2 and "the search text is empty" in empty.stderr
    finally:
        if store == "server":
            from pymilvus import MilvusClient

            client = MilvusClient(uri=env["BATCHYARD_MILVUS__URI"])
            for name in client.list_collections():
                if name.startswith(env["BATCHYARD_MILVUS__COLLECTION_PREFIX"]):
                    client.drop_collection(name)
            client.close()


def test_search_errors_are_one_line_an_unreachable_milvus_and_a_bad_k(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = cli(["search", "anything"], tmp_path, BATCHYARD_MILVUS__URI=f"http://127.0.0.1:{port}")
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert f"Milvus at http://127.0.0.1:{port}" in down.stderr and "Traceback" not in down.stderr
    bad_k = cli(["search", "anything", "--k", "0"], tmp_path)
    assert bad_k.returncode == 2 and "--k must be between 1 and 1000, not 0" in bad_k.stderr
