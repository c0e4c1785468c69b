"""Who may read local staging: the owner only (the default), or the owner and one group.

Why: staging holds every chunk text, request line and model output, and files written with the
usual umask (0644 in 0755 folders) were readable by every local user. So every folder batchyard
creates under a local staging root is 0700 and every file 0600, whatever the umask; with
`staging.group` set, folders are 2750 (setgid, so what is created in them keeps the group) and
files 0640, owned by that group.

Writers that are not `Staging` (the MongoDB stand-in, Milvus Lite's child process) follow the
folder they write in: `file_mode_in(folder)` and `umask_for(folder)` derive the file mode and
umask from the folder's own mode, so they need no setting of their own.
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from batchyard.errors import ConfigError

OWNER_DIR, OWNER_FILE = 0o700, 0o600
GROUP_DIR, GROUP_FILE = 0o2750, 0o640


@dataclass(frozen=True)
class Access:
    """The modes (and group) of what batchyard creates in local staging."""

    dir_mode: int = OWNER_DIR
    file_mode: int = OWNER_FILE
    gid: int | None = None

    @classmethod
    def for_group(cls, group: str | None) -> Access:
        """Owner-only without a group; group-readable for a group name or number.

        Raises:
            ConfigError: no such group.
        """
        if not group:
            return cls()
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"staging.group {group!r}: no such group on this machine") from None
        return cls(GROUP_DIR, GROUP_FILE, gid)

    def makedirs(self, path: Path) -> Path:
        """Create `path` and its missing parents with this access; existing folders are left
        as they are (an existing staging root keeps its mode)."""
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder, self.dir_mode & 0o777)
            except FileExistsError:
                continue  # another process made it meanwhile
            self.apply(folder, self.dir_mode)
        return path

    def apply(self, path: Path | str, mode: int | None = None) -> None:
        """Give a file (or, with `mode`, a folder) this access, whatever the umask made it."""
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        os.chmod(path, self.file_mode if mode is None else mode)  # after chown, which may clear setgid


def file_mode_in(folder: Path) -> int:
    """The mode for a file created in `folder`: its read and write bits for owner and group
    (0700 -> 0600, 2750 -> 0640)."""
    return stat.S_IMODE(folder.stat().st_mode) & 0o660


def umask_for(folder: Path) -> int:
    """A umask under which a process creates what `folder` allows and no more (0700 -> 077)."""
    return ~stat.S_IMODE(folder.stat().st_mode) & 0o777


def fit_to_folder(path: Path | str) -> None:
    """chmod a new file to the access of the folder it is in (the group comes with setgid)."""
    os.chmod(path, file_mode_in(Path(path).parent))
