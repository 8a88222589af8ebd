"""C-STORE / C-ECHO SCU: one association per call, every instance's status checked.

Retries live in the scheduler (``node.py``); this module only reports exactly what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    sent: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # file name -> reason / status
    error: str | None = None  # association-level failure

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures and self.sent == self.total

    def summary(self) -> str:
        if self.ok:
            return f"{self.sent}/{self.total} stored"
        parts = [f"{self.sent}/{self.total} stored"]
        if self.error:
            parts.append(self.error)
        if self.failures:
            first = next(iter(self.failures.items()))
            parts.append(f"{len(self.failures)} refused (first: {first[0]}: {first[1]})")
        return "; ".join(parts)


def _contexts(paths: Sequence[Path]) -> dict[str, set[str]]:
    by_class: dict[str, set[str]] = {}
    for path in paths:
        try:
            meta = read_file_meta_info(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for unreadable files
            raise SendError(f"{str(path)!r} is not a readable DICOM file: {exc}") from exc
        by_class.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    return by_class


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def send_files(paths: Sequence[Path], ae_title: str, host: str, port: int, *, calling_ae: str = "PETNODE",
               timeout_s: float = 30.0) -> SendReport:
    """C-STORE ``paths`` to ``ae_title@host:port`` over one association; never raises for network trouble."""
    report = SendReport(total=len(paths))
    if not paths:
        return report
    try:
        contexts = _contexts(paths)
    except SendError as exc:
        report.error = str(exc)
        return report
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
    try:
        for path in paths:
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
    try:
        status = assoc.send_c_echo()
        code = int(getattr(status, "Status", -1)) if status else -1
        return None if code == 0 else (f"status 0x{code:04X}" if code >= 0 else "no response")
    finally:
        if assoc.is_established:
            assoc.release()
