"""Typed run options (what deployments pass) and the profile a deployment run loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.test_flows import overrides, seed_targets


def test_options_map_to_settings_overrides() -> None:
    from batchyard.orchestration.options import RunOptions, SettingsOptions
    from batchyard.settings import Settings

    opts = RunOptions(staging_root="s3://b/p", poll_interval_s=5, max_inputs_per_batch=500, max_requests_per_batch=20)
    over = opts.to_overrides()
    assert over == {"staging": {"root": "s3://b/p"}, "provider": {"poll_interval_s": 5},
                    "limits": {"max_inputs_per_batch": 500, "max_inputs_per_request": 500,
                               "max_requests_per_batch": 20}}
    assert Settings(_env_file=None, **over).limits.max_inputs_per_request == 500  # a valid combination
    assert SettingsOptions().to_overrides() == {}


def test_deployment_parameters_are_typed_and_validated() -> None:
    from prefect.exceptions import ParameterTypeError

    from batchyard.orchestration.flows import embeddings_flow, tracker_flow

    schema = embeddings_flow.parameters.model_dump()
    assert "options" in schema["properties"]
    fields = schema["definitions"]["RunOptions"]["properties"]
    assert {"targets", "run_id", "wait", "profile", "staging_root", "max_inputs_per_batch"} <= set(fields)
    assert "SettingsOptions" in tracker_flow.parameters.model_dump()["definitions"]
    ok = embeddings_flow.validate_parameters({"options": {"targets": "t.yaml", "max_inputs_per_batch": 100}})
    assert ok["options"].max_inputs_per_batch == 100
    for bad in ({"max_inputs_per_batch": 0}, {"max_inputs_per_btach": 100}):
        with pytest.raises(ParameterTypeError):
            embeddings_flow.validate_parameters({"options": bad})


def test_explicit_arguments_win_over_options() -> None:
    from batchyard.errors import TerminalError
    from batchyard.orchestration.flows import _run_args, _settings_args
    from batchyard.orchestration.options import RunOptions

    opts = RunOptions(targets="a.yaml", run_id="r1", wait=False, profile="test", max_requests_per_batch=10)
    assert _run_args(None, None, True, opts) == ("a.yaml", "r1", False)
    assert _run_args("b.yaml", "r2", True, opts) == ("b.yaml", "r2", False)
    profile, over = _settings_args(None, {"limits": {"max_requests_per_batch": 5}}, opts, deployed=False)
    assert profile == "test" and over == {"limits": {"max_requests_per_batch": 5}}
    assert _settings_args("dev", None, opts, deployed=False)[0] == "dev"
    with pytest.raises(TerminalError, match="no targets file"):
        _run_args(None, None, True, None)


@pytest.mark.flows
@pytest.mark.usefixtures("prefect_harness")
def test_a_flow_runs_from_options_alone(tmp_path: Path) -> None:
    from batchyard.orchestration.flows import embeddings_flow
    from batchyard.orchestration.options import RunOptions

    targets = seed_targets(tmp_path, 30)
    base = overrides(tmp_path)
    base.pop("staging")
    base.pop("limits")
    opts = RunOptions(targets=targets, staging_root=str(tmp_path / "staging"), max_inputs_per_batch=10,
                      run_id="from-options")
    info = embeddings_flow(overrides=base, options=opts)
    assert (info["run_id"], info["state"], info["final"]["results"]) == ("from-options", "finished", 30)
    assert info["plan"]["shards"] == 3  # max_inputs_per_batch reached the planner


@pytest.mark.flows
@pytest.mark.usefixtures("prefect_harness")
def test_deployment_runs_read_the_profile_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.variables import Variable

    from batchyard.orchestration.flows import PROFILE_VARIABLE, default_profile

    Variable.set(PROFILE_VARIABLE, "prod", overwrite=True)
    try:
        assert default_profile(None, deployed=True) == "prod"
        assert default_profile(None, deployed=False) is None  # CLI and plain calls: --profile only
        assert default_profile("dev", deployed=True) == "dev"
        monkeypatch.setenv("BATCHYARD_PROFILE", "test")  # the worker's environment wins (load_settings reads it)
        assert default_profile(None, deployed=True) is None
    finally:
        Variable.unset(PROFILE_VARIABLE)
    monkeypatch.delenv("BATCHYARD_PROFILE")
    assert default_profile(None, deployed=True) is None
