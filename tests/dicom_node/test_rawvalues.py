"""Raw value readers (dicom_node/rawvalues.py): the same values pydicom decodes, and the elements left raw."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node import rawvalues
from tests.factories import make_pet_series


def _round_trip(ds: Dataset, syntax: str) -> Dataset:
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_values_equal_pydicoms_and_elements_stay_raw(syntax: str) -> None:
    source = make_pet_series(shape=(2, 6, 5), seed=3)[1]
    source.NumberOfSlices = 2
    source.ImageIndex = 2
    source.Modality = "PT"
    fast, slow = _round_trip(source, syntax), _round_trip(source, syntax)
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID", "Modality"):
        assert rawvalues.text(fast, kw) == str(slow[kw].value)
    for kw in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfSlices", "ImageIndex"):
        assert rawvalues.integer(fast, kw) == int(slow[kw].value), kw
    for kw in ("ImagePositionPatient", "ImageOrientationPatient"):
        raw = rawvalues.decimals(fast, kw)
        assert raw is not None and raw == [float(v) for v in slow[kw].value]
    assert rawvalues.value_length(fast, "PixelData") == len(slow.PixelData) == 6 * 5 * 2
    # Read this way they stay undecoded (shared between slices, copied as they came by the derived writer);
    # big endian binary goes through pydicom, which decodes it.
    assert isinstance(fast._dict[0x00080018], RawDataElement)
    assert isinstance(fast._dict[0x00200032], RawDataElement)
    assert isinstance(fast._dict[0x00280010], RawDataElement) == (syntax != ExplicitVRBigEndian)


def test_absent_empty_decoded_and_odd_values() -> None:
    ds = _round_trip(make_pet_series(shape=(1, 4, 4), seed=1)[0], ImplicitVRLittleEndian)
    assert rawvalues.text(ds, "AccessionNumber") == "ACC0001"
    del ds.AccessionNumber
    assert rawvalues.text(ds, "AccessionNumber") is None
    ds._dict[0x00080060] = RawDataElement(0x00080060, None, 0, b"", 0, True, True)  # Modality present, empty
    assert rawvalues.text(ds, "Modality") == "" == ds.copy().Modality
    assert rawvalues.integer(ds, "NumberOfFrames") is None
    ds.Rows = 7  # decoded now: read through pydicom
    assert rawvalues.integer(ds, "Rows") == 7
    odd = Dataset()
    odd._dict[0x00280008] = RawDataElement(0x00280008, None, 4, b"12.0", 0, True, True)  # IS as a decimal
    assert rawvalues.integer(odd, "NumberOfFrames") == 12  # pydicom's IS accepts it, so does this
    odd._dict[0x00280008] = RawDataElement(0x00280008, "IS", 4, b" 9 ", 0, False, True)
    assert rawvalues.integer(odd, "NumberOfFrames") == 9 and isinstance(odd._dict[0x00280008], RawDataElement)
    odd.ImagePositionPatient = ["1", "nan", "3"]
    assert rawvalues.decimals(odd, "ImagePositionPatient") is None  # decoded: the caller asks pydicom
    with pytest.raises(KeyError):
        rawvalues.text(odd, "NotAKeyword")


def test_raw_text_strips_padding_like_pydicom() -> None:
    ds = Dataset()
    ds._dict[0x00080018] = RawDataElement(0x00080018, None, 8, b"1.2.345\0", 0, True, True)
    ds._dict[0x00080060] = RawDataElement(0x00080060, "CS", 4, b"PT  ", 0, False, True)
    assert rawvalues.text(ds, "SOPInstanceUID") == "1.2.345" == str(Dataset.__getitem__(ds.copy(), 0x00080018).value)
    assert rawvalues.text(ds, "Modality") == "PT"


def test_an_undecodable_integer_is_none_not_an_exception() -> None:
    """The handler answers 0xA900 for image attributes it cannot read: the reader must not raise on them."""
    ds = Dataset()
    ds._dict[0x00280010] = RawDataElement(0x00280010, "US", 3, b"\x01\x02\x03", 0, False, True)  # odd length
    ds._dict[0x00280011] = RawDataElement(0x00280011, "IS", 3, b"abc", 0, False, True)  # not even a number
    assert rawvalues.integer(ds, "Rows") is None
    assert rawvalues.integer(ds, "Columns") is None
