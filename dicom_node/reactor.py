"""Event-driven waits for pynetdicom's two polling reactors (issue 10: receive and send latency).

pynetdicom 3.0 runs two threads per association that poll: the DUL thread (socket and outgoing primitives)
sleeps 1 ms whenever a loop found nothing to do, and the association thread (incoming DIMSE messages, release,
abort, and pausing for a ``send_*`` call) sleeps 1 ms on every loop. On one association, where the sender waits
for each C-STORE response before it sends the next instance, those sleeps are latency on every message: the
request waits for the DUL to wake, the complete message for the association thread, the response for the DUL
again; a sender also waits for its own association thread to pause. They were about a quarter of the time per
instance received and per instance sent (docs/bench/data-path.md).

:func:`enable` keeps pynetdicom's loops as they are and only changes what their short sleeps wait on:

* the DUL thread waits in ``select`` on its socket and on an eventfd that every put into its queues (the
  primitives to send, the state machine's events) writes to;
* the association thread waits on an Event that every put into the DIMSE message queue and the DUL's to-user
  queue sets, and so does a request to pause it (each ``send_*`` pauses it before using the association).

A polling loop tolerates a wait that ends *earlier* by construction. The 1 ms reactor delays become waits of
:data:`IDLE_WAIT_S` (20 ms): everything those loops act on wakes them (a PDU on the socket, a primitive or event
put into a queue, a pause request, a kill or stop of the DUL), and what does not (the ARTIM and network timers,
seconds each; a DUL thread that died) is seen at most 20 ms later. Waking every millisecond cost each idle thread
a GIL round a millisecond: with 10 associations receiving at once, 20 threads did so, and receive throughput fell
from about 340 to 190 instances/s on two cores (docs/bench/data-path.md). pynetdicom's 0.1 ms polls (a send_*
waiting for the reactor to pause) stay 0.1 ms waits; sleeps longer than a poll delay (0.1 s after an abort, 10 ms
while stopping) stay plain sleeps.

This reaches into pynetdicom's internals (the ``time`` module its reactors call, four queues and the reactor
checkpoint), which is why setup.cfg pins pynetdicom below 4 and :func:`enable` checks those internals first: when
they are not there it logs a warning once and leaves pynetdicom as it is (correct, only slower).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import threading
import time
import types
from typing import Any, Callable

from dicom_node import fastdimse

logger = logging.getLogger(__name__)

# pynetdicom's poll delays are 1 ms (DUL: _run_loop_delay; association: the reactor's sleep) and 0.1 ms (send_*
# waiting for the reactor to pause). Anything longer is a deliberate pause and stays a sleep.
POLL_DELAY_MAX_S = 0.001
# What a reactor's 1 ms poll delay becomes: the longest a condition that does not wake the reactor goes unseen.
IDLE_WAIT_S = 0.02
# A socket that select reports readable while the DUL finds nothing to read (a half-closed TLS socket, a peer
# gone) would turn the wait into a spin: after this many immediate socket wake-ups in a row, poll instead.
_SPIN_LIMIT = 8
_IMMEDIATE_S = 20e-6

ENABLED_ATTR = "_petnode_event_driven"
_install_lock = threading.Lock()
_installed: bool | None = None
_fast_dimse = False  # set by _install: pynetdicom has what dicom_node.fastdimse relies on


class _Wakeup:
    """An eventfd (a pipe where eventfd is missing) that a put writes to and a select can wait on.

    The descriptors are closed when the last reference goes: the queues and the waiter hold this object, so
    nothing can write to a descriptor after it is closed (or to another file that reused its number).
    """

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - Linux has eventfd since 2.6.22
            self.read_fd, self.write_fd = os.pipe()
            os.set_blocking(self.read_fd, False)
            os.set_blocking(self.write_fd, False)

    def set(self) -> None:
        try:
            if self.read_fd == self.write_fd:
                os.eventfd_write(self.write_fd, 1)
            else:  # pragma: no cover
                os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # already signalled (counter or pipe full): the waiter wakes anyway

    def drain(self) -> None:
        try:
            if self.read_fd == self.write_fd:
                os.eventfd_read(self.read_fd)
            else:  # pragma: no cover
                os.read(self.read_fd, 4096)
        except (BlockingIOError, OSError):
            pass

    def __del__(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass


class WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` whose ``put`` also wakes the thread that polls it."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _WakingCheckpoint(threading.Event):
    """The association's reactor checkpoint: a thread that wants the reactor paused (every ``send_*`` does, to
    use the association itself) clears it and then polls until the reactor has stopped at it. Clearing it wakes
    the reactor, which would otherwise notice only after its poll delay: up to 1 ms on every C-STORE sent."""

    def __init__(self, wake: Callable[[], None], is_set: bool) -> None:
        super().__init__()
        self._wake = wake
        if is_set:
            self.set()

    def clear(self) -> None:
        super().clear()
        self._wake()


class _DulWaiter:
    """What a DUL thread's poll sleep becomes: wait for its socket or for a put into its queues."""

    def __init__(self, dul: Any, wakeup: _Wakeup) -> None:
        self._dul = dul
        self._wakeup = wakeup
        self._immediate_socket_wakes = 0

    def __call__(self, seconds: float) -> None:
        fds = [self._wakeup.read_fd]
        raw = getattr(self._dul.socket, "socket", None)
        if raw is not None:
            try:
                if isinstance(raw, ssl.SSLSocket) and raw.pending():
                    return  # decrypted bytes are waiting that select cannot see
                fileno = raw.fileno()
            except (OSError, ValueError):
                fileno = -1
            if fileno >= 0 and self._immediate_socket_wakes < _SPIN_LIMIT:
                fds.append(fileno)
        t0 = time.perf_counter()
        try:
            ready, _, _ = select.select(fds, [], [], seconds)
        except (OSError, ValueError):  # the socket was closed under us: the DUL sees that on its next loop
            time.sleep(seconds)
            return
        if self._wakeup.read_fd in ready:
            self._wakeup.drain()
            self._immediate_socket_wakes = 0
        elif ready:
            immediate = time.perf_counter() - t0 < _IMMEDIATE_S
            self._immediate_socket_wakes = self._immediate_socket_wakes + 1 if immediate else 0
        # A wait that timed out changes nothing: once the socket is left out it stays out (plain 1 ms polling, as
        # pynetdicom has it) until a put wakes this thread, which means the DUL is doing work again.


class _AssociationWaiter:
    """What the acceptor reactor's poll sleep becomes: wait for a DIMSE message or a to-user primitive."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, seconds: float) -> None:
        if self._event.wait(seconds):
            self._event.clear()


def _sleep(seconds: float) -> None:
    """``time.sleep`` as pynetdicom's reactors see it once installed."""
    if 0 < seconds <= POLL_DELAY_MAX_S:
        waiter = getattr(threading.current_thread(), "_petnode_wait", None)
        if waiter is not None:
            waiter(IDLE_WAIT_S if seconds >= POLL_DELAY_MAX_S else seconds)
            return
    time.sleep(seconds)


class _TimeModule(types.ModuleType):
    """The ``time`` module with :func:`_sleep` in place of ``sleep``; everything else is the real module's."""

    def __init__(self) -> None:
        super().__init__("time")
        self.sleep = _sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def attach(assoc: Any) -> None:
    """Give a new (not yet started) pynetdicom Association and its DUL the waking queues and waiters."""
    dul, dimse = assoc.dul, assoc.dimse
    wakeup = _Wakeup()
    assoc_event = threading.Event()
    dul.event_queue = WakingQueue(wakeup.set)
    dul.to_provider_queue = WakingQueue(wakeup.set)
    dul.to_user_queue = WakingQueue(assoc_event.set)
    dimse.msg_queue = WakingQueue(assoc_event.set)
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(checkpoint, threading.Event):
        assoc._reactor_checkpoint = _WakingCheckpoint(assoc_event.set, checkpoint.is_set())
    dul._petnode_wait = _DulWaiter(dul, wakeup)
    assoc._petnode_wait = _AssociationWaiter(assoc_event)
    _wake_on_stop(assoc, dul, wakeup, assoc_event)
    if _fast_dimse:  # the same AEs get the byte-level C-STORE messages (dicom_node/fastdimse.py)
        fastdimse.attach(assoc)


def _wake_on_stop(assoc: Any, dul: Any, wakeup: _Wakeup, assoc_event: threading.Event) -> None:
    """Stopping or killing the DUL, or killing the association, wakes the thread concerned: it would otherwise
    see its kill flag only after its wait.

    pynetdicom's ``stop_dul`` sets the flag and then polls until the thread has gone; here the flag is set and the
    thread woken first, so that poll finds it gone (the same condition, Sta1, decides both).
    """
    stop_dul, kill_dul = dul.stop_dul, dul.kill_dul

    def stop() -> bool:
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True
            wakeup.set()
            if dul.is_alive() and dul is not threading.current_thread():
                dul.join(timeout=1.0)
        return bool(stop_dul())

    def kill() -> None:
        kill_dul()
        wakeup.set()

    assoc_kill = assoc.kill

    def kill_association() -> None:
        assoc._kill = True  # what pynetdicom's kill sets first thing, set before the wake it must be seen by
        assoc_event.set()
        assoc_kill()

    dul.stop_dul, dul.kill_dul, assoc.kill = stop, kill, kill_association


def _internals_problem() -> str | None:
    """What of pynetdicom's internals this module relies on is missing (None when all is there)."""
    try:
        import pynetdicom
        from pynetdicom import association, dimse, dul
    except ImportError as exc:
        return f"pynetdicom cannot be imported ({exc})"
    for module in (association, dul):  # the real time module, or ours once installed
        if getattr(getattr(module, "time", None), "sleep", None) not in (time.sleep, _sleep):
            return "pynetdicom's reactors no longer call the time module"
    for cls, attr in ((dul.DULServiceProvider, "run_reactor"), (association.Association, "_run_reactor"),
                      (dimse.DIMSEServiceProvider, "get_msg"), (dul.DULServiceProvider, "stop_dul"),
                      (dul.DULServiceProvider, "kill_dul"), (association.Association, "kill")):
        if not hasattr(cls, attr):
            return f"pynetdicom {pynetdicom.__version__} has no {cls.__name__}.{attr}"
    return None


def _install() -> bool:
    """Patch pynetdicom once per process (idempotent); False when its internals are not the expected ones."""
    global _installed
    with _install_lock:
        if _installed is not None:
            return _installed
        problem = _internals_problem()
        if problem is not None:
            logger.warning("pynetdicom's reactors left polling (1 ms per message and thread): %s", problem)
            _installed = False
            return False
        from pynetdicom import association, dul

        original_init = association.Association.__init__

        def init(self: Any, ae: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, ae, *args, **kwargs)
            if getattr(ae, ENABLED_ATTR, False):
                attach(self)

        global _fast_dimse
        fast_problem = fastdimse.internals_problem()
        if fast_problem is not None:
            logger.warning("C-STORE messages left to pynetdicom's pydicom encoding: %s", fast_problem)
        _fast_dimse = fast_problem is None
        init.__wrapped__ = original_init  # type: ignore[attr-defined]
        association.Association.__init__ = init  # type: ignore[method-assign]
        shim = _TimeModule()
        association.time = shim  # type: ignore[attr-defined]
        dul.time = shim  # type: ignore[attr-defined]
        _installed = True
        return True


def enable(ae: Any) -> bool:
    """Make the associations of this pynetdicom AE (server or client) event-driven.

    Only AEs passed here change: any other pynetdicom AE in the process (a test's stand-in PACS, the benchmark's
    minimal SCP) keeps pynetdicom's own polling. False when pynetdicom could not be patched.
    """
    if not _install():
        return False
    setattr(ae, ENABLED_ATTR, True)
    return True


def is_enabled(assoc: Any) -> bool:
    """Whether this association waits on events (for tests and the conformance statement)."""
    return getattr(assoc, "_petnode_wait", None) is not None
