"""Fixtures for the inference task tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from task_helpers import REPO_PROMPTS

from batchyard.tasks import resolve_prompts_dir


@pytest.fixture
def prompts_dir() -> Path:
    """The repository's prompts directory."""
    path = resolve_prompts_dir(str(REPO_PROMPTS))
    assert path.is_dir()
    return path


@pytest.fixture
def tmp_prompts(tmp_path: Path) -> Path:
    """A writable copy of the repository's prompts directory."""
    dest = tmp_path / "prompts"
    shutil.copytree(REPO_PROMPTS, dest)
    return dest
