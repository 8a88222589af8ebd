"""Durable files in the data directory: atomic, fsynced writes and the disk watermark.

Layout under the data directory::

    spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   what senders stored, byte for byte as received
    spool/<StudyUID>/<SeriesUID>/.versions/...           earlier versions of instances that came again changed
    outputs/<SeriesUID>/<route>/NNNN.dcm                 derived series written by the pipeline
    state.sqlite3                                         the state database (see state.py)
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import DiskFullError, StorageError

if TYPE_CHECKING:  # an annotation only: the derived-series writer uses this module without the node's settings
    from dicom_node.settings import DiskSettings

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9.]{1,64}$")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID; anything that is not a plain UID is hashed (no path tricks)."""
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and uid not in (".", ".."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path) -> None:
    """Create ``path`` and fsync each new directory's parent, so the new entries survive a power cut."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)


def write_durable(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory.

    Nothing half-written is ever left under the final name; on failure the temp file is removed and
    :class:`DiskFullError` (out of space) or :class:`StorageError` is raised. ``fsync=False`` keeps the
    atomic rename but leaves flushing to the caller (e.g. one directory fsync after many files).
    """
    if fsync:
        make_dirs_durable(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _storage_error(path, exc) from exc


def write_new_durable(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data``, fsync it and its directory; False (nothing written) when it exists.

    No temp file and rename: on ext4 and XFS the file's fsync also commits its new directory entry, so the
    directory's fsync finds nothing left to do, where a rename after the fsync is one more journal commit (about
    0.2 ms of the 3 ms an instance takes to receive here). Only for files whose readers learn of them after this
    returns (received instances: the database is the commit point); on failure the partial file is removed.
    """
    make_dirs_durable(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise _storage_error(path, exc) from exc
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _storage_error(path: Path, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"out of space writing {path.name!r} in {str(path.parent)!r}")
    return StorageError(f"cannot write {str(path)!r}: {exc.strerror or exc}")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (UI padded with NUL, SH with a space, OB with NUL)."""
    if len(value) % 2:
        value += b" " if vr == b"SH" else b"\0"
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                  implementation_uid: str, implementation_version: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) for a data set received over the network.

    The same bytes pydicom and pynetdicom write for these values (tested), built directly: encoding a
    FileMetaDataset through pydicom costs about a millisecond, a large share of receiving one instance.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\0\1"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _meta_element(0x0012, b"UI", implementation_uid.encode("ascii")),
        _meta_element(0x0013, b"SH", implementation_version.encode("ascii")),
    ))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def sync_files(paths: Sequence[Path]) -> None:
    """Flush many freshly written files to disk: one ``syncfs`` of their file system where Linux offers it
    (one flush instead of one per file), else ``fsync`` of each."""
    if not paths:
        return
    libc_syncfs = _syncfs()
    if libc_syncfs is not None:
        fd = os.open(paths[0], os.O_RDONLY)
        try:
            if libc_syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _syncfs() -> Any:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


def disk_usage_mb(data_dir: Path) -> tuple[float, float, float]:
    """(free MB, total MB, used %) of the file system holding the data directory; OSError if it cannot be read."""
    usage = shutil.disk_usage(data_dir if data_dir.exists() else data_dir.parent)
    used_pct = 100.0 * (usage.total - usage.free) / usage.total if usage.total else 100.0
    return usage.free / 2**20, usage.total / 2**20, used_pct


def disk_problem(data_dir: Path, disk: DiskSettings) -> str | None:
    """Why the data directory must not take more data now (None when it may)."""
    try:
        free_mb, _, used_pct = disk_usage_mb(data_dir)
    except OSError as exc:
        return f"cannot stat data directory {str(data_dir)!r}: {exc.strerror or exc}"
    if free_mb < disk.min_free_mb:
        return f"free space {free_mb:.0f} MB is below the minimum {disk.min_free_mb:.0f} MB"
    if used_pct > disk.max_used_percent:
        return f"disk {used_pct:.1f} % used, above the watermark {disk.max_used_percent:.1f} %"
    return None


class Spool:
    """Where received instances live, byte for byte as the sender encoded them."""

    def __init__(self, data_dir: Path, disk: DiskSettings,
                 series_guard: Callable[[str], AbstractContextManager[Any]] | None = None) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "spool"
        self.outputs = data_dir / "outputs"
        self.disk = disk
        # Striped per-series locks: receiving an instance and purging its series exclude each other.
        self._series_locks = tuple(threading.RLock() for _ in range(64))
        # Several nodes sharing this spool: the same exclusion between nodes (the shared database's series lock,
        # StateDB.series_lock), taken after the in-process lock so a node's threads queue here, not on the server.
        self._series_guard = series_guard
        make_dirs_durable(self.root)
        make_dirs_durable(self.outputs)

    def series_lock(self, series_uid: str) -> AbstractContextManager[Any]:
        local = self._series_locks[hash(series_uid) % len(self._series_locks)]
        if self._series_guard is None:
            return local
        return self._guarded(local, self._series_guard, series_uid)

    @staticmethod
    @contextmanager
    def _guarded(local: threading.RLock, guard: Callable[[str], AbstractContextManager[Any]],
                 series_uid: str) -> Iterator[None]:
        with local, guard(series_uid):
            yield

    def space_problem(self) -> str | None:
        return disk_problem(self.data_dir, self.disk)

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return self.root / safe_name(study_uid) / safe_name(series_uid) / f"{safe_name(sop_instance_uid)}.dcm"

    def output_dir(self, series_uid: str, route: str) -> Path:
        return self.outputs / safe_name(series_uid) / route

    def check_space(self) -> None:
        problem = self.space_problem()
        if problem:
            raise DiskFullError(problem)

    def store(self, study_uid: str, series_uid: str, sop_instance_uid: str, data: bytes) -> Path:
        """Write a received instance durably (data and directory entry) and return its path.

        A new instance is written straight under its final name (``write_new_durable``): the database records
        the file only after this returns, so a write a crash interrupts is an unrecorded file that the start-up
        sweep removes (``sweep_orphans``), and nothing reads spool files the database does not know. Where the
        name exists already (a changed version of a recorded instance, or such a left-over) the new bytes
        replace it atomically (``write_durable``).
        """
        self.check_space()
        path = self.instance_path(study_uid, series_uid, sop_instance_uid)
        if not write_new_durable(path, data):
            write_durable(path, data)
        return path

    def keep_previous_version(self, path: str | Path, *, digest: str) -> Path:
        """Keep the current file of an instance that is about to be replaced by other content.

        A hard link under ``.versions/`` (no copy: the new version is written to a new inode and renamed over
        the old name), made durable before the new version is written.
        """
        current = Path(path)
        versions = current.parent / ".versions"
        make_dirs_durable(versions)
        kept = versions / f"{current.stem}.{digest[:16]}{current.suffix}"
        if not kept.exists():
            try:
                os.link(current, kept)
            except OSError as exc:
                raise StorageError(f"cannot keep the previous version of {str(current)!r}: "
                                   f"{exc.strerror or exc}") from exc
            fsync_dir(versions)
        return kept

    def sweep_orphans(self, known: set[str], min_age_s: float = 0.0) -> list[Path]:
        """Remove spool files the database does not know: written by a process killed before it recorded them
        (their C-STORE was never acknowledged, so the sender still has them) and temp files of such writes.

        ``min_age_s``: only files (and empty folders) not changed for that long. A spool shared by several nodes
        needs it: another node may be writing a file, or have just renamed one into place, and not yet recorded
        it (``known`` was read before the walk); its age is the newest of its mtime and ctime, as a kept previous
        version is a fresh hard link to an old file.
        """
        removed: list[Path] = []
        known_resolved = {str(Path(k).resolve()) for k in known}
        cutoff = time.time() - min_age_s

        def young(path: Path) -> bool:
            if min_age_s <= 0:
                return False
            try:
                st = path.stat()
            except OSError:
                return True  # gone meanwhile (renamed into place, or removed by its writer)
            return max(st.st_mtime, st.st_ctime) > cutoff

        for path in self.root.rglob("*"):
            if not path.is_file() or young(path):
                continue
            is_temp = path.name.startswith(".") and path.name.endswith(".tmp")
            if is_temp or (path.suffix == ".dcm" and str(path.resolve()) not in known_resolved):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError as exc:
                    logger.warning("could not remove orphan spool file %s: %s", path, exc.strerror or exc)
        for folder in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if young(folder):  # another node may be about to write its first file there
                continue
            try:
                folder.rmdir()  # only empty ones
            except OSError:
                pass
        return removed

    def remove_tree(self, path: Path) -> None:
        """Remove a folder of ours (retention); refuses anything outside the data directory.

        Errors propagate (OSError): a purge that did not delete must not be recorded as done.
        """
        resolved = path.resolve()
        if self.data_dir.resolve() not in resolved.parents:
            raise StorageError(f"refusing to remove {str(path)!r}: outside the data directory")
        if resolved.exists():
            shutil.rmtree(resolved)
