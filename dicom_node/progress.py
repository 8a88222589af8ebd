"""A derived series being written, for sends that start before its last file is there.

The writer adds each file once it is complete under its final name; a sender takes what is there and waits for
more until the writer is done (or failed). Sending thus overlaps writing, and the association stays open across
the whole series (``docs/bench/data-path.md``).

Why the files go out before the series is flushed to disk: derived files are rebuilt from the spool after a crash
(their UIDs are deterministic), and what a destination acknowledged is recorded per instance, so a crash between
a send and the flush costs nothing but the rewrite; a derived file is not the only copy of anything.
"""

from __future__ import annotations

import threading
from pathlib import Path


class WriteProgress:
    """Files of one derived series as they are written; thread-safe."""

    def __init__(self) -> None:
        self._files: list[Path] = []
        self._done = False
        self.error: str | None = None
        self._cond = threading.Condition()

    def add(self, path: Path) -> None:
        with self._cond:
            self._files.append(path)
            self._cond.notify_all()

    def finish(self, error: str | None = None) -> None:
        """The writer is done (``error``: why it stopped before the end)."""
        with self._cond:
            if not self._done:
                self._done, self.error = True, error
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._done

    def files(self) -> list[Path]:
        with self._cond:
            return list(self._files)

    def wait_beyond(self, known: int, stop: threading.Event | None = None, poll_s: float = 1.0) -> list[Path]:
        """The files once there are more than ``known`` or the writer is done (or ``stop`` is set)."""
        with self._cond:
            while len(self._files) <= known and not self._done and not (stop is not None and stop.is_set()):
                self._cond.wait(poll_s)
            return list(self._files)


class Follow:
    """``more()`` for a send that follows a writer: each call returns the full list once it has grown."""

    def __init__(self, progress: WriteProgress, known: int, stop: threading.Event | None) -> None:
        self.progress, self.known, self.stop = progress, known, stop

    def __call__(self) -> list[Path]:
        files = self.progress.wait_beyond(self.known, self.stop)
        self.known = len(files)
        return files
