"""The provider's enqueued-token limit: read from its refusals, remembered per provider and model.

A batch refused with `token_limit_exceeded` says what the limit is ("Enqueued token limit reached
for <model> in organization org-... Limit: 3,000,000 enqueued tokens. ..."). That limit, not the
configured `limits.enqueued_token_budget`, decides whether a shard can ever be queued. So:

- `stated_limit` reads it from the message (with or without thousands separators);
- `effective_cap` is what a shard must fit under: the lower of the stated limit and the budget
  (a user who configured less keeps less);
- `learn` / `learned_limits` remember it in run.json under `provider_limits`, keyed by provider
  (its base URL without credentials, or `embedded`) and model, so that the throttle and the
  re-planning of waiting shards use it, and a resumed run starts from it.

This is the one place that knows about learned limits: the account-wide queue (issue 20) takes
it over from here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from batchyard.storage.runs import utcnow

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from batchyard.settings import ProviderSettings
    from batchyard.storage.runs import RunStore

TOKEN_LIMIT_CODE = "token_limit_exceeded"

# "Limit: 3,000,000 enqueued tokens", "Limit: 30000 enqueued tokens", "limit of 2 000 000 tokens",
# "Limit: 1.5M enqueued tokens"
_LIMIT = re.compile(
    r"\blimit(?:\s+of)?\s*[:=]?\s*(?P<n>\d[\d,_'\u00a0\u202f .]*?)\s*(?P<unit>[kmb])?\s+(?:enqueued\s+)?tokens\b",
    re.IGNORECASE,
)
_SCALE = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def stated_limit(message: str | None) -> int | None:
    """The enqueued-token limit a refusal message states, or None when it states none."""
    m = _LIMIT.search(message or "")
    if m is None:
        return None
    digits = re.sub(r"[,_'\u00a0\u202f ]", "", m.group("n")).rstrip(".")
    unit = (m.group("unit") or "").lower()
    if digits.count(".") > 1 or (not unit and re.fullmatch(r"\d{1,3}\.\d{3}", digits)):
        digits = digits.replace(".", "")  # dots as thousands separators (3.000.000)
    try:
        value = float(digits) * _SCALE.get(unit, 1)
    except ValueError:
        return None
    return int(value) if value >= 1 else None


def refusal_limit(errors: Iterable[Mapping[str, Any]]) -> int | None:
    """The limit stated by the `token_limit_exceeded` error among a failed batch's errors."""
    for e in errors:
        if e.get("code") == TOKEN_LIMIT_CODE:
            found = stated_limit(str(e.get("message") or ""))
            if found is not None:
                return found
    return None


def effective_cap(budget: int, stated: int | None) -> int:
    """What one shard must fit under: the provider's stated limit, or the configured budget if lower."""
    return budget if stated is None else min(budget, stated)


def describe_cap(cap: int, budget: int, model: str) -> str:
    """Words for `cap`: which limit it is (for messages)."""
    if cap < budget:
        return f"the provider's stated limit of {cap:,} enqueued tokens for {model}"
    return f"limits.enqueued_token_budget ({budget:,} tokens)"


def provider_key(provider: ProviderSettings) -> str:
    """Who states the limit: `embedded`, or the base URL without credentials, query or fragment."""
    if provider.embedded:
        return "embedded"
    url = urlsplit(provider.base_url or "https://api.openai.com/v1")
    host = url.hostname or ""
    port = f":{url.port}" if url.port else ""
    org = f"#{provider.organization}" if provider.organization else ""
    return f"{url.scheme}://{host}{port}{url.path.rstrip('/')}{org}"


def learned_limits(run_info: Mapping[str, Any], provider: str) -> dict[str, int]:
    """Model -> the last limit `provider` stated, from run.json."""
    limits = run_info.get("provider_limits", {}).get(provider, {})
    return {model: int(v["enqueued_tokens"]) for model, v in limits.items()}


def learn(run: RunStore, provider: str, model: str, limit: int, *, shard: str) -> None:
    """Remember the limit `provider` stated for `model` (run.json `provider_limits`)."""
    info = run.read_run()
    known = info.get("provider_limits", {})
    entry = {"enqueued_tokens": limit, "learned_at": utcnow().isoformat(), "from_shard": shard}
    run.update_run(provider_limits={**known, provider: {**known.get(provider, {}), model: entry}})
