"""Stability / uncertainty maps as Secondary Capture and Parametric Map (dicom_node.outputs.maps): dciodvfy, pixel
values, geometry, references to the source and the derived PET, deterministic UIDs, loop guard, bad inputs; from
classic and multi-frame PET sources."""

from __future__ import annotations

import datetime as dt
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.errors import OutputWriteError
from dicom_node.outputs import Provenance, derived_series_uid, is_petnode_output, write_derived_pet
from dicom_node.outputs.derived_pet import derived_instance_uids
from dicom_node.outputs.maps import MapSeries, map_series_uid, write_map_series
from dicom_node.series import PetVolume, load_pet_series
from tests.dicomtools import run_dciodvfy
from tests.factories import make_enhanced_pet_series, make_legacy_converted_pet, make_pet_series, write_series

PROV = Provenance("cdip", {"alpha": 2.0, "iterations": 300}, "pet-cdip", model_version="1.2")
CREATED = dt.datetime(2024, 1, 15, 12, 30, 0, tzinfo=dt.timezone.utc)
SHAPE = (6, 16, 20)  # rows != columns: a swapped axis shows
HOT = (2, 5, 7)  # (z, y, x) of the hot spot
SC_CLASS, PM_CLASS, PET_CLASS = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.128"


def _map(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A gradient along x and z (0 at x = 0 of the first slice) plus one hot voxel, in Bq/ml."""
    z, _, x = np.indices(shape, dtype=np.float32)
    values = 10.0 * x + 100.0 * z
    values[HOT] = 5000.0
    return values.astype(np.float32)


def _display(values: np.ndarray) -> np.ndarray:
    """The normalised stability S_norm = min(alpha * S / mean, 1) with alpha = 0.5."""
    return np.minimum(0.5 * values / values.mean(), 1.0)


def _assert_dciodvfy_clean(paths: list[Path], label: str) -> None:
    errors: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    for path in paths:
        errs, warns = run_dciodvfy(path)
        errors.update(f"{path.name}: {e}" for e in errs)
        warnings.update(warns)
    print(f"dciodvfy {label}: {len(paths)} files, {sum(errors.values())} errors, warnings:")
    for line, count in sorted(warnings.items()):
        print(f"  {count:4d} x {line}")
    assert not errors, "\n".join(errors)


@dataclass
class Written:
    volume: PetVolume
    values: np.ndarray
    derived_uid: str
    derived_paths: list[Path]
    series: dict[str, MapSeries]
    seen: list[Path]


def _write(volume: PetVolume, out: Path, values: np.ndarray | None = None, **kwargs: object) -> list[MapSeries]:
    duid = derived_series_uid(volume.series_uid, PROV)
    options: dict[str, object] = dict(
        kind="stability", derived_series_uid=duid, derived_instance_uids=derived_instance_uids(volume, duid),
        provenance=PROV, out_dir=out, units="BQML", created=CREATED,
    )
    options.update(kwargs)
    values = _map(volume.shape) if values is None else values
    return write_map_series(volume, values, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    root = tmp_path_factory.mktemp("maps")
    volume = load_pet_series(write_series(make_pet_series(shape=SHAPE, seed=3), root / "src"))
    values = _map()
    derived_paths = write_derived_pet(volume, volume.array, root / "derived", PROV)
    seen: list[Path] = []
    series = _write(volume, root / "maps", values, display=_display(values), on_written=seen.append)
    return Written(volume, values, derived_series_uid(volume.series_uid, PROV), derived_paths,
                   {s.format: s for s in series}, seen)


def _read_all(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    code = item.PurposeOfReferenceCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


# --- both formats: files, dciodvfy, identity --------------------------------------------------------------------------


def test_both_formats_are_written_under_kind_and_format_and_pass_dciodvfy(written: Written, tmp_path: Path) -> None:
    sc, pm = written.series["sc"], written.series["pm"]
    assert (sc.kind, sc.format, pm.kind, pm.format) == ("stability", "sc", "stability", "pm")
    assert [p.name for p in sc.files] == [f"{k:04d}.dcm" for k in range(SHAPE[0])]
    assert {p.parent.parts[-2:] for p in sc.files} == {("stability", "sc")}
    assert [p.parts[-3:] for p in pm.files] == [("stability", "pm", "0000.dcm")]
    assert sorted(p.name for p in sc.files[0].parent.iterdir()) == [p.name for p in sc.files]  # no temp files left
    assert written.seen == [*sc.files, *pm.files]  # on_written: each file once, in writing order
    _assert_dciodvfy_clean(sc.files, "SC from classic PET")
    _assert_dciodvfy_clean(pm.files, "PM from classic PET")


def test_identity_provenance_and_loop_guard_on_every_file(written: Written) -> None:
    vol, src = written.volume, written.volume.headers[0]
    sc, pm = written.series["sc"], written.series["pm"]
    for ds in _read_all([*sc.files, *pm.files]):
        assert is_petnode_output(ds)
        assert ds.ContributingEquipmentSequence[-1].Manufacturer == "petnode"
        assert ds.ContributingEquipmentSequence[-1].ManufacturerModelName == "cdip"
        assert list(ds.ImageType)[0] == "DERIVED"
        assert ds.StudyInstanceUID == vol.study_uid
        assert ds.FrameOfReferenceUID == vol.frame_of_reference_uid
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientWeight", "StudyDate",
                        "AccessionNumber", "StudyDescription"):
            assert ds[keyword].value == src[keyword].value, keyword
        text = ds.DerivationDescription
        assert "cdip" in text and '"alpha":2.0' in text and "model 1.2" in text and written.derived_uid in text
        assert len(text) <= 1024 and len(ds.SeriesDescription) <= 64
        assert ds.InstanceCreationDate == "20240115" and ds.ContentDate == "20240115"
        assert ds.SeriesInstanceUID not in (vol.series_uid, written.derived_uid)
    first_sc, first_pm = pydicom.dcmread(sc.files[0]), pydicom.dcmread(pm.files[0])
    assert first_sc.SOPClassUID == SC_CLASS and first_pm.SOPClassUID == PM_CLASS
    assert first_sc.SeriesDescription == sc.description == "PET WB stability (petnode cdip, 0-1)"
    assert first_pm.SeriesDescription == pm.description == "PET WB stability (petnode cdip, Bq/ml)"
    assert (first_sc.SeriesNumber, first_pm.SeriesNumber) == (sc.series_number, pm.series_number) == (1004, 1005)
    assert list(first_pm.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "STD_DEVIATION"]


def test_patient_attributes_are_copied_as_they_are_without_warnings(tmp_path: Path) -> None:
    # A de-identified name in one component (highdicom warns, quoting it) and a sex highdicom refuses ("U"): both
    # copied as the source states them, nothing raised or logged.
    series = make_pet_series(shape=(3, 8, 8), PatientName="ACRIN-042", PatientSex="U", StudyID=None)
    vol = load_pet_series(write_series(series, tmp_path / "src"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sc, pm = _write(vol, tmp_path / "out")
    for path in (sc.files[0], pm.files[0]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.PatientName, ds.PatientSex, ds.StudyID) == ("ACRIN-042", "U", "")


# --- Secondary Capture ------------------------------------------------------------------------------------------------


def test_sc_slices_follow_the_pet_order_and_geometry(written: Written) -> None:
    vol = written.volume
    sc = _read_all(written.series["sc"].files)
    assert len(sc) == vol.shape[0]
    assert [int(ds.InstanceNumber) for ds in sc] == list(range(1, vol.shape[0] + 1))
    assert [tuple(float(v) for v in ds.ImagePositionPatient) for ds in sc] == vol.positions
    for ds, header in zip(sc, vol.headers):
        assert ds.ImageOrientationPatient == header.ImageOrientationPatient
        assert ds.PixelSpacing == header.PixelSpacing
        assert (ds.Rows, ds.Columns) == SHAPE[1:]
        assert list(ds.PatientOrientation) == ["L", "P"]
    assert len({ds.SOPInstanceUID for ds in sc}) == len(sc) and len({ds.SeriesInstanceUID for ds in sc}) == 1


def test_sc_pixels_are_the_display_windowed_to_8_bits(written: Written) -> None:
    display = _display(written.values)
    expected = np.clip(np.rint(display * 255.0), 0, 255).astype(np.uint8)
    sc = _read_all(written.series["sc"].files)
    pixels = np.stack([ds.pixel_array for ds in sc])
    assert pixels.dtype == np.uint8 and pixels.shape == SHAPE
    np.testing.assert_array_equal(pixels, expected)
    assert pixels[HOT] == 255  # the hot spot saturates the window
    assert pixels[0, 3, 0] == 0 and written.values[0, 3, 0] == 0.0  # a zero voxel is black
    assert 0 < pixels[1, 4, 10] < 255
    for ds in sc:
        assert (ds.BitsAllocated, ds.BitsStored, ds.PhotometricInterpretation) == (8, 8, "MONOCHROME2")
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (128.0, 256.0)  # stored 0..255 shown as 0..255
        assert ds.WindowCenterWidthExplanation == "normalised stability 0 to 1"


def test_sc_references_source_and_derived_slices(written: Written) -> None:
    vol = written.volume
    derived = [pydicom.dcmread(p, stop_before_pixels=True) for p in written.derived_paths]
    for k, ds in enumerate(_read_all(written.series["sc"].files)):
        (source,) = ds.SourceImageSequence
        assert source.ReferencedSOPInstanceUID == vol.headers[k].SOPInstanceUID
        assert source.ReferencedSOPClassUID == PET_CLASS and "ReferencedFrameNumber" not in source
        assert _code(source) == ("121322", "DCM")
        (image,) = ds.ReferencedImageSequence
        assert image.ReferencedSOPInstanceUID == derived[k].SOPInstanceUID  # the slice write_derived_pet wrote
        assert _code(image) == ("121339", "DCM")
        related = {item.SeriesInstanceUID: item for item in ds.RelatedSeriesSequence}
        assert set(related) == {vol.series_uid, written.derived_uid}
        assert _code(related[vol.series_uid]) == ("121323", "DCM")
        assert len(related[written.derived_uid].PurposeOfReferenceCodeSequence) == 0
        common = {item.SeriesInstanceUID: [r.ReferencedSOPInstanceUID for r in item.ReferencedInstanceSequence]
                  for item in ds.ReferencedSeriesSequence}
        assert common == {vol.series_uid: [vol.headers[k].SOPInstanceUID],
                          written.derived_uid: [derived[k].SOPInstanceUID]}


def test_sc_without_geometry_is_the_plain_sc_iod(written: Written, tmp_path: Path) -> None:
    (sc,) = _write(written.volume, tmp_path / "out", formats=("sc",), sc_geometry=False, window=(0.0, 5000.0))
    ds = pydicom.dcmread(sc.files[HOT[0]])
    assert not {"ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"} & set(ds.dir())
    assert ds.PixelSpacing == written.volume.headers[0].PixelSpacing  # the SC Image module's own
    assert ds.pixel_array[HOT[1:]] == 255 and ds.pixel_array[0, 0] == round(200 / 5000 * 255)  # values, windowed
    assert "Parametric Map" not in ds.DerivationDescription and ds.SeriesDescription.endswith("(petnode cdip, 0-5000)")
    errors, warnings_ = run_dciodvfy(sc.files[0])
    assert errors == [] and not [w for w in warnings_ if "not present in standard DICOM IOD" in w]


# --- Parametric Map ---------------------------------------------------------------------------------------------------


def _frame_slices(ds: pydicom.Dataset, vol: PetVolume) -> list[int]:
    positions = [tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for f in ds.PerFrameFunctionalGroupsSequence]
    return [[tuple(q) for q in vol.positions].index(p) for p in positions]  # exact: the PET's own numbers


def test_pm_frames_decode_to_the_raw_values_with_units(written: Written) -> None:
    ds = pydicom.dcmread(written.series["pm"].files[0])
    vol = written.volume
    assert "FloatPixelData" in ds and "PixelData" not in ds and ds.BitsAllocated == 32
    assert int(ds.NumberOfFrames) == vol.shape[0] and (ds.Rows, ds.Columns) == SHAPE[1:]
    frames = ds.pixel_array
    assert frames.dtype == np.float32
    slices = _frame_slices(ds, vol)
    assert sorted(slices) == list(range(vol.shape[0]))
    np.testing.assert_allclose(frames, written.values[slices], rtol=1e-6, atol=0)
    assert frames[slices.index(HOT[0])][HOT[1:]] == 5000.0
    shared = ds.SharedFunctionalGroupsSequence[0]
    (mapping,) = shared.RealWorldValueMappingSequence
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("Bq/ml", "UCUM")
    assert mapping.LUTLabel == "STABILITY" and "stability" in mapping.LUTExplanation
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    assert mapping.DoubleFloatRealWorldValueFirstValueMapped <= 0.0
    assert mapping.DoubleFloatRealWorldValueLastValueMapped >= 5000.0
    # Geometry of the PET: orientation and pixel measures shared, a position per frame.
    assert shared.PlaneOrientationSequence[0].ImageOrientationPatient == vol.headers[0].ImageOrientationPatient
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in vol.headers[0].PixelSpacing]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(vol.spacing[0])


def test_pm_references_source_and_derived_slices(written: Written) -> None:
    ds = pydicom.dcmread(written.series["pm"].files[0], stop_before_pixels=True)
    vol = written.volume
    derived = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in written.derived_paths]
    for frame, k in zip(ds.PerFrameFunctionalGroupsSequence, _frame_slices(ds, vol)):
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPInstanceUID == vol.headers[k].SOPInstanceUID and _code(source) == ("121322", "DCM")
        (image,) = frame.ReferencedImageSequence
        assert image.ReferencedSOPInstanceUID == derived[k] and _code(image) == ("121339", "DCM")
    assert [s.ReferencedSOPInstanceUID for s in ds.SourceImageSequence] == [h.SOPInstanceUID for h in vol.headers]
    common = {item.SeriesInstanceUID: [r.ReferencedSOPInstanceUID for r in item.ReferencedInstanceSequence]
              for item in ds.ReferencedSeriesSequence}
    assert common == {vol.series_uid: [h.SOPInstanceUID for h in vol.headers], written.derived_uid: derived}
    assert {item.SeriesInstanceUID for item in ds.RelatedSeriesSequence} == {vol.series_uid, written.derived_uid}


def test_derived_instance_uids_are_those_write_derived_pet_gives(written: Written) -> None:
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in written.derived_paths]
    assert derived_instance_uids(written.volume, written.derived_uid) == uids


# --- deterministic UIDs -----------------------------------------------------------------------------------------------


def _uids(series: list[MapSeries]) -> dict[str, tuple[str, list[str]]]:
    return {s.format: (s.series_uid, [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in s.files])
            for s in series}


def test_uids_are_deterministic_and_differ_by_kind_and_window(written: Written, tmp_path: Path) -> None:
    vol = written.volume
    first = _uids(_write(vol, tmp_path / "a"))
    again = _uids(_write(vol, tmp_path / "b", created=None))
    assert first == again
    assert first["sc"][0] == map_series_uid(written.derived_uid, "stability", "sc", units="BQML", window=(0.0, 1.0))
    assert first["pm"][0] == map_series_uid(written.derived_uid, "stability", "pm", units="BQML")
    every = {first["sc"][0], first["pm"][0], *first["sc"][1], *first["pm"][1]}
    assert len(every) == 2 + SHAPE[0] + 1
    other = _uids(_write(vol, tmp_path / "c", kind="uncertainty"))
    assert not every & {other["sc"][0], other["pm"][0], *other["sc"][1], *other["pm"][1]}
    window = _uids(_write(vol, tmp_path / "d", window=(0.0, 2.0)))
    assert window["sc"][0] != first["sc"][0] and window["pm"] == first["pm"]  # the window changes the SC pixels only


def test_uncertainty_dimensionless_pm_only_uses_the_window_as_voi(written: Written, tmp_path: Path) -> None:
    vol = written.volume
    ratio = np.clip(_map(vol.shape) / 5000.0, 0.0, 1.0).astype(np.float32)
    (pm,) = _write(vol, tmp_path / "out", ratio, kind="uncertainty", units="1", formats=("pm", "pm"))
    assert pm.format == "pm" and not (tmp_path / "out" / "uncertainty" / "sc").exists()
    ds = pydicom.dcmread(pm.files[0])
    unit = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth), voi.VOILUTFunction) == (0.5, 1.0, "LINEAR_EXACT")
    assert ds.SeriesNumber == 1003 + 4 and ds.ContentLabel == "UNCERTAINTY"
    np.testing.assert_allclose(ds.pixel_array, ratio[_frame_slices(ds, vol)], rtol=1e-6, atol=0)
    _assert_dciodvfy_clean(pm.files, "dimensionless PM")


# --- multi-frame sources ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "convert",
    [
        lambda c: make_enhanced_pet_series(c, instances=2, reverse_frames=True),
        lambda c: make_legacy_converted_pet(c),
    ],
    ids=["enhanced-2-instances-reversed", "legacy-converted"],
)
def test_multiframe_source_references_instances_and_frames(tmp_path: Path, convert: object) -> None:
    classic = make_pet_series(shape=(5, 16, 16), seed=5)
    source = convert(classic)  # type: ignore[operator]
    vol = load_pet_series(write_series(source, tmp_path / "src"))
    assert vol.frames
    values = _map(vol.shape)
    sc, pm = _write(vol, tmp_path / "out", values, display=_display(values))
    _assert_dciodvfy_clean([sc.files[0], sc.files[-1]], "SC from multi-frame PET")
    _assert_dciodvfy_clean(pm.files, "PM from multi-frame PET")
    frames_of = {ds.SOPInstanceUID: ds for ds in source}
    expected = [(str(h.SOPInstanceUID), int(f)) for h, f in zip(vol.headers, vol.frames)]
    assert [(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID),
             int(ds.SourceImageSequence[0].ReferencedFrameNumber)) for ds in _read_all(sc.files)] == expected
    ds = pydicom.dcmread(pm.files[0])
    slices = _frame_slices(ds, vol)
    for frame, k in zip(ds.PerFrameFunctionalGroupsSequence, slices):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert (ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)) == expected[k]
        assert ref.ReferencedSOPClassUID == frames_of[ref.ReferencedSOPInstanceUID].SOPClassUID
        # The referenced source frame sits where the map frame does.
        source_frame = frames_of[ref.ReferencedSOPInstanceUID].PerFrameFunctionalGroupsSequence[expected[k][1] - 1]
        assert ([float(v) for v in source_frame.PlanePositionSequence[0].ImagePositionPatient]
                == [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
    np.testing.assert_allclose(ds.pixel_array, values[slices], rtol=1e-6, atol=0)
    # Only real UIDs are referenced (highdicom's stand-ins for the frames never reach a file).
    common = {r.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence
              for r in item.ReferencedInstanceSequence}
    assert common == set(frames_of) | set(derived_instance_uids(vol, derived_series_uid(vol.series_uid, PROV)))


# --- bad inputs -------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_readable_errors_before_writing(written: Written, tmp_path: Path) -> None:
    vol, out = written.volume, tmp_path / "out"
    nan = _map()
    nan[1, 2, 3] = np.nan
    cases: list[tuple[dict[str, object], str]] = [
        ({"values": nan}, "1 non-finite values"),
        ({"values": np.full(SHAPE, 1e39)}, "non-finite"),  # beyond float32
        ({"values": _map((5, 16, 20))}, "shape (5, 16, 20) does not match the PET volume (6, 16, 20)"),
        ({"display": np.ones((6, 20, 16))}, "display shape (6, 20, 16)"),
        ({"display": np.where(_map() > 0, np.inf, 0.0)}, "display has"),
        ({"kind": "noise"}, "map kind 'noise'"),
        ({"formats": ("png",)}, "map formats ['png']"),
        ({"formats": ()}, "map formats []"),
        ({"units": "HU"}, "map units 'HU' are not supported"),
        ({"units": ""}, "map units '' are not supported"),
        ({"window": (1.0, 1.0)}, "window (1.0, 1.0) needs finite low < high"),
        ({"derived_instance_uids": ["1.2.3"]}, "1 derived instance UIDs for 6 slices"),
    ]
    for kwargs, message in cases:
        values = kwargs.pop("values", _map())
        with pytest.raises(OutputWriteError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            _write(vol, out, values, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()


# --- real data --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_series_maps_pass_dciodvfy(tmp_path: Path, realdata: Path) -> None:
    vol = load_pet_series(sorted((realdata / "ohif_acrin_nsclc_fdg_pet_042" / "PT_AC").glob("*.dcm")))
    values = (0.05 * vol.array).astype(np.float32)
    sc, pm = _write(vol, tmp_path / "out", values, kind="uncertainty", units=vol.units, window=(0.0, 500.0))
    assert len(sc.files) == vol.shape[0] == 135
    _assert_dciodvfy_clean([sc.files[0], sc.files[67], sc.files[-1]], "SC from real PET")
    _assert_dciodvfy_clean(pm.files, "PM from real PET")
    ds = pydicom.dcmread(pm.files[0])
    np.testing.assert_allclose(ds.pixel_array, values[_frame_slices(ds, vol)], rtol=1e-6, atol=0)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in sc.files]
    source = [int(h.InstanceNumber) for h in vol.headers]
    assert sorted(numbers) == list(range(1, 136))
    assert np.array_equal(np.argsort(numbers), np.argsort(source))  # the map sorts like the PET in a viewer
