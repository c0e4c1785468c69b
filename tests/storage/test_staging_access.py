"""Local staging is owner-only (issue 18.6): after real runs under a 022 umask, nothing in the
staging root (run files, the MongoDB stand-in, Milvus Lite's data, the embedded server's state)
is readable by other users; with `staging.group`, the group may read and nobody else."""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchyard import runner
from batchyard.context import RunContext
from batchyard.errors import ConfigError
from batchyard.jobs.embeddings import EmbeddingsJob
from batchyard.jobs.inference import InferenceJob
from batchyard.storage.perms import Access
from tests.helpers import seed


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most shells have: without care, files come out 0644 and folders 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def walk(root: Path) -> list[tuple[Path, int, int]]:
    """(path, mode, gid) of the root and of everything below it."""
    out = [(root, stat.S_IMODE(root.stat().st_mode), root.stat().st_gid)]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out.append((p, stat.S_IMODE(st.st_mode), st.st_gid))
    return out


def run_both_jobs(settings: Any) -> None:
    with RunContext(settings) as ctx:
        targets = seed(ctx, 30)
        for job in (EmbeddingsJob(ctx, targets), InferenceJob(ctx, targets, "classify")):
            assert runner.execute(ctx, job)["state"] == "finished"


def test_after_a_run_nothing_in_staging_is_open_to_other_users(settings_factory: Any, tmp_path: Path,
                                                               usual_umask: None) -> None:
    run_both_jobs(settings_factory(limits={"max_inputs_per_batch": 10, "max_inputs_per_request": 5}))
    entries = walk(tmp_path / "staging")
    kinds = {p.relative_to(tmp_path / "staging").parts[0] for p, _, _ in entries[1:]}
    # the whole staging root: run folders, the stand-in, Milvus Lite's data, the server's state
    assert {"embeddings", ".mongo-standin", "milvus.db", ".localapi"} <= kinds, kinds
    assert len(entries) > 100
    open_to_others = [(str(p), oct(m)) for p, m, _ in entries if m & 0o077 and not p.is_socket()]
    assert open_to_others == []


def test_with_a_group_the_group_reads_and_nobody_else(settings_factory: Any, tmp_path: Path,
                                                      usual_umask: None) -> None:
    group = grp.getgrgid(os.getgid()).gr_name  # a group this user is in, without root
    run_both_jobs(settings_factory(staging={"root": str(tmp_path / "staging"), "group": group}))
    for path, mode, gid in walk(tmp_path / "staging"):
        rel = path.relative_to(tmp_path)
        assert mode & 0o007 == 0, (str(rel), oct(mode))  # never other users
        if {".localapi", ".milvus-lite"} & set(rel.parts[1:-1]) or rel.name == ".milvus-lite":
            assert mode & 0o077 == 0, (str(rel), oct(mode))  # the server's state and the socket stay private
            continue
        assert gid == os.getgid()
        if path.is_dir():
            assert mode == 0o2750, (str(rel), oct(mode))
        elif not path.is_socket() and "milvus.db" not in rel.parts:
            assert mode == 0o640, (str(rel), oct(mode))


def test_an_unknown_group_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchyard.settings import load_settings

    with pytest.raises(ConfigError, match=r"staging\.group 'no-such-group-here': no such group"):
        Access.for_group("no-such-group-here")
    monkeypatch.setenv("BATCHYARD_STAGING__GROUP", "no-such-group-here")
    with pytest.raises(ConfigError, match=r"invalid setting staging\.group \(BATCHYARD_STAGING__GROUP\): "
                                          r"staging\.group 'no-such-group-here': no such group on this machine"):
        load_settings()
