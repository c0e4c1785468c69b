"""Who gets in: Bearer keys on every route, the bind rule, the embedded server's own key.

Everything goes through the real `openai` SDK (or raw httpx where the SDK cannot send the
request, e.g. with no Authorization header) against servers on loopback.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from batchyard.context import RunContext
from batchyard.localapi.auth import (
    KeyRing,
    ServeRefused,
    bearer_token,
    check_bind,
    is_loopback,
    load_api_keys,
)
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer

if TYPE_CHECKING:
    from conftest import MakeServer


def new_key() -> str:
    return "sk-test-" + secrets.token_urlsafe(24)


def sdk(server: LocalServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def assert_401(r: httpx.Response, *keys: str) -> None:
    """OpenAI's 401 for a bad key, which quotes no key."""
    assert r.status_code == 401, r.text
    assert r.json()["error"].keys() == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    for key in keys:
        assert key not in r.text


def test_a_keyed_server_wants_a_key_on_every_route(make_server: MakeServer) -> None:
    key, wrong = new_key(), new_key()
    server = make_server(api_keys=[key])
    good = sdk(server, key)
    file_id = good.files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="batch").id

    # wrong key, through the SDK: AuthenticationError on every call, the key quoted nowhere
    bad = sdk(server, wrong)
    calls: list[Any] = [
        bad.files.list, bad.batches.list, lambda: bad.files.retrieve(file_id),
        lambda: bad.files.content(file_id), lambda: bad.files.delete(file_id),
        lambda: bad.files.create(file=("b.jsonl", b"{}\n"), purpose="batch"),
        lambda: bad.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"),
    ]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as ei:
            call()
        assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
        assert wrong not in str(ei.value) and key not in str(ei.value)

    # no Authorization header, another scheme, an empty token, a key with a suffix: 401 too
    base = server.base_url
    for headers in ({}, {"Authorization": f"Basic {key}"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer {key}x"}, {"Authorization": key}):
        for method, path in (("GET", "/files"), ("GET", f"/files/{file_id}/content"),
                             ("POST", "/batches"), ("GET", "/not-a-route-yet")):
            assert_401(httpx.request(method, base + path, headers=headers), key)
    missing = httpx.get(f"{base}/files").json()["error"]["message"]
    assert "didn't provide an API key" in missing

    # the right key: everything works, the scheme is case-insensitive, /healthz needs nothing
    assert [f.id for f in good.files.list()] == [file_id]
    assert good.files.content(file_id).content == b'{"a": 1}\n'
    assert httpx.get(f"{base}/files", headers={"Authorization": f"bearer {key}"}).status_code == 200
    assert httpx.get(base.removesuffix("/v1") + "/healthz").status_code == 200
    # nothing was created by the refused calls
    assert [f.id for f in good.files.list()] == [file_id] and not good.batches.list().data


def test_the_key_is_checked_before_anything_else_runs(make_server: MakeServer) -> None:
    key = new_key()
    # every call would get an injected 429/5xx: a caller without the key still sees only 401
    server = make_server(api_keys=[key], faults={"transient_error_rate": 1.0})
    for _ in range(5):
        assert_401(httpx.get(f"{server.base_url}/batches"), key)
    r = httpx.get(f"{server.base_url}/batches", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code in (429, 500, 503)


def test_path_traversal_in_file_ids_is_refused(make_server: MakeServer) -> None:
    key = new_key()
    server = make_server(api_keys=[key])
    client = sdk(server, key)
    file_id = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch").id
    # blobs/<file_id> is the content: these ids would reach the metadata, the lock, the blobs
    assert (server.state_dir / "files" / f"{file_id}.json").exists()
    headers = {"Authorization": f"Bearer {key}"}
    for raw in (f"..%2Ffiles%2F{file_id}.json", "..%2Flock", "%2E%2E%2Flock", "..", "..%2Fblobs",
                f"{file_id}%2F..%2F..%2Flock"):
        for tail in ("", "/content"):
            r = httpx.get(f"{server.base_url}/files/{raw}{tail}", headers=headers)
            assert r.status_code == 404, (raw, tail, r.text)
    with pytest.raises(openai.NotFoundError):
        client.files.content("../lock")
    assert client.files.content(file_id).content == b"{}\n"


def test_several_keys_from_the_list_and_a_key_file(make_server: MakeServer, tmp_path: Path) -> None:
    k1, k2, k3 = new_key(), new_key(), new_key()
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\n\n{k2}\n  {k3}  \n# {new_key()} (revoked)\n")
    key_file.chmod(0o600)
    server = make_server(api_keys=[k1], api_keys_file=str(key_file))
    for key in (k1, k2, k3):
        assert sdk(server, key).files.list().data == []
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "# team keys").files.list()


def test_unusable_keys_are_refused_without_quoting_them(tmp_path: Path) -> None:
    short = "sk-short"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"api_keys": [new_key(), short]}, "provider.local.api_keys[1] is 8 characters long"),
        ({"api_keys": ["sk-with a-space-inside-it"]}, "provider.local.api_keys[0] has spaces"),
        ({"api_keys_file": str(tmp_path / "absent")}, f"api_keys_file {tmp_path / 'absent'}: cannot read"),
    ]
    only_comments = tmp_path / "comments"
    only_comments.write_text("# no key yet\n\n")
    cases.append(({"api_keys_file": str(only_comments)}, f"api_keys_file {only_comments} holds no key"))
    bad_line = tmp_path / "bad-line"
    bad_line.write_text(f"{new_key()}\n{short}\n")
    cases.append(({"api_keys_file": str(bad_line)}, f"the key on line 2 of {bad_line} is 8 characters"))
    for config, message in cases:
        with pytest.raises(ServeRefused) as ei:
            load_api_keys(LocalApiConfig(**config))
        assert message in str(ei.value) and short not in str(ei.value)
        # the server does not start on such a config (and creates no state)
        state = tmp_path / "state"
        with pytest.raises(ServeRefused):
            LocalServer(LocalApiConfig(**config), state).start()
        assert not state.exists()


def test_key_ring_accepts_exactly_the_keys() -> None:
    keys = [new_key() for _ in range(3)]
    ring = KeyRing(keys)
    assert all(ring.accepts(k.encode()) for k in keys)
    for other in (b"", keys[0][:-1].encode(), (keys[0] + "x").encode(), keys[0].upper().encode(), b"local"):
        assert not ring.accepts(other)
    assert not KeyRing([]) and ring
    assert bearer_token([(b"authorization", b"Bearer  abc ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Token abc")]) is None
    assert bearer_token([(b"x-api-key", b"abc")]) is None


def test_bind_rule() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
        assert check_bind(host, []) is None
    for host in ("0.0.0.0", "::", "203.0.113.7", "", "no-such-host.invalid"):
        assert not is_loopback(host), host
        with pytest.raises(ServeRefused, match=re.escape(f"refusing to serve on {host} without API keys")):
            check_bind(host, [])
        assert check_bind(host, ["k" * 16]) is None
        warning = check_bind(host, [], insecure=True)
        assert warning is not None and "--insecure" in warning


def test_local_server_refuses_an_open_bind_without_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(ServeRefused, match=re.escape("refusing to serve on 0.0.0.0")):
        LocalServer(LocalApiConfig(host="0.0.0.0"), state).start()
    assert not state.exists(), "refused before anything was created or bound"


def test_the_embedded_server_has_a_key_of_its_own(settings_factory: Any) -> None:
    settings = settings_factory()
    assert settings.provider.embedded
    contexts = [RunContext(settings), RunContext(settings_factory(staging={"root": "other"}))]
    try:
        keys = [ctx.api.client.api_key for ctx in contexts]
        assert keys[0] != keys[1] and all(k.startswith("sk-local-") and len(k) > 40 for k in keys)
        server = contexts[0]._server
        assert server is not None
        # the pipeline's own client gets in; another local user's client does not
        assert contexts[0].api.client.files.list().data == []
        for key in ("local", "sk-anything", keys[1]):
            with pytest.raises(openai.AuthenticationError):
                sdk(server, key).files.list()
        assert_401(httpx.get(f"{server.base_url}/files"), *keys)
    finally:
        for ctx in contexts:
            ctx.close()
