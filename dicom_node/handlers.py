"""pynetdicom event handlers: pure functions with their dependencies bound in a :class:`ReceiveContext`.

A handler never raises and never does heavy work on the association thread: ``handle_store`` checks the
dataset, writes it durably, records it and answers. Completion, routing and denoising happen elsewhere.
"""

from __future__ import annotations

import enum
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.errors import DiskFullError, StorageError
from dicom_node.spool import Spool
from dicom_node.state import InstanceRecord, StateDB

if TYPE_CHECKING:
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """The DIMSE statuses petnode answers a C-STORE with (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk full or above the watermark: nothing was written
    DATASET_MISMATCH = 0xA900  # a required attribute (UIDs, Pixel Data) is missing or wrong
    CANNOT_UNDERSTAND = 0xC210  # the dataset cannot be decoded (truncated, malformed)
    PROCESSING_FAILURE = 0x0110  # anything unexpected (bug, database error): the sender should retry


# SOP classes whose instances must carry Pixel Data (everything we accept is an image).
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
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


@dataclass
class AssociationStats:
    calling_ae: str
    peer: str
    received: int = 0
    duplicates: int = 0
    refused: int = 0


@dataclass
class ReceiveContext:
    """What the handlers need; bound once when the server starts."""

    spool: Spool
    db: StateDB
    on_received: Any = None  # optional callable(series_uid) -> None: a hint for the scheduler
    _stats: dict[int, AssociationStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stats_for(self, assoc: Any) -> AssociationStats | None:
        with self._lock:
            return self._stats.get(id(assoc))


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


def handle_accepted(event: Event, ctx: ReceiveContext) -> None:
    assoc = event.assoc
    stats = AssociationStats(calling_ae=assoc.requestor.ae_title, peer=_peer(assoc))
    with ctx._lock:
        ctx._stats[id(assoc)] = stats
    try:
        ctx.db.association_opened(_assoc_id(assoc), stats.calling_ae, assoc.acceptor.ae_title, stats.peer)
    except Exception:  # noqa: BLE001 - status bookkeeping must never break an association
        logger.exception("could not record association assoc=%s", _assoc_id(assoc))
    logger.info("association accepted assoc=%s from %s (%s) to %s", _assoc_id(assoc), stats.calling_ae,
                stats.peer, assoc.acceptor.ae_title)


def handle_rejected(event: Event) -> None:
    assoc = event.assoc
    logger.warning("association rejected from calling AE %r at %s (called AE %r): not allowed by the node's "
                   "settings (allowed_calling_aes / max_associations)", assoc.requestor.ae_title,
                   _peer(assoc), assoc.acceptor.ae_title)


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
    logger.info("association %s assoc=%s from %s: received %d, duplicates %d, refused %d", how,
                _assoc_id(assoc), stats.calling_ae, stats.received, stats.duplicates, stats.refused)


def handle_echo(event: Event) -> int:
    return Status.SUCCESS


def _floats(ds: Dataset, keyword: str) -> tuple[float, ...] | None:
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
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated)) // 8
    except (AttributeError, TypeError, ValueError) as exc:
        return Status.DATASET_MISMATCH, f"image pixel attributes unreadable ({exc})"
    try:
        actual = len(ds.PixelData)
    except Exception as exc:  # noqa: BLE001 - reading the value hit the truncation
        return Status.CANNOT_UNDERSTAND, f"Pixel Data cannot be read ({type(exc).__name__}: {exc})"
    if actual < expected:
        return Status.CANNOT_UNDERSTAND, f"Pixel Data truncated: {actual} bytes, {expected} expected"
    return None


def handle_store(event: Event, ctx: ReceiveContext) -> int:
    """Check, write durably, record, then acknowledge one instance."""
    assoc = event.assoc
    stats = ctx.stats_for(assoc)
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    try:
        try:
            ds = event.dataset
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
            sop_class = str(ds.SOPClassUID)
            sop_uid = str(ds.SOPInstanceUID)
            modality = str(ds.get("Modality", ""))
        except AttributeError as exc:
            logger.warning("C-STORE refused 0x%04X sop=%s: required attribute missing (%s)",
                           Status.DATASET_MISMATCH, sop_uid, exc)
            _count(stats, "refused")
            return Status.DATASET_MISMATCH
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's dataset
            logger.warning("C-STORE refused 0x%04X sop=%s: dataset cannot be decoded (%s: %s)",
                           Status.CANNOT_UNDERSTAND, sop_uid, type(exc).__name__, exc)
            _count(stats, "refused")
            return Status.CANNOT_UNDERSTAND

        if ctx.db.has_instance(sop_uid):
            logger.info("duplicate instance sop=%s series=%s: already stored, kept the first copy",
                        sop_uid, series_uid)
            _count(stats, "duplicates")
            return Status.SUCCESS

        if sop_class in IMAGE_STORAGE_CLASSES:
            problem = _pixel_problem(ds, UID(event.context.transfer_syntax))
            if problem:
                status, reason = problem
                logger.warning("C-STORE refused 0x%04X sop=%s series=%s: %s", status, sop_uid, series_uid,
                               reason)
                _count(stats, "refused")
                return status

        try:
            path = ctx.spool.store(study_uid, series_uid, sop_uid, event.encoded_dataset())
        except DiskFullError as exc:
            logger.error("C-STORE refused 0x%04X sop=%s series=%s: %s", Status.OUT_OF_RESOURCES, sop_uid,
                         series_uid, exc)
            _count(stats, "refused")
            return Status.OUT_OF_RESOURCES

        expected = ds.get("NumberOfSlices") if modality == "PT" and "NumberOfFrames" not in ds else None
        record = InstanceRecord(
            sop_instance_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, sop_class_uid=sop_class,
            modality=modality, path=path, ipp=_floats(ds, "ImagePositionPatient"),
            iop=_floats(ds, "ImageOrientationPatient"), expected_count=int(expected) if expected else None,
            calling_ae=assoc.requestor.ae_title, called_ae=assoc.acceptor.ae_title,
            peer_host=str(assoc.requestor.address),
        )
        if not ctx.db.record_instance(record):
            # Another association stored the same instance between our check and now: same bytes, same path.
            _count(stats, "duplicates")
            return Status.SUCCESS
        _count(stats, "received")
        if ctx.on_received is not None:
            ctx.on_received(series_uid)
        return Status.SUCCESS
    except StorageError as exc:
        logger.error("C-STORE failed 0x%04X sop=%s: %s", Status.OUT_OF_RESOURCES, sop_uid, exc)
        _count(stats, "refused")
        return Status.OUT_OF_RESOURCES
    except Exception:  # noqa: BLE001 - a handler never raises; the sender keeps its copy and can retry
        logger.exception("C-STORE failed 0x%04X sop=%s: unexpected error", Status.PROCESSING_FAILURE, sop_uid)
        _count(stats, "refused")
        return Status.PROCESSING_FAILURE


def _count(stats: AssociationStats | None, name: str) -> None:
    if stats is not None:
        setattr(stats, name, getattr(stats, name) + 1)
