"""Requests per second of the local Batch API server over kept-alive connections.

Why: the listening socket was made without `IPPROTO_TCP`, so asyncio did not set TCP_NODELAY on
the connections it accepted, and every request on a kept-alive connection waited for the
client's delayed ACK (about 40 ms) before its answer's second write left. `baseline` binds the
socket the old way (`socket.socket(family, SOCK_STREAM)`), `server` the way `runner._bind` does
now; both run the same app in this process, one after the other, and the same client (an
`httpx.Client`, keep-alive, one connection) sends the same requests to each.

    python benchmarks/bench_serve.py [--requests 300] [--rounds 3]

Prints a table (requests/s and median latency per variant and request kind) and writes
`results/serve-latest.md`. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.table import Table

from batchyard.localapi import runner
from batchyard.localapi.auth import ServeError
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer
from harness import RESULTS_DIR, console

KEY = "sk-bench-" + "x" * 24
EMBED_BODY = {"model": "text-embedding-3-small", "input": ["a short text to embed"], "dimensions": 16}


def _old_bind(host: str, port: int) -> socket.socket:
    """`runner._bind` as it was: no protocol given, so accepted sockets kept Nagle's algorithm."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.setblocking(False)
    return sock


def _measure(base_url: str, n: int) -> dict[str, tuple[float, float]]:
    """kind -> (requests/s, median latency ms) over one kept-alive connection."""
    out: dict[str, tuple[float, float]] = {}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        client.get("/batches").raise_for_status()  # open the connection
        for kind, call in (("GET /v1/batches", lambda: client.get("/batches")),
                           ("POST /v1/embeddings", lambda: client.post("/embeddings", json=EMBED_BODY))):
            lat = []
            start = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                call().raise_for_status()
                lat.append(time.perf_counter() - t)
            wall = time.perf_counter() - start
            out[kind] = (n / wall, statistics.median(lat) * 1000)
    return out


def _run(variant: str, n: int, state: Path) -> dict[str, tuple[float, float]]:
    real = runner._bind
    if variant == "baseline":
        runner._bind = _old_bind  # type: ignore[assignment]
    try:
        with LocalServer(LocalApiConfig(api_keys=[KEY]), state / variant) as server:  # type: ignore[list-item]
            return _measure(server.base_url, n)
    finally:
        runner._bind = real  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {"baseline": {}, "server": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in ("baseline", "server"):  # alternate, so load drifts hit both
                for kind, fig in _run(variant, args.requests, Path(tmp) / str(r)).items():
                    results[variant].setdefault(kind, []).append(fig)
    table = Table(title=f"local Batch API server, {args.requests} requests x {args.rounds} rounds, one "
                        f"kept-alive connection (load {os.getloadavg()[0]:.2f})")
    for col in ("request", "variant", "requests/s (best)", "median latency ms (best)", "speed-up"):
        table.add_column(col)
    rows: list[list[Any]] = []
    for kind in results["server"]:
        base = max(f[0] for f in results["baseline"][kind])
        for variant in ("baseline", "server"):
            figs = results[variant][kind]
            best, lat = max(f[0] for f in figs), min(f[1] for f in figs)
            row = [kind, variant, f"{best:,.0f}", f"{lat:.2f}", f"{best / base:.1f}x"]
            rows.append(row)
            table.add_row(*row)
    console.print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    lines = ["# bench_serve: requests/s over a kept-alive connection", "",
             f"`python benchmarks/bench_serve.py --requests {args.requests} --rounds {args.rounds}`, "
             f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.", "",
             "| request | variant | requests/s (best) | median latency ms (best) | speed-up |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (RESULTS_DIR / "serve-latest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
