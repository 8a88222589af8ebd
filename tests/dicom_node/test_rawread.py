"""The plain-file reader (dicom_node/rawread.py): the same data set as pydicom's dcmread, element for element and
sequence for sequence; pydicom's reader for anything it does not take; the same volume and derived bytes."""

from __future__ import annotations

import datetime as dt
import filecmp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

import dicom_node.series as series_module
from dicom_node.outputs.derived_pet import Provenance, write_derived_pet
from dicom_node.rawread import file_meta_uids, read_plain
from dicom_node.series import DEFER_BYTES, load_pet_series
from tests.factories import make_pet_series, write_series


def _values(ds: Any) -> dict[int, Any]:
    return {int(e.tag): (e.VR, [_values(i) for i in e.value] if e.VR == "SQ" else e.value) for e in ds}


def _assert_same(path: Path, defer_size: int | None = DEFER_BYTES) -> Any:
    ours, theirs = read_plain(path, defer_size), dcmread(path, defer_size=defer_size)
    assert ours is not None
    assert _values(ours) == _values(theirs)  # every element decoded, sequences item by item
    assert _values(ours.file_meta) == _values(theirs.file_meta)
    assert ours.original_encoding == theirs.original_encoding and ours.preamble == theirs.preamble
    assert ours.original_character_set == theirs.original_character_set
    return ours


def _nested(undefined: bool) -> Sequence:
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "C-B1031", "SRT", "Fluorodeoxyglucose F^18^"
    item = Dataset()
    item.RadiopharmaceuticalCodeSequence = Sequence([inner])
    item.RadionuclideTotalDose = "370000000"
    seq = Sequence([item, Dataset()])  # an empty item too
    if undefined:
        item["RadiopharmaceuticalCodeSequence"].is_undefined_length = True
    return seq


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_the_same_data_set_as_pydicom(tmp_path: Path, syntax: str, undefined: bool) -> None:
    ds = make_pet_series(shape=(1, 128, 128), seed=1, transfer_syntax=syntax)[0]  # 32 KB of pixels: deferred
    ds.RadiopharmaceuticalInformationSequence = _nested(undefined)
    ds["RadiopharmaceuticalInformationSequence"].is_undefined_length = undefined
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    path = write_series([ds], tmp_path)[0]
    # Pixel Data over the deferral size is left in the file until asked for, as pydicom does.
    fresh = read_plain(path, DEFER_BYTES)
    assert fresh is not None and fresh.get_item(0x7FE00010, keep_deferred=True).value is None
    assert dcmread(path, defer_size=DEFER_BYTES).get_item(0x7FE00010, keep_deferred=True).value is None
    ours = _assert_same(path)
    assert ours.PatientName == "Müller^Jürgen"
    assert ours["RadiopharmaceuticalInformationSequence"].is_undefined_length is undefined
    assert ours.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence[0].CodeValue == "C-B1031"
    assert np.array_equal(ours.pixel_array, dcmread(path).pixel_array)
    _assert_same(path, None)


def test_what_it_does_not_take_is_left_to_pydicom(tmp_path: Path) -> None:
    good = write_series(make_pet_series(shape=(1, 8, 8), seed=2), tmp_path / "good")[0]
    data = good.read_bytes()
    (tmp_path / "bare.dcm").write_bytes(data[128:])  # no preamble
    (tmp_path / "cut.dcm").write_bytes(data[:-40])  # truncated in Pixel Data
    (tmp_path / "empty.dcm").write_bytes(b"")
    compressed = write_series(make_pet_series(shape=(1, 8, 8), seed=3, transfer_syntax=RLELossless),
                              tmp_path / "rle")[0]
    private = make_pet_series(shape=(1, 8, 8), seed=4)[0]
    block = private.private_block(0x0009, "PETNODE TEST", create=True)
    block.add_new(0x01, "SQ", Sequence([Dataset()]))
    private[0x00091001].is_undefined_length = True
    private_path = write_series([private], tmp_path / "private")[0]
    for path in (tmp_path / "bare.dcm", tmp_path / "cut.dcm", tmp_path / "empty.dcm", compressed):
        assert read_plain(path, DEFER_BYTES) is None, path.name
    # A private sequence of undefined length in explicit VR says it is one: read here, like pydicom.
    _assert_same(private_path)


def test_the_loader_gives_the_same_volume_and_the_same_derived_bytes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_series(make_pet_series(shape=(12, 16, 16), seed=5, transfer_syntax=ImplicitVRLittleEndian),
                         tmp_path / "pet")
    _check_loader(files, tmp_path, monkeypatch)


def test_real_series_read_the_same(realdata: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("mirp_tcia_sts_001_fdg_pet/PT_AC", "pynemaiqpet_nema_iq/pet_recon_1"):
        files = sorted(p for p in (realdata / folder).iterdir() if p.is_file())
        for path in files[:5]:
            _assert_same(path)
        _check_loader(files, tmp_path / folder.replace("/", "_"), monkeypatch)


def _check_loader(files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prov = Provenance("gaussian", {"fwhm_mm": 4.0}, "pet-gaussian")
    created = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    ours = load_pet_series(files)
    monkeypatch.setattr(series_module, "read_instance", lambda p: dcmread(p, defer_size=DEFER_BYTES))
    theirs = load_pet_series(files)
    monkeypatch.undo()
    assert np.array_equal(ours.array, theirs.array)
    assert (ours.spacing, ours.positions, ours.suv_factor, ours.units) == (theirs.spacing, theirs.positions,
                                                                          theirs.suv_factor, theirs.units)
    a = write_derived_pet(ours, ours.array, tmp_path / "a", prov, created=created)
    b = write_derived_pet(theirs, theirs.array, tmp_path / "b", prov, created=created)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_file_meta_uids_match_pydicom(tmp_path: Path, syntax: str) -> None:
    files = write_series(make_pet_series(shape=(2, 8, 8), seed=4, transfer_syntax=syntax), tmp_path / "s")
    for path in files:
        meta = read_file_meta_info(path)
        assert file_meta_uids(path) == (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID),
                                        str(meta.MediaStorageSOPInstanceUID))
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(files[0].read_bytes()[128:])  # no preamble: pydicom's case
    assert file_meta_uids(bare) is None
