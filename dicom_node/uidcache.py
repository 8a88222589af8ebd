"""Remember pynetdicom's UID checks for the UIDs every association repeats.

A scanner such as DCMTK's storescu proposes 128 presentation contexts on every association. pynetdicom checks each
abstract and transfer syntax UID several times on the way from the A-ASSOCIATE-RQ to the negotiated contexts
(``pynetdicom.utils.set_uid``: a new ``pydicom.uid.UID``, its regex, then the conformance regex again), about 700
checks and 1 800 ``UID`` objects per association, 8.5 us each: a quarter of the node's CPU for an association
that stores one instance (profile in ``docs/bench/data-path.md``). The UIDs are the same few hundred SOP classes and
transfer syntaxes every time, so the result of a check that passed cleanly is kept and handed back.

What is kept, and why the behaviour does not change: only values that came back as a conformant UID (so the
original logged nothing and raised nothing), keyed by the value's type and text and every argument that changes
the check, and the conformance mode in force. A UID carrying a private transfer syntax's encoding is never kept
(the copy pynetdicom makes carries that attribute). Anything else (None, a non-conformant or invalid UID, which
must log or raise each time) goes to pynetdicom's own function. Only the negotiation modules use the memo: DIMSE
messages (``dimse_primitives``), whose SOP Instance UIDs are new with every instance, keep the original.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Several hundred standard UIDs fill it; the cap only guards against a peer proposing endless private ones.
MAX_ENTRIES = 4096
# The pynetdicom modules that negotiate associations and bind ``set_uid`` by name.
_MODULES = ("pynetdicom.utils", "pynetdicom.pdu_items", "pynetdicom.pdu_primitives", "pynetdicom.presentation")

_lock = threading.Lock()
_installed = False


def make_memo(original: Callable[..., Any], max_entries: int = MAX_ENTRIES) -> Callable[..., Any]:
    """``set_uid`` with the clean results of ``original`` remembered (see the module's docstring)."""
    from pydicom.uid import UID
    from pynetdicom import _config

    memo: dict[tuple[Any, ...], Any] = {}

    def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                validate: bool = True) -> Any:
        kind = value.__class__
        if kind is not str and kind is not bytes and (kind is not UID or hasattr(value, "_PRIVATE_TS_ENCODING")):
            return original(value, name, allow_empty, allow_none, validate)
        key = (value, allow_empty, allow_none, validate, _config.ENFORCE_UID_CONFORMANCE)  # b"x" != "x"
        hit = memo.get(key)
        if hit is not None:
            return hit
        result = original(value, name, allow_empty, allow_none, validate)
        if isinstance(result, UID) and result and result.is_valid and not hasattr(result, "_PRIVATE_TS_ENCODING"):
            if len(memo) >= max_entries:
                memo.clear()
            memo[key] = result
        return result

    set_uid.__wrapped__ = original  # type: ignore[attr-defined]
    set_uid.memo = memo  # type: ignore[attr-defined]
    return set_uid


def install() -> bool:
    """Put the memo in pynetdicom's negotiation modules (once per process). False if pynetdicom has changed."""
    global _installed
    import importlib

    with _lock:
        if _installed:
            return True
        modules = [importlib.import_module(name) for name in _MODULES]
        original = getattr(modules[0], "set_uid", None)
        if original is None or any(getattr(m, "set_uid", None) is not original for m in modules):
            logger.warning("pynetdicom's set_uid is not where this node expects it: UID checks are not remembered")
            return False
        memoised = make_memo(original)
        for module in modules:
            module.set_uid = memoised  # type: ignore[attr-defined]
        _installed = True
        return True
