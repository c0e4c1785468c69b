"""`batchyard serve` as a user starts it: a real subprocess, called through the openai SDK."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from batchyard.localapi.runner import ServerProcess

UNASSIGNED = "203.0.113.1"
"""TEST-NET-3: an address no interface here has, so binding it fails (after the bind rule)."""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any BATCHYARD_* setting of the developer's shell, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    """`batchyard serve ...` run to its exit (it must exit: a refusal)."""
    cmd = [sys.executable, "-m", "batchyard.cli", "serve", "--port", str(free_port()), *args]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("source", ["env", "key file"])
def test_serve_with_a_key_answers_401_401_200(tmp_path: Path, source: str) -> None:
    key, wrong = "sk-serve-" + secrets.token_urlsafe(24), "sk-wrong-" + secrets.token_urlsafe(24)
    if source == "env":
        env = clean_env(BATCHYARD_PROVIDER__LOCAL__API_KEYS=json.dumps([key]))
    else:
        key_file = tmp_path / "server.keys"
        key_file.write_text(f"# batchyard serve\n{key}\n")
        key_file.chmod(0o600)
        env = clean_env(BATCHYARD_PROVIDER__LOCAL__API_KEYS_FILE=str(key_file))
    log = tmp_path / "serve.log"
    with ServerProcess(tmp_path / "state", env=env, output=log) as proc:
        no_key = httpx.get(f"{proc.base_url}/files")
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as ei:
            openai.OpenAI(base_url=proc.base_url, api_key=wrong, max_retries=0).files.list()
        assert ei.value.status_code == 401 and wrong not in str(ei.value)
        client = openai.OpenAI(base_url=proc.base_url, api_key=key, max_retries=0)
        listed = client.files.with_raw_response.list()
        assert listed.status_code == 200 and listed.parse().data == []
        line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "text-embedding-3-small", "input": "hello"}}
        file_id = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
        assert client.batches.retrieve(batch.id).id == batch.id
    output = log.read_text()
    assert "API key required" in output, output
    assert key not in output and wrong not in output


def test_serve_refuses_a_public_bind_without_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = serve_cmd("--host", "0.0.0.0", "--state-dir", str(state))
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve on 0.0.0.0 without API keys"), lines
    assert "BATCHYARD_PROVIDER__LOCAL__API_KEYS" in lines[0] and "--insecure" in lines[0]
    assert not state.exists()


def test_insecure_overrides_the_bind_rule_with_a_warning(tmp_path: Path) -> None:
    # an address of no local interface: the rule lets it through, the bind itself then fails,
    # so no unauthenticated server is ever reachable from outside during the test
    proc = serve_cmd("--host", UNASSIGNED, "--insecure", "--state-dir", str(tmp_path / "state"))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc
    assert len(lines) == 2, lines
    assert f"serving on {UNASSIGNED} without API keys (--insecure)" in lines[0]
    assert lines[1].startswith(f"error: cannot listen on {UNASSIGNED}:"), lines


def test_serve_refuses_an_unusable_key_without_quoting_it(tmp_path: Path) -> None:
    short = "sk-SHORTKEY"
    cmd = [sys.executable, "-m", "batchyard.cli", "serve", "--port", str(free_port()),
           "--state-dir", str(tmp_path / "state")]
    env = clean_env(BATCHYARD_PROVIDER__LOCAL__API_KEYS=json.dumps([short]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.splitlines() == [
        "error: provider.local.api_keys[0] is 11 characters long; use at least 16 "
        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    ]
    assert short not in proc.stdout + proc.stderr
