"""Files API of the local server, through the real openai SDK over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from batchyard.localapi.runner import LocalServer
from batchyard.localapi.store import StateDirLockedError

if TYPE_CHECKING:
    from conftest import Api


def test_file_upload_retrieve_content_delete(api: Api) -> None:
    c = api.client
    data = b'{"a": 1}\n{"b": 2}\n'
    f = c.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.object == "file" and f.status == "processed"
    assert (f.bytes, f.filename, f.purpose) == (len(data), "in.jsonl", "batch")
    assert f.expires_at == f.created_at + 30 * 24 * 3600  # batch files: 30 days by default
    assert c.files.retrieve(f.id) == f
    assert c.files.content(f.id).read() == data
    deleted = c.files.delete(f.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (f.id, True, "file")
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        c.files.delete(f.id)
    with pytest.raises(openai.NotFoundError):
        c.files.content(f.id)


def test_file_expires_after_and_purposes(api: Api) -> None:
    c = api.client
    f = c.files.create(
        file=("x.jsonl", b"{}\n"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert f.expires_at == f.created_at + 7200
    u = c.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    assert u.expires_at is None and u.purpose == "user_data"
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(
            file=("x.jsonl", b"{}"),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert exc.value.body["param"] == "expires_after.seconds"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("x.jsonl", b"{}"), purpose="nonsense")  # type: ignore[arg-type]


def test_file_list_filters_order_and_pagination(api: Api) -> None:
    c = api.client
    ids = [c.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="batch").id for i in range(5)]
    other = c.files.create(file=("o.txt", b"x"), purpose="user_data").id
    page = c.files.list(purpose="batch")
    assert [f.id for f in page.data] == ids[::-1]  # newest first by default
    assert page.has_more is False
    assert [f.id for f in c.files.list(purpose="batch", order="asc").data] == ids
    first = c.files.list(purpose="batch", order="asc", limit=2)
    assert [f.id for f in first.data] == ids[:2] and first.has_more is True
    second = c.files.list(purpose="batch", order="asc", limit=2, after=ids[1])
    assert [f.id for f in second.data] == ids[2:4]
    assert [f.id for f in c.files.list(purpose="batch", order="asc", limit=2)] == ids  # auto-paging
    assert {f.id for f in c.files.list()} == {*ids, other}
    raw = httpx.get(
        f"{api.server.base_url}/files", params={"purpose": "batch", "limit": 2, "order": "asc"}
    )
    body = raw.json()
    assert (body["object"], body["first_id"], body["last_id"], body["has_more"]) == (
        "list",
        ids[0],
        ids[1],
        True,
    )


def test_error_shape_and_unknown_routes(api: Api) -> None:
    base = api.server.base_url
    r = httpx.post(f"{base}/files", files={"file": ("a.jsonl", b"{}")})  # no purpose
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == (
        "invalid_request_error",
        "purpose",
        "missing_required_parameter",
    )
    r = httpx.post(f"{base}/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.get(f"{base}/nothing-here")
    assert (
        r.status_code == 404
        and r.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"
    )
    r = httpx.get(f"{base}/files/file-missing")
    assert r.status_code == 404 and "No such File object" in r.json()["error"]["message"]
    r = httpx.get(f"{base}/files", params={"limit": "abc"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_raw_multipart_upload_keeps_bytes_exactly_and_rejects_junk(server: LocalServer) -> None:
    base = server.base_url
    content = b"line1\r\nline2\r\n\r\n"
    r = httpx.post(
        f"{base}/files",
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
        files={"file": ('a "b".jsonl', content, "application/octet-stream")},
    )
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["bytes"] == len(content) and meta["purpose"] == "batch"
    assert meta["expires_at"] == meta["created_at"] + 3600
    assert httpx.get(f"{base}/files/{meta['id']}/content").content == content
    bad = httpx.post(f"{base}/files", content=b"junk", headers={"content-type": "multipart/form-data; boundary=X"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_state_dir_is_locked_by_a_live_server(server: LocalServer) -> None:
    with pytest.raises(StateDirLockedError):
        LocalServer(server.config, server.state_dir).start()
    # the first server still answers
    assert httpx.get(server.base_url.removesuffix("/v1") + "/healthz").status_code == 200
