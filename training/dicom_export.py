"""Standard-conformant DICOM series from arrays: what ``petnode simulate --dicom`` and ``petnode demo`` write,
and what the tests send (``tests/factories.py`` re-exports this module).

Every factory returns a list of :class:`pydicom.Dataset` (one classic single-frame instance per slice, each with a
file meta header), sorted along the slice normal, that passes ``dciodvfy`` with zero errors. Nothing here touches
the network or the disk except :func:`write_series`. :func:`make_enhanced_pet_series` and
:func:`make_legacy_converted_pet` re-package such a classic PET series as multi-frame instances (Enhanced PET,
Legacy Converted Enhanced PET), also free of dciodvfy errors.

Geometry convention (all factories): ``shape`` and ``spacing`` are (z, y, x) = (slice, row, column); slice ``i`` sits
at ``origin + i * dz * normal`` where ``normal = row_cosines x column_cosines``; by default the volume is centred on
the patient-coordinate origin.

Keyword ``overrides`` set top-level attributes by DICOM keyword on every instance (``None`` deletes the attribute);
an unknown keyword raises ``ValueError`` so a typo cannot silently produce a different test.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "FDG_CODE",
    "FDG_CODE_SCT",
    "F18_CODE",
    "F18_CODE_SCT",
    "STUDY_DATE",
    "default_activity",
    "make_ct_series",
    "make_enhanced_pet_series",
    "make_legacy_converted_pet",
    "make_mr_series",
    "make_pet_series",
    "write_series",
]

STUDY_DATE = "20240115"

# SNOMED codes as most PET scanners still send them (SRT); see PS3.16 CID 4021 (PET Radiopharmaceutical) and
# CID 4020 (PET Radionuclide). dciodvfy accepts SRT (it may warn that SRT is superseded by SCT).
FDG_CODE: tuple[str, str, str] = ("C-B1031", "SRT", "Fluorodeoxyglucose F^18^")
F18_CODE: tuple[str, str, str] = ("C-111A1", "SRT", "^18^Fluorine")
# The same concepts in SNOMED CT (SCT), what current PS3.16 lists and dciodvfy does not flag as deprecated.
FDG_CODE_SCT: tuple[str, str, str] = ("35321007", "SCT", "Fluorodeoxyglucose F^18^")
F18_CODE_SCT: tuple[str, str, str] = ("77004003", "SCT", "^18^Fluorine")

# Patient orientation (CID 19 / CID 20 / CID 21), SNOMED CT.
_RECUMBENT = ("102538003", "SCT", "recumbent")
_SUPINE = ("40199007", "SCT", "supine")
_HEADFIRST = ("102540008", "SCT", "headfirst")

_LOSSLESS_ENCODABLE = frozenset(
    {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}  # RLE, JPEG-LS, J2K lossless
)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds(value: float) -> str:
    """Format a number as a DS string (<= 16 chars)."""
    return format_number_as_ds(float(value))


def _geometry(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: Sequence[float],
    origin: Sequence[float] | None,
) -> tuple[np.ndarray, list[list[float]]]:
    """Return the slice normal and ImagePositionPatient of each slice."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    nz, ny, nx = shape
    dz, dy, dx = spacing
    if origin is None:
        first = -((nx - 1) / 2 * dx * row + (ny - 1) / 2 * dy * col + (nz - 1) / 2 * dz * normal)
    else:
        first = np.asarray(origin, dtype=float)
    positions = [[round(float(v), 6) for v in first + i * dz * normal] for i in range(nz)]
    return normal, positions


def _time_plus(tm: str, seconds: float) -> str:
    base = dt.datetime.strptime(tm[:6], "%H%M%S")
    return (base + dt.timedelta(seconds=seconds)).strftime("%H%M%S")


def default_activity(
    shape: tuple[int, int, int] = (8, 32, 32),
    spacing: tuple[float, float, float] = (3.27, 4.0, 4.0),
    *,
    seed: int = 0,
    background: float = 5000.0,
    hot: float = 20000.0,
    noise: float = 0.1,
) -> np.ndarray:
    """A smooth elliptical body with a hot sphere, in Bq/ml, float64 (z, y, x).

    Parameters
    ----------
    shape, spacing
        Grid, (z, y, x) voxels and mm.
    seed
        Seed of the multiplicative Gaussian noise (relative standard deviation ``noise``).
    background, hot
        Activity concentration of the body and of the sphere.
    """
    from scipy.ndimage import gaussian_filter

    nz, ny, nx = shape
    dz, dy, dx = spacing
    z = (np.arange(nz) - (nz - 1) / 2) * dz
    y = (np.arange(ny) - (ny - 1) / 2) * dy
    x = (np.arange(nx) - (nx - 1) / 2) * dx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    ry, rx = 0.35 * ny * dy, 0.42 * nx * dx
    body = ((yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0).astype(float) * background
    radius = max(2.5 * max(dx, dy), 1.5 * dz)
    sphere_centre = (0.0, -0.3 * ry, 0.35 * rx)
    sphere = ((zz - sphere_centre[0]) ** 2 + (yy - sphere_centre[1]) ** 2 + (xx - sphere_centre[2]) ** 2) <= radius**2
    act = body + sphere * (hot - background)
    act = gaussian_filter(act, sigma=(0.5, 1.0, 1.0), mode="nearest")
    if noise > 0:
        rng = np.random.default_rng(seed)
        act = act * np.clip(rng.normal(1.0, noise, size=act.shape), 0.0, None)
    return np.clip(act, 0.0, None)


def _quantise_slice(values: np.ndarray) -> tuple[np.ndarray, str]:
    """int16 stored values and the DS slope string such that ``stored * float(slope) ~= values``."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak <= 0.0 or not np.isfinite(peak):
        return np.zeros(values.shape, dtype=np.int16), "1.0"
    slope = peak / 32767.0
    text = _ds(slope)
    while peak / float(text) > 32767.0:  # DS formatting rounded the slope down: nudge up so nothing clips
        slope *= 1.0 + 1e-9
        text = _ds(slope)
    stored = np.clip(np.rint(values / float(text)), -32768, 32767).astype(np.int16)
    return stored, text


def _apply_overrides(datasets: list[Dataset], overrides: dict[str, Any]) -> None:
    for keyword, value in overrides.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword in overrides: {keyword!r}")
        for ds in datasets:
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)


def _finish(ds: Dataset, transfer_syntax: str) -> None:
    """Attach the file meta and encode the pixel data in ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ts = UID(transfer_syntax)
    if ts == ExplicitVRLittleEndian:
        return
    if ts == ImplicitVRLittleEndian:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        return
    if ts not in _LOSSLESS_ENCODABLE:
        raise ValueError(f"factory cannot encode transfer syntax {ts!r} ({ts.name})")
    ds.compress(ts)  # sets file_meta.TransferSyntaxUID and encapsulates PixelData


def _common(
    *,
    modality: str,
    sop_class: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    study_date: str,
    series_time: str,
    manufacturer: str,
    model: str,
    station: str,
    series_description: str,
    series_number: int,
    orientation: Sequence[float],
    spacing: tuple[float, float, float],
    rows: int,
    cols: int,
    patient_weight: float | None,
) -> Dataset:
    """Attributes shared by every instance of one series (Patient, Study, Series, Equipment, FoR, Image Plane)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = series_time
    # Patient
    ds.PatientName = "PETNODE^TEST"
    ds.PatientID = "PETNODE-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    if patient_weight is not None:
        ds.PatientWeight = _ds(patient_weight)
    ds.PatientSize = "1.75"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = series_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "PET/CT petnode test"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study_date
    ds.SeriesTime = series_time
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "WHOLEBODY"
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.StationName = station
    ds.SoftwareVersions = "petnode-test-factory"
    ds.InstitutionName = "petnode test site"
    # Frame of Reference
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    # General Image / Image Plane / Image Pixel (geometry shared by the slices)
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = series_time
    ds.ContentDate = study_date
    ds.ContentTime = series_time
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
    ds.SliceThickness = _ds(spacing[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _slice_datasets(
    template: Dataset,
    stored: Sequence[np.ndarray],
    positions: list[list[float]],
    normal: np.ndarray,
) -> list[Dataset]:
    out: list[Dataset] = []
    for i, (pixels, pos) in enumerate(zip(stored, positions)):
        ds = copy.deepcopy(template)  # own elements: editing one slice in a test must not touch the others
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.SliceLocation = _ds(float(np.dot(pos, normal)))
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        out.append(ds)
    return out


def make_pet_series(
    shape: tuple[int, int, int] = (8, 32, 32),
    spacing: tuple[float, float, float] = (3.27, 4.0, 4.0),
    *,
    units: str = "BQML",
    seed: int = 0,
    activity: np.ndarray | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    for_uid: str | None = None,
    patient_weight: float | None = 75.0,
    dose_bq: float | None = 3.7e8,
    half_life_s: float | None = 6586.2,
    injection_time: str | None = "080000",
    series_time: str = "090000",
    tracer: str | None = "Fluorodeoxyglucose",
    manufacturer: str = "GE MEDICAL SYSTEMS",
    model: str = "Discovery ST",
    station: str = "PETCT1",
    series_description: str = "PET WB",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    origin: Sequence[float] | None = None,
    study_date: str = STUDY_DATE,
    decay_correction: str = "START",
    tracer_code: tuple[str, str, str] | None = FDG_CODE,
    radionuclide_code: tuple[str, str, str] | None = F18_CODE,
    series_number: int = 3,
    **overrides: Any,
) -> list[Dataset]:
    """A classic PET Image Storage series (SOP 1.2.840.10008.5.1.4.1.1.128), one instance per slice.

    Stored values are int16 with a per-slice RescaleSlope (max |value| / 32767, intercept 0) as GE scanners write
    them, so reading back ``stored * slope`` gives ``activity`` within half a quantisation step.

    Parameters
    ----------
    shape, spacing
        (z, y, x) voxels and mm; slice spacing along the normal equals ``spacing[0]``.
    units
        PET Units (0054,1001): "BQML", "PROPCNTS", "CNTS", ...; CorrectedImage lacks ATTN unless BQML.
    activity
        Values (z, y, x) in ``units``; default :func:`default_activity` (noise seeded by ``seed``).
    study_uid, series_uid, for_uid
        UIDs; new random ones when ``None``.
    patient_weight, dose_bq, half_life_s, injection_time
        SUV inputs (kg, Bq, s, TM); ``None`` leaves the attribute out (to test SUV errors).
    tracer, tracer_code, radionuclide_code
        Radiopharmaceutical (0018,0031) text and (value, scheme, meaning) codes; ``None`` leaves them out
        (RadionuclideCodeSequence is Type 2: present and empty then).
    transfer_syntax
        Explicit (default) or Implicit VR Little Endian, or lossless RLE / JPEG-LS / JPEG 2000 (encoded by pydicom;
        JPEG 2000 needs at least 32 x 32 pixels with openjpeg's default resolution levels).
    origin
        ImagePositionPatient of the first slice; default centres the volume on (0, 0, 0).
    study_date, decay_correction, series_number
        StudyDate = SeriesDate = AcquisitionDate; DecayCorrection (0054,1102); SeriesNumber.
    **overrides
        Top-level attributes by keyword on every instance (``None`` deletes).

    Returns
    -------
    list of Dataset
        Sorted along the slice normal, with ``file_meta`` set.
    """
    if activity is None:
        activity = default_activity(shape, spacing, seed=seed)
    activity = np.asarray(activity, dtype=np.float64)
    if activity.ndim != 3:
        raise ValueError(f"activity must be 3-D (z, y, x), got shape {activity.shape}")
    shape = activity.shape  # type: ignore[assignment]
    nz, ny, nx = shape
    normal, positions = _geometry(shape, spacing, orientation, origin)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = for_uid or generate_uid()

    tpl = _common(
        modality="PT",
        sop_class=PositronEmissionTomographyImageStorage,
        study_uid=study_uid,
        series_uid=series_uid,
        for_uid=for_uid,
        study_date=study_date,
        series_time=series_time,
        manufacturer=manufacturer,
        model=model,
        station=station,
        series_description=series_description,
        series_number=series_number,
        orientation=orientation,
        spacing=spacing,
        rows=ny,
        cols=nx,
        patient_weight=patient_weight,
    )
    tpl.ImageType = ["ORIGINAL", "PRIMARY"]
    # PET Series
    tpl.Units = units
    tpl.CountsSource = "EMISSION"
    tpl.SeriesType = ["WHOLE BODY", "IMAGE"]
    tpl.NumberOfSlices = nz
    tpl.CorrectedImage = (
        ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"] if units == "BQML" else ["DECY", "DTIM", "RAN", "NORM"]
    )
    tpl.DecayCorrection = decay_correction
    tpl.RandomsCorrectionMethod = "DLYD"
    tpl.AttenuationCorrectionMethod = "CT-based" if units == "BQML" else "none"
    tpl.ScatterCorrectionMethod = "model-based"
    tpl.ReconstructionMethod = "OSEM 3i16s"
    tpl.CollimatorType = "NONE"
    tpl.TypeOfDetectorMotion = "NONE"
    tpl.ReconstructionDiameter = _ds(max(ny * spacing[1], nx * spacing[2]))
    window = Dataset()
    window.EnergyWindowLowerLimit = "425"
    window.EnergyWindowUpperLimit = "650"
    tpl.EnergyWindowRangeSequence = DicomSequence([window])
    # PET Isotope
    rp = Dataset()
    if tracer is not None:
        rp.Radiopharmaceutical = tracer
    rp.RadiopharmaceuticalRoute = "Intravenous"
    if injection_time is not None:
        rp.RadiopharmaceuticalStartTime = injection_time
        rp.RadiopharmaceuticalStartDateTime = study_date + injection_time
    if dose_bq is not None:
        rp.RadionuclideTotalDose = _ds(dose_bq)
    if half_life_s is not None:
        rp.RadionuclideHalfLife = _ds(half_life_s)
    rp.RadionuclidePositronFraction = "0.9686"
    rp.RadionuclideCodeSequence = DicomSequence([_code(*radionuclide_code)] if radionuclide_code else [])
    if tracer_code is not None:
        rp.RadiopharmaceuticalCodeSequence = DicomSequence([_code(*tracer_code)])
    tpl.RadiopharmaceuticalInformationSequence = DicomSequence([rp])
    # NM/PET Patient Orientation (PatientPosition must then be absent: General Series 2C condition)
    orient = _code(*_RECUMBENT)
    orient.PatientOrientationModifierCodeSequence = DicomSequence([_code(*_SUPINE)])
    tpl.PatientOrientationCodeSequence = DicomSequence([orient])
    tpl.PatientGantryRelationshipCodeSequence = DicomSequence([_code(*_HEADFIRST)])
    # PET Image
    frame_ms = 180000
    tpl.ActualFrameDuration = frame_ms
    tpl.FrameReferenceTime = _ds(frame_ms / 2)
    if decay_correction != "NONE":
        hl = half_life_s if half_life_s else 6586.2
        tpl.DecayFactor = _ds(2.0 ** (frame_ms / 2000.0 / hl))
    tpl.LossyImageCompression = "00"
    tpl.RescaleIntercept = "0"

    stored: list[np.ndarray] = []
    slopes: list[str] = []
    for k in range(nz):
        values, slope = _quantise_slice(activity[k])
        stored.append(values)
        slopes.append(slope)
    datasets = _slice_datasets(tpl, stored, positions, normal)
    for k, ds in enumerate(datasets):
        ds.RescaleSlope = slopes[k]
        ds.ImageIndex = k + 1
        ds.ContentTime = _time_plus(series_time, 60 + k)  # content created after the acquisition started
    _apply_overrides(datasets, overrides)
    for ds in datasets:
        _finish(ds, transfer_syntax)
    return datasets


def make_ct_series(
    shape: tuple[int, int, int] = (8, 64, 64),
    spacing: tuple[float, float, float] = (3.27, 2.0, 2.0),
    *,
    seed: int = 0,
    hu: np.ndarray | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    for_uid: str | None = None,
    series_time: str = "085500",
    manufacturer: str = "GE MEDICAL SYSTEMS",
    model: str = "Discovery ST",
    station: str = "PETCT1",
    series_description: str = "CT AC",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    origin: Sequence[float] | None = None,
    study_date: str = STUDY_DATE,
    series_number: int = 2,
    **overrides: Any,
) -> list[Dataset]:
    """A small CT Image Storage series (HU = stored - 1024), by default covering the PET factory's field of view.

    ``hu`` (z, y, x) in Hounsfield units; default an elliptical water body with a bony spine and noise (``seed``).
    Other parameters as :func:`make_pet_series`.
    """
    if hu is None:
        nz, ny, nx = shape
        y = (np.arange(ny) - (ny - 1) / 2) * spacing[1]
        x = (np.arange(nx) - (nx - 1) / 2) * spacing[2]
        yy, xx = np.meshgrid(y, x, indexing="ij")
        ry, rx = 0.35 * ny * spacing[1], 0.42 * nx * spacing[2]
        plane = np.full((ny, nx), -1000.0)
        plane[(yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0] = 40.0
        plane[((yy - 0.6 * ry) ** 2 + xx**2) <= (0.15 * ry) ** 2] = 700.0
        rng = np.random.default_rng(seed)
        hu = np.repeat(plane[None], nz, axis=0) + rng.normal(0.0, 10.0, size=(nz, ny, nx))
    hu = np.asarray(hu, dtype=np.float64)
    shape = hu.shape  # type: ignore[assignment]
    nz, ny, nx = shape
    normal, positions = _geometry(shape, spacing, orientation, origin)
    tpl = _common(
        modality="CT",
        sop_class=CTImageStorage,
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        for_uid=for_uid or generate_uid(),
        study_date=study_date,
        series_time=series_time,
        manufacturer=manufacturer,
        model=model,
        station=station,
        series_description=series_description,
        series_number=series_number,
        orientation=orientation,
        spacing=spacing,
        rows=ny,
        cols=nx,
        patient_weight=75.0,
    )
    tpl.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    tpl.PatientPosition = "HFS"
    tpl.KVP = "120"
    tpl.AcquisitionNumber = 1
    tpl.ConvolutionKernel = "STANDARD"
    tpl.RescaleIntercept = "-1024"
    tpl.RescaleSlope = "1"
    tpl.RescaleType = "HU"
    stored = [np.clip(np.rint(hu[k] + 1024.0), -32768, 32767).astype(np.int16) for k in range(nz)]
    datasets = _slice_datasets(tpl, stored, positions, normal)
    _apply_overrides(datasets, overrides)
    for ds in datasets:
        _finish(ds, transfer_syntax)
    return datasets


def make_mr_series(
    shape: tuple[int, int, int] = (8, 64, 64),
    spacing: tuple[float, float, float] = (3.0, 2.0, 2.0),
    *,
    seed: int = 0,
    intensity: np.ndarray | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    for_uid: str | None = None,
    series_time: str = "084000",
    manufacturer: str = "SIEMENS",
    model: str = "Prisma",
    station: str = "MR1",
    series_description: str = "T1 MPRAGE",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    origin: Sequence[float] | None = None,
    study_date: str = STUDY_DATE,
    series_number: int = 5,
    **overrides: Any,
) -> list[Dataset]:
    """A small MR Image Storage series (T1-like, unsigned 12-bit values, no rescale).

    ``intensity`` (z, y, x) >= 0; default an elliptical head-like blob with a brighter core and noise (``seed``).
    Use ``orientation=(0, 1, 0, 0, 0, -1)`` for sagittal slices. Other parameters as :func:`make_pet_series`.
    """
    if intensity is None:
        nz, ny, nx = shape
        y = (np.arange(ny) - (ny - 1) / 2) * spacing[1]
        x = (np.arange(nx) - (nx - 1) / 2) * spacing[2]
        yy, xx = np.meshgrid(y, x, indexing="ij")
        r = (yy / (0.4 * ny * spacing[1])) ** 2 + (xx / (0.4 * nx * spacing[2])) ** 2
        plane = np.where(r <= 1.0, 600.0, 0.0) + np.where(r <= 0.3, 400.0, 0.0)
        rng = np.random.default_rng(seed)
        intensity = np.repeat(plane[None], nz, axis=0) + np.abs(rng.normal(0.0, 15.0, size=(nz, ny, nx)))
    intensity = np.asarray(intensity, dtype=np.float64)
    shape = intensity.shape  # type: ignore[assignment]
    nz, ny, nx = shape
    normal, positions = _geometry(shape, spacing, orientation, origin)
    tpl = _common(
        modality="MR",
        sop_class=MRImageStorage,
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        for_uid=for_uid or generate_uid(),
        study_date=study_date,
        series_time=series_time,
        manufacturer=manufacturer,
        model=model,
        station=station,
        series_description=series_description,
        series_number=series_number,
        orientation=orientation,
        spacing=spacing,
        rows=ny,
        cols=nx,
        patient_weight=75.0,
    )
    tpl.BodyPartExamined = "HEAD"
    tpl.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    tpl.PatientPosition = "HFS"
    tpl.ScanningSequence = ["GR", "IR"]
    tpl.SequenceVariant = ["SK", "SP", "MP"]
    tpl.ScanOptions = ""
    tpl.MRAcquisitionType = "3D"
    tpl.RepetitionTime = "2300"
    tpl.EchoTime = "2.98"
    tpl.InversionTime = "900"
    tpl.EchoTrainLength = 1
    tpl.FlipAngle = "9"
    tpl.MagneticFieldStrength = "3"
    tpl.ImagedNucleus = "1H"
    tpl.SpacingBetweenSlices = _ds(spacing[0])
    tpl.AcquisitionNumber = 1
    tpl.BitsStored = 12
    tpl.HighBit = 11
    tpl.PixelRepresentation = 0
    stored = [np.clip(np.rint(intensity[k]), 0, 4095).astype(np.uint16) for k in range(nz)]
    datasets = _slice_datasets(tpl, stored, positions, normal)
    _apply_overrides(datasets, overrides)
    for ds in datasets:
        _finish(ds, transfer_syntax)
    return datasets


def write_series(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a DICOM Part-10 file in ``directory`` (created if needed).

    Files are named ``<Modality>_<index:04d>_<SOPInstanceUID>.dcm`` (index in the given order), so several series
    can share one directory. Returns the paths in the order of ``datasets``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, ds in enumerate(datasets):
        path = directory / f"{ds.Modality}_{i:04d}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths




# --------------------------------------------------------------------------------------------------------------
# Multi-frame PET: Enhanced PET Image Storage and Legacy Converted Enhanced PET Image Storage
# --------------------------------------------------------------------------------------------------------------

# Classic PET Units (0054,1001) and their UCUM codes in CID 84 "PET Units" (the Enhanced PET IOD states units only
# through the Real World Value Mapping's Measurement Units Code Sequence).
PET_UNITS_UCUM: dict[str, tuple[str, str]] = {
    "BQML": ("Bq/ml", "Becquerels/milliliter"),
    "CNTS": ("{counts}", "Counts"),
    "CPS": ("{counts}/s", "Counts per second"),
    "PROPCNTS": ("{propcounts}", "Proportional to counts"),
    "PROPCPS": ("{propcounts}/s", "Proportional to counts per second"),
    "GML": ("{SUVbw}g/ml", "Standardized Uptake Value body weight"),
}

# Enhanced PET Corrections module flags (PS3.3 C.8.22) and the classic CorrectedImage (0028,0051) value of each.
PET_CORRECTION_FLAGS: dict[str, str] = {
    "DecayCorrected": "DECY",
    "AttenuationCorrected": "ATTN",
    "ScatterCorrected": "SCAT",
    "DeadTimeCorrected": "DTIM",
    "GantryMotionCorrected": "MOTN",
    "PatientMotionCorrected": "PMOT",
    "CountLossNormalizationCorrected": "CLN",
    "RandomsCorrected": "RAN",
    "NonUniformRadialSamplingCorrected": "RADL",
    "SensitivityCalibrated": "DCAL",
    "DetectorNormalizationCorrection": "NORM",
}

# Top-level attributes an Enhanced PET instance takes unchanged from the classic series (Patient, General Study,
# Patient Study, General Series, General Equipment, Frame of Reference).
_SERIES_LEVEL = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientSize",
    "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription", "Modality", "SeriesNumber", "SeriesDate", "SeriesTime",
    "SeriesDescription", "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "StationName",
    "SoftwareVersions", "InstitutionName", "FrameOfReferenceUID", "PositionReferenceIndicator",
)  # fmt: skip
_IMAGE_PIXEL = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
                "HighBit", "PixelRepresentation")
# Dimension Index Pointer / Functional Group Pointer tags.
_TEMPORAL_POSITION_INDEX = 0x00209128
_FRAME_CONTENT_SEQUENCE = 0x00209111
_IMAGE_POSITION_PATIENT = 0x00200032
_PLANE_POSITION_SEQUENCE = 0x00209113


def _datetime(date: object, time: object) -> dt.datetime:
    return dt.datetime.strptime(str(date).strip() + str(time).strip()[:6], "%Y%m%d%H%M%S")


def _dt_text(value: dt.datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S")


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _injection_dt_text(rp: Dataset, series_date: str) -> str | None:
    """RadiopharmaceuticalStartDateTime, or the series date with RadiopharmaceuticalStartTime (older consoles)."""
    if rp.get("RadiopharmaceuticalStartDateTime"):
        return str(rp.RadiopharmaceuticalStartDateTime)
    if rp.get("RadiopharmaceuticalStartTime"):
        return _dt_text(_datetime(series_date, rp.RadiopharmaceuticalStartTime))
    return None


def _enhanced_isotope(rp: Dataset, series_date: str) -> Dataset:
    """A classic Radiopharmaceutical Information item re-written for the Enhanced PET Isotope module (which has no
    free-text Radiopharmaceutical and codes the route)."""
    item = Dataset()
    item.RadiopharmaceuticalAgentNumber = 1
    item.RadiopharmaceuticalCodeSequence = copy.deepcopy(rp.get("RadiopharmaceuticalCodeSequence") or DicomSequence())
    item.RadionuclideCodeSequence = copy.deepcopy(rp.get("RadionuclideCodeSequence") or DicomSequence())
    injection = _injection_dt_text(rp, series_date)
    if injection is not None:
        item.RadiopharmaceuticalStartDateTime = injection
    for keyword in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadionuclidePositronFraction"):
        if keyword in rp:
            setattr(item, keyword, rp[keyword].value)
    item.AdministrationRouteCodeSequence = DicomSequence([_code("47625008", "SCT", "Intravenous route")])
    return item


def _enhanced_pet_header(first: Dataset, *, flavor: str, series_uid: str, acquisition_s: float) -> Dataset:
    """The top level of an Enhanced PET instance (all but the functional groups, the frames and the dimensions)."""
    from pydicom.uid import EnhancedPETImageStorage

    ds = Dataset()
    for keyword in _SERIES_LEVEL:
        if keyword in first:
            setattr(ds, keyword, copy.deepcopy(first[keyword].value))
    ds.SOPClassUID = EnhancedPETImageStorage
    ds.SeriesInstanceUID = series_uid
    ds.InstanceCreationDate = first.SeriesDate
    ds.InstanceCreationTime = first.SeriesTime
    ds.DeviceSerialNumber = "PN0001"  # Enhanced General Equipment: Type 1
    # Enhanced PET Image (with the Common CT/MR Image Description macro)
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.AcquisitionDateTime = _dt_text(_datetime(first.SeriesDate, first.SeriesTime))
    ds.AcquisitionDuration = acquisition_s
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ContentDate = first.SeriesDate
    ds.ContentTime = first.SeriesTime
    ds.AcquisitionContextSequence = DicomSequence()
    ds.ViewCodeSequence = DicomSequence([_code("62824007", "SCT", "Transverse")])
    for keyword in _IMAGE_PIXEL:
        setattr(ds, keyword, first[keyword].value)
    # Enhanced PET Acquisition
    ds.AcquisitionStartCondition = "MANU"
    ds.AcquisitionTerminationCondition = "MANU"
    ds.DetectorGeometry = "CYLINDRICAL_RING"
    ds.TypeOfDetectorMotion = "STATIONARY"
    ds.CollimatorType = "NONE"
    ds.TableMotion = "STATIC"
    ds.TimeOfFlightInformationUsed = "TRUE"
    ds.TransverseDetectorSeparation = 810.0
    ds.AxialDetectorDimension = 157.0
    ds.CoincidenceWindowWidth = 4.9
    window = _item(EnergyWindowLowerLimit="425", EnergyWindowUpperLimit="650")
    ds.EnergyWindowRangeSequence = copy.deepcopy(first.get("EnergyWindowRangeSequence") or DicomSequence([window]))
    # Enhanced PET Isotope
    rp = first.RadiopharmaceuticalInformationSequence[0]
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([_enhanced_isotope(rp, str(first.SeriesDate))])
    # Enhanced PET Corrections: one flag per classic Corrected Image value, the decay reference stated explicitly.
    decay = str(first.get("DecayCorrection", "NONE"))
    corrected = {str(v) for v in first.get("CorrectedImage") or []} - ({"DECY"} if decay == "NONE" else set())
    ds.CountsSource = str(first.get("CountsSource", "EMISSION"))
    for keyword, value in PET_CORRECTION_FLAGS.items():
        setattr(ds, keyword, "YES" if value in corrected else "NO")
    if ds.DecayCorrected == "YES":
        # START: decayed to the series start; ADMIN: to the administration.
        ds.DecayCorrectionDateTime = (
            ds.AcquisitionDateTime if decay == "START" else _injection_dt_text(rp, str(first.SeriesDate))
        )
    if ds.AttenuationCorrected == "YES":
        ds.AttenuationCorrectionSource = "CT"
        ds.AttenuationCorrectionTemporalRelationship = "CONCURRENT"
    if ds.ScatterCorrected == "YES":
        ds.ScatterCorrectionMethod = str(first.get("ScatterCorrectionMethod", "model-based"))
    if ds.RandomsCorrected == "YES":
        ds.RandomsCorrectionMethod = str(first.get("RandomsCorrectionMethod", "DLYD"))
    return ds


def _enhanced_shared_groups(first: Dataset, flavor: str, shared_slope: str | None) -> Dataset:
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence(
        [_item(PixelSpacing=list(first.PixelSpacing), SliceThickness=first.SliceThickness)]
    )
    orientation = list(first.ImageOrientationPatient)
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=orientation)])
    anatomy = DicomSequence([_code("38266002", "SCT", "Entire body")])
    shared.FrameAnatomySequence = DicomSequence([_item(AnatomicRegionSequence=anatomy, FrameLaterality="U")])
    shared.PETFrameTypeSequence = DicomSequence([_item(
        FrameType=["ORIGINAL", "PRIMARY", flavor, "NONE"], PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
    )])  # fmt: skip
    shared.PETFrameAcquisitionSequence = DicomSequence([_item(
        TableHeight="150", GantryDetectorTilt="0", GantryDetectorSlew="0", DataCollectionDiameter="700"
    )])  # fmt: skip
    shared.PETDetectorMotionDetailsSequence = DicomSequence([_item(RotationDirection="CW", RevolutionTime=1.0)])
    shared.PETReconstructionSequence = DicomSequence([_item(
        ReconstructionType="3D", ReconstructionAlgorithm="MLEM", IterativeReconstructionMethod="YES",
        NumberOfIterations=3, NumberOfSubsets=16, ReconstructionDiameter=first.get("ReconstructionDiameter", "700"),
    )])  # fmt: skip
    if shared_slope is not None:
        shared.PixelValueTransformationSequence = DicomSequence(
            [_item(RescaleIntercept="0", RescaleSlope=shared_slope, RescaleType="US")]
        )
    return shared


def make_enhanced_pet_series(
    classic: Sequence[Dataset],
    *,
    instances: int = 1,
    time_points: int = 1,
    series_uid: str | None = None,
    shared_rescale: bool = False,
    reverse_frames: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> list[Dataset]:
    """Enhanced PET Image Storage (1.2.840.10008.5.1.4.1.1.130) instances holding the slices of a classic series.

    Laid out as a scanner exporting Enhanced PET writes it: Pixel Measures, Plane Orientation and the PET
    acquisition and reconstruction macros shared; Frame Content, Plane Position, Pixel Value Transformation, Real
    World Value Mapping (the only statement of the units, as a UCUM code) and PET Frame Correction Factors per
    frame; decay correction as the Enhanced PET Corrections flags with Decay Correction DateTime; the
    radiopharmaceutical in the Enhanced PET Isotope module. Passes dciodvfy with zero errors.

    Parameters
    ----------
    classic
        A classic PET series, sorted along the normal and uncompressed (:func:`make_pet_series`, or real data).
    instances
        Split the frames over this many instances of one series (contiguous runs of frames).
    time_points
        Repeat the slices at this many successive frame times (ImageType DYNAMIC): frames ordered by time, then
        position, with Temporal Position Index in the Frame Content.
    series_uid
        SeriesInstanceUID; a new one by default (a converted series is a new series).
    shared_rescale
        Re-quantise all frames with one RescaleSlope in the Shared Functional Groups instead of one per frame.
    reverse_frames
        Store the frames in the opposite order (head first, as several scanners do).
    transfer_syntax
        As :func:`make_pet_series`.
    **overrides
        Top-level attributes by keyword on every instance (``None`` deletes).

    Returns
    -------
    list of Dataset
        One dataset per instance, with ``file_meta`` set.
    """
    slices = list(classic)
    if not slices:
        raise ValueError("no classic slices given")
    if not 1 <= instances <= len(slices) * time_points:
        raise ValueError(f"instances {instances} must be between 1 and the number of frames")
    first = slices[0]
    units = str(first.get("Units", ""))
    ucum = PET_UNITS_UCUM.get(units)
    duration_ms = float(first.get("ActualFrameDuration") or 180000)
    series_start = _datetime(first.SeriesDate, first.SeriesTime)
    if shared_rescale:
        values = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.get("RescaleIntercept", 0)) for ds in slices]
        shared_slope = _quantise_slice(np.array([max(float(np.max(np.abs(v))) for v in values)]))[1]
        stored = [np.clip(np.rint(v / float(shared_slope)), -32768, 32767).astype(np.int16) for v in values]
        slopes = [shared_slope] * len(slices)
    else:
        shared_slope = None
        stored = [ds.pixel_array for ds in slices]
        slopes = [str(ds.RescaleSlope) for ds in slices]
    lowest, highest = (0, 65535) if stored[0].dtype.kind == "u" else (-32768, 32767)
    series_type = str((first.get("SeriesType") or ["STATIC"])[0]).upper()
    flavor = "DYNAMIC" if time_points > 1 else ("WHOLE_BODY" if series_type == "WHOLE BODY" else "STATIC")
    header = _enhanced_pet_header(
        first, flavor=flavor, series_uid=series_uid or generate_uid(), acquisition_s=duration_ms * time_points / 1000
    )
    if shared_rescale:
        header.PixelRepresentation, header.BitsStored, header.HighBit = 1, 16, 15
    shared = _enhanced_shared_groups(first, flavor, shared_slope)
    dimension_uid = generate_uid()
    index = [_item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=_IMAGE_POSITION_PATIENT,
                   FunctionalGroupPointer=_PLANE_POSITION_SEQUENCE, DimensionDescriptionLabel="Image Position")]
    if time_points > 1:
        index.insert(0, _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=_TEMPORAL_POSITION_INDEX,
                              FunctionalGroupPointer=_FRAME_CONTENT_SEQUENCE,
                              DimensionDescriptionLabel="Temporal Position"))

    # One frame per (time point, slice index).
    frames = [(t, k) for t in range(time_points) for k in range(len(slices))]
    if reverse_frames:
        frames.reverse()
    out: list[Dataset] = []
    for number, chunk in enumerate(np.array_split(np.arange(len(frames)), instances), start=1):
        ds = copy.deepcopy(header)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.NumberOfFrames = len(chunk)
        ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dimension_uid)])
        ds.DimensionIndexSequence = DicomSequence(copy.deepcopy(index))
        ds.DimensionOrganizationType = "3D_TEMPORAL" if time_points > 1 else "3D"
        per_frame: list[Dataset] = []
        for f in chunk:
            t, k = frames[int(f)]
            src = slices[k]
            start = series_start + dt.timedelta(milliseconds=duration_ms * t)
            content = _item(
                FrameAcquisitionDateTime=_dt_text(start),
                FrameReferenceDateTime=_dt_text(start + dt.timedelta(milliseconds=duration_ms / 2)),
                FrameAcquisitionDuration=duration_ms, StackID="1", InStackPositionNumber=k + 1,
                TemporalPositionIndex=t + 1, DimensionIndexValues=[t + 1, k + 1] if time_points > 1 else [k + 1],
            )
            item = Dataset()
            item.FrameContentSequence = DicomSequence([content])
            position = [float(v) for v in src.ImagePositionPatient]
            item.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=list(src.ImagePositionPatient))])
            if not shared_rescale:
                item.PixelValueTransformationSequence = DicomSequence(
                    [_item(RescaleIntercept="0", RescaleSlope=slopes[k], RescaleType="US")]
                )
            if ucum is not None:
                item.RealWorldValueMappingSequence = DicomSequence([_item(
                    LUTExplanation=ucum[1], LUTLabel=units, RealWorldValueFirstValueMapped=lowest,
                    RealWorldValueLastValueMapped=highest, RealWorldValueIntercept=0.0,
                    RealWorldValueSlope=float(slopes[k]),
                    MeasurementUnitsCodeSequence=DicomSequence([_code(ucum[0], "UCUM", ucum[1])]),
                )])  # fmt: skip
            factors = _item(PrimaryPromptsCountsAccumulated=2000000, SliceSensitivityFactor="1", DeadTimeFactor="1",
                            ScatterFractionFactor="0.3")
            if "DecayFactor" in src:
                factors.DecayFactor = src.DecayFactor
            item.PETFrameCorrectionFactorsSequence = DicomSequence([factors])
            item.PETPositionSequence = DicomSequence([_item(  # any point of the slice plane serves as a centre
                TablePosition=position[2], DataCollectionCenterPatient=position,
                ReconstructionTargetCenterPatient=position,
            )])  # fmt: skip
            item.RadiopharmaceuticalUsageSequence = DicomSequence([_item(RadiopharmaceuticalAgentNumber=1)])
            per_frame.append(item)
        ds.SharedFunctionalGroupsSequence = DicomSequence([copy.deepcopy(shared)])
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
        ds.PixelData = np.ascontiguousarray(np.stack([stored[frames[int(f)][1]] for f in chunk])).tobytes()
        out.append(ds)
    _apply_overrides(out, overrides)
    for ds in out:
        _finish(ds, transfer_syntax)
    return out


def make_legacy_converted_pet(
    classic: Sequence[Dataset],
    *,
    instances: int = 1,
    series_uid: str | None = None,
    series_number: int | None = None,
) -> list[Dataset]:
    """Legacy Converted Enhanced PET Image Storage (1.2.840.10008.5.1.4.1.1.128.1) instances of a classic series.

    Converted by highdicom (an implementation independent of petnode's reader): geometry and rescale move into
    the functional groups, while the classic PET attributes no macro holds (Units, DecayCorrection, the
    Radiopharmaceutical Information Sequence, Image Index ...) go to the Unassigned Shared / Per-Frame Converted
    Attributes Sequences. highdicom stores the frames head first (descending position). Passes dciodvfy with zero
    errors.

    Parameters
    ----------
    classic
        A classic PET series (:func:`make_pet_series`).
    instances
        Convert contiguous runs of slices into this many instances of one series.
    series_uid, series_number
        Of the converted series; a new UID and the classic SeriesNumber + 100 by default.

    Returns
    -------
    list of Dataset
        One dataset per instance, with ``file_meta`` set.
    """
    from highdicom.legacy import LegacyConvertedEnhancedPETImage

    slices = list(classic)
    if not 1 <= instances <= len(slices):
        raise ValueError(f"instances {instances} must be between 1 and {len(slices)}")
    series_uid = series_uid or generate_uid()
    number = int(series_number if series_number is not None else int(slices[0].SeriesNumber) + 100)
    out: list[Dataset] = []
    for k, chunk in enumerate(np.array_split(np.arange(len(slices)), instances), start=1):
        converted = LegacyConvertedEnhancedPETImage(
            [slices[int(i)] for i in chunk], series_instance_uid=series_uid, series_number=number,
            sop_instance_uid=generate_uid(), instance_number=k,
        )
        ds = Dataset(converted)  # a plain pydicom Dataset, as a receiver reads it
        ds.file_meta = converted.file_meta
        # dciodvfy reports the Common Instance Reference module as an error when the instance's only references
        # are those of the Conversion Source Attributes Sequence, so the module is left out (zero errors).
        if "ReferencedSeriesSequence" in ds:
            del ds.ReferencedSeriesSequence
        out.append(ds)
    return out
