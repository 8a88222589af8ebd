"""Where a denoiser's work runs: in a short-lived thread of its own when the caller is not the main thread.

Why: torch's CPU kernels run on OpenMP (libgomp), and libgomp keeps a team of worker threads for every thread that
has started a parallel region, for as long as that thread lives. Once the process holds more such threads than it
has CPUs (two worker-lane threads that have each run a torch method once, or a lane thread and the main thread),
libgomp stops spin-waiting between parallel regions, and every kernel has to wake its sleeping workers through the
kernel. The NLM runs some 40 000 small kernels on a 267-slice series: 2.4-2.7 s instead of 0.9 s on the two-core
development machine (``docs/bench/data-path.md``, tenth round). A thread that exits releases its team, so a
denoise run in a thread of its own leaves no team behind that would slow the next series down; only series that
really run at the same time share the cores, which is the oversubscription libgomp's throttling is meant for.

The main thread runs the work itself (the ``petnode denoise`` command, the benches): it is the only thread that
ever runs it there, and signals (Ctrl-C) reach it as before.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_released(fn: Callable[[], T]) -> T:
    """Return ``fn()``, run in a new thread that ends with it unless the caller is the main thread.

    Whatever ``fn`` raises is raised here (the same object, with its traceback). The thread is a daemon, so an
    interpreter shutting down does not wait for it beyond what the caller itself waits.
    """
    if threading.current_thread() is threading.main_thread():
        return fn()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            failure.append(exc)

    worker = threading.Thread(target=body, name=f"{threading.current_thread().name}-run", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]
