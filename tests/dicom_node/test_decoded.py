"""The decoded-instance cache: what the C-STORE handler decoded is what processing would read from disk."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode

from dicom_node.decoded import DecodedCache
from dicom_node.outputs import Provenance, write_derived_pet
from dicom_node.series import load_pet_series, read_instance
from training.dicom_export import make_pet_series, write_series

PROV = Provenance(method="gaussian", params={"fwhm_mm": 4.0}, route="r")
WHEN = dt.datetime(2026, 12, 4, 21, 0, 0, tzinfo=dt.timezone.utc)


def _as_received(path: Path) -> tuple:
    """The data set as the C-STORE handler has it: decoded by pynetdicom from the bytes after the file meta."""
    raw = path.read_bytes()
    ds_on_disk = dcmread(path, stop_before_pixels=True)
    syntax = ds_on_disk.file_meta.TransferSyntaxUID
    body = raw[raw.index(b"DICM") + 4:]
    meta_len = int.from_bytes(body[8:12], "little")  # (0002,0000) UL group length
    data = body[12 + meta_len:]
    ds = decode(io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian)
    return ds, str(syntax), len(data)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_series_loaded_from_the_cache_writes_the_same_bytes_as_from_disk(tmp_path: Path, syntax: str) -> None:
    paths = write_series(make_pet_series(shape=(6, 16, 16), seed=41, transfer_syntax=syntax), tmp_path / "src")
    cache = DecodedCache(64 << 20)
    for path in reversed(paths):  # arrival order is not slice order
        ds, ts, size = _as_received(path)
        cache.put("1.2.3", path, ds, ts, size)
    assert cache.size_bytes > 0
    read: list[Path] = []

    def from_disk(path: Path):  # type: ignore[no-untyped-def]
        read.append(path)
        return dcmread(path)

    cached = load_pet_series(paths, reader=cache.reader(from_disk))
    assert read == [] and cache.hits == 6 and cache.size_bytes == 0  # every slice came from the cache, once
    disk = load_pet_series(paths)
    np.testing.assert_array_equal(cached.array, disk.array)
    assert cached.suv_factor == disk.suv_factor and cached.spacing == disk.spacing
    a = write_derived_pet(cached, cached.array, tmp_path / "a", PROV, created=WHEN)
    b = write_derived_pet(disk, disk.array, tmp_path / "b", PROV, created=WHEN)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_missing_entries_are_read_from_disk_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    paths = write_series(make_pet_series(shape=(4, 16, 16), seed=42), tmp_path / "src")
    entries = [_as_received(p) for p in paths]
    per_instance = 2 * entries[0][2]
    cache = DecodedCache(per_instance * 3)  # room for three instances
    for path, (ds, ts, size) in zip(paths, entries):
        cache.put("series-a", path, ds, ts, size)
    assert cache.size_bytes <= cache.max_bytes
    other = write_series(make_pet_series(shape=(2, 16, 16), seed=43), tmp_path / "other")
    ds, ts, size = _as_received(other[0])
    cache.put("series-b", other[0], ds, ts, size)  # the oldest series goes out as a whole
    assert cache.take(paths[0]) is None and cache.take(other[0]) is not None
    # Past the cache the node reads as the loader does by default (Pixel Data deferred, sequences raw): the
    # volume and the derived files are those of a read from disk alone.
    hits = cache.hits
    volume = load_pet_series(paths, reader=cache.reader(read_instance))
    assert volume.array.shape == (4, 16, 16) and cache.hits == hits  # series-a went out whole: all from disk
    disk = load_pet_series(paths, reader=dcmread)
    np.testing.assert_array_equal(volume.array, disk.array)
    a = write_derived_pet(volume, volume.array, tmp_path / "a", PROV, created=WHEN)
    b = write_derived_pet(disk, disk.array, tmp_path / "b", PROV, created=WHEN)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]

    cache.put("series-c", other[1], *_as_received(other[1]))
    cache.drop_series("series-c")
    assert cache.size_bytes == 0 and cache.take(other[1]) is None


def test_an_instance_received_again_replaces_its_cached_copy(tmp_path: Path) -> None:
    paths = write_series(make_pet_series(shape=(2, 16, 16), seed=44), tmp_path / "src")
    cache = DecodedCache(16 << 20)
    first, ts, size = _as_received(paths[0])
    cache.put("s", paths[0], first, ts, size)
    second, ts, size = _as_received(paths[0])
    cache.put("s", paths[0], second, ts, size)
    assert cache.size_bytes == 2 * size
    assert cache.take(paths[0]) is second and cache.size_bytes == 0


def test_a_zero_sized_cache_keeps_nothing(tmp_path: Path) -> None:
    paths = write_series(make_pet_series(shape=(1, 16, 16), seed=45), tmp_path / "src")
    cache = DecodedCache(0)
    cache.put("s", paths[0], *_as_received(paths[0]))
    assert cache.size_bytes == 0 and cache.take(paths[0]) is None
