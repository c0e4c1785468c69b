"""Keys as tenants (issue 18.5), a storage cap per key and file expiry (18.11), safe file names
(18.9): through the openai SDK against the real server, as three clients with their own keys."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": "hello", "dimensions": 8}}


def key(name: str) -> str:
    return f"sk-{name}-" + secrets.token_urlsafe(18)


class Tenants:
    """A server with two tenant keys and an admin key, and an SDK client for each."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.keys = {"one": key("one"), "two": key("two"), "admin": key("admin")}
        self.config = LocalApiConfig(api_keys=[SecretStr(self.keys["one"]), SecretStr(self.keys["two"])],
                                     admin_api_keys=[SecretStr(self.keys["admin"])], validating_s=0.0, **config)
        self.state = tmp_path / "state"
        self.server = LocalServer(self.config, self.state).start()

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url, api_key=self.keys[who], max_retries=0)

    def restart(self) -> None:
        self.server.stop()
        self.server = LocalServer(self.config, self.state).start()

    def run_batch(self, who: str) -> Any:
        c = self.client(who)
        file_id = c.files.create(file=("in.jsonl", json.dumps(LINE).encode()), purpose="batch").id
        batch = c.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
        deadline = time.monotonic() + 30
        while batch.status not in ("completed", "failed"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.05)
            batch = c.batches.retrieve(batch.id)
        assert batch.status == "completed", batch
        return batch


@pytest.fixture
def tenants(tmp_path: Path) -> Any:
    t = Tenants(tmp_path)
    yield t
    t.server.stop()


def test_a_key_sees_only_its_own_files_and_batches(tenants: Tenants) -> None:
    batch = tenants.run_batch("one")
    one, two, admin = tenants.client("one"), tenants.client("two"), tenants.client("admin")
    own = {f.id for f in one.files.list().data}
    assert own == {batch.input_file_id, batch.output_file_id}
    assert [b.id for b in one.batches.list().data] == [batch.id]
    assert one.files.content(batch.output_file_id).text.startswith('{"id"')

    # the other key: nothing listed, everything else 404, as if it did not exist
    assert two.files.list().data == [] and two.batches.list().data == []
    for call in (lambda: two.files.retrieve(batch.input_file_id),
                 lambda: two.files.content(batch.output_file_id),
                 lambda: two.files.delete(batch.input_file_id),
                 lambda: two.batches.retrieve(batch.id),
                 lambda: two.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError, match="no file with id"):
        two.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
    assert {f.id for f in one.files.list().data} == own, "the other key's delete did nothing"

    # the admin key sees all of it; the keys keep what they own across a restart
    tenants.run_batch("two")
    assert len(admin.files.list().data) == 4 and len(admin.batches.list().data) == 2
    assert admin.files.content(batch.output_file_id).text == one.files.content(batch.output_file_id).text
    tenants.restart()
    one, two = tenants.client("one"), tenants.client("two")
    assert {f.id for f in one.files.list().data} == own
    assert len(two.files.list().data) == 2 and batch.id not in {b.id for b in two.batches.list().data}


def test_the_state_holds_owner_tags_not_keys(tenants: Tenants) -> None:
    tenants.run_batch("one")
    for path in tenants.state.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(k.encode() in data for k in tenants.keys.values()), path


def test_each_key_has_a_storage_cap(tmp_path: Path) -> None:
    t = Tenants(tmp_path, max_storage_bytes_per_key=10_000)
    try:
        one, two, admin = t.client("one"), t.client("two"), t.client("admin")
        first = one.files.create(file=("a.jsonl", b"x" * 6_000), purpose="batch")
        with pytest.raises(openai.APIStatusError) as ei:
            one.files.create(file=("b.jsonl", b"x" * 6_000), purpose="batch")
        assert ei.value.status_code == 413
        assert isinstance(ei.value.body, dict) and ei.value.body["code"] == "storage_limit_exceeded"
        assert "10,000 bytes" in ei.value.body["message"]
        two.files.create(file=("b.jsonl", b"x" * 6_000), purpose="batch")  # a cap per key
        admin.files.create(file=("big.jsonl", b"x" * 50_000), purpose="batch")  # admins have none
        one.files.delete(first.id)
        one.files.create(file=("b.jsonl", b"x" * 6_000), purpose="batch")
        assert [f.filename for f in one.files.list().data] == ["b.jsonl"]
        assert len(list((t.state / "blobs").iterdir())) == 3, "the refused upload left nothing behind"
    finally:
        t.server.stop()


def test_expired_files_are_deleted_and_free_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchyard.localapi import worker

    monkeypatch.setattr(worker, "EXPIRY_SWEEP_S", 0.1)
    t = Tenants(tmp_path, max_storage_bytes_per_key=10_000)
    try:
        one = t.client("one")
        short = one.files.create(file=("short.jsonl", b"x" * 8_000), purpose="user_data",
                                 expires_after={"anchor": "created_at", "seconds": 3600})
        keep = one.files.create(file=("keep.jsonl", b"y" * 100), purpose="user_data")
        assert short.expires_at == short.created_at + 3600 and keep.expires_at is None
        assert t.server.store is not None
        t.server.store.clock = lambda: time.time() + 3601  # an hour and a second later
        blob = t.state / "blobs" / short.id
        deadline = time.monotonic() + 20
        while blob.exists():  # the worker deletes it without anyone asking for it
            assert time.monotonic() < deadline, "the expired file is still on disk"
            time.sleep(0.05)
        assert [f.id for f in one.files.list().data] == [keep.id]
        one.files.create(file=("again.jsonl", b"z" * 8_000), purpose="user_data")  # its bytes are free
    finally:
        t.server.stop()


@pytest.mark.parametrize("sent, stored", [
    ("../../../../tmp/pwned", "pwned"),
    ("..\\..\\windows\\evil.jsonl", "evil.jsonl"),
    ("report\u202elsonj.exe", "reportlsonj.exe"),
    ("bell\x07and\x1bescape.jsonl", "bellandescape.jsonl"),
    ("..", "upload.jsonl"),
])
def test_uploaded_file_names_are_stored_and_served_as_safe_basenames(tenants: Tenants, sent: str,
                                                                   stored: str) -> None:
    base = tenants.server.base_url
    auth = {"authorization": f"Bearer {tenants.keys['one']}"}
    body = (b'--b0undary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="' + sent.encode() + b'"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n" + json.dumps(LINE).encode() + b"\r\n--b0undary--\r\n")
    r = httpx.post(f"{base}/files", content=body,  # the name's bytes as a hostile client sends them
                   headers={**auth, "content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["filename"] == stored
    assert httpx.get(f"{base}/files/{meta['id']}", headers=auth).json()["filename"] == stored
    listed = httpx.get(f"{base}/files", headers=auth).json()["data"]
    assert [f["filename"] for f in listed] == [stored]
    download = httpx.get(f"{base}/files/{meta['id']}/content", headers=auth)
    disposition = download.headers["content-disposition"]
    assert stored in disposition and "/" not in disposition and "\u202e" not in disposition, disposition
