"""Derived (denoised) PET series: round trip, deterministic UIDs, provenance, SUV preservation, dciodvfy; from
classic and from multi-frame (Enhanced, Legacy Converted Enhanced) PET sources."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless
from scipy.ndimage import gaussian_filter

from dicom_node.errors import OutputWriteError
from dicom_node.outputs import Provenance, derive_uid, derived_series_uid, is_petnode_output, write_derived_pet
from dicom_node.outputs.derived_pet import quantise_slice
from dicom_node.series import PetVolume, compute_suv_bw_factor, load_pet_series
from tests.dicomtools import run_dciodvfy
from tests.factories import (
    make_ct_series,
    make_enhanced_pet_series,
    make_legacy_converted_pet,
    make_mr_series,
    make_pet_series,
    write_series,
)


PROV = Provenance(method="gaussian", params={"fwhm_mm": 4.0}, route="pet-gaussian")
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _assert_dciodvfy_clean(paths: list[Path], label: str) -> None:
    """Zero errors on every file; warnings printed (counted) for the test log."""
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


def _volume(tmp_path: Path, **kwargs: object) -> PetVolume:
    kwargs.setdefault("shape", (6, 16, 16))
    return load_pet_series(write_series(make_pet_series(**kwargs), tmp_path / "src"))


def _smooth(vol: PetVolume) -> np.ndarray:
    return gaussian_filter(vol.array.astype(np.float64), sigma=1.0, mode="nearest").astype(np.float32)


# --- uids -------------------------------------------------------------------------------------------------------------


def test_derive_uid_is_deterministic_valid_and_separates_parts() -> None:
    a = derive_uid("1.2.3", "route", "{}")
    assert a == derive_uid("1.2.3", "route", "{}")
    assert a.startswith("2.25.") and len(a) <= 64 and UID_RE.match(a)
    assert int(a.split(".")[2]) < 2**128  # PS3.5 B.2: the integer form of a UUID
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("a;b", "c") != derive_uid("a", "b;c")
    assert derive_uid("x") != derive_uid("x", "")
    rooted = derive_uid("ab", "c", prefix="1.2.826.0.1.3680043.10.543.")
    assert rooted.startswith("1.2.826.0.1.3680043.10.543.") and len(rooted) <= 64 and UID_RE.match(rooted)
    assert rooted == derive_uid("ab", "c", prefix="1.2.826.0.1.3680043.10.543.")
    with pytest.raises(ValueError):
        derive_uid()


def test_derived_series_uid_depends_on_source_route_model_and_params() -> None:
    base = derived_series_uid("1.2.3", PROV)
    assert base == derived_series_uid("1.2.3", Provenance("gaussian", {"fwhm_mm": 4.0}, "pet-gaussian"))
    assert base != derived_series_uid("1.2.4", PROV)
    assert base != derived_series_uid("1.2.3", Provenance("gaussian", {"fwhm_mm": 5.0}, "pet-gaussian"))
    assert base != derived_series_uid("1.2.3", Provenance("gaussian", {"fwhm_mm": 4.0}, "other-route"))
    assert base != derived_series_uid("1.2.3", Provenance("gaussian", {"fwhm_mm": 4.0}, "pet-gaussian", "v2"))
    # Not the software version or presentation options: an upgrade re-sends the same series.
    same = Provenance("gaussian", {"fwhm_mm": 4.0}, "pet-gaussian", software_version="9.9", series_number_offset=5)
    assert base == derived_series_uid("1.2.3", same)
    # Parameter order does not matter, and later mutation of the caller's dict does not leak in.
    params = {"b": 1, "a": 2}
    prov = Provenance("nlm", params, "r")
    uid = derived_series_uid("1.2.3", prov)
    params["c"] = 3
    assert uid == derived_series_uid("1.2.3", Provenance("nlm", {"a": 2, "b": 1}, "r"))


# --- round trip on synthetic data -------------------------------------------------------------------------------------


def test_round_trip_values_geometry_and_suv(tmp_path: Path) -> None:
    vol = _volume(tmp_path, shape=(7, 16, 20), seed=4)
    denoised = _smooth(vol)
    paths = write_derived_pet(vol, denoised, tmp_path / "out", PROV)

    assert [p.name for p in paths] == [f"{k:04d}.dcm" for k in range(7)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]  # no temp files left
    out = load_pet_series(paths)
    step = np.array([float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in paths])
    assert np.all(np.abs(out.array - denoised) <= step[:, None, None] / 2 * (1 + 1e-6) + 1e-6)
    assert out.array.sum(dtype=np.float64) == pytest.approx(denoised.sum(dtype=np.float64), rel=1e-4)

    assert out.series_uid != vol.series_uid
    assert out.study_uid == vol.study_uid
    assert out.frame_of_reference_uid == vol.frame_of_reference_uid
    assert out.positions == vol.positions and out.orientation == vol.orientation
    assert out.spacing == pytest.approx(vol.spacing)
    assert out.units == vol.units == "BQML"
    assert out.suv_factor == vol.suv_factor  # identical, not approximately
    # SUV read from the derived series equals SUV of the denoised volume with the source factor (within quantisation)
    assert np.allclose(out.array * out.suv_factor, denoised * vol.suv_factor, atol=float(step.max()) * vol.suv_factor)


def test_suv_relevant_and_identity_attributes_are_kept(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    paths = write_derived_pet(vol, vol.array, tmp_path / "out", PROV)
    for src, path in zip(vol.headers, paths):
        out = pydicom.dcmread(path)
        for keyword in (
            "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientWeight", "PatientSize",
            "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "FrameOfReferenceUID",
            "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "Units", "DecayCorrection",
            "CorrectedImage", "SeriesType", "CountsSource", "ImagePositionPatient", "ImageOrientationPatient",
            "PixelSpacing", "SliceThickness", "Rows", "Columns", "NumberOfSlices", "ImageIndex", "InstanceNumber",
            "FrameReferenceTime", "ActualFrameDuration", "DecayFactor", "Manufacturer", "ManufacturerModelName",
            "StationName", "Modality", "RadiopharmaceuticalInformationSequence", "PatientOrientationCodeSequence",
        ):  # fmt: skip
            assert out[keyword].value == src[keyword].value, keyword
        assert out.SOPClassUID == src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.128"
        assert out.SOPInstanceUID != src.SOPInstanceUID
        assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.RescaleIntercept == 0 and out.PixelRepresentation == 1 and out.BitsStored == 16


def test_provenance_attributes(tmp_path: Path) -> None:
    vol = _volume(tmp_path, series_description="PET WB", series_number=3)
    prov = Provenance("gaussian", {"fwhm_mm": 4.0}, "pet-gaussian", model_version=None, software_version="1.2.3")
    paths = write_derived_pet(vol, vol.array, tmp_path / "out", prov)
    for src, path in zip(vol.headers, paths):
        ds = pydicom.dcmread(path)
        assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"]
        assert ds.SeriesDescription == "PET WB [petnode]"
        assert ds.SeriesNumber == 1003
        assert "gaussian" in ds.DerivationDescription and '"fwhm_mm":4.0' in ds.DerivationDescription
        code = ds.DerivationCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("113088", "DCM", "Gaussian blur")
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        related = ds.RelatedSeriesSequence[-1]
        assert related.SeriesInstanceUID == vol.series_uid and related.StudyInstanceUID == vol.study_uid
        assert related.PurposeOfReferenceCodeSequence[0].CodeValue == "121323"
        equipment = ds.ContributingEquipmentSequence[-1]
        assert equipment.Manufacturer == "petnode"
        assert equipment.ManufacturerModelName == "gaussian"
        assert equipment.SoftwareVersions == "1.2.3"  # single-valued without a model version
        assert '"fwhm_mm":4.0' in equipment.ContributionDescription
        purpose = equipment.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
        assert equipment.ContributionDateTime
        assert ds.InstanceCreationDate and ds.ContentDate
        assert is_petnode_output(ds)
        assert not is_petnode_output(src)


def test_non_gaussian_method_model_version_and_long_description(tmp_path: Path) -> None:
    vol = _volume(tmp_path, series_description="X" * 64)
    prov = Provenance(
        "cnn", {"weights": "pet-v3"}, "pet-cnn", model_version="3.1", series_description_suffix=" [petnode cnn]"
    )
    paths = write_derived_pet(vol, vol.array, tmp_path / "out", prov)
    ds = pydicom.dcmread(paths[0])
    assert len(ds.SeriesDescription) == 64 and ds.SeriesDescription.endswith(" [petnode cnn]")
    assert ds.DerivationCodeSequence[0].CodeValue == "113087"  # Smoothing
    equipment = ds.ContributingEquipmentSequence[-1]
    assert list(equipment.SoftwareVersions) == [prov.software_version, "model 3.1"]
    assert "model 3.1" in ds.DerivationDescription


def test_uids_are_deterministic_across_runs(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    first = [pydicom.dcmread(p) for p in write_derived_pet(vol, _smooth(vol), tmp_path / "a", PROV)]
    second = [pydicom.dcmread(p) for p in write_derived_pet(vol, _smooth(vol), tmp_path / "b", PROV)]
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in second]
    assert {d.SeriesInstanceUID for d in first} == {derived_series_uid(vol.series_uid, PROV)}
    assert len({d.SOPInstanceUID for d in first}) == len(first)
    other = Provenance("gaussian", {"fwhm_mm": 6.0}, "pet-gaussian")
    third = [pydicom.dcmread(p) for p in write_derived_pet(vol, _smooth(vol), tmp_path / "c", other)]
    assert not {d.SOPInstanceUID for d in third} & {d.SOPInstanceUID for d in first}
    for d in first:
        assert UID_RE.match(d.SOPInstanceUID) and len(d.SOPInstanceUID) <= 64


def test_source_headers_are_not_modified(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    before = [h.to_json_dict() for h in vol.headers]
    write_derived_pet(vol, vol.array, tmp_path / "out", PROV)
    assert [h.to_json_dict() for h in vol.headers] == before


def test_rescale_never_clips_large_range_and_negative_values(tmp_path: Path) -> None:
    vol = _volume(tmp_path, shape=(3, 16, 16))
    rng = np.random.default_rng(0)
    denoised = rng.normal(0.0, 1.0, size=vol.array.shape).astype(np.float32)
    denoised[0] *= 1e6  # far above the source slope range
    denoised[1] *= 1e-3  # tiny values keep their precision
    denoised[2] = 0.0  # an empty slice
    denoised[0, 3, 3] = -2.5e6  # the peak is negative
    paths = write_derived_pet(vol, denoised, tmp_path / "out", PROV)
    out = load_pet_series(paths)
    for k in range(3):
        peak = float(np.abs(denoised[k]).max())
        tolerance = peak / 32767 / 2 * (1 + 1e-6) if peak else 0.0
        assert np.max(np.abs(out.array[k] - denoised[k])) <= tolerance + 1e-12
    assert out.array[0, 3, 3] == pytest.approx(-2.5e6, rel=1e-4)


def test_quantise_slice_uses_the_written_slope() -> None:
    values = np.array([[0.0, 1.0, 123456.789], [-5.0, 42.0, 7.0]])
    stored, slope = quantise_slice(values)
    assert stored.dtype == np.int16 and len(slope) <= 16
    assert int(np.abs(stored).max()) <= 32767
    assert np.max(np.abs(stored * float(slope) - values)) <= float(slope) / 2 * (1 + 1e-9)
    zeros, one = quantise_slice(np.zeros((2, 2)))
    assert not zeros.any() and float(one) == 1.0


def test_write_refuses_bad_input(tmp_path: Path) -> None:
    vol = _volume(tmp_path, shape=(3, 8, 8))
    with pytest.raises(OutputWriteError, match="shape"):
        write_derived_pet(vol, vol.array[:2], tmp_path / "out", PROV)
    bad = vol.array.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(OutputWriteError, match="non-finite"):
        write_derived_pet(vol, bad, tmp_path / "out", PROV)
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_rewrite_replaces_files_atomically(tmp_path: Path) -> None:
    vol = _volume(tmp_path, shape=(3, 8, 8))
    first = write_derived_pet(vol, vol.array, tmp_path / "out", PROV, fsync=False)
    second = write_derived_pet(vol, vol.array * 2, tmp_path / "out", PROV)
    assert first == second
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.dcm", "0001.dcm", "0002.dcm"]
    np.testing.assert_allclose(load_pet_series(second).array, vol.array * 2, rtol=1e-3, atol=1e-3)


def test_is_petnode_output_on_plain_datasets() -> None:
    ds = pydicom.Dataset()
    assert not is_petnode_output(ds)
    item = pydicom.Dataset()
    item.Manufacturer = "Acme anonymiser"
    ds.ContributingEquipmentSequence = [item]
    assert not is_petnode_output(ds)
    other = pydicom.Dataset()
    other.Manufacturer = " PETNODE "
    ds.ContributingEquipmentSequence.append(other)
    assert is_petnode_output(ds)


# --- dciodvfy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: make_pet_series(),
        lambda: make_pet_series(units="PROPCNTS", decay_correction="NONE"),
        lambda: make_ct_series(),
        lambda: make_mr_series(orientation=(0, 1, 0, 0, 0, -1)),
    ],
    ids=["pet", "pet-nac", "ct", "mr-sagittal"],
)
def test_factory_series_pass_dciodvfy(tmp_path: Path, factory: Callable[[], list[pydicom.Dataset]]) -> None:
    paths = write_series(factory(), tmp_path)
    _assert_dciodvfy_clean(paths[:2], "factory")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"transfer_syntax": RLELossless},
        {"transfer_syntax": JPEGLSLossless},
        {"units": "PROPCNTS"},
        {"BodyPartExamined": None},
    ],
    ids=["explicit", "rle", "jpeg-ls", "propcnts", "no-body-part"],
)
def test_derived_synthetic_series_pass_dciodvfy(tmp_path: Path, kwargs: dict[str, object]) -> None:
    vol = load_pet_series(write_series(make_pet_series(shape=(4, 32, 32), **kwargs), tmp_path / "src"))
    paths = write_derived_pet(vol, _smooth(vol), tmp_path / "out", PROV)
    _assert_dciodvfy_clean(paths, f"derived synthetic {kwargs}")


def test_derived_output_corrects_iod_errors_of_the_source(tmp_path: Path) -> None:
    # The defects real GE/TCIA series carry (see shared/data READMEs), made on purpose in a synthetic source.
    defects = dict(
        BodyPartExamined="EXTREMITY",  # paired: Laterality required
        PatientPosition="HFS",  # not allowed beside PatientOrientationCodeSequence
        NumberOfTimeSlices=2,  # only for DYNAMIC series
        ClinicalTrialSponsorName="",  # Type 1 empty, and no subject ID: incomplete Clinical Trial Subject module
        ClinicalTrialProtocolID="6668",
        ClinicalTrialSiteID="",
    )
    source = write_series(make_pet_series(shape=(3, 32, 32), **defects), tmp_path / "src")
    source_errors, _ = run_dciodvfy(source[0])
    joined = "\n".join(source_errors)
    for expected in ("Laterality", "PatientPosition", "NumberOfTimeSlices", "ClinicalTrialSponsorName"):
        assert expected in joined, f"the synthetic source should fail on {expected}: {joined}"
    paths = write_derived_pet(load_pet_series(source), load_pet_series(source).array, tmp_path / "out", PROV)
    _assert_dciodvfy_clean(paths, "derived from a defective source")
    ds = pydicom.dcmread(paths[0])
    assert ds.Laterality == "" and ds.BodyPartExamined == "EXTREMITY"
    for keyword in ("PatientPosition", "NumberOfTimeSlices", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID"):
        assert keyword not in ds


def test_complete_clinical_trial_subject_module_is_kept(tmp_path: Path) -> None:
    # Type 1 complete; Type 2 ClinicalTrialProtocolName/SiteID/SiteName missing: the writer adds them empty.
    trial = dict(ClinicalTrialSponsorName="ACRIN", ClinicalTrialProtocolID="6668", ClinicalTrialSubjectID="042")
    vol = load_pet_series(write_series(make_pet_series(shape=(2, 32, 32), **trial), tmp_path / "src"))
    paths = write_derived_pet(vol, vol.array, tmp_path / "out", PROV)
    ds = pydicom.dcmread(paths[0])
    assert ds.ClinicalTrialSponsorName == "ACRIN" and ds.ClinicalTrialSubjectID == "042"
    assert ds.ClinicalTrialProtocolName == "" and ds.ClinicalTrialSiteID == "" and ds.ClinicalTrialSiteName == ""
    _assert_dciodvfy_clean(paths, "derived with a clinical trial subject")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("folder", "count"),
    [("ohif_acrin_nsclc_fdg_pet_042", 135), ("mirp_tcia_sts_001_fdg_pet", 267)],
    ids=["acrin-135", "mirp-267"],
)
def test_derived_real_series_pass_dciodvfy_and_keep_suv(
    tmp_path: Path, realdata: Path, folder: str, count: int
) -> None:
    vol = load_pet_series(sorted((realdata / folder / "PT_AC").glob("*.dcm")))
    assert vol.shape[0] == count
    denoised = _smooth(vol)
    paths = write_derived_pet(vol, denoised, tmp_path / "out", PROV)
    assert len(paths) == count
    out = load_pet_series(paths)
    assert out.suv_factor == vol.suv_factor and out.suv_factor is not None
    assert out.array.sum(dtype=np.float64) == pytest.approx(denoised.sum(dtype=np.float64), rel=1e-4)
    assert not any(tag.is_private for tag in pydicom.dcmread(paths[0]).keys())
    _assert_dciodvfy_clean(paths, f"{folder}/PT_AC")


def test_series_and_outputs_import_neither_torch_nor_pynetdicom() -> None:
    code = (
        "import sys, dicom_node.series, dicom_node.outputs; "
        "heavy = {'torch', 'pynetdicom', 'highdicom'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- multi-frame sources (Enhanced PET, Legacy Converted Enhanced PET) ------------------------------------------------

MULTIFRAME_SOURCES: dict[str, Callable[[list[pydicom.Dataset]], list[pydicom.Dataset]]] = {
    "enhanced": lambda c: make_enhanced_pet_series(c),
    "enhanced-2-instances-head-first": lambda c: make_enhanced_pet_series(c, instances=2, reverse_frames=True),
    "enhanced-shared-rescale-rle": lambda c: make_enhanced_pet_series(c, shared_rescale=True,
                                                                      transfer_syntax=RLELossless),
    "legacy-converted": lambda c: make_legacy_converted_pet(c),
}


@pytest.mark.parametrize(
    "factory",
    [
        lambda: make_enhanced_pet_series(make_pet_series(shape=(4, 32, 32))),
        lambda: make_enhanced_pet_series(make_pet_series(shape=(4, 16, 16)), instances=2, time_points=2,
                                         shared_rescale=True, transfer_syntax=JPEGLSLossless),
        lambda: make_enhanced_pet_series(make_pet_series(shape=(3, 16, 16), units="PROPCNTS", decay_correction="NONE")),
        lambda: make_enhanced_pet_series(make_pet_series(shape=(3, 16, 16), decay_correction="ADMIN")),
        lambda: make_legacy_converted_pet(make_pet_series(shape=(4, 16, 16)), instances=2),
    ],
    ids=["enhanced", "enhanced-dynamic-shared-jpeg-ls", "enhanced-nac", "enhanced-admin", "legacy-converted"],
)
def test_factory_multiframe_pet_passes_dciodvfy(tmp_path: Path, factory: Callable[[], list[pydicom.Dataset]]) -> None:
    datasets = factory()
    assert all(int(ds.NumberOfFrames) > 1 for ds in datasets)
    _assert_dciodvfy_clean(write_series(datasets, tmp_path), "multi-frame factory")


@pytest.mark.parametrize("source", list(MULTIFRAME_SOURCES))
def test_derived_from_multiframe_references_frames_passes_dciodvfy_and_keeps_suv(tmp_path: Path, source: str) -> None:
    classic = make_pet_series(shape=(5, 32, 32), seed=6)
    classic_vol = load_pet_series(write_series(classic, tmp_path / "classic"))
    converted = MULTIFRAME_SOURCES[source](classic)
    vol = load_pet_series(write_series(converted, tmp_path / "src"))
    denoised = _smooth(vol)
    paths = write_derived_pet(vol, denoised, tmp_path / "out", PROV)
    _assert_dciodvfy_clean(paths, f"derived from {source}")

    by_uid = {ds.SOPInstanceUID: ds for ds in converted}
    referenced: set[tuple[str, int]] = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.128" and "NumberOfFrames" not in ds
        ref = ds.SourceImageSequence[0]
        source_ds = by_uid[ref.ReferencedSOPInstanceUID]
        assert ref.ReferencedSOPClassUID == source_ds.SOPClassUID
        frame = int(ref.ReferencedFrameNumber)
        plane = source_ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
        assert [float(v) for v in ds.ImagePositionPatient] == [float(v) for v in plane.ImagePositionPatient]
        referenced.add((ref.ReferencedSOPInstanceUID, frame))
    assert len(referenced) == 5  # every frame once
    assert len({pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}) == 5

    out = load_pet_series(paths)
    assert out.units == "BQML"
    assert out.suv_factor == pytest.approx(classic_vol.suv_factor, rel=1e-12)  # as from the classic series
    assert out.positions == classic_vol.positions and out.spacing == pytest.approx(classic_vol.spacing)
    step = np.array([float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in paths])
    assert np.all(np.abs(out.array - denoised) <= step[:, None, None] / 2 + 1e-6 * np.abs(denoised) + 1e-6)


@pytest.mark.parametrize(
    "kwargs", [{"units": "PROPCNTS", "decay_correction": "NONE"}, {"decay_correction": "ADMIN"}], ids=["nac", "admin"]
)
def test_derived_from_enhanced_nac_and_admin_pass_dciodvfy(tmp_path: Path, kwargs: dict[str, object]) -> None:
    classic = make_pet_series(shape=(3, 32, 32), **kwargs)
    classic_vol = load_pet_series(write_series(classic, tmp_path / "classic"))
    vol = load_pet_series(write_series(make_enhanced_pet_series(classic), tmp_path / "src"))
    paths = write_derived_pet(vol, _smooth(vol), tmp_path / "out", PROV)
    _assert_dciodvfy_clean(paths, f"derived from enhanced {kwargs}")
    out = load_pet_series(paths)
    assert (out.units, out.headers[0].DecayCorrection) == (classic_vol.units, classic[0].DecayCorrection)
    if classic_vol.suv_factor is None:  # PROPCNTS: no SUV from either
        assert out.suv_factor is None
    else:
        assert out.suv_factor == pytest.approx(classic_vol.suv_factor, rel=1e-12)


def test_derived_from_enhanced_carries_what_the_classic_derived_series_carries(tmp_path: Path) -> None:
    classic = make_pet_series(shape=(4, 16, 16), seed=1)
    from_classic = write_derived_pet(
        load_pet_series(write_series(classic, tmp_path / "c")), np.ones((4, 16, 16)), tmp_path / "oc", PROV
    )
    from_enhanced = write_derived_pet(
        load_pet_series(write_series(make_enhanced_pet_series(classic), tmp_path / "e")), np.ones((4, 16, 16)),
        tmp_path / "oe", PROV,
    )
    for a_path, b_path in zip(from_classic, from_enhanced):
        a, b = pydicom.dcmread(a_path), pydicom.dcmread(b_path)
        for keyword in (
            "PatientWeight", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "Units",
            "DecayCorrection", "CorrectedImage", "SeriesType", "CountsSource", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "ImageIndex", "NumberOfSlices",
            "ActualFrameDuration", "FrameReferenceTime", "DecayFactor", "StudyInstanceUID", "FrameOfReferenceUID",
        ):  # fmt: skip
            assert a[keyword].value == b[keyword].value, keyword
        rp_a, rp_b = a.RadiopharmaceuticalInformationSequence[0], b.RadiopharmaceuticalInformationSequence[0]
        for keyword in ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime", "RadionuclideTotalDose",
                        "RadionuclideHalfLife"):
            assert rp_a[keyword].value == rp_b[keyword].value, keyword
        assert compute_suv_bw_factor(b) == compute_suv_bw_factor(a)


def test_derived_from_multiframe_uids_are_deterministic_per_frame(tmp_path: Path) -> None:
    vol = load_pet_series(write_series(make_legacy_converted_pet(make_pet_series(shape=(4, 8, 8))), tmp_path / "s"))
    first = [pydicom.dcmread(p).SOPInstanceUID for p in write_derived_pet(vol, vol.array, tmp_path / "a", PROV)]
    second = [pydicom.dcmread(p).SOPInstanceUID for p in write_derived_pet(vol, vol.array, tmp_path / "b", PROV)]
    assert first == second and len(set(first)) == 4  # one multi-frame source instance, four distinct outputs
    assert all(UID_RE.match(uid) and len(uid) <= 64 for uid in first)


# --- the shared-template writer --------------------------------------------------------------------------------------


def _both_paths(vol: PetVolume, tmp_path: Path, *, template_expected: bool = True) -> tuple[list[Path], list[Path]]:
    """The series written by deriving each slice in full, and by the shared template (checked to be used)."""
    import datetime as dt

    from dicom_node.outputs import derived_pet

    when = dt.datetime(2026, 12, 4, 20, 0, 0, 123456, tzinfo=dt.timezone.utc)
    denoised = _smooth(vol)
    calls = []
    original = derived_pet._encode_file
    derived_pet._encode_file = lambda *a: calls.append(1) or original(*a)  # type: ignore[assignment]
    try:
        # The template path first, on headers as the loader left them (mostly raw elements, as in the node): the
        # full derivation decodes every element it copies, in the source headers themselves.
        fast = write_derived_pet(vol, denoised, tmp_path / "fast", PROV, created=when)
    finally:
        derived_pet._encode_file = original  # type: ignore[assignment]
    assert len(calls) == (0 if template_expected else len(fast))
    full = write_derived_pet(vol, denoised, tmp_path / "full", PROV, fast=False, created=when)
    return full, fast


def _varied_series() -> list[pydicom.Dataset]:
    """Slices that differ as real GE slices do (per-slice NumberOfTimeSlices, decay factors, times) and a
    series-level module the derivation corrects."""
    series = make_pet_series(shape=(5, 16, 16), seed=31, SeriesType=["WHOLE BODY", "IMAGE"])
    for i, ds in enumerate(series):
        ds.NumberOfTimeSlices = 1 + i % 2  # removed by the derivation on every slice, whatever its value
        ds.DecayFactor = f"{1.0 + 0.01 * i:.4f}"
        ds.FrameReferenceTime = str(1000 * i)
        ds.ClinicalTrialSponsorName = ""  # incomplete module: dropped from every slice
        if i == 3:
            ds.AcquisitionTime = "091500"  # present with another value on one slice only
    return series


@pytest.mark.parametrize("make", ["plain", "varied", "implicit", "jpegls", "legacy"])
def test_template_writer_is_byte_for_byte_the_full_derivation(tmp_path: Path, make: str) -> None:
    if make == "plain":
        datasets = make_pet_series(shape=(6, 16, 16), seed=32)
    elif make == "varied":
        datasets = _varied_series()
    elif make == "implicit":  # per-slice raw values copied with the dictionary's VR
        datasets = make_pet_series(shape=(5, 16, 16), seed=36, transfer_syntax=ImplicitVRLittleEndian,
                                   DecayFactor="1.0", FrameReferenceTime="0")
        for i, ds in enumerate(datasets):
            ds.DecayFactor, ds.FrameReferenceTime, ds.ActualFrameDuration = f"{1 + 0.001 * i:.3f}", str(7 * i), 600 + i
    elif make == "jpegls":
        datasets = make_pet_series(shape=(4, 16, 16), seed=33, transfer_syntax=JPEGLSLossless)
    else:
        datasets = make_legacy_converted_pet(make_pet_series(shape=(4, 16, 16), seed=34))
    vol = load_pet_series(write_series(datasets, tmp_path / "src"))
    full, fast = _both_paths(vol, tmp_path)
    assert [p.name for p in full] == [p.name for p in fast]
    for a, b in zip(full, fast):
        assert a.read_bytes() == b.read_bytes(), a.name
    if make == "varied":
        ds = pydicom.dcmread(fast[3])
        assert "NumberOfTimeSlices" not in ds and "ClinicalTrialSponsorName" not in ds
        assert ds.AcquisitionTime == "091500" and pydicom.dcmread(fast[2]).DecayFactor == "1.0200"


def test_slices_differing_in_what_the_derivation_reads_are_derived_one_by_one(tmp_path: Path) -> None:
    datasets = make_pet_series(shape=(4, 16, 16), seed=35)
    datasets[2].ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO"]  # ImageType feeds the derived ImageType
    vol = load_pet_series(write_series(datasets, tmp_path / "src"))
    full, fast = _both_paths(vol, tmp_path, template_expected=False)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(full, fast))
    assert list(pydicom.dcmread(fast[2]).ImageType) == ["DERIVED", "PRIMARY", "RECON TOMO"]


@pytest.mark.slow
def test_template_writer_matches_on_real_series(tmp_path: Path, realdata: Path) -> None:
    for folder in ("ohif_acrin_nsclc_fdg_pet_042", "mirp_tcia_sts_001_fdg_pet"):
        vol = load_pet_series(sorted((realdata / folder / "PT_AC").glob("*.dcm")))
        full, fast = _both_paths(vol, tmp_path / folder)
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(full, fast)), folder


def test_forked_writers_write_the_same_bytes_and_report_every_file(tmp_path: Path) -> None:
    import datetime as dt

    from dicom_node.outputs.derived_pet import FORK_MIN_SLICES

    vol = _volume(tmp_path, shape=(FORK_MIN_SLICES + 3, 8, 8))
    created = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    one = write_derived_pet(vol, _smooth(vol), tmp_path / "one", PROV, created=created)
    reported: list[Path] = []
    three = write_derived_pet(vol, _smooth(vol), tmp_path / "three", PROV, created=created, processes=3,
                              on_written=reported.append)
    assert [p.name for p in three] == [p.name for p in one]
    assert [p.read_bytes() for p in three] == [p.read_bytes() for p in one]
    assert sorted(reported) == three  # each file once, as its writer finished it
    assert not list((tmp_path / "three").glob(".*.tmp"))


def test_a_forked_writer_that_fails_fails_the_write_with_its_reason(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.outputs import derived_pet

    vol = _volume(tmp_path, shape=(derived_pet.FORK_MIN_SLICES, 8, 8))
    original = derived_pet.write_durable

    def full_disk_at_seven(path: Path, data: bytes, *, fsync: bool = True) -> None:
        if path.name == "0007.dcm":
            raise OSError(28, "No space left on device")
        original(path, data, fsync=fsync)

    monkeypatch.setattr(derived_pet, "write_durable", full_disk_at_seven)
    with pytest.raises(OutputWriteError, match=r"0007\.dcm.*No space left on device"):
        write_derived_pet(vol, vol.array, tmp_path / "out", PROV, processes=2)
