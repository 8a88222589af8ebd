"""Paired (low-count, full-count) PET volumes and the 2.5-D slab data set that learned denoisers train on.

Sources: simulated cases (``training.simulate``) and real paired DICOM reconstructions of one scan (a low-count
reconstruction, e.g. from subsampled list-mode data, beside the full-count one). Samples follow Xu et al. 2017
(``shared/papers/xu2017-ultra-low-dose-unet.txt``): the input is a stack of ``k`` adjacent low-count slices ("2.5D",
3 slices were best there), the target the full-count centre slice, augmented by random flips along x and y and
transposes; Gong et al. 2018 (``gong2018-finetuned-cnn-perceptual-loss.txt``) trains on random 128 x 128 patches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from training import TrainingError

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "Normalise",
    "PairedVolume",
    "SlabDataset",
    "from_dicom_pair",
    "from_simulation",
    "normalise_prior",
    "volume_scale",
]

Normalise = Literal["mean", "suv", "none"]
PriorKind = Literal["mr", "ct"]

# Two slice positions along the normal are the same slice when closer than this fraction of the slice spacing.
POSITION_RTOL = 0.05
# Orientation cosines and in-plane geometry must agree this well between the low- and full-count series.
ORIENTATION_ATOL = 1e-4
PIXEL_SPACING_RTOL = 1e-3
IN_PLANE_ATOL_MM = 0.05


class DatasetError(TrainingError):
    """Data that cannot be paired or sampled (the message names the files or values and why)."""


@dataclass(frozen=True)
class PairedVolume:
    """A low-count volume, its full-count counterpart on the same grid, and optionally an anatomical prior.

    Parameters
    ----------
    low, full : ndarray
        (z, y, x), same shape, same units (Bq/ml or phantom units); stored as float32.
    prior : ndarray, optional
        MR or CT on the same grid.
    spacing : tuple of float
        (dz, dy, dx) mm (keyword).
    source : str
        Where the pair came from (for logs and error messages).
    prior_kind : {"mr", "ct"}, optional
        How to normalise the prior (see :func:`normalise_prior`).
    suv_factor : float, optional
        ``SUV = value * suv_factor`` (for ``normalise="suv"``).
    """

    low: np.ndarray
    full: np.ndarray
    prior: np.ndarray | None = None
    _: KW_ONLY
    spacing: tuple[float, float, float]
    source: str = ""
    prior_kind: PriorKind | None = None
    suv_factor: float | None = None

    def __post_init__(self) -> None:
        low = np.asarray(self.low, dtype=np.float32)
        full = np.asarray(self.full, dtype=np.float32)
        if low.ndim != 3 or low.shape != full.shape:
            raise DatasetError(f"{self.source or 'pair'}: low {low.shape} and full {full.shape} must be the same "
                               "3-D (z, y, x) shape")
        if not (np.isfinite(low).all() and np.isfinite(full).all()):
            raise DatasetError(f"{self.source or 'pair'}: low and full must be finite")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "full", full)
        if self.prior is not None:
            prior = np.asarray(self.prior, dtype=np.float32)
            if prior.shape != low.shape:
                raise DatasetError(f"{self.source or 'pair'}: prior {prior.shape} is not on the PET grid {low.shape}")
            object.__setattr__(self, "prior", prior)
        spacing = tuple(float(v) for v in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise DatasetError(f"{self.source or 'pair'}: spacing must be 3 positive numbers, got {self.spacing!r}")
        object.__setattr__(self, "spacing", spacing)
        if self.prior_kind not in (None, "mr", "ct"):
            raise DatasetError(f"prior_kind must be 'mr', 'ct' or None, got {self.prior_kind!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxels."""
        return tuple(self.low.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- simulations


def from_simulation(
    directory: Path,
    level: float,
    *,
    target: Literal["full", "noiseless", "truth"] = "full",
    realizations: Sequence[int] | None = None,
) -> list[PairedVolume]:
    """Pairs from a saved simulated case: the reconstruction at ``level`` of every realization as input.

    Parameters
    ----------
    directory : Path
        Written by ``training.simulate.save_case``.
    level : float
        Input count level (e.g. 0.1).
    target : {"full", "noiseless", "truth"}
        The full-count (level 1) reconstruction of the same realization (what real data offers, Gong 2018); the
        reconstruction of the expected, noise-free prompts (``simulate --noiseless``: the same image without the
        target's own noise, so the regional means stay the reconstruction's); or the noise-free phantom activity.
    realizations : sequence of int, optional
        Which realizations (default all).
    """
    from training.simulate import SimulationError, format_level, load_case, recon_name

    directory = Path(directory)
    try:
        case = load_case(directory)
    except SimulationError as exc:
        raise DatasetError(str(exc)) from exc
    names = case.meta["levels"]
    name = format_level(level)
    if name not in names:
        raise DatasetError(f"{str(directory)!r} has no count level {name} (levels {names})")
    if target not in ("full", "noiseless", "truth"):
        raise DatasetError(f"target must be 'full', 'noiseless' or 'truth', got {target!r}")
    if target == "noiseless" and case.noiseless is None:
        raise DatasetError(f"{str(directory)!r} has no noise-free reconstruction: simulate it with --noiseless, or "
                           "use another target")
    if target == "full":
        if "1" not in names:
            raise DatasetError(f"{str(directory)!r} has no full-count level 1 (levels {names}): "
                               "simulate it, or use target='truth'")
        if name == "1":
            raise DatasetError("level 1 is the full-count level itself: pick a lower level or target='truth'")
    ks = list(range(case.realizations)) if realizations is None else [int(k) for k in realizations]
    for k in ks:
        if not 0 <= k < case.realizations:
            raise DatasetError(f"realization {k} not in {str(directory)!r} ({case.realizations} realizations)")
    suv_per_unit = (case.meta.get("activity") or {}).get("suv_per_unit")
    pairs = []
    for k in ks:
        pairs.append(PairedVolume(
            case.recon(level, k),
            case.recon(1.0, k) if target == "full" else case.noiseless if target == "noiseless" else case.truth,
            case.prior,
            spacing=case.spacing,
            source=f"{directory}/{recon_name(name, k)}",
            prior_kind=case.prior_kind,
            suv_factor=None if suv_per_unit is None else float(suv_per_unit),
        ))
    return pairs


# ------------------------------------------------------------------------------------------------ real DICOM


def _series_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{str(directory)!r} is not a folder")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{str(directory)!r} holds no files")
    return files


def _load(directory: Path, what: str):
    from dicom_node.errors import DicomNodeError
    from dicom_node.series import load_pet_series

    try:
        return load_pet_series(_series_files(directory))
    except DicomNodeError as exc:
        raise DatasetError(f"{what} series in {str(directory)!r}: {exc}") from exc


def _normal(orientation: Sequence[float]) -> np.ndarray:
    o = np.asarray(orientation, dtype=float)
    return np.cross(o[:3], o[3:])


def from_dicom_pair(low_dir: Path, full_dir: Path, prior_dir: Path | None = None) -> PairedVolume:
    """A pair from two reconstructions of one real scan (low-count and full-count PET series folders).

    Slices are matched by their position along the slice normal; only the slices present in both series are kept
    (a low-count reconstruction may cover fewer slices). The series must share orientation, in-plane grid
    (rows, columns, pixel spacing, in-plane origin), slice spacing and units, and overlap.

    Parameters
    ----------
    low_dir, full_dir : Path
        One PET series each (every file below the folder is read).
    prior_dir : Path, optional
        An MR or CT series of the same frame of reference, resampled (linear) onto the PET grid.

    Raises
    ------
    DatasetError
        A series cannot be read, or the two do not match or do not overlap (the message says how).
    """
    low = _load(low_dir, "low-count")
    full = _load(full_dir, "full-count")
    where = f"{str(low_dir)!r} vs {str(full_dir)!r}"
    if low.series_uid == full.series_uid:
        raise DatasetError(f"{where}: both folders hold the same series {low.series_uid}")
    if low.units != full.units:
        raise DatasetError(f"{where}: units differ ({low.units!r} vs {full.units!r})")
    if not np.allclose(low.orientation, full.orientation, atol=ORIENTATION_ATOL):
        raise DatasetError(f"{where}: orientations differ ({list(low.orientation)} vs {list(full.orientation)})")
    if low.shape[1:] != full.shape[1:]:
        raise DatasetError(f"{where}: slice matrices differ ({low.shape[1]}x{low.shape[2]} vs "
                           f"{full.shape[1]}x{full.shape[2]})")
    if not np.allclose(low.spacing[1:], full.spacing[1:], rtol=PIXEL_SPACING_RTOL):
        raise DatasetError(f"{where}: pixel spacings differ ({low.spacing[1:]} vs {full.spacing[1:]} mm)")
    dz = full.spacing[0]
    if not math.isclose(low.spacing[0], dz, rel_tol=PIXEL_SPACING_RTOL):
        raise DatasetError(f"{where}: slice spacings differ ({low.spacing[0]:g} vs {dz:g} mm)")
    if low.frame_of_reference_uid != full.frame_of_reference_uid:
        logger.warning("%s: different frames of reference; pairing by patient coordinates anyway", where)

    normal = _normal(full.orientation)
    p_low = np.asarray(low.positions, dtype=float)
    p_full = np.asarray(full.positions, dtype=float)
    s_low, s_full = p_low @ normal, p_full @ normal
    offset_low = p_low[0] - s_low[0] * normal
    offset_full = p_full[0] - s_full[0] * normal
    if np.max(np.abs(offset_low - offset_full)) > IN_PLANE_ATOL_MM:
        raise DatasetError(f"{where}: in-plane origins differ by "
                           f"{np.round(offset_low - offset_full, 3).tolist()} mm (different field of view)")
    tol = POSITION_RTOL * dz
    nearest = np.abs(s_low[:, None] - s_full[None, :])
    j = np.argmin(nearest, axis=1)
    matched = nearest[np.arange(len(s_low)), j] <= tol
    if not matched.any():
        overlap = min(s_low.max(), s_full.max()) - max(s_low.min(), s_full.min())
        if overlap < -tol:
            raise DatasetError(f"{where}: the series do not overlap (slices at {s_low.min():.2f}..{s_low.max():.2f} "
                               f"and {s_full.min():.2f}..{s_full.max():.2f} mm along the normal)")
        raise DatasetError(f"{where}: no slice positions match (nearest {nearest.min():.3f} mm apart, tolerance "
                           f"{tol:.3f} mm): the slices are offset along the normal")
    i_low = np.flatnonzero(matched)
    i_full = j[matched]
    if len(i_low) < len(s_low) or len(i_full) < len(s_full):
        logger.info("%s: %d common slices (low %d, full %d)", where, len(i_low), len(s_low), len(s_full))
    suv = full.suv_factor
    if suv is not None and low.suv_factor is not None and not math.isclose(suv, low.suv_factor, rel_tol=0.01):
        logger.warning("%s: SUV factors differ (%.6g vs %.6g); using the full-count one", where, low.suv_factor, suv)
    prior = None
    prior_kind: PriorKind | None = None
    if prior_dir is not None:
        positions = [full.positions[int(i)] for i in i_full]
        prior, prior_kind = _resample_prior(Path(prior_dir), positions, full.orientation, full.spacing,
                                            full.shape[1:])
    return PairedVolume(
        low.array[i_low],
        full.array[i_full],
        prior,
        spacing=full.spacing,
        source=f"{low_dir} | {full_dir}",
        prior_kind=prior_kind,
        suv_factor=suv,
    )


def read_pairs_csv(path: Path) -> list[tuple[Path, Path, str]]:
    """Paired series folders from a CSV with a header: ``low,full`` and optionally ``split`` (``train`` or
    ``val``; default ``train``). Relative folders are relative to the CSV's folder.

    Raises
    ------
    DatasetError
        Unreadable file, missing columns, an empty or unknown value (the message names the row).
    """
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read the pairs CSV: {exc}") from exc
    if not rows:
        raise DatasetError(f"{path}: no pairs (expected a header line `low,full[,split]` and one row per pair)")
    if not {"low", "full"} <= set(header):
        raise DatasetError(f"{path}: columns {header}; expected low, full and optionally split")
    pairs = []
    for n, row in enumerate(rows, start=2):
        values = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not values.get("low") or not values.get("full"):
            raise DatasetError(f"{path} line {n}: low and full must both name a series folder")
        split = values.get("split") or "train"
        if split not in ("train", "val"):
            raise DatasetError(f"{path} line {n}: split must be train or val, got {split!r}")
        low, full = (Path(values[k]) if Path(values[k]).is_absolute() else path.parent / values[k]
                     for k in ("low", "full"))
        pairs.append((low, full, split))
    return pairs


def split_slices(volume: PairedVolume, fraction: float) -> tuple[PairedVolume, PairedVolume]:
    """The volume cut along z into a training part and a validation block of its last ``fraction`` of slices
    (a contiguous block, so no validation slice is a training slice's neighbour within the 2.5D stack but at its
    edge). Raises DatasetError when either part would have fewer than 2 slices."""
    if not 0 < fraction < 1:
        raise DatasetError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    nz = volume.shape[0]
    n_val = max(1, round(nz * fraction))
    if nz - n_val < 2 or n_val < 2:
        raise DatasetError(f"{volume.source or 'a pair'} has {nz} slices: too few to hold out {fraction:g} of them "
                           "for validation (give validation pairs instead)")
    cut = nz - n_val

    def part(zs: slice, what: str) -> PairedVolume:
        return PairedVolume(volume.low[zs], volume.full[zs], None if volume.prior is None else volume.prior[zs],
                            spacing=volume.spacing, source=f"{volume.source} [{what} slices]",
                            prior_kind=volume.prior_kind, suv_factor=volume.suv_factor)

    return part(slice(0, cut), f"0-{cut - 1}"), part(slice(cut, nz), f"{cut}-{nz - 1}")


def _resample_prior(
    directory: Path,
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    spacing: tuple[float, float, float],
    rows_cols: tuple[int, int],
) -> tuple[np.ndarray, PriorKind]:
    """Read an MR or CT series (:func:`dicom_node.priors.read_prior_series`: pydicom, sorted along the slice normal)
    and resample it linearly onto the PET slices: same Frame of Reference, so by the DICOM geometry alone (no
    registration). The folder may hold other files: the series is the first file's."""
    import pydicom

    from dicom_node.errors import DicomNodeError
    from dicom_node.priors import read_prior_series, reference_grid, resample_onto

    files = _series_files(directory)
    try:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception as exc:
        raise DatasetError(f"prior series in {str(directory)!r}: {files[0].name} is not DICOM ({exc})") from exc
    modality = str(getattr(first, "Modality", ""))
    if modality not in ("MR", "CT"):
        raise DatasetError(f"prior series in {str(directory)!r} has modality {modality!r}, expected MR or CT")
    try:
        prior = read_prior_series(files, series_uid=str(first.get("SeriesInstanceUID", "")))
    except DicomNodeError as exc:
        raise DatasetError(f"prior series in {str(directory)!r}: {exc}") from exc
    reference = reference_grid(positions[0], orientation, spacing, (len(positions), *rows_cols))
    return resample_onto(prior, reference), prior.kind


# ------------------------------------------------------------------------------------------------ slab data set


def volume_scale(volume: PairedVolume, normalise: Normalise) -> float:
    """The factor both low and full are multiplied by before sampling.

    ``"mean"``: 1 / mean of the low-count volume over the whole grid (computable at inference from the input
    alone); ``"suv"``: ``suv_factor`` (values become SUVbw); ``"none"``: 1.
    """
    if normalise == "none":
        return 1.0
    if normalise == "suv":
        if volume.suv_factor is None or not volume.suv_factor > 0:
            raise DatasetError(f"{volume.source or 'pair'}: normalise='suv' needs an SUV factor, it has none")
        return float(volume.suv_factor)
    if normalise == "mean":
        mean = float(np.mean(volume.low, dtype=np.float64))
        if not mean > 0:
            raise DatasetError(f"{volume.source or 'pair'}: the low-count volume has mean {mean:g}; "
                               "normalise='mean' needs a positive mean")
        return 1.0 / mean
    raise DatasetError(f"normalise must be 'mean', 'suv' or 'none', got {normalise!r}")


def normalise_prior(prior: np.ndarray, kind: PriorKind | None) -> np.ndarray:
    """Prior intensities on a scale near 1: CT ``(HU + 1000) / 1000`` clipped at 0 (water 1, air 0); MR (or
    unknown) divided by its 99th percentile of positive values."""
    prior = np.asarray(prior, dtype=np.float32)
    if kind == "ct":
        return np.clip((prior + 1000.0) / 1000.0, 0.0, None).astype(np.float32)
    positive = prior[prior > 0]
    if positive.size == 0:
        return np.zeros_like(prior)
    return (prior / np.float32(np.percentile(positive, 99))).astype(np.float32)


class SlabDataset(Dataset):
    """2.5-D training samples: ``k`` adjacent low-count slices (+ the same prior slices) -> full-count centre slice.

    Every slice of every volume is a centre ``samples_per_slice`` times per epoch; at the volume ends the missing neighbours repeat
    the end slice (so the first and last slices can be denoised the same way at inference). Random patches,
    flips (along y and x) and transposes (y <-> x) are drawn per sample from ``(seed, epoch, index)`` and applied
    identically to input and target: the same index gives the same sample within an epoch whatever the worker,
    and :meth:`set_epoch` draws new ones.

    Parameters
    ----------
    volumes : sequence of PairedVolume
    k : int
        Odd number of input slices (Xu 2017: 3).
    patch : (int, int) or None
        Patch (rows, columns); None takes whole slices.
    flips, transposes : bool
        Augmentations (each applied with probability 1/2). Transposes need square patches or slices.
    normalise : {"mean", "suv", "none"}
        Per-volume scaling of low and full (:func:`volume_scale`).
    seed : int
    use_prior : bool, optional
        Add the prior slices as input channels; default when every volume has a prior.
    samples_per_slice : int
        Samples (patches) per centre slice and epoch (Gong 2018: two 128 x 128 patches per slice).
    target_slices : int
        1: the full-count centre slice; ``k``: the full-count slices of every input slice (the feature-oriented
        DCNN returns all three it reads).
    level_input : bool
        Add a constant channel with the volume's count level (:func:`denoisers.nets.level_feature` of
        :func:`denoisers.cnn.noise_index` of the whole low-count volume), for dose-aware networks.

    Items are ``(input, target)`` float32 tensors: ``[k (+k) (+1), h, w]`` and ``[target_slices, h, w]``.
    """

    def __init__(
        self,
        volumes: Sequence[PairedVolume],
        k: int = 3,
        patch: tuple[int, int] | None = (64, 64),
        *,
        flips: bool = True,
        transposes: bool = True,
        normalise: Normalise = "mean",
        seed: int = 0,
        use_prior: bool | None = None,
        samples_per_slice: int = 1,
        target_slices: int = 1,
        level_input: bool = False,
    ) -> None:
        self.volumes = list(volumes)
        if not self.volumes:
            raise DatasetError("SlabDataset needs at least one volume")
        if int(k) != k or k < 1 or k % 2 == 0:
            raise DatasetError(f"k must be a positive odd number of slices, got {k!r}")
        self.k = int(k)
        self.patch = None if patch is None else (int(patch[0]), int(patch[1]))
        for v in self.volumes:
            _, ny, nx = v.shape
            if self.patch is not None and (self.patch[0] > ny or self.patch[1] > nx or min(self.patch) < 1):
                raise DatasetError(f"patch {self.patch} does not fit the {ny}x{nx} slices of {v.source or 'a volume'}")
            if transposes and (self.patch or (ny, nx))[0] != (self.patch or (ny, nx))[1]:
                raise DatasetError(f"transposes need square samples, {v.source or 'a volume'} gives "
                                   f"{self.patch or (ny, nx)}: pass a square patch or transposes=False")
        self.flips = bool(flips)
        self.transposes = bool(transposes)
        self.normalise = normalise
        self.seed = int(seed)
        self.epoch = 0
        have = [v.prior is not None for v in self.volumes]
        if use_prior is None:
            use_prior = all(have)
        if use_prior and not all(have):
            missing = [v.source for v, h in zip(self.volumes, have) if not h]
            raise DatasetError(f"use_prior=True but {len(missing)} volume(s) have no prior: {missing[:3]}")
        self.use_prior = bool(use_prior)
        self.scales = [volume_scale(v, normalise) for v in self.volumes]
        self.priors = [normalise_prior(v.prior, v.prior_kind) if self.use_prior else None  # type: ignore[arg-type]
                       for v in self.volumes]
        if int(samples_per_slice) != samples_per_slice or samples_per_slice < 1:
            raise DatasetError(f"samples_per_slice must be a positive integer, got {samples_per_slice!r}")
        if target_slices not in (1, self.k):
            raise DatasetError(f"target_slices must be 1 (the centre) or k = {self.k} (all input slices, for "
                               f"networks that return every slice they read), got {target_slices!r}")
        self.target_slices = int(target_slices)
        # Each volume's count level as the node will estimate it for a series (from the whole low-count volume).
        self.level_input = bool(level_input)
        self.noise_indices: list[float] | None = None
        self.levels: list[float] | None = None
        if self.level_input:
            from denoisers.cnn import noise_index
            from denoisers.nets import level_feature

            self.noise_indices = [noise_index(v.low) for v in self.volumes]
            bad = [v.source for v, n in zip(self.volumes, self.noise_indices) if not math.isfinite(n)]
            if bad:
                raise DatasetError(f"the count level of {len(bad)} volume(s) cannot be estimated (no activity?): "
                                   f"{bad[:3]}")
            self.levels = [level_feature(n) for n in self.noise_indices]
        self._index = [(i, z) for _ in range(int(samples_per_slice))
                       for i, v in enumerate(self.volumes) for z in range(v.shape[0])]

    @property
    def in_channels(self) -> int:
        """Input channels: ``k``, or ``2 k`` with the prior, plus one with ``level_input``."""
        return self.k * (2 if self.use_prior else 1) + self.level_input

    def set_epoch(self, epoch: int) -> None:
        """Draw new patches and augmentations (call at the start of each epoch, in every worker's copy)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._index)

    def sample_plan(self, index: int) -> dict[str, int | bool]:
        """The random choices of item ``index`` this epoch: patch corner, flips, transpose (for tests and logs)."""
        vi, _ = self._index[index]
        _, ny, nx = self.volumes[vi].shape
        rng = np.random.default_rng([self.seed, self.epoch, index])
        ph, pw = self.patch or (ny, nx)
        y0 = int(rng.integers(0, ny - ph + 1))
        x0 = int(rng.integers(0, nx - pw + 1))
        flip_y, flip_x, transpose = (bool(b) for b in rng.random(3) < 0.5)
        return {"y0": y0, "x0": x0, "flip_y": flip_y and self.flips, "flip_x": flip_x and self.flips,
                "transpose": transpose and self.transposes}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        vi, z = self._index[index]
        vol = self.volumes[vi]
        nz, ny, nx = vol.shape
        plan = self.sample_plan(index)
        ph, pw = self.patch or (ny, nx)
        ys = slice(plan["y0"], plan["y0"] + ph)
        xs = slice(plan["x0"], plan["x0"] + pw)
        h = self.k // 2
        zs = np.clip(np.arange(z - h, z + h + 1), 0, nz - 1)
        scale = np.float32(self.scales[vi])
        parts = [vol.low[zs, ys, xs] * scale]
        prior = self.priors[vi]
        if prior is not None:
            parts.append(prior[zs, ys, xs])
        parts.append((vol.full[zs, ys, xs] if self.target_slices > 1 else vol.full[z:z + 1, ys, xs]) * scale)
        stack = np.concatenate(parts, axis=0)
        # one array for input and target, so every augmentation is applied to both identically
        if plan["flip_y"]:
            stack = stack[:, ::-1, :]
        if plan["flip_x"]:
            stack = stack[:, :, ::-1]
        if plan["transpose"]:
            stack = stack.transpose(0, 2, 1)
        stack = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
        t = self.target_slices
        x = stack[:-t]
        if self.levels is not None:
            x = torch.cat([x, torch.full((1, *x.shape[1:]), self.levels[vi])])
        return x, stack[-t:]
