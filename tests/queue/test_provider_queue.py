"""The provider's queue: one token reservation per account and model for every run and worker."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.localapi.config import LocalApiConfig
from batchyard.localapi.runner import LocalServer
from batchyard.provider_queue import (
    AccountQueue,
    Calibration,
    Reservation,
    account_of,
    fits,
    mean_fill,
)
from batchyard.settings import ProviderSettings
from batchyard.stages.batches import Throttle, select_submittable
from batchyard.storage.ledger import ShardRecord
from batchyard.storage.staging import Staging
from batchyard.targets import Targets
from tests.helpers import assert_every_unit_settled_once, run_of, seed


def rec(name: str, tokens: int, *, state: str = "planned", n_requests: int = 1, **extra: Any) -> ShardRecord:
    shard, attempt = name.split(".")
    return ShardRecord(run_id="r1", job="embeddings", partition="p0000", shard=shard, attempt=int(attempt),
                       endpoint="/v1/embeddings", model="m", sha256="x", n_requests=n_requests, n_inputs=1, bytes=1,
                       tokens=tokens, state=state, **extra)  # type: ignore[arg-type]


def test_markers_carry_their_numbers_and_expire(tmp_path: Path) -> None:
    q = AccountQueue(Staging(str(tmp_path)), "https://api.example/v1#org", "text-embedding-3-small")
    made = q.reserve([rec("s00000.1", 700), rec("s00001.1", 300)], now=1_000.0)
    assert Reservation.parse(made[0].name) == made[0] and made[0].run_id == "r1"
    assert sorted(r.tokens for r in q.reservations(now=1_000.0)) == [300, 700]
    q.release(made[:1])
    assert [r.tokens for r in q.reservations(now=1_000.0)] == [300]
    assert q.reservations(now=made[1].expires + 1) == []  # past the completion window: dropped
    assert not (tmp_path / q.prefix / "r").exists() or not list((tmp_path / q.prefix / "r").iterdir())


def test_the_account_never_names_a_key() -> None:
    keyed = ProviderSettings(api_key="sk-VERY-SECRET-0123456789", base_url="https://api.example/v1")
    assert "VERY-SECRET" not in account_of(keyed) and account_of(keyed).startswith("https://api.example/v1#key-")
    assert account_of(ProviderSettings()) == "embedded"
    org = ProviderSettings(api_key="sk-x" * 5, organization="org-1")
    assert account_of(org) == "https://api.openai.com/v1#org-1"


def test_the_provider_count_is_learned_from_usage_and_refusals(tmp_path: Path) -> None:
    q = AccountQueue(Staging(str(tmp_path)), "a", "m")
    assert q.calibration() == Calibration()
    q.observe_usage(1_080, 1_000)
    q.observe_usage(1_050, 1_000)
    assert q.calibration().ratio == pytest.approx(1.08)
    # a refusal where we thought it fit: the cap is learned and the ratio rises past the refused state
    cal = q.observe_refusal(20_000, 15_000, 4_000)
    assert cal.cap == 20_000 and cal.refusals == 1
    assert not fits(15_000, 4_000, 20_000, cal.ratio)
    assert fits(10_000, 4_000, 20_000, cal.ratio)  # once a batch ended, it fits again
    # usage says what the provider really counts: it replaces the refusal's guess
    assert q.observe_usage(1_100, 1_000).ratio == pytest.approx(1.1)


def test_refusals_alone_raise_the_ratio_a_little_each_and_never_past_the_bound(tmp_path: Path) -> None:
    from batchyard.provider_queue import MAX_REFUSAL_RATIO, MAX_STEP

    # others we cannot see hold most of a 6,000-token quota for a long time: every batch of ours
    # is refused while we think it fits. Each refusal moves the ratio at most MAX_STEP, and
    # refusals never teach more than MAX_REFUSAL_RATIO (the shards must not shrink to nothing,
    # nor ordinary units become "unfittable")
    q = AccountQueue(Staging(str(tmp_path)), "a", "m")
    ratios = [q.observe_refusal(6_000, 0, 1_200).ratio for _ in range(40)]
    assert ratios[0] <= 1 + MAX_STEP
    assert all(b >= a for a, b in itertools.pairwise(ratios))
    assert max(ratios) == pytest.approx(MAX_REFUSAL_RATIO)
    # reported usage is evidence: a provider that really counts 1.4x is believed
    assert q.observe_usage(1_400, 1_000).ratio == pytest.approx(1.4)
    assert q.observe_refusal(6_000, 0, 1_000).ratio == pytest.approx(1.4)


def test_admission_counts_the_rest_of_the_account_in_the_providers_count() -> None:
    waiting = [rec("s00000.1", 6_000), rec("s00001.1", 6_000), rec("s00002.1", 6_000)]
    alone = select_submittable(waiting, Throttle(20_000, 2_000, 500), now=0)
    assert len(alone) == 3
    shared = select_submittable(waiting, Throttle(20_000, 2_000, 500, others={"m": 8_000}), now=0)
    assert len(shared) == 1
    counted = select_submittable(waiting, Throttle(20_000, 2_000, 500, ratio={"m": 1.2}), now=0)
    assert len(counted) == 2  # 3 x 6,000 x 1.2 > 20,000
    # embeddings: the enqueued-request cap
    many = [rec(f"s{i:05d}.1", 10, n_requests=400_000) for i in range(3)]
    capped = select_submittable(many, Throttle(20_000, 2_000, 500, request_budget=1_000_000), now=0)
    assert len(capped) == 2  # 3 x 400,000 requests > 1,000,000
    full = select_submittable(many, Throttle(20_000, 2_000, 500, others_requests={"m": 999_999},
                                             request_budget=1_000_000), now=0)
    assert full == []


def test_a_shard_refused_for_capacity_goes_as_soon_as_a_batch_ends_not_after_its_backoff() -> None:
    now = 1_000.0
    refused = rec("s00002.1", 6_000, state="uploaded", submission=2, not_before=now + 600,
                  token_limit_since=now - 5)
    flying = rec("s00000.1", 16_000, state="submitted", batch_id="b0")
    throttle = Throttle(20_000, 2_000, 500)
    assert select_submittable([flying, refused], throttle, now=now) == []  # still no room
    ended = flying.model_copy(update={"state": "collected"})
    other = Throttle(20_000, 2_000, 500, others={"m": 4_000})
    assert select_submittable([ended, refused], other, now=now) == [refused]  # room again: at once
    # with nothing else in the queue, another tenant holds it: the backoff stands
    assert select_submittable([ended, refused], throttle, now=now) == []


def test_mean_fill_weights_time_while_work_waited() -> None:
    samples = pl.DataFrame({"t": [0.0, 10.0, 20.0, 30.0], "reserved_tokens": [100, 50, 100, 0],
                            "cap_tokens": [100] * 4, "run_waiting_tokens": [5, 5, 0, 0]})
    out = mean_fill(samples)
    assert out["mean_fill_while_waiting"] == pytest.approx(0.75) and out["seconds_waiting"] == 20.0


@pytest.fixture
def provider(tmp_path: Path) -> Any:
    """A local Batch API server shared by the runs of a test: a token cap and a batch latency."""
    cfg = LocalApiConfig(in_progress_s=1.0, api_keys=["sk-queue-test-key-0123456789"],
                         faults={"enqueued_token_cap": 12_000, "token_count_factor": 1.05})
    server = LocalServer(cfg, tmp_path / "provider").start()
    samples: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            samples.append(server.enqueued_tokens())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield server, samples
    stop.set()
    watcher.join()
    server.stop()


def test_a_run_leaves_the_room_another_run_holds_and_recovers_it_when_that_run_is_not_driven(
        settings_factory: Any, provider: Any) -> None:
    server, enqueued = provider
    over = {"provider": {"base_url": server.base_url, "api_key": "sk-queue-test-key-0123456789",
                         "poll_interval_s": 0.1},
            "limits": {"enqueued_token_budget": 12_000, "max_tokens_per_batch": 3_000}}
    with RunContext(settings_factory(**over)) as ctx:
        targets = seed(ctx, 240, companies=4)
        halves = [Targets(companies=targets.companies[:2]), Targets(companies=targets.companies[2:])]
        # the first run fills the queue and returns: nobody drives it while the second runs
        first = runner.execute(ctx, EmbeddingsJob(ctx, halves[0]), wait=False)
        q = AccountQueue(ctx.staging, account_of(ctx.settings.provider), "text-embedding-3-small")
        held = sum(r.tokens for r in q.reservations())
        assert held > 6_000 and {r.run_id for r in q.reservations()} == {first["run_id"]}
        second = runner.execute(ctx, EmbeddingsJob(ctx, halves[1]))
        assert second["state"] == "finished"
        # the second run never crowded the first out: the server held at most its cap at any time
        assert max(enqueued) <= 12_000
        # before the first usage comes back, a refusal or two teach the provider's count; then none
        refused = second["final"]["queue"]["refusals"]
        assert refused <= 3, "the learned margin keeps refusals rare"
        done = runner.resume(ctx, first["run_id"])
        assert done["state"] == "finished"
        for info in (done, second):
            _, failures = assert_every_unit_settled_once(ctx, run_of(ctx, info))
            assert failures.height == 0
        assert done["final"]["results"] + second["final"]["results"] == 240
        assert q.reservations() == []  # everything released
        assert q.calibration().ratio == pytest.approx(1.05, rel=0.01)  # the provider's count, from usage
        assert "mean_fill_while_waiting" in second["final"]["queue"]


def test_a_resumed_run_takes_its_reservations_over(settings_factory: Any, provider: Any) -> None:
    server, _ = provider
    over = {"provider": {"base_url": server.base_url, "api_key": "sk-queue-test-key-0123456789",
                         "poll_interval_s": 0.1},
            "limits": {"enqueued_token_budget": 12_000, "max_tokens_per_batch": 3_000}}
    with RunContext(settings_factory(**over)) as ctx:
        targets = seed(ctx, 120, companies=2)
        first = runner.execute(ctx, EmbeddingsJob(ctx, targets), wait=False)
        q = AccountQueue(ctx.staging, account_of(ctx.settings.provider), "text-embedding-3-small")
        held = q.reservations()
        assert held and {r.run_id for r in held} == {first["run_id"]}
        # the markers vanish (a crashed driver's state is whatever it is): the resume restores them
        q.release(held)
        time.sleep(0.2)
        done = runner.resume(ctx, first["run_id"])
        assert done["state"] == "finished" and done["final"]["results"] == 120
        assert q.reservations() == []
