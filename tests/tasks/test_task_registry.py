"""Task discovery: modules with a TASK are found; unknown names raise TaskNotFound."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from batchyard.errors import ConfigError, TaskNotFound
from batchyard.tasks import InferenceTask, discover_tasks, get_task, list_tasks


def test_builtin_tasks_are_discovered() -> None:
    names = [t.name for t in list_tasks()]
    assert names == sorted(names)
    assert {"summary", "classify", "risks"} <= set(names)
    assert all(isinstance(t, InferenceTask) for t in list_tasks())


def test_get_task_returns_the_module_task() -> None:
    from batchyard.tasks import classify, risks, summary

    assert get_task("summary") is summary.TASK
    assert get_task("classify") is classify.TASK
    assert get_task("risks") is risks.TASK
    assert get_task("summary").unit == "document"
    assert get_task("summary").endpoint == "/v1/responses"
    assert get_task("classify").unit == "chunk"
    assert get_task("risks").endpoint == "/v1/chat/completions"


def test_unknown_task_raises_task_not_found_listing_names() -> None:
    with pytest.raises(TaskNotFound) as info:
        get_task("sumary")
    msg = str(info.value)
    assert "'sumary'" in msg
    for name in ("classify", "risks", "summary"):
        assert name in msg
    assert isinstance(info.value, KeyError)
    assert "summary" in info.value.known


def _make_package(root: Path, name: str, modules: dict[str, str]) -> None:
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for mod, source in modules.items():
        (pkg / f"{mod}.py").write_text(textwrap.dedent(source))


_TASK_SRC = """
from pydantic import BaseModel
from batchyard.tasks.base import InferenceTask

class Out(BaseModel):
    label: str

TASK = InferenceTask(name={name!r}, version="1", description="d", unit="chunk",
                     output_model=Out, prompt="x/v1.md")
"""


def test_new_module_is_discovered_without_touching_anything_else(tmp_path: Path) -> None:
    _make_package(
        tmp_path,
        "extra_tasks_ok",
        {
            "sentiment": _TASK_SRC.format(name="sentiment"),
            "helpers": "VALUE = 1\n",
            "_private": _TASK_SRC.format(name="hidden"),
        },
    )
    sys.path.insert(0, str(tmp_path))
    try:
        found = discover_tasks("extra_tasks_ok")
    finally:
        sys.path.remove(str(tmp_path))
    assert list(found) == ["sentiment"]
    assert found["sentiment"].unit == "chunk"


def test_duplicate_task_names_are_an_error(tmp_path: Path) -> None:
    _make_package(
        tmp_path,
        "extra_tasks_dup",
        {"a": _TASK_SRC.format(name="same"), "b": _TASK_SRC.format(name="same")},
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="defined twice"):
            discover_tasks("extra_tasks_dup")
    finally:
        sys.path.remove(str(tmp_path))


def test_task_definition_is_validated() -> None:
    from pydantic import BaseModel

    class Out(BaseModel):
        x: int

    with pytest.raises(ConfigError, match="must match"):
        InferenceTask(
            name="bad name",
            version="1",
            description="",
            unit="chunk",
            output_model=Out,
            prompt="p.md",
        )
    with pytest.raises(ConfigError, match="endpoint"):
        InferenceTask(
            name="ok",
            version="1",
            description="",
            unit="chunk",
            output_model=Out,
            prompt="p.md",
            endpoint="/v1/embeddings",
        )  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unit"):
        InferenceTask(
            name="ok",
            version="1",
            description="",
            unit="page",  # type: ignore[arg-type]
            output_model=Out,
            prompt="p.md",
        )
