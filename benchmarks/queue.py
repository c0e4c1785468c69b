"""How full does batchyard keep the provider's queue? One run, and two runs sharing the quota.

A local Batch API server plays the provider: an enqueued-token cap (`--cap`, 100k), a batch
latency (`--latency`, 10 s in progress), and its own token count (`--factor`: it counts 3%
more tokens than our exact count, as a real provider may). The runs are the CLI as a user runs
it, in one project directory (`batchyard embed --engine local`), told the cap
(`limits.enqueued_token_budget`), polling every 0.5 s, with a requeue backoff of 1 s.

The server is sampled every 50 ms for the tokens it holds in progress (its own count): the fill
is that over the cap, averaged over the time work waited (from the first batch the server
accepted to the last batch it accepted; after that nothing is left to queue). Makespan is
compared with the ideal: the provider's total tokens over the cap, times the latency (a queue
always exactly full). Every chunk must be settled once: the runs' results and Milvus are checked.

    python benchmarks/queue.py --chunks 3000 --cap 100000 --latency 10

Writes `results/queue-latest.md`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ != "__main__":
    # This file is named like the standard library's `queue`. A script run from this folder has
    # the folder first on its path, so its `import queue` (concurrent.futures, polars) lands here:
    # then be the standard library's module, whole.
    import importlib.util
    import sysconfig

    _spec = importlib.util.spec_from_file_location("queue", Path(sysconfig.get_paths()["stdlib"]) / "queue.py")
    assert _spec is not None and _spec.loader is not None
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["queue"] = _real
    _spec.loader.exec_module(_real)
    globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__")})
else:
    # run as a script: its own folder must not shadow the standard library's `queue` below
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from typing import Any

HERE = Path(__file__).resolve().parent
KEY = "sk-benchmark-queue-0123456789"


def seed(cwd: Path, env: dict[str, str], chunks: int) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "batchyard.cli", "seed", "--chunks", str(chunks), "--companies", "8"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    import yaml

    companies = yaml.safe_load((cwd / "targets.yaml").read_text())["companies"]
    half = len(companies) // 2
    for name, part in (("a.yaml", companies[:half]), ("b.yaml", companies[half:])):
        (cwd / name).write_text(yaml.safe_dump({"companies": part}))
    return ["targets.yaml", "a.yaml", "b.yaml"]


def start_runs(cwd: Path, env: dict[str, str], targets: list[str]) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-m", "batchyard.cli", "embed", "--targets", t, "--engine", "local",
                              "--json"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for t in targets]


def scenario(name: str, targets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.runner import LocalServer

    with tempfile.TemporaryDirectory(prefix="batchyard-queue-") as tmp:
        cwd = Path(tmp)
        cfg = LocalApiConfig(in_progress_s=args.latency, api_keys=[KEY],
                             faults={"enqueued_token_cap": args.cap, "token_count_factor": args.factor})
        server = LocalServer(cfg, cwd / "provider").start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
        env.update({"PREFECT_HOME": str(cwd / "prefect"), "BATCHYARD_PROVIDER__BASE_URL": server.base_url,
                    "BATCHYARD_PROVIDER__API_KEY": KEY, "BATCHYARD_PROVIDER__POLL_INTERVAL_S": "0.5",
                    "BATCHYARD_PROVIDER__REQUEUE_BACKOFF_S": "1",
                    "BATCHYARD_LIMITS__ENQUEUED_TOKEN_BUDGET": str(args.cap),
                    "BATCHYARD_EMBEDDING__DIMENSIONS": "64", "BATCHYARD_MILVUS__INDEX_TYPE": "FLAT"})
        files = seed(cwd, env, args.chunks)
        chosen = [files[0]] if targets == ["all"] else files[1:]
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.05):
                samples.append((time.time(), server.enqueued_tokens()))

        watcher = threading.Thread(target=watch, daemon=True)
        t0 = time.monotonic()
        watcher.start()
        procs = start_runs(cwd, env, chosen)
        outs = [p.communicate(timeout=3600) for p in procs]
        wall = time.monotonic() - t0
        stop.set()
        watcher.join()
        created = sorted(r["batch"].get("in_progress_at") or 0 for r in server.store.batch_records()
                         if r["batch"].get("in_progress_at"))
        refused = server.store.counters().get("token_limit_failed", 0)
        provider_tokens = sum(int(r.get("tokens") or 0) for r in server.store.batch_records()
                              if r["batch"]["status"] == "completed")
        server.stop()
        infos = []
        for proc, (stdout, stderr) in zip(procs, outs, strict=True):
            if proc.returncode != 0:
                raise RuntimeError(f"embed exited {proc.returncode}: {stderr[-2000:]}")
            infos.append(json.loads(stdout))
        # fill while work waited: from the first accepted batch to the last one accepted
        first, last = (created[0], created[-1]) if created else (0, 0)
        window = [(t, n) for t, n in samples if first <= t <= last]
        fill = sum(n for _, n in window) / (len(window) * args.cap) if window else 0.0
        ideal = provider_tokens / args.cap * args.latency
        results = sum(i["final"]["results"] for i in infos)
        return {"scenario": name, "runs": len(infos), "chunks": args.chunks, "results": results,
                "failures": sum(i["final"]["failures"] for i in infos), "batches": len(created),
                "refused": refused, "mean_fill": round(fill, 3),
                "run_reported_fill": [i["final"].get("queue", {}).get("mean_fill_while_waiting") for i in infos],
                "makespan_s": round(wall, 1), "ideal_s": round(ideal, 1),
                "makespan_vs_ideal": round(wall / ideal, 2) if ideal else None, "provider_tokens": provider_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--cap", type=int, default=100_000)
    parser.add_argument("--latency", type=float, default=10.0)
    parser.add_argument("--factor", type=float, default=1.03)
    parser.add_argument("--only", choices=["one", "two"], default=None)
    args = parser.parse_args()
    rows = []
    if args.only in (None, "one"):
        rows.append(scenario("one run, all companies", ["all"], args))
    if args.only in (None, "two"):
        rows.append(scenario("two runs, disjoint halves, started together", ["a", "b"], args))
    cmd = "python benchmarks/queue.py " + " ".join(sys.argv[1:])
    lines = [f"# Provider queue: fill and makespan ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"`{cmd}`: cap {args.cap:,} tokens, batch latency {args.latency:g} s, the server counts "
             f"{args.factor:g}x our tokens; poll 0.5 s; the runs told the cap.", "",
             "| scenario | results | failures | batches | refused | mean fill while work waited | "
             "runs' own figure | makespan | ideal | ratio |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['results']:,} of {r['chunks']:,} | {r['failures']} | {r['batches']} | "
                     f"{r['refused']} | {r['mean_fill']:.1%} | {r['run_reported_fill']} | {r['makespan_s']} s | "
                     f"{r['ideal_s']} s | {r['makespan_vs_ideal']}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results" / "queue-latest.md").write_text(text)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
