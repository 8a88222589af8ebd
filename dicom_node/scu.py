"""C-STORE / C-ECHO SCU: one association per call, every instance's status checked.

Files go out as they are on disk: the data set bytes after the file meta information, in the transfer syntax they
were stored in (pynetdicom's chunked sending; its default decodes each file and encodes it again). A file whose
transfer syntax the destination does not accept is converted without loss (decompressed where needed) to an
uncompressed syntax it accepts, or not sent with the reason; a lossy conversion never happens.

Retries live in the scheduler (``node.py``); this module only reports exactly what happened.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from dicom_node import rawread, reactor
from dicom_node.errors import SendError
from dicom_node.handlers import LOSSLESS_COMPRESSED_SYNTAXES, UNCOMPRESSED_SYNTAXES, handle_conn_open

logger = logging.getLogger(__name__)

# Send the file's own bytes (pynetdicom reads the data set from the file in chunks, without decoding it).
_config.STORE_SEND_CHUNKED_DATASET = True

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
    converted: dict[str, int] = field(default_factory=dict)  # "from -> to" transfer syntax -> instances

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
            uids = rawread.file_meta_uids(path)  # the bytes read directly; pydicom for anything unusual
        except OSError as exc:
            raise SendError(f"{str(path)!r} cannot be read: {exc}") from exc
        if uids is not None and all(uids):
            out.append(uids)
            continue
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


def _syntax_name(uid: str) -> str:
    return UID(uid).name or uid


def _conversion(sop_class: str, syntax: str, accepted: dict[tuple[str, str], Any]) -> tuple[str | None, str]:
    """The uncompressed syntax a file may be converted to for this destination, or None and why not."""
    if syntax not in UNCOMPRESSED_SYNTAXES and syntax not in LOSSLESS_COMPRESSED_SYNTAXES:
        return None, (f"the destination does not accept {_syntax_name(syntax)} for this SOP class, and a lossy "
                      "compressed image is never converted")
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if (sop_class, str(target)) in accepted:
            return str(target), ""
    return None, (f"the destination accepts neither {_syntax_name(syntax)} nor an uncompressed transfer syntax "
                  "for this SOP class")


def _converted_dataset(path: Path, syntax: str) -> Any:
    """The file decoded (and decompressed when compressed) for pynetdicom to encode in the accepted syntax."""
    ds = dcmread(path)
    if syntax in LOSSLESS_COMPRESSED_SYNTAXES:
        # Lossless codecs only reach here (pylibjpeg / pyjpegls decode them exactly): the same image, so the same
        # SOP Instance UID (pydicom would otherwise make a new one).
        ds.decompress(generate_instance_uid=False)
    return ds


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    reactor.enable(ae)  # the request goes out and the response is read as they are ready, not on a 1 ms poll
    return ae


def send_files(paths: Sequence[Path], ae_title: str, host: str, port: int, *, calling_ae: str = "PETNODE",
               timeout_s: float = 30.0, already_stored: Collection[str] = (),
               on_stored: Callable[[str], None] | None = None,
               more: Callable[[], Sequence[Path]] | None = None,
               before_sending: Callable[[list[str]], None] | None = None,
               tls_args: tuple[ssl.SSLContext, str] | None = None) -> SendReport:
    """C-STORE ``paths`` to ``ae_title@host:port`` over one association; never raises for network trouble.

    Files whose SOP Instance UID is in ``already_stored`` (acknowledged by an earlier attempt) are not sent
    again; ``on_stored(uid)`` is called as soon as the destination acknowledges an instance, so a caller can
    record it before the next one goes out. ``more()``, when given, is asked for the current file list once
    these are sent; what it adds goes out on the same association, until it adds nothing (forwarding a series
    while it still arrives). ``before_sending(uids)`` is called with each batch of SOP Instance UIDs before any of
    them goes out (the loop guard remembers a forward before the destination can route it back).
    ``tls_args`` (an SSL context and the host name to check, :func:`dicom_node.tls.tls_args`): over TLS.
    """
    report = SendReport(total=len(paths))
    if not paths:
        return report
    try:
        metas = _metas(paths)
    except SendError as exc:
        report.error = str(exc)
        return report
    todo = [(path, meta) for path, meta in zip(paths, metas) if meta[2] not in already_stored]
    report.skipped = report.sent = len(paths) - len(todo)
    if not todo:
        return report
    ae = _make_ae(calling_ae, timeout_s)
    # One context per (SOP class, the file's transfer syntax), so the destination can accept the file's own
    # syntax, plus an uncompressed one per class to convert to when it does not.
    wanted = sorted({(m[0], m[1]) for _, m in todo} | {(m[0], "") for _, m in todo})
    for sop_class, syntax in wanted:
        ae.add_requested_context(sop_class, [syntax] if syntax else [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if len(ae.requested_contexts) > _MAX_CONTEXTS:  # pragma: no cover - 64 SOP classes in one send
        report.error = f"too many SOP classes and transfer syntaxes in one send ({len(wanted)})"
        return report
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)],
                             tls_args=tls_args)
    except Exception as exc:  # noqa: BLE001 - socket errors surface in several forms
        report.error = f"cannot connect: {exc}"
        return report
    if not assoc.is_established:
        report.error = _no_association(assoc, host, port, tls_args, timeout_s)
        return report
    keep_responses_for_caller(assoc)
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx for cx in assoc.accepted_contexts}
    seen = set(paths)  # files whose meta has been read: ``more()`` lists them again, only new ones are read
    try:
        while todo:
            if before_sending is not None:
                before_sending([m[2] for _, m in todo])
            for path, (sop_class, syntax, uid) in todo:
                if not _store_one(assoc, path, sop_class, syntax, uid, accepted, report, ae_title, on_stored):
                    return report
            if more is None:
                break
            current = list(more())
            new = [p for p in current if p not in seen]
            try:
                todo = [(p, m) for p, m in zip(new, _metas(new)) if m[2] not in already_stored]
            except SendError as exc:
                report.error = str(exc)
                break
            seen.update(new)
            report.total = len(current)
    finally:
        if assoc.is_established:
            assoc.release()
    for what, count in report.converted.items():
        logger.info("destination %s: %d instance(s) converted without loss, %s (it does not accept the stored "
                    "syntax)", ae_title, count, what)
    return report


def _offered(ae: AE, sop_class: str) -> bool:
    return any(str(cx.abstract_syntax) == sop_class for cx in ae.requested_contexts)


def _store_one(assoc: Any, path: Path, sop_class: str, syntax: str, uid: str, accepted: dict[tuple[str, str], Any],
               report: SendReport, ae_title: str, on_stored: Callable[[str], None] | None) -> bool:
    """C-STORE one file (as it is, or converted without loss); False when the association is gone."""
    dataset: Any = path
    if (sop_class, syntax) not in accepted:
        if not _offered(assoc.ae, sop_class):
            report.failures[path.name] = (f"SOP class {_syntax_name(sop_class)} arrived after the association was "
                                          "negotiated; sent on the next attempt")
            return True
        target, why = _conversion(sop_class, syntax, accepted)
        if target is None:
            report.failures[path.name] = f"not sent: {why}"
            return True
        try:
            dataset = _converted_dataset(path, syntax)
        except Exception as exc:  # noqa: BLE001 - a codec missing or a corrupt frame: this file is not sent
            report.failures[path.name] = (f"not sent: the destination needs {_syntax_name(target)} and "
                                          f"{_syntax_name(syntax)} could not be decompressed here: {exc}")
            return True
        key = f"{_syntax_name(syntax)} -> {_syntax_name(target)}"
        report.converted[key] = report.converted.get(key, 0) + 1
    try:
        status = assoc.send_c_store(dataset)
    except ValueError as exc:  # no accepted presentation context for this SOP class / syntax
        report.failures[path.name] = str(exc)
        return True
    if not assoc.is_established and not status:
        report.error = "association lost during the send"
        return False
    code = int(getattr(status, "Status", -1)) if status else -1
    if code in _STORED:
        report.sent += 1
        if on_stored is not None:
            on_stored(uid)
        if code:
            logger.warning("destination %s stored %s with warning 0x%04X", ae_title, path.name, code)
    else:
        report.failures[path.name] = f"status 0x{code:04X}" if code >= 0 else "no response (timeout)"
    return True


def _no_association(assoc: Any, host: str, port: int, tls_args: tuple[ssl.SSLContext, str] | None,
                    timeout_s: float) -> str:
    """Why an association did not come up; over TLS the handshake is tried once more to say why it failed
    (pynetdicom only logs it)."""
    if assoc.is_rejected:
        return "association rejected by the peer"
    if tls_args is not None:
        from dicom_node.tls import handshake_problem

        problem = handshake_problem(host, port, tls_args, timeout_s)
        if problem is not None:
            return f"no association: {problem}"
    return "no association: peer unreachable, connection refused, or aborted"


def echo(ae_title: str, host: str, port: int, *, calling_ae: str = "PETNODE", timeout_s: float = 10.0,
         tls_args: tuple[ssl.SSLContext, str] | None = None) -> str | None:
    """C-ECHO (over TLS with ``tls_args``); None when the peer answered success, else why not."""
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)],
                             tls_args=tls_args)
    except Exception as exc:  # noqa: BLE001
        return f"cannot connect: {exc}"
    if not assoc.is_established:
        return _no_association(assoc, host, port, tls_args, timeout_s)
    keep_responses_for_caller(assoc)
    try:
        status = assoc.send_c_echo()
        code = int(getattr(status, "Status", -1)) if status else -1
        return None if code == 0 else (f"status 0x{code:04X}" if code >= 0 else "no response")
    finally:
        if assoc.is_established:
            assoc.release()
