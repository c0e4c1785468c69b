"""`summary`: a structured analyst summary of one company document.

Unit: document (its chunks joined in order within the token budget). Endpoint: `/v1/responses`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from batchyard.tasks.base import RESPONSES, InferenceTask

TOutlook = Literal["positive", "neutral", "negative", "mixed", "not_stated"]


class KeyFigure(BaseModel):
    """One quantitative figure reported in the document."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="What the figure measures, as the document names it "
        "(e.g. 'Revenue', 'Adjusted EBITDA margin', 'Net debt')."
    )
    value: float = Field(
        description="The number exactly as reported, without thousands separators or symbols; "
        "scale and currency go in `unit` (12.4 with unit 'USD billion'). Negative only when "
        "the document reports a negative value or a loss."
    )
    unit: str = Field(
        description="Currency and scale, or the measure: 'EUR million', 'USD', '%', "
        "'percentage points', 'employees', 'tonnes CO2e', 'x'."
    )
    period: str | None = Field(
        description="Period or date the figure refers to, as stated: 'FY2024', 'Q3 2025', "
        "'H1 2024', 'as of 31 December 2024'. null when the document does not state it."
    )
    context: str = Field(
        description="One short phrase on what the figure shows, including any comparison the "
        "document gives (e.g. 'up 8% year on year, driven by pricing')."
    )


class DocumentSummary(BaseModel):
    """Analyst summary of one company document."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(
        description="3 to 6 sentences: what the document is, the main messages, the most "
        "important results or changes, and management's stated view."
    )
    key_figures: list[KeyFigure] = Field(
        max_length=15,
        description="The most decision-relevant figures stated in the text (at most 15); "
        "empty if the document reports none.",
    )
    outlook: TOutlook = Field(
        description="Tone of the forward-looking statements the company makes itself."
    )
    notable_events: list[str] = Field(
        max_length=10,
        description="Discrete events or decisions (acquisitions, disposals, guidance changes, "
        "management changes, restructurings, litigation, rating actions), one short sentence "
        "each; empty if none.",
    )


TASK = InferenceTask(
    name="summary",
    version="1",
    description="Document summary with key figures, outlook and notable events.",
    unit="document",
    endpoint=RESPONSES,
    prompt="summary/v1.md",
    output_model=DocumentSummary,
)
