"""Settings errors never show a secret: every kind of error, with and without --verbose.

Every secret setting holds a sentinel (provider.api_key, provider.local.api_keys and
forward_api_key, the password in mongo.uri, milvus.token, milvus.bulk_s3_* and staging.s3_*);
then each kind of settings error is triggered through the CLI (`config show`, `serve`, `status`),
and stdout, stderr (at the file-descriptor level), the exit code and every log record are
checked: exit 2, one line without --verbose, no sentinel in any form either way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.secrets.leaks import Sentinels, log_text, no_leak
from tests.secrets.test_secrets_cli import secret_env


@pytest.fixture
def cli_state() -> Iterator[None]:
    """The CLI configures batchyard's logger when invoked in-process: put it back afterwards."""
    from batchyard import logs

    root = logging.getLogger("batchyard")
    level, handlers, terminal = root.level, list(root.handlers), dict(logs._terminal)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    logs._terminal.clear()
    logs._terminal.update(terminal)


def _cases(sent: Sentinels, tmp_path: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Kind of error -> (extra environment, CLI arguments)."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    # a profile with a secret, a typo and an invalid value next to each other
    (profiles / "leaky.env").write_text(
        f"BATCHYARD_PROVIDER__API_KEY={sent.api_key}\nBATCHYARD_MILVUS__TOKN={sent.milvus_token}\n")
    (profiles / "badvalue.env").write_text(
        f"BATCHYARD_PROVIDER__API_KEY={sent.api_key}\nBATCHYARD_LANE__MODE={sent.server_key}\n")
    keys = json.dumps([sent.server_key, sent.api_key + "-srv"])
    return {
        # a check across fields (model validator): pydantic's input is the whole settings tree
        "model validator": ({"BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST": "2000",
                             "BATCHYARD_LIMITS__MAX_INPUTS_PER_BATCH": "100"}, ["config", "show"]),
        "bound": ({"BATCHYARD_RUN__PARTITION_MAX_CHUNKS": "0"}, ["config", "show"]),
        # a secret pasted into a setting of another type
        "secret in the wrong setting": ({"BATCHYARD_PROVIDER__POLL_INTERVAL_S": sent.api_key}, ["config", "show"]),
        "secret as a literal": ({"BATCHYARD_LANE__MODE": sent.s3_secret}, ["status"]),
        "bad item in a key list": ({"BATCHYARD_PROVIDER__LOCAL__API_KEYS": json.dumps([sent.server_key, 5])},
                                   ["serve"]),
        "key list not JSON": ({"BATCHYARD_PROVIDER__LOCAL__API_KEYS": keys[:-1]}, ["serve"]),
        "group not JSON": ({"BATCHYARD_MILVUS": f'{{"token": "{sent.milvus_token}"'}, ["config", "show"]),
        "group with an invalid value": ({"BATCHYARD_PROVIDER": json.dumps(
            {"api_key": sent.api_key, "poll_interval_s": -1})}, ["config", "show"]),
        "typo holding a secret": ({"BATCHYARD_PROVIDER__API_KY": sent.api_key}, ["config", "show"]),
        "profile with a typo": ({"BATCHYARD_PROFILE_DIR": str(profiles)}, ["--profile", "leaky", "config", "show"]),
        "profile with a bad value": ({"BATCHYARD_PROFILE_DIR": str(profiles)},
                                     ["--profile", "badvalue", "serve"]),
        ".env with a typo": ({}, ["config", "show"]),  # ./.env written below
    }


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_no_settings_error_shows_a_secret(sentinels: Sentinels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          debug_logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
                                          cli_state: None, verbose: bool) -> None:
    from batchyard.cli import app

    base = secret_env(sentinels)
    assert base["BATCHYARD_MONGO__URI"].count(sentinels.mongo_password) == 1
    (tmp_path / ".env").write_text(f"BATCHYARD_STAGING__S3_SECRET_KEY={sentinels.s3_secret}\n")
    cases = _cases(sentinels, tmp_path)
    for kind, (extra, args) in cases.items():
        env = {**base, **extra}
        monkeypatch.chdir(tmp_path if kind == ".env with a typo" else tmp_path / "profiles")
        result = CliRunner().invoke(app, [*(["-v"] if verbose else []), *args], env=env)
        out, err = capfd.readouterr()
        everything = "\n".join([result.stdout, result.stderr, out, err])
        assert result.exit_code == 2, (kind, result.exit_code, everything)
        no_leak(sentinels, f"{kind}: output", everything)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: "), (kind, lines)
        if not verbose:
            assert len(lines) == 1, (kind, lines)
        assert "input:" not in lines[-1] and "input_value" not in everything, (kind, lines[-1])
    no_leak(sentinels, "log records", log_text(debug_logs))


def test_each_kind_names_what_is_wrong(sentinels: Sentinels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       cli_state: None) -> None:
    """The one line says which setting and why, so that hiding the value costs nothing."""
    from batchyard.cli import app

    (tmp_path / ".env").write_text(f"BATCHYARD_STAGING__S3_SECRET_KEY={sentinels.s3_secret}\n")
    expected = {
        "model validator": "invalid settings: limits.max_inputs_per_request exceeds limits.max_inputs_per_batch",
        "bound": "run.partition_max_chunks (BATCHYARD_RUN__PARTITION_MAX_CHUNKS): Input should be greater than 0",
        "secret in the wrong setting": "provider.poll_interval_s (BATCHYARD_PROVIDER__POLL_INTERVAL_S): Input "
                                       "should be a valid number",
        "secret as a literal": "lane.mode (BATCHYARD_LANE__MODE): Input should be 'batch', 'realtime' or 'auto'",
        "bad item in a key list": "provider.local.api_keys.1 (BATCHYARD_PROVIDER__LOCAL__API_KEYS): Input should "
                                  "be a valid string",
        "key list not JSON": "BATCHYARD_PROVIDER__LOCAL__API_KEYS in the environment is not valid JSON",
        "group not JSON": "BATCHYARD_MILVUS in the environment is not valid JSON",
        "group with an invalid value": "provider.poll_interval_s",
        "typo holding a secret": "unknown setting BATCHYARD_PROVIDER__API_KY in the environment: did you mean "
                                 "BATCHYARD_PROVIDER__API_KEY?",
        "profile with a typo": "unknown setting BATCHYARD_MILVUS__TOKN in ",
        "profile with a bad value": "lane.mode",
        ".env with a typo": "unknown setting BATCHYARD_STAGING__S3_SECRET_KEY in .env: did you mean "
                            "BATCHYARD_STAGING__S3_SECRET_ACCESS_KEY?",
    }
    cases = _cases(sentinels, tmp_path)
    assert set(cases) == set(expected)
    for kind, (extra, args) in cases.items():
        monkeypatch.chdir(tmp_path if kind == ".env with a typo" else tmp_path / "profiles")
        result = CliRunner().invoke(app, args, env={**secret_env(sentinels), **extra})
        assert result.exit_code == 2 and expected[kind] in result.stderr, (kind, result.stderr)


def test_a_value_pydantic_settings_cannot_decode_is_one_line_without_the_value(
        sentinels: Sentinels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_state: None) -> None:
    """pydantic-settings' own decoding error (SettingsError), should a value get past the checks."""
    from batchyard import settings_check
    from batchyard.cli import app

    monkeypatch.setattr(settings_check, "check_source", lambda *a, **k: [])
    for verbose in (False, True):
        env = {**secret_env(sentinels), "BATCHYARD_PROVIDER__LOCAL__API_KEYS": f'["{sentinels.server_key}"'}
        result = CliRunner().invoke(app, [*(["-v"] if verbose else []), "config", "show"], env=env)
        assert result.exit_code == 2, result.output
        no_leak(sentinels, "output", result.stdout + result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: error parsing value for field"), last


def test_serve_start_up_lines_show_no_key(sentinels: Sentinels, tmp_path: Path) -> None:
    from batchyard.localapi.runner import ServerProcess
    from tests.localapi.test_localapi_serve import clean_env

    env = clean_env(BATCHYARD_PROVIDER__LOCAL__API_KEYS=json.dumps([sentinels.server_key]),
                    BATCHYARD_PROVIDER__API_KEY=sentinels.api_key)
    log = tmp_path / "serve.log"
    with ServerProcess(tmp_path / "state", env=env, args=["--host", "0.0.0.0"], output=log):
        pass
    text = log.read_text()
    assert "API key required" in text, text
    no_leak(sentinels, "serve output", text)
