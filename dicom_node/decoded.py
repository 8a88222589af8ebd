"""Decoded instances kept from receipt to processing, so a series is not read and decoded twice.

The C-STORE handler decodes every data set for its checks. For PET instances it hands that decoded data set
(header and pixel bytes, exactly the bytes it wrote to the spool) to this cache, keyed by the spool path. When the
series is processed, :func:`dicom_node.series.load_pet_series` takes each file from here instead of reading and
decoding it again; whatever is missing (evicted, received before a restart) is read from disk as before. The disk
stays the truth: the cache only saves work, and is bounded (``workers.decoded_cache_mb``), oldest series out first.

Measured on the 267-slice real PET series: loading from the cache takes about 0.1 s instead of 0.45 s, which is
taken straight off the series latency (``docs/bench/data-path.md``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset

logger = logging.getLogger(__name__)

Reader = Callable[[Path], Dataset]

# A decoded header holds its raw element values plus pydicom's per-element objects: about twice the encoded size.
_OVERHEAD = 2


class DecodedCache:
    """Decoded data sets by spool path, grouped by series; thread-safe; at most ``max_bytes`` (estimated)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._series: OrderedDict[str, dict[str, tuple[Dataset, int]]] = OrderedDict()
        self._where: dict[str, str] = {}  # path -> series
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, series_uid: str, path: Path, ds: Dataset, transfer_syntax: str, encoded_bytes: int) -> None:
        """Keep ``ds`` (the data set stored at ``path``) for the processing of ``series_uid``."""
        cost = _OVERHEAD * int(encoded_bytes)
        if cost > self.max_bytes:
            return
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = transfer_syntax  # what pixel decoding reads, as for a file read from disk
        ds.file_meta = meta
        with self._lock:
            entries = self._series.setdefault(series_uid, {})
            self._series.move_to_end(series_uid)
            old = entries.pop(str(path), None)
            if old is not None:
                self._bytes -= old[1]
            elif str(path) in self._where:  # the same file under another series UID before: that copy is stale
                stale = self._series.get(self._where[str(path)], {}).pop(str(path), None)
                self._bytes -= stale[1] if stale is not None else 0
            entries[str(path)] = (ds, cost)
            self._where[str(path)] = series_uid
            self._bytes += cost
            while self._bytes > self.max_bytes and self._series:
                evicted_uid, evicted = self._series.popitem(last=False)
                self._forget(evicted)
                logger.debug("decoded cache full: dropped series %s (%d instances; read from disk when processed)",
                             evicted_uid, len(evicted))

    def take(self, path: Path) -> Dataset | None:
        """The decoded data set stored at ``path``, removed from the cache; None when it is not here."""
        key = str(path)
        with self._lock:
            uid = self._where.pop(key, None)
            entries = self._series.get(uid) if uid is not None else None
            found = entries.pop(key, None) if entries is not None else None
            if found is None:
                self.misses += 1
                return None
            self._bytes -= found[1]
            if not entries:
                del self._series[uid]
            self.hits += 1
            return found[0]

    def drop_series(self, series_uid: str) -> None:
        """Forget a series (processed, or routed somewhere that never loads it)."""
        with self._lock:
            entries = self._series.pop(series_uid, None)
            if entries:
                self._forget(entries)

    def _forget(self, entries: dict[str, tuple[Dataset, int]]) -> None:
        for key, (_, cost) in entries.items():
            self._bytes -= cost
            self._where.pop(key, None)

    def reader(self, fallback: Reader) -> Reader:
        """A reader for :func:`~dicom_node.series.load_pet_series`: from the cache, else ``fallback(path)``."""

        def read(path: Path) -> Dataset:
            ds = self.take(path)
            return ds if ds is not None else fallback(path)

        return read

