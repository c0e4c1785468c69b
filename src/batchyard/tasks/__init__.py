"""Inference tasks: one module per task (a module-level `TASK`), found automatically.

Public API: `get_task`, `list_tasks`, `InferenceTask`, `ParseOutcome`, `build_units`,
`resolve_prompts_dir`.
"""

from batchyard.tasks.base import (
    PARSE_STATUSES,
    InferenceTask,
    ParseOutcome,
    TEndpoint,
    TParseStatus,
    TUnit,
    Usage,
)
from batchyard.tasks.prompts import PromptError, load_prompt, resolve_prompts_dir
from batchyard.tasks.registry import discover_tasks, get_task, list_tasks
from batchyard.tasks.units import UNITS, build_units

__all__ = [
    "PARSE_STATUSES",
    "UNITS",
    "InferenceTask",
    "ParseOutcome",
    "PromptError",
    "TEndpoint",
    "TParseStatus",
    "TUnit",
    "Usage",
    "build_units",
    "discover_tasks",
    "get_task",
    "list_tasks",
    "load_prompt",
    "resolve_prompts_dir",
]
