"""Secrets at the edges: `batchyard config show`, CLI options, Prefect flow parameters."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from batchyard.settings import Settings
from tests.secrets.leaks import Sentinels, no_leak

REPO = Path(__file__).resolve().parents[2]


FLOW_PARAMS = {"targets", "task_name", "run_id", "profile", "overrides", "rounds", "wait", "options"}


def secret_fields(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Dotted paths of every SecretStr field in the settings tree."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        if SecretStr in args:
            out.append(prefix + name)
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                out += secret_fields(a, f"{prefix}{name}.")
    return out


def test_the_settings_tree_has_the_secret_fields_these_tests_cover() -> None:
    assert set(secret_fields()) == {
        "provider.api_key", "provider.local.forward_api_key", "provider.local.api_keys",
        "provider.local.admin_api_keys", "mongo.uri", "milvus.token",
        "staging.s3_access_key_id", "staging.s3_secret_access_key",
        "milvus.bulk_s3_access_key_id", "milvus.bulk_s3_secret_access_key",
    }


def secret_env(sent: Sentinels) -> dict[str, str]:
    return {
        "BATCHYARD_PROVIDER__API_KEY": sent.api_key,
        "BATCHYARD_PROVIDER__LOCAL__FORWARD_API_KEY": sent.api_key + "-fwd",
        "BATCHYARD_PROVIDER__LOCAL__API_KEYS": json.dumps([sent.server_key, sent.api_key + "-srv"]),
        "BATCHYARD_PROVIDER__LOCAL__ADMIN_API_KEYS": json.dumps([sent.server_key + "-adm", sent.api_key + "-adm"]),
        "BATCHYARD_MONGO__URI": f"mongodb://batchyard:{sent.mongo_password}@db.example:27017/?replicaSet=rs0",
        "BATCHYARD_MILVUS__TOKEN": sent.milvus_token,
        "BATCHYARD_STAGING__S3_ACCESS_KEY_ID": sent.s3_key,
        "BATCHYARD_STAGING__S3_SECRET_ACCESS_KEY": sent.s3_secret,
        "BATCHYARD_MILVUS__BULK_S3_ACCESS_KEY_ID": sent.s3_key,
        "BATCHYARD_MILVUS__BULK_S3_SECRET_ACCESS_KEY": sent.s3_secret,
    }


def test_config_show_masks_secrets_from_the_environment(sentinels: Sentinels, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHYARD_", "AWS_"))}
    env.update(secret_env(sentinels), BATCHYARD_STAGING__ROOT="s3://by-bucket/runs", COLUMNS="200")
    exe = Path(sys.executable).with_name("batchyard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "batchyard.cli"]
    for args in (["config", "show"], ["-v", "config", "show"]):
        proc = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        # the environment was read (the values are set, and masked)
        assert shown["staging"]["root"] == "s3://by-bucket/runs"
        for path in secret_fields():
            node: Any = shown
            for part in path.split("."):
                node = node[part]
            if isinstance(node, list):  # provider.local.(admin_)api_keys: two keys each, masked
                assert node == ["**********"] * 2, path
            else:
                assert node == "**********", path
        no_leak(sentinels, "config show stdout", proc.stdout)
        no_leak(sentinels, "config show stderr", proc.stderr)


def test_no_cli_option_takes_a_secret() -> None:
    import typer.main

    from batchyard.cli import app

    group = typer.main.get_command(app)
    names = []

    def walk(cmd: Any) -> None:
        names.extend(p.name for p in cmd.params)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(group)
    assert names, "the CLI has options"
    for name in names:
        assert not any(w in name.lower() for w in ("key", "secret", "token", "password", "uri")), name


FLOWS = ("embeddings_flow", "inference_flow", "resume_flow", "tracker_flow")


def test_flow_parameters_carry_no_secrets(monkeypatch: pytest.MonkeyPatch, sentinels: Sentinels) -> None:
    """Prefect stores flow parameters in its database and shows them in the UI: the CLI passes
    only the staging root and limits; secrets come from the worker's environment."""
    from batchyard import cli
    from batchyard.orchestration import flows

    for name in FLOWS:
        params = set(inspect.signature(getattr(flows, name).fn).parameters)
        assert params <= FLOW_PARAMS, (name, params)
    # typed run options (what deployments pass) hold no secret, and name none
    from batchyard.orchestration.options import RunOptions

    assert secret_fields(RunOptions) == []
    assert not {f.rsplit(".", 1)[-1] for f in secret_fields()} & set(RunOptions.model_fields)

    for key, val in secret_env(sentinels).items():
        monkeypatch.setenv(key, val)
    monkeypatch.setattr(cli, "_state", {"profile": None, "root": "s3://by-bucket/runs"})
    cases = [
        cli._overrides(),
        cli._overrides(max_inputs_per_batch=500, max_requests_per_batch=None),
        cli._overrides(max_inputs_per_batch=None, max_requests_per_batch=20),
        cli._overrides(max_inputs_per_batch=100, max_requests_per_batch=20),
    ]
    limit_fields = set(Settings.model_fields["limits"].annotation.model_fields)  # type: ignore[union-attr]
    for out in cases:
        assert set(out) <= {"staging", "limits"}, out
        assert out["staging"] == {"root": "s3://by-bucket/runs"}
        assert set(out.get("limits", {})) <= limit_fields
        no_leak(sentinels, "flow overrides", json.dumps(out))
        # and the flow builds the same secrets from the environment, not from its parameters
        s = Settings(_env_file=None, **out)  # type: ignore[call-arg]
        assert s.provider.api_key is not None and s.provider.api_key.get_secret_value() == sentinels.api_key
    monkeypatch.setattr(cli, "_state", {"profile": None, "root": None})
    assert cli._overrides() == {}


def test_deployment_parameters_and_work_pool_env_carry_no_secrets() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    env_names = {f"BATCHYARD_{p.upper().replace('.', '__')}" for p in secret_fields()}
    for dep in spec["deployments"]:
        params = dep.get("parameters") or {}
        assert set(params) <= FLOW_PARAMS, dep["name"]
        assert not (params.get("overrides") or {}).keys() - {"staging", "limits"}, dep["name"]
        from batchyard.orchestration.options import RunOptions

        RunOptions.model_validate(params.get("options") or {})  # only typed, secret-free options
        job_env = ((dep.get("work_pool") or {}).get("job_variables") or {}).get("env") or {}
        assert not env_names & set(job_env), dep["name"]
