"""Typos in settings are caught (issue 19 item 4): unknown `BATCHYARD_` names in the environment,
a profile or `./.env` are usage errors naming the nearest valid name; list and dict values that
are not JSON are one-line usage errors; the names batchyard reads that are not settings pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchyard import settings_check
from batchyard.errors import ConfigError
from batchyard.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def test_a_misspelt_variable_names_the_nearest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHYARD_RUN__PARTITION_MAX_CHUNK", "10")
    with pytest.raises(ConfigError) as ei:
        load_settings()
    assert str(ei.value) == ("unknown setting BATCHYARD_RUN__PARTITION_MAX_CHUNK in the environment: "
                             "did you mean BATCHYARD_RUN__PARTITION_MAX_CHUNKS?")


def test_names_are_matched_like_pydantic_settings_does_without_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("batchyard_run__partition_max_chunks", "10")
    assert load_settings().run.partition_max_chunks == 10


def test_a_name_close_to_nothing_points_to_config_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHYARD_ZZZ", "1")
    with pytest.raises(ConfigError, match=r"unknown setting BATCHYARD_ZZZ in the environment: see "):
        load_settings()


def test_groups_dict_keys_and_the_non_settings_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHYARD_LANE", '{"mode": "auto"}')  # a whole group as JSON
    monkeypatch.setenv("BATCHYARD_PRICING__MODELS__MY-MODEL", '{"input_per_1m": 0.1}')  # a key of a dict
    monkeypatch.setenv("BATCHYARD_TEST_ANYTHING", "x")
    for name in settings_check.NOT_SETTINGS:
        monkeypatch.setenv(name, str(tmp_path) if name.endswith(("_DIR", "_HOME")) else "1")
    monkeypatch.setenv("OTHER_TOOL_SETTING", "not ours")
    s = load_settings()
    assert s.lane.mode == "auto" and s.pricing.models["my-model"].input_per_1m == 0.1


@pytest.mark.parametrize("name, value", [
    ("BATCHYARD_PROVIDER__LOCAL__API_KEYS", "notjson"),
    ("BATCHYARD_PRICING__MODELS", "{'single': 'quotes'}"),
    ("BATCHYARD_PROVIDER__LOCAL__FAULTS__TRANSIENT_STATUSES", "429,500"),
])
def test_a_list_or_dict_value_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch, name: str,
                                                          value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as ei:
        load_settings()
    message = str(ei.value)
    assert message.startswith(f"{name} in the environment is not valid JSON: ") and "\n" not in message
    assert value not in message


def test_profile_and_dotenv_keys_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "p.env").write_text("BATCHYARD_MILVUS__INDEX_TYP=FLAT\n")
    monkeypatch.setenv("BATCHYARD_PROFILE_DIR", str(profiles))
    with pytest.raises(ConfigError, match=r"unknown setting BATCHYARD_MILVUS__INDEX_TYP in .*p\.env: did you "
                                          r"mean BATCHYARD_MILVUS__INDEX_TYPE\?"):
        load_settings("p")
    # a profile holds batchyard settings only: a name without the prefix is a mistake there
    (profiles / "p.env").write_text("MILVUS__INDEX_TYPE=FLAT\n")
    with pytest.raises(ConfigError, match=r"MILVUS__INDEX_TYPE in .*p\.env is not a batchyard setting"):
        load_settings("p")
    # ./.env may hold other programs' variables, but not a misspelt batchyard one
    (profiles / "p.env").write_text("BATCHYARD_MILVUS__INDEX_TYPE=FLAT\n")
    Path(".env").write_text("PREFECT_API_URL=http://127.0.0.1:4200/api\nBATCHYARD_EMBEDING__MODEL=x\n")
    with pytest.raises(ConfigError, match=r"BATCHYARD_EMBEDING__MODEL in \.env: did you mean "
                                          r"BATCHYARD_EMBEDDING__MODEL\?"):
        load_settings("p")
    Path(".env").write_text("PREFECT_API_URL=http://127.0.0.1:4200/api\n")
    assert load_settings("p").milvus.index_type == "FLAT"


def test_the_shipped_profiles_pass() -> None:
    for name in ("dev", "test", "prod"):
        assert load_settings(name).profile == name


def test_every_batchyard_variable_the_code_reads_is_a_setting_or_listed_as_not_one() -> None:
    """A new `BATCHYARD_` variable that is not a setting must join `settings_check.NOT_SETTINGS`,
    or every command would refuse it as a typo."""
    from batchyard.settings import setting_names

    names = setting_names()
    found: set[str] = set()
    typo_tests = {REPO / "tests/unit/test_settings_sources.py", REPO / "tests/secrets/test_secrets_settings_errors.py"}
    for folder in ("src", "tests", "benchmarks", "flows"):
        for path in set((REPO / folder).rglob("*.py")) - typo_tests:
            found |= set(re.findall(r"\bBATCHYARD_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    unknown = {n for n in found if n not in names.exact and not settings_check.allowed_non_setting(n)
               and not any(n.startswith(p) for p in names.open_prefixes)}
    assert not unknown, unknown


def test_the_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    env.update(BATCHYARD_RUN__PARTITION_MAX_CHUNK="10", BATCHYARD_PROVIDER__LOCAL__API_KEYS="notjson")
    proc = subprocess.run([sys.executable, "-m", "batchyard.cli", "config", "show"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "did you mean BATCHYARD_RUN__PARTITION_MAX_CHUNKS?" in lines[0]
    assert "BATCHYARD_PROVIDER__LOCAL__API_KEYS in the environment is not valid JSON" in lines[0]
