"""Digital FDG phantoms for simulated training pairs: an MNI152-based brain and a parametric XCAT-like torso.

The papers train and test on phantoms: Gong et al. 2018 (``shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt``,
section III) on 19 BrainWeb brains (128 x 128 x 105 voxels of 2 mm, FDG grey / white matter) and 19 XCAT torsos
(organ sizes and genders varied, kinetic parameters with a 0.1 coefficient of variation, 12.8 to 22.4 mm lung
lesions, 3.27 mm voxels). Neither BrainWeb nor XCAT can ship here, so:

- :func:`brain_phantom` builds the anatomy from the ICBM 2009a MNI152 T1 / GM / WM templates that ship inside the
  nilearn wheel (read with nibabel from the wheel's data folder; no download, no ``fetch_*``). The templates are
  skull-stripped, so the CSF rim, skull, scalp, face and neck are added geometrically. Deep nuclei (caudate,
  putamen, thalamus) are the grey matter inside ellipsoids at fixed MNI coordinates; the inferior colliculi are
  small spheres. Variety comes from a seeded affine + smooth elastic deformation of the template, optional random
  grey:white ratios, lesion placement and a smooth activity texture.
- :func:`torso_phantom` paints analytic shapes (ellipsoids, tubes, elliptic cylinders) into a trunk from the neck
  to the femoral heads: body with subcutaneous fat, lungs, heart (blood pool and left-ventricular myocardium),
  aorta, liver, spleen, kidneys, bladder, spine, ribs, sternum, pelvis. Variety: seeded body size, habitus, organ
  sizes / positions and activities (coefficient of variation ``variability``, 0.1 as in Gong 2018).

Both are piecewise constant per label (as the discrete BrainWeb model used for PET simulation), so a region's
mean is exactly the value asked for (also with ``texture``, which is normalised per label).

Conventions
-----------
Arrays are float32 (labels int16), axes (z, y, x) with ``voxel_mm`` = (dz, dy, dx). Patient axes follow DICOM
LPS with identity orientation: x (columns) increases towards the patient's left, y (rows) towards posterior, z
(slices) towards superior; so ``imshow(volume[k])`` is the usual radiological axial view (anterior up, patient
right on the image's left). Positions (``Lesion.centre_mm``, ``LesionSpec.centre_mm``) are (z, y, x) in mm from
the centre of the volume: ``index = centre_mm / voxel_mm + (shape - 1) / 2`` (:meth:`Phantom.index_of`).

Activity scale
--------------
``activity`` is the activity concentration in kBq/ml at scan start of a standard FDG study: SUV-like value times
:data:`KBQ_PER_SUV` (370 MBq injected, 75 kg, 60 min uptake, decay to scan start: 3.378 kBq/ml per SUV), i.e.
``SUV = activity * phantom.suv_per_unit``. Brain (SUV): white matter 2.5, grey matter 2.5 x ``gm_wm_ratio``
(default 4, so 10), deep nuclei and colliculi ``nuclei_ratio`` (1.15) x grey matter, CSF and skull 0.1, soft
tissue 0.7. Torso: :data:`TORSO_SUV`.

Label legend (:data:`LABELS`; ``phantom.legend`` lists those a phantom can contain)
------------------------------------------------------------------------------------
0 background (air); brain: 1 csf, 2 grey_matter (cortical and cerebellar), 3 white_matter (with brainstem),
4 caudate, 5 putamen, 6 thalamus, 7 colliculus (inferior colliculi), 8 skull; shared: 20 soft_tissue (muscle,
scalp, face, neck, organs not modelled), 26 bone; torso: 21 fat, 22 lung, 23 liver, 24 myocardium, 25 blood
(heart cavities, aorta), 27 kidney, 28 bladder, 29 spleen; lesion ``i`` (0-based, order of ``phantom.lesions``) is
``LESION_LABEL_BASE + i`` = 100 + i. Masks for metrics: :meth:`Phantom.mask` (a label name or a group of
:data:`MASK_GROUPS`: ``body``, ``brain``, ``deep_nuclei``, ``hot_nuclei``, ``lesions``, ...).

Lesions (:class:`LesionSpec` in, :class:`Lesion` out): uniform spheres (voxels at least half inside), activity
``contrast`` x the host tissue at the centre; a count draws random ones (brain: none by default, 8-20 mm; torso: 4
by default, 10-22 mm, in lung or liver). Shown in the prior unless ``mismatch`` (MR: T1 x 0.6; CT: a 30 HU nodule
in lung, 25 HU hypodense elsewhere, also in the mu-map); PET-only lesions leave prior and mu-map untouched.

Random streams: one seed drives independent streams for anatomy, values, lesions and texture, so the same seed with
and without lesions gives the same anatomy (a lesion-only difference image, as Gong 2018 does for its tumour).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from training import TrainingError

logger = logging.getLogger(__name__)

__all__ = [
    "BRAIN_FOV_MM",
    "KBQ_PER_SUV",
    "LABELS",
    "LESION_LABEL_BASE",
    "MASK_GROUPS",
    "MU_BONE",
    "MU_SOFT",
    "TORSO_CT_HU",
    "TORSO_FOV_MM",
    "TORSO_SUV",
    "Lesion",
    "LesionSpec",
    "Phantom",
    "PhantomError",
    "brain_phantom",
    "hu_to_mu",
    "torso_phantom",
]

# Standard FDG study (same as training.simulate): 370 MBq, 75 kg, scan 60 min after injection, F-18 half-life.
_DOSE_BQ, _WEIGHT_G, _UPTAKE_S, _HALF_LIFE_S = 3.7e8, 75_000.0, 3600.0, 6586.2
KBQ_PER_SUV: float = _DOSE_BQ * 2.0 ** (-_UPTAKE_S / _HALF_LIFE_S) / _WEIGHT_G / 1000.0  # 3.378 kBq/ml per SUV

LABELS: dict[str, int] = {
    "background": 0,
    "csf": 1,
    "grey_matter": 2,
    "white_matter": 3,
    "caudate": 4,
    "putamen": 5,
    "thalamus": 6,
    "colliculus": 7,
    "skull": 8,
    "soft_tissue": 20,
    "fat": 21,
    "lung": 22,
    "liver": 23,
    "myocardium": 24,
    "blood": 25,
    "bone": 26,
    "kidney": 27,
    "bladder": 28,
    "spleen": 29,
}
LESION_LABEL_BASE = 100
_BRAIN_LABELS = ("background", "csf", "grey_matter", "white_matter", "caudate", "putamen", "thalamus",
                 "colliculus", "skull", "soft_tissue", "bone")
_TORSO_LABELS = ("background", "soft_tissue", "fat", "lung", "liver", "myocardium", "blood", "bone", "kidney",
                 "bladder", "spleen")
MASK_GROUPS: dict[str, tuple[str, ...]] = {
    "brain": ("grey_matter", "white_matter", "caudate", "putamen", "thalamus", "colliculus"),
    "deep_nuclei": ("caudate", "putamen", "thalamus"),
    "hot_nuclei": ("caudate", "putamen", "thalamus", "colliculus"),
    "striatum": ("caudate", "putamen"),
    "intracranial": ("csf", "grey_matter", "white_matter", "caudate", "putamen", "thalamus", "colliculus"),
    "heart": ("myocardium", "blood"),
    "bones": ("skull", "bone"),
}  # plus "body" (every non-zero label) and "lesions" (every lesion label), see Phantom.mask

BRAIN_FOV_MM = (210.0, 256.0, 256.0)  # default field of view (z, y, x): Gong 2018's 105 x 128 x 128 at 2 mm
TORSO_FOV_MM = (600.0, 512.0, 512.0)  # the trunk, femoral heads to neck; 150 x 128 x 128 at 4 mm
_BRAIN_CENTRE_MNI = np.array([0.0, -18.0, 10.0])  # MNI (RAS) point at the centre of the volume
_TORSO_SPAN = (-350.0, 250.0)  # anatomical z extent of the torso (z = 0 is the right diaphragm dome)

# Brain SUV-like values (white matter and grey matter come from wm_suv and gm_wm_ratio).
_BRAIN_SUV = {"csf": 0.1, "skull": 0.1, "soft_tissue": 0.7, "bone": 0.5, "background": 0.0}
# Attenuation at 511 keV in 1/mm: soft tissue / brain 0.0096 (water), skull 0.0151 (cortical + diploe).
MU_SOFT, MU_BONE = 0.0096, 0.0151
# T1 intensities (template scale 0..1) of what the skull-stripped template lacks.
_T1_SYNTH = {"csf": 0.08, "skull": 0.06, "bone": 0.15, "soft_tissue": 0.45, "background": 0.0}

TORSO_SUV: dict[str, float] = {
    "soft_tissue": 1.0, "fat": 0.4, "lung": 0.3, "liver": 2.5, "myocardium": 6.0, "blood": 1.8, "bone": 1.5,
    "kidney": 4.0, "bladder": 15.0, "spleen": 2.0, "background": 0.0,
}
# With variability > 0 these are drawn uniformly from a range (FDG myocardial uptake and urine vary most).
_TORSO_SUV_RANGE = {"myocardium": (4.0, 8.0), "bladder": (10.0, 20.0)}
TORSO_CT_HU: dict[str, float] = {
    "soft_tissue": 40.0, "fat": -100.0, "lung": -800.0, "liver": 60.0, "myocardium": 45.0, "blood": 40.0,
    "bone": 750.0, "kidney": 35.0, "bladder": 10.0, "spleen": 50.0, "background": -1000.0,
}
_HU_LESION = {"lung": 30.0}  # a solid nodule; elsewhere a lesion is 25 HU below its host (hypodense)

# Random lesion ranges: torso 10-22 mm (Gong 2018: 12.8-22.4 mm), lung lesions as SUV, others as contrast.
_BRAIN_LESION_DIAMETER, _BRAIN_LESION_CONTRAST = (8.0, 20.0), (1.5, 4.0)
_TORSO_LESION_DIAMETER, _TORSO_LESION_CONTRAST = (10.0, 22.0), (1.5, 3.0)
_LUNG_LESION_SUV = (2.0, 6.0)
_MR_LESION_FACTOR = 0.6  # a lesion shown in the MR prior is hypointense on T1

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Deep nuclei: MNI (RAS) centre, semi-axes (x, y, z) mm and rotation about x (deg, + tilts the front up), per side.
_NUCLEI: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "caudate": ((13.0, 10.0, 11.0), (6.0, 15.0, 10.0), 25.0),
    "putamen": ((25.0, 3.0, 2.0), (6.5, 16.0, 11.0), 0.0),
    "thalamus": ((11.0, -18.0, 7.0), (8.5, 14.0, 9.5), 0.0),
}
_COLLICULUS = ((5.0, -37.0, -10.0), 3.0)  # inferior colliculi: MNI centre (+-x), radius mm


class PhantomError(TrainingError, ValueError):
    """A phantom cannot be built as asked (bad size, lesion outside the body, missing template)."""


@dataclass(frozen=True)
class LesionSpec:
    """A lesion to insert.

    Parameters
    ----------
    diameter_mm : float
        Sphere diameter.
    contrast : float
        Lesion activity / activity of its host tissue (the label at its centre); the sphere is uniform. Exactly 1
        leaves PET untouched (with ``present_in_prior`` an MR/CT-only lesion); < 1 is a cold lesion.
    centre_mm : tuple of float or None
        (z, y, x) mm from the centre of the volume; None places it at random (seeded) inside ``region``.
    region : str or None
        Host for random placement: a label name or ``"brain"`` (default brain) / ``"lung"`` or ``"liver"``
        (default torso: either).
    present_in_prior : bool or None
        Whether the MR (hypointense) / CT (nodule, hypodense) prior shows it; None follows ``mismatch``.
    """

    diameter_mm: float
    contrast: float = 3.0
    centre_mm: tuple[float, float, float] | None = None
    region: str | None = None
    present_in_prior: bool | None = None


@dataclass(frozen=True)
class Lesion:
    """A lesion as inserted: where, how big, how hot, and its label (``LESION_LABEL_BASE + index``)."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    contrast: float
    present_in_prior: bool
    region: str
    label: int
    activity: float
    n_voxels: int

    @property
    def present_in_mr(self) -> bool:
        """Alias of ``present_in_prior`` (the contract's name for brain phantoms)."""
        return self.present_in_prior


@dataclass(frozen=True, eq=False)
class Phantom:
    """One phantom: activity, anatomical prior, attenuation and labels on one (z, y, x) grid.

    Attributes
    ----------
    kind : str
        ``"brain"`` or ``"torso"``.
    activity : ndarray
        float32 kBq/ml (module docstring, "Activity scale").
    mu_map : ndarray
        float32 linear attenuation at 511 keV, 1/mm.
    labels : ndarray
        int16 label map (:data:`LABELS`, lesions ``100 + i``).
    voxel_mm : tuple of float
        (dz, dy, dx).
    mr_t1, ct_hu : ndarray or None
        The prior: T1 (template scale, about 0..1) for the brain, CT in HU for the torso.
    lesions : tuple of Lesion
    seed : int
    kbq_per_suv : float
        Activity scale; ``suv_per_unit`` is its inverse (what ``training.simulate`` reads).
    params : dict
        Every value drawn or used (ratios, SUVs, deformation), for provenance.
    """

    kind: str
    activity: np.ndarray
    mu_map: np.ndarray
    labels: np.ndarray
    voxel_mm: tuple[float, float, float]
    mr_t1: np.ndarray | None = None
    ct_hu: np.ndarray | None = None
    lesions: tuple[Lesion, ...] = ()
    seed: int = 0
    kbq_per_suv: float = KBQ_PER_SUV
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(nz, ny, nx)."""
        return tuple(int(n) for n in self.activity.shape)  # type: ignore[return-value]

    @property
    def suv_per_unit(self) -> float:
        """SUV of one activity unit (``SUV = activity * suv_per_unit``)."""
        return 1.0 / self.kbq_per_suv

    @property
    def prior(self) -> np.ndarray | None:
        """The anatomical prior, whichever kind."""
        return self.mr_t1 if self.mr_t1 is not None else self.ct_hu

    @property
    def prior_kind(self) -> str | None:
        """``"mr"``, ``"ct"`` or None."""
        return "mr" if self.mr_t1 is not None else "ct" if self.ct_hu is not None else None

    @property
    def legend(self) -> dict[str, int]:
        """Label name -> value for every label this kind of phantom can hold, plus ``lesion_<i>``."""
        names = _BRAIN_LABELS if self.kind == "brain" else _TORSO_LABELS
        legend = {name: LABELS[name] for name in names}
        legend.update({f"lesion_{i}": les.label for i, les in enumerate(self.lesions)})
        return legend

    def mask(self, *names: str) -> np.ndarray:
        """Boolean mask of the union of label names, groups (:data:`MASK_GROUPS`), ``body`` and ``lesions``.

        Organ masks exclude lesions inside them (lesions have their own labels).
        """
        if not names:
            raise PhantomError("mask() needs at least one name")
        out = np.zeros(self.labels.shape, dtype=bool)
        for name in names:
            if name == "body":
                out |= self.labels != 0
            elif name == "lesions":
                out |= self.labels >= LESION_LABEL_BASE
            elif name in MASK_GROUPS:
                out |= np.isin(self.labels, [LABELS[n] for n in MASK_GROUPS[name]])
            elif name in LABELS:
                out |= self.labels == LABELS[name]
            else:
                raise PhantomError(f"unknown mask {name!r}: {_did_you_mean(name, _mask_names())}")
        return out

    def index_of(self, centre_mm: Sequence[float]) -> tuple[float, float, float]:
        """Fractional (z, y, x) voxel index of a (z, y, x) position in mm from the volume centre."""
        idx = [c / v + (n - 1) / 2.0 for c, v, n in zip(centre_mm, self.voxel_mm, self.shape)]
        return (idx[0], idx[1], idx[2])

    def lesion_mask(self, index: int) -> np.ndarray:
        """Mask of lesion ``index`` (as painted: a later overlapping lesion wins)."""
        if not 0 <= index < len(self.lesions):
            raise PhantomError(f"lesion index {index} out of range: the phantom has {len(self.lesions)}")
        return self.labels == self.lesions[index].label


# ------------------------------------------------------------------------------------------------ helpers


def _mask_names() -> list[str]:
    return ["body", "lesions", *MASK_GROUPS, *LABELS]


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else f"choose from {sorted(choices)}"


def hu_to_mu(hu: np.ndarray | float) -> np.ndarray:
    """CT number -> attenuation at 511 keV (1/mm), bilinear: water 0.0096, air 0, 1000 HU -> 0.0172 (cortical bone).

    Below 0 HU a water/air mix; above, the bone slope (as the bilinear CT-AC conversions, e.g. Kinahan 1998).
    """
    hu = np.asarray(hu, dtype=np.float32)
    mu = np.where(hu <= 0, MU_SOFT * (1.0 + hu / 1000.0), MU_SOFT + hu * (0.0172 - MU_SOFT) / 1000.0)
    return np.clip(mu, 0.0, None).astype(np.float32)


def _voxel(voxel_mm: float | Sequence[float]) -> tuple[float, float, float]:
    v = (voxel_mm,) * 3 if isinstance(voxel_mm, (int, float)) else tuple(voxel_mm)
    if len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v):
        raise PhantomError(f"voxel_mm must be a positive number or 3 positive numbers (dz, dy, dx), got {voxel_mm!r}")
    return (float(v[0]), float(v[1]), float(v[2]))


def _shape(shape: Sequence[int] | None, voxel: tuple[float, float, float],
           fov: tuple[float, float, float]) -> tuple[int, int, int]:
    if shape is None:
        return tuple(max(1, math.ceil(f / v - 1e-6)) for f, v in zip(fov, voxel))  # type: ignore[return-value]
    s = tuple(shape)
    if len(s) != 3 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in s):
        raise PhantomError(f"shape must be 3 positive integers (z, y, x) or None, got {shape!r}")
    if math.prod(int(n) for n in s) > 600_000_000:
        raise PhantomError(f"shape {s} is too large (> 6e8 voxels)")
    return (int(s[0]), int(s[1]), int(s[2]))


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators per purpose, so switching lesions on does not change the anatomy."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    names = ("anatomy", "values", "lesions", "texture")
    children = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children)}


def _draw(value: float | Sequence[float], rng: np.random.Generator, name: str) -> float:
    """A number, or uniform in a (low, high) range."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise PhantomError(f"{name} must be > 0, got {value!r}")
        return float(value)
    lo_hi = tuple(value)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] or not math.isfinite(lo_hi[1]):
        raise PhantomError(f"{name} must be a positive number or a (low, high) range, got {value!r}")
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _rotation(deg_x: float = 0.0, deg_y: float = 0.0, deg_z: float = 0.0) -> np.ndarray:
    """Rotation matrix (x, y, z) = Rz @ Ry @ Rx, angles in degrees."""
    ax, ay, az = np.radians([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


_Region = tuple[tuple[slice, slice, slice], np.ndarray]


class _Canvas:
    """A (z, y, x) grid with mm coordinates (x, y, z) centred on the volume (+ an anatomical offset).

    Shapes are evaluated only inside their bounding box, which keeps painting dozens of organs cheap.
    """

    def __init__(self, shape: tuple[int, int, int], voxel: tuple[float, float, float],
                 offset_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self.shape, self.voxel = shape, voxel
        self.offset_zyx = np.array([offset_xyz[2], offset_xyz[1], offset_xyz[0]])
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * v + o for n, v, o in zip(shape, voxel, self.offset_zyx)]

    def xyz_of(self, zyx_rel: Sequence[float]) -> np.ndarray:
        """Canvas (x, y, z) of a (z, y, x) position in mm from the volume centre."""
        return np.array([zyx_rel[2], zyx_rel[1], zyx_rel[0]], dtype=float) + self.offset_zyx[::-1]

    def grids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable X (1,1,nx), Y (1,ny,1), Z (nz,1,1) of the whole volume."""
        return (self.axes[2][None, None, :], self.axes[1][None, :, None], self.axes[0][:, None, None])

    def box(self, centre: Sequence[float], half: Sequence[float]
            ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        slices = []
        coords = []
        for axis, c, h in ((0, centre[2], half[2]), (1, centre[1], half[1]), (2, centre[0], half[0])):
            ax = self.axes[axis]
            lo, hi = int(np.searchsorted(ax, c - h, "left")), int(np.searchsorted(ax, c + h, "right"))
            if hi <= lo:
                return None
            slices.append(slice(lo, hi))
            coords.append(ax[lo:hi])
        return (tuple(slices), coords[2][None, None, :], coords[1][None, :, None],  # type: ignore[return-value]
                coords[0][:, None, None])

    def ellipsoid(self, centre: Sequence[float], semi: Sequence[float],
                  rotation: np.ndarray | None = None) -> _Region | None:
        """Voxels whose centre lies inside the ellipsoid (semi-axes along the rotated local axes)."""
        half = semi if rotation is None else (max(semi),) * 3
        found = self.box(centre, half)
        if found is None:
            return None
        sl, x, y, z = found
        d = (x - centre[0], y - centre[1], z - centre[2])
        r = np.eye(3) if rotation is None else rotation
        acc = 0.0
        for k in range(3):  # local coordinate k = column k of R dotted with the offset
            local = r[0, k] * d[0] + r[1, k] * d[1] + r[2, k] * d[2]
            acc = acc + (local / semi[k]) ** 2
        return sl, np.broadcast_to(acc <= 1.0, tuple(s.stop - s.start for s in sl))

    def sphere(self, centre: Sequence[float], radius: float, oversample: int = 4) -> _Region | None:
        """Voxels at least half inside the sphere (``oversample``^3 sub-samples per voxel), so the voxel count
        tracks the sphere's volume also for lesions only a few voxels across."""
        half_vox = np.array([self.voxel[2], self.voxel[1], self.voxel[0]]) / 2.0
        found = self.box(centre, radius + half_vox)
        if found is None:
            return None
        sl, x, y, z = found
        offsets = (np.arange(oversample) + 0.5) / oversample - 0.5  # sub-sample positions in voxel units
        inside = np.zeros(tuple(s.stop - s.start for s in sl), dtype=np.float32)
        for oz in offsets:
            dz2 = (z + oz * self.voxel[0] - centre[2]) ** 2
            for oy in offsets:
                dy2 = (y + oy * self.voxel[1] - centre[1]) ** 2
                for ox in offsets:
                    inside += (x + ox * self.voxel[2] - centre[0]) ** 2 + dy2 + dz2 <= radius**2
        return sl, inside >= 0.5 * oversample**3

    def tube(self, p0: Sequence[float], p1: Sequence[float], radius: float) -> _Region | None:
        """Voxels within ``radius`` of the segment p0-p1 (capsule)."""
        a, b = np.asarray(p0, float), np.asarray(p1, float)
        lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
        found = self.box((lo + hi) / 2, (hi - lo) / 2)
        if found is None:
            return None
        sl, x, y, z = found
        ab = b - a
        denom = float(ab @ ab) or 1.0
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom, 0.0, 1.0)
        dist2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        return sl, dist2 <= radius**2


def _paint(labels: np.ndarray, region: _Region | None, label: int,
           into: Collection[int] | None = None, where: np.ndarray | None = None) -> None:
    """Set ``label`` inside ``region``, only over labels in ``into`` (None: anywhere) and where ``where`` holds."""
    if region is None:
        return
    sl, mask = region
    sub = labels[sl]
    m = mask if into is None else mask & np.isin(sub, list(into))
    if where is not None:
        m = m & where[sl]
    sub[m] = label


def _hat_weights(n_target: int, step_target: float, n_coarse: int, step_coarse: float) -> np.ndarray:
    """Linear interpolation matrix (n_target x n_coarse) between two centred 1-D grids."""
    pt = (np.arange(n_target) - (n_target - 1) / 2.0) * step_target
    pc = (np.arange(n_coarse) - (n_coarse - 1) / 2.0) * step_coarse
    return np.clip(1.0 - np.abs(pt[:, None] - pc[None, :]) / step_coarse, 0.0, None)


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], voxel: tuple[float, float, float],
                   n: int, scale_mm: float) -> list[np.ndarray]:
    """``n`` smooth random fields on the grid, unit RMS, correlation length about ``scale_mm``.

    White noise on a coarse grid (spacing scale/2.5), Gaussian-smoothed there and interpolated separably: cheap
    at any matrix size and independent of the voxel size for a given seed and field of view.
    """
    step = scale_mm / 2.5
    nc = [math.ceil(s * v / step) + 4 for s, v in zip(shape, voxel)]
    weights = [_hat_weights(s, v, c, step) for s, v, c in zip(shape, voxel, nc)]
    out = []
    for _ in range(n):
        coarse = ndimage.gaussian_filter(rng.standard_normal(nc), sigma=2.5 / 2.0, mode="wrap")
        coarse /= float(np.sqrt(np.mean(coarse**2))) or 1.0
        fine = np.einsum("ai,bj,ck,ijk->abc", weights[0], weights[1], weights[2], coarse, optimize=True)
        out.append(fine.astype(np.float32))
    return out


def _apply_texture(activity: np.ndarray, labels: np.ndarray, amplitude: float, rng: np.random.Generator,
                   voxel: tuple[float, float, float]) -> None:
    """Multiply tissue activity by a smooth field (relative STD ``amplitude``), rescaled per label to mean 1."""
    if amplitude <= 0:
        return
    (noise,) = _smooth_fields(rng, labels.shape, voxel, 1, scale_mm=12.0)  # type: ignore[arg-type]
    fld = np.clip(1.0 + amplitude * noise, 0.2, None)
    flat = labels.ravel().astype(np.int64)
    sums = np.bincount(flat, weights=fld.ravel())
    counts = np.bincount(flat)
    means = np.divide(sums, counts, out=np.ones_like(sums), where=counts > 0)
    fld /= means[labels].astype(np.float32)
    tissue = (labels > 0) & (labels < LESION_LABEL_BASE)
    activity[tissue] *= fld[tissue]


# -------------------------------------------------------------------------------------------------- lesions


def _lesion_specs(lesions: int | Sequence[LesionSpec], rng: np.random.Generator, kind: str,
                  mismatch: bool) -> list[LesionSpec]:
    """Turn a count into random specs; check given specs; a mismatch phantom gets at least one lesion."""
    if isinstance(lesions, bool):
        raise PhantomError(f"lesions must be a count or a sequence of LesionSpec, got {lesions!r}")
    if isinstance(lesions, (int, np.integer)):
        if lesions < 0:
            raise PhantomError(f"lesions must be >= 0, got {lesions}")
        specs: list[LesionSpec] = []
        for _ in range(int(lesions) or int(mismatch)):
            if kind == "brain":
                specs.append(LesionSpec(float(rng.uniform(*_BRAIN_LESION_DIAMETER)),
                                        float(rng.uniform(*_BRAIN_LESION_CONTRAST))))
            else:
                specs.append(LesionSpec(float(rng.uniform(*_TORSO_LESION_DIAMETER)), float("nan"),
                                        region=str(rng.choice(["lung", "liver"]))))
        return specs
    specs = list(lesions)
    for i, s in enumerate(specs):
        if not isinstance(s, LesionSpec):
            raise PhantomError(f"lesions[{i}] must be a LesionSpec, got {type(s).__name__}")
        if not (math.isfinite(s.diameter_mm) and s.diameter_mm > 0):
            raise PhantomError(f"lesions[{i}].diameter_mm must be > 0, got {s.diameter_mm!r}")
        if not (math.isfinite(s.contrast) and s.contrast > 0):
            raise PhantomError(f"lesions[{i}].contrast must be > 0, got {s.contrast!r}")
        if s.centre_mm is not None and (len(s.centre_mm) != 3 or not all(math.isfinite(c) for c in s.centre_mm)):
            raise PhantomError(f"lesions[{i}].centre_mm must be (z, y, x) mm, got {s.centre_mm!r}")
    if mismatch and not specs:
        specs.append(LesionSpec(float(rng.uniform(*_BRAIN_LESION_DIAMETER if kind == "brain"
                                                  else _TORSO_LESION_DIAMETER)),
                                float(rng.uniform(*_BRAIN_LESION_CONTRAST if kind == "brain"
                                                  else _TORSO_LESION_CONTRAST))))
    return specs


def _region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    if region in MASK_GROUPS:
        return np.isin(labels, [LABELS[n] for n in MASK_GROUPS[region]])
    if region in LABELS and region != "background":
        return labels == LABELS[region]
    raise PhantomError(f"unknown lesion region {region!r}: {_did_you_mean(region, [*MASK_GROUPS, *LABELS])}")


def _insert_lesions(specs: Sequence[LesionSpec], *, labels: np.ndarray, activity: np.ndarray,
                    base_suv: Mapping[int, float], canvas: _Canvas, rng: np.random.Generator, kind: str,
                    mismatch: bool, kbq_per_suv: float) -> list[Lesion]:
    """Place and paint lesions into ``labels`` / ``activity`` (uniform, ``contrast`` x host activity)."""
    voxel = np.array(canvas.voxel)
    half = (np.array(labels.shape) - 1) / 2.0 * voxel  # volume centre in array mm
    placed: list[tuple[np.ndarray, float]] = []  # (centre mm, radius): random lesions keep apart
    inside_dist: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per region, computed once
    tissue_labels = labels.copy()  # hosts are looked up in the lesion-free map
    body = tissue_labels != 0
    found: list[Lesion] = []
    for i, spec in enumerate(specs):
        radius = spec.diameter_mm / 2.0
        if spec.centre_mm is not None:
            centre = np.asarray(spec.centre_mm, dtype=float)
            idx = np.round((centre + half) / voxel).astype(int)
            if np.any(idx < 0) or np.any(idx >= labels.shape) or not body[tuple(idx)]:
                raise PhantomError(f"lesion {i} centre {tuple(spec.centre_mm)} mm (z, y, x from the volume centre) "
                                   f"is outside the body or the volume {labels.shape} x {canvas.voxel} mm")
        else:
            choices = [spec.region] if spec.region else ["brain"] if kind == "brain" else ["lung", "liver"]
            centre = None
            for reg in [str(c) for c in rng.permutation(choices)]:
                if reg not in inside_dist:
                    inside_dist[reg] = _inside_distance(_region_mask(tissue_labels, reg), canvas.voxel)
                dist, origin = inside_dist[reg]
                centre = _random_centre(dist, origin, radius, placed, voxel, half, rng)
                if centre is not None:
                    break
            if centre is None:
                raise PhantomError(f"no room for lesion {i} ({spec.diameter_mm:g} mm) in {' or '.join(choices)} "
                                   f"within this field of view")
        host_label = int(tissue_labels[tuple(np.round((centre + half) / voxel).astype(int))])
        host = next((n for n, v in LABELS.items() if v == host_label), "soft_tissue")
        host_suv = float(base_suv.get(host_label, 0.0))
        contrast = spec.contrast
        if math.isnan(contrast):  # random torso lesion: lung lesions by SUV, others by contrast
            contrast = (float(rng.uniform(*_LUNG_LESION_SUV)) / host_suv if host == "lung" and host_suv > 0
                        else float(rng.uniform(*_TORSO_LESION_CONTRAST)))
        in_prior = spec.present_in_prior if spec.present_in_prior is not None else not mismatch
        label = LESION_LABEL_BASE + i
        _paint(labels, canvas.sphere(canvas.xyz_of(centre), radius), label, where=body)
        placed.append((centre, radius))
        found.append(Lesion(centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                            diameter_mm=float(spec.diameter_mm), contrast=float(contrast),
                            present_in_prior=bool(in_prior), region=host, label=label,
                            activity=float(contrast * host_suv * kbq_per_suv), n_voxels=0))
    result = []
    for les in found:  # after all painting: an explicit lesion may overlap an earlier one
        m = labels == les.label
        if les.contrast != 1.0:  # contrast 1: invisible in PET, even where the sphere leaves its host tissue
            activity[m] = les.activity
        result.append(dataclasses.replace(les, n_voxels=int(np.count_nonzero(m))))
    return result


def _inside_distance(region: np.ndarray, voxel: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from each region voxel to the nearest voxel outside the region or the volume.

    Computed on the region's bounding box padded with one outside voxel (so the field of view's edge counts as an
    edge, and a big volume costs what the region costs); returns the distances and the box's origin index.
    """
    if not region.any():
        return np.zeros((0, 0, 0)), np.zeros(3, dtype=int)
    lo = [int(np.flatnonzero(region.any(axis=tuple(j for j in range(3) if j != i)))[0]) for i in range(3)]
    hi = [int(np.flatnonzero(region.any(axis=tuple(j for j in range(3) if j != i)))[-1]) + 1 for i in range(3)]
    box = np.pad(region[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)
    dist = ndimage.distance_transform_edt(box, sampling=voxel)
    return dist, np.array(lo) - 1


def _random_centre(dist: np.ndarray, origin: np.ndarray, radius: float,
                   placed: Sequence[tuple[np.ndarray, float]], voxel: np.ndarray, half: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray | None:
    """A voxel centre (mm from the volume centre) in the region, the sphere inside it if possible, apart from
    lesions already placed."""
    for need in (radius, 0.6 * radius, 0.0):
        cand = np.argwhere(dist > need)
        if len(cand) == 0:
            continue
        for j in rng.permutation(len(cand))[:200]:
            c = (cand[j] + origin) * voxel - half
            if all(np.linalg.norm(c - p) > radius + r + 2.0 for p, r in placed):
                return c.astype(float)
    return None


# ---------------------------------------------------------------------------------------------------- brain


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # locate the wheel without importing nilearn (slow, not needed)
    if spec is None or spec.origin is None:
        raise PhantomError("the brain phantom needs the MNI152 templates inside nilearn: pip install nilearn")
    return Path(spec.origin).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def _template_raw() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The 1 mm templates as uint8 (x, y, z) arrays and their affine (index -> MNI RAS mm)."""
    try:
        import nibabel
    except ImportError as exc:  # nibabel comes with nilearn
        raise PhantomError("the brain phantom needs nibabel (installed with nilearn)") from exc
    folder = _template_dir()
    maps: dict[str, np.ndarray] = {}
    affine = None
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise PhantomError(f"MNI152 template {name} not found in {folder} (nilearn too old or damaged?)")
        img = nibabel.load(path)
        maps[key] = np.asarray(img.dataobj)
        if affine is None:
            affine = np.asarray(img.affine, dtype=float)
        elif not np.allclose(affine, img.affine):
            raise PhantomError(f"MNI152 template {name} is not on the T1 template's grid")
    assert affine is not None
    return maps, affine


@lru_cache(maxsize=4)
def _template_reduced(factors: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Block means over ``factors`` voxels (partial-volume fractions at the target's resolution; anti-aliasing)."""
    raw, _ = _template_raw()
    out = {}
    for key in ("t1", "gm", "wm", "mask"):
        a = (raw["t1"] > 0).astype(np.float32) if key == "mask" else raw[key].astype(np.float32) / 255.0
        if factors != (1, 1, 1):
            pad = [(0, (-n) % f) for n, f in zip(a.shape, factors)]
            a = np.pad(a, pad)
            s = a.shape
            a = a.reshape(s[0] // factors[0], factors[0], s[1] // factors[1], factors[1],
                          s[2] // factors[2], factors[2]).mean(axis=(1, 3, 5))
        out[key] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def brain_phantom(
    shape: Sequence[int] | None = None,
    voxel_mm: float | Sequence[float] = (2.0, 2.0, 2.0),
    *,
    seed: int = 0,
    gm_wm_ratio: float | Sequence[float] = 4.0,
    nuclei_ratio: float = 1.15,
    wm_suv: float = 2.5,
    lesions: int | Sequence[LesionSpec] = (),
    mismatch: bool = False,
    deform: bool = True,
    deform_strength: float = 1.0,
    texture: float = 0.0,
    kbq_per_suv: float = KBQ_PER_SUV,
) -> Phantom:
    """An FDG brain with a T1 prior, from the MNI152 templates in nilearn's wheel.

    Parameters
    ----------
    shape : (z, y, x) or None
        Matrix; None covers :data:`BRAIN_FOV_MM` (210 x 256 x 256 mm). The head is centred (MNI (0, -18, 10)).
    voxel_mm : float or (dz, dy, dx)
    seed : int
        Drives deformation, drawn ratios, lesion placement and texture (independent streams).
    gm_wm_ratio : float or (low, high)
        Grey:white activity ratio (default 4); a range is sampled per seed.
    nuclei_ratio : float
        Deep nuclei and inferior colliculi relative to cortical grey matter (hot spots for peak-to-valley).
    wm_suv : float
        White matter SUV.
    lesions : int or sequence of LesionSpec
        A count of random lesions (8-20 mm, contrast 1.5-4 vs host) or explicit specs.
    mismatch : bool
        Lesions whose ``present_in_prior`` is None are left out of the MR (PET-only lesions); with no lesions
        asked, one random lesion is added.
    deform : bool
        Seeded random affine (rotations ~3 deg, scales ~4 %, shifts ~2 mm) + smooth elastic (~2 mm RMS, 20 mm
        correlation) deformation of the template; ``deform_strength`` scales all of it.
    texture : float
        Relative STD of a smooth multiplicative activity texture (0: uniform regions), mean kept per label.
    kbq_per_suv : float
        Activity scale (module docstring).

    Returns
    -------
    Phantom
        kind ``"brain"``, ``mr_t1`` prior (template intensity scale 0..1).
    """
    voxel = _voxel(voxel_mm)
    shp = _shape(shape, voxel, BRAIN_FOV_MM)
    rngs = _streams(seed)
    ratio = _draw(gm_wm_ratio, rngs["values"], "gm_wm_ratio")
    for name, val in (("nuclei_ratio", nuclei_ratio), ("wm_suv", wm_suv), ("kbq_per_suv", kbq_per_suv)):
        _draw(val, rngs["values"], name)  # validation only
    if texture < 0 or deform_strength < 0:
        raise PhantomError("texture and deform_strength must be >= 0")
    canvas = _Canvas(shp, voxel)

    # Target voxel -> MNI (RAS): LPS flips x and y; then the random affine + elastic warp about the head centre.
    x, y, z = canvas.grids()
    ras = [np.broadcast_to(a, shp).astype(np.float32) for a in (-x + _BRAIN_CENTRE_MNI[0],
                                                                 -y + _BRAIN_CENTRE_MNI[1],
                                                                 z + _BRAIN_CENTRE_MNI[2])]
    deform_params: dict[str, Any] = {"enabled": bool(deform), "strength": float(deform_strength)}
    if deform and deform_strength > 0:
        rng = rngs["anatomy"]
        s = deform_strength
        angles = np.clip(rng.normal(0.0, 3.0 * s, 3), -8 * s, 8 * s)
        scales = 1.0 + np.clip(rng.normal(0.0, 0.04 * s, 3), -0.1 * s, 0.1 * s)
        shift = np.clip(rng.normal(0.0, 2.0 * s, 3), -5 * s, 5 * s)
        matrix = _rotation(*angles) @ np.diag(1.0 / scales)  # scales > 1 make the head bigger
        warp = _smooth_fields(rng, shp, voxel, 3, scale_mm=20.0)
        c0 = _BRAIN_CENTRE_MNI
        rel = [r - c for r, c in zip(ras, c0)]
        ras = [(matrix[i, 0] * rel[0] + matrix[i, 1] * rel[1] + matrix[i, 2] * rel[2] + c0[i] - shift[i]
                + 2.0 * s * warp[i]).astype(np.float32) for i in range(3)]
        deform_params.update(angles_deg=angles.round(3).tolist(), scales=scales.round(4).tolist(),
                             shift_mm=shift.round(3).tolist(), elastic_rms_mm=2.0 * s)

    # Sample the templates, reduced by block means to about the target voxel size (partial-volume fractions).
    _, affine = _template_raw()
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    target_xyz = np.array([voxel[2], voxel[1], voxel[0]])  # MNI x ~ our x, etc. (flips do not change sizes)
    factors = tuple(int(max(1, min(8, math.floor(t / zm + 1e-6)))) for t, zm in zip(target_xyz, zooms))
    maps = _template_reduced(factors)  # type: ignore[arg-type]
    inv = np.linalg.inv(affine)
    coords = np.empty((3, *shp), dtype=np.float32)
    for i in range(3):
        idx = inv[i, 0] * ras[0] + inv[i, 1] * ras[1] + inv[i, 2] * ras[2] + inv[i, 3]
        coords[i] = (idx - (factors[i] - 1) / 2.0) / factors[i]
    sample = {k: ndimage.map_coordinates(maps[k], coords, order=1, mode="constant", cval=0.0, prefilter=False)
              for k in ("mask", "gm", "wm", "t1")}
    del coords

    labels = np.zeros(shp, dtype=np.int16)
    brain = ndimage.binary_fill_holes(sample["mask"] >= 0.5)
    gm, wm = sample["gm"], sample["wm"]
    csf_frac = np.clip(sample["mask"] - gm - wm, 0.0, None)
    tissue = np.argmax(np.stack([csf_frac, gm, wm]), axis=0)  # 0 csf, 1 gm, 2 wm
    labels[brain] = np.array([LABELS["csf"], LABELS["grey_matter"], LABELS["white_matter"]],
                             dtype=np.int16)[tissue[brain]]

    # CSF rim, skull and scalp as shells at fixed distances (mm) from the brain, in the target space.
    dist_out = ndimage.distance_transform_edt(~brain, sampling=voxel)
    csf_mm, skull_mm, scalp_mm = 2.5, 6.5, 5.0
    labels[~brain & (dist_out <= csf_mm)] = LABELS["csf"]
    labels[(dist_out > csf_mm) & (dist_out <= csf_mm + skull_mm)] = LABELS["skull"]
    labels[(dist_out > csf_mm + skull_mm) & (dist_out <= csf_mm + skull_mm + scalp_mm)] = LABELS["soft_tissue"]

    # Face, neck and cervical spine, defined in MNI space so they follow the deformation.
    qx, qy, qz = ras
    air = labels == 0
    neck = ((qx / 55.0) ** 2 + ((qy + 20.0) / 55.0) ** 2 + ((qz + 165.0) / 125.0) ** 2) <= 1.0
    face = ((qx / 58.0) ** 2 + ((qy - 48.0) / 50.0) ** 2 + ((qz + 50.0) / 45.0) ** 2) <= 1.0
    labels[air & (neck | face)] = LABELS["soft_tissue"]
    spine = ((qx / 10.0) ** 2 + ((qy + 22.0) / 9.0) ** 2 <= 1.0) & (qz < -68.0) & neck
    labels[spine & (labels == LABELS["soft_tissue"])] = LABELS["bone"]

    # Deep nuclei: grey matter (or GM-ish partial volume) inside ellipsoids at fixed MNI coordinates.
    parenchyma = np.isin(labels, [LABELS["grey_matter"], LABELS["white_matter"]])
    for name, (centre, semi, tilt) in _NUCLEI.items():
        rot = _rotation(deg_x=tilt)
        for side in (-1.0, 1.0):
            c = (side * centre[0], centre[1], centre[2])
            d = (qx - c[0], qy - c[1], qz - c[2])
            acc = sum(((rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / semi[k]) ** 2 for k in range(3))
            labels[(acc <= 1.0) & parenchyma & (gm >= 0.25)] = LABELS[name]
    (cx, cy, cz), cr = _COLLICULUS
    for side in (-1.0, 1.0):
        ball = ((qx - side * cx) ** 2 + (qy - cy) ** 2 + (qz - cz) ** 2) <= cr**2
        labels[ball & parenchyma] = LABELS["colliculus"]
    del qx, qy, qz, ras

    gm_suv = wm_suv * ratio
    suv = {**_BRAIN_SUV, "white_matter": wm_suv, "grey_matter": gm_suv,
           **{n: gm_suv * nuclei_ratio for n in ("caudate", "putamen", "thalamus", "colliculus")}}
    base_suv = {LABELS[n]: v for n, v in suv.items()}
    lut = np.zeros(LESION_LABEL_BASE, dtype=np.float32)
    for lab, v in base_suv.items():
        lut[lab] = v * kbq_per_suv
    activity = lut[labels]
    _apply_texture(activity, labels, texture, rngs["texture"], voxel)

    mu_lut = np.zeros(LESION_LABEL_BASE, dtype=np.float32)
    for n in _BRAIN_LABELS:
        mu_lut[LABELS[n]] = 0.0 if n == "background" else MU_BONE if n in ("skull", "bone") else MU_SOFT
    mu = mu_lut[labels]  # lesions do not change attenuation (labels painted after this)

    t1 = np.where(brain, sample["t1"], 0.0).astype(np.float32)
    for n, v in _T1_SYNTH.items():
        if n != "csf":
            t1[labels == LABELS[n]] = v
    t1[~brain & (labels == LABELS["csf"])] = _T1_SYNTH["csf"]

    specs = _lesion_specs(lesions, rngs["lesions"], "brain", mismatch)
    inserted = _insert_lesions(specs, labels=labels, activity=activity, base_suv=base_suv, canvas=canvas,
                               rng=rngs["lesions"], kind="brain", mismatch=mismatch, kbq_per_suv=kbq_per_suv)
    for les in inserted:
        if les.present_in_prior:
            t1[labels == les.label] *= _MR_LESION_FACTOR

    params = {"gm_wm_ratio": ratio, "nuclei_ratio": float(nuclei_ratio), "suv": suv, "deformation": deform_params,
              "texture": float(texture), "template_block": list(factors), "mismatch": bool(mismatch)}
    logger.debug("brain phantom %s at %s mm, seed %d, GM:WM %.3g, %d lesion(s)", shp, voxel, seed, ratio,
                 len(inserted))
    return Phantom(kind="brain", activity=activity, mu_map=mu, labels=labels, voxel_mm=voxel, mr_t1=t1,
                   lesions=tuple(inserted), seed=int(seed), kbq_per_suv=float(kbq_per_suv),
                   params=params)


# ---------------------------------------------------------------------------------------------------- torso

# Body outline: anatomical z (mm, 0 = right diaphragm dome) -> semi-axes (x, y) of the skin ellipse.
_BODY_Z = np.array([-400.0, -330.0, -260.0, -180.0, -100.0, -20.0, 60.0, 140.0, 190.0, 215.0, 240.0, 300.0])
_BODY_AX = np.array([175.0, 178.0, 172.0, 160.0, 155.0, 158.0, 165.0, 168.0, 160.0, 120.0, 70.0, 62.0])
_BODY_AY = np.array([108.0, 110.0, 106.0, 110.0, 114.0, 113.0, 110.0, 104.0, 96.0, 80.0, 62.0, 58.0])


def torso_phantom(
    shape: Sequence[int] | None = None,
    voxel_mm: float | Sequence[float] = (4.0, 4.0, 4.0),
    *,
    seed: int = 0,
    lesions: int | Sequence[LesionSpec] = 4,
    mismatch: bool = False,
    variability: float = 0.1,
    activities: Mapping[str, float] | None = None,
    centre_z_mm: float | None = None,
    texture: float = 0.0,
    kbq_per_suv: float = KBQ_PER_SUV,
) -> Phantom:
    """A parametric XCAT-like FDG trunk with a CT (HU) prior.

    Parameters
    ----------
    shape : (z, y, x) or None
        Matrix; None covers :data:`TORSO_FOV_MM` (600 x 512 x 512 mm, the whole trunk).
    voxel_mm : float or (dz, dy, dx)
    seed : int
    lesions : int or sequence of LesionSpec
        A count of random lesions (10-22 mm, in lung (SUV 2-6) or liver (1.5-3 x liver); default 4, the
        benchmarks' hot ROIs) or explicit specs; ``()`` or 0 for none.
    mismatch : bool
        Lesions whose ``present_in_prior`` is None are left out of the CT (and of the mu-map).
    variability : float
        Coefficient of variation of body size, fat layer, organ sizes, positions and activities (0: the
        canonical phantom with :data:`TORSO_SUV`; with > 0 myocardium is drawn in 4-8, bladder 10-20).
    activities : mapping or None
        SUV overrides per label name (applied after the draw).
    centre_z_mm : float or None
        Anatomical z at the volume centre (0 = right diaphragm dome; the trunk spans -350 (femoral heads) to
        250 (neck)). None: the trunk centred when the field of view holds it, else the diaphragm, so short
        volumes show heart, lung bases and liver.
    texture : float
        Relative STD of a smooth multiplicative activity texture, mean kept per label.
    kbq_per_suv : float

    Returns
    -------
    Phantom
        kind ``"torso"``, ``ct_hu`` prior.
    """
    voxel = _voxel(voxel_mm)
    shp = _shape(shape, voxel, TORSO_FOV_MM)
    rngs = _streams(seed)
    if not (math.isfinite(variability) and 0 <= variability <= 0.5):
        raise PhantomError(f"variability must be in [0, 0.5], got {variability!r}")
    if texture < 0:
        raise PhantomError("texture must be >= 0")
    _draw(kbq_per_suv, rngs["values"], "kbq_per_suv")
    fov_z = shp[0] * voxel[0]
    if centre_z_mm is None:
        lo, hi = _TORSO_SPAN[0] + fov_z / 2.0, _TORSO_SPAN[1] - fov_z / 2.0
        centre_z_mm = float(np.clip(0.0, lo, hi)) if lo <= hi else (lo + hi) / 2.0
    canvas = _Canvas(shp, voxel, (0.0, 0.0, float(centre_z_mm)))

    rng = rngs["anatomy"]
    var = float(variability)

    def jit(sd_mm: float = 6.0) -> np.ndarray:
        return rng.normal(0.0, sd_mm * var / 0.1, 3) if var > 0 else np.zeros(3)

    def size(n: int = 3) -> np.ndarray:
        return np.exp(np.clip(rng.normal(0.0, var, n), -2.5 * var, 2.5 * var)) if var > 0 else np.ones(n)

    body_scale = np.append(size(2), 1.0 + (size(1)[0] - 1.0) * 0.5)  # height varies less than girth
    habitus = float(size(1)[0] ** 3)  # fat thickness varies most between people

    def place(x: float, y: float, z: float, sd: float = 6.0) -> np.ndarray:  # a point, scaled and jittered
        return np.array([x, y, z]) * body_scale + jit(sd)

    def dims(*semi: float) -> np.ndarray:  # semi-axes, scaled per organ
        return np.array(semi) * body_scale * size(1)[0] * (size(3) ** 0.3)

    labels = np.zeros(shp, dtype=np.int16)
    x, y, z = canvas.grids()
    zb = z[:, 0, 0] / body_scale[2]
    # The outline table is the canonical body; habitus adds subcutaneous fat outwards (organs keep their room).
    base_fat = np.where(zb < 0, 24.0, 14.0)[:, None, None]  # more subcutaneous fat over the abdomen
    ax = np.interp(zb, _BODY_Z, _BODY_AX)[:, None, None] * body_scale[0] + (habitus - 1.0) * base_fat
    ay = np.interp(zb, _BODY_Z, _BODY_AY)[:, None, None] * body_scale[1] + (habitus - 1.0) * base_fat
    ell = (x / ax) ** 2 + (y / ay) ** 2
    labels[ell <= 1.0] = LABELS["soft_tissue"]
    fat_mm = base_fat * habitus
    inner = (x / np.maximum(ax - fat_mm, 1.0)) ** 2 + (y / np.maximum(ay - fat_mm, 1.0)) ** 2 <= 1.0
    labels[(ell <= 1.0) & ~inner] = LABELS["fat"]

    soft, lung = LABELS["soft_tissue"], LABELS["lung"]
    # Lungs (x > 0 is the patient's left) reach down to the diaphragm: two domes, over the liver on the right and
    # over stomach and spleen on the left (lower), 6 mm of muscle above the organs.
    liver_c, liver_s, liver_rot = place(-48.0, 8.0, -56.0), dims(95.0, 84.0, 68.0), _rotation(deg_z=-12.0)
    for side, cx in ((-1, 78.0), (1, 80.0)):
        _paint(labels, canvas.ellipsoid(place(side * cx, 12.0, 75.0), dims(60.0, 80.0, 125.0)), lung, into=(soft,))
    _paint(labels, canvas.ellipsoid(liver_c, liver_s + 6.0, liver_rot), soft, into=(lung,))
    _paint(labels, canvas.ellipsoid(place(70.0, 20.0, -80.0), dims(90.0, 95.0, 66.0) + 6.0), soft, into=(lung,))
    # Heart: blood pool (all chambers), the left ventricle as a myocardial shell around its cavity.
    heart_c = place(22.0, -28.0, 45.0)
    heart_rot = _rotation(deg_x=-20.0, deg_z=35.0)
    _paint(labels, canvas.ellipsoid(heart_c, dims(60.0, 48.0, 55.0), heart_rot), LABELS["blood"], into=(soft, lung))
    lv_c = heart_c + np.array([22.0, 4.0, -8.0]) * body_scale
    lv_rot = _rotation(deg_y=50.0, deg_x=-35.0, deg_z=10.0)  # long axis from base (up, back, right) to apex
    lv_semi = dims(30.0, 30.0, 45.0)
    wall = 10.0 * size(1)[0]
    _paint(labels, canvas.ellipsoid(lv_c, lv_semi, lv_rot), LABELS["myocardium"],
           into=(soft, lung, LABELS["blood"]))
    _paint(labels, canvas.ellipsoid(lv_c, np.maximum(lv_semi - wall, 2.0), lv_rot), LABELS["blood"],
           into=(LABELS["myocardium"],))
    # Aorta: ascending, arch, descending to the bifurcation.
    path = [place(2.0, -18.0, 40.0, 3.0), place(2.0, -18.0, 105.0, 3.0), place(10.0, 5.0, 128.0, 3.0), place(20.0, 35.0, 112.0, 3.0),
            place(18.0, 42.0, 20.0, 3.0), place(12.0, 40.0, -200.0, 3.0)]
    for k, (p0, p1) in enumerate(itertools.pairwise(path)):
        _paint(labels, canvas.tube(p0, p1, 13.0 if k < 2 else 11.0), LABELS["blood"], into=(soft, lung))
    # Abdominal organs; kidneys first: retroperitoneal, they dent liver and spleen rather than the reverse.
    for side, cz in ((-1, -140.0), (1, -128.0)):
        _paint(labels, canvas.ellipsoid(place(side * 68.0, 58.0, cz), dims(28.0, 33.0, 55.0),
                                        _rotation(deg_y=side * 8.0, deg_z=side * -25.0)),
               LABELS["kidney"], into=(soft,))
    _paint(labels, canvas.ellipsoid(liver_c, liver_s, liver_rot), LABELS["liver"], into=(soft, lung))
    _paint(labels, canvas.ellipsoid(place(92.0, 45.0, -55.0), dims(28.0, 48.0, 55.0), _rotation(deg_z=30.0)),
           LABELS["spleen"], into=(soft, lung))
    fill = float(rng.uniform(0.75, 1.2)) if var > 0 else 1.0
    _paint(labels, canvas.ellipsoid(place(0.0, -35.0, -318.0), dims(45.0, 35.0, 38.0) * fill), LABELS["bladder"],
           into=(soft,))
    # Skeleton: vertebral bodies and spinous processes (discs and gaps as soft tissue), ribs, sternum, pelvis.
    bone = LABELS["bone"]
    spine_y = 68.0 * body_scale[1]
    period, disc = 28.0 * body_scale[2], 5.0
    segment = (np.mod(z[:, 0, 0] - 7.0, period) >= disc)[:, None, None]
    spine_mask = np.broadcast_to(segment, shp)
    for y0, r in ((spine_y, 16.0), (spine_y + 30.0, 7.0)):
        _paint(labels, canvas.tube((0.0, y0, -320.0 * body_scale[2]), (0.0, y0, 300.0 * body_scale[2]), r), bone,
               into=(soft, lung), where=spine_mask)
    for i in range(11):
        zr = (20.0 + 17.0 * i) * body_scale[2]
        azr = np.interp(zr / body_scale[2], _BODY_Z, _BODY_AX) * body_scale[0]
        ayr = np.interp(zr / body_scale[2], _BODY_Z, _BODY_AY) * body_scale[1]
        ra, rb = azr - 14.0 - 9.0, ayr - 14.0 - 9.0  # inside the lean chest wall
        found = canvas.box((0.0, 0.0, zr), (ra + 8.0, rb + 8.0, 0.3 * rb + 8.0))
        if found is None or ra <= 10 or rb <= 10:
            continue
        sl, xb, yb, zbx = found
        rnorm = np.sqrt((xb / ra) ** 2 + (yb / rb) ** 2)
        rib = ((np.abs(rnorm - 1.0) * 0.5 * (ra + rb) <= 4.5) & (np.abs(zbx - (zr + 0.3 * yb)) <= 4.5)
               & (yb > -0.55 * rb))  # posterior end higher; no bone in the anterior (cartilage) part
        _paint(labels, (sl, rib), bone, into=(soft, lung, LABELS["fat"]))
    ay_st = np.interp(90.0, _BODY_Z, _BODY_AY) * body_scale[1]
    _paint(labels, canvas.ellipsoid((0.0, -(ay_st - 28.0), 90.0 * body_scale[2]),
                                    (15.0, 6.0, 75.0)), bone, into=(soft, LABELS["fat"]))
    _paint(labels, canvas.ellipsoid(place(0.0, 85.0, -290.0, 2.0), dims(42.0, 18.0, 48.0), _rotation(deg_x=-25.0)), bone,
           into=(soft,))
    for side in (-1, 1):
        _paint(labels, canvas.ellipsoid(place(side * 108.0, 40.0, -262.0, 3.0), dims(12.0, 55.0, 55.0),
                                        _rotation(deg_z=side * 35.0, deg_y=side * -15.0)), bone, into=(soft,))
        head = place(side * 88.0, 0.0, -345.0, 3.0)
        _paint(labels, canvas.ellipsoid(head, (24.0, 24.0, 24.0)), bone, into=(soft, LABELS["fat"]))
        _paint(labels, canvas.tube(head, head + np.array([side * 40.0, 5.0, -50.0]), 15.0), bone,
               into=(soft, LABELS["fat"]))

    # Activities (SUV) and CT numbers per label.
    vrng = rngs["values"]
    suv = dict(TORSO_SUV)
    if var > 0:
        for name, value in suv.items():
            if name in _TORSO_SUV_RANGE:
                suv[name] = float(vrng.uniform(*_TORSO_SUV_RANGE[name]))
            elif name != "background":
                suv[name] = float(value * np.exp(np.clip(vrng.normal(0.0, var), -2.5 * var, 2.5 * var)))
    for name, value in (activities or {}).items():
        if name not in TORSO_SUV:
            raise PhantomError(f"unknown organ {name!r} in activities: {_did_you_mean(name, list(TORSO_SUV))}")
        suv[name] = _draw(value, vrng, f"activities[{name!r}]")
    base_suv = {LABELS[n]: v for n, v in suv.items()}
    lut = np.zeros(LESION_LABEL_BASE, dtype=np.float32)
    hu_lut = np.full(LESION_LABEL_BASE, -1000.0, dtype=np.float32)
    for name in _TORSO_LABELS:
        lut[LABELS[name]] = suv[name] * kbq_per_suv
        hu_lut[LABELS[name]] = TORSO_CT_HU[name]
    activity = lut[labels]
    _apply_texture(activity, labels, texture, rngs["texture"], voxel)
    ct = hu_lut[labels]

    specs = _lesion_specs(lesions, rngs["lesions"], "torso", mismatch)
    inserted = _insert_lesions(specs, labels=labels, activity=activity, base_suv=base_suv, canvas=canvas,
                               rng=rngs["lesions"], kind="torso", mismatch=mismatch, kbq_per_suv=kbq_per_suv)
    for les in inserted:
        if les.present_in_prior:
            host_hu = TORSO_CT_HU.get(les.region, 40.0)
            ct[labels == les.label] = _HU_LESION.get(les.region, host_hu - 25.0)
    mu = hu_to_mu(ct)
    mu[labels == 0] = 0.0

    params = {"suv": suv, "variability": var, "body_scale": body_scale.round(4).tolist(),
              "habitus": round(habitus, 4), "bladder_fill": fill, "centre_z_mm": float(centre_z_mm),
              "texture": float(texture), "mismatch": bool(mismatch)}
    logger.debug("torso phantom %s at %s mm, seed %d, %d lesion(s)", shp, voxel, seed, len(inserted))
    return Phantom(kind="torso", activity=activity, mu_map=mu, labels=labels, voxel_mm=voxel, ct_hu=ct,
                   lesions=tuple(inserted), seed=int(seed), kbq_per_suv=float(kbq_per_suv),
                   params=params)
