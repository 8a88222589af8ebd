"""Put an MR or CT series (the anatomical prior of a PET series) on the PET grid.

A prior series is read with pydicom (the spool's file names say nothing about order; GDCM's ordering is not relied
on), sorted along the slice normal with the same geometry checks as the PET loader (:mod:`dicom_node.series`),
rescaled per slice and turned into a float32 :class:`SimpleITK.Image` whose origin, spacing and direction come from
the DICOM geometry. Then, for a PET series:

- same Frame of Reference: the two series share one patient coordinate system, so the prior is resampled (linear)
  at the PET voxel centres from the DICOM geometry alone;
- another Frame of Reference: a rigid registration (6 parameters, Mattes mutual information, multi-resolution,
  seeded metric sampling so that a run is reproducible) finds the transform from PET to prior coordinates, a
  quality gate decides whether it can be trusted, and the prior is resampled through it.

A prior that cannot be read, does not overlap the PET, or whose registration fails the gate raises
:class:`~dicom_node.errors.PriorError` naming why; the node then applies the rule's fallback instead of feeding a
misregistered image to a denoiser.

SimpleITK's direction matrix holds the image axes' directions as its columns (flattened row-major); PET and prior
images here use the DICOM axes: x along a row (ImageOrientationPatient[:3]), y down a column (ImageOrientationPatient
[3:]), z along their cross product (the order the slices are sorted in). Arrays are (z, y, x).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from scipy import ndimage

from dicom_node.errors import PriorError, SeriesError
from dicom_node.series import (
    SLICE_SPACING_RTOL,
    PetVolume,
    _geometry,
    _number,
    native_pixels,
    read_instance,
)

__all__ = [
    "OUTSIDE_VALUE",
    "PreparedPrior",
    "PriorImage",
    "PriorKind",
    "QualityGate",
    "Registration",
    "RegistrationMode",
    "RegistrationParams",
    "pet_image",
    "pet_reference",
    "prepare_prior",
    "read_prior_series",
    "reference_grid",
    "register_rigid",
    "resample_onto",
    "same_frame_of_reference",
]

logger = logging.getLogger(__name__)

PriorKind = Literal["mr", "ct"]
RegistrationMode = Literal["auto", "always", "never"]

AIR_HU = -1000.0
# What a prior shows outside its own field of view: MR background is dark, CT's is air.
OUTSIDE_VALUE: dict[str, float] = {"mr": 0.0, "ct": AIR_HU}
_KINDS: dict[str, PriorKind] = {"MR": "mr", "CT": "ct"}

# Foreground ("body") masks for the quality gate and the initial alignment: PET and MR above this fraction of their
# 99th percentile (after a one-voxel smoothing, so noise does not punch holes), CT above this many HU (soft tissue,
# not lung or air). Holes inside a slice (lungs, ventricles, the skull's dark ring on MR) are filled.
FOREGROUND_FRACTION = 0.1
CT_BODY_HU = -500.0
# Intensities fed to the metric are clipped to this upper percentile: a bladder or a hot lesion (PET), metal (CT)
# or a vessel (MR) would otherwise squeeze all the anatomy into a few histogram bins.
METRIC_CLIP_PERCENTILE = 99.5
# Percentiles are estimated from at most this many voxels (a 512 x 512 x 300 CT has 79 M).
_PERCENTILE_SAMPLES = 1_000_000


# --- reading ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorImage:
    """An MR or CT series as a 3-D image in patient coordinates.

    Attributes
    ----------
    image
        float32 :class:`SimpleITK.Image` (x, y, z): MR in its own (arbitrary) units, CT in HU (values below air,
        such as the padding outside the reconstruction circle, set to -1000); origin, spacing and direction from
        ImagePositionPatient, PixelSpacing, the slice positions and ImageOrientationPatient.
    kind
        "mr" or "ct".
    series_uid, frame_of_reference_uid, study_uid
        Identity of the series ("" where the header lacks the attribute).
    description
        SeriesDescription ("" when absent).
    """

    image: sitk.Image = field(repr=False)
    kind: PriorKind
    series_uid: str
    frame_of_reference_uid: str
    study_uid: str
    description: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxels."""
        x, y, z = self.image.GetSize()
        return (z, y, x)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(dz, dy, dx) in mm."""
        dx, dy, dz = self.image.GetSpacing()
        return (dz, dy, dx)


def _direction(orientation: Sequence[float]) -> tuple[float, ...]:
    """SimpleITK direction (row-major 3 x 3, axis directions as columns) from ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=float)
    row, col = o[:3], o[3:]
    return tuple(float(v) for v in np.column_stack([row, col, np.cross(row, col)]).reshape(-1))


def reference_grid(origin: Sequence[float], orientation: Sequence[float], spacing: Sequence[float],
                   shape: Sequence[int]) -> sitk.Image:
    """An empty float32 image with a DICOM slice stack's geometry, to resample onto.

    Parameters
    ----------
    origin
        ImagePositionPatient of the first slice (along the normal), mm.
    orientation
        ImageOrientationPatient (6 direction cosines).
    spacing
        (dz, dy, dx) in mm: slice spacing along the normal, then PixelSpacing (row spacing, column spacing).
    shape
        (z, y, x) voxels: slices, rows, columns.
    """
    nz, ny, nx = (int(n) for n in shape)
    image = sitk.Image(nx, ny, nz, sitk.sitkFloat32)
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(_direction(orientation))
    return image


def pet_reference(volume: PetVolume) -> sitk.Image:
    """An empty float32 image on the PET grid (for resampling a prior onto); see :func:`pet_image`."""
    return reference_grid(volume.positions[0], volume.orientation, volume.spacing, volume.shape)


def pet_image(volume: PetVolume) -> sitk.Image:
    """The PET volume as a float32 :class:`SimpleITK.Image` with its DICOM geometry (the registration's fixed
    image); ``sitk.GetArrayFromImage`` of it gives back ``volume.array``."""
    image = sitk.GetImageFromArray(np.asarray(volume.array, dtype=np.float32))
    image.CopyInformation(pet_reference(volume))
    return image


def same_frame_of_reference(a: str | None, b: str | None) -> bool:
    """True only when both Frame of Reference UIDs are given (non-empty) and equal: an absent UID proves nothing
    about shared patient coordinates."""
    a = (a or "").strip().rstrip("\x00")
    b = (b or "").strip().rstrip("\x00")
    return bool(a) and a == b


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels marked by Pixel Padding Value (and Pixel Padding Range Limit): outside the patient, not data."""
    value = ds.get("PixelPaddingValue")
    if value in (None, ""):
        return None
    try:
        low = int(value)
        limit = ds.get("PixelPaddingRangeLimit")
        high = int(limit) if limit not in (None, "") else low
    except (TypeError, ValueError):
        return None  # a malformed padding value marks nothing rather than guessing
    low, high = min(low, high), max(low, high)
    mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def read_prior_series(paths: Sequence[Path], *, series_uid: str | None = None,
                      reader: Callable[[Path], Dataset] | None = None,
                      spacing_tolerance: float = SLICE_SPACING_RTOL) -> PriorImage:
    """Read an MR or CT series (classic single-frame slices, any file names, any order) into a :class:`PriorImage`.

    Parameters
    ----------
    paths
        The series' files.
    series_uid
        Keep only the instances of this series: other series' files, and files that are not DICOM, are skipped
        (for a folder holding more than the prior). Without it every file must be a slice of one series.
    reader
        Reads one file (default ``pydicom.dcmread`` deferring Pixel Data), as for :func:`~dicom_node.series.
        load_pet_series`.
    spacing_tolerance
        Relative tolerance of the slice spacing (the PET loader's by default).

    Returns
    -------
    PriorImage
        Sorted along the slice normal, per-slice RescaleSlope/Intercept applied, padding set to the background
        (CT: air), CT values below -1000 HU raised to -1000.

    Raises
    ------
    PriorError
        No files, an unreadable file, not MR or CT, multi-frame instances, missing Pixel Data, fewer than two
        slices, several series, or not one regular 3-D stack (orientation, matrix, pixel spacing or slice spacing
        differ between slices, duplicate positions, a gantry tilt): the message quotes the values.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise PriorError("prior series: no files given")
    read = reader or read_instance
    datasets: list[Dataset] = []
    kept: list[Path] = []
    for path in paths:
        try:
            ds = read(path)
        except Exception as exc:  # pydicom raises many types for truncated or foreign files
            if series_uid is not None:
                logger.debug("prior series %s: skipping %s (%s)", series_uid, path, exc)
                continue
            raise PriorError(f"prior series: cannot read {path}: {type(exc).__name__}: {exc}") from exc
        if series_uid is not None and str(ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        datasets.append(ds)
        kept.append(path)
    if not datasets:
        raise PriorError(f"prior series {series_uid}: none of the {len(paths)} file(s) holds one of its instances")

    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(uids) != 1:
        raise PriorError(f"prior files hold {len(uids)} series {uids}: give one series")
    uid = uids[0]
    modalities = sorted({str(ds.get("Modality", "") or "") for ds in datasets})
    if len(modalities) != 1 or modalities[0] not in _KINDS:
        raise PriorError(f"prior series {uid} has modality {'/'.join(modalities) or 'none'!r}: a prior is MR or CT")
    kind = _KINDS[modalities[0]]
    for ds, path in zip(datasets, kept):
        frames = ds.get("NumberOfFrames", 1)
        if str(frames or "1").strip() not in ("1", ""):  # any other value, "0" or junk included, is not one slice
            raise PriorError(
                f"prior series {uid}: {path.name} is a multi-frame instance (NumberOfFrames {frames}, SOP Class "
                f"{ds.get('SOPClassUID', '?')}): send classic single-frame MR or CT slices"
            )
        if "PixelData" not in ds:
            raise PriorError(f"prior series {uid}: {path.name} has no Pixel Data")
    if len(datasets) < 2:
        raise PriorError(f"prior series {uid} has 1 slice: a prior must be a 3-D volume of at least 2 slices")
    try:
        geometry = _geometry(datasets, spacing_tolerance=spacing_tolerance)
    except SeriesError as exc:
        raise PriorError(f"prior series {uid} is not a regular 3-D volume: {exc}") from exc

    from pydicom.pixels import pixel_array  # lazy, as in the PET loader

    headers = [datasets[i] for i in geometry.order]
    sorted_paths = [kept[i] for i in geometry.order]
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    volume = np.empty((len(headers), rows, cols), dtype=np.float32)
    background = OUTSIDE_VALUE[kind]
    for k, (ds, path) in enumerate(zip(headers, sorted_paths)):
        try:
            stored = native_pixels(ds)
            if stored is None:
                stored = pixel_array(ds)
        except Exception as exc:  # truncated, corrupt or undecodable pixel data
            raise PriorError(f"prior series {uid}: cannot decode Pixel Data of {path}: "
                             f"{type(exc).__name__}: {exc}") from exc
        if stored.shape != (rows, cols):
            raise PriorError(f"prior series {uid}: {path}: decoded pixel shape {stored.shape} is not ({rows}, {cols})")
        try:
            slope = _number(ds, "RescaleSlope", 1.0, path)
            intercept = _number(ds, "RescaleIntercept", 0.0, path)
        except SeriesError as exc:
            raise PriorError(f"prior series {uid}: {exc}") from exc
        values = stored.astype(np.float64) * slope + intercept
        padding = _padding_mask(ds, stored)
        if padding is not None:
            values[padding] = background
        volume[k] = values
    if kind == "ct":
        # Below air is padding outside the reconstruction circle (often -3024 or -2000 HU), not anatomy.
        np.maximum(volume, AIR_HU, out=volume)

    image = sitk.GetImageFromArray(volume)
    del volume
    image.CopyInformation(reference_grid(geometry.positions[0], geometry.orientation, geometry.spacing,
                                         (len(headers), rows, cols)))
    first = headers[0]
    prior = PriorImage(
        image=image,
        kind=kind,
        series_uid=uid,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        description=str(first.get("SeriesDescription", "") or ""),
    )
    logger.debug("prior series %s: %s %d slices %dx%d, spacing %s mm", uid, kind, len(headers), rows, cols,
                 geometry.spacing)
    return prior


# --- resampling -------------------------------------------------------------------------------------------------------


def _identity() -> sitk.Transform:
    return sitk.Transform(3, sitk.sitkIdentity)


def resample_onto(prior: PriorImage, reference: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """The prior resampled (linear) at the reference grid's voxel centres.

    Parameters
    ----------
    prior
        The prior image.
    reference
        The target grid (e.g. :func:`pet_reference`); its values are not used.
    transform
        Maps reference (PET) points to prior points (what :func:`register_rigid` finds); None: identity (same Frame
        of Reference).

    Returns
    -------
    ndarray
        float32 (z, y, x) with the reference's shape; outside the prior's field of view 0 (MR) or -1000 HU (CT).
    """
    resampled = sitk.Resample(prior.image, reference, transform or _identity(), sitk.sitkLinear,
                              OUTSIDE_VALUE[prior.kind], sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def _field_of_view(prior: PriorImage, reference: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """bool (z, y, x): reference voxels whose centre falls inside the prior's field of view."""
    ones = sitk.Image(prior.image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(prior.image)
    inside = sitk.Resample(ones, reference, transform or _identity(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayViewFromImage(inside) > 0


# --- masks and measures for the gate ----------------------------------------------------------------------------------


def _percentile(values: np.ndarray, q: float | Sequence[float]) -> Any:
    flat = values.ravel()
    step = max(1, flat.size // _PERCENTILE_SAMPLES)
    return np.percentile(flat[::step], q)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes within each (axial) slice: lungs, ventricles, the skull's dark ring on MR. Filling per slice
    works when the field of view cuts the body open, where a 3-D fill would not."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure=structure)


def _smooth(array: np.ndarray) -> np.ndarray:
    """One-voxel Gaussian: noise must neither punch holes in a mask nor read as structure in the MI measure
    (the PET being registered is the noisy one the node is about to denoise)."""
    return ndimage.gaussian_filter(np.asarray(array, dtype=np.float32), 1.0)


def _foreground(array: np.ndarray, kind: Literal["pet", "mr", "ct"], *, smoothed: bool = False) -> np.ndarray:
    """Body mask (z, y, x) of a PET, MR or CT array (see FOREGROUND_FRACTION and CT_BODY_HU); ``smoothed``: the
    PET or MR array is already :func:`_smooth`-ed."""
    if kind == "ct":
        mask = array > CT_BODY_HU
    else:
        smooth = array if smoothed else _smooth(array)
        top = float(_percentile(smooth, 99.0))
        if not top > 0:
            return np.zeros(array.shape, dtype=bool)
        mask = smooth > FOREGROUND_FRACTION * top
    return _fill_slices(mask)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _normalised_mi(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """MI(a, b) / min(H(a), H(b)) from a joint histogram: 0 for independent values, 1 when one determines the
    other (up to binning)."""
    if a.size < bins * bins:
        return 0.0
    ranges = []
    for v in (a, b):
        lo, hi = (float(x) for x in _percentile(v, [0.5, METRIC_CLIP_PERCENTILE]))
        ranges.append((lo, hi if hi > lo else lo + 1.0))
    joint, _, _ = np.histogram2d(np.clip(a, *ranges[0]), np.clip(b, *ranges[1]), bins=bins, range=ranges)
    p = joint / joint.sum()
    ha, hb, hab = _entropy(p.sum(axis=1)), _entropy(p.sum(axis=0)), _entropy(p)
    floor = min(ha, hb)
    return (ha + hb - hab) / floor if floor > 0 else 0.0


# --- registration -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationParams:
    """How :func:`register_rigid` searches.

    Attributes
    ----------
    initializer
        Start: "moments" aligns the centroids of the PET's and the prior's body masks (robust to their different
        contrasts), "geometry" the centres of the two grids, "identity" trusts the two coordinate systems (e.g. two
        Frames of Reference of one hybrid scanner).
    bins
        Histogram bins of the Mattes mutual information.
    shrink_factors, smoothing_sigmas
        The resolution pyramid, coarse to fine: shrink factors (voxels) and Gaussian smoothing sigmas in PET voxels
        (converted to mm with the PET's largest spacing, so a prior of finer voxels is smoothed alike).
    samples
        Metric samples per level (random, from ``seed``): the cost stays bounded whatever the image size.
    iterations
        Most optimizer iterations per level.
    step_mm, min_step_mm, relaxation
        Regular-step gradient descent: first step, smallest step (convergence) and the factor the step shrinks by
        when the gradient turns. Steps are in mm of voxel motion: the parameter scales are estimated from physical
        shift, so a rotation step moves voxels about as far as a translation step. A gentle relaxation (0.8,
        against ITK's 0.5) matters: the metric's sampling noise turns the gradient often, and halving the step at
        each turn stopped the search a few degrees short on the test phantoms.
    seed
        Seed of the metric sampling.
    threads
        ITK threads while registering. 1 (the default) makes a run bit-reproducible: ITK's Mattes metric sums its
        histogram across threads in no fixed order, so with more threads the transform varies in the 7th digit
        and the search may take a different number of iterations. None: ITK's default (faster on many cores).
    """

    initializer: Literal["moments", "geometry", "identity"] = "moments"
    bins: int = 32
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    samples: int = 50_000
    iterations: int = 200
    step_mm: float = 2.0
    min_step_mm: float = 0.001
    relaxation: float = 0.8
    seed: int = 20240115
    threads: int | None = 1

    def __post_init__(self) -> None:
        if len(self.shrink_factors) != len(self.smoothing_sigmas) or not self.shrink_factors:
            raise ValueError(f"shrink_factors {self.shrink_factors} and smoothing_sigmas {self.smoothing_sigmas} "
                             "need one value per level")
        if any(f < 1 for f in self.shrink_factors) or any(s < 0 for s in self.smoothing_sigmas):
            raise ValueError(f"shrink factors must be >= 1 and sigmas >= 0, got {self.shrink_factors}, "
                             f"{self.smoothing_sigmas}")
        if self.initializer not in ("moments", "geometry", "identity"):
            raise ValueError(f"initializer must be moments, geometry or identity, got {self.initializer!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be None or >= 1, got {self.threads}")
        if not 0 < self.relaxation < 1 or not 0 < self.min_step_mm < self.step_mm:
            raise ValueError(f"need 0 < relaxation < 1 and 0 < min_step_mm < step_mm, got {self.relaxation}, "
                             f"{self.min_step_mm}, {self.step_mm}")


@dataclass(frozen=True)
class QualityGate:
    """When a rigid registration is trusted. Every limit is checked; a result failing any is refused.

    Measures, on the PET grid after resampling the prior through the found transform:

    - ``mi_ratio`` (the main criterion): mutual information between the (one-voxel smoothed) PET and the prior
      within the PET body, over the smaller of their entropies. It asks whether the prior's internal structure
      (grey/white matter and ventricles, organs and lungs) explains the activity. Unrelated images score about 0;
      on the test phantoms and the real PET/CT a correct alignment scores 0.13-0.3 and the same images 10-20 mm
      and 9 degrees apart 0.04.
    - ``coverage``: of the PET body inside the prior's field of view, the fraction inside the prior's body (MR above
      10 % of its 99th percentile, CT above -500 HU, holes filled, grown by one PET voxel for the PET's blur).
      Activity lies inside the anatomy that emits it: a prior that slid off, or an object of another shape or
      size, leaves PET activity over its background.
    - ``overlap``: the fraction of the PET body inside the prior's field of view. Too little and there is nothing
      to judge (or the prior shows other anatomy).
    - rotation, and the shift beyond the initial alignment: patients lie in scanners alike, and the start already
      matched the body centroids; a large rotation or a long slide means the optimizer found another optimum (a
      head matched to a shoulder). Generous sanity limits, not accuracy limits.

    The metric value itself is not gated: Mattes MI depends on bins, contrasts and noise, so no one threshold fits
    MR and CT, brain and whole body. The limits are starting values set on synthetic phantoms and one real PET/CT:
    check them on the site's own data.

    Attributes
    ----------
    min_mi_ratio, min_coverage, min_overlap
        Lower limits of the measures above.
    max_rotation_deg
        Upper limit of the rotation angle (axis-angle magnitude).
    max_shift_mm
        Upper limit of the displacement of the rotation centre beyond the initial alignment.
    """

    min_mi_ratio: float = 0.08
    min_coverage: float = 0.85
    min_overlap: float = 0.25
    max_rotation_deg: float = 30.0
    max_shift_mm: float = 100.0

    def problems(self, registration: Registration) -> list[str]:
        """Why ``registration`` fails this gate (empty when it passes)."""
        r = registration
        found = []
        if r.mi_ratio < self.min_mi_ratio:
            found.append(f"normalised mutual information {r.mi_ratio:.3f} is below min_mi_ratio {self.min_mi_ratio:g} "
                         "(the prior does not explain the PET)")
        if r.coverage < self.min_coverage:
            found.append(f"only {r.coverage:.0%} of the PET body in view lies inside the prior's body (min_coverage "
                         f"{self.min_coverage:.0%})")
        if r.overlap < self.min_overlap:
            found.append(f"only {r.overlap:.0%} of the PET body lies in the prior's field of view (min_overlap "
                         f"{self.min_overlap:.0%})")
        if r.rotation_deg > self.max_rotation_deg:
            found.append(f"rotation {r.rotation_deg:.1f} deg exceeds max_rotation_deg {self.max_rotation_deg:g}")
        if r.shift_mm > self.max_shift_mm:
            found.append(f"shift {r.shift_mm:.1f} mm beyond the initial alignment exceeds max_shift_mm "
                         f"{self.max_shift_mm:g}")
        return found


@dataclass(frozen=True)
class Registration:
    """The outcome of :func:`register_rigid`.

    Attributes
    ----------
    transform
        ``sitk.Euler3DTransform`` mapping PET (fixed) points to prior (moving) points, for :func:`resample_onto`.
    metric
        Final Mattes mutual information of the optimizer (negative: lower is better; finest level, sampled).
    iterations
        Optimizer iterations over all levels.
    stop_condition
        The optimizer's words for why it stopped (last level).
    rotation_deg
        Rotation angle (axis-angle magnitude) in degrees; ``angles_deg`` the Euler angles about x, y, z.
    translation_mm
        Displacement (x, y, z) of the rotation centre, mm: the motion from PET to prior coordinates at the PET
        body's centre.
    center_mm
        The rotation centre (PET coordinates).
    shift_mm
        Length of the displacement of the centre beyond the initial alignment.
    mi_ratio, coverage, overlap
        The quality measures (see :class:`QualityGate`) at the found transform; ``initial_mi_ratio`` the first at
        the initial alignment (how much the search gained).
    ok
        True when every gate limit is met; ``reason`` says which were not ("" when ok).
    elapsed_s
        Wall time of the registration and the measures.
    """

    transform: sitk.Euler3DTransform = field(repr=False)
    metric: float
    iterations: int
    stop_condition: str
    rotation_deg: float
    angles_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    shift_mm: float
    mi_ratio: float
    initial_mi_ratio: float
    coverage: float
    overlap: float
    ok: bool = True
    reason: str = ""
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """A small JSON-friendly summary for the provenance and the logs (no timing: reruns compare equal)."""
        return {
            "metric": round(self.metric, 5),
            "iterations": self.iterations,
            "rotation_deg": round(self.rotation_deg, 3),
            "angles_deg": [round(a, 3) for a in self.angles_deg],
            "translation_mm": [round(t, 2) for t in self.translation_mm],
            "center_mm": [round(c, 2) for c in self.center_mm],
            "mi_ratio": round(self.mi_ratio, 3),
            "initial_mi_ratio": round(self.initial_mi_ratio, 3),
            "coverage": round(self.coverage, 3),
            "overlap": round(self.overlap, 3),
        }


def _coarsened(image: sitk.Image, voxel_mm: float) -> sitk.Image:
    """The image averaged over blocks of whole voxels up to ``voxel_mm`` per axis (the PET sees no finer): a
    0.98 mm CT registers as fast as a PET-sized one (a real 512 x 512 CT took 6 times longer), and block averaging
    is its own anti-aliasing."""
    factors = [max(1, int(voxel_mm // s)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _metric_image(image: sitk.Image, kind: Literal["pet", "mr", "ct"]) -> sitk.Image:
    """The image as the metric sees it: clipped to a robust range (see METRIC_CLIP_PERCENTILE)."""
    array = sitk.GetArrayViewFromImage(image)
    lo = AIR_HU if kind == "ct" else min(0.0, float(_percentile(array, 0.5)))
    hi = float(_percentile(array, METRIC_CLIP_PERCENTILE))
    return sitk.Clamp(image, sitk.sitkFloat32, lo, hi if hi > lo else lo + 1.0)


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    image.CopyInformation(like)
    return image


def _initial_transform(fixed: sitk.Image, fixed_mask: np.ndarray, moving: sitk.Image, kind: PriorKind,
                       initializer: str) -> sitk.Euler3DTransform:
    """The start of the search; its centre (the rotation centre throughout) is the PET body's centroid, except
    with "geometry" (the PET grid's centre)."""
    if initializer == "identity":
        transform = sitk.Euler3DTransform()
        if fixed_mask.any():
            centroid = np.array(ndimage.center_of_mass(fixed_mask))[::-1]  # (x, y, z) index
            transform.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(centroid.tolist()))
        return transform
    if initializer == "moments":
        moving_mask = _foreground(sitk.GetArrayViewFromImage(moving), kind)
        if fixed_mask.any() and moving_mask.any():
            return sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
                _mask_image(fixed_mask, fixed), _mask_image(moving_mask, moving), sitk.Euler3DTransform(),
                sitk.CenteredTransformInitializerFilter.MOMENTS))
        logger.debug("an empty body mask: starting from the grid centres")
    return sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY))


def _rotation_deg(transform: sitk.Euler3DTransform) -> float:
    matrix = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    return math.degrees(math.acos(float(np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0))))


def _sampling_percentages(fixed: sitk.Image, shrink_factors: Sequence[int], samples: int) -> list[float]:
    size = np.asarray(fixed.GetSize(), dtype=float)
    return [float(min(1.0, samples / float(np.prod(np.ceil(size / f))))) for f in shrink_factors]


def _measures(pet_smooth: np.ndarray, pet_mask: np.ndarray, prior: PriorImage, reference: sitk.Image,
              transform: sitk.Transform, bins: int) -> tuple[float, float, float]:
    """(mi_ratio, coverage, overlap) of the prior resampled through ``transform`` onto the ``reference`` grid
    (see :class:`QualityGate`); ``pet_smooth`` is the :func:`_smooth`-ed PET, ``pet_mask`` its body."""
    body = int(pet_mask.sum())
    inside = _field_of_view(prior, reference, transform) & pet_mask
    seen = int(inside.sum())
    if body == 0 or seen == 0:
        return 0.0, 0.0, 0.0
    resampled = resample_onto(prior, reference, transform)
    # One voxel of slack: PET blur and partial volume spread activity about a voxel beyond the body's edge.
    prior_mask = ndimage.binary_dilation(_foreground(resampled, prior.kind))
    coverage = float((prior_mask & inside).sum()) / seen
    return _normalised_mi(pet_smooth[inside], resampled[inside], bins), coverage, seen / body


def _as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The Euler transform inside what Execute returns (a composite holding it when the initial was not in place)."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1)
    return sitk.Euler3DTransform(transform)


_THREADS_LOCK = threading.Lock()


@contextmanager
def _itk_threads(threads: int | None) -> Iterator[None]:
    """ITK's global default thread count set to ``threads`` meanwhile (the metric takes its threads from there, not
    from the registration object); one registration at a time, so the previous value is restored reliably. Other
    SimpleITK work starting meanwhile in this process also gets ``threads``: slower, never different."""
    if threads is None:
        yield
        return
    with _THREADS_LOCK:
        previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def register_rigid(pet: PetVolume | sitk.Image, prior: PriorImage, *, params: RegistrationParams | None = None,
                   gate: QualityGate | None = None) -> Registration:
    """Find the rigid transform from PET to prior coordinates (another Frame of Reference) and judge it.

    Euler 3-D transform (3 rotations about the PET body's centroid, 3 translations), Mattes mutual information
    (PET and MR or CT contrasts differ: only their statistical dependence is compared), multi-resolution
    (``params.shrink_factors`` / ``smoothing_sigmas``), regular-step gradient descent with parameter scales
    estimated from physical shift, linear interpolation, seeded random metric sampling (reproducible). A prior
    much finer than the PET is block-averaged to about the PET's voxel size first (for speed); the result is
    resampled from the full-resolution prior.

    Parameters
    ----------
    pet
        The PET volume (or its image from :func:`pet_image`, possibly cropped): the fixed image.
    prior
        The MR or CT image: the moving image.
    params, gate
        Search settings and quality limits (defaults: :class:`RegistrationParams`, :class:`QualityGate`).

    Returns
    -------
    Registration
        Always returned, ``ok`` False with ``reason`` when the result fails the gate: the caller decides.

    Raises
    ------
    PriorError
        SimpleITK could not run the registration (e.g. no metric sample falls inside the prior).
    """
    params = params or RegistrationParams()
    gate = gate or QualityGate()
    start = time.perf_counter()
    fixed = sitk.Cast(pet if isinstance(pet, sitk.Image) else pet_image(pet), sitk.sitkFloat32)
    pet_smooth = _smooth(sitk.GetArrayViewFromImage(fixed))
    pet_mask = _foreground(pet_smooth, "pet", smoothed=True)
    reference = sitk.Image(fixed.GetSize(), sitk.sitkFloat32)
    reference.CopyInformation(fixed)
    moving = _coarsened(prior.image, min(fixed.GetSpacing()))
    initial = _initial_transform(fixed, pet_mask, moving, prior.kind, params.initializer)

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=params.bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(
        _sampling_percentages(fixed, params.shrink_factors, params.samples), params.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=params.step_mm, minStep=params.min_step_mm, numberOfIterations=params.iterations,
        relaxationFactor=params.relaxation, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(params.shrink_factors))
    voxel_mm = max(fixed.GetSpacing())
    method.SetSmoothingSigmasPerLevel([s * voxel_mm for s in params.smoothing_sigmas])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(sitk.Euler3DTransform(initial), inPlace=False)
    iterations = [0]

    def count() -> None:
        iterations[0] += 1

    method.AddCommand(sitk.sitkIterationEvent, count)
    try:
        with _itk_threads(params.threads):
            found = method.Execute(_metric_image(fixed, "pet"), _metric_image(moving, prior.kind))
    except RuntimeError as exc:  # e.g. "All samples map outside moving image buffer"
        raise PriorError(f"prior series {prior.series_uid}: rigid registration failed: {exc}") from exc
    transform = _as_euler(found)

    initial_mi_ratio = _measures(pet_smooth, pet_mask, prior, reference, initial, params.bins)[0]
    mi_ratio, coverage, overlap = _measures(pet_smooth, pet_mask, prior, reference, transform, params.bins)
    translation = tuple(float(v) for v in transform.GetTranslation())
    result = Registration(
        transform=transform,
        metric=float(method.GetMetricValue()),
        iterations=iterations[0],
        stop_condition=method.GetOptimizerStopConditionDescription(),
        rotation_deg=_rotation_deg(transform),
        angles_deg=tuple(math.degrees(a) for a in (transform.GetAngleX(), transform.GetAngleY(),  # type: ignore[misc]
                                                    transform.GetAngleZ())),
        translation_mm=translation,  # type: ignore[arg-type]
        center_mm=tuple(float(v) for v in transform.GetCenter()),  # type: ignore[arg-type]
        shift_mm=float(np.linalg.norm(np.subtract(translation, initial.GetTranslation()))),
        mi_ratio=mi_ratio,
        initial_mi_ratio=initial_mi_ratio,
        coverage=coverage,
        overlap=overlap,
    )
    problems = gate.problems(result)
    return replace(result, ok=not problems, reason="; ".join(problems), elapsed_s=time.perf_counter() - start)


# --- the whole step ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedPrior:
    """A prior on the PET grid, ready for the denoiser.

    Attributes
    ----------
    array
        float32 (z, y, x), the PET's shape; read-only. Outside the prior's field of view 0 (MR) or -1000 HU (CT).
    kind
        "mr" or "ct".
    series_uid, frame_of_reference_uid
        The prior series' identity (for the provenance).
    method
        "frame-of-reference" (resampled from the DICOM geometry) or "rigid-registration".
    registration
        :meth:`Registration.summary` of the registration (None for "frame-of-reference").
    field_of_view
        Fraction of the PET grid's voxels inside the prior's field of view.
    """

    array: np.ndarray = field(repr=False)
    kind: PriorKind
    series_uid: str
    frame_of_reference_uid: str
    method: Literal["frame-of-reference", "rigid-registration"]
    registration: dict[str, Any] | None
    field_of_view: float

    def provenance(self) -> dict[str, Any]:
        """What the derived series records about its prior."""
        info: dict[str, Any] = {"kind": self.kind, "series_uid": self.series_uid,
                                "frame_of_reference_uid": self.frame_of_reference_uid, "method": self.method,
                                "field_of_view": round(self.field_of_view, 3)}
        if self.registration is not None:
            info["registration"] = self.registration
        return info


def prepare_prior(volume: PetVolume, prior: PriorImage, *, registration: RegistrationMode = "auto",
                  params: RegistrationParams | None = None, gate: QualityGate | None = None) -> PreparedPrior:
    """Resample (same Frame of Reference) or register and resample (another) the prior onto the PET grid.

    Parameters
    ----------
    volume
        The PET series.
    prior
        Its MR or CT prior (:func:`read_prior_series`).
    registration
        "auto": register only when the Frames of Reference differ (or either is missing); "always": register even
        when they agree (e.g. a PET/CT with patient motion between the scans); "never": refuse a prior in another
        Frame of Reference.
    params, gate
        Registration settings and quality limits.

    Raises
    ------
    PriorError
        "never" and another Frame of Reference; the prior does not overlap the PET grid; the registration failed
        or its quality gate refused it (the message says which limit).
    """
    if registration not in ("auto", "always", "never"):
        raise PriorError(f"registration must be auto, always or never, got {registration!r}")
    reference = pet_reference(volume)
    same = same_frame_of_reference(volume.frame_of_reference_uid, prior.frame_of_reference_uid)
    if registration == "never" and not same:
        raise PriorError(
            f"prior series {prior.series_uid} is in Frame of Reference {prior.frame_of_reference_uid or 'none'!r}, "
            f"PET series {volume.series_uid} in {volume.frame_of_reference_uid or 'none'!r}; registration is "
            "'never', so it cannot be placed on the PET grid"
        )
    if same and registration != "always":
        fov = _field_of_view(prior, reference)
        fraction = float(fov.mean())
        if fraction == 0.0:
            raise PriorError(f"prior series {prior.series_uid} does not overlap PET series {volume.series_uid} "
                             "(same Frame of Reference, disjoint fields of view)")
        array = resample_onto(prior, reference)
        array.setflags(write=False)
        logger.info("PET series %s: %s prior %s resampled by Frame of Reference (%.0f%% of the PET grid in view)",
                    volume.series_uid, prior.kind.upper(), prior.series_uid, 100 * fraction)
        return PreparedPrior(array, prior.kind, prior.series_uid, prior.frame_of_reference_uid,
                             "frame-of-reference", None, fraction)

    result = register_rigid(volume, prior, params=params, gate=gate)
    logger.log(
        logging.INFO if result.ok else logging.WARNING,
        "PET series %s: %s prior %s rigid registration %s: MI ratio %.3f (initial %.3f), coverage %.2f, overlap %.2f, "
        "metric %.4f, rotation %.2f deg, translation (%.1f, %.1f, %.1f) mm, %d iterations, %.1f s%s",
        volume.series_uid, prior.kind.upper(), prior.series_uid, "accepted" if result.ok else "refused",
        result.mi_ratio, result.initial_mi_ratio, result.coverage, result.overlap, result.metric, result.rotation_deg,
        *result.translation_mm, result.iterations, result.elapsed_s, "" if result.ok else f": {result.reason}",
    )
    if not result.ok:
        raise PriorError(f"rigid registration of prior series {prior.series_uid} onto PET series "
                         f"{volume.series_uid} failed its quality gate: {result.reason}")
    array = resample_onto(prior, reference, result.transform)
    array.setflags(write=False)
    fraction = float(_field_of_view(prior, reference, result.transform).mean())
    return PreparedPrior(array, prior.kind, prior.series_uid, prior.frame_of_reference_uid, "rigid-registration",
                         result.summary(), fraction)
