"""Prices per model, and cost estimates for both lanes (batch is half the real-time price).

The table holds OpenAI's published real-time prices in USD per million tokens; the Batch API
charges `batch_discount` of that (0.5). Add or override entries in settings
(`BATCHYARD_PRICING__MODELS='{"my-model": {"input_per_1m": 0.1}}'`): they are merged over the
defaults, so overriding one model keeps the others. A model missing from the table is priced
at zero and reported as `unpriced`, never guessed.

A plan's cost (`plan_cost`: dry runs and run summaries) counts its exact input tokens and, for
inference, `max_output_tokens` per request: an upper bound, since a model may stop earlier.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator


class ModelPrice(BaseModel):
    """Real-time price of one model, USD per million tokens."""

    input_per_1m: float = Field(ge=0, description="Input (prompt) tokens.")
    output_per_1m: float = Field(default=0.0, ge=0, description="Output (completion) tokens.")


DEFAULT_PRICES: dict[str, ModelPrice] = {
    "text-embedding-3-small": ModelPrice(input_per_1m=0.02),
    "text-embedding-3-large": ModelPrice(input_per_1m=0.13),
    "text-embedding-ada-002": ModelPrice(input_per_1m=0.10),
    "gpt-4.1": ModelPrice(input_per_1m=2.00, output_per_1m=8.00),
    "gpt-4.1-mini": ModelPrice(input_per_1m=0.40, output_per_1m=1.60),
    "gpt-4.1-nano": ModelPrice(input_per_1m=0.10, output_per_1m=0.40),
    "gpt-4o": ModelPrice(input_per_1m=2.50, output_per_1m=10.00),
    "gpt-4o-mini": ModelPrice(input_per_1m=0.15, output_per_1m=0.60),
    "gpt-5": ModelPrice(input_per_1m=1.25, output_per_1m=10.00),
    "gpt-5-mini": ModelPrice(input_per_1m=0.25, output_per_1m=2.00),
    "gpt-5-nano": ModelPrice(input_per_1m=0.05, output_per_1m=0.40),
    "o3": ModelPrice(input_per_1m=2.00, output_per_1m=8.00),
    "o4-mini": ModelPrice(input_per_1m=1.10, output_per_1m=4.40),
}


class PricingSettings(BaseModel):
    """Model prices for cost estimates (dry run, run summary, lane choice)."""

    models: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="Real-time USD per million tokens by model (defaults: OpenAI's list prices).",
    )
    batch_discount: float = Field(default=0.5, gt=0, le=1, description="Batch price as a share of real-time.")

    @field_validator("models", mode="after")
    @classmethod
    def _over_defaults(cls, models: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        """Configured entries are merged over the defaults (overriding one model keeps the rest)."""
        return {**DEFAULT_PRICES, **models}


def estimate(
    pricing: PricingSettings, model: str, *, input_tokens: int, output_tokens: int = 0
) -> dict[str, Any]:
    """Cost of the tokens on each lane: `{"model", "batch_usd", "realtime_usd", "priced"}`."""
    price = pricing.models.get(model)
    if price is None:
        return {"model": model, "batch_usd": 0.0, "realtime_usd": 0.0, "priced": False}
    realtime = (input_tokens * price.input_per_1m + output_tokens * price.output_per_1m) / 1e6
    return {
        "model": model,
        "batch_usd": round(realtime * pricing.batch_discount, 6),
        "realtime_usd": round(realtime, 6),
        "priced": True,
    }


def plan_cost(
    pricing: PricingSettings, model: str, *, input_tokens: int, requests: int = 0, max_output_tokens: int = 0
) -> dict[str, Any]:
    """Estimated cost of a plan: `estimate` plus the tokens it assumed.

    Output tokens are `requests * max_output_tokens` (inference; 0 for embeddings): the most
    the plan can produce, so the estimate is an upper bound on the output side.
    """
    output_tokens = requests * max_output_tokens
    return {
        **estimate(pricing, model, input_tokens=input_tokens, output_tokens=output_tokens),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    }


def usd(amount: float) -> str:
    """Money as people read it: fixed decimals (`$0.000033`, never `3.3e-05`), 6 of them, as the
    estimates are rounded (a millionth of a dollar)."""
    return f"${amount:,.6f}"


def figure(key: str, value: Any) -> str:
    """One summary figure as text: money (`*_usd` keys) with `usd`, other floats with fixed
    decimals, the rest as is."""
    if isinstance(value, float) and key.endswith("_usd"):
        return usd(value)
    if isinstance(value, float):
        return f"{value:,.3f}"
    return str(value)
