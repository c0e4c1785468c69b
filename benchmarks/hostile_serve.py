"""`batchyard serve` under hostile clients, with its default settings: the figures of issue 18.

Starts `batchyard serve` (a subprocess, a key, defaults otherwise) and measures:

- `half-sent`: N connections that send half their headers and N that send their headers and half
  a body; how long until the server has closed every one (done when: within 60 s), and whether
  a client with the key is answered meanwhile;
- `flood`: `--flood` connections that send half their headers (the issue's probe sent 20,000),
  opened as fast as this machine allows; whether a client with the key is answered meanwhile,
  and how many lines the server logged;
- `body`: a 300 MB chunked JSON body to /v1/embeddings, and three at once: the answer and the
  server's peak RSS (`VmHWM`; done when: 413 under 600 MB).

With `--baseline-src DIR` (e.g. the main checkout's `src`), the same run also measures the server
from that source tree: the before/after figures side by side. Writes
`results/serve-hostile-latest.md`. Not a pass/fail test.

    python benchmarks/hostile_serve.py [--n 200] [--flood 5000] [--baseline-src /work/main/src]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import select
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batchyard.localapi.runner import ServerProcess
from harness import RESULTS_DIR

KEY = "sk-hostile-" + "k" * 24


def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def answered(base_url: str) -> str:
    """How a client with the key fares: status and seconds, or the error."""
    t = time.monotonic()
    try:
        r = httpx.get(f"{base_url}/files", headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        return f"{r.status_code} in {time.monotonic() - t:.2f} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__} after {time.monotonic() - t:.1f} s"


def wait_closed(socks: list[socket.socket], limit_s: float) -> tuple[int, float]:
    """(connections the server closed, seconds until the last of them) within limit_s."""
    start, last = time.monotonic(), 0.0
    sel = selectors.DefaultSelector()  # epoll: fds past 1024
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    left = len(socks)
    while left and time.monotonic() - start < limit_s:
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                left -= 1
                last = time.monotonic() - start
    sel.close()
    for s in socks:
        s.close()
    return len(socks) - left, last


def half_sent(port: int, base_url: str, n: int) -> dict[str, Any]:
    heads = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for s in heads:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
    bodies = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for s in bodies:
        s.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"m\", ".encode())
    meanwhile = answered(base_url)
    closed, took = wait_closed(heads + bodies, 90)
    return {"connections": 2 * n, "closed": closed, "last closed after s": round(took, 1), "good client": meanwhile}


def flood(port: int, base_url: str, n: int, log: Path) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 500)), hard))
    before = log.stat().st_size
    socks, refused = [], 0
    t = time.monotonic()
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /v1/files HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            refused += 1
    opened_s = time.monotonic() - t
    meanwhile = answered(base_url)
    closed, took = wait_closed(socks, 90)
    time.sleep(1)
    text = log.read_bytes()[before:].decode(errors="replace")
    return {"connections": n, "connect failed": refused, "opened in s": round(opened_s, 1), "good client": meanwhile,
            "closed by the server": closed, "last closed after s": round(took, 1),
            "log bytes": len(text.encode()), "log lines": len(text.splitlines()),
            "tracebacks": text.count("Traceback")}


def chunked_post(port: int, total: int) -> str:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    block = b"[" + b"1," * (512 * 1024 - 1) + b"1"
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    sent, answer = 0, b""
    try:
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(frame)
            sent += len(block)
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
        sock.settimeout(120)
        answer = sock.recv(65536)
    except OSError as exc:
        return f"{type(exc).__name__} after {sent / 2**20:.0f} MB sent"
    finally:
        sock.close()
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return f"{status} after {sent / 2**20:.0f} MB sent"


def body(proc: ServerProcess, port: int) -> dict[str, Any]:
    assert proc.proc is not None
    pid = proc.proc.pid
    start = vm_hwm_mb(pid)
    one = chunked_post(port, 300 * 2**20)
    peak_one = vm_hwm_mb(pid)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        three = list(pool.map(lambda _: chunked_post(port, 300 * 2**20), range(3)))
    return {"RSS at start MB": round(start), "one 300 MB body": one, "peak RSS after one MB": round(peak_one),
            "three at once": "; ".join(sorted(set(three))), "peak RSS after three MB": round(vm_hwm_mb(pid))}


def measure(src: str | None, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHYARD_")}
    env["BATCHYARD_PROVIDER__LOCAL__API_KEYS"] = json.dumps([KEY])
    if src:
        env["PYTHONPATH"] = src
    label = "baseline" if src else "server"
    log = tmp / f"{label}.log"
    out: dict[str, dict[str, Any]] = {}
    for name in ("half-sent", "flood", "body"):
        with ServerProcess(tmp / f"{label}-{name}", env=env, output=log) as proc:
            port = int(proc.base_url.rsplit(":", 1)[1].split("/")[0])
            if name == "half-sent":
                out[name] = half_sent(port, proc.base_url, args.n)
            elif name == "flood":
                out[name] = flood(port, proc.base_url, args.flood, log)
            else:
                out[name] = body(proc, port)
        print(label, name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--baseline-src", default=None)
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["server"] = measure(None, args, Path(tmp))
        if args.baseline_src:
            results["baseline"] = measure(args.baseline_src, args, Path(tmp))
    lines = ["# `batchyard serve` under hostile clients (defaults, one key)", "",
             f"`python benchmarks/hostile_serve.py --n {args.n} --flood {args.flood}"
             + (f" --baseline-src {args.baseline_src}`" if args.baseline_src else "`")
             + f", load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.", ""]
    for name in ("half-sent", "flood", "body"):
        lines += [f"## {name}", "", "| figure | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
        for key in results["server"][name]:
            lines.append(f"| {key} | " + " | ".join(str(results[v][name].get(key, "")) for v in results) + " |")
        lines.append("")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "serve-hostile-latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
