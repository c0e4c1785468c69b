"""Automatic discovery of inference tasks.

Every non-private module directly inside the `batchyard.tasks` package that defines a
module-level `TASK` (an `InferenceTask`) is a task. Adding a task means adding a module and its
prompt file; nothing else changes. Modules without `TASK` (base, prompts, units, this one) are
skipped.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from batchyard.errors import ConfigError, TaskNotFound
from batchyard.tasks.base import InferenceTask

TASKS_PACKAGE = "batchyard.tasks"


def discover_tasks(package: str = TASKS_PACKAGE) -> dict[str, InferenceTask]:
    """Import every module of `package` and collect their `TASK`s, by name (sorted).

    Raises:
        ConfigError: a `TASK` is not an `InferenceTask`, or two modules use the same name.
    """
    pkg = importlib.import_module(package)
    found: dict[str, tuple[str, InferenceTask]] = {}
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        task = getattr(module, "TASK", None)
        if task is None:
            continue
        if not isinstance(task, InferenceTask):
            raise ConfigError(f"{info.name}.TASK is {type(task).__name__}, not an InferenceTask")
        if task.name in found:
            raise ConfigError(
                f"task name {task.name!r} is defined twice: {found[task.name][0]} and {info.name}"
            )
        found[task.name] = (info.name, task)
    return {name: found[name][1] for name in sorted(found)}


@cache
def _registry() -> dict[str, InferenceTask]:
    return discover_tasks()


def list_tasks() -> list[InferenceTask]:
    """Every registered task, sorted by name."""
    return list(_registry().values())


def get_task(name: str) -> InferenceTask:
    """The task called `name`.

    Raises:
        TaskNotFound: no such task (the message lists the known names).
    """
    tasks = _registry()
    try:
        return tasks[name]
    except KeyError:
        raise TaskNotFound(name, list(tasks)) from None
