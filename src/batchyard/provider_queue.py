"""The provider's queue: one token reservation per account and model, shared by every run.

An organisation's Batch API queue holds at most so many enqueued tokens per model (and, for
embeddings, so many enqueued requests); every run and worker that uses the account shares it.
So reservations live where they all see them, under the staging root (local or S3):

```
<root>/_queue/<account>/<model>/
  r/<expires>_<tokens>_<requests>_<attempt>.json   one marker per shard attempt in flight
  calibration.json                                 the provider's cap and its token count vs ours
  lease.json                                       held while a driver admits shard attempts
```

- A shard attempt **reserves** its tokens before its upload and batch create (admission runs
  under the lease: list the markers, decide, write the new ones), and **releases** them when it
  leaves flight (its batch ended, or it was refused). The numbers are in the marker's name, so
  the whole queue is read with one listing, no file reads.
- **Recovery.** A driver syncs its own attempts' markers every round (an attempt in flight
  without a marker gets one, a marker of an attempt no longer in flight is dropped), so a run
  resumed after a crash takes its reservations over. Markers of runs that ended are dropped by
  anyone; a marker of a run no process drives is dropped once its ledger record is no longer in
  flight, or its batch is terminal at the provider; none outlives the completion window
  (`expires`).
- **The provider's count.** The provider counts tokens its own way. Each completed batch's
  reported usage against our exact count gives a ratio; admission counts our tokens times the
  highest recent ratio, so refusals are rare. A refusal states the cap (`batchyard.quota`), which
  replaces the configured budget when lower, and raises the ratio so that the refused state is
  no longer admissible: the refused shard goes back to the queue and is admitted as soon as
  capacity frees (the next terminal batch), not after a fixed backoff.

Why not Prefect's global concurrency limits: they exist only with a Prefect server (the
embedded default has none), count slots rather than tokens with an owner, and their leases do
not say which batch holds what; the staging root is shared by every process that can run a
batch, and a marker names the exact shard attempt (so status, recovery and audit can follow it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from batchyard.errors import RunBusy
from batchyard.storage.runs import _Lease, utcnow

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from batchyard.settings import ProviderSettings
    from batchyard.storage.ledger import ShardRecord
    from batchyard.storage.staging import Staging

log = logging.getLogger(__name__)

ROOT = "_queue"
WINDOW_S = 26 * 3600.0
"""A marker outlives its batch's 24 h completion window by 2 h at most."""
LEASE_TTL_S = 60.0
OBSERVATIONS = 20
MARGIN = 0.01
"""Admission keeps this share of the cap free on top of the learned ratio."""
MAX_STEP = 0.10
"""The most one refusal raises the learned ratio (by this share of it)."""
MAX_REFUSAL_RATIO = 1.25
"""The highest ratio refusals alone may teach (reported usage may show a higher one)."""


def account_of(provider: ProviderSettings) -> str:
    """Who owns a queue: the embedded server, or a provider URL with its organisation, or a short
    hash of the API key when no organisation is set (never the key)."""
    from batchyard.quota import provider_key

    key = provider_key(provider)
    if key != "embedded" and not provider.organization and provider.api_key is not None:
        digest = hashlib.sha256(provider.api_key.get_secret_value().encode()).hexdigest()[:10]
        key += f"#key-{digest}"
    return key


def _segment(value: str) -> str:
    return quote(value, safe="-_.@+=,")


@dataclass(frozen=True)
class Reservation:
    """One shard attempt's hold on the queue (parsed from its marker's name)."""

    key: str
    tokens: int
    requests: int
    expires: float

    @property
    def run_id(self) -> str:
        return self.key.split("~", 1)[0]

    @property
    def name(self) -> str:
        return f"{int(self.expires)}_{self.tokens}_{self.requests}_{quote(self.key, safe='')}.json"

    @classmethod
    def parse(cls, name: str) -> Reservation | None:
        try:
            expires, tokens, requests, key = name.removesuffix(".json").split("_", 3)
            return cls(unquote(key), int(tokens), int(requests), float(expires))
        except ValueError:
            return None


def attempt_key(rec: ShardRecord) -> str:
    """`<run>~<partition>~<shard>.<attempt>~<submission>`: one submission of one shard attempt."""
    return f"{rec.run_id}~{rec.partition}~{rec.name}~{rec.submission}"


@dataclass
class Calibration:
    """What we learned about the provider's queue for one model."""

    cap: int | None = None
    """The enqueued-token cap the provider stated (None: not stated yet)."""
    ratio: float = 1.0
    """Provider tokens per token of ours, as admission counts them."""
    observations: tuple[float, ...] = ()
    refusals: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"cap": self.cap, "ratio": self.ratio, "observations": list(self.observations),
                "refusals": self.refusals, "updated_at": utcnow().isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(cap=data.get("cap"), ratio=float(data.get("ratio", 1.0)),
                   observations=tuple(float(x) for x in data.get("observations", [])),
                   refusals=int(data.get("refusals", 0)))


class AccountQueue:
    """The reservations of one provider account and model."""

    def __init__(self, staging: Staging, account: str, model: str) -> None:
        self.staging = staging
        self.account = account
        self.model = model
        self.prefix = f"{ROOT}/{_segment(account)}/{_segment(model)}"
        self._lease = _Lease(staging, self.rel("lease.json"), f"queue {account} {model}")

    def rel(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    # ------------------------------------------------------------------ reservations

    def reservations(self, *, now: float | None = None) -> list[Reservation]:
        """Every live reservation (expired markers are dropped on the way)."""
        now = time.time() if now is None else now
        out = []
        for name in self.staging.list(self.rel("r"), ".json"):
            res = Reservation.parse(name)
            if res is None:
                continue
            if res.expires < now:
                self.staging.delete(self.rel("r", name))
                continue
            out.append(res)
        return out

    def reserve(self, recs: Iterable[ShardRecord], *, now: float | None = None) -> list[Reservation]:
        """Write a marker for each shard attempt (idempotent)."""
        now = time.time() if now is None else now
        made = []
        for rec in recs:
            start = rec.created_at or now
            res = Reservation(attempt_key(rec), rec.tokens, rec.n_requests, start + WINDOW_S)
            self.staging.write_json(self.rel("r", res.name), {"key": res.key, "batch_id": rec.batch_id,
                                                              "reserved_at": utcnow().isoformat()})
            made.append(res)
        return made

    def release(self, held: Iterable[Reservation]) -> None:
        """Drop reservations (their attempts left flight)."""
        for res in held:
            self.staging.delete(self.rel("r", res.name))

    @contextmanager
    def admission(self, owner: str, *, wait_s: float = 120.0) -> Iterator[None]:
        """Hold the queue's lease while deciding what to admit (short: a listing and a few writes)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._lease.claim(owner, LEASE_TTL_S)
                break
            except RunBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        try:
            yield
        finally:
            self._lease.release(owner)

    # ------------------------------------------------------------------ calibration

    def calibration(self) -> Calibration:
        rel = self.rel("calibration.json")
        try:
            return Calibration.from_json(dict(self.staging.read_json(rel))) if self.staging.exists(rel) else Calibration()
        except (FileNotFoundError, ValueError):
            return Calibration()

    def _save(self, cal: Calibration) -> Calibration:
        self.staging.write_json(self.rel("calibration.json"), cal.to_json())
        return cal

    def observe_usage(self, provider_tokens: int, our_tokens: int) -> Calibration:
        """A completed batch: the provider counted `provider_tokens` for our `our_tokens`."""
        if our_tokens <= 0 or provider_tokens <= 0:
            return self.calibration()
        cal = self.calibration()
        obs = (*cal.observations, provider_tokens / our_tokens)[-OBSERVATIONS:]
        cal.observations = obs
        cal.ratio = max(1.0, max(obs))  # the usage says what the provider counts: refusal bumps end here
        return self._save(cal)

    def observe_refusal(self, cap: int | None, reserved: int, tokens: int) -> Calibration:
        """A batch of `tokens` (ours) was refused while `reserved` (ours) were in flight."""
        cal = self.calibration()
        cal.refusals += 1
        if cap is not None:
            cal.cap = cap
        if cal.cap and reserved + tokens > 0 and (reserved + tokens) * cal.ratio * (1 + MARGIN) <= cal.cap:
            # we thought it fit: the provider counts more than we do, or holders we cannot see
            # (another tool of the organisation) hold some. Counts differ by a few per cent, so
            # one refusal moves the ratio by at most MAX_STEP: a foreign holder of half the
            # queue must not make every later shard half its size (reported usage resets it),
            # and refusals alone never raise it past MAX_REFUSAL_RATIO: a quota that others
            # hold for hours would otherwise shrink the shards, then fail units as unfittable
            needed = cal.cap / ((reserved + tokens) * (1 + MARGIN)) * 1.01
            raised = max(cal.ratio * 1.02, min(needed, cal.ratio * (1 + MAX_STEP)))
            cal.ratio = max(cal.ratio, min(raised, max((MAX_REFUSAL_RATIO, *cal.observations))))
        return self._save(cal)


def cap_of(budget: int, cal: Calibration) -> int:
    """The cap admission keeps under: the configured budget, or the stated cap if lower."""
    return budget if cal.cap is None else min(budget, cal.cap)


def fits(reserved: int, tokens: int, cap: int, ratio: float) -> bool:
    """Whether `tokens` more fit under `cap` in the provider's count (`ratio`, with a margin)."""
    return (reserved + tokens) * ratio * (1 + MARGIN) <= cap


def mean_fill(samples: Any) -> dict[str, Any]:
    """The queue's time-weighted mean fill while the run had work waiting (a Polars frame of
    `queue.parquet` rows: t, reserved_tokens, cap_tokens, run_waiting_tokens).

    Each interval between two samples counts with the first sample's state; fill is the share
    of the cap the account's batches held (in the provider's count), at most 1.
    """
    import polars as pl

    if samples is None or samples.height < 2:
        return {}
    frame = samples.sort("t").with_columns(
        dt=pl.col("t").shift(-1) - pl.col("t"),
        fill=(pl.col("reserved_tokens") / pl.col("cap_tokens").clip(lower_bound=1)).clip(upper_bound=1.0),
    ).filter(pl.col("dt").is_not_null())
    waiting = frame.filter(pl.col("run_waiting_tokens") > 0)
    seconds = float(waiting["dt"].sum() or 0.0)
    out: dict[str, Any] = {"seconds_waiting": round(seconds, 1), "cap_tokens": int(frame["cap_tokens"].max() or 0)}
    if seconds > 0:
        out["mean_fill_while_waiting"] = round(float((waiting["fill"] * waiting["dt"]).sum()) / seconds, 4)
    busy = frame.filter(pl.col("reserved_tokens") > 0)
    if busy.height:
        out["peak_fill"] = round(float(busy["fill"].max() or 0.0), 4)
    return out


def accounts(staging: Staging) -> list[dict[str, Any]]:
    """Every account and model with a queue under the staging root: reservations against the cap."""
    out = []
    for account in staging.list_dirs(ROOT):
        for model in staging.list_dirs(f"{ROOT}/{account}"):
            q = AccountQueue(staging, unquote(account), unquote(model))
            held = q.reservations()
            cal = q.calibration()
            out.append({"account": q.account, "model": q.model, "reservations": len(held),
                        "tokens": sum(r.tokens for r in held), "requests": sum(r.requests for r in held),
                        "provider_tokens": int(sum(r.tokens for r in held) * cal.ratio), "ratio": round(cal.ratio, 4),
                        "stated_cap": cal.cap, "refusals": cal.refusals,
                        "runs": sorted({r.run_id for r in held})})
    return out
