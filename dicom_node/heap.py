"""Keep the cyclic garbage collector off the node's long-lived heap (``gc.freeze``).

A running node holds a large heap that never becomes garbage: pynetdicom, pydicom and, after its first CNN or NLM
series, torch (about 200 000 tracked objects). Python's full (generation 2) collection walks all of it: 43 ms
without torch, 117 ms with it, measured here, all under the GIL, so every association of the process stalls for as
long. One such collection fell inside almost every 267-instance receive once torch was imported (a gen-2 pass runs
when a quarter as many objects as the heap holds have survived since the last one: a series' decoded data sets),
and pynetdicom's listener forces another every 60 of its loop turns. Receiving a series over one association
went from 196 to 233 instances/s (medians of 6, interleaved, torch imported) with the heap frozen.

``gc.freeze`` moves every tracked object into a permanent generation that collections skip. Reference counting
still frees frozen objects the moment nothing refers to them; only a reference cycle that was alive at the freeze
and becomes garbage later stays (a bounded amount: the node freezes at start and when later imports have grown the
heap, and only while it is idle, after a full collection).
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time

logger = logging.getLogger(__name__)

# Modules imported since the last freeze before another is worth its full collection (torch brings ~1 500).
MIN_NEW_MODULES = 20

_lock = threading.Lock()
_modules_at_freeze = 0


def freeze_if_grown(min_new_modules: int = MIN_NEW_MODULES) -> bool:
    """Collect and freeze the heap when ``min_new_modules`` modules were imported since the last freeze (always the
    first time). Call it when the process is idle: the collection holds the GIL (about 0.1 s with torch)."""
    global _modules_at_freeze
    with _lock:
        modules = len(sys.modules)
        if _modules_at_freeze and modules - _modules_at_freeze < min_new_modules:
            return False
        t0 = time.perf_counter()
        gc.collect()
        gc.freeze()
        _modules_at_freeze = modules
    logger.debug("heap frozen: %d objects kept out of garbage collection (%d modules; %.0f ms)",
                 gc.get_freeze_count(), modules, 1000 * (time.perf_counter() - t0))
    return True
