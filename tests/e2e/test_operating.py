"""What an operator sees when the infrastructure is down or a run is stopped, through the real CLI.

Each unreachable service is one line that names it, its address (secrets masked) and the
cause, exit 1, and no run is left behind; `--verbose` adds the traceback. Ctrl-C and SIGTERM
leave the run `interrupted`, say how to resume it, and `resume` finishes it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SECRET = "pw-7f3a9c"


def free_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHYARD_", "PREFECT_API_URL"))}
    full.update({"BATCHYARD_MILVUS__INDEX_TYPE": "FLAT", "BATCHYARD_EMBEDDING__DIMENSIONS": "16",
                 "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.1", "COLUMNS": "200",
                 "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra})
    return full


def cli(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchyard.cli", *args], cwd=tmp_path, env=env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=300)


def runs(tmp_path: Path) -> list[dict[str, object]]:
    out = cli(tmp_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    assert cli(tmp_path, "seed", "--chunks", "30", "--companies", "2").returncode == 0
    return tmp_path


def test_unreachable_services_are_one_line_naming_them_and_leave_no_run(seeded: Path) -> None:
    cases = {
        # the default engine (Prefect), as an operator runs it
        "MongoDB": ({"BATCHYARD_MONGO__URI": f"mongodb://ops:{SECRET}@127.0.0.1:{free_port()}/db",
                     "BATCHYARD_MONGO__SERVER_SELECTION_TIMEOUT_S": "1"}, "MongoDB at mongodb://127.0.0.1:"),
        "Milvus": ({"BATCHYARD_MILVUS__URI": f"http://127.0.0.1:{free_port()}",
                    "BATCHYARD_MILVUS__TOKEN": f"root:{SECRET}"}, "Milvus at http://127.0.0.1:"),
        "Prefect": ({"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}, "Prefect API at http://127.0.0.1:"),
        "S3": ({"BATCHYARD_STAGING__ROOT": "s3://bucket/prefix",
                "BATCHYARD_STAGING__S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                "BATCHYARD_STAGING__S3_ACCESS_KEY_ID": "AKIATESTONLY", "BATCHYARD_STAGING__S3_SECRET_ACCESS_KEY": SECRET},
               "S3 at http://127.0.0.1:"),
    }
    for name, (extra, names) in cases.items():
        out = cli(seeded, "embed", "--targets", "targets.yaml", **extra)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1, (name, out.stderr[-3000:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {names}") and "is unreachable: " in lines[0], (
            name, out.stderr[-3000:])
        assert SECRET not in out.stdout + out.stderr and "Traceback" not in out.stderr, name
    assert runs(seeded) == [], "a run that could not start is not left behind"
    mongo = cli(seeded, "embed", "--targets", "targets.yaml", **cases["MongoDB"][0])
    assert "(no server answered within 1 s: mongo.server_selection_timeout_s)" in mongo.stderr, mongo.stderr
    # --verbose: the traceback too, still without the secret
    verbose = cli(seeded, "--verbose", "embed", "--targets", "targets.yaml", "--engine", "local",
                  **cases["Milvus"][0])
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "MilvusException" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: Milvus at http://127.0.0.1:")
    assert SECRET not in verbose.stdout + verbose.stderr


def test_an_unwritable_prefect_home_is_reported_as_such(seeded: Path) -> None:
    home = seeded / "not-a-directory"
    home.write_text("a file where HOME should be a directory\n")
    full = env(seeded, HOME=str(home))
    del full["PREFECT_HOME"]
    out = subprocess.run([sys.executable, "-m", "batchyard.cli", "embed", "--targets", "targets.yaml"], cwd=seeded,
                         env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: Prefect at PREFECT_HOME {home}/.prefect cannot write its home: NotADirectoryError: Not a directory; "
        "set PREFECT_HOME (or HOME) to a writable directory, or use --engine local"], out.stderr


def _stop_when_submitted(seeded: Path, run_id: str, sig: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Start `embed --run-id run_id` (its batches stay validating), send `sig` once it has
    submitted, and return what it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "batchyard.cli", "embed", "--targets", "targets.yaml",
                             "--run-id", run_id, *args], cwd=seeded,
                            env=env(seeded, BATCHYARD_PROVIDER__LOCAL__VALIDATING_S="300"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ledger = seeded / "staging" / "embeddings" / run_id
        deadline = time.monotonic() + 180
        while not any(json.loads(p.read_text()).get("batch_id") for p in ledger.glob("p=*/ledger/*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_and_sigterm_leave_the_run_interrupted_and_resume_finishes_it(seeded: Path) -> None:
    # Ctrl-C under the default engine (Prefect)
    stopped = _stop_when_submitted(seeded, "by-ctrl-c", signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    lines = stopped.stderr.strip().splitlines()
    assert lines[-1] == "run by-ctrl-c is interrupted; `batchyard resume by-ctrl-c` continues it", stopped.stderr
    assert len(lines) <= 3 and "Traceback" not in stopped.stderr and "Crash detected" not in stopped.stderr
    assert [(r["run"], r["state"], r["phase"]) for r in runs(seeded)] == [("by-ctrl-c", "interrupted", "batches")]
    resumed = cli(seeded, "resume", "by-ctrl-c", "--engine", "local", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (json.loads(resumed.stdout)["state"], json.loads(resumed.stdout)["final"]["results"]) == ("finished", 30)

    # SIGTERM (a scheduler stopping the job), local engine; the source changed, so there is work
    from batchyard.context import RunContext
    from batchyard.settings import Settings

    with RunContext(Settings(_env_file=None, staging={"root": str(seeded / "staging")})) as ctx:
        ctx.store.chunks.update_many({}, {"$set": {"text": "a changed passage"}})
        ctx.store.save()
    stopped = _stop_when_submitted(seeded, "by-sigterm", signal.SIGTERM, "--engine", "local")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "run by-sigterm is interrupted; `batchyard resume by-sigterm` continues it")
    states = {r["run"]: r["state"] for r in runs(seeded)}
    assert states == {"by-ctrl-c": "finished", "by-sigterm": "interrupted"}
    resumed = cli(seeded, "resume", "by-sigterm", "--engine", "local", "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["state"] == "finished", resumed.stderr[-3000:]


def test_a_run_under_prefect_prints_each_warning_once_and_no_noise(seeded: Path) -> None:
    company = (seeded / "targets.yaml").read_text().split("company_id:")[1].split()[0]
    (seeded / "t.yaml").write_text(f"companies:\n  - company_id: {company}\n  - company_id: nosuchco\n")
    out = cli(seeded, "embed", "--targets", "t.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("target nosuchco matched no chunk") == 1, out.stderr
    # Prefect's own records (its console handler prints them a second time), its temporary
    # server's output, and gRPC's keepalive complaints stay off the terminal
    for noise in ("| WARNING |", "| ERROR |", "Error flushing events", "Traceback", "too_many_pings", "GOAWAY"):
        assert noise not in out.stderr, (noise, out.stderr)
    assert out.stderr.strip().splitlines() == [
        line for line in out.stderr.strip().splitlines() if line.startswith("WARNING batchyard.")], out.stderr
