"""`classify`: section type and topics of one chunk of a company document.

Unit: chunk. Endpoint: `/v1/chat/completions`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from batchyard.tasks.base import CHAT, InferenceTask

TSectionType = Literal[
    "financial_results",
    "guidance",
    "risk_factors",
    "business_overview",
    "legal_proceedings",
    "governance",
    "esg",
    "market_conditions",
    "capital_allocation",
    "boilerplate",
    "other",
]

TTopic = Literal[
    "revenue",
    "profitability",
    "costs",
    "cash_flow",
    "debt_financing",
    "liquidity",
    "capital_expenditure",
    "shareholder_returns",
    "mergers_acquisitions",
    "forward_guidance",
    "products_services",
    "customers_demand",
    "pricing",
    "supply_chain",
    "workforce",
    "management_leadership",
    "regulation_compliance",
    "litigation",
    "cybersecurity_data",
    "climate_environment",
    "social_responsibility",
    "board_governance",
    "macroeconomy",
    "competition",
    "geographic_markets",
    "technology_innovation",
    "accounting_audit",
    "other",
]


class ChunkClassification(BaseModel):
    """What kind of passage a chunk is and what it is about."""

    model_config = ConfigDict(extra="forbid")

    section_type: TSectionType = Field(
        description="The single best section type for the passage as a whole."
    )
    topics: list[TTopic] = Field(
        min_length=1,
        max_length=5,
        description="1 to 5 topics the passage substantively discusses, most important first.",
    )
    confidence: float = Field(ge=0, le=1, description="Confidence in section_type, from 0 to 1.")
    rationale: str = Field(
        description="One short sentence naming the evidence in the text for the labels."
    )

    @field_validator("topics")
    @classmethod
    def _dedupe(cls, topics: list[str]) -> list[str]:
        return list(dict.fromkeys(topics))


TASK = InferenceTask(
    name="classify",
    version="1",
    description="Section type and topics of each chunk.",
    unit="chunk",
    endpoint=CHAT,
    prompt="classify/v1.md",
    output_model=ChunkClassification,
)
