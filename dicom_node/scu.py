"""C-STORE / C-ECHO SCU: one association per call, every instance's status checked.

Retries live in the scheduler (``node.py``); this module only reports exactly what happened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.errors import SendError
from dicom_node.handlers import handle_conn_open

logger = logging.getLogger(__name__)

# Warning statuses still mean "stored" (PS3.4 B.2.3: coercion, elements discarded, dataset mismatch).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_MAX_CONTEXTS = 128


@dataclass
class SendReport:
    """What one send did: per-instance statuses, and why it stopped early if it did."""

    total: int
    sent: int = 0  # acknowledged by the destination, this time or before (``skipped``)
    skipped: int = 0  # already acknowledged by an earlier attempt: not sent again
    failures: dict[str, str] = field(default_factory=dict)  # file name -> reason / status
    error: str | None = None  # association-level failure

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures and self.sent == self.total

    def summary(self) -> str:
        done = f"{self.sent}/{self.total} stored" + (f" ({self.skipped} by earlier attempts)" if self.skipped else "")
        if self.ok:
            return done
        parts = [done]
        if self.error:
            parts.append(self.error)
        if self.failures:
            first = next(iter(self.failures.items()))
            parts.append(f"{len(self.failures)} refused (first: {first[0]}: {first[1]})")
        return "; ".join(parts)


def _metas(paths: Sequence[Path]) -> list[tuple[str, str, str]]:
    """(SOP class, transfer syntax, SOP Instance UID) of each file, from its file meta information."""
    out = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for unreadable files
            raise SendError(f"{str(path)!r} is not a readable DICOM file: {exc}") from exc
        out.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID),
                    str(meta.MediaStorageSOPInstanceUID)))
    return out


def keep_responses_for_caller(assoc: Any) -> None:
    """Stop the association's reactor thread from taking DIMSE messages off the queue.

    pynetdicom runs a reactor thread on requestor associations too; it serves incoming *requests*, and
    ``send_c_store`` pauses it with a flag-and-event handshake before waiting for the response. The handshake
    has a window: the reactor can have passed its checkpoint while the flag still says "paused", then take the
    C-STORE-RSP meant for the caller ("Received unexpected C-STORE service message"), and the caller waits out
    the DIMSE timeout and aborts. The window widens when many threads compete for the GIL, which is exactly
    when the node is also receiving. A storage SCU never has to serve requests from its peer, so the reactor
    gets nothing: every message goes to the thread that waits for it.
    """
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def get_msg_for_caller(block: bool = False) -> Any:
        if threading.current_thread() is assoc:  # the association's own reactor loop
            return None, None
        return get_msg(block)

    dimse.get_msg = get_msg_for_caller


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def send_files(paths: Sequence[Path], ae_title: str, host: str, port: int, *, calling_ae: str = "PETNODE",
               timeout_s: float = 30.0, already_stored: Collection[str] = (),
               on_stored: Callable[[str], None] | None = None) -> SendReport:
    """C-STORE ``paths`` to ``ae_title@host:port`` over one association; never raises for network trouble.

    Files whose SOP Instance UID is in ``already_stored`` (acknowledged by an earlier attempt) are not sent
    again; ``on_stored(uid)`` is called as soon as the destination acknowledges an instance, so a caller can
    record it before the next one goes out.
    """
    report = SendReport(total=len(paths))
    if not paths:
        return report
    try:
        metas = _metas(paths)
    except SendError as exc:
        report.error = str(exc)
        return report
    todo = [(path, meta[2]) for path, meta in zip(paths, metas) if meta[2] not in already_stored]
    report.skipped = report.sent = len(paths) - len(todo)
    if not todo:
        return report
    contexts: dict[str, set[str]] = {}
    for sop_class, syntax, uid in metas:
        if uid not in already_stored:
            contexts.setdefault(sop_class, set()).add(syntax)
    ae = _make_ae(calling_ae, timeout_s)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    if len(ae.requested_contexts) > _MAX_CONTEXTS:  # pragma: no cover - 128 SOP classes in one send
        report.error = f"too many SOP classes in one send ({len(contexts)})"
        return report
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)])
    except Exception as exc:  # noqa: BLE001 - socket errors surface in several forms
        report.error = f"cannot connect: {exc}"
        return report
    if not assoc.is_established:
        report.error = ("association rejected by the peer" if assoc.is_rejected else
                        "no association: peer unreachable, connection refused, or aborted")
        return report
    keep_responses_for_caller(assoc)
    try:
        for path, uid in todo:
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context for this SOP class / syntax
                report.failures[path.name] = str(exc)
                continue
            if not assoc.is_established and not status:
                report.error = "association lost during the send"
                break
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in _STORED:
                report.sent += 1
                if on_stored is not None:
                    on_stored(uid)
                if code:
                    logger.warning("destination %s stored %s with warning 0x%04X", ae_title, path.name, code)
            else:
                report.failures[path.name] = f"status 0x{code:04X}" if code >= 0 else "no response (timeout)"
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def echo(ae_title: str, host: str, port: int, *, calling_ae: str = "PETNODE", timeout_s: float = 10.0) -> str | None:
    """C-ECHO; None when the peer answered success, else why not."""
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)])
    except Exception as exc:  # noqa: BLE001
        return f"cannot connect: {exc}"
    if not assoc.is_established:
        return ("association rejected by the peer" if assoc.is_rejected else
                "no association: peer unreachable, connection refused, or aborted")
    keep_responses_for_caller(assoc)
    try:
        status = assoc.send_c_echo()
        code = int(getattr(status, "Status", -1)) if status else -1
        return None if code == 0 else (f"status 0x{code:04X}" if code >= 0 else "no response")
    finally:
        if assoc.is_established:
            assoc.release()
