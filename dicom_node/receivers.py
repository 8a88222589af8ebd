"""Receive on several processes that share the node's port (``receive_processes`` in node.yaml).

One Python process receives at most what one interpreter lock lets through: pynetdicom's own per-message work
(about 4 ms per instance here) runs under the GIL, so a second or tenth association adds nothing (issue 10
measured 178, 176 and 129 instances/s with 1, 4 and 10 senders). With ``receive_processes: N`` the node starts
N - 1 receiver processes that listen on the same port with ``SO_REUSEPORT``; the kernel spreads new connections
over all N listeners. A receiver does exactly what the node's own C-STORE handler does (write, fsync, record in
the state database, then answer), and nothing else: completion, processing, sending and retention stay in the
node, which sees every instance through the shared database, as two nodes sharing PostgreSQL do.

What a receiver process does not do, and why that is safe:

- It does not wake the completion job or forward on receipt: the node's completion poll (``poll_interval_s``,
  1 s) finds a series completed through a receiver, and completion queues the original's forward in any case.
- It keeps no decoded copy for processing: the loader reads those instances from the spool.
- It does not evict finished series under disk pressure: the node's pressure job does (every 10 s); until then a
  receiver refuses with 0xA700 as a node does when nothing is left to evict.
- Its C-STORE counts are not in the node's ``/metrics`` (they are in its log and in the database).

Between processes, per-series exclusion (receiving an instance versus purging its series) is a ``flock`` on one
of a fixed set of lock files (:class:`SeriesFileLocks`); the state database serialises the rest (SQLite's
``BEGIN IMMEDIATE`` across processes, PostgreSQL's row locks). A receiver dies with the node (``PR_SET_PDEATHSIG``),
so a node killed with ``kill -9`` leaves no process holding its port, and an instance a receiver was writing when
it died was never acknowledged (the sender still has it; the orphan sweep removes the partial file at restart).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class SeriesFileLocks:
    """Per-series exclusion between processes: an exclusive ``flock`` on one of ``stripes`` lock files.

    Re-entrant per thread (the spool's in-process series lock is an RLock, and a purge may nest): a thread that
    holds a stripe takes it again without blocking on itself. ``flock`` locks belong to open file descriptions,
    so two threads of one process exclude each other too.
    """

    def __init__(self, directory: Path, stripes: int = 64) -> None:
        self.directory = directory
        self.stripes = stripes
        directory.mkdir(parents=True, exist_ok=True)
        self._held = threading.local()

    def _path(self, series_uid: str) -> Path:
        # A stable hash: every process must pick the same file for the same series (Python's hash() is salted).
        return self.directory / f"series-{zlib.crc32(series_uid.encode()) % self.stripes:02d}.lock"

    @contextlib.contextmanager
    def __call__(self, series_uid: str) -> Iterator[None]:
        held: dict[str, list[int]] = getattr(self._held, "fds", None) or {}
        self._held.fds = held
        path = str(self._path(series_uid))
        entry = held.get(path)
        if entry is not None:  # this thread holds it already
            entry[1] += 1
            try:
                yield
            finally:
                entry[1] -= 1
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held[path] = [fd, 1]
            try:
                yield
            finally:
                del held[path]
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def series_locks_for(settings: NodeSettings) -> SeriesFileLocks | None:
    """The cross-process series locks when the node receives on several processes; None otherwise."""
    if settings.receive_processes <= 1:
        return None
    return SeriesFileLocks(settings.data_dir / "locks")


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (kill -9 included). Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the node's stop() still ends receivers
        logger.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)


def _receiver_main(settings_json: str, index: int, parent_pid: int, log_level: str,
                   ready: Any) -> None:
    """A receiver process: the node's C-STORE/C-ECHO SCP on the node's ports, until SIGTERM."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the node died before the death signal was armed
        return
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)-7s %(name)s[receiver {index}]: "
                                                "%(message)s", force=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from dicom_node.handlers import ReceiveContext
    from dicom_node.scp import start_scp
    from dicom_node.spool import Spool
    from dicom_node.state import default_node_id, open_state

    settings = NodeSettings.model_validate_json(settings_json)
    # A plain flag: the handler may run while the main thread is inside a lock (threading.Event.set from a signal
    # handler can deadlock on the Event's own condition when signals arrive while it waits).
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us itself
    db = open_state(settings, node_id=f"{default_node_id(settings)}/r{index}")
    db.multi_process = True
    guard = db.series_lock if db.shared else series_locks_for(settings)
    spool = Spool(settings.data_dir, settings.disk, series_guard=guard)
    listeners = start_scp(settings, ReceiveContext(spool=spool, db=db), reuse_port=True)
    ready.set()
    logger.info("receiving on port %d%s (pid %d)", listeners.port,
                f" and TLS port {listeners.tls_port}" if listeners.tls_port else "", os.getpid())
    try:
        while not stopping and os.getppid() == parent_pid:  # the parent check: belt and braces beside the signal
            time.sleep(0.2)
        logger.info("stopping (%s)", "asked to" if stopping else "the node is gone")
    finally:
        listeners.shutdown()
        db.close()


class Receivers:
    """The node's extra receiver processes (``receive_processes - 1`` of them)."""

    def __init__(self, settings: NodeSettings, port: int, tls_port: int | None) -> None:
        # The receivers listen on the ports the node got (port 0 in tests: the node bound first).
        updates: dict[str, Any] = {"port": port}
        if tls_port is not None:
            updates["tls"] = settings.tls.model_copy(update={"port": tls_port})
        self.settings = settings.model_copy(update=updates)
        self._procs: list[Any] = []

    def start(self, count: int, timeout_s: float = 60.0) -> None:
        """Start ``count`` receivers and wait until each listens (a failure to start is the node's failure)."""
        ctx = multiprocessing.get_context("spawn")  # the node has threads: never fork it
        level = logging.getLevelName(logging.getLogger("dicom_node").getEffectiveLevel())
        pending = []
        for index in range(1, count + 1):
            ready = ctx.Event()
            proc = ctx.Process(target=_receiver_main, name=f"petnode-receiver-{index}", daemon=True,
                               args=(self.settings.model_dump_json(), index, os.getpid(), level, ready))
            proc.start()
            self._procs.append(proc)
            pending.append((proc, ready))
        for proc, ready in pending:
            if not ready.wait(timeout_s):
                self.stop()
                raise RuntimeError(f"receiver process {proc.name} did not start listening within {timeout_s:g} s "
                                   f"(exit code {proc.exitcode})")
        logger.info("%d receiver process(es) share port %d (receive_processes=%d)", count, self.settings.port,
                    count + 1)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def alive(self) -> int:
        return sum(1 for p in self._procs if p.is_alive())

    def stop(self, timeout_s: float = 10.0) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout_s)
            if proc.is_alive():  # pragma: no cover - a receiver stuck in a system call
                proc.kill()
                proc.join(timeout_s)
        self._procs.clear()
