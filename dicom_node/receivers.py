"""Receive on several processes (``receive_processes`` in node.yaml).

One Python process receives at most what one interpreter lock lets through: pynetdicom's own per-message work
(about 3 ms per instance here) runs under the GIL, so a second or tenth association adds nothing (issue 10
measured 178, 176 and 129 instances/s with 1, 4 and 10 senders). With ``receive_processes: N`` the node starts
N - 1 receiver processes. The node alone listens; for each connection it accepts, it keeps the connection when it
is the least busy process (ties go to the node) and otherwise hands the socket to the receiver with the fewest
connections (``SCM_RIGHTS`` over a Unix socket pair, :class:`Dispatcher`). So a lone scanner always talks to the
node, whose decoded cache saves loading its series again, and concurrent senders spread over the interpreters.
(The first version let the kernel spread connections over ``SO_REUSEPORT`` listeners, by hash: a lone scanner
landed on a receiver half the time, and the series then had to be read back from the spool.)

The board also counts negotiated associations, so ``max_connections`` and ``max_associations`` hold for all the
processes together (``scp.ConnectionGuard``); ``max_connections_per_host`` holds per process.

A receiver does exactly what the node's own C-STORE handler does (write, fsync, record in the state database,
then answer). What it would have done in the node besides, it asks the node to do over the same socket pair, as
hints that may be lost without harm (:func:`_hint`): wake completion when a series has all its slices and forward
on receipt (``Node.on_received``), count the C-STORE in ``/metrics``, and make room under disk pressure. If a
hint is lost, the node's polls find the same a moment later.

What a receiver does not do, and why that is safe:

- It keeps no decoded copy for processing: the loader reads those instances from the spool.
- It does not evict finished series itself: it asks the node, whose pressure job does (every 10 s in any case);
  until then a receiver refuses with 0xA700 as a node does when nothing is left to evict.

Between processes, per-series exclusion (receiving an instance versus purging its series) is a ``flock`` on one
of a fixed set of lock files (:class:`SeriesFileLocks`); the state database serialises the rest (SQLite's
``BEGIN IMMEDIATE`` across processes, PostgreSQL's row locks). A receiver dies with the node (``PR_SET_PDEATHSIG``
and the end of its socket pair), so a node killed with ``kill -9`` leaves no receiver behind, and an instance a
receiver was writing when it died was never acknowledged (the sender still has it; the orphan sweep removes the
partial file at restart). A receiver that dies while the node lives is skipped from then on (logged).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import multiprocessing
import os
import selectors
import signal
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
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
    if settings.receive_process_count <= 1:
        return None
    return SeriesFileLocks(settings.data_dir / "locks")


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (kill -9 included). Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the node's stop() still ends receivers
        logger.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)


class LoadBoard:
    """Connections in progress per receiving process (index 0: the node), shared by all of them.

    The node takes a place when it keeps or hands over a connection (:meth:`least_busy`); the process that
    handled it gives the place back when the connection ends (``GuardedAssociationServer.connection_ended``).
    """

    def __init__(self, ctx: Any, processes: int) -> None:
        self._counts = ctx.Array("i", processes)
        # Negotiated associations per process (under the same lock): max_associations holds for all together.
        self._associations = ctx.Array("i", processes, lock=False)

    def least_busy(self, candidates: Sequence[int]) -> int:
        """The candidate with the fewest connections (the first on a tie), counted as one more from now on."""
        with self._counts.get_lock():
            index = min(candidates, key=lambda i: (self._counts[i], i))
            self._counts[index] += 1
            return index

    def take(self, index: int) -> None:
        with self._counts.get_lock():
            self._counts[index] += 1

    def release(self, index: int) -> None:
        with self._counts.get_lock():
            # max(): a connection accepted before the board was attached was never counted
            self._counts[index] = max(0, self._counts[index] - 1)

    def counts(self) -> list[int]:
        with self._counts.get_lock():
            return list(self._counts)

    def connections(self) -> int:
        """Connections in progress in all the processes."""
        with self._counts.get_lock():
            return sum(self._counts)

    def admit_association(self, index: int, limit: int) -> int | None:
        """Count one more association for process ``index``; the number in progress instead when ``limit`` is
        reached in all the processes together."""
        with self._counts.get_lock():
            held = sum(self._associations)
            if held >= limit:
                return held
            self._associations[index] += 1
            return None

    def release_association(self, index: int) -> None:
        with self._counts.get_lock():
            self._associations[index] = max(0, self._associations[index] - 1)

    def forget(self, index: int) -> None:
        """Process ``index`` is gone: what it held is free again."""
        with self._counts.get_lock():
            self._counts[index] = 0
            self._associations[index] = 0


class Dispatcher:
    """The node's side: hands an accepted connection to the least busy receiver, or keeps it."""

    def __init__(self, board: LoadBoard, channels: list[socket.socket]) -> None:
        self.board = board
        self._channels: list[socket.socket | None] = list(channels)  # receiver i + 1; None once it is gone

    def forget(self, index: int) -> None:
        """Receiver ``index`` is gone: hand it nothing more."""
        self._channels[index - 1] = None

    def hand_over(self, request: socket.socket, address: Any, kind: str) -> bool:
        """True when a receiver took the connection (the caller then closes its descriptor); False: keep it."""
        alive = [0] + [i for i, channel in enumerate(self._channels, 1) if channel is not None]
        index = self.board.least_busy(alive)
        if index == 0:
            return False
        channel = self._channels[index - 1]
        message = json.dumps({"kind": kind, "address": [str(address[0]), int(address[1])]}).encode()
        try:
            assert channel is not None
            socket.send_fds(channel, [message], [request.fileno()], socket.MSG_DONTWAIT)
            return True
        except BlockingIOError:  # its queue is full (a receiver stalled): this one stays here
            logger.warning("receiver %d is not taking connections; the connection from %s stays in the node",
                           index, address[0])
        except OSError as exc:
            logger.warning("receiver %d is gone (%s); its share of connections stays in the node", index, exc)
            self.forget(index)
        self.board.release(index)
        self.board.take(0)
        return False


_HINT_RECEIVED, _HINT_STATUS, _HINT_PRESSURE = b"R", b"S", b"P"


def _hint(channel: socket.socket, message: bytes) -> None:
    """Tell the node something it may act on sooner than its polls would; never blocks a C-STORE."""
    try:
        channel.send(message, socket.MSG_DONTWAIT)
    except OSError:  # full or gone: the node's polls find the same (completion, pressure) a moment later
        logger.debug("hint to the node dropped", exc_info=True)


def take_connections(channel: socket.socket, listeners: Any, board: LoadBoard, index: int) -> None:
    """A receiver's loop: serve the connections the node hands over, until the node closes the socket pair."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 4096, 4)
        except OSError:
            return
        if not message and not fds:
            return  # the node is gone
        for extra in fds[1:]:  # pragma: no cover - the node sends one descriptor a message
            os.close(extra)
        if not fds:
            continue
        sock = socket.socket(fileno=fds[0])
        try:
            info = json.loads(message)
            address = (str(info["address"][0]), int(info["address"][1]))
            server = listeners.tls if info.get("kind") == "tls" else listeners.plain
            if server is None:
                raise ValueError(f"no {info.get('kind')} listener here")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            logger.error("a connection handed over could not be taken (%s); closed", exc)
            sock.close()
            board.release(index)
            continue
        try:
            request = server.wrap_accepted(sock)  # as the node's accept loop: TLS wrapped, handshake later
        except (OSError, ssl.SSLError) as exc:
            logger.warning("TLS connection from %s could not be set up: %s", address[0], exc)
            sock.close()
            board.release(index)
            continue
        if not server.verify_request(request, address):
            server.shutdown_request(request)
            board.release(index)
            continue
        try:
            server.process_request(request, address)
        except Exception:  # noqa: BLE001 - e.g. no thread could be started: this connection fails, the loop goes on
            logger.exception("connection from %s could not be served; closed", address[0])
            server.guard.close_connection(address[0], None)
            server.shutdown_request(request)
            board.release(index)


def _receiver_main(settings_json: str, index: int, parent_pid: int, log_level: str, ready: Any,
                   channel: socket.socket, board: LoadBoard) -> None:
    """A receiver process: the node's C-STORE/C-ECHO SCP for the connections the node hands it, until SIGTERM."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the node died before the death signal was armed
        return
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)-7s %(name)s[receiver {index}]: "
                                                "%(message)s", force=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from dicom_node import heap
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

    def received(series_uid: str, count_reached: bool = False) -> None:
        _hint(channel, _HINT_RECEIVED + (b"1" if count_reached else b"0") + series_uid.encode())

    def make_room() -> int:
        _hint(channel, _HINT_PRESSURE)
        return 0

    ctx = ReceiveContext(spool=spool, db=db, on_received=received, make_room=make_room,
                         metrics=lambda status: _hint(channel, _HINT_STATUS + struct.pack("!H", status & 0xFFFF)))
    listeners = start_scp(settings, ctx, handed=True)
    for server in listeners.servers:
        server.board, server.board_index = board, index
    listeners.guard.board, listeners.guard.board_index = board, index
    taker = threading.Thread(target=take_connections, args=(channel, listeners, board, index),
                             name=f"petnode-receiver-{index}-take", daemon=True)
    taker.start()
    heap.freeze_if_grown()  # as the node: its long-lived heap out of the garbage collector's full passes
    ready.set()
    logger.info("taking connections from the node (pid %d)", os.getpid())
    try:
        # the parent check and the socket pair: belt and braces beside the death signal
        while not stopping and os.getppid() == parent_pid and taker.is_alive():
            time.sleep(0.2)
        logger.info("stopping (%s)", "asked to" if stopping else "the node is gone")
    finally:
        listeners.shutdown()
        db.close()


class Receivers:
    """The node's extra receiver processes (``receive_processes - 1`` of them), the board that counts every
    process's connections, the dispatcher the node's listeners hand connections over with, and the thread that
    takes the receivers' hints to the node."""

    def __init__(self, settings: NodeSettings, *, on_received: Callable[[str, bool], None] | None = None,
                 on_status: Callable[[int], None] | None = None,
                 on_pressure: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._on_received, self._on_status, self._on_pressure = on_received, on_status, on_pressure
        self._procs: list[Any] = []
        self._channels: list[socket.socket] = []
        self.board: LoadBoard | None = None
        self.dispatcher: Dispatcher | None = None
        self._hints: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False

    def start(self, count: int, timeout_s: float = 60.0) -> None:
        """Start ``count`` receivers and wait until each is ready (a failure to start is the node's failure)."""
        ctx = multiprocessing.get_context("spawn")  # the node has threads: never fork it
        level = logging.getLevelName(logging.getLogger("dicom_node").getEffectiveLevel())
        self.board = LoadBoard(ctx, count + 1)
        pending = []
        for index in range(1, count + 1):
            ready = ctx.Event()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            proc = ctx.Process(target=_receiver_main, name=f"petnode-receiver-{index}", daemon=True,
                               args=(self.settings.model_dump_json(), index, os.getpid(), level, ready, theirs,
                                     self.board))
            proc.start()
            theirs.close()  # the receiver has its own copy now; ours sees EOF when it dies
            self._procs.append(proc)
            self._channels.append(ours)
            pending.append((proc, ready))
        for proc, ready in pending:
            if not ready.wait(timeout_s):
                self.stop()
                raise RuntimeError(f"receiver process {proc.name} did not start within {timeout_s:g} s "
                                   f"(exit code {proc.exitcode})")
        self.dispatcher = Dispatcher(self.board, self._channels)
        self._selector = selectors.DefaultSelector()
        for index, channel in enumerate(self._channels, 1):
            self._selector.register(channel, selectors.EVENT_READ, index)
        self._selector.register(self._wake_r, selectors.EVENT_READ, 0)
        self._hints = threading.Thread(target=self._take_hints, name="petnode-receiver-hints", daemon=True)
        self._hints.start()
        logger.info("%d receiver process(es) take connections the node hands over (receive_processes=%d)", count,
                    count + 1)

    def attach(self, servers: Sequence[Any]) -> None:
        """Let the node's listeners hand connections over and count their own on the board."""
        for server in servers:
            server.board, server.board_index = self.board, 0
            server.guard.board, server.guard.board_index = self.board, 0
            server.dispatcher = self.dispatcher

    def _take_hints(self) -> None:
        """What the receivers ask of the node: run the node's own on-receipt, metrics and pressure work."""
        selector = self._selector
        assert selector is not None
        while True:
            for key, _ in selector.select():
                index = key.data
                if index == 0:  # stop() woke us
                    return
                try:
                    message = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    message = b""
                if not message:
                    selector.unregister(key.fileobj)
                    if self.dispatcher is not None:
                        self.dispatcher.forget(index)
                    if self.board is not None:
                        self.board.forget(index)
                    if not self._stopping:
                        logger.warning("receiver process %d is gone; its share of connections stays in the node",
                                       index)
                    continue
                self._hint(message)

    def _hint(self, message: bytes) -> None:
        kind, rest = message[:1], message[1:]
        try:
            if kind == _HINT_RECEIVED and self._on_received is not None:
                self._on_received(rest[1:].decode(), rest[:1] == b"1")
            elif kind == _HINT_STATUS and self._on_status is not None and len(rest) == 2:
                self._on_status(struct.unpack("!H", rest)[0])
            elif kind == _HINT_PRESSURE and self._on_pressure is not None:
                self._on_pressure()
        except Exception:  # noqa: BLE001 - a hint: the node's polls do the same later
            logger.exception("a receiver's hint (%r) could not be acted on", kind)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def alive(self) -> int:
        return sum(1 for p in self._procs if p.is_alive())

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout_s)
            if proc.is_alive():  # pragma: no cover - a receiver stuck in a system call
                proc.kill()
                proc.join(timeout_s)
        self._procs.clear()
        if self._hints is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._hints.join(timeout_s)
            self._hints = None
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._wake_r.close()
        self._wake_w.close()
