"""A check shared by the tests of the two flock users (the model store and the SQLite state's write lock)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def flock_is_held(path: Path) -> bool:
    """True when someone holds an flock on ``path``: a fresh open file description conflicts even in-process."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
