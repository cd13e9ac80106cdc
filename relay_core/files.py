"""The data directory's permissions: what it holds is private to the relay's user.

The databases hold addresses and subjects in clear. SQLite gives -wal and -shm
the database file's mode, so creating it 0600 first covers all three. An
existing directory is the operator's (it may be shared on purpose): its mode is
left alone.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger("relay.files")
SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700 when it does not exist; never touch an existing one."""
    if path.is_dir():
        return
    path.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def private_database(path: Path) -> None:
    """Make the database file (created empty if missing) and its side files 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for candidate in (path, *(path.with_name(path.name + suffix) for suffix in SIDE_FILES)):
        try:
            mode = stat.S_IMODE(candidate.stat().st_mode)
            if mode & 0o077:
                os.chmod(candidate, mode & 0o700)
        except FileNotFoundError:
            continue
        except PermissionError:
            logger.warning("%s is readable by other users and cannot be changed (not our file)", candidate)
