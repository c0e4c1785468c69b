"""`batchyard report RUN`: the page of a run with failures, expiries, token-limit refusals and a
real-time tail, checked against the run's staged files, and opened in a real browser."""

from __future__ import annotations

import functools
import html
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.e2e.test_cli import cli

pytestmark = pytest.mark.e2e

PLOTTED = ("cost", "timeline", "queue", "tokens", "failures")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]


@dataclass(frozen=True)
class FaultedRun:
    root: Path
    run_id: str
    info: dict[str, Any]


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory: pytest.TempPathFactory) -> FaultedRun:
    """An embeddings run on the embedded defaults whose batches meet sticky request errors (failed
    units), expiry (follow-up attempts, sent real-time as the tail) and a token cap (refusals,
    then resubmissions)."""
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.settings import Settings
    from tests.helpers import seed

    root = tmp_path_factory.mktemp("report") / "staging"
    settings = Settings(
        _env_file=None, staging={"root": str(root)}, milvus={"index_type": "FLAT"}, embedding={"dimensions": 16},
        provider={"poll_interval_s": 0.05, "requeue_backoff_s": 0.2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                  "local": {"faults": {"request_error_rate": 0.1, "request_error_status": 400,
                                       "request_error_sticky": True, "expire_after_fraction": 0.5,
                                       "expire_batches": 2, "enqueued_token_cap": 12_000}}},
        # past the requeue limit at once: an expired batch's follow-up goes real-time (lane auto)
        limits={"max_inputs_per_batch": 40, "max_inputs_per_request": 5, "max_requeues": 0},
        lane={"mode": "auto", "auto_max_tokens": 1},
    )
    from batchyard.storage.ledger import run_records
    from tests.helpers import run_of

    with RunContext(settings) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 240, companies=3)))
        records = run_records(run_of(ctx, info))
    final = info["final"]
    assert final["failures"] > 0 and final["lanes"].keys() == {"batch", "realtime"}, final
    assert final["batches"] > sum(1 for r in records if r.lane == "batch")  # refused, then resubmitted
    return FaultedRun(root, info["run_id"], info)


def run_store(faulted: FaultedRun, root: Path | None = None) -> Any:
    from batchyard.storage.runs import RunStore
    from batchyard.storage.staging import Staging

    return RunStore(Staging(str(root or faulted.root)), "embeddings", faulted.run_id)


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)"[^>]*>(.*?)</section>', page, flags=re.S))


def test_the_report_shows_the_run_as_staged_and_loads_nothing(faulted_run: FaultedRun, tmp_path: Path) -> None:
    from batchyard.runner import failures_frame
    from batchyard.storage.ledger import run_records

    out = tmp_path / "out" / "report.html"
    done = cli(["--root", str(faulted_run.root), "report", faulted_run.run_id, "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(out) in done.stdout.replace("\n", "")
    page = out.read_text()
    found = sections(page)

    # self-contained: every reference is to something inside the page; no script, no link, no image
    assert faulted_run.run_id in page
    assert all(ref.startswith("#") for ref in re.findall(r'(?:href|src)\s*=\s*"([^"]*)"', page))
    assert all(ref.startswith("#") for ref in re.findall(r"url\(([^)]*)\)", page))
    for tag in ("<script", "<link", "<img", "<iframe", "@import", "@font-face"):
        assert tag not in page
    for name in PLOTTED:  # one inline SVG plot per section
        assert found[name].count("<svg") == 1 and found[name].count("<path") > 10, name

    # the figures are the run's
    run = run_store(faulted_run)
    records = run_records(run)
    final = faulted_run.info["final"]
    submissions = final["batches"] + sum(1 for r in records if r.lane == "realtime")
    assert f"{len(records):,} shard attempt(s), {submissions:,} submission(s)" in found["timeline"]
    for lane, v in final["lanes"].items():
        assert re.search(rf"<td>{lane}</td>.*?\${v['usd']:.6f}", found["cost"], flags=re.S), lane
    codes = failures_frame(run).group_by("code").agg(pl.len(), pl.col("unit_id").first())
    assert codes.height >= 1
    for code, n, first in codes.iter_rows():
        assert f"<code>{code}</code>: {n:,} unit(s)" in found["failures"]
        assert html.escape(first) in found["failures"]
    for part in run.partitions():
        state = part.read_state()
        for key in state.get("keys") or state["companies"]:
            assert html.escape(key) in found["partitions"]
    assert "Samples of the provider account's queue" in found["queue"]  # the driver sampled every round


def test_the_report_defaults_to_the_run_folder_and_plots_queue_samples_when_the_run_has_them(
    faulted_run: FaultedRun, tmp_path: Path
) -> None:
    from batchyard.report import QUEUE_FILE

    root = tmp_path / "staging"  # a copy: the module's run stays without samples
    shutil.copytree(faulted_run.root / "embeddings", root / "embeddings")
    folder = root / "embeddings" / faulted_run.run_id
    samples = pl.DataFrame({"t": [1.0e9, 1.0e9 + 5], "reserved_tokens": [9_000, 4_000], "cap_tokens": [12_000] * 2,
                            "run_inflight_tokens": [6_000, 4_000], "run_waiting_tokens": [3_000, 0]})
    samples.write_parquet(folder / QUEUE_FILE)

    done = cli(["--root", str(root), "report", faulted_run.run_id], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    queue = sections((folder / "report.html").read_text())["queue"]
    assert "Samples of the provider account's queue" in queue and "no queue samples" not in queue
    assert queue.count("<svg") == 1

    # a run staged before queue samples existed: its in-flight tokens, from the ledger, and says so
    (folder / QUEUE_FILE).unlink()
    assert cli(["--root", str(root), "report", faulted_run.run_id], tmp_path).returncode == 0
    assert "This run has no queue samples" in sections((folder / "report.html").read_text())["queue"]

    samples.drop("cap_tokens").write_parquet(folder / QUEUE_FILE)
    bad = cli(["--root", str(root), "report", faulted_run.run_id], tmp_path)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert f"{folder / QUEUE_FILE} lacks column(s) cap_tokens" in bad.stderr.replace("\n", "")
    missing = cli(["--root", str(root), "report", "no-such-run"], tmp_path)
    assert missing.returncode == 2 and "run 'no-such-run' not found" in missing.stderr


def test_the_report_of_an_unfinished_run_shows_its_batches_in_flight(settings_factory: Any) -> None:
    from batchyard import runner
    from batchyard.context import RunContext
    from batchyard.jobs.embeddings import EmbeddingsJob
    from batchyard.report import build
    from tests.helpers import run_of, seed

    slow = {"local": {"validating_s": 60.0}}  # no batch ends while we look
    settings = settings_factory(limits={"max_inputs_per_batch": 10, "max_inputs_per_request": 5}, provider=slow)
    with RunContext(settings) as ctx:
        info = runner.execute(ctx, EmbeddingsJob(ctx, seed(ctx, 30)), wait=False)
        assert info["phase"] != "done"
        found = sections(build(run_of(ctx, info)))
    assert "The run has no summary yet" in found["cost"] and "<svg" not in found["cost"]
    assert found["timeline"].count("<svg") == 1 and found["queue"].count("<svg") == 1


# --------------------------------------------------------------------------- in a real browser


@dataclass
class Visit:
    page: Any
    requests: list[str]
    outside: list[str]
    errors: list[str]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Debian's headless chromium driven by Playwright, with an empty profile; skipped (saying why)
    where either is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield context
        finally:
            context.close()


def visit(context: Any, folder: Path, name: str) -> Visit:
    """Serve `folder` on a free loopback port and open `name`; every request that is not to that
    server is recorded and refused; console errors and page errors are recorded."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    seen = Visit(page=None, requests=[], outside=[], errors=[])

    def route(r: Any) -> None:
        if r.request.url.startswith(base):
            r.continue_()
        else:
            seen.outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("request", lambda req: seen.requests.append(req.url))
    page.on("console", lambda msg: seen.errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    try:
        page.goto(base + name, wait_until="load")
        page.wait_for_load_state("networkidle")
    finally:
        server.shutdown()
        server.server_close()
    seen.page = page
    return seen


@pytest.mark.browser
def test_the_report_renders_in_chromium_without_errors_or_requests_and_shows_every_plot(
    faulted_run: FaultedRun, browser: Any, tmp_path: Path
) -> None:
    from batchyard.report import write

    write(run_store(faulted_run), tmp_path / "site" / "report.html")
    seen = visit(browser, tmp_path / "site", "report.html")
    assert seen.errors == [] and seen.outside == []
    assert len(seen.requests) == 1 and seen.requests[0].endswith("/report.html")  # the page, nothing else
    page = seen.page
    assert faulted_run.run_id in page.title()
    for name in PLOTTED:
        svg = page.locator(f"section#{name} svg")
        assert svg.count() == 1, name
        box = svg.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 80, (name, box)
        assert page.locator(f"section#{name} svg path").count() > 10, name
    assert page.locator("section[data-plot=yes]").count() == len(PLOTTED)


@pytest.mark.browser
def test_the_browser_check_catches_a_request_that_leaves_the_page_and_a_script_error(
    browser: Any, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "bad.html").write_text('<html><body><img src="http://example.invalid/x.png">'
                                   "<script>notDefined()</script></body></html>")
    seen = visit(browser, site, "bad.html")
    assert seen.outside == ["http://example.invalid/x.png"]
    assert any("notDefined" in e for e in seen.errors)
