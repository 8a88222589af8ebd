"""Assemble a PET series into a volume, check its geometry and compute its SUVbw factor.

A series is read once: each file is parsed, decoded (compressed transfer syntaxes through pydicom's pixel
backends, including the pylibjpeg plugins), rescaled per slice, and its header kept without Pixel Data for writing
derived outputs. Slices are sorted by their position along the slice normal (ImageOrientationPatient), never by
InstanceNumber or SliceLocation, which scanners fill inconsistently.

Multi-frame PET (Enhanced PET and Legacy Converted Enhanced PET Image Storage, one or several instances) is read
into the same volume: each frame is turned into the header a classic PET slice would have (:func:`frame_headers`:
geometry and rescale from the functional groups, Units from the Real World Value Mapping, decay correction from
the Enhanced PET Corrections module, the radiopharmaceutical from the Enhanced PET Isotope module), and from there
on frames and classic slices take the same path: the same sorting, geometry checks and SUV. Only one time point is
processed: dynamic or gated multi-frame data are refused rather than frames of different times mixed.

No torch, no pynetdicom here: the completion scheduler imports :func:`check_contiguity` on the hot path.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, DT, TM, format_number_as_ds

from dicom_node import rawvalues
from dicom_node.completion import DEFAULT_SPACING_TOLERANCE, spacing_problem
from dicom_node.errors import MultiFrameError, SeriesError, SuvError
from dicom_node.rawread import read_plain

__all__ = [
    "ENHANCED_PET_IMAGE_STORAGE",
    "LEGACY_CONVERTED_ENHANCED_PET_IMAGE_STORAGE",
    "MULTIFRAME_PET_STORAGE",
    "PET_IMAGE_STORAGE",
    "PetVolume",
    "check_contiguity",
    "compute_suv_bw_factor",
    "frame_headers",
    "load_pet_series",
    "read_instance",
]

logger = logging.getLogger(__name__)

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
ENHANCED_PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.130"
LEGACY_CONVERTED_ENHANCED_PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128.1"
MULTIFRAME_PET_STORAGE = frozenset({ENHANCED_PET_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_PET_IMAGE_STORAGE})

# The one spacing tolerance and check, shared with completion (see dicom_node.completion.spacing_problem).
SLICE_SPACING_RTOL = DEFAULT_SPACING_TOLERANCE
# Positions closer than this along the normal are duplicates (dynamic or gated frames, or a resent instance).
DUPLICATE_ATOL_MM = 1e-3
# Direction cosines and pixel spacing must agree to this between slices.
ORIENTATION_ATOL = 1e-4
PIXEL_SPACING_RTOL = 1e-4
# Slices must stack along the normal: the in-plane offset between slices may not exceed this (a tilted gantry or a
# shear would otherwise be silently flattened into an orthogonal grid).
IN_PLANE_ATOL_MM = 0.05


@dataclass(frozen=True)
class PetVolume:
    """A PET series as a volume plus the headers needed to write derived series.

    Attributes
    ----------
    array
        float32 (z, y, x) in the series' own units after per-slice rescale; read-only.
    spacing
        (dz, dy, dx) in mm; dz from the positions along the slice normal, not SliceThickness.
    orientation
        ImageOrientationPatient (6 floats) shared by all slices.
    positions
        ImagePositionPatient of each sorted slice.
    units
        PET Units (0054,1001), e.g. "BQML", "PROPCNTS", "" when absent.
    suv_factor
        SUVbw = value * suv_factor (g/ml per Bq/ml), or None when unavailable.
    suv_problem
        Why ``suv_factor`` is None (None when it is available).
    headers
        Datasets sorted like ``array``, without Pixel Data; read-only: slices share the element objects they hold
        equal (:class:`ElementSharer`). For a multi-frame source, the classic PET header of each
        frame (see :func:`frame_headers`): SOP Class and Instance UID are those of the multi-frame instance.
    paths
        Source files sorted like ``array`` (a multi-frame file appears once per frame).
    series_uid, study_uid, frame_of_reference_uid
        Identity of the source series.
    frames
        For a multi-frame source, the frame number (from 1) of each slice in its instance, sorted like ``array``;
        empty for a classic series.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...]
    positions: list[tuple[float, float, float]]
    units: str
    suv_factor: float | None
    suv_problem: str | None
    headers: list[Dataset] = field(repr=False)
    paths: list[Path] = field(repr=False)
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    frames: tuple[int, ...] = ()

    @property
    def is_quantitative(self) -> bool:
        """True when the values are Bq/ml and an SUVbw factor is known."""
        return self.units == "BQML" and self.suv_factor is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxels."""
        return tuple(self.array.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Geometry:
    order: list[int]  # indices into the given headers, sorted along the normal
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...]
    positions: list[tuple[float, float, float]]


def _floats(ds: Dataset, keyword: str, count: int, label: str | None = None) -> np.ndarray:
    fast = rawvalues.decimals(ds, keyword)  # leaves the element raw, shared
    if fast is not None and len(fast) == count:
        return np.array(fast, dtype=float)
    label = label or str(ds.get("SOPInstanceUID", "?"))
    value = ds.get(keyword)
    if value is None or value == "":
        raise SeriesError(f"instance {label} lacks {keyword}")
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        arr = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"instance {label}: {keyword} {values!r} is not numeric") from exc
    if arr.size != count or not np.all(np.isfinite(arr)):
        raise SeriesError(f"instance {label}: {keyword} {values!r} needs {count} finite numbers")
    return arr


def _geometry(headers: Sequence[Dataset], labels: Sequence[str] | None = None,
              spacing_tolerance: float = SLICE_SPACING_RTOL) -> _Geometry:
    """Sort slices along the normal and check they form one uniform, contiguous stack (raises SeriesError).

    ``labels`` name each slice in messages (default its SOPInstanceUID; "<uid> frame <n>" for frames).
    """
    if not headers:
        raise SeriesError("no instances")
    if labels is None:
        labels = [str(ds.get("SOPInstanceUID", "?")) for ds in headers]
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in headers})
    if len(series_uids) != 1:
        raise SeriesError(f"mixed series: {len(series_uids)} SeriesInstanceUIDs {series_uids}")
    first = headers[0]
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(
            f"multi-frame instances (NumberOfFrames {frames}, SOP Class {first.get('SOPClassUID', '?')}) are not "
            "supported; classic slices, Enhanced PET and Legacy Converted Enhanced PET only"
        )

    orientation = _floats(first, "ImageOrientationPatient", 6, labels[0])
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise SeriesError(f"ImageOrientationPatient {orientation.tolist()} is not two orthonormal directions")
    normal = np.cross(row, col)
    rows, cols = first.get("Rows"), first.get("Columns")
    pixel_spacing = _floats(first, "PixelSpacing", 2, labels[0])

    positions = np.empty((len(headers), 3))
    for i, ds in enumerate(headers):
        uid = labels[i]
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SeriesError(f"instance {uid} is multi-frame; classic slices only")
        other = _floats(ds, "ImageOrientationPatient", 6, uid)
        if not np.allclose(other, orientation, atol=ORIENTATION_ATOL, rtol=0):
            raise SeriesError(
                f"orientation mismatch: instance {uid} has ImageOrientationPatient {other.tolist()}, "
                f"first has {orientation.tolist()}"
            )
        if ds.get("Rows") != rows or ds.get("Columns") != cols:
            raise SeriesError(
                f"matrix mismatch: instance {uid} is {ds.get('Rows')}x{ds.get('Columns')}, first is {rows}x{cols}"
            )
        ps = _floats(ds, "PixelSpacing", 2, uid)
        if not np.allclose(ps, pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            raise SeriesError(
                f"pixel spacing mismatch: instance {uid} has {ps.tolist()}, first has {pixel_spacing.tolist()}"
            )
        positions[i] = _floats(ds, "ImagePositionPatient", 3, uid)

    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along_sorted = along[order]
    pos_sorted = positions[order]
    if len(headers) == 1:
        dz = _single_slice_spacing(first)
    else:
        gaps = np.diff(along_sorted)
        dup = np.flatnonzero(gaps < DUPLICATE_ATOL_MM)
        if dup.size:
            k = int(dup[0])
            series_type = list(first.get("SeriesType", []) or [])
            hint = (
                f" (SeriesType {series_type[0]}: dynamic/gated series are not supported)"
                if series_type and str(series_type[0]).upper() in {"DYNAMIC", "GATED"}
                else ""
            )
            raise SeriesError(
                f"duplicate slice position {along_sorted[k]:.3f} mm along the normal "
                f"(instances {labels[order[k]]} and {labels[order[k + 1]]}){hint}"
            )
        dz = float(np.median(gaps))
        problem = spacing_problem(along_sorted, spacing_tolerance)
        if problem is not None:
            raise SeriesError(problem)
        offsets = pos_sorted - pos_sorted[0]
        in_plane = offsets - np.outer(offsets @ normal, normal)
        drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
        if drift > IN_PLANE_ATOL_MM:
            raise SeriesError(
                f"slices do not stack along the normal: in-plane offset up to {drift:.3f} mm "
                "(tilted gantry or sheared volume)"
            )
    return _Geometry(
        order=order,
        spacing=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
        orientation=tuple(float(v) for v in orientation),
        positions=[tuple(float(v) for v in p) for p in pos_sorted],  # type: ignore[misc]
    )


def _single_slice_spacing(ds: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        try:
            if value not in (None, "") and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    raise SeriesError("single-slice series without SpacingBetweenSlices or SliceThickness: slice spacing unknown")


# --- multi-frame PET: one classic slice header per frame -------------------------------------------------------------

# Top-level attributes that describe the multi-frame encoding, or belong to modules only the Enhanced and Legacy
# Converted Enhanced PET IODs have; the classic header of a frame leaves them out (the derived classic PET instance
# would otherwise carry attributes its IOD does not define, or references to the wrong frames).
_MULTIFRAME_ONLY = frozenset(
    tag_for_keyword(k)
    for k in (
        "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
        "DimensionOrganizationSequence", "DimensionIndexSequence", "DimensionOrganizationType",
        "ConcatenationUID", "ConcatenationFrameOffsetNumber", "InConcatenationNumber", "InConcatenationTotalNumber",
        "SOPInstanceUIDOfConcatenationSource", "RepresentativeFrameNumber", "FrameIncrementPointer",
        "ContentQualification", "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
        "AcquisitionDuration", "PresentationLUTShape", "AcquisitionContextSequence", "ReferencedSeriesSequence",
        "StudiesContainingOtherReferencedInstancesSequence", "SourceImageEvidenceSequence",
        "ReferencedImageEvidenceSequence", "ReferencedRawDataSequence", "ReferencedWaveformSequence",
        "ReferencedPresentationStateSequence", "ViewCodeSequence", "SliceProgressionDirection",
        "DetectorGeometry", "TableMotion", "TimeOfFlightInformationUsed", "TransverseDetectorSeparation",
        "AxialDetectorDimension", "DecayCorrectionDateTime", "AttenuationCorrectionSource",
        "AttenuationCorrectionTemporalRelationship", "CardiacSynchronizationTechnique",
        "CardiacSignalSource", "CardiacRRIntervalSpecified", "CardiacBeatRejectionTechnique",
        "RespiratoryMotionCompensationTechnique", "RespiratorySignalSource", "BulkMotionCompensationTechnique",
        "BulkMotionSignalSource", "ContrastBolusAgentSequence", "PixelData", "FloatPixelData",
        "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    )
)  # fmt: skip
# Enhanced PET Corrections module (PS3.3 C.8.22) flags and the classic Corrected Image (0028,0051) value of each.
_CORRECTION_FLAGS = {
    "DecayCorrected": "DECY", "AttenuationCorrected": "ATTN", "ScatterCorrected": "SCAT",
    "DeadTimeCorrected": "DTIM", "GantryMotionCorrected": "MOTN", "PatientMotionCorrected": "PMOT",
    "CountLossNormalizationCorrected": "CLN", "RandomsCorrected": "RAN", "NonUniformRadialSamplingCorrected": "RADL",
    "SensitivityCalibrated": "DCAL", "DetectorNormalizationCorrection": "NORM",
}  # fmt: skip
_CORRECTION_TAGS = frozenset(tag_for_keyword(k) for k in _CORRECTION_FLAGS)
# UCUM codes of CID 84 "PET Units" (how the Enhanced PET IOD states units, in the Real World Value Mapping) and the
# classic Units (0054,1001) value of each.
_UCUM_UNITS = {
    "{counts}": "CNTS", "{counts}/s": "CPS", "Bq/ml": "BQML", "{propcounts}": "PROPCNTS",
    "{propcounts}/s": "PROPCPS", "mg/min/ml": "MGMINML", "umol/min/ml": "UMOLMINML", "ml/min/g": "MLMING",
    "ml/g": "MLG", "/cm": "1CM", "umol/ml": "UMOLML", "ml/min/ml": "MLMINML", "ml/ml": "MLML", "%": "PCNT",
    "{SUVbw}g/ml": "GML", "{SUVlbm}g/ml": "GML", "{SUVbsa}cm2/ml": "CM2ML", "{SUVibw}g/ml": "GML",
}  # fmt: skip
# General Series Patient Position -> NM/PET Patient Orientation codes (CID 19, 20, 21; SNOMED CT): the classic PET
# IOD states the patient's position only through these (Patient Position must then be absent).
_RECUMBENT = ("102538003", "SCT", "recumbent")
_POSTURE = {
    "S": ("40199007", "SCT", "supine"), "P": ("1240000", "SCT", "prone"),
    "DL": ("102535000", "SCT", "left lateral decubitus"), "DR": ("102536004", "SCT", "right lateral decubitus"),
}  # fmt: skip
_GANTRY = {"HF": ("102540008", "SCT", "headfirst"), "FF": ("102541007", "SCT", "feet-first")}
# Series Type value 1 from Enhanced PET Image Type value 3 (the Image Flavor). One time point of a dynamic or
# gated acquisition is a static image.
_SERIES_TYPE_BY_FLAVOR = {"WHOLE_BODY": "WHOLE BODY"}
# Attributes of an Enhanced PET Isotope item that the classic PET Isotope item does not define.
_ENHANCED_ISOTOPE_ONLY = ("RadiopharmaceuticalAgentNumber",)
# Pixel Value Transformation and Real World Value Mapping agree when their slopes match to this (DS rounding).
_RWV_RTOL = 1e-6


@dataclass(frozen=True)
class _Slices:
    """Classic slice headers of a series: instances as they are, multi-frame instances one header per frame."""

    headers: list[Dataset]
    sources: list[int]  # index of the dataset each header comes from
    frames: list[int | None]  # frame number (from 1) in that dataset; None for a classic instance
    labels: list[str]  # names in messages


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group(frame: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """The item of functional group ``keyword`` for one frame: per-frame first, else shared (PS3.3 C.7.6.16)."""
    return _item(frame, keyword) or _item(shared, keyword)


def _code(item: Dataset | None) -> tuple[str, str] | None:
    if item is None:
        return None
    return str(item.get("CodeValue", "") or ""), str(item.get("CodingSchemeDesignator", "") or "")


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _frame_count(ds: Dataset, label: str) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        count = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise MultiFrameError(f"instance {label}: NumberOfFrames {value!r} is not a number") from exc
    if count < 1:
        raise MultiFrameError(f"instance {label}: NumberOfFrames {value!r} is not positive")
    return count


def _dt_parts(value: dt.datetime) -> tuple[str, str]:
    time = value.strftime("%H%M%S") + (f".{value.microsecond:06d}" if value.microsecond else "")
    return value.strftime("%Y%m%d"), time


def _units_from_rwv(frame: Dataset, shared: Dataset, slope: float, intercept: float) -> str | None:
    """Classic Units of the rescaled values: the PET unit of the Real World Value Mapping item that maps stored
    values like the Pixel Value Transformation does (an item mapping to SUV beside it names other values)."""
    for group in (frame, shared):
        for mapping in group.get("RealWorldValueMappingSequence") or []:
            code = _code(_item(mapping, "MeasurementUnitsCodeSequence"))
            if code is None or code[1] != "UCUM" or code[0] not in _UCUM_UNITS:
                continue
            try:
                rwv_slope = float(mapping.get("RealWorldValueSlope"))
                rwv_intercept = float(mapping.get("RealWorldValueIntercept", 0.0) or 0.0)
            except (TypeError, ValueError):
                continue  # a LUT mapping (Real World Value LUT Data) is not a linear rescale
            if math.isclose(rwv_slope, slope, rel_tol=_RWV_RTOL) and math.isclose(
                rwv_intercept, intercept, rel_tol=_RWV_RTOL, abs_tol=_RWV_RTOL * abs(slope)
            ):
                return _UCUM_UNITS[code[0]]
    return None


def _enhanced_series_attributes(ds: Dataset, base: Dataset, label: str) -> None:
    """Fill the classic PET Series / Isotope / Patient Orientation attributes of ``base`` from the Enhanced PET
    modules that hold them, where the instance does not carry the classic ones (a Legacy Converted instance does,
    in its Unassigned Converted Attributes)."""
    flags = {k: str(ds.get(k, "") or "").strip().upper() for k in _CORRECTION_FLAGS if k in ds}
    for tag in _CORRECTION_TAGS:
        if tag in base:
            del base[tag]
    if "CorrectedImage" not in base and flags:
        base.CorrectedImage = [code for k, code in _CORRECTION_FLAGS.items() if flags.get(k) == "YES"]

    rp_items = list(base.get("RadiopharmaceuticalInformationSequence") or [])
    classic_items = []
    for item in rp_items:
        copied = Dataset()
        for elem in item:
            if elem.keyword not in _ENHANCED_ISOTOPE_ONLY:
                copied.add(copy.copy(elem))
        start = copied.get("RadiopharmaceuticalStartDateTime")
        if start not in (None, "") and "RadiopharmaceuticalStartTime" not in copied:
            try:  # the classic item's time of day, for readers that do not look at the DateTime
                copied.RadiopharmaceuticalStartTime = _dt_parts(_parse_datetime(start, "start"))[1]
            except SuvError:
                pass
        classic_items.append(copied)
    if rp_items:
        base.RadiopharmaceuticalInformationSequence = DicomSequence(classic_items)

    if "DecayCorrection" not in base and "DecayCorrected" in flags:
        if flags["DecayCorrected"] != "YES":
            base.DecayCorrection = "NONE"
        elif ds.get("DecayCorrectionDateTime") in (None, ""):
            # Required when Decay Corrected is YES (Type 1C): without it the decay reference is unknown, so the
            # volume is not given one (SUV then names DecayCorrection as missing).
            logger.warning("instance %s: Decay Corrected YES without Decay Correction DateTime", label)
        else:
            _map_decay_reference(ds, base, classic_items, label)

    if str(base.get("TypeOfDetectorMotion", "") or "").strip().upper() == "STATIONARY":
        base.TypeOfDetectorMotion = "NONE"  # the classic PET Series term for a stationary gantry

    if "SeriesType" not in base:
        image_type = [str(v).upper() for v in ds.get("ImageType") or []]
        flavor = image_type[2] if len(image_type) > 2 else ""
        base.SeriesType = [_SERIES_TYPE_BY_FLAVOR.get(flavor, "STATIC"), "IMAGE"]

    if "PatientOrientationCodeSequence" not in base:
        position = str(base.get("PatientPosition", "") or "").strip().upper()
        posture, gantry = _POSTURE.get(position[2:]), _GANTRY.get(position[:2])
        orientation = DicomSequence()
        if posture is not None:
            item = _code_item(_RECUMBENT)
            item.PatientOrientationModifierCodeSequence = DicomSequence([_code_item(posture)])
            orientation.append(item)
        base.PatientOrientationCodeSequence = orientation
        if "PatientGantryRelationshipCodeSequence" not in base:
            base.PatientGantryRelationshipCodeSequence = DicomSequence([_code_item(gantry)] if gantry else [])


def _map_decay_reference(ds: Dataset, base: Dataset, rp_items: Sequence[Dataset], label: str) -> None:
    """Classic DecayCorrection (and the series time it refers to) from Decay Correction DateTime (Decayed YES)."""
    try:
        reference = _parse_datetime(ds.DecayCorrectionDateTime, "DecayCorrectionDateTime")
        start = rp_items[0].get("RadiopharmaceuticalStartDateTime") if rp_items else None
        injection = _parse_datetime(start, "RadiopharmaceuticalStartDateTime") if start not in (None, "") else None
    except SuvError as exc:  # no decay reference: SUV names DecayCorrection as missing
        logger.warning("instance %s: %s; decay reference unknown", label, exc)
        return
    if injection is not None and abs((reference - injection).total_seconds()) < 1.0:
        base.DecayCorrection = "ADMIN"
        return
    # Classic PET decays to the Series Date/Time (PS3.3 C.8.9.1 PET Series: the reference for all temporally related
    # values): the frame header takes the Decay Correction DateTime as its series time, so the SUV of the volume and
    # of the derived classic series use the reference the scanner used.
    base.DecayCorrection = "START"
    date, time = _dt_parts(reference)
    if (str(base.get("SeriesDate", "")), str(base.get("SeriesTime", ""))) != (date, time):
        logger.info(
            "instance %s: Series Date/Time %s %s replaced by Decay Correction DateTime %s in the classic headers "
            "(the decay reference)", label, base.get("SeriesDate"), base.get("SeriesTime"), ds.DecayCorrectionDateTime,
        )
    base.SeriesDate, base.SeriesTime = date, time


def frame_headers(ds: Dataset, label: str | None = None) -> list[Dataset]:
    """The header a classic PET slice would have, for each frame of a multi-frame PET instance.

    Parameters
    ----------
    ds
        An Enhanced PET or Legacy Converted Enhanced PET instance (Pixel Data not needed, and not copied).
    label
        Names the instance in messages (default its SOPInstanceUID).

    Returns
    -------
    list of Dataset
        One per frame, in frame order. Each has the instance's top-level attributes less those of the multi-frame
        encoding, then the Unassigned Shared and Per-Frame Converted Attributes (Legacy Converted), then from the
        functional groups (per-frame before shared): ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
        SliceThickness, RescaleSlope/Intercept, AcquisitionDateTime/Date/Time, ActualFrameDuration,
        FrameReferenceTime, DecayFactor and the other PET frame correction factors; Units from the Real World
        Value Mapping that matches the rescale; DecayCorrection, CorrectedImage, SeriesType, the classic
        Radiopharmaceutical Information Sequence and the Patient Orientation codes from the Enhanced PET modules
        where the instance has no classic equivalent. SOPClassUID and SOPInstanceUID stay those of the instance.

    Raises
    ------
    MultiFrameError
        Not a multi-frame PET SOP class, or functional groups that do not match NumberOfFrames.
    """
    label = label or str(ds.get("SOPInstanceUID", "?"))
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in MULTIFRAME_PET_STORAGE:
        raise MultiFrameError(f"instance {label}: SOP Class {sop_class!r} is not Enhanced or Legacy Converted PET")
    count = _frame_count(ds, label)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(per_frame) != count:
        raise MultiFrameError(
            f"instance {label}: {len(per_frame)} Per-Frame Functional Groups item(s) for NumberOfFrames {count}"
        )
    shared = _item(ds, "SharedFunctionalGroupsSequence") or Dataset()

    # Copies of the elements (values shared until replaced): ``ds`` itself is never modified.
    base = Dataset()
    for tag in ds.keys():
        if tag.is_private or tag in _MULTIFRAME_ONLY:
            continue  # decided on the tag alone: private and pixel elements are never decoded here
        base.add(copy.copy(ds[tag]))
    for elem in _item(shared, "UnassignedSharedConvertedAttributesSequence") or []:
        base.add(copy.copy(elem))
    _enhanced_series_attributes(ds, base, label)
    image_type = [str(v) for v in base.get("ImageType") or []]
    if image_type:
        base.ImageType = image_type[:2]  # values 3 and 4 are the Enhanced flavour and contrast, not classic terms

    headers: list[Dataset] = []
    for number, frame in enumerate(per_frame, start=1):
        view = Dataset()
        for elem in base:  # own elements: setting a value on one frame must not change the others
            view.add(copy.copy(elem))
        for elem in _item(frame, "UnassignedPerFrameConvertedAttributesSequence") or []:
            view.add(copy.copy(elem))
        _apply_frame_groups(view, frame, shared, f"{label} frame {number}")
        headers.append(view)
    return headers


def _apply_frame_groups(view: Dataset, frame: Dataset, shared: Dataset, label: str) -> None:
    position = _group(frame, shared, "PlanePositionSequence")
    if position is not None and "ImagePositionPatient" in position:
        view.ImagePositionPatient = position.ImagePositionPatient
    orientation = _group(frame, shared, "PlaneOrientationSequence")
    if orientation is not None and "ImageOrientationPatient" in orientation:
        view.ImageOrientationPatient = orientation.ImageOrientationPatient
    measures = _group(frame, shared, "PixelMeasuresSequence")
    for keyword in ("PixelSpacing", "SliceThickness"):
        if measures is not None and keyword in measures:
            setattr(view, keyword, measures[keyword].value)
    rescale = _group(frame, shared, "PixelValueTransformationSequence")
    if rescale is not None:
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if keyword in rescale:
                setattr(view, keyword, rescale[keyword].value)

    content = _group(frame, shared, "FrameContentSequence") or Dataset()
    acquired = content.get("FrameAcquisitionDateTime")
    if acquired not in (None, ""):
        try:
            start = _parse_datetime(acquired, "FrameAcquisitionDateTime")
        except SuvError:  # the frame keeps no acquisition time; SUV names what it then lacks
            logger.warning("instance %s: Frame Acquisition DateTime %r cannot be parsed", label, acquired)
        else:
            view.AcquisitionDateTime = acquired
            view.AcquisitionDate, view.AcquisitionTime = _dt_parts(start)
    duration = content.get("FrameAcquisitionDuration")
    if duration not in (None, "") and "ActualFrameDuration" not in view:
        view.ActualFrameDuration = int(round(float(duration)))
    if "FrameReferenceTime" not in view:
        view.FrameReferenceTime = _frame_reference_time(view, content)
    factors = _group(frame, shared, "PETFrameCorrectionFactorsSequence")
    if factors is not None:
        for keyword in ("DecayFactor", "DeadTimeFactor", "SliceSensitivityFactor", "ScatterFractionFactor",
                        "PrimaryPromptsCountsAccumulated"):
            if keyword in factors and keyword not in view:
                setattr(view, keyword, factors[keyword].value)

    if "Units" not in view:
        try:
            slope = float(view.get("RescaleSlope", 1.0))
            intercept = float(view.get("RescaleIntercept", 0.0))
        except (TypeError, ValueError):
            return  # the loader reports the bad rescale, naming the value
        units = _units_from_rwv(frame, shared, slope, intercept)
        if units is not None:
            view.Units = units


def _frame_reference_time(view: Dataset, content: Dataset) -> str:
    """Classic Frame Reference Time: ms from the series (decay) reference to the frame's reference time."""
    try:
        series = _combine(view, "SeriesDate", "SeriesTime")
        reference = content.get("FrameReferenceDateTime")
        if series is not None and reference not in (None, ""):
            offset = (_parse_datetime(reference, "FrameReferenceDateTime") - series).total_seconds() * 1000.0
        else:
            # No frame reference time: the middle of the frame, as scanners write it for short frames.
            acquired = _acquisition_datetime(view)
            start = (acquired - series).total_seconds() * 1000.0 if acquired and series else 0.0
            offset = start + float(view.get("ActualFrameDuration", 0) or 0) / 2.0
    except (SuvError, TypeError, ValueError):
        offset = 0.0
    return format_number_as_ds(max(offset, 0.0))


def _slices(datasets: Sequence[Dataset], names: Sequence[str]) -> _Slices:
    """Classic slice headers of ``datasets``; multi-frame PET expanded per frame, then checked for time points."""
    multi = [str(ds.get("SOPClassUID", "")) in MULTIFRAME_PET_STORAGE for ds in datasets]
    if not any(multi):
        return _Slices(list(datasets), list(range(len(datasets))), [None] * len(datasets),
                       [str(ds.get("SOPInstanceUID", "?")) for ds in datasets])
    if not all(multi):
        classic = names[multi.index(False)]
        enhanced = names[multi.index(True)]
        raise MultiFrameError(
            f"mixed classic and multi-frame PET instances in one series ({multi.count(False)} classic, e.g. "
            f"{classic}; {multi.count(True)} multi-frame, e.g. {enhanced}): send one or the other"
        )
    headers: list[Dataset] = []
    sources: list[int] = []
    frames: list[int | None] = []
    labels: list[str] = []
    temporal: list[object] = []
    for i, ds in enumerate(datasets):
        uid = str(ds.get("SOPInstanceUID", "?"))
        views = frame_headers(ds, names[i])
        headers.extend(views)
        sources.extend([i] * len(views))
        frames.extend(range(1, len(views) + 1))
        labels.extend(f"{uid} frame {n}" for n in range(1, len(views) + 1))
        for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
            content = _item(frame, "FrameContentSequence") or Dataset()
            temporal.append(content.get("TemporalPositionIndex"))
    _refuse_several_time_points(datasets, headers, labels, temporal)
    return _Slices(headers, sources, frames, labels)


def _refuse_several_time_points(
    datasets: Sequence[Dataset], headers: Sequence[Dataset], labels: Sequence[str], temporal: Sequence[object]
) -> None:
    """Dynamic or gated multi-frame data hold several frames per position: refuse instead of mixing times."""
    indices = sorted({int(t) for t in temporal if t not in (None, "")})
    flavors = sorted({str(ds.ImageType[2]) for ds in datasets if len(ds.get("ImageType") or []) > 2})
    described = f"ImageType {'/'.join(flavors)}, " if flavors else ""
    if len(indices) > 1:
        raise MultiFrameError(
            f"dynamic multi-frame PET is not supported: {len(headers)} frames at {len(indices)} temporal positions "
            f"({described}Temporal Position Index {indices[0]}..{indices[-1]}); only a single time point can be "
            "processed (send one time point, or a static reconstruction)"
        )
    # Gated or dynamic data without Temporal Position Index show as frames sharing a position.
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        along = positions @ np.cross(orientation[:3], orientation[3:])
    except (AttributeError, TypeError, ValueError):
        return  # missing or bad geometry: the geometry check names it
    _, inverse, counts = np.unique(np.round(along / DUPLICATE_ATOL_MM), return_inverse=True, return_counts=True)
    if counts.max() > 1:
        shared_position = np.flatnonzero(inverse == int(np.argmax(counts)))
        at = float(along[shared_position[0]])
        same = [labels[i] for i in shared_position[:3]]
        raise MultiFrameError(
            f"dynamic or gated multi-frame PET is not supported: {len(headers)} frames at {len(counts)} slice "
            f"positions, up to {int(counts.max())} frames at one position ({at:.3f} mm along the normal: "
            f"{', '.join(same)}; {described.rstrip(', ') or 'no Temporal Position Index'}); only a single time point "
            "can be processed"
        )


def check_contiguity(headers: Sequence[Dataset], spacing_tolerance: float = SLICE_SPACING_RTOL) -> str | None:
    """Check that headers (Pixel Data not needed) form one uniform stack of slices.

    Checks one SeriesInstanceUID, one orientation, matrix and pixel spacing, no duplicate positions, uniform spacing
    along the normal and no in-plane drift. A slice missing inside the stack shows as a double gap; a slice missing
    at either end cannot be seen here (compare the count with NumberOfSlices).

    Parameters
    ----------
    headers
        One dataset per instance, in any order (read with ``stop_before_pixels=True`` for speed). Enhanced and
        Legacy Converted Enhanced PET instances are checked frame by frame (several time points are refused).

    Returns
    -------
    str or None
        None when contiguous, else why not.
    """
    try:
        slices = _slices(headers, [str(ds.get("SOPInstanceUID", "?")) for ds in headers])
        _geometry(slices.headers, slices.labels, spacing_tolerance)
    except SeriesError as exc:
        return str(exc)
    return None


def load_pet_series(paths: Sequence[Path], *, spacing_tolerance: float = SLICE_SPACING_RTOL,
                    reader: Callable[[Path], Dataset] | None = None) -> PetVolume:
    """Read a PET series into a :class:`PetVolume`.

    Parameters
    ----------
    paths
        One file per slice of a classic PET series, or the Enhanced PET / Legacy Converted Enhanced PET instances
        of a multi-frame series (one or several), in any order.
    reader
        Reads one file into a data set (default :func:`read_instance`); the node passes one that takes the data
        sets the C-STORE handler already decoded (:mod:`dicom_node.decoded`) and reads the rest with
        :func:`read_instance`.

    Returns
    -------
    PetVolume
        Sorted along the slice normal, per-slice (per-frame) RescaleSlope/Intercept applied, SUVbw factor when
        available.

    Raises
    ------
    SeriesError
        Unreadable or truncated file, not a PET image, mixed series, inconsistent geometry, duplicate or
        non-uniform positions, missing or undecodable Pixel Data.
    MultiFrameError
        (a SeriesError) several time points in multi-frame data (dynamic or gated), functional groups that do not
        match the frames, frames in different units, classic and multi-frame instances in one series.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesError("no files given")
    read = reader or read_instance
    sharer = ElementSharer()
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(sharer.share(read(path)))
        except Exception as exc:  # pydicom raises many types for truncated or foreign files
            raise SeriesError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    for ds, path in zip(datasets, paths):
        sop_class = ds.get("SOPClassUID")
        if ds.get("Modality") != "PT" or (sop_class != PET_IMAGE_STORAGE and sop_class not in MULTIFRAME_PET_STORAGE):
            raise SeriesError(
                f"{path} is not a classic, Enhanced or Legacy Converted Enhanced PET image (Modality "
                f"{ds.get('Modality')!r}, SOP Class {sop_class!r})"
            )
        if "PixelData" not in ds:
            raise SeriesError(f"{path} has no Pixel Data")
    if any(ds.SOPClassUID in MULTIFRAME_PET_STORAGE for ds in datasets):
        return _load_multiframe(datasets, paths, spacing_tolerance)
    geometry = _geometry(datasets, spacing_tolerance=spacing_tolerance)
    headers = [datasets[i] for i in geometry.order]
    sorted_paths = [paths[i] for i in geometry.order]
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)

    from pydicom.pixels import pixel_array  # lazy: keeps header-only users (completion) light

    volume = np.empty((len(headers), rows, cols), dtype=np.float32)
    for k, (ds, path) in enumerate(zip(headers, sorted_paths)):
        try:
            stored = native_pixels(ds)
            if stored is None:
                stored = pixel_array(ds)
        except Exception as exc:  # truncated, corrupt or undecodable pixel data
            raise SeriesError(f"cannot decode Pixel Data of {path}: {type(exc).__name__}: {exc}") from exc
        if stored.shape != (rows, cols):
            raise SeriesError(f"{path}: decoded pixel shape {stored.shape} is not ({rows}, {cols})")
        slope = _number(ds, "RescaleSlope", 1.0, path)
        intercept = _number(ds, "RescaleIntercept", 0.0, path)
        volume[k] = stored.astype(np.float64) * slope + intercept
        del ds.PixelData  # headers are kept for writing outputs; the pixels now live in ``volume``
    volume.setflags(write=False)

    first = headers[0]
    _check_number_of_slices(first, len(headers))
    units = str(first.get("Units", "") or "").strip().upper()
    suv_factor, suv_problem = _volume_suv(headers, units)
    logger.debug(
        "series %s: loaded %d slices %dx%d, spacing %s, units %s, suv_factor %s",
        first.SeriesInstanceUID,
        len(headers),
        rows,
        cols,
        geometry.spacing,
        units,
        suv_factor,
    )
    return _pet_volume(volume, geometry, units, suv_factor, suv_problem, headers, sorted_paths)


DEFER_BYTES = 16 * 1024
"""Values larger than this (Pixel Data) are read from the file when decoded, one slice at a time, instead of all
being held from the first read to the last decode (9 MB for the 267-slice real series)."""


def read_instance(path: Path) -> Dataset:
    """One stored instance as :func:`load_pet_series` reads it by default: Pixel Data deferred (``DEFER_BYTES``),
    sequences left raw until read (dicom_node/rawread.py: 0.07 s instead of 0.24 s for 267 slices); pydicom's
    ``dcmread`` for anything but a plain little endian file. The node's reads past its decoded cache use it too."""
    return read_plain(path, DEFER_BYTES) or dcmread(path, defer_size=DEFER_BYTES)


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit and Explicit VR Little Endian


def native_pixels(ds: Dataset) -> np.ndarray | None:
    """One uncompressed little endian single-frame greyscale slice whose stored bits fill its allocated bits, read
    straight from the Pixel Data bytes (what ``pydicom.pixels.pixel_array`` returns, without its per-call set-up:
    a third of the load time of a 267-slice series); None for anything else, which goes through pydicom."""
    meta = getattr(ds, "file_meta", None)
    try:
        if meta is None or str(meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE:
            return None
        bits, rows, cols = int(ds.BitsAllocated), int(ds.Rows), int(ds.Columns)
        if (bits not in (8, 16, 32) or int(ds.get("BitsStored", bits)) != bits or int(ds.get("SamplesPerPixel", 1)) != 1
                or int(ds.get("NumberOfFrames", 1) or 1) != 1 or "FloatPixelData" in ds):
            return None
        signed = int(ds.PixelRepresentation) == 1
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # let pydicom decode it and say what is wrong
    size = rows * cols * bits // 8
    if not isinstance(data, bytes) or len(data) < size:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


class ElementSharer:
    """Lets the data sets of a series share one object for each element they hold equal.

    The slices of a series repeat most of their header (patient, study, equipment, reconstruction...) byte for
    byte. Sharing each data set's equal elements with the previous ones as soon as it is read lets the memory of
    its own copies be reused for the next file: on the 267-slice real series the headers took 15 MB, 4.4 MB less
    once shared. Only undecoded (raw) elements are shared: they are immutable tuples, and pydicom decodes an element
    into the data set that reads it, so sharing never lets one slice change another's values. Uses pydicom's element
    store where it has one (does nothing otherwise). Equal raw elements are also what the derived writer compares
    first (by identity).
    """

    def __init__(self) -> None:
        self._latest: dict[int, RawDataElement] = {}
        self.shared = 0

    def share(self, ds: Dataset) -> Dataset:
        store = getattr(ds, "_dict", None)
        if not isinstance(store, dict):
            return ds
        latest = self._latest
        for tag, elem in store.items():
            if not isinstance(elem, RawDataElement):
                continue
            seen = latest.get(tag)
            if (seen is not None and seen is not elem and elem.value is not None  # None: deferred, read later
                    and seen.VR == elem.VR and seen.value == elem.value):
                store[tag] = seen
                self.shared += 1
            else:
                latest[tag] = elem
        return ds


def _pet_volume(volume: np.ndarray, geometry: _Geometry, units: str, suv_factor: float | None,
                suv_problem: str | None, headers: list[Dataset], paths: list[Path], frames: Sequence[int] = ()
                ) -> PetVolume:
    """The loaded volume with the identity of its series (from the first slice), classic and multi-frame alike."""
    first = headers[0]
    return PetVolume(
        array=volume,
        spacing=geometry.spacing,
        orientation=geometry.orientation,
        positions=geometry.positions,
        units=units,
        suv_factor=suv_factor,
        suv_problem=suv_problem,
        headers=headers,
        paths=paths,
        series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        frames=tuple(frames),
    )


def _check_number_of_slices(first: Dataset, loaded: int) -> None:
    expected = first.get("NumberOfSlices")
    if expected not in (None, "") and int(expected) != loaded:
        logger.warning(
            "series %s: %d slices loaded but NumberOfSlices is %s", first.SeriesInstanceUID, loaded, expected
        )


def _load_multiframe(datasets: list[Dataset], paths: list[Path], spacing_tolerance: float = SLICE_SPACING_RTOL
                     ) -> PetVolume:
    """:func:`load_pet_series` for Enhanced / Legacy Converted Enhanced PET: one slice per frame."""
    slices = _slices(datasets, [str(p) for p in paths])
    geometry = _geometry(slices.headers, slices.labels, spacing_tolerance)
    headers = [slices.headers[i] for i in geometry.order]
    sources = [slices.sources[i] for i in geometry.order]
    frames = [int(slices.frames[i] or 1) for i in geometry.order]
    sorted_paths = [paths[i] for i in sources]
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)

    from pydicom.pixels import pixel_array  # lazy: keeps header-only users (completion) light

    decoded: dict[int, np.ndarray] = {}
    for i, (ds, path) in enumerate(zip(datasets, paths)):
        count = _frame_count(ds, str(path))
        try:
            stored = pixel_array(ds)  # all frames at once
        except Exception as exc:  # truncated, corrupt or undecodable pixel data
            raise SeriesError(f"cannot decode Pixel Data of {path}: {type(exc).__name__}: {exc}") from exc
        if stored.size != count * rows * cols:
            raise SeriesError(
                f"{path}: decoded pixel shape {stored.shape} is not {count} frame(s) of ({rows}, {cols})"
            )
        decoded[i] = stored.reshape(count, rows, cols)
        del ds.PixelData  # the headers of the frames never held it; free the bytes now

    volume = np.empty((len(headers), rows, cols), dtype=np.float32)
    for k, (view, source, number) in enumerate(zip(headers, sources, frames)):
        where = Path(f"{paths[source]} frame {number}")
        slope = _number(view, "RescaleSlope", 1.0, where)
        intercept = _number(view, "RescaleIntercept", 0.0, where)
        volume[k] = decoded[source][number - 1].astype(np.float64) * slope + intercept
    volume.setflags(write=False)

    first = headers[0]
    _check_number_of_slices(first, len(headers))
    for k, view in enumerate(headers):
        # The classic slice numbering of the assembled stack (PET Image Index is Type 1 in a classic instance).
        view.ImageIndex = k + 1
        view.InstanceNumber = k + 1
        view.NumberOfSlices = len(headers)
    found_units = sorted({str(h.get("Units", "") or "").strip().upper() for h in headers})
    if len(found_units) > 1:
        raise MultiFrameError(f"frames of series {first.SeriesInstanceUID} are in different units: {found_units}")
    units = found_units[0]
    suv_factor, suv_problem = _volume_suv(headers, units, multiframe=True)
    logger.debug(
        "series %s: loaded %d frames of %d multi-frame instance(s) %dx%d, spacing %s, units %s, suv_factor %s",
        first.SeriesInstanceUID, len(headers), len(datasets), rows, cols, geometry.spacing, units, suv_factor,
    )
    return _pet_volume(volume, geometry, units, suv_factor, suv_problem, headers, sorted_paths, frames)


def _number(ds: Dataset, keyword: str, default: float, path: Path) -> float:
    fast = rawvalues.decimals(ds, keyword)  # leaves the element raw, shared
    if fast is not None and len(fast) == 1:
        return fast[0]
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{path}: {keyword} {value!r} is not numeric") from exc
    if not math.isfinite(number):
        raise SeriesError(f"{path}: {keyword} {value!r} is not finite")
    return number


def _volume_suv(
    headers: Sequence[Dataset], units: str, *, multiframe: bool = False
) -> tuple[float | None, str | None]:
    """SUVbw factor of the whole volume, or why there is none."""
    if units != "BQML":
        if not units and multiframe:
            return None, (
                "Units unknown: no Units (0054,1001) and no Real World Value Mapping in PET units (CID 84) that "
                "matches the Pixel Value Transformation"
            )
        return None, (f"Units is {units!r}, not BQML" if units else "Units (0054,1001) is missing")
    if multiframe:
        # Each multi-frame instance states its own decay reference; one factor needs them all to agree.
        references = sorted(
            {(str(h.get("DecayCorrection", "")), str(h.get("SeriesDate", "")), str(h.get("SeriesTime", "")))
             for h in headers}
        )
        if len(references) > 1:
            return None, (
                f"instances are decay corrected to different references (DecayCorrection, date, time): {references}"
            )
    decay = str(headers[0].get("DecayCorrection", "") or "").strip().upper()
    acquired = [_acquisition_datetime(ds) for ds in headers]
    if decay == "NONE" and len({a for a in acquired if a is not None}) > 1:
        # Without decay correction each bed position decays differently: one factor cannot serve all slices.
        return None, "DecayCorrection is NONE and slices were acquired at different times: no single SUV factor"
    # The earliest-acquired slice carries the scan start, the fallback reference when SeriesTime was rewritten.
    known = [i for i, a in enumerate(acquired) if a is not None]
    ref = headers[min(known, key=lambda i: acquired[i])] if known else headers[0]  # type: ignore[arg-type,return-value]
    try:
        return compute_suv_bw_factor(ref), None
    except SuvError as exc:
        return None, str(exc)


def _parse_date(value: object, what: str) -> dt.date:
    try:
        parsed = DA(str(value).strip())
    except Exception as exc:
        raise SuvError(f"cannot parse {what} {value!r}") from exc
    if parsed is None:
        raise SuvError(f"{what} is empty")
    return dt.date(parsed.year, parsed.month, parsed.day)


def _parse_time(value: object, what: str) -> dt.time:
    try:
        parsed = TM(str(value).strip())
    except Exception as exc:
        raise SuvError(f"cannot parse {what} {value!r}") from exc
    if parsed is None:
        raise SuvError(f"{what} is empty")
    return dt.time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)


def _parse_datetime(value: object, what: str) -> dt.datetime:
    try:
        parsed = DT(str(value).strip())
    except Exception as exc:
        raise SuvError(f"cannot parse {what} {value!r}") from exc
    if parsed is None:
        raise SuvError(f"{what} is empty")
    # Same-site assumption: DA/TM carry no zone, so compare local wall-clock times.
    return dt.datetime(
        parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second, parsed.microsecond
    )


def _combine(ds: Dataset, date_kw: str, time_kw: str) -> dt.datetime | None:
    date, time = ds.get(date_kw), ds.get(time_kw)
    if date in (None, "") or time in (None, ""):
        return None
    return dt.datetime.combine(_parse_date(date, date_kw), _parse_time(time, time_kw))


def _acquisition_datetime(ds: Dataset) -> dt.datetime | None:
    try:
        value = ds.get("AcquisitionDateTime")
        if value not in (None, ""):
            return _parse_datetime(value, "AcquisitionDateTime")
        return _combine(ds, "AcquisitionDate", "AcquisitionTime")
    except SuvError:
        return None


def _positive(item: Dataset, keyword: str, missing: list[str], where: str = "") -> float:
    value = item.get(keyword)
    try:
        number = float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        missing.append(f"{where}{keyword}" + ("" if value in (None, "") else f" (invalid {value!r})"))
    return number


def compute_suv_bw_factor(ds: Dataset) -> float:
    """SUVbw factor (g/ml per Bq/ml): SUVbw = value * factor = value * weight / decayed dose.

    Parameters
    ----------
    ds
        Header of a BQML PET slice. With DecayCorrection START the decay reference is SeriesDate/SeriesTime (the
        PET Series module defines it as the decay-correction reference); if the series time is later than this
        slice's acquisition time (a series re-created after the scan, as GE consoles do), the acquisition date/time
        is used instead (pass the earliest-acquired slice). ADMIN: already decay corrected to the injection, no
        decay. NONE: decay from injection to this slice's acquisition.

    Returns
    -------
    float
        PatientWeight [g] / (RadionuclideTotalDose [Bq] * 2^(-t / RadionuclideHalfLife)).

    Raises
    ------
    SuvError
        Units not BQML, or a missing or invalid attribute (all of them named), or injection after the scan.
    """
    units = str(ds.get("Units", "") or "").strip().upper()
    if units != "BQML":
        raise SuvError(f"Units is {units!r}, not BQML" if units else "Units (0054,1001) is missing")
    missing: list[str] = []
    weight_kg = _positive(ds, "PatientWeight", missing)
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    rp = seq[0] if seq else Dataset()
    if not seq:
        missing.append("RadiopharmaceuticalInformationSequence")
    prefix = "RadiopharmaceuticalInformationSequence." if seq else ""
    dose = _positive(rp, "RadionuclideTotalDose", missing, prefix)
    half_life = _positive(rp, "RadionuclideHalfLife", missing, prefix)
    decay = str(ds.get("DecayCorrection", "") or "").strip().upper()
    if decay not in {"START", "ADMIN", "NONE"}:
        missing.append("DecayCorrection" + (f" (unsupported {decay!r})" if decay else ""))
    needs_time = decay in {"START", "NONE"}
    has_injection = rp.get("RadiopharmaceuticalStartDateTime") not in (None, "") or rp.get(
        "RadiopharmaceuticalStartTime"
    ) not in (None, "")
    if needs_time and not has_injection:
        missing.append(f"{prefix}RadiopharmaceuticalStartDateTime or RadiopharmaceuticalStartTime")
    if missing:
        raise SuvError("cannot compute SUVbw: missing or invalid " + ", ".join(missing))

    if decay == "ADMIN":
        decayed_dose = dose
    else:
        scan = _decay_reference(ds, decay)
        injection = _injection_datetime(rp, scan)
        elapsed = (scan - injection).total_seconds()
        if elapsed < 0:
            raise SuvError(f"injection {injection.isoformat()} is after the scan reference {scan.isoformat()}")
        if elapsed > 86400:
            logger.warning("SUV: %.0f s between injection and scan (more than a day); check the dates", elapsed)
        decayed_dose = dose * 2.0 ** (-elapsed / half_life)
    return weight_kg * 1000.0 / decayed_dose


def _decay_reference(ds: Dataset, decay: str) -> dt.datetime:
    acquisition = _acquisition_datetime(ds)
    if decay == "NONE":
        if acquisition is None:
            raise SuvError("cannot compute SUVbw: missing AcquisitionDate/AcquisitionTime (DecayCorrection NONE)")
        return acquisition
    series = _combine(ds, "SeriesDate", "SeriesTime")
    if series is None:
        if acquisition is None:
            raise SuvError("cannot compute SUVbw: missing SeriesDate/SeriesTime and AcquisitionDate/AcquisitionTime")
        return acquisition
    if acquisition is not None and series > acquisition:
        # SeriesTime after the acquisition means the series was re-created later (GE re-reconstruction, copies);
        # the scan start is then the (earliest) acquisition time, as in QIBA's vendor-neutral SUV pseudo-code.
        logger.info(
            "SUV: SeriesTime %s is after AcquisitionTime %s; using the acquisition time as decay reference",
            series.time(),
            acquisition.time(),
        )
        return acquisition
    return series


def _injection_datetime(rp: Dataset, scan: dt.datetime) -> dt.datetime:
    value = rp.get("RadiopharmaceuticalStartDateTime")
    if value not in (None, ""):
        return _parse_datetime(value, "RadiopharmaceuticalStartDateTime")
    time = _parse_time(rp.get("RadiopharmaceuticalStartTime"), "RadiopharmaceuticalStartTime")
    injection = dt.datetime.combine(scan.date(), time)
    if injection > scan:
        # Only a time of day was given: an injection "after" the scan was the evening before (crossed midnight).
        injection -= dt.timedelta(days=1)
    return injection
