"""pynetdicom event handlers: pure functions with their dependencies bound in a :class:`ReceiveContext`.

A handler never raises and never does heavy work on the association thread: ``handle_store`` checks the
dataset, writes it durably, records it and answers. Completion, routing and denoising happen elsewhere.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node import rawvalues
from dicom_node.decoded import DecodedCache
from dicom_node.errors import DiskFullError, StorageError
from dicom_node.spool import Spool, part10_header
from dicom_node.state import InstanceRecord, StateDB, StoreOutcome

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from dicom_node.scp import ConnectionGuard
    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """The DIMSE statuses petnode answers a C-STORE with (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk full or above the watermark: nothing was written
    DATASET_MISMATCH = 0xA900  # a required attribute (UIDs, Pixel Data) is missing or wrong
    CANNOT_UNDERSTAND = 0xC210  # the dataset cannot be decoded (truncated, malformed)
    PROCESSING_FAILURE = 0x0110  # anything unexpected (bug, database error): the sender should retry
    DUPLICATE_SOP_INSTANCE = 0x0111  # conflicting_instance: refuse, and this UID is stored with other content


# SOP classes whose instances must carry Pixel Data: checked before they are stored (processing and priors read
# them). Every other storage class (RT, SR, NM, US, ...) is accepted to be forwarded as it is.
IMAGE_STORAGE_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

# Uncompressed and lossless compressed only: a lossy codec would change activity values, so it is never
# negotiated (the sender then falls back to one of these, or reports the refused context).
UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)
LOSSLESS_COMPRESSED_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
TRANSFER_SYNTAXES: tuple[str, ...] = UNCOMPRESSED_SYNTAXES + LOSSLESS_COMPRESSED_SYNTAXES
# What the scanner already compressed with loss: accepted for classes petnode only forwards (a JPEG CT, an
# ultrasound) and forwarded in that same syntax; never for PET (activity must be exact), never produced here.
LOSSY_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
PET_STORAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
                                 "1.2.840.10008.5.1.4.1.1.128.1"})


def supported_storage() -> dict[str, tuple[str, ...]]:
    """Every storage SOP class petnode accepts, with the transfer syntaxes it accepts for it."""
    from pynetdicom.presentation import AllStoragePresentationContexts

    classes = dict.fromkeys([*IMAGE_STORAGE_CLASSES, *(str(cx.abstract_syntax)
                                                      for cx in AllStoragePresentationContexts)])
    return {uid: TRANSFER_SYNTAXES if uid in PET_STORAGE_CLASSES else TRANSFER_SYNTAXES + LOSSY_SYNTAXES
            for uid in classes}


@dataclass
class AssociationStats:
    calling_ae: str
    peer: str
    called_ae: str = ""
    received: int = 0
    duplicates: int = 0
    replaced: int = 0
    refused: int = 0
    returned: int = 0  # instances petnode forwarded to this peer, sent back (loop guard: not stored again)


@dataclass
class ReceiveContext:
    """What the handlers need; bound once when the server starts (``guard`` and ``settings`` by start_scp)."""

    spool: Spool
    db: StateDB
    # optional callable(series_uid, count_reached) -> None: a hint for the scheduler (count_reached: a PET series
    # now has as many instances as its NumberOfSlices says, so completion can be checked at once)
    on_received: Any = None
    make_room: Any = None  # optional callable() -> int: remove finished series under disk pressure (retention)
    decoded: DecodedCache | None = None  # PET data sets kept decoded for processing (dicom_node/decoded.py)
    metrics: Any = None  # optional callable(status) -> None: counts each C-STORE answer (dicom_node/web/metrics.py)
    guard: ConnectionGuard | None = None
    settings: NodeSettings | None = None
    _stats: dict[int, AssociationStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Striped locks by SOP Instance UID: two associations storing the same UID at once are serialised, so the
    # duplicate / changed-content decision and the file on disk always agree.
    _uid_locks: tuple[threading.Lock, ...] = field(default_factory=lambda: tuple(threading.Lock() for _ in range(64)))

    def stats_for(self, assoc: Any) -> AssociationStats | None:
        with self._lock:
            return self._stats.get(id(assoc))

    def uid_lock(self, sop_uid: str) -> threading.Lock:
        return self._uid_locks[hash(sop_uid) % len(self._uid_locks)]


def _assoc_id(assoc: Any) -> str:
    return f"{id(assoc):x}"


def _peer(assoc: Any) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


def handle_conn_open(event: Event) -> None:
    """Disable Nagle on every connection: with delayed ACKs each C-STORE would otherwise stall ~40 ms."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # pragma: no cover - a socket without TCP (e.g. closed already)
        logger.debug("could not set TCP_NODELAY", exc_info=True)


def called_ae_of(assoc: Any) -> str:
    """The AE title the peer asked for in its A-ASSOCIATE-RQ (``acceptor.ae_title`` is always our own)."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None) if primitive is not None else None
    if isinstance(called, bytes):
        called = called.decode("ascii", "replace")
    return str(called).strip() if called else str(assoc.acceptor.ae_title).strip()


def _calling_ae_of(assoc: Any) -> str:
    primitive = getattr(assoc.requestor, "primitive", None)
    calling = getattr(primitive, "calling_ae_title", None) if primitive is not None else None
    if isinstance(calling, bytes):
        calling = calling.decode("ascii", "replace")
    return str(calling or assoc.requestor.ae_title or "").strip()


def _reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()  # waits until the A-ASSOCIATE-RJ has gone out, as pynetdicom's own rejections do


def handle_requested(event: Event, ctx: ReceiveContext) -> None:
    """An A-ASSOCIATE-RQ arrived: apply the AE-title checks and take an association slot, or reject with the
    real cause (logged against the caller that is refused, with the numbers that made the decision)."""
    assoc = event.assoc
    calling, called = _calling_ae_of(assoc), called_ae_of(assoc)
    settings, guard = ctx.settings, ctx.guard
    try:
        if settings is not None and settings.allowed_calling_aes and calling not in settings.allowed_calling_aes:
            logger.warning("association rejected from calling AE %r at %s (called AE %r): calling AE not in "
                           "allowed_calling_aes", calling, _peer(assoc), called)
            _reject(assoc, 0x01, 0x01, 0x03)
            return
        if settings is not None and settings.refuse_unknown_called_ae and not settings.answers_to(called):
            logger.warning("association rejected from calling AE %r at %s: called AE %r is not ours (%s; "
                           "refuse_unknown_called_ae is on)", calling, _peer(assoc), called,
                           ", ".join([settings.ae_title, *settings.called_ae_aliases]))
            _reject(assoc, 0x01, 0x01, 0x07)
            return
        if guard is not None:
            reason = guard.admit_association(id(assoc))
            if reason is not None:
                logger.warning("association rejected from calling AE %r at %s (called AE %r): %s", calling,
                               _peer(assoc), called, reason)
                _reject(assoc, 0x02, 0x03, 0x02)
                return
    except Exception:  # noqa: BLE001 - a handler never raises; an unexpected error rejects transiently
        logger.exception("association request from %s could not be checked; rejected", _peer(assoc))
        if not assoc.is_rejected and not assoc.is_aborted:
            _reject(assoc, 0x02, 0x02, 0x01)


def handle_accepted(event: Event, ctx: ReceiveContext) -> None:
    assoc = event.assoc
    called = called_ae_of(assoc)
    stats = AssociationStats(calling_ae=assoc.requestor.ae_title, peer=_peer(assoc), called_ae=called)
    with ctx._lock:
        ctx._stats[id(assoc)] = stats
    try:
        ctx.db.association_opened(_assoc_id(assoc), stats.calling_ae, called, stats.peer)
    except Exception:  # noqa: BLE001 - status bookkeeping must never break an association
        logger.exception("could not record association assoc=%s", _assoc_id(assoc))
    known = ctx.settings is None or ctx.settings.answers_to(called)
    logger.info("association accepted assoc=%s from %s (%s) to %s%s", _assoc_id(assoc), stats.calling_ae,
                stats.peer, called, "" if known else " (not our AE title: recorded as called, accepted)")


def handle_rejected(event: Event) -> None:
    """pynetdicom rejected on its own (our checks reject in handle_requested and log the cause there)."""
    assoc = event.assoc
    logger.warning("association rejected by the DICOM stack from %s (calling AE %r, called AE %r)",
                   _peer(assoc), _calling_ae_of(assoc), called_ae_of(assoc))


def handle_conn_close(event: Event, ctx: ReceiveContext) -> None:
    assoc = event.assoc
    with ctx._lock:
        stats = ctx._stats.pop(id(assoc), None)
    if stats is None:
        return  # never accepted
    try:
        ctx.db.association_closed(_assoc_id(assoc))
    except Exception:  # noqa: BLE001
        logger.exception("could not record association end assoc=%s", _assoc_id(assoc))
    how = "aborted" if assoc.is_aborted else "released"
    logger.info("association %s assoc=%s from %s: received %d, duplicates %d, replaced %d, refused %d%s", how,
                _assoc_id(assoc), stats.calling_ae, stats.received, stats.duplicates, stats.replaced,
                stats.refused, f", returned {stats.returned} (forwarded by petnode to this peer before: not "
                "stored or routed again)" if stats.returned else "")


def handle_echo(event: Event) -> int:
    return Status.SUCCESS


def _floats(ds: Dataset, keyword: str) -> tuple[float, ...] | None:
    fast = rawvalues.decimals(ds, keyword)
    if fast is not None:
        return tuple(fast)
    value = ds.get(keyword)
    try:
        return tuple(float(v) for v in value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _pixel_problem(ds: Dataset, transfer_syntax: UID) -> tuple[Status, str] | None:
    """The status and reason when the Pixel Data cannot be right (None when it looks complete)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Status.DATASET_MISMATCH, "no Pixel Data"
    if "PixelData" not in ds or transfer_syntax.is_compressed:
        return None  # encapsulated frames are checked when decoded for processing
    # Read from the raw bytes where they are still raw (dicom_node/rawvalues.py): the same numbers pydicom gives.
    rows, cols, bits = (rawvalues.integer(ds, kw) for kw in ("Rows", "Columns", "BitsAllocated"))
    if rows is None or cols is None or bits is None:
        missing = [kw for kw, v in (("Rows", rows), ("Columns", cols), ("BitsAllocated", bits)) if v is None]
        return Status.DATASET_MISMATCH, f"image pixel attributes unreadable ({', '.join(missing)} missing or invalid)"
    expected = (rows * cols * (rawvalues.integer(ds, "SamplesPerPixel") or 1)
                * (rawvalues.integer(ds, "NumberOfFrames") or 1) * bits) // 8
    try:
        actual = rawvalues.value_length(ds, "PixelData")
    except Exception as exc:  # noqa: BLE001 - reading the value hit the truncation
        return Status.CANNOT_UNDERSTAND, f"Pixel Data cannot be read ({type(exc).__name__}: {exc})"
    if actual < expected:
        return Status.CANNOT_UNDERSTAND, f"Pixel Data truncated: {actual} bytes, {expected} expected"
    return None


_UID_STRICT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_LENIENT = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def uid_problem(value: str) -> tuple[str | None, str | None]:
    """(error, warning) for a UID value: an error refuses the instance, a warning is logged and accepted.

    PS3.5 9.1: digits and dots, components without leading zeros, at most 64 characters. Real modalities do
    write leading zeros now and then; that is harmless for storage and routing, so it is only a warning.
    """
    if not value:
        return "empty", None
    if len(value) > 64:
        return f"{len(value)} characters (at most 64)", None
    if not _UID_LENIENT.match(value):
        return "not a UID (only digits separated by single dots are allowed)", None
    if not _UID_STRICT.match(value):
        return None, "a component has a leading zero"
    return None, None


def _undecodable(ds: Dataset) -> str | None:
    """Why the decoded bytes are not a DICOM data set at all (None when they are one).

    pydicom decodes nearly any bytes into *some* elements, so garbage after a valid header shows up as
    elements out of tag order or a data set with no identifying attributes at all: that is 0xC210 (cannot
    understand), not 0xA900 (a DICOM data set with a required attribute missing).
    """
    # Plain ints: pydicom's BaseTag compares in Python (0.05 ms for a 110-element header, as ints 0.01 ms).
    tags = list(map(int, ds.keys()))
    if not tags:
        return "empty data set"
    if any(b <= a for a, b in zip(tags, tags[1:])):
        return "elements are not in ascending tag order"
    if not any((t >> 16) in (0x0008, 0x0010, 0x0020) for t in tags):
        return "no SOP Common, Patient or Study/Series attributes (groups 0008, 0010, 0020)"
    return None


def _refuse(stats: AssociationStats | None, status: Status, sop_uid: str, reason: str, *args: Any) -> int:
    logger.warning("C-STORE refused 0x%04X sop=%s: " + reason, status, sop_uid, *args)
    _count(stats, "refused")
    return status


def handle_store(event: Event, ctx: ReceiveContext) -> int:
    """Check, write durably, record, then acknowledge one instance (and count the answer)."""
    status = _check_and_store(event, ctx)
    if ctx.metrics is not None:
        try:
            ctx.metrics(int(status))
        except Exception:  # noqa: BLE001 - counting must never change the answer the sender gets
            logger.debug("could not count C-STORE status 0x%04X", int(status), exc_info=True)
    return status


def _check_and_store(event: Event, ctx: ReceiveContext) -> int:
    """The status to answer: the checks, the durable write and the record (never raises)."""
    assoc = event.assoc
    stats = ctx.stats_for(assoc)
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    try:
        try:
            ds = event.dataset
            problem = _undecodable(ds)
            if problem is None:
                values = {kw: rawvalues.text(ds, kw) for kw in _REQUIRED_UIDS}
                modality = rawvalues.text(ds, "Modality") or ""
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's dataset
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            return _refuse(stats, Status.CANNOT_UNDERSTAND, sop_uid, "data set cannot be decoded (%s)", problem)

        missing = [kw for kw, v in values.items() if v is None or str(v).strip() == ""]
        if missing:
            return _refuse(stats, Status.DATASET_MISMATCH, sop_uid, "required attribute missing (%s)",
                           ", ".join(missing))
        uids = {kw: str(v).strip().rstrip("\x00").strip() for kw, v in values.items()}
        for kw, value in uids.items():
            error, warning = uid_problem(value)
            if error:
                return _refuse(stats, Status.DATASET_MISMATCH, sop_uid, "%s %r is not a valid UID: %s", kw,
                               value[:80], error)
            if warning:
                logger.warning("C-STORE sop=%s: %s %r accepted although %s (PS3.5 9.1)", uids["SOPInstanceUID"],
                               kw, value, warning)
        study_uid, series_uid = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
        sop_uid, sop_class = uids["SOPInstanceUID"], uids["SOPClassUID"]

        if sop_class in IMAGE_STORAGE_CLASSES:
            pixel = _pixel_problem(ds, UID(event.context.transfer_syntax))
            if pixel:
                status, reason = pixel
                return _refuse(stats, status, sop_uid, "series=%s: %s", series_uid, reason)

        back = returned_from(ctx, sop_uid, assoc.requestor.ae_title)
        if back is not None:
            # A PACS routing back what petnode forwarded to it: acknowledged (it is safe there and here) but
            # neither stored nor routed again, so forwarding cannot loop.
            logger.debug("instance sop=%s series=%s came back from %s: %s", sop_uid, series_uid,
                         assoc.requestor.ae_title, back)
            _count(stats, "returned")
            return Status.SUCCESS

        # The bytes as received after a file meta header built directly (the same bytes pynetdicom's
        # encoded_dataset() writes, at a fraction of the cost).
        request = event.request
        data = part10_header(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                             str(event.context.transfer_syntax), PYNETDICOM_IMPLEMENTATION_UID,
                             PYNETDICOM_IMPLEMENTATION_VERSION) + event.encoded_dataset(include_meta=False)
        digest = hashlib.sha256(data).hexdigest()
        if ctx.make_room is not None and ctx.spool.space_problem():
            ctx.make_room()  # finished series go before anything is refused (outside the series locks)
        with ctx.uid_lock(sop_uid), ctx.spool.series_lock(series_uid):
            return _store_checked(event, ctx, stats, ds, data, digest, study_uid, series_uid, sop_uid, sop_class,
                                  modality)
    except StorageError as exc:
        return _refuse(stats, Status.OUT_OF_RESOURCES, sop_uid, "%s", exc)
    except Exception:  # noqa: BLE001 - a handler never raises; the sender keeps its copy and can retry
        logger.exception("C-STORE failed 0x%04X sop=%s: unexpected error", Status.PROCESSING_FAILURE, sop_uid)
        _count(stats, "refused")
        return Status.PROCESSING_FAILURE


def returned_from(ctx: ReceiveContext, sop_uid: str, calling_ae: str) -> str | None:
    """Why this instance is one petnode forwarded to the peer now sending it (None when it is not)."""
    try:
        forwards = ctx.db.forwarded_to(sop_uid)
    except Exception:  # noqa: BLE001 - the guard must not refuse instances when its memory cannot be read
        logger.exception("sop=%s: could not check whether petnode forwarded it before", sop_uid)
        return None
    calling = calling_ae.strip()
    for row in forwards:
        peer_names = [p for p in (ctx.settings.peers if ctx.settings is not None else ())
                      if f"{p.ae_title}@{p.host}:{p.port}" == row["destination"]]
        if calling == row["ae_title"] or any(p.calls_as(calling) for p in peer_names):
            return f"petnode forwarded it to {row['destination']}"
    return None


def _store_checked(event: Event, ctx: ReceiveContext, stats: AssociationStats | None, ds: Dataset, data: bytes,
                   digest: str, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, modality: str) -> int:
    """The duplicate policy, the durable write and the record (under this SOP Instance UID's lock)."""
    assoc = event.assoc
    existing = ctx.db.find_instance(sop_uid)
    here = next((r for r in existing if r["series_uid"] == series_uid), None)
    if here is not None and (here["sha256"] in (None, digest)):
        logger.info("duplicate instance sop=%s series=%s: the same bytes again, kept the stored copy", sop_uid,
                    series_uid)
        _count(stats, "duplicates")
        return Status.SUCCESS
    conflict = here if here is not None else (existing[0] if existing else None)
    policy = ctx.settings.conflicting_instance if ctx.settings is not None else "store"
    if conflict is not None:
        where = ("in the same series with other content" if here is not None
                 else f"in another series ({conflict['series_uid']})")
        if policy == "refuse":
            return _refuse(stats, Status.DUPLICATE_SOP_INSTANCE, sop_uid, "series=%s: this SOP Instance UID is "
                           "already stored %s (conflicting_instance: refuse)", series_uid, where)

    previous_path = None
    if here is not None:
        previous_path = ctx.spool.keep_previous_version(here["path"], digest=str(here["sha256"]))
    try:
        path = ctx.spool.store(study_uid, series_uid, sop_uid, data)
    except DiskFullError as exc:
        logger.error("C-STORE refused 0x%04X sop=%s series=%s: %s", Status.OUT_OF_RESOURCES, sop_uid,
                     series_uid, exc)
        _count(stats, "refused")
        return Status.OUT_OF_RESOURCES

    counted = modality == "PT" and "NumberOfFrames" not in ds
    expected = rawvalues.integer(ds, "NumberOfSlices") if counted else None
    record = InstanceRecord(
        sop_instance_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, sop_class_uid=sop_class,
        modality=modality, path=path, ipp=_floats(ds, "ImagePositionPatient"),
        iop=_floats(ds, "ImageOrientationPatient"), expected_count=expected,
        calling_ae=assoc.requestor.ae_title, called_ae=called_ae_of(assoc),
        peer_host=str(assoc.requestor.address), sha256=digest,
        image_index=rawvalues.integer(ds, "ImageIndex") if counted else None,
    )
    outcome, before = ctx.db.store_instance(record, previous_path=previous_path)
    if outcome is StoreOutcome.DUPLICATE:
        _count(stats, "duplicates")
        return Status.SUCCESS
    if outcome is StoreOutcome.REPLACED:
        state = before["state"] if before else "?"
        logger.warning("instance sop=%s series=%s came again with other content: stored as a new version (the "
                       "previous one kept as %s); the series (was %s) is re-opened and will be processed again",
                       sop_uid, series_uid, previous_path, state)
        _count(stats, "replaced")
    else:
        if before is not None and before["purged_at"] is None and before["state"] in (
                "processing", "sending", "delivered", "failed", "unrouted", "refused"):
            logger.warning("instance sop=%s series=%s arrived after the series was %s: the series is re-opened "
                           "and will be routed and processed again with it", sop_uid, series_uid, before["state"])
        if conflict is not None:
            logger.warning("instance sop=%s is already stored in series %s; stored again in series %s as the "
                           "sender meant (a modality reusing SOP Instance UIDs, or a re-sent corrected series)",
                           sop_uid, conflict["series_uid"], series_uid)
        _count(stats, "received")
    if ctx.decoded is not None and modality == "PT":
        # The data set decoded for the checks is what processing would read back from the file: keep it.
        ctx.decoded.put(series_uid, path, ds, str(event.context.transfer_syntax), len(data))
    if ctx.on_received is not None:
        count = (before["received_count"] if before is not None else 0) + (outcome is StoreOutcome.NEW)
        ctx.on_received(series_uid, expected is not None and count >= expected)
    return Status.SUCCESS


def _count(stats: AssociationStats | None, name: str) -> None:
    if stats is not None:
        setattr(stats, name, getattr(stats, name) + 1)
