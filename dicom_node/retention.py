"""Retiring finished series: retention by age per final state, and room made under disk pressure.

A series is *finished* when nothing will happen to it unless a person or a sender acts: delivered, our own
output come back, unrouted (no rule wanted it), refused, incomplete, failed. Only finished series are ever
removed; receiving, complete, processing and sending series never are. A purge holds the series' lock, which
``handle_store`` also holds, so an instance arriving during a purge is either seen by it (and the purge backs
off) or stored after it (and the series starts over): never acknowledged and then deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.errors import StorageError
from dicom_node.settings import NodeSettings, RetentionSettings
from dicom_node.spool import Spool, disk_problem, safe_name
from dicom_node.state import SeriesState, StateDB

logger = logging.getLogger(__name__)

# Removal order under disk pressure: what nobody will look at again goes first, what needs a person last.
EVICTION_ORDER: tuple[SeriesState, ...] = (
    SeriesState.OWN_OUTPUT, SeriesState.DROPPED, SeriesState.DELIVERED, SeriesState.UNROUTED, SeriesState.REFUSED,
    SeriesState.INCOMPLETE, SeriesState.FAILED,
)


def max_age_h(retention: RetentionSettings, state: str) -> float | None:
    """Retention age of a final state in hours; None for states that are never removed."""
    return getattr(retention, f"{state}_max_age_h", None) if state in EVICTION_ORDER else None


def finished_at(row: dict[str, Any]) -> float:
    return float(row["delivered_at"] or row["updated_at"] or row["last_received"] or 0.0)


def series_dirs(spool: Spool, row: dict[str, Any]) -> list[Path]:
    uid = row["series_uid"]
    return [spool.root / safe_name(row["study_uid"] or "") / safe_name(uid), spool.outputs / safe_name(uid)]


def disk_bytes(paths: list[Path]) -> int:
    total = 0
    for folder in paths:
        if folder.is_dir():
            for f in folder.rglob("*"):
                try:
                    total += f.stat().st_size if f.is_file() else 0
                except OSError:
                    pass
    return total


@dataclass(frozen=True)
class Candidate:
    series_uid: str
    state: str
    modality: str
    finished_at: float
    size_bytes: int


def finished_series(db: StateDB) -> list[dict[str, Any]]:
    """Finished series that still have files, in eviction order (state rank, then oldest first).

    A series something is still being sent for is not finished, whatever its state (a series whose processing
    failed while its original is still being forwarded, an incomplete one forwarded as it is); nor is the MR or
    CT prior of a PET series still waiting, queued, processing or sending.
    """
    active = db.series_with_active_sends() | db.priors_in_use()
    rows = [r for r in db.list_series(list(EVICTION_ORDER), limit=1_000_000)
            if r["purged_at"] is None and r["series_uid"] not in active]
    rank = {s.value: i for i, s in enumerate(EVICTION_ORDER)}
    return sorted(rows, key=lambda r: (rank[r["state"]], finished_at(r)))


def eviction_candidates(db: StateDB, spool: Spool, limit: int = 5) -> list[Candidate]:
    """What disk pressure would remove next (for ``petnode status``)."""
    out = []
    for row in finished_series(db)[:limit]:
        out.append(Candidate(row["series_uid"], row["state"], row["modality"] or "", finished_at(row),
                             disk_bytes(series_dirs(spool, row))))
    return out


def purge_series(db: StateDB, spool: Spool, row: dict[str, Any], reason: str) -> bool:
    """Remove a finished series' spool and outputs and record it; False when it changed meanwhile or failed."""
    uid = row["series_uid"]
    with spool.series_lock(uid):
        now_row = db.series(uid)
        if (now_row is None or now_row["state"] != row["state"] or now_row["purged_at"] is not None
                or now_row["last_received"] != row["last_received"]):
            logger.info("series=%s: not removed (%s): it changed since it was chosen", uid, reason)
            return False
        try:
            for folder in series_dirs(spool, now_row):
                spool.remove_tree(folder)
        except (OSError, StorageError) as exc:
            logger.error("series=%s: could not remove its files (%s): %s; kept as it is, tried again later", uid,
                         reason, exc)
            return False
        db.mark_purged(uid)
    logger.info("series=%s state=%s: spool and outputs removed (%s)", uid, row["state"], reason)
    return True


def run_retention(db: StateDB, spool: Spool, retention: RetentionSettings, now: float | None = None) -> int:
    """Remove every finished series older than its state's retention age; the number removed."""
    now = time.time() if now is None else now
    purged = 0
    for row in finished_series(db):
        age_h = max_age_h(retention, row["state"])
        if age_h is None or finished_at(row) > now - age_h * 3600.0:
            continue
        if purge_series(db, spool, row, f"retention: {row['state']} for more than {age_h:g} h"):
            purged += 1
    forgotten = db.forget_forwarded(now - retention.forwarded_memory_days * 86400.0)
    if forgotten:
        logger.info("forgot %d forwarded instance(s) older than %g days (loop guard memory)", forgotten,
                    retention.forwarded_memory_days)
    return purged


def _pressure(settings: NodeSettings) -> str | None:
    """Why the disk is within the eviction headroom of its watermark (None when it is clear)."""
    disk = settings.disk
    return disk_problem(settings.data_dir, disk.model_copy(update={
        "min_free_mb": disk.min_free_mb + disk.evict_headroom_mb,
        "max_used_percent": max(0.1, disk.max_used_percent - disk.evict_headroom_percent)}))


def relieve_pressure(db: StateDB, spool: Spool, settings: NodeSettings) -> int:
    """Under disk pressure, remove the oldest finished series until the disk is clear; the number removed."""
    purged = 0
    why = _pressure(settings)
    for row in finished_series(db):
        if why is None:
            return purged
        if purge_series(db, spool, row, f"disk pressure: {why}"):
            purged += 1
        why = _pressure(settings)
    if why and disk_problem(settings.data_dir, settings.disk):
        logger.error("disk full and nothing finished left to remove: %s; new instances are refused (0xA700)", why)
    return purged
