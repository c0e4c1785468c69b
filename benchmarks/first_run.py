"""How fast `batchyard demo` shows progress and finishes, beside a baseline in the same run.

Each variant runs the demo as a user does, on an interactive terminal (a pty, so the progress
bar is drawn), in a fresh directory, several times, alternating variants so that load changes
hit them alike:

- `this` (default engine, Prefect): the working tree's batchyard;
- `baseline` (default engine, Prefect): the same commands from another tree (`--baseline`,
  default: `git archive main`), e.g. before Prefect's server was started early;
- `local` (`--engine local`, no Prefect at all): the floor.

Each run gets a fresh `PREFECT_HOME` (`--home fresh`: the first run after installation, with
the temporary server's database migrations) or one shared by the runs of its variant that was
warmed by one unmeasured run (`--home warm`, default: a user's second and later runs).

Per run it records: the first output of any kind, the first *labelled* progress line (a
progress bar whose stage is not just `starting`, or whose detail says what it waits for; the
old CLI showed `starting 0/?` with no label), and the total wall time. Results go to
`results/first-run-<home>-latest.md` and a table. Not a pass/fail test; run it on an idle machine
(the load average is recorded).

    python benchmarks/first_run.py --runs 3 [--home warm|fresh] [--baseline main|DIR|none]
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# this folder after the standard library: benchmarks/queue.py would shadow `queue` (polars needs it)
sys.path.append(sys.path.pop(0))

from rich.table import Table

from harness import RESULTS_DIR, console, machine

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
# a rich progress row: "<stage> <bar> <n>/<total or ?> <detail> <elapsed>"
PROGRESS = re.compile(r"^\s*(?P<stage>[a-z]+)\s+[━╸╺ ]+\s+\d+/(?:\d+|\?)\s*(?P<detail>.*?)\s*\d+:\d\d:\d\d\s*$")


def labelled(line: str) -> bool:
    """Whether a screen line is a progress row that says what is happening."""
    m = PROGRESS.match(line)
    return bool(m) and (m["stage"] != "starting" or bool(m["detail"].strip()))


def run_once(src: Path, workdir: Path, home: Path, engine: str) -> dict[str, Any]:
    """One `batchyard demo` on a pty: seconds to first output, to first labelled progress, total."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHYARD_", "PREFECT_"))}
    env.update(PYTHONPATH=str(src), PREFECT_HOME=str(home), COLUMNS="160", LINES="50", TERM="xterm-256color")
    args = [sys.executable, "-m", "batchyard.cli", "demo"] + (["--engine", "local"] if engine == "local" else [])
    primary, secondary = pty.openpty()
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdin=secondary, stdout=secondary, stderr=secondary,
                            close_fds=True)
    os.close(secondary)
    first_output = first_progress = None
    buffer = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 0.05)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        now = time.monotonic() - started
        first_output = first_output if first_output is not None else now
        buffer += data
        if first_progress is None:
            text = ANSI.sub(b"", buffer).decode(errors="replace").replace("\r", "\n")
            if any(labelled(line) for line in text.splitlines()):
                first_progress = now
    code = proc.wait()
    total = time.monotonic() - started
    os.close(primary)
    if code != 0:
        tail = ANSI.sub(b"", buffer).decode(errors="replace")[-2000:]
        raise SystemExit(f"demo exited {code} ({src}, {engine}):\n{tail}")
    return {"first_output_s": round(first_output or total, 2),
            "first_progress_s": round(first_progress, 2) if first_progress is not None else None,
            "total_s": round(total, 2)}


def baseline_tree(spec: str, tmp: Path) -> Path | None:
    """The `src` directory of the baseline: a directory, or a git ref exported with `git archive`."""
    if spec == "none":
        return None
    if Path(spec).is_dir():
        return Path(spec).resolve()
    out = tmp / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", spec, "src", "prompts"], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--home", choices=("warm", "fresh"), default="warm")
    parser.add_argument("--baseline", default="main", help="a git ref, a batchyard src directory, or none")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchyard-first-run-") as tmp_name:
        tmp = Path(tmp_name)
        variants: dict[str, tuple[Path, str]] = {"this": (REPO / "src", "prefect")}
        base = baseline_tree(opts.baseline, tmp)
        if base is not None:
            variants["baseline"] = (base, "prefect")
        variants["local"] = (REPO / "src", "local")
        machine()  # imports what the report needs now, not after the runs
        homes = {name: tmp / f"home-{name}" for name in variants}
        if opts.home == "warm":  # one unmeasured run per variant: its database exists, migrated
            for name, (src, engine) in variants.items():
                (tmp / f"warm-{name}").mkdir()
                run_once(src, tmp / f"warm-{name}", homes[name], engine)
        load_before = os.getloadavg()
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for i in range(opts.runs):
            for name, (src, engine) in variants.items():
                workdir = tmp / f"{name}-{i}"
                workdir.mkdir()
                home = homes[name] if opts.home == "warm" else tmp / f"home-{name}-{i}"
                results[name].append(run_once(src, workdir, home, engine))
                shutil.rmtree(workdir, ignore_errors=True)
                console.print(f"{name} run {i + 1}: {results[name][-1]}")
        report(opts, variants, results, load_before)


def _median(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return f"{statistics.median(got):.1f}" if got else "never"


def report(opts: Any, variants: dict[str, tuple[Path, str]], results: dict[str, list[dict[str, Any]]],
           load_before: tuple[float, float, float]) -> None:
    meta = machine()
    title = (f"batchyard demo, {opts.runs} runs per variant, PREFECT_HOME {opts.home}; load average before "
             f"{load_before[0]:.2f}, after {meta['load_average_1_5_15'][0]:.2f}; {meta.get('cpus')} cores")
    table = Table(title=title, title_justify="left")
    columns = ["variant", "engine", "first output s", "first labelled progress s", "total s (median)", "total s (runs)"]
    for col in columns:
        table.add_column(col)
    lines = [f"# First run: `batchyard demo`\n\n{title}\n", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for name, runs in results.items():
        row = [name, variants[name][1], _median([r["first_output_s"] for r in runs]),
               _median([r["first_progress_s"] for r in runs]), _median([r["total_s"] for r in runs]),
               ", ".join(f"{r['total_s']:.1f}" for r in runs)]
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"first-run-{opts.home}-latest.md"
    out.write_text("\n".join(lines) + f"\n\nMachine: {meta}\n")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
