"""Spread independent per-item work (writing one file per slice) over forked child processes.

Writing a derived series is pure-Python encoding: on one interpreter it holds the GIL, and in a running node it
slows the send that follows the writer (the series latency's critical path). Forked children share the parent's
memory copy-on-write (the volume, the headers, the encoded series template: nothing is pickled), each take every
``processes``-th item, and report each finished item on a pipe; the parent only relays those reports (in
``select``, without the GIL), so its threads (the send) keep their core.

Fork, not spawn, on purpose: spawn would pickle the source headers (and import everything again) per child. The
node is multi-threaded; a child forked from it runs only the work function (encoding and ``os`` calls), takes no
lock another thread may have held (it does not log), and leaves with ``os._exit``, so nothing of the parent
(atexit handlers, buffered output, database connections) runs twice. A child dies with its parent
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import selectors
import signal
from collections.abc import Callable

from dicom_node.errors import DicomNodeError

_PR_SET_PDEATHSIG = 1
_ERROR_MAX = 2000  # bytes of a child's error message kept (one pipe write stays atomic under PIPE_BUF: 4096)


class ForkedWorkError(DicomNodeError):
    """A child failed (its error message) or died (its exit status)."""


def can_fork() -> bool:
    return hasattr(os, "fork")


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: a child must not dlopen (another thread may have held the loader's
    lock at the fork)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux: an orphan finishes its few files and exits
        return None


def _die_with_parent(prctl: Callable[..., int] | None) -> None:
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child(items: range, work: Callable[[int], None], out: int, prctl: Callable[..., int] | None) -> None:
    code = 1
    try:
        _die_with_parent(prctl)
        for k in items:
            work(k)
            os.write(out, b"%d\n" % k)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the parent must hear of it
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ").encode("utf-8", "replace")[:_ERROR_MAX]
        try:
            os.write(out, b"E" + message + b"\n")
        except OSError:
            pass
    finally:
        os._exit(code)


def _wait(pid: int) -> int:
    """The child's wait status; 0 when something else in the process reaped it (its items' reports decide)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def run_forked(count: int, work: Callable[[int], None], processes: int,
               on_done: Callable[[int], None] | None = None) -> None:
    """Run ``work(k)`` for k in 0..count-1 in ``processes`` forked children (child i takes i, i+processes, ...).

    ``on_done(k)`` is called in the parent, in the order the children finish items, as each one is done. Returns
    when every child has exited; raises :class:`ForkedWorkError` with the first child's error (the others are
    still waited for, so no child outlives the call) when any item was not done.
    """
    if count <= 0:
        return
    processes = max(1, min(processes, count))
    prctl = _prctl()
    selector = selectors.DefaultSelector()
    pids: list[int] = []
    try:
        for i in range(processes):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                os.close(read_fd)
                _child(range(i, count, processes), work, write_fd, prctl)
            os.close(write_fd)
            pids.append(pid)
            selector.register(read_fd, selectors.EVENT_READ, bytearray())
        done: set[int] = set()
        errors: list[str] = []
        while selector.get_map():
            for key, _ in selector.select():
                chunk = os.read(key.fd, 65536)
                buffer: bytearray = key.data
                if not chunk:
                    selector.unregister(key.fd)
                    os.close(key.fd)
                    continue
                buffer += chunk
                *lines, rest = bytes(buffer).split(b"\n")
                buffer[:] = rest
                for line in lines:
                    if line.startswith(b"E"):
                        errors.append(line[1:].decode("utf-8", "replace"))
                        continue
                    k = int(line)
                    done.add(k)
                    if on_done is not None:
                        on_done(k)
    finally:
        for key in list(selector.get_map().values()):
            os.close(key.fd)
        selector.close()
        statuses = [_wait(pid) for pid in pids]
    failed = [os.waitstatus_to_exitcode(s) for s in statuses if s != 0]
    if errors or failed or len(done) != count:
        why = errors[0] if errors else (f"a child process ended with status {failed[0]}" if failed
                                        else f"{count - len(done)} item(s) not reported")
        raise ForkedWorkError(why)
