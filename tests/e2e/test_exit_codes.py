"""Exit codes and one-line errors through the command line: scripts and schedulers read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def env(**extra: str) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    full.update({"BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
                 "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.1", "COLUMNS": "200", **extra})
    return full


def cli(args: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=300)


def write_targets(tmp_path: Path, text: str) -> None:
    (tmp_path / "t.yaml").write_text(text)


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    out = cli(["embed", "--help"], tmp_path)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "0 every unit succeeded" in text and "3 finished with failed units" in text
    assert "4 cancelled or unfinished" in text and "2 usage error" in text


def test_exit_0_3_and_4(tmp_path: Path) -> None:
    assert cli(["seed", "--chunks", "40", "--companies", "2", "--targets-out", "t.yaml"], tmp_path).returncode == 0
    ok = cli(["embed", "--targets", "t.yaml", "--engine", "local", "--json"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["final"]["results"] == 40 and summary["state"] == "finished"
    # a chunk that cannot be embedded: the run finishes, one unit failed -> 3
    from batchyard.context import RunContext
    from batchyard.settings import Settings

    s = Settings(_env_file=None, staging={"root": str(tmp_path / "staging")})
    with RunContext(s) as ctx:
        first = ctx.store.chunks.find_one({})
        ctx.store.chunks.insert_one({**first, "_id": "zz-blank", "text": "   "})
        ctx.store.save()
    failed = cli(["embed", "--targets", "t.yaml", "--engine", "local", "--json"], tmp_path)
    assert failed.returncode == 3, failed.stderr
    assert json.loads(failed.stdout)["final"]["failures_by_code"] == {"empty_text": 1}
    # detached: submitted, not finished -> 4, and the run id is reported
    with RunContext(s) as ctx:
        ctx.store.chunks.update_many({"_id": {"$ne": "zz-blank"}}, {"$set": {"text": "changed text"}})
        ctx.store.save()
    detached = cli(["embed", "--targets", "t.yaml", "--engine", "local", "--no-wait", "--json"], tmp_path,
                   BATCHYARD_PROVIDER__LOCAL__VALIDATING_S="2")
    assert detached.returncode == 4, detached.stderr
    info = json.loads(detached.stdout)
    assert info["phase"] == "batches"
    done = cli(["resume", info["run_id"], "--engine", "local"], tmp_path)
    assert done.returncode == 3, done.stderr  # the blank chunk is still there


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    write_targets(tmp_path, "companies: [acme]\n")
    cases = {
        "missing targets": (["embed", "--targets", "nope.yaml", "--engine", "local"], {}),
        "unknown task": (["infer", "nosuchtask", "--targets", "t.yaml", "--engine", "local"], {}),
        "bad setting": (["embed", "--targets", "t.yaml"], {"BATCHYARD_LIMITS__MAX_REQUESTS_PER_BATCH": "-5"}),
        "bad profile": (["--profile", "nope", "embed", "--targets", "t.yaml"], {}),
        "bad engine": (["embed", "--targets", "t.yaml", "--engine", "bogus"], {}),
    }
    for name, (args, extra) in cases.items():
        started = time.monotonic()
        out = cli(args, tmp_path, **extra)
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert "Traceback" not in out.stdout + out.stderr, name
        if name != "bad engine":  # Typer's own usage box
            assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), (name, out.stderr)
        assert time.monotonic() - started < 15, f"{name}: checked before Prefect starts"


def test_a_stand_in_held_by_another_process_is_waited_for_then_one_line(tmp_path: Path) -> None:
    # runs of one project directory take turns with the stand-in; one that never lets go is waited
    # for `mongo.standin_wait_s`, then named in one line
    write_targets(tmp_path, "companies: [acme]\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import time; from batchyard.context import RunContext; from batchyard.settings import Settings;"
            "ctx = RunContext(Settings(_env_file=None)); ctx.store; print('ready', flush=True); time.sleep(60)")],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        out = cli(["embed", "--targets", "t.yaml"], tmp_path, BATCHYARD_MONGO__STANDIN_WAIT_S="3")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert lines[-1].startswith("error: ") and "in use by another process" in lines[-1], out.stderr
        assert len(lines) <= 3, out.stderr  # what it waits for, then why it gave up
    finally:
        holder.kill()
        holder.wait()


def test_cancel_reaches_a_run_another_process_drives(tmp_path: Path) -> None:
    assert cli(["seed", "--chunks", "60", "--companies", "2", "--targets-out", "t.yaml"], tmp_path).returncode == 0
    # slow enough that the run is still live when the cancel arrives, however loaded the machine:
    # 30 requests at 2 s each; the resume below runs its embedded server at full speed
    slow = env(BATCHYARD_PROVIDER__LOCAL__SECONDS_PER_REQUEST="2", BATCHYARD_LIMITS__MAX_INPUTS_PER_BATCH="10",
               BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST="2")
    driver = subprocess.Popen([sys.executable, "-m", "batchyard.cli", "embed", "--targets", "t.yaml",
                               "--engine", "local", "--json"], cwd=tmp_path, env=slow,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = tmp_path / "staging" / "embeddings"
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline:
            runs = list(run_dir.iterdir()) if run_dir.exists() else []
            if runs and (runs[0] / "run.json").exists() and json.loads((runs[0] / "run.json").read_text()).get(
                    "phase") == "batches":
                run_id = runs[0].name
                break
            time.sleep(0.2)
        assert run_id, "the run never reached its batches"
        cancelled = cli(["cancel", run_id], tmp_path)
        assert cancelled.returncode == 0, cancelled.stderr
        assert "acknowledged" in cancelled.stdout
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 4, err[-2000:]
    info = json.loads(out)
    assert info["state"] == "cancelled" and info["final"]["failures_by_code"].get("run_cancelled", 0) > 0
    resumed = cli(["resume", run_id, "--engine", "local", "--json"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["final"]["results"] == 60


def test_cancel_of_a_finished_run_says_so_and_changes_nothing(tmp_path: Path) -> None:
    assert cli(["seed", "--chunks", "20", "--companies", "1", "--targets-out", "t.yaml"], tmp_path).returncode == 0
    done = cli(["embed", "--targets", "t.yaml", "--engine", "local", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    out = cli(["cancel", run_id], tmp_path)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert f"run {run_id} already ended (finished): nothing to cancel" in text and "resume" not in text
    run = json.loads((tmp_path / "staging" / "embeddings" / run_id / "run.json").read_text())
    assert (run["state"], run["phase"]) == ("finished", "done")


def test_prefect_that_cannot_start_in_time_is_one_line_with_a_way_out(tmp_path: Path) -> None:
    write_targets(tmp_path, "companies: [acme]\n")
    extra = {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    full = {k: v for k, v in env(**extra).items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-m", "batchyard.cli", "embed", "--targets", "t.yaml"], cwd=tmp_path,
                         env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "--engine local" in out.stderr, out.stderr
