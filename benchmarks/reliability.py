"""A provider that keeps ending batches unfinished: does `embed` still end by itself?

Runs the CLI as a user would, on the embedded defaults, with the local server's fault
injection playing a provider that expires (or cancels, through `cancelling`) every batch with
half of its requests done. Then a clean re-run settles the rest. Writes
`results/reliability-latest.md`.

    python benchmarks/reliability.py --chunks 3000 --max-inputs-per-batch 300 --max-inputs-per-request 30

Shards need several requests each for "half done" to mean anything: a batch of one request
that ends half done has done nothing (the default of 2,048 inputs per request would make each
300-input shard one request, and no chunk could ever get a vector under this fault).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAULTS = {
    "repeated expiry": {"BATCHYARD_PROVIDER__LOCAL__FAULTS__EXPIRE_AFTER_FRACTION": "0.5"},
    "repeated server cancel": {"BATCHYARD_PROVIDER__LOCAL__FAULTS__CANCEL_AFTER_FRACTION": "0.5",
                               "BATCHYARD_PROVIDER__LOCAL__FAULTS__CANCELLING_S": "1"},
}


def cli(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "batchyard.cli", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode not in (0, 3, 4):
        raise RuntimeError(f"batchyard {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
    return out.returncode, out.stdout, time.monotonic() - t0


def scenario(name: str, faults: dict[str, str], chunks: int, per_batch: int, per_request: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="batchyard-reliability-") as tmp:
        cwd = Path(tmp)
        base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
        base.update({"BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.5", "PREFECT_HOME": str(cwd / "prefect")})
        code, _, _ = cli(["seed", "--chunks", str(chunks)], cwd, base)
        assert code == 0
        args = ["embed", "--targets", "targets.yaml", "--engine", "local", "--json",
                "--max-inputs-per-batch", str(per_batch)]
        base["BATCHYARD_LIMITS__MAX_INPUTS_PER_REQUEST"] = str(per_request)
        code, out, seconds = cli(args, cwd, {**base, **faults})
        info = json.loads(out)
        final = info["final"]
        code2, out2, seconds2 = cli(args, cwd, base)
        again = json.loads(out2)["final"]
        return {
            "scenario": name, "exit": code, "seconds": round(seconds, 1), "shards": info["plan"]["shards"],
            "batches": final["batches"], "results": final["results"], "failures": final["failures"],
            "by_code": final["failures_by_code"], "rerun_exit": code2, "rerun_seconds": round(seconds2, 1),
            "rerun_results": again["results"], "rerun_failures": again["failures"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--max-inputs-per-batch", type=int, default=300)
    parser.add_argument("--max-inputs-per-request", type=int, default=30)
    args = parser.parse_args()
    rows = [scenario(name, faults, args.chunks, args.max_inputs_per_batch, args.max_inputs_per_request)
            for name, faults in FAULTS.items()]
    lines = [
        "# Reliability: a provider that ends every batch half done",
        "",
        f"`python benchmarks/reliability.py --chunks {args.chunks} --max-inputs-per-batch "
        f"{args.max_inputs_per_batch} --max-inputs-per-request {args.max_inputs_per_request}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs; defaults otherwise (poll 0.5 s, requeue backoff 30 s doubling, "
        "max_requeues 3).",
        "",
        "| scenario | exit | wall s | shards | batches | results | failures | failures by code | "
        "re-run exit | re-run s | re-run results | re-run failures |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['exit']} | {r['seconds']} | {r['shards']} | {r['batches']} | {r['results']} "
            f"| {r['failures']} | {r['by_code']} | {r['rerun_exit']} | {r['rerun_seconds']} | "
            f"{r['rerun_results']} | {r['rerun_failures']} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "reliability-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
