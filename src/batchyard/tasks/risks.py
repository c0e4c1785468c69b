"""`risks`: risk factors and named entities in one chunk of a company document.

Unit: chunk. Endpoint: `/v1/chat/completions`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from batchyard.tasks.base import CHAT, InferenceTask

TRiskCategory = Literal[
    "market",
    "credit",
    "liquidity",
    "operational",
    "regulatory",
    "legal",
    "cybersecurity",
    "supply_chain",
    "geopolitical",
    "climate",
    "competition",
    "key_personnel",
    "other",
]
TLevel = Literal["low", "medium", "high"]
TLikelihood = Literal["low", "medium", "high", "not_stated"]
TEntityType = Literal["organization", "person", "location", "product", "regulation", "other"]


class RiskFactor(BaseModel):
    """One risk to the company described in the passage."""

    model_config = ConfigDict(extra="forbid")

    category: TRiskCategory = Field(description="The risk category that fits best.")
    description: str = Field(
        description="One sentence: the risk and how it could affect the company, in neutral "
        "words, using only what the passage says."
    )
    severity: TLevel = Field(
        description="Potential impact on the company if the risk materialises."
    )
    likelihood: TLikelihood = Field(
        description="How likely the passage says the risk is; not_stated when it gives no signal."
    )
    quote: str = Field(
        description="A short verbatim excerpt (at most about 30 words) from the passage that "
        "supports this risk, copied character for character."
    )


class Entity(BaseModel):
    """A named entity mentioned in the passage."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The name as written in the passage.")
    type: TEntityType = Field(description="The entity type.")


class RiskExtraction(BaseModel):
    """Risks and entities of one passage."""

    model_config = ConfigDict(extra="forbid")

    risk_factors: list[RiskFactor] = Field(
        max_length=10, description="Risks the passage describes (at most 10); empty if none."
    )
    entities: list[Entity] = Field(
        max_length=25,
        description="Distinct named entities in the passage (at most 25); empty if none.",
    )


TASK = InferenceTask(
    name="risks",
    version="1",
    description="Risk factors (category, severity, likelihood, quote) and entities per chunk.",
    unit="chunk",
    endpoint=CHAT,
    prompt="risks/v1.md",
    output_model=RiskExtraction,
)
