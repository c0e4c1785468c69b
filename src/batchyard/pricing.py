"""Prices per model, and cost estimates for both lanes (batch is half the real-time price).

The table holds OpenAI's published real-time prices in USD per million tokens; the Batch API
charges `batch_discount` of that (0.5). Override any entry in settings
(`BATCHYARD_PRICING__MODELS='{"my-model": {"input_per_1m": 0.1}}'`). A model missing from the
table is priced at zero and reported as `unpriced`, never guessed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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
}


class PricingSettings(BaseModel):
    """Model prices for cost estimates (dry run, run summary, lane choice)."""

    models: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="Real-time USD per million tokens by model (defaults: OpenAI's list prices).",
    )
    batch_discount: float = Field(default=0.5, gt=0, le=1, description="Batch price as a share of real-time.")


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
