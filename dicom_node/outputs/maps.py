"""Write a voxel-wise map on the PET grid (a denoiser's stability or uncertainty map) as DICOM, twice.

- **Secondary Capture** (SC Image Storage, highdicom ``SCImage``): one 8-bit MONOCHROME2 image per PET slice, the
  map (or a normalised ``display`` of it) mapped linearly from a fixed window to 0..255, so any viewer shows every
  patient the same way. Window Center/Width 128/256 is exactly that mapping on the stored values (PS3.3 C.11.2.1.2.1).
  The SC Image IOD has no Frame of Reference or Image Plane module; the slice geometry (Frame of Reference UID,
  Image Position/Orientation (Patient), Slice Thickness) is added as Standard Extended attributes (PS3.4 B.1.3) so
  viewers can sync the map with the PET (``dciodvfy`` warns "not present in standard DICOM IOD", no error), Pixel
  Spacing is the SC Image module's own, and each image references its source slice in any case.
- **Parametric Map** (highdicom ``ParametricMap``): one multi-frame instance on the PET geometry (Plane Position per
  frame, Plane Orientation and Pixel Measures shared, the PET's Frame of Reference), float32 Float Pixel Data with a
  Real World Value Mapping (identity) in the map's units, for quantitative tools.

References, with the reason each code was chosen (PS3.16):

- The source PET: per image (SC) or per frame (PM, Derivation Image functional group) a Source Image Sequence item
  with (121322, DCM, "Source image for image processing operation"), CID 7202, and Referenced Frame Number for a
  multi-frame source; the source series in Related Series Sequence with (121323, DCM, "Source series for image
  processing operation"), CID 7210 -- as the derived PET does.
- The derived (denoised) PET: per image or per frame (Referenced Image functional group) a Referenced Image
  Sequence item pointing at the derived slice, with (121339, DCM, "Functional image"), CID 7201 "Referenced Image
  Purposes of Reference": the functional image the map describes and is read with (the group has no concept closer
  to "output of the same processing"); the derived series in Related Series Sequence with an empty Purpose of
  Reference (Type 2), because CID 7210 has no concept that fits.
- The instances an object references, by series, in its Common Instance Reference module (Referenced Series
  Sequence; required once an instance references others of its study): an SC image its two, the PM all of them.
- Per PM frame, Derivation Code (112187, DCM, "Unspecified method of calculation"), highdicom's default: CID 7203
  has no concept for a spread over iterates or samples.

SC images are numbered 1..n like the source's InstanceNumbers rank (a viewer sorting either by number scrolls both
the same way) and carry the PET slice's position; the PM's frames are ordered by highdicom along its slice normal
and each names its PET slice by position and reference.

Provenance as in the derived PET: ContributingEquipmentSequence item naming petnode (the loop guard,
:func:`dicom_node.outputs.derived_pet.is_petnode_output`), DerivationDescription with method, model, parameters and
run details. UIDs are deterministic (:func:`map_series_uid`), so a re-run or a re-send replaces rather than
duplicates. highdicom (imported here, never by ``dicom_node.outputs``) builds both IODs; this module adds what it
does not know about (references, provenance, timestamps) and writes the files like the derived PET.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from dicom_node.errors import OutputWriteError
from dicom_node.outputs.derived_pet import (
    IMPLEMENTATION_VERSION_NAME,
    PETNODE_MANUFACTURER,
    SOURCE_IMAGE_PURPOSE,
    SOURCE_SERIES_PURPOSE,
    Provenance,
    clean_text,
    conform_to_iod,
    encode_part10,
    petnode_contributing_equipment,
    series_description,
    series_number,
)
from dicom_node.outputs.uids import derive_uid
from dicom_node.series import PET_IMAGE_STORAGE, PetVolume
from dicom_node.spool import fsync_dir, make_dirs_durable, sync_files, write_durable

__all__ = [
    "DERIVED_IMAGE_PURPOSE",
    "MAP_DERIVATION_CODE",
    "MAP_FORMATS",
    "MAP_KINDS",
    "MAP_SERIES_NUMBER_STEPS",
    "PARAMETRIC_MAP_STORAGE",
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "MapSeries",
    "map_series_uid",
    "map_units",
    "write_map_series",
]

logger = logging.getLogger(__name__)

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"

MAP_KINDS = ("stability", "uncertainty")
MAP_FORMATS = ("sc", "pm")
# Added to the derived PET's SeriesNumber (source + provenance.series_number_offset): the four map series of one
# derived series get distinct numbers that follow it.
MAP_SERIES_NUMBER_STEPS = {
    ("stability", "sc"): 1, ("stability", "pm"): 2, ("uncertainty", "sc"): 3, ("uncertainty", "pm"): 4,
}  # fmt: skip

# Both maps are standard deviations (of the DIP iterates, of the posterior samples: denoisers.base.OutputKind), hence
# Parametric Map Image Type value 4 (Derived Pixel Contrast) STD_DEVIATION.
_PIXEL_CONTRAST = {"stability": "STD_DEVIATION", "uncertainty": "STD_DEVIATION"}
_LABELS = {"stability": "STABILITY", "uncertainty": "UNCERTAINTY"}  # Content Label (CS) and LUT Label (SH)

# PET Units (0054,1001) -> UCUM code of CID 84 "PET Units" (as pydicom names them), and dimensionless maps.
_UNITS: dict[str, Code] = {
    "BQML": codes.UCUM.BecquerelsPerMilliliter,
    "CNTS": codes.UCUM.Counts,
    "CPS": codes.UCUM.CountsPerSecond,
    "PROPCNTS": codes.UCUM.ProportionalToCounts,
    "PROPCPS": codes.UCUM.ProportionalToCountsPerSecond,
    "PCNT": codes.UCUM.Percent,
    "1": codes.UCUM.NoUnits,
    "{RATIO}": codes.UCUM.Ratio,
}

# CID 7201 Referenced Image Purposes of Reference: the derived PET slice a map image belongs to (see module doc).
DERIVED_IMAGE_PURPOSE = ("121339", "DCM", "Functional image")
# Derivation Code of each PM frame (Type 1, baseline CID 7203): the group has no concept for a spread over
# iterates or samples, so highdicom's default for parametric maps.
MAP_DERIVATION_CODE = ("112187", "DCM", "Unspecified method of calculation")

_LO_MAX = 64
_ST_MAX = 1024
# Stored values of the SC: 8 bits, and the VOI window that shows 0..255 as black..white (PS3.3 C.11.2.1.2.1).
_SC_MAX = 255
_SC_WINDOW_CENTER, _SC_WINDOW_WIDTH = "128", "256"
# The attributes highdicom reads as Type 2 from its source image (by attribute access: absent would raise).
_TYPE2_PATIENT_STUDY = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
# What highdicom reads from each further source image to match planes (geometry and identity).
_STAND_IN_KEYWORDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
)  # fmt: skip
# Frame of Reference and Image Plane attributes the SC carries as Standard Extended attributes.
_SC_GEOMETRY = ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
                "ImageOrientationPatient", "SliceThickness")
_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _PIXEL_DATA = 0x00080018, 0x00200013, 0x7FE00010
_TAGS = {keyword: int(Tag(keyword)) for keyword in _TYPE2_PATIENT_STUDY}
# Positions of PM frames and PET slices are the same numbers (highdicom may take them from the source headers).
_POSITION_ATOL_MM = 1e-3


@dataclass(frozen=True)
class MapSeries:
    """One written map series.

    Attributes
    ----------
    kind
        "stability" or "uncertainty".
    format
        "sc" (Secondary Capture, one file per PET slice) or "pm" (Parametric Map, one multi-frame file).
    series_uid
        SeriesInstanceUID (deterministic, :func:`map_series_uid`).
    files
        Written files: SC in the PET slice order, PM one file.
    description
        SeriesDescription.
    series_number
        SeriesNumber.
    """

    kind: str
    format: str
    series_uid: str
    files: list[Path]
    description: str
    series_number: int


def map_units(units: str) -> Code:
    """The UCUM code of a map's ``units``.

    Parameters
    ----------
    units
        A PET Units (0054,1001) value ("BQML", "CNTS", "CPS", "PROPCNTS", "PROPCPS", "PCNT"; any case), or "1" (no
        units) or "{ratio}" for dimensionless maps.

    Raises
    ------
    OutputWriteError
        Unknown or empty units (unknown is not "no units": a map in unknown units is refused, not mislabelled).
    """
    code = _UNITS.get(str(units).strip().upper())
    if code is None:
        raise OutputWriteError(
            f"map units {units!r} are not supported; use a PET Units value or a dimensionless code: "
            f"{', '.join(sorted(_UNITS))}"
        )
    return code


def map_series_uid(derived_series_uid: str, kind: str, format: str, *, units: str,
                   window: tuple[float, float] = (0.0, 1.0)) -> str:
    """Deterministic SeriesInstanceUID of a map series.

    Depends on the derived PET series (itself on the source, route, method, model and parameters), the kind, the
    format and what changes the pixels beyond those: the window for the SC, the units for the PM. A new window gives a
    new SC series, so a destination never keeps other pixels under the old UIDs.
    """
    if kind not in MAP_KINDS or format not in MAP_FORMATS:
        raise OutputWriteError(f"map kind {kind!r} / format {format!r} not in {MAP_KINDS} / {MAP_FORMATS}")
    parts = [str(derived_series_uid), kind, format]
    if format == "sc":
        parts.append(f"window:{float(window[0])!r}:{float(window[1])!r}")
    else:
        parts.append(f"units:{map_units(units).value}")
    return str(derive_uid("petnode/map/series/v1", *parts))


def _instance_uid(series_uid: str, index: int) -> str:
    return str(derive_uid("petnode/map/instance/v1", series_uid, str(index)))


def _code(code: tuple[str, str, str] | Code) -> Dataset:
    item = Dataset()
    if isinstance(code, Code):
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    else:
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _check_inputs(volume: PetVolume, values: np.ndarray, display: np.ndarray | None, *, kind: str,
                  formats: Sequence[str], window: tuple[float, float], derived_instance_uids: Sequence[str],
                  units: str) -> tuple[np.ndarray, list[str], tuple[float, float]]:
    """Validate everything before any file is written; return float32 values, the formats and the window."""
    if kind not in MAP_KINDS:
        raise OutputWriteError(f"map kind {kind!r} is not one of {', '.join(MAP_KINDS)}")
    wanted = list(dict.fromkeys(formats))  # order kept, repeats dropped
    if not wanted or any(f not in MAP_FORMATS for f in wanted):
        raise OutputWriteError(f"map formats {list(formats)!r} must be a non-empty selection of {MAP_FORMATS}")
    map_units(units)
    shape = volume.array.shape
    raw = np.asarray(values)
    if raw.shape != shape:
        raise OutputWriteError(f"{kind} map shape {raw.shape} does not match the PET volume {shape}")
    if not np.issubdtype(raw.dtype, np.number) or np.iscomplexobj(raw):
        raise OutputWriteError(f"{kind} map has dtype {raw.dtype}, not real numbers")
    with np.errstate(over="ignore"):  # the PM stores float32: a value beyond float32 becomes inf, refused below
        raw = raw.astype(np.float32, copy=False)
    if not np.isfinite(np.sum(raw, dtype=np.float64)):
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        raise OutputWriteError(f"{kind} map has {bad} non-finite values (NaN or inf, or beyond float32)")
    if display is not None:
        shown = np.asarray(display)
        if shown.shape != shape:
            raise OutputWriteError(f"{kind} display shape {shown.shape} does not match the PET volume {shape}")
        if not np.isfinite(np.sum(shown, dtype=np.float64)):
            bad = int(shown.size - np.count_nonzero(np.isfinite(shown)))
            raise OutputWriteError(f"{kind} display has {bad} non-finite values")
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise OutputWriteError(f"window {window!r} is not two numbers (low, high)") from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise OutputWriteError(f"window {window!r} needs finite low < high")
    n = shape[0]
    if len(volume.headers) != n or len(volume.positions) != n:
        raise OutputWriteError(f"{len(volume.headers)} source headers and {len(volume.positions)} positions "
                               f"for {n} slices")
    if volume.frames and len(volume.frames) != n:
        raise OutputWriteError(f"{len(volume.frames)} source frame numbers for {n} slices")
    uids = [str(u) for u in derived_instance_uids]
    if len(uids) != n or not all(uids):
        raise OutputWriteError(f"{len(uids)} derived instance UIDs for {n} slices (one non-empty UID per slice)")
    return raw, wanted, (lo, hi)


def _reference_dataset(volume: PetVolume) -> Dataset:
    """The first slice's header as highdicom's source image: patient, study, equipment and geometry, a classic PET
    SOP Class (a multi-frame source's frame headers carry the multi-frame class, which highdicom would read as an
    Enhanced instance without its functional groups), and the Type 2 attributes highdicom reads present."""
    first = volume.headers[0]
    ref = Dataset()
    for tag in first.keys():
        if tag.is_private or tag.group == 0x7FE0:
            continue
        ref.add(copy.deepcopy(first[tag]))
    ref.SOPClassUID = PET_IMAGE_STORAGE
    ref.SOPInstanceUID = _stand_in_uid(volume, 0)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ref:
            setattr(ref, keyword, "")
    return ref


def _for_highdicom(ref: Dataset) -> Dataset:
    """``ref`` with the patient and study attributes highdicom's constructors check left empty. They warn, with the
    patient's name in the message, about name forms real sources use (a de-identified "ACRIN-042") and refuse values
    such as Patient's Sex "U"; we copy what the source says as it is afterwards (``copy_patient_and_study_information``:
    the whole Patient and Study modules), and no patient name reaches a log."""
    quiet = Dataset()
    quiet.update(ref)
    for keyword in _TYPE2_PATIENT_STUDY:
        quiet[keyword] = DataElement(_TAGS[keyword], dictionary_VR(_TAGS[keyword]), "")  # ``ref`` keeps its own
    return quiet


def _stand_in_uid(volume: PetVolume, k: int) -> str:
    # A classic source slice is itself; a frame gets a unique stand-in UID that never reaches a file (every reference
    # highdicom makes from it is replaced by one naming the instance and its frame).
    if not volume.frames:
        return str(volume.headers[k].SOPInstanceUID)
    return str(derive_uid("petnode/map/stand-in/v1", str(volume.headers[k].SOPInstanceUID), str(volume.frames[k])))


def _stand_ins(volume: PetVolume, ref: Dataset) -> list[Dataset]:
    """One classic single-frame source image per slice for highdicom (only what it reads to match the planes)."""
    out = [_for_highdicom(ref)]
    for k, header in enumerate(volume.headers[1:], start=1):
        ds = Dataset()
        for keyword in _STAND_IN_KEYWORDS:
            if keyword in header:
                ds[keyword] = copy.deepcopy(header[keyword])
        ds.SOPClassUID = PET_IMAGE_STORAGE
        ds.SOPInstanceUID = _stand_in_uid(volume, k)
        out.append(ds)
    return out


def _source_item(volume: PetVolume, k: int, *, locations_preserved: bool = False) -> Dataset:
    header = volume.headers[k]
    item = Dataset()
    item.ReferencedSOPClassUID = str(header.get("SOPClassUID", PET_IMAGE_STORAGE))
    item.ReferencedSOPInstanceUID = str(header.SOPInstanceUID)
    if volume.frames:  # Image SOP Instance Reference Macro: the frame of a multi-frame source
        item.ReferencedFrameNumber = int(volume.frames[k])
    if locations_preserved:  # Derivation Image functional group: same grid as the source frame
        item.SpatialLocationsPreserved = "YES"
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(SOURCE_IMAGE_PURPOSE)])
    return item


def _derived_item(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = PET_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = uid
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(DERIVED_IMAGE_PURPOSE)])
    return item


def _related_series(volume: PetVolume, derived_series_uid: str) -> DicomSequence:
    source = Dataset()
    source.StudyInstanceUID = volume.study_uid
    source.SeriesInstanceUID = volume.series_uid
    source.PurposeOfReferenceCodeSequence = DicomSequence([_code(SOURCE_SERIES_PURPOSE)])
    derived = Dataset()
    derived.StudyInstanceUID = volume.study_uid
    derived.SeriesInstanceUID = derived_series_uid
    derived.PurposeOfReferenceCodeSequence = DicomSequence([])  # Type 2: no CID 7210 concept fits
    return DicomSequence([source, derived])


def _referenced_series(volume: PetVolume, derived_series_uid: str, derived_uids: Sequence[str],
                       slices: Sequence[int]) -> DicomSequence:
    """Common Instance Reference: the source and derived instances of ``slices`` (those referenced elsewhere in the
    map object: one slice for an SC image, all for the PM), by series."""
    def series(uid: str, instances: list[tuple[str, str]]) -> Dataset:
        item = Dataset()
        item.SeriesInstanceUID = uid
        refs = []
        for sop_class, sop_uid in dict.fromkeys(instances):  # a multi-frame instance once
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_uid
            refs.append(ref)
        item.ReferencedInstanceSequence = DicomSequence(refs)
        return item

    headers = [volume.headers[k] for k in slices]
    source = [(str(h.get("SOPClassUID", PET_IMAGE_STORAGE)), str(h.SOPInstanceUID)) for h in headers]
    derived = [(PET_IMAGE_STORAGE, derived_uids[k]) for k in slices]
    return DicomSequence([series(volume.series_uid, source), series(derived_series_uid, derived)])


def _patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the rows and columns: the dominant patient axis of each direction."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive direction along x, y, z (LPS)

    def letter(cosines: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(cosines)))
        return letters[axis][int(cosines[axis] > 0)]

    return letter([float(v) for v in orientation[:3]]), letter([float(v) for v in orientation[3:6]])


def _instance_numbers(volume: PetVolume) -> list[int]:
    """1..n ranked like the source's InstanceNumbers, so the map scrolls with the PET in a viewer that sorts by
    them; the slice order when the source numbers are missing or repeat."""
    n = len(volume.headers)
    try:
        numbers = [int(h.InstanceNumber) for h in volume.headers]
    except (AttributeError, TypeError, ValueError):
        return list(range(1, n + 1))
    if len(set(numbers)) != n:
        return list(range(1, n + 1))
    return [int(r) + 1 for r in np.argsort(np.argsort(numbers, kind="stable"), kind="stable")]


def _series_attributes(ds: Dataset, volume: PetVolume, derived_series_uid: str, derivation_text: str,
                       contributing: Dataset, created: dt.datetime) -> None:
    """What both formats add to highdicom's instance: series context, provenance, timestamps, loop guard."""
    first = volume.headers[0]
    for keyword in ("BodyPartExamined", "Laterality"):  # General Series, as the source states them
        if first.get(keyword) not in (None, ""):
            ds[keyword] = copy.deepcopy(first[keyword])
    ds.RelatedSeriesSequence = _related_series(volume, derived_series_uid)
    ds.DerivationDescription = derivation_text
    ds.ContributingEquipmentSequence = DicomSequence(
        [*(ds.get("ContributingEquipmentSequence") or []), copy.deepcopy(contributing)]
    )
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    changes = conform_to_iod(ds)
    if changes:
        logger.debug("map instance %s: %s", ds.SOPInstanceUID, "; ".join(changes))


def _write(path: Path, ds: Dataset) -> None:
    try:
        # Flushed once per series by the caller (as the derived PET): the series counts as written only after.
        write_durable(path, encode_part10(ds), fsync=False)
    except Exception as exc:  # disk full, permissions, encoding errors: one error type for the pipeline
        raise OutputWriteError(f"cannot write {path}: {type(exc).__name__}: {exc}") from exc


def _sc_pixels(shown: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``shown`` mapped linearly from ``window`` to 0..255 (clipped): low -> 0, high -> 255."""
    lo, hi = window
    scaled = (np.asarray(shown, dtype=np.float64) - lo) * (_SC_MAX / (hi - lo))
    return np.clip(np.rint(scaled), 0, _SC_MAX).astype(np.uint8)


def _equipment_kwargs(provenance: Provenance) -> dict[str, Any]:
    """General Equipment of a map instance: petnode, the method as the model, the software and model versions (a
    list, not a tuple: pydicom refuses tuples for multi-valued strings)."""
    versions = [clean_text(provenance.software_version, _LO_MAX)]
    if provenance.model_version:
        versions.append(clean_text(f"model {provenance.model_version}", _LO_MAX))
    return {
        "manufacturer_model_name": clean_text(provenance.method, _LO_MAX),
        "software_versions": versions[0] if len(versions) == 1 else versions,
    }


def _sc_template(volume: PetVolume, *, kind: str, series_uid: str, number: int, description: str,
                 explanation: str, derived_series_uid: str, derivation_text: str, provenance: Provenance,
                 contributing: Dataset, ref: Dataset, created: dt.datetime) -> Dataset:
    """The header every SC image of the series shares, built once by highdicom (building it per image cost more than
    encoding the image)."""
    first = volume.headers[0]
    equipment = _equipment_kwargs(provenance)
    try:
        ds = hd.sc.SCImage.from_ref_dataset(
            _for_highdicom(ref), np.zeros((int(first.Rows), int(first.Columns)), dtype=np.uint8), "MONOCHROME2",
            8, "PATIENT", series_uid, number, _instance_uid(series_uid, 0), 1, PETNODE_MANUFACTURER,
            patient_orientation=_patient_orientation(volume.orientation), transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=description, **equipment,
        )
    except Exception as exc:  # highdicom's checks: one error type for the pipeline
        raise OutputWriteError(f"cannot build the {kind} Secondary Capture: {type(exc).__name__}: {exc}") from exc
    ds.copy_patient_and_study_information(ref)  # the whole Patient and Study modules, not only the Type 2 ones
    ds.ConversionType = "WSD"  # SC Equipment: made by a workstation (software), not a digital interface
    ds.SecondaryCaptureDeviceManufacturer = PETNODE_MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = equipment["manufacturer_model_name"]
    ds.SecondaryCaptureDeviceSoftwareVersions = equipment["software_versions"]
    ds.DateOfSecondaryCapture = DA(created.strftime("%Y%m%d"))
    ds.TimeOfSecondaryCapture = TM(created.strftime("%H%M%S"))
    ds.WindowCenter, ds.WindowWidth = _SC_WINDOW_CENTER, _SC_WINDOW_WIDTH
    ds.WindowCenterWidthExplanation = explanation
    _series_attributes(ds, volume, derived_series_uid, derivation_text, contributing, created)
    return ds


def _write_sc(volume: PetVolume, shown: np.ndarray, *, window: tuple[float, float], derived_series_uid: str,
              derived_uids: Sequence[str], template: Dataset, out_dir: Path, sc_geometry: bool,
              on_written: Callable[[Path], None] | None) -> list[Path]:
    numbers = _instance_numbers(volume)
    series_uid = str(template.SeriesInstanceUID)
    per_slice = ("PixelSpacing", *(_SC_GEOMETRY if sc_geometry else ()))
    paths: list[Path] = []
    for k, header in enumerate(volume.headers):
        # A new data set holding the template's elements; every per-slice value is a new element put in its place,
        # so the shared elements are never modified.
        ds = Dataset()
        ds.update(template)
        ds.add_new(_SOP_INSTANCE_UID, "UI", _instance_uid(series_uid, k))
        ds.add_new(_INSTANCE_NUMBER, "IS", numbers[k])
        for keyword in per_slice:  # PixelSpacing: SC Image module; the rest Standard Extended (module doc)
            if keyword in header:
                ds[keyword] = copy.deepcopy(header[keyword])
            elif keyword in ds:
                del ds[keyword]
        ds.SourceImageSequence = DicomSequence([_source_item(volume, k)])
        ds.ReferencedImageSequence = DicomSequence([_derived_item(derived_uids[k])])
        ds.ReferencedSeriesSequence = _referenced_series(volume, derived_series_uid, derived_uids, [k])
        pixels = _sc_pixels(shown[k], window).tobytes()
        ds.add_new(_PIXEL_DATA, "OB", pixels + b"\0" * (len(pixels) % 2))  # even length (PS3.5 7.1)
        path = out_dir / f"{k:04d}.dcm"
        _write(path, ds)
        paths.append(path)
        if on_written is not None:
            on_written(path)
    return paths


def _frame_slices(ds: Dataset, volume: PetVolume) -> list[int]:
    """The volume slice of each PM frame, by position (highdicom orders frames along its own slice normal)."""
    positions = np.asarray(volume.positions, dtype=np.float64)
    slices: list[int] = []
    for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        where = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        distances = np.linalg.norm(positions - where, axis=1)
        k = int(np.argmin(distances))
        if distances[k] > _POSITION_ATOL_MM:
            raise OutputWriteError(f"parametric map frame {number} at {where.tolist()} matches no PET slice")
        slices.append(k)
    if sorted(slices) != list(range(len(volume.positions))):
        raise OutputWriteError(f"parametric map frames do not match the PET slices one to one: {slices}")
    return slices


def _write_pm(volume: PetVolume, raw: np.ndarray, *, kind: str, series_uid: str, number: int, description: str,
              unit: Code, voi: tuple[float, float], derived_series_uid: str, derived_uids: Sequence[str],
              derivation_text: str, provenance: Provenance, contributing: Dataset, ref: Dataset,
              created: dt.datetime, out_dir: Path, on_written: Callable[[Path], None] | None) -> list[Path]:
    first = volume.headers[0]
    label = _LABELS[kind]
    lo, hi = float(np.min(raw)), float(np.max(raw))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=clean_text(f"{kind} map, petnode {provenance.method} ({unit.meaning})", _LO_MAX),
        unit=unit,
        value_range=(lo, hi),  # floats: the mapping applies to float pixel values
        slope=1.0,
        intercept=0.0,
    )
    # LINEAR_EXACT: exact for any width > 0; LINEAR needs a width >= 1, too coarse for maps in [0, 1].
    window = hd.VOILUTTransformation(
        window_center=(voi[0] + voi[1]) / 2, window_width=voi[1] - voi[0], voi_lut_function="LINEAR_EXACT",
    )
    # Set here: highdicom 0.28 stores a single explanation string as a list of its characters.
    window.WindowCenterWidthExplanation = [clean_text(f"{kind} {voi[0]:g} to {voi[1]:g} {unit.value}", _LO_MAX)]
    pixel_spacing = [float(v) for v in first.PixelSpacing]
    thickness = float(first.get("SliceThickness") or volume.spacing[0])
    features = str(first.get("RecognizableVisualFeatures", "") or "").upper() == "YES"
    try:
        ds = hd.pm.ParametricMap(
            source_images=_stand_ins(volume, ref),
            pixel_array=raw,
            series_instance_uid=series_uid,
            series_number=number,
            sop_instance_uid=_instance_uid(series_uid, 0),
            instance_number=1,
            manufacturer=PETNODE_MANUFACTURER,
            **_equipment_kwargs(provenance),
            device_serial_number=clean_text(IMPLEMENTATION_VERSION_NAME, _LO_MAX),
            contains_recognizable_visual_features=features,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            content_label=label,
            content_description=clean_text(description, _LO_MAX),
            pixel_measures=hd.PixelMeasuresSequence(
                pixel_spacing=pixel_spacing, slice_thickness=thickness,
                spacing_between_slices=volume.spacing[0] if len(volume.positions) > 1 else None,
            ),
            plane_orientation=hd.PlaneOrientationSequence("PATIENT", [float(v) for v in volume.orientation]),
            plane_positions=[hd.PlanePositionSequence("PATIENT", [float(v) for v in p]) for p in volume.positions],
            derived_pixel_contrast=_PIXEL_CONTRAST[kind],
            series_description=description,
        )
    except Exception as exc:  # highdicom's checks: one error type for the pipeline
        raise OutputWriteError(f"cannot build the {kind} Parametric Map: {type(exc).__name__}: {exc}") from exc
    ds.copy_patient_and_study_information(ref)  # as the source says them (see _for_highdicom)
    # highdicom referenced its stand-in sources; name the real ones (and their frames) and the derived slices.
    for frame, k in zip(ds.PerFrameFunctionalGroupsSequence, _frame_slices(ds, volume)):
        derivation = Dataset()  # Derivation Image functional group
        derivation.DerivationCodeSequence = DicomSequence([_code(MAP_DERIVATION_CODE)])
        derivation.SourceImageSequence = DicomSequence([_source_item(volume, k, locations_preserved=True)])
        frame.DerivationImageSequence = DicomSequence([derivation])
        frame.ReferencedImageSequence = DicomSequence([_derived_item(derived_uids[k])])  # Referenced Image group
    every = range(len(volume.headers))
    ds.SourceImageSequence = [_source_item(volume, k) for k in every]
    ds.ReferencedSeriesSequence = list(_referenced_series(volume, derived_series_uid, derived_uids, every))
    _series_attributes(ds, volume, derived_series_uid, derivation_text, contributing, created)
    path = out_dir / "0000.dcm"
    _write(path, ds)
    if on_written is not None:
        on_written(path)
    return [path]


def write_map_series(
    volume: PetVolume,
    values: np.ndarray,
    *,
    kind: str,
    derived_series_uid: str,
    derived_instance_uids: Sequence[str],
    provenance: Provenance,
    out_dir: Path,
    units: str,
    display: np.ndarray | None = None,
    window: tuple[float, float] = (0.0, 1.0),
    display_label: str | None = None,
    formats: Sequence[str] = MAP_FORMATS,
    sc_geometry: bool = True,
    fsync: bool = True,
    created: dt.datetime | None = None,
    on_written: Callable[[Path], None] | None = None,
) -> list[MapSeries]:
    """Write a voxel-wise map on the PET grid as a Secondary Capture series and/or a Parametric Map.

    Parameters
    ----------
    volume
        The source PET series (:func:`dicom_node.series.load_pet_series`); classic or multi-frame.
    values
        (z, y, x) raw map in ``units``, same shape as ``volume.array``, finite; stored as float32 in the PM.
    kind
        "stability" or "uncertainty".
    derived_series_uid, derived_instance_uids
        The derived (denoised) PET series the map belongs to and the SOPInstanceUID of each of its slices, in the
        volume's slice order (:func:`dicom_node.outputs.derived_pet.derived_series_uid` and
        :func:`~dicom_node.outputs.derived_pet.derived_instance_uids`).
    provenance
        As given to :func:`~dicom_node.outputs.derived_pet.write_derived_pet`: provenance text, the petnode
        Contributing Equipment item, SeriesNumber (derived PET's + :data:`MAP_SERIES_NUMBER_STEPS`).
    out_dir
        Files go to ``out_dir / kind / format /``: SC ``<slice:04d>.dcm`` in the volume's slice order, PM
        ``0000.dcm``; each written under a temporary name and renamed into place.
    units
        Units of ``values``: a PET Units value such as "BQML" (-> UCUM "Bq/ml") or "1" / "{ratio}" for a
        dimensionless map (:func:`map_units`).
    display
        What the SC shows (e.g. the normalised stability ``min(alpha * S / mean, 1)``), same shape, finite;
        None shows ``values``.
    window
        (low, high) of the SC in display units: low -> 0 (black), high -> 255 (white), clipped; fixed so every
        patient looks the same. Also the PM's VOI window when ``display`` is None (else the values' range).
    display_label
        What the SC shows, for its Window Explanation and DerivationDescription (default: the kind and units, or
        "normalised <kind>" when ``display`` is given).
    formats
        Any of "sc", "pm".
    sc_geometry
        Add the slice geometry (Frame of Reference, Image Position/Orientation, Slice Thickness) to the SC as
        Standard Extended attributes (viewers sync it with the PET; ``dciodvfy`` warns, no errors).
    fsync
        Flush each series' files and directory before returning.
    created
        Instance creation time written (default: now).
    on_written
        Called with each file once complete under its name (before the flush), so sends can follow the writer.

    Returns
    -------
    list of MapSeries
        One per format, in the order of ``formats``.

    Raises
    ------
    OutputWriteError
        Unknown kind, format or units, shape mismatch, non-finite values or display, bad window, wrong number of
        derived instance UIDs, or a file that could not be built or written.
    """
    raw, wanted, window = _check_inputs(volume, values, display, kind=kind, formats=formats, window=window,
                                        derived_instance_uids=derived_instance_uids, units=units)
    unit = map_units(units)
    derived_uids = [str(u) for u in derived_instance_uids]
    now = created or dt.datetime.now().astimezone()
    first = volume.headers[0]
    source_description = str(first.get("SeriesDescription", "") or "")
    derived_number = series_number(first.get("SeriesNumber"), provenance.series_number_offset)
    label = display_label or (f"{kind} ({unit.value})" if display is None else f"normalised {kind}")
    model = f", model {provenance.model_version}" if provenance.model_version else ""
    provenance_text = (
        f"{kind.capitalize()} map of petnode {provenance.software_version}: method {provenance.method}{model}, "
        f"route {provenance.route}, parameters {provenance.canonical_params()}; {provenance.run_details()}. "
        f"Goes with derived series {derived_series_uid}."
    )
    contributing = petnode_contributing_equipment(provenance, now)
    ref = _reference_dataset(volume)
    written: list[MapSeries] = []
    for fmt in wanted:
        series_uid = map_series_uid(derived_series_uid, kind, fmt, units=units, window=window)
        number = derived_number + MAP_SERIES_NUMBER_STEPS[(kind, fmt)]
        target = Path(out_dir) / kind / fmt
        try:
            if fsync:
                make_dirs_durable(target)
            else:
                target.mkdir(parents=True, exist_ok=True)
        except Exception as exc:  # StorageError from make_dirs_durable's fsync, OSError from mkdir
            raise OutputWriteError(f"cannot create output directory {target}: {exc}") from exc
        if fmt == "sc":
            description = series_description(
                source_description, f" {kind} (petnode {provenance.method}, {window[0]:g}-{window[1]:g})"
            )
            raw_values = f"; the values in {unit.value} are in the Parametric Map" if "pm" in wanted else ""
            text = clean_text(
                f"{provenance_text} Shows {label}, window {window[0]:g} to {window[1]:g} mapped linearly to 0-255"
                f"{raw_values}.", _ST_MAX
            )
            template = _sc_template(
                volume, kind=kind, series_uid=series_uid, number=number, description=description,
                explanation=clean_text(f"{label} {window[0]:g} to {window[1]:g}", _LO_MAX),
                derived_series_uid=derived_series_uid, derivation_text=text, provenance=provenance,
                contributing=contributing, ref=ref, created=now,
            )
            files = _write_sc(
                volume, raw if display is None else np.asarray(display), window=window,
                derived_series_uid=derived_series_uid, derived_uids=derived_uids, template=template,
                out_dir=target, sc_geometry=sc_geometry, on_written=on_written,
            )
        else:
            description = series_description(source_description, f" {kind} (petnode {provenance.method}, "
                                                                  f"{unit.value})")
            text = clean_text(f"{provenance_text} Values in {unit.value} ({unit.meaning}).", _ST_MAX)
            voi = window if display is None else (float(np.min(raw)), float(np.max(raw)))
            if voi[1] <= voi[0]:  # a constant map: any positive width shows it
                voi = (voi[0] - 0.5, voi[0] + 0.5)
            files = _write_pm(
                volume, raw, kind=kind, series_uid=series_uid, number=number, description=description, unit=unit,
                voi=voi, derived_series_uid=derived_series_uid, derived_uids=derived_uids, derivation_text=text,
                provenance=provenance, contributing=contributing, ref=ref, created=now, out_dir=target,
                on_written=on_written,
            )
        if fsync:
            try:
                sync_files(files)
                fsync_dir(target)
            except OSError as exc:
                raise OutputWriteError(f"cannot flush {target} to disk: {exc.strerror or exc}") from exc
        logger.info(
            "wrote %s map %s series %s (%d files, method %s, route %s) for derived series %s to %s",
            kind, fmt, series_uid, len(files), provenance.method, provenance.route, derived_series_uid, target,
        )
        written.append(MapSeries(kind=kind, format=fmt, series_uid=series_uid, files=files, description=description,
                                 series_number=number))
    return written
