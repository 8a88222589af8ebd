"""Real PET images as activity maps: training anatomy beyond ellipses and templates.

Parametric phantoms alone teach a network their shapes. ``real_pet_phantom`` turns a real PET series into a
phantom that ``training.simulate.simulate_case`` re-simulates at any count level: the series in SUV (its own SUV
factor; else scaled so the body's median is SUV 1) becomes the activity on the phantom scale, resampled onto the
requested grid through a seeded random transform (a z window anywhere in the series, an in-plane rotation of up to
``rotate_deg``, a scale of 1 +- ``scale``, a left-right flip, and a smooth random deformation of up to
``deform_mm``), so every seed is other anatomy. The source is a reconstruction with its own noise, so it is
smoothed first (``smooth_fwhm_mm``) and its noise is not learned as structure. Attenuation: water inside the body
(above SUV 0.15, ``BODY_SUV``), air outside. No prior (CT is not registered here).

The ACRIN PET/CT study in ``shared/data`` is the held-out real anatomy every learned method reports on: it is
refused here (``HELD_OUT``), by folder name and by study UID.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.phantoms import KBQ_PER_SUV, LABELS, MU_SOFT, Phantom, PhantomError

BODY_SUV = 0.15
"""Inside the body: above this SUV (soft tissue is about 0.5-1.5, air about 0)."""

HELD_OUT = ("ohif_acrin_nsclc_fdg_pet_042", "acrin")
"""Folder names (any part of the path, case-insensitive) that never become training anatomy."""

HELD_OUT_STUDY_PREFIXES = ("1.3.6.1.4.1.14519.5.2.1.4591",)  # TCIA ACRIN-NSCLC-FDG-PET study UID root


def _refuse_held_out(series_dir: Path, study_uid: str) -> None:
    parts = [p.lower() for p in Path(series_dir).resolve().parts]
    if any(word in part for part in parts for word in HELD_OUT) or study_uid.startswith(HELD_OUT_STUDY_PREFIXES):
        raise PhantomError(f"{series_dir} is the held-out ACRIN study: it never enters training (it is where "
                           "learned methods report generalisation); use another series")


def _load_suv(series_dir: Path, allow_held_out: bool) -> tuple[np.ndarray, tuple[float, float, float], str]:
    from dicom_node.errors import DicomNodeError
    from dicom_node.series import load_pet_series

    files = sorted(p for p in Path(series_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
    try:
        volume = load_pet_series(files)
    except DicomNodeError as exc:
        raise PhantomError(f"{series_dir}: not a PET series usable as an activity map: {exc}") from exc
    if not allow_held_out:
        _refuse_held_out(series_dir, volume.study_uid)
    values = np.asarray(volume.array, dtype=np.float64)
    if volume.suv_factor is not None:
        return (values * volume.suv_factor).astype(np.float32), volume.spacing, "suv"
    body = values[values > 0.05 * float(values.max())]
    scale = float(np.median(body)) if body.size else 0.0
    if not scale > 0:
        raise PhantomError(f"{series_dir}: the series holds no activity")
    return (values / scale).astype(np.float32), volume.spacing, "median"


def _smooth_field(shape: Sequence[int], sigma_vox: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    peak = float(np.abs(field).max())
    return field * (amplitude / peak) if peak > 0 else field


def real_pet_phantom(series_dir: Path, *, shape: tuple[int, int, int], voxel_mm: tuple[float, float, float],
                     seed: int = 0, rotate_deg: float = 10.0, scale: float = 0.1, deform_mm: float = 8.0,
                     smooth_fwhm_mm: float = 4.0, allow_held_out: bool = False, fit_z: bool = False) -> Phantom:
    """A phantom whose activity is a randomly transformed window of a real PET series (module docstring).

    ``allow_held_out`` is for evaluation only (``petnode bench quality --phantom real``): the held-out study is
    what learned methods are judged on, never what they learn from. ``fit_z``: a series shorter than ``shape``
    along z gives a phantom of as many slices as it covers (instead of an error).
    """
    suv, spacing, how = _load_suv(Path(series_dir), allow_held_out)
    if smooth_fwhm_mm > 0:
        sigma = [smooth_fwhm_mm / 2.3548 / s for s in spacing]
        suv = ndimage.gaussian_filter(suv, sigma, mode="nearest").astype(np.float32)
    rng = np.random.default_rng([int(seed), 2026])
    nz, ny, nx = shape
    src_extent_z = suv.shape[0] * spacing[0]
    if fit_z and nz * voxel_mm[0] > src_extent_z:
        nz = max(1, int(src_extent_z // voxel_mm[0]))
        shape = (nz, ny, nx)
    extent_z = nz * voxel_mm[0]
    if extent_z > src_extent_z:
        raise PhantomError(f"{series_dir}: the series covers {src_extent_z:.0f} mm along z, the phantom needs "
                           f"{extent_z:.0f} mm ({nz} x {voxel_mm[0]:g} mm)")
    z0_mm = float(rng.uniform(0.0, src_extent_z - extent_z))
    angle = math.radians(float(rng.uniform(-rotate_deg, rotate_deg)))
    zoom = 1.0 + float(rng.uniform(-scale, scale))
    flip = bool(rng.random() < 0.5)
    # Target voxel centres in mm: z from the window's start, y and x about the in-plane centre.
    zz, yy, xx = np.meshgrid(z0_mm + (np.arange(nz) + 0.5) * voxel_mm[0],
                             (np.arange(ny) - (ny - 1) / 2.0) * voxel_mm[1],
                             (np.arange(nx) - (nx - 1) / 2.0) * voxel_mm[2], indexing="ij")
    if flip:
        xx = -xx
    cos, sin = math.cos(angle), math.sin(angle)
    ys, xs = (cos * yy - sin * xx) / zoom, (sin * yy + cos * xx) / zoom
    if deform_mm > 0:
        coarse = max(2.0, 30.0 / min(voxel_mm))  # smooth over about 3 cm
        ys = ys + _smooth_field(shape, coarse, deform_mm, rng)
        xs = xs + _smooth_field(shape, coarse, deform_mm, rng)
        zz = zz + _smooth_field(shape, coarse, deform_mm / 2.0, rng)
    coords = np.stack([zz / spacing[0] - 0.5,
                       ys / spacing[1] + (suv.shape[1] - 1) / 2.0,
                       xs / spacing[2] + (suv.shape[2] - 1) / 2.0])
    sampled = ndimage.map_coordinates(suv, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
    sampled = np.clip(sampled, 0.0, None)
    if not float(sampled.max()) > 0:
        raise PhantomError(f"{series_dir}: the window at seed {seed} holds no activity")
    body = sampled > BODY_SUV  # both scales put soft tissue near SUV 1 and air near 0
    body = ndimage.binary_closing(ndimage.binary_fill_holes(body), iterations=2)
    labels = np.where(body, LABELS["soft_tissue"], 0).astype(np.int16)
    activity = (sampled * KBQ_PER_SUV).astype(np.float32)
    mu = np.where(body, MU_SOFT, 0.0).astype(np.float32)
    return Phantom(kind="torso", activity=activity, mu_map=mu, labels=labels, voxel_mm=tuple(voxel_mm),
                   seed=int(seed), params={"source": str(series_dir), "scale_from": how,
                                           "z_window_mm": [round(z0_mm, 1), round(z0_mm + extent_z, 1)],
                                           "rotate_deg": round(math.degrees(angle), 2), "zoom": round(zoom, 3),
                                           "flip_lr": flip, "deform_mm": deform_mm,
                                           "smooth_fwhm_mm": smooth_fwhm_mm})
