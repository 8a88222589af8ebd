"""Write a denoised PET volume as a classic PET Image Storage series derived from its source slices.

One output instance per source slice, same Study, Frame of Reference and geometry, so a PACS files it beside the
source and any viewer fuses or compares the two. Everything SUV depends on (Units, DecayCorrection, the
radiopharmaceutical sequence, PatientWeight, SeriesDate/Time, AcquisitionDate/Time) is copied unchanged, and the
pixels are re-quantised per slice with a new RescaleSlope so nothing clips: SUV read from the derived series equals
SUV computed from the denoised volume with the source's SUV factor.

A multi-frame source (Enhanced or Legacy Converted Enhanced PET) gets one classic instance per frame, made from the
frame's classic header (:func:`dicom_node.series.frame_headers`, which maps the Enhanced attributes SUV depends on to
their classic places), referencing the source instance and its frame (Referenced Frame Number in the Source Image
Sequence); its instance UIDs are derived from the source instance UID and the frame number.

Codes (PS3.16), with the reason each was chosen:

- DerivationCodeSequence, CID 7203 "Image Derivation": (113088, DCM, "Gaussian blur") for the Gaussian filter, and
  (113087, DCM, "Smoothing") for every other denoiser, the closest CID 7203 concept to noise reduction (the group
  holds no "denoising" concept; 113085 "Spatial resampling" or 113072 "Multiplanar reformatting" would be wrong: the
  grid is unchanged).
- SourceImageSequence Purpose of Reference, CID 7202 "Source Image Purposes of Reference":
  (121322, DCM, "Source image for image processing operation").
- RelatedSeriesSequence Purpose of Reference, CID 7210 "Related Series Purposes of Reference":
  (121323, DCM, "Source series for image processing operation") -- each output slice depends on its neighbours too
  (3-D filters), so the whole source series is referenced once beside the per-slice source image.
- ContributingEquipmentSequence Purpose of Reference, CID 7005 "Contributing Equipment Purposes of Reference":
  (109102, DCM, "Processing Equipment"), defined as equipment that processed composite instances to create new
  ones. IHE AI Results (AIR, trial implementation) uses the placeholder (Newcode1, 99IHE, "Processing Algorithm")
  for the same role; a placeholder code is not stable enough to write into archives, and the Sequence allows a
  single item, so the standard DCM code wins. The IHE AIR pattern is otherwise followed: Manufacturer names the
  software ("petnode", also the loop guard), ManufacturerModelName the algorithm, SoftwareVersions the software and
  model versions, ContributionDescription the parameters.

Made to pass ``dciodvfy`` with zero errors also on real, slightly non-conformant sources: see
:func:`_conform_to_pet_iod` for the corrections and why each is needed.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import io
import json
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from dicom_node import __version__
from dicom_node.errors import OutputWriteError
from dicom_node.forked import ForkedWorkError, can_fork, run_forked
from dicom_node.outputs.uids import derive_uid
from dicom_node.series import PET_IMAGE_STORAGE, PetVolume
from dicom_node.spool import fsync_dir, part10_header, sync_files, write_durable

__all__ = [
    "CONTRIBUTING_EQUIPMENT_PURPOSE",
    "DEFAULT_DERIVATION_CODE",
    "DERIVATION_CODES",
    "PETNODE_MANUFACTURER",
    "Provenance",
    "clean_text",
    "conform_to_iod",
    "derived_instance_uids",
    "derived_series_uid",
    "is_petnode_output",
    "petnode_contributing_equipment",
    "series_description",
    "series_number",
    "write_derived_pet",
]

logger = logging.getLogger(__name__)

Code = tuple[str, str, str]  # (CodeValue, CodingSchemeDesignator, CodeMeaning)

PETNODE_MANUFACTURER = "petnode"
# CID 7203 Image Derivation, by denoiser name; anything else gets DEFAULT_DERIVATION_CODE.
DERIVATION_CODES: Mapping[str, Code] = {"gaussian": ("113088", "DCM", "Gaussian blur")}
DEFAULT_DERIVATION_CODE: Code = ("113087", "DCM", "Smoothing")
# CID 7202 Source Image Purposes of Reference.
SOURCE_IMAGE_PURPOSE: Code = ("121322", "DCM", "Source image for image processing operation")
# CID 7210 Related Series Purposes of Reference.
SOURCE_SERIES_PURPOSE: Code = ("121323", "DCM", "Source series for image processing operation")
# CID 7005 Contributing Equipment Purposes of Reference.
CONTRIBUTING_EQUIPMENT_PURPOSE: Code = ("109102", "DCM", "Processing Equipment")

# Fixed identity of this writer in the file meta header (PS3.10 7.1): a UID and a name of at most 16 characters.
IMPLEMENTATION_CLASS_UID = derive_uid("petnode", "implementation-class")
IMPLEMENTATION_VERSION_NAME = f"PETNODE_{__version__}"[:16]

_INT16_MAX = 32767
_LO_MAX = 64
_ST_MAX = 1024
# Below this many slices a fork costs more than the encoding it spreads (a few ms for a large node process).
FORK_MIN_SLICES = 32

# Attributes that describe the source's stored pixels or its own creation and would be false on a derived instance.
_DROP_FROM_SOURCE = (
    "SmallestImagePixelValue",  # stored-value statistics: the stored values change
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",  # a stored value: meaningless after re-quantisation
    "PixelPaddingRangeLimit",
    "IconImageSequence",  # thumbnail of the source pixels
    "InstanceCreatorUID",  # identified the source's creator
    "SourceImageSequence",  # replaced by references to the source
    "DerivationCodeSequence",
    "DerivationDescription",
    "PixelData",
)

_DROP_TAGS = frozenset(tag_for_keyword(k) for k in _DROP_FROM_SOURCE)

# Body parts (PS3.16 Annex L, "paired" structures and regions) for which General Series Laterality is required when
# no Image Laterality is sent.
_PAIRED_BODY_PARTS = frozenset(
    {
        "ACJOINT", "ADRENAL", "ANKLE", "ARM", "AXILLA", "BREAST", "CALCANEUS", "CAROTID", "CLAVICLE", "EAR",
        "ELBOW", "EXTREMITY", "EYE", "FEMUR", "FIBULA", "FINGER", "FOOT", "FOREARM", "HAND", "HIP", "HUMERUS",
        "KIDNEY", "KNEE", "LEG", "LOWER LIMB", "LUNG", "ORBIT", "OVARY", "PAROTID", "PATELLA", "RADIUS", "RIB",
        "SCAPULA", "SHOULDER", "SJOINT", "SUBMANDIBULAR", "TESTIS", "THIGH", "TIBIA", "TMJ", "TOE", "ULNA",
        "UPPER LIMB", "URETER", "WRIST",
    }
)  # fmt: skip

# Clinical Trial Subject module (PS3.3 C.7.1.3) attributes.
_CLINICAL_TRIAL_SUBJECT = (
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
)


# What _derive_header computes from the source header beyond copying it: when one of these differs between the
# source slices, every slice is derived on its own (the slow path); otherwise all slices share one derived template.
_DERIVATION_INPUTS = frozenset(tag_for_keyword(k) for k in (
    "SOPClassUID", "ImageType", "RelatedSeriesSequence", "ContributingEquipmentSequence", "PatientPosition",
    "PatientOrientationCodeSequence", "SeriesType", "BodyPartExamined", "Laterality", "ImageLaterality",
    "SpecificCharacterSet", *_CLINICAL_TRIAL_SUBJECT,
))
# Set per slice by the writer.
_PER_SLICE = frozenset(tag_for_keyword(k) for k in (
    "SOPInstanceUID", "SourceImageSequence", "RescaleSlope", "PixelData",
))
# Set by _derive_header to the same value on every slice, whatever the source says.
_CONSTANT_BY_DERIVATION = frozenset(tag_for_keyword(k) for k in (
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "DerivationDescription", "DerivationCodeSequence",
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept",
))


@dataclass(frozen=True)
class Provenance:
    """What produced a derived series; written into the DICOM provenance and the derived UIDs.

    Attributes
    ----------
    method
        Denoiser name (registry key), e.g. "gaussian".
    params
        Validated denoiser parameters (copied; JSON-serialisable values expected).
    route
        Name of the rule that routed the series.
    model_version
        Trained model version, None for methods without weights.
    series_description_suffix
        Appended to the source SeriesDescription (the total is cut to 64 characters, keeping the suffix).
    series_number_offset
        Added to the source SeriesNumber.
    software_version
        petnode version written to SoftwareVersions.
    source_revision
        How many times an instance of the source series came again with other content (0: never). A corrected
        source gives a new derived series (new UIDs), so a destination never keeps stale pixels under old UIDs.
    """

    method: str
    params: Mapping[str, Any]
    route: str
    model_version: str | None = None
    series_description_suffix: str = " [petnode]"
    series_number_offset: int = 1000
    software_version: str = __version__
    source_revision: int = 0
    # What the run itself reported and used: the denoiser's ``info`` (data-dependent values such as NLM's h),
    # the seed a stochastic method drew from, and the inputs it was given (pet, spacing, priors).
    info: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    stochastic: bool = False
    inputs: tuple[str, ...] = ("pet", "spacing")
    # The MR or CT series the method was given as its prior (referenced by the derived series, part of its UIDs).
    prior_series_uid: str | None = None
    prior_study_uid: str | None = None

    def __post_init__(self) -> None:
        if not self.method:
            raise ValueError("Provenance.method must not be empty")
        # A private copy: a caller mutating its dict later must not change UIDs or the written description.
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "info", dict(self.info))

    def canonical_params(self) -> str:
        """Parameters as compact JSON with sorted keys (stable across runs and dict orders)."""
        return json.dumps(dict(self.params), sort_keys=True, separators=(",", ":"), default=str)

    def run_details(self) -> str:
        """What the run reported (info), its seed when stochastic, and its inputs, for the DICOM provenance."""
        parts = []
        if self.info:
            parts.append("run " + json.dumps(dict(self.info), sort_keys=True, separators=(",", ":"), default=str))
        if self.stochastic and self.seed is not None:
            parts.append(f"seed {self.seed}")
        parts.append("inputs " + "+".join(self.inputs))
        return "; ".join(parts)


def derived_series_uid(source_series_uid: str, provenance: Provenance) -> str:
    """Deterministic SeriesInstanceUID of the derived series.

    Depends on the source series, the route, the method, the model version and the parameters, not on the
    software version or the time: re-running a job yields the same UIDs, so re-sending replaces rather than
    duplicates.
    """
    parts = [str(source_series_uid), provenance.route, provenance.method, provenance.model_version or "",
             provenance.canonical_params()]
    if provenance.source_revision:  # revision 0 keeps the UIDs earlier versions of petnode derived
        parts.append(f"source-revision:{provenance.source_revision}")
    if set(provenance.inputs) - {"pet", "spacing"}:  # a prior changes the pixels: it changes the UIDs
        parts.append("inputs:" + "+".join(sorted(provenance.inputs)))
    if provenance.stochastic and provenance.seed is not None:  # other seed, other pixels, other UIDs
        parts.append(f"seed:{provenance.seed}")
    if provenance.prior_series_uid:  # another prior series (a repeated MR), other pixels, other UIDs
        parts.append(f"prior:{provenance.prior_series_uid}")
    return str(derive_uid("petnode/derived-pet/series/v1", *parts))


def _instance_uid(series_uid: str, source_sop_uid: str, frame: int | None = None) -> str:
    if frame is None:  # classic source: the UIDs earlier versions of petnode derived
        return str(derive_uid("petnode/derived-pet/instance/v1", series_uid, source_sop_uid))
    return str(derive_uid("petnode/derived-pet/instance/v1", series_uid, source_sop_uid, f"frame:{frame}"))


def derived_instance_uids(volume: PetVolume, output_series_uid: str) -> list[str]:
    """The SOPInstanceUID :func:`write_derived_pet` gives each derived slice, in the volume's slice order.

    Parameters
    ----------
    volume
        The source series (classic or multi-frame: ``volume.frames`` names the source frame of each slice).
    output_series_uid
        The derived series' UID, :func:`derived_series_uid` of the source series and the provenance.

    Returns
    -------
    list of str
        One UID per slice of ``volume.array``, so other outputs (maps) can reference the derived slices.
    """
    frames = list(volume.frames or [])
    return [_instance_uid(output_series_uid, str(header.SOPInstanceUID), frames[k] if frames else None)
            for k, header in enumerate(volume.headers)]


def petnode_contributing_equipment(provenance: Provenance, created: dt.datetime) -> Dataset:
    """The ContributingEquipmentSequence item that names petnode (the loop guard, :func:`is_petnode_output`).

    IHE AI Results style: Manufacturer "petnode", ManufacturerModelName the method, SoftwareVersions the software
    and model versions, ContributionDescription the parameters and run details, Purpose of Reference
    (109102, DCM, "Processing Equipment"). Every object petnode writes carries this same item.
    """
    params = provenance.canonical_params()
    model = f", model {provenance.model_version}" if provenance.model_version else ""
    contributing = Dataset()
    contributing.Manufacturer = PETNODE_MANUFACTURER
    contributing.ManufacturerModelName = _clean_text(provenance.method, _LO_MAX)
    contributing.SoftwareVersions = [
        _clean_text(provenance.software_version, _LO_MAX),
        *([_clean_text(f"model {provenance.model_version}", _LO_MAX)] if provenance.model_version else []),
    ]
    contributing.ContributionDateTime = created.strftime("%Y%m%d%H%M%S.%f%z")
    contributing.ContributionDescription = _clean_text(
        f"{provenance.method} denoising{model}, route {provenance.route}, parameters {params}; "
        f"{provenance.run_details()}", _ST_MAX
    )
    contributing.PurposeOfReferenceCodeSequence = DicomSequence([_code(CONTRIBUTING_EQUIPMENT_PURPOSE)])
    return contributing


def is_petnode_output(ds: Dataset) -> bool:
    """True when ``ds`` was written by petnode (ContributingEquipmentSequence names petnode): the routing loop guard."""
    for item in ds.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "") or "").strip().lower() == PETNODE_MANUFACTURER:
            return True
    return False


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _clean_text(text: str, limit: int) -> str:
    # LO/ST may not contain backslashes (value separator in LO) or control characters other than the usual ones.
    cleaned = "".join(ch for ch in text.replace("\\", "/") if ch >= " ")
    return cleaned[:limit]


def _series_description(source: str, suffix: str) -> str:
    suffix = _clean_text(suffix, _LO_MAX)
    return _clean_text(source, _LO_MAX - len(suffix)).rstrip() + suffix if suffix else _clean_text(source, _LO_MAX)


def _series_number(source: object, offset: int) -> int:
    try:
        number = int(str(source).strip()) if source not in (None, "") else 0
    except ValueError:
        number = 0
    return number + int(offset)


def clean_text(text: str, limit: int) -> str:
    """``text`` made valid for an LO/ST value (no backslash or control characters) and cut to ``limit`` characters."""
    return _clean_text(text, limit)


def series_description(source: str, suffix: str) -> str:
    """A derived SeriesDescription: ``source`` cut so that ``source + suffix`` fits in 64 characters (LO)."""
    return _series_description(source, suffix)


def series_number(source: object, offset: int) -> int:
    """A derived SeriesNumber: the source's (0 when absent or not a number) plus ``offset``."""
    return _series_number(source, offset)


def conform_to_iod(ds: Dataset) -> list[str]:
    """Correct attributes copied from a source that would make a petnode instance fail its IOD; return what changed.

    The corrections of the derived PET (:func:`_conform_to_pet_iod`) for the other writers: General Series
    Laterality and the Clinical Trial Subject module are corrected the same way in every IOD, and the PET-only
    corrections find nothing to do in an instance without those attributes.
    """
    return _conform_to_pet_iod(ds)


def quantise_slice(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Signed 16-bit stored values and the RescaleSlope (DS string) with ``stored * slope ~= values``, no clipping.

    The slope is max|v| / 32767 as written in the DS string (16 characters), and the stored values are computed
    from the written slope, so the reader reconstructs exactly what we quantised. Intercept is 0.
    """
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0:
        return np.zeros(values.shape, dtype=np.int16), "1"
    slope = peak / _INT16_MAX
    text = format_number_as_ds(slope)
    while peak / float(text) > _INT16_MAX + 0.5:  # DS formatting rounded the slope down: nudge it up
        slope *= 1.0 + 1e-9
        text = format_number_as_ds(slope)
    stored = np.clip(np.rint(values / float(text)), -_INT16_MAX - 1, _INT16_MAX).astype(np.int16)
    return stored, text


def _conform_to_pet_iod(ds: Dataset) -> list[str]:
    """Correct source attributes that would make the derived instance fail the PET Image IOD; return what changed.

    Real GE/TCIA sources fail dciodvfy on exactly these (see shared/data READMEs); a new instance we sign as ours
    must not carry them forward.
    """
    changes: list[str] = []
    # General Series: Patient Position shall be absent when the NM/PET Patient Orientation Code Sequence is
    # present (the coded orientation carries the same information).
    if "PatientPosition" in ds and ds.get("PatientOrientationCodeSequence") is not None:
        del ds.PatientPosition
        changes.append("removed PatientPosition (PatientOrientationCodeSequence present)")
    # PET Series: Number of Time Slices only for DYNAMIC, time slots and R-R intervals only for GATED series
    # (GE writes the number of bed positions into NumberOfTimeSlices of WHOLE BODY/STATIC series).
    series_type = [str(v).upper() for v in (ds.get("SeriesType") or [])]
    kind = series_type[0] if series_type else ""
    for keyword, wanted in (
        ("NumberOfTimeSlices", "DYNAMIC"),
        ("NumberOfTimeSlots", "GATED"),
        ("NumberOfRRIntervals", "GATED"),
    ):
        if keyword in ds and kind != wanted:
            del ds[keyword]
            changes.append(f"removed {keyword} (SeriesType {kind or 'absent'})")
    # General Series: Laterality (Type 2C) is required, empty meaning unknown, when the examined body part may be
    # paired (or is not stated) and no Image Laterality is sent; it must be absent otherwise.
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if "Laterality" not in ds and not ds.get("ImageLaterality"):
        if not body_part or body_part in _PAIRED_BODY_PARTS:
            ds.Laterality = ""
            changes.append(f"added empty Laterality (BodyPartExamined {body_part or 'absent'})")
    # Clinical Trial Subject: Sponsor Name and Protocol ID are Type 1, and Subject ID or Subject Reading ID is
    # required. A module that fails this (TCIA writes an empty sponsor and no subject ID) is dropped as a whole
    # rather than completed with invented identifiers.
    if any(k in ds for k in _CLINICAL_TRIAL_SUBJECT):
        complete = (
            bool(ds.get("ClinicalTrialSponsorName"))
            and bool(ds.get("ClinicalTrialProtocolID"))
            and (bool(ds.get("ClinicalTrialSubjectID")) or bool(ds.get("ClinicalTrialSubjectReadingID")))
        )
        if not complete:
            for keyword in _CLINICAL_TRIAL_SUBJECT:
                if keyword in ds:
                    del ds[keyword]
            changes.append("removed the incomplete Clinical Trial Subject module")
        else:
            for keyword in ("ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName"):
                if keyword not in ds:  # Type 2: present, empty when unknown
                    setattr(ds, keyword, "")
                    changes.append(f"added empty {keyword}")
    return changes


def _copy_public(source: Dataset) -> Dataset:
    """Copy ``source`` without private attributes and without :data:`_DROP_FROM_SOURCE`, leaving it untouched.

    Vendor private attributes are dropped: their meaning is unknown to us and some would be false on a derived
    instance (GE GEMS_PETD_01 repeats source UIDs, counts and scan statistics). SUV needs none of them because
    SeriesDate/Time and AcquisitionDate/Time are kept as in the source. Only sequences and multi-valued elements
    are copied deeply (everything else is immutable), which is several times faster than ``copy.deepcopy``.
    """
    out = Dataset()
    for tag in source.keys():
        if tag.is_private or tag in _DROP_TAGS:
            continue  # decided on the tag alone: private elements are never even decoded
        elem = source[tag]
        if elem.VR == "SQ":
            out.add(DataElement(tag, "SQ", DicomSequence([_copy_public(item) for item in elem.value or []])))
        elif isinstance(elem.value, MultiValue):
            out.add(copy.deepcopy(elem))
        else:
            out.add(copy.copy(elem))  # str, numbers and bytes are immutable: sharing the value is safe
    return out


def _source_image_sequence(header: Dataset, frame: int | None) -> DicomSequence:
    source = Dataset()
    source.ReferencedSOPClassUID = str(header.get("SOPClassUID", PET_IMAGE_STORAGE))
    source.ReferencedSOPInstanceUID = str(header.SOPInstanceUID)
    if frame is not None:  # Image SOP Instance Reference Macro: the frame of a multi-frame source
        source.ReferencedFrameNumber = frame
    source.PurposeOfReferenceCodeSequence = DicomSequence([_code(SOURCE_IMAGE_PURPOSE)])
    return DicomSequence([source])


def _copy_element(elem: Any) -> DataElement:
    """A copy of one source element safe to modify (as :func:`_copy_public` copies them)."""
    if elem.VR == "SQ":
        return DataElement(elem.tag, "SQ", DicomSequence([_copy_public(item) for item in elem.value or []]))
    return copy.deepcopy(elem) if isinstance(elem.value, MultiValue) else copy.copy(elem)


def _encode_element(elem: Any, encodings: Any) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return bytes(fp.getvalue())


def _elements(ds: Dataset) -> dict[int, Any]:
    """The elements of ``ds`` by tag (plain ints), raw ones left undecoded, in no particular order.

    pydicom's own store when it has one (``Dataset.elements()`` sorts the tags and looks each up again, which
    was most of the cost of comparing 267 headers), else ``elements()``.
    """
    store = getattr(ds, "_dict", None)
    if isinstance(store, dict):
        return {int(t): e for t, e in store.items()}
    return {int(e.tag): e for e in ds.elements()}


def _public(ds: Dataset) -> dict[int, Any]:
    """The public, not dropped elements of ``ds`` by tag (as plain ints), raw ones left undecoded."""
    return {t: e for t, e in _elements(ds).items() if not (t >> 16) & 1 and t not in _DROP_TAGS}


def _same_element(a: Dataset, b: Dataset, tag: int, elem_a: Any = None, elem_b: Any = None) -> bool:
    """Whether two source headers hold the same value under ``tag``: raw bytes compared without decoding when
    both are still raw (the usual case), else decoded values, sequences item by item."""
    elem_a = a.get_item(tag) if elem_a is None else elem_a
    elem_b = b.get_item(tag) if elem_b is None else elem_b
    raw_a, raw_b = isinstance(elem_a, RawDataElement), isinstance(elem_b, RawDataElement)
    if raw_a and raw_b and elem_a.VR == elem_b.VR:
        return bool(elem_a.value == elem_b.value)
    if raw_a or raw_b:  # one was decoded by the loader: compare decoded values
        elem_a, elem_b = a[tag], b[tag]
    if elem_a.VR != elem_b.VR:
        return False
    if elem_a.VR == "SQ":
        items_a, items_b = list(elem_a.value or []), list(elem_b.value or [])
        if len(items_a) != len(items_b):
            return False
        for x, y in zip(items_a, items_b):
            ex, ey = _elements(x), _elements(y)
            if ex.keys() != ey.keys() or not all(_same_element(x, y, t, ex[t], ey[t]) for t in ex):
                return False
        return True
    return bool(elem_a.value == elem_b.value)


def _varying_tags(headers: list[Dataset]) -> set[Any]:
    """Public source tags (not dropped) whose value or presence differs between the source slices.

    Every slice is compared with the second one: the loader decoded attributes of the first, the others are
    mostly still raw bytes, which compare without decoding.
    """
    ref = headers[1] if len(headers) > 1 else headers[0]
    base = _public(ref)
    varying: set[int] = set()
    for header in headers:
        if header is ref:
            continue
        own = _public(header)
        varying |= own.keys() ^ base.keys()
        for tag, elem in own.items():
            other = base.get(tag)
            if other is None or tag in varying:
                continue
            if (other is not elem and not (isinstance(elem, RawDataElement) and isinstance(other, RawDataElement)
                                           and elem.VR == other.VR and elem.value == other.value)
                    and not _same_element(ref, header, tag, other, elem)):
                varying.add(tag)
    return {Tag(t) for t in varying}


class _SeriesTemplate:
    """The derived header every slice shares, encoded once; each slice encodes only what is its own.

    Built when the source slices differ only in attributes the derivation copies as they are (positions, instance
    numbers, times, decay factors...): ``_derive_header`` then makes the same header for every slice but for
    those, the instance UID, the source reference, the slope and the pixels. The result is byte for byte what
    deriving each slice in full writes (tested), at a fraction of the cost.
    """

    def __init__(self, derived: Dataset, varying: set[Any]) -> None:
        correct_ambiguous_vr(derived, True)
        self.encodings = derived.get("SpecificCharacterSet", "iso8859")
        self.varying = {int(t) for t in varying}
        self.parts = {int(tag): _encode_element(derived[tag], self.encodings) for tag in derived.keys()
                      if tag not in _PER_SLICE and tag not in varying and not (tag.element == 0 and tag.group > 6)}
        # Varying elements whose raw bytes can be copied as they are: not private, not of an ambiguous VR (US or
        # SS...: resolved against PixelRepresentation as the full derivation does).
        self._references: dict[tuple[str, int, int | None], tuple[bytes, bytes]] = {}
        self.raw_ok = {int(tag) for tag in varying if not Tag(tag).is_private and " or " not in _dictionary_vr(tag)}

    @classmethod
    def build(cls, headers: list[Dataset], derive: Any, frame: int | None) -> _SeriesTemplate | None:
        varying = _varying_tags(headers)
        if varying & _DERIVATION_INPUTS:
            return None  # e.g. ImageType differs between slices: derive each slice in full
        derived = derive(headers[0], frame=frame)
        # What the derivation removed from the first slice it removes from every slice (GE's per-slice
        # NumberOfTimeSlices of a WHOLE BODY series, for one): never copied back per slice.
        removed = {t for t in headers[0].keys() if not t.is_private and t not in _DROP_TAGS} - set(derived.keys())
        return cls(derived, varying - _CONSTANT_BY_DERIVATION - _PER_SLICE - removed)

    def body(self, header: Dataset, sop_uid: str, frame: int | None, slope: str, pixels: bytes) -> bytes:
        parts = dict(self.parts)
        own = Dataset()
        store = _elements(header)
        for tag in self.varying:
            elem = store.get(tag)
            if elem is None:
                continue
            raw = _raw_little_endian(elem) if tag in self.raw_ok else None
            if raw is not None:
                parts[tag] = raw  # copied as it came, as the template's own raw elements are
            else:
                own.add(_copy_element(header[tag]))
        parts[_SOP_INSTANCE_UID] = _pack(_SOP_INSTANCE_UID, "UI", _padded(sop_uid, b"\0"))
        parts[_RESCALE_SLOPE] = _pack(_RESCALE_SLOPE, "DS", _padded(slope, b" "))
        parts[_PIXEL_DATA] = _pack(_PIXEL_DATA, "OW", pixels)
        parts[_SOURCE_IMAGE_SEQUENCE] = self._source_reference(header, frame)
        if len(own):
            own.PixelRepresentation = 1  # as in the template: resolves ambiguous VRs (US or SS) the same way
            correct_ambiguous_vr(own, True)
            del own.PixelRepresentation
        for tag in own.keys():
            parts[int(tag)] = _encode_element(own[tag], self.encodings)
        return b"".join(parts[tag] for tag in sorted(parts))

    def _source_reference(self, header: Dataset, frame: int | None) -> bytes:
        """The encoded Source Image Sequence: encoded through pydicom once per (class, UID length, frame), then
        only the referenced instance UID is put in (same length, so every length in the sequence holds)."""
        sop_class = str(header.get("SOPClassUID", PET_IMAGE_STORAGE))
        uid = _padded(str(header.SOPInstanceUID), b"\0")
        key = (sop_class, len(uid), frame)
        cut = self._references.get(key)
        if cut is None:
            data = _encode_element(DataElement(_SOURCE_IMAGE_SEQUENCE, "SQ", _source_image_sequence(header, frame)),
                                   self.encodings)
            needle = _pack(_REFERENCED_SOP_INSTANCE_UID, "UI", uid)
            if data.count(needle) != 1:  # pragma: no cover - the UID also in the class or purpose: no shortcut
                return data
            at = data.index(needle)
            cut = self._references[key] = (data[:at], data[at + len(needle):])
        return cut[0] + _pack(_REFERENCED_SOP_INSTANCE_UID, "UI", uid) + cut[1]


_SOURCE_IMAGE_SEQUENCE, _REFERENCED_SOP_INSTANCE_UID = 0x00082112, 0x00081155
_SOP_INSTANCE_UID, _RESCALE_SLOPE, _PIXEL_DATA = 0x00080018, 0x00281053, 0x7FE00010
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # not in the dictionary: decode and encode it through pydicom
        return " or "


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _pack(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element (PS3.5 7.1.2), as pydicom writes it."""
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(value)) + value


def _raw_little_endian(elem: Any) -> bytes | None:
    """The explicit VR little endian encoding of a raw element read from little endian data, its value bytes
    as they came (None for anything else: decoded elements, big endian, sequences, unknown or ambiguous VRs,
    undefined or odd lengths, values too long for their VR). Implicit VR elements take the dictionary's VR, as
    decoding them would."""
    if not isinstance(elem, RawDataElement) or not elem.is_little_endian:
        return None
    vr = elem.VR if not elem.is_implicit_VR else _dictionary_vr(int(elem.tag))
    value = elem.value
    if (not vr or " or " in vr or vr in ("SQ", "UN") or elem.length == 0xFFFFFFFF or not isinstance(value, bytes)
            or len(value) % 2 or (vr not in _LONG_LENGTH_VRS and len(value) > 0xFFFF)):
        return None
    return _pack(int(elem.tag), vr, value)


def _derive_header(
    header: Dataset,
    *,
    frame: int | None,
    series_uid: str,
    series_number: int,
    description: str,
    derivation_text: str,
    derivation_code: Code,
    contributing: Dataset,
    related: Sequence[Dataset],
    created_date: str,
    created_time: str,
) -> Dataset:
    ds = _copy_public(header)
    source_sop_uid = str(header.SOPInstanceUID)
    ds.SOPClassUID = PET_IMAGE_STORAGE
    ds.SOPInstanceUID = _instance_uid(series_uid, source_sop_uid, frame)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    # PET Image module: Value 1 ORIGINAL or DERIVED, Value 2 shall be PRIMARY (PS3.3 C.8.9.4.1.1), so "DERIVED\
    # SECONDARY" would be invalid; later values of the source are kept.
    source_type = [str(v) for v in (header.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "PRIMARY", *source_type[2:]]
    ds.DerivationDescription = derivation_text
    ds.DerivationCodeSequence = DicomSequence([_code(derivation_code)])
    ds.SourceImageSequence = _source_image_sequence(header, frame)
    ds.RelatedSeriesSequence = DicomSequence([*(ds.get("RelatedSeriesSequence") or []),
                                              *(copy.deepcopy(item) for item in related)])
    ds.ContributingEquipmentSequence = DicomSequence(
        [*(ds.get("ContributingEquipmentSequence") or []), copy.deepcopy(contributing)]
    )
    # Creation of this instance and of its pixel content. SeriesDate/SeriesTime and AcquisitionDate/Time stay as in
    # the source on purpose: with DecayCorrection START the PET series time is the decay-correction reference
    # (PS3.3 C.8.9.1 PET Series module: Series Date/Time is the reference for all temporally related PET values,
    # including activity), so a new series time would change every SUV computed from this series.
    ds.InstanceCreationDate = created_date
    ds.InstanceCreationTime = created_time
    ds.ContentDate = created_date
    ds.ContentTime = created_time
    # Image Pixel / PET Image: signed 16-bit, one sample, per-slice slope set by the caller, intercept 0.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    changes = _conform_to_pet_iod(ds)
    if changes:
        logger.debug("derived instance %s: %s", ds.SOPInstanceUID, "; ".join(changes))
    return ds


def write_derived_pet(
    volume: PetVolume,
    denoised: np.ndarray,
    out_dir: Path,
    provenance: Provenance,
    *,
    fsync: bool = True,
    fast: bool = True,
    created: dt.datetime | None = None,
    on_written: Callable[[Path], None] | None = None,
    processes: int = 1,
) -> list[Path]:
    """Write ``denoised`` as a PET Image Storage series derived from ``volume``, one file per source slice.

    Parameters
    ----------
    volume
        The source series as loaded by :func:`dicom_node.series.load_pet_series` (its headers are not modified);
        for a multi-frame source, ``volume.frames`` names the source frame of each slice.
    denoised
        (z, y, x) values in the source units, same shape as ``volume.array``, finite.
    out_dir
        Created if needed; files are ``<index:04d>.dcm`` in the volume's slice order, each written under a temporary
        name and renamed into place (an existing file of the same name is replaced).
    provenance
        Method, parameters, route and versions, written into the provenance attributes and the UIDs.
    fsync
        Flush the files and the directory to disk before returning (durability after a crash): once for the
        whole series.
    fast
        Encode the header every slice shares once (:class:`_SeriesTemplate`); False derives and encodes each
        slice in full through pydicom (the reference; the output is the same bytes).
    created
        The instance creation time written (default: now).
    on_written
        Called with each file once it is complete under its name (before the series is flushed), so a send can
        follow the writer (:mod:`dicom_node.progress`); with ``processes`` > 1 in the order the files are done.
    processes
        Forked writer processes (:mod:`dicom_node.forked`) for series of at least :data:`FORK_MIN_SLICES`
        slices; 1 writes in this process. The files are the same bytes either way.

    Returns
    -------
    list of Path
        The written files, in slice order.

    Raises
    ------
    OutputWriteError
        Shape mismatch, non-finite values, or a file that could not be written.
    """
    values = np.asarray(denoised)
    if values.shape != volume.array.shape:
        raise OutputWriteError(f"denoised shape {values.shape} does not match the source volume {volume.array.shape}")
    if len(volume.headers) != values.shape[0]:
        raise OutputWriteError(f"{len(volume.headers)} source headers for {values.shape[0]} slices")
    if volume.frames and len(volume.frames) != values.shape[0]:
        raise OutputWriteError(f"{len(volume.frames)} source frame numbers for {values.shape[0]} slices")
    if not np.isfinite(np.sum(values, dtype=np.float64)):  # no boolean copy of the volume (see all_finite)
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise OutputWriteError(f"denoised volume has {bad} non-finite values")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create output directory {out_dir}: {exc}") from exc

    first = volume.headers[0]
    series_uid = derived_series_uid(volume.series_uid, provenance)
    series_number = _series_number(first.get("SeriesNumber"), provenance.series_number_offset)
    description = _series_description(
        str(first.get("SeriesDescription", "") or ""), provenance.series_description_suffix
    )
    params = provenance.canonical_params()
    model = f", model {provenance.model_version}" if provenance.model_version else ""
    derivation_text = _clean_text(
        f"Denoised by petnode {provenance.software_version}: method {provenance.method}{model}, "
        f"route {provenance.route}, parameters {params}; {provenance.run_details()}",
        _ST_MAX,
    )
    derivation_code = DERIVATION_CODES.get(provenance.method, DEFAULT_DERIVATION_CODE)
    now = created or dt.datetime.now().astimezone()
    created_date, created_time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")

    contributing = petnode_contributing_equipment(provenance, now)
    related = Dataset()
    related.StudyInstanceUID = volume.study_uid
    related.SeriesInstanceUID = volume.series_uid
    related.PurposeOfReferenceCodeSequence = DicomSequence([_code(SOURCE_SERIES_PURPOSE)])
    related_items = [related]
    if provenance.prior_series_uid:  # the MR/CT prior is a source series of the processing too
        prior = Dataset()
        prior.StudyInstanceUID = provenance.prior_study_uid or volume.study_uid
        prior.SeriesInstanceUID = provenance.prior_series_uid
        prior.PurposeOfReferenceCodeSequence = DicomSequence([_code(SOURCE_SERIES_PURPOSE)])
        related_items.append(prior)

    derive = functools.partial(
        _derive_header, series_uid=series_uid, series_number=series_number, description=description,
        derivation_text=derivation_text, derivation_code=derivation_code, contributing=contributing,
        related=related_items, created_date=created_date, created_time=created_time,
    )
    headers, frames = list(volume.headers), list(volume.frames or [])
    template = _SeriesTemplate.build(headers, derive, frames[0] if frames else None) if fast else None
    paths = [out_dir / f"{k:04d}.dcm" for k in range(len(headers))]

    def write_one(k: int) -> None:
        header, frame, path = headers[k], (frames[k] if frames else None), paths[k]
        stored, slope = quantise_slice(np.asarray(values[k], dtype=np.float64))
        try:
            if template is not None:
                sop_uid = _instance_uid(series_uid, str(header.SOPInstanceUID), frame)
                data = part10_header(PET_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian, IMPLEMENTATION_CLASS_UID,
                                     IMPLEMENTATION_VERSION_NAME) + template.body(header, sop_uid, frame, slope,
                                                                                  stored.tobytes())
            else:
                data = _encode_file(derive(header, frame=frame), slope, stored)
            # One flush for the whole series below, not one per file: the series is only recorded as written
            # (and sent) after it; a crash before leaves the series to be processed again (deterministic UIDs).
            write_durable(path, data, fsync=False)
        except Exception as exc:  # disk full, permissions, encoding errors: one error type for the pipeline
            raise OutputWriteError(f"cannot write {path}: {type(exc).__name__}: {exc}") from exc

    def written(k: int) -> None:
        if on_written is not None:
            on_written(paths[k])

    if processes > 1 and len(paths) >= FORK_MIN_SLICES and can_fork():
        try:
            run_forked(len(paths), write_one, processes, written)
        except ForkedWorkError as exc:
            raise OutputWriteError(str(exc)) from exc
    else:
        for k in range(len(paths)):
            write_one(k)
            written(k)
    if fsync:
        try:
            sync_files(paths)
            fsync_dir(out_dir)
        except OSError as exc:
            raise OutputWriteError(f"cannot flush {out_dir} to disk: {exc.strerror or exc}") from exc
    logger.info(
        "wrote derived series %s (%d instances, method %s, route %s) from series %s to %s",
        series_uid,
        len(paths),
        provenance.method,
        provenance.route,
        volume.series_uid,
        out_dir,
    )
    return paths


def _encode_file(ds: Dataset, slope: str, stored: np.ndarray) -> bytes:
    """One derived slice in full through pydicom (the reference the template path must equal)."""
    ds.RescaleSlope = slope
    ds.add_new(0x7FE00010, "OW", stored.tobytes())  # explicit VR: 16-bit pixel data is OW
    return encode_part10(ds)


def encode_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file in Explicit VR Little Endian with petnode's file meta (every object petnode writes
    through pydicom: derived PET slices on the reference path, map series)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
