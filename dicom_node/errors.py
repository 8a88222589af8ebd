"""The one root exception of the service and its specific subclasses.

Messages quote the offending value. DICOM handlers never let these escape: they map them to status codes.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Root of every error raised by ``dicom_node``."""


class ConfigError(DicomNodeError):
    """A configuration or rules file is invalid (names the file, the key and the bad value)."""


class StorageError(DicomNodeError):
    """The spool or the state database could not be written or read."""


class DiskFullError(StorageError):
    """The data directory is out of space or above the configured watermark."""


class SeriesError(DicomNodeError):
    """A series cannot be assembled into a volume (geometry, orientation, mixed series, missing pixels)."""


class MultiFrameError(SeriesError):
    """A multi-frame PET instance cannot be read as one volume (dynamic or gated frames, functional groups that
    do not match the frames, classic and multi-frame instances mixed in one series)."""


class SuvError(SeriesError):
    """The attributes that SUV needs are missing or inconsistent."""


class RoutingError(DicomNodeError):
    """A series cannot be routed (no rule, unknown peer, refused by the rule)."""


class OutputWriteError(DicomNodeError):
    """A derived object could not be written."""


class SendError(DicomNodeError):
    """A C-STORE to a destination failed (association refused, instance rejected, timeout)."""


class PriorError(DicomNodeError):
    """An MR or CT prior cannot be put on the PET grid (not a regular MR/CT volume, another Frame of Reference
    where registration is not allowed, no overlap with the PET, or a registration that fails its quality gate)."""


class WorkerError(DicomNodeError):
    """A job run on a Celery worker (distributed processing) failed there, or no worker answered in time."""


class ProcessingInterrupted(DicomNodeError):
    """The node stopped while a worker ran a series' job: the series stays in processing and runs again after the
    restart (not a failure of the series)."""
