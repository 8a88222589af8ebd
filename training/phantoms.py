"""Phantoms for simulation: an MNI152-based brain and a parametric XCAT-like torso, at any voxel size.

Brain: built from the MNI152 2009a T1, grey-matter and white-matter templates that ship inside the ``nilearn``
wheel (no download), as the papers build theirs from BrainWeb: FDG-like activity (grey:white about 4:1), CSF and
skull near zero, deep nuclei (caudate, putamen, thalamus at fixed MNI coordinates) as small hot structures for
peak-to-valley, optional hot lesions; a matching T1 prior and a mu-map. Training variety comes from seeded smooth
random deformations, affine jitter, intensity ratios and lesion placement, and an MR/PET mismatch option (a lesion
present in PET and absent in MR, the case the conditional-DIP paper worries about).

Torso: a seeded parametric phantom in the spirit of XCAT (body outline, lungs, liver, heart with myocardium and
blood pool, spine, kidneys, bladder) with FDG-like activities, lesions of 10 to 22 mm in lung and liver, a CT-like
prior (HU) and a mu-map.

Units: activity is in SUV-like units (``suv_per_unit`` = 1): background tissue about 1 (torso) and white matter 1
(brain). ``training.simulate`` converts to Bq/ml for a standard 370 MBq / 75 kg study. Arrays are float32 in
(z, y, x) order; z runs inferior to superior, y anterior to posterior, x patient right to left.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from training import TrainingError

# Label legend (the same codes for both phantoms; not every phantom uses every label).
LEGEND: dict[str, int] = {
    "background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3, "deep_nuclei": 4, "skull": 5, "scalp": 6,
    "soft_tissue": 7, "lung": 8, "liver": 9, "myocardium": 10, "blood_pool": 11, "spine": 12, "kidney": 13,
    "bladder": 14, "lesion": 15,
}
MU_SOFT, MU_BONE, MU_LUNG = 0.0096, 0.0151, 0.0029  # 1/mm at 511 keV


@dataclass(frozen=True)
class Lesion:
    centre_mm: tuple[float, float, float]  # (z, y, x) mm from the volume centre
    diameter_mm: float
    contrast: float  # lesion activity / activity of the tissue it sits in
    present_in_mr: bool = True
    organ: str = ""


@dataclass
class Phantom:
    """A phantom on a (z, y, x) grid; ``labels`` uses :data:`LEGEND`."""

    kind: str
    activity: np.ndarray
    mu_map: np.ndarray
    labels: np.ndarray
    voxel_mm: tuple[float, float, float]
    lesions: list[Lesion] = field(default_factory=list)
    mr_t1: np.ndarray | None = None
    ct_hu: np.ndarray | None = None
    legend: dict[str, int] = field(default_factory=lambda: dict(LEGEND))
    suv_per_unit: float = 1.0

    def mask(self, *names: str) -> np.ndarray:
        """Boolean mask of the given label names (e.g. ``mask("white_matter")``)."""
        return np.isin(self.labels, [self.legend[n] for n in names])


def _grid_mm(shape: tuple[int, int, int], voxel_mm: tuple[float, float, float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm relative to the volume centre, (z, y, x) each broadcastable."""
    return [((np.arange(n) - (n - 1) / 2.0) * v).reshape([-1 if i == a else 1 for i in range(3)])
            for a, (n, v) in enumerate(zip(shape, voxel_mm, strict=True))]


def _ellipsoid(grid: list[np.ndarray], centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = grid
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
        ((x - centre[2]) / radii[2]) ** 2 <= 1.0


def _place_lesions(activity: np.ndarray, labels: np.ndarray, grid: list[np.ndarray], lesions: list[Lesion],
                   mr: np.ndarray | None = None, mr_value: float | None = None) -> None:
    for lesion in lesions:
        r = lesion.diameter_mm / 2.0
        sphere = _ellipsoid(grid, lesion.centre_mm, (r, r, r))
        if not sphere.any():
            raise TrainingError(f"lesion at {lesion.centre_mm} mm ({lesion.diameter_mm} mm) is outside the volume")
        local = float(np.median(activity[sphere])) or 1.0
        activity[sphere] = local * lesion.contrast
        labels[sphere] = LEGEND["lesion"]
        if mr is not None and lesion.present_in_mr and mr_value is not None:
            mr[sphere] = mr_value


# ------------------------------------------------------------------------------------------------------ brain


@functools.cache
def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(T1, GM, WM) 1 mm MNI152 2009a templates from the nilearn wheel as (z, y, x) arrays, and their affine."""
    try:
        import nibabel as nib
        import nilearn.datasets
    except ImportError as exc:  # pragma: no cover - nilearn is in the training extra
        raise TrainingError("the brain phantom needs nilearn (pip install 'petnode[training]')") from exc
    data = Path(nilearn.datasets.__file__).parent / "data"
    names = ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    imgs = [nib.load(str(data / n)) for n in names]
    arrays = [np.asarray(img.get_fdata(dtype=np.float32)) for img in imgs]
    return arrays[0], arrays[1], arrays[2], np.asarray(imgs[0].affine)


def _sample(volume: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0).astype(np.float32)


def brain_phantom(shape: tuple[int, int, int] | None = None, voxel_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
                  *, seed: int = 0, gm_wm_ratio: float = 4.0, lesions: list[Lesion] | None = None,
                  random_lesions: int = 0, mismatch: bool = False, deform: bool = True,
                  vary_ratio: float = 0.0) -> Phantom:
    """An FDG brain on a (z, y, x) grid from the MNI152 templates.

    Parameters
    ----------
    shape, voxel_mm
        Output grid (default shape: the whole head at ``voxel_mm``).
    seed
        Drives deformation, ratio variation and random lesions; the same seed gives the same phantom.
    gm_wm_ratio
        Grey : white matter activity (about 4:1 for FDG); ``vary_ratio`` draws it from +-that fraction.
    lesions, random_lesions
        Explicit hot lesions, and/or this many random ones (6-16 mm, contrast 1.5-3 x) in grey or white matter.
    mismatch
        Lesions are absent from the MR prior (PET-only findings).
    deform
        Smooth random deformation (about 3 mm) plus affine jitter (rotation up to 5 degrees, scale 5 %).
    """
    t1, gm, wm, affine = _templates()
    rng = np.random.default_rng(seed)
    if shape is None:
        shape = tuple(int(math.ceil(e / v)) for e, v in zip((170.0, 210.0, 180.0), voxel_mm, strict=True))  # type: ignore[assignment]
    assert shape is not None
    grid = _grid_mm(shape, voxel_mm)
    z, y, x = (np.broadcast_to(g, shape) for g in grid)
    # Output (z up, y anterior->posterior, x right->left) to MNI RAS mm, centred on the brain (0, -18, 18).
    ras = np.stack([-x, -y - 18.0, z + 18.0]).reshape(3, -1)
    if deform:
        angles = np.deg2rad(rng.uniform(-5, 5, 3))
        cz, sz = np.cos(angles[0]), np.sin(angles[0])
        cy, sy = np.cos(angles[1]), np.sin(angles[1])
        cx, sx = np.cos(angles[2]), np.sin(angles[2])
        rot = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) \
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        centre = np.array([[0.0], [-18.0], [18.0]])
        ras = rot @ ((ras - centre) * rng.uniform(0.95, 1.05)) + centre
        coarse = [ndimage.zoom(ndimage.gaussian_filter(rng.standard_normal((6, 6, 6)), 1.0), [s / 6 for s in shape],
                               order=1) for _ in range(3)]
        amp = 3.0 / max(1e-6, max(float(np.abs(c).max()) for c in coarse))
        ras = ras + np.stack([c.reshape(-1)[: ras.shape[1]] * amp for c in coarse])
    vox = np.linalg.inv(affine) @ np.vstack([ras, np.ones((1, ras.shape[1]))])
    coords = vox[:3]
    t1s, gms, wms = (_sample(v, coords).reshape(shape) for v in (t1, gm, wm))

    labels = np.zeros(shape, dtype=np.int16)
    brain = (gms + wms) > 0.5
    brain_hull = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=2)) | brain  # edges: closing erodes
    # The template is skull-stripped: skull (about 6 mm) and scalp (about 5 mm) are shells around the brain.
    dist = ndimage.distance_transform_edt(~brain_hull, sampling=voxel_mm)
    skull = (dist > 1.5) & (dist <= 7.5)
    head = dist <= 12.5
    labels[head] = LEGEND["scalp"]
    labels[skull] = LEGEND["skull"]
    labels[brain_hull] = LEGEND["csf"]
    labels[brain & (gms >= wms)] = LEGEND["grey_matter"]
    labels[brain & (wms > gms)] = LEGEND["white_matter"]
    # Deep nuclei: MNI coordinates (x, y, z) of caudate, putamen, thalamus, both sides; radii in mm.
    nuclei = [((13, 12, 10), 6.0), ((25, 2, 0), 7.0), ((11, -18, 7), 7.0)]
    rasg = ras.reshape(3, *shape)
    deep = np.zeros(shape, dtype=bool)
    for (nx, ny, nz), radius in nuclei:
        for side in (1, -1):
            deep |= ((rasg[0] - side * nx) ** 2 + (rasg[1] - ny) ** 2 + (rasg[2] - nz) ** 2) <= radius**2
    labels[deep & brain_hull] = LEGEND["deep_nuclei"]

    ratio = gm_wm_ratio * (1.0 + rng.uniform(-vary_ratio, vary_ratio))
    act_by_label = {"csf": 0.05, "grey_matter": ratio, "white_matter": 1.0, "deep_nuclei": ratio * 1.15,
                    "skull": 0.05, "scalp": 0.4}
    activity = np.zeros(shape, dtype=np.float32)
    for name, value in act_by_label.items():
        activity[labels == LEGEND[name]] = value
    # Hard labels keep the asked grey:white ratio exact per label; the scanner's resolution model blurs it anyway.
    brain_t1 = t1s[brain] if brain.any() else t1s
    mr = (t1s / max(float(np.percentile(brain_t1, 99.5)), 1e-6)).clip(0, 1.2).astype(np.float32)
    mr[skull] = 0.1  # cortical bone is dark on T1, scalp fat bright
    mr[head & ~skull & ~brain_hull] = 0.8
    mu = np.zeros(shape, dtype=np.float32)
    mu[head] = MU_SOFT
    mu[skull] = MU_BONE

    chosen = list(lesions or [])
    candidates = np.argwhere(np.isin(labels, [LEGEND["grey_matter"], LEGEND["white_matter"]]))
    for _ in range(random_lesions):
        if len(candidates) == 0:
            break
        c = candidates[rng.integers(len(candidates))]
        centre = tuple(float(g.reshape(-1)[i]) for g, i in zip(grid, c, strict=True))
        chosen.append(Lesion(centre, float(rng.uniform(6, 16)), float(rng.uniform(1.5, 3.0)), not mismatch,
                             "brain"))
    if mismatch:
        chosen = [Lesion(les.centre_mm, les.diameter_mm, les.contrast, False, les.organ) for les in chosen]
    _place_lesions(activity, labels, grid, chosen, mr, mr_value=0.35)
    return Phantom("brain", activity, mu, labels, tuple(float(v) for v in voxel_mm),  # type: ignore[arg-type]
                   chosen, mr_t1=mr)


# ------------------------------------------------------------------------------------------------------ torso


def torso_phantom(shape: tuple[int, int, int] = (150, 128, 128), voxel_mm: tuple[float, float, float] = (4.0, 4.0, 4.0),
                  *, seed: int = 0, lesions: list[Lesion] | None = None, n_lesions: int = 4) -> Phantom:
    """A seeded XCAT-like torso; organ sizes and positions vary +-10 % with the seed.

    Without explicit ``lesions``, ``n_lesions`` lesions of 10-22 mm are placed, alternately in lung and liver,
    with contrast 3-6 x the surrounding tissue.
    """
    rng = np.random.default_rng(seed)
    grid = _grid_mm(shape, voxel_mm)
    # Organs are laid out for a 600 mm trunk; a shorter field of view squeezes the layout along z, so every organ
    # (and the liver the benchmarks need) is in any volume.
    sz = float(np.clip(shape[0] * voxel_mm[0] / 600.0, 0.25, 1.0))
    j = lambda v: v * rng.uniform(0.9, 1.1)  # noqa: E731 - seeded jitter of one size or position
    z_chest = j(120.0) * sz  # lungs and heart above the centre, abdomen below
    labels = np.zeros(shape, dtype=np.int16)
    body = _ellipsoid(grid, (0, 0, 0), (1e9, j(115.0), j(170.0)))
    labels[body] = LEGEND["soft_tissue"]
    organs: list[tuple[str, tuple[float, float, float], tuple[float, float, float]]] = []
    for side in (1, -1):
        organs.append(("lung", (z_chest, j(-5.0), side * j(78.0)), (j(120.0) * sz, j(65.0), j(55.0))))
        organs.append(("kidney", (z_chest - j(190.0) * sz, j(45.0), side * j(65.0)),
                       (max(j(50.0) * sz, 15.0), j(25.0), j(28.0))))
    organs.append(("liver", (z_chest - j(150.0) * sz, j(-5.0), j(-60.0)), (max(j(75.0) * sz, 30.0), j(70.0), j(85.0))))
    organs.append(("bladder", (z_chest - j(380.0) * sz, j(-30.0), 0.0), (max(j(35.0) * sz, 15.0), j(30.0), j(40.0))))
    for name, centre, radii in organs:
        labels[_ellipsoid(grid, centre, radii) & body] = LEGEND[name]
    heart_c = (z_chest - j(40.0) * sz, j(-40.0), j(25.0))
    heart_r = (max(j(50.0) * sz, 25.0), j(45.0), j(50.0))
    heart = _ellipsoid(grid, heart_c, heart_r)
    blood = _ellipsoid(grid, heart_c, tuple(r - 10.0 for r in heart_r))  # type: ignore[arg-type]
    labels[heart & ~blood] = LEGEND["myocardium"]
    labels[blood] = LEGEND["blood_pool"]
    zz, yy, xx = grid
    spine = np.broadcast_to(((yy - 80.0) ** 2 + xx**2) <= 18.0**2, shape) & body
    labels[spine] = LEGEND["spine"]

    act = {"soft_tissue": 1.0, "lung": 0.3, "liver": 2.5, "myocardium": float(rng.uniform(4, 8)),
           "blood_pool": 1.6, "spine": 1.5, "kidney": 4.0, "bladder": float(rng.uniform(10, 20))}
    hu = {"soft_tissue": 40.0, "lung": -800.0, "liver": 60.0, "myocardium": 45.0, "blood_pool": 40.0,
          "spine": 700.0, "kidney": 35.0, "bladder": 10.0}
    mu_of = {"lung": MU_LUNG, "spine": MU_BONE}
    activity = np.zeros(shape, dtype=np.float32)
    ct = np.full(shape, -1000.0, dtype=np.float32)
    mu = np.zeros(shape, dtype=np.float32)
    for name, value in act.items():
        m = labels == LEGEND[name]
        activity[m] = value
        ct[m] = hu[name]
        mu[m] = mu_of.get(name, MU_SOFT)

    chosen = list(lesions or [])
    if lesions is None:
        for k in range(n_lesions):
            organ = ("lung", "liver")[k % 2]
            inside = np.argwhere(ndimage.binary_erosion(labels == LEGEND[organ], iterations=3))
            if len(inside) == 0:
                continue
            c = inside[rng.integers(len(inside))]
            centre = tuple(float(g.reshape(-1)[i]) for g, i in zip(grid, c, strict=True))
            contrast = float(rng.uniform(3, 6)) * (3.0 if organ == "lung" else 1.0)  # lung tissue is cold
            chosen.append(Lesion(centre, float(rng.uniform(10, 22)), contrast, True, organ))  # type: ignore[arg-type]
    _place_lesions(activity, labels, grid, chosen, ct, mr_value=50.0)
    for les in chosen:  # lesions are soft tissue on CT and in the mu-map
        r = les.diameter_mm / 2
        mu[_ellipsoid(grid, les.centre_mm, (r, r, r)) & body] = MU_SOFT
    return Phantom("torso", activity, mu, labels, tuple(float(v) for v in voxel_mm),  # type: ignore[arg-type]
                   chosen, ct_hu=ct)
