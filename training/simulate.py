"""Simulated low-count / full-count PET pairs from phantoms: the training and benchmark data of petnode.

One *case* is a phantom (``training.phantoms``) run through the 2-D PET physics of ``denoisers.physics``, slice by
slice and batched over slices:

1. the activity (blurred by the PSF, projected, attenuated) gives the expected trues; smooth scatter and uniform
   randoms are added as fractions of the trues, and the sum is scaled to ``full_counts`` expected prompts in the
   volume (hotter slices get more counts, as in a real scan);
2. per *realization*, Poisson prompts are drawn once at the full count level;
3. every lower count level (a dose fraction: 0.1 = 1/10 of the counts) is made from *that same* full-count
   acquisition by binomial thinning (``Sinograms.thin``), the sinogram analogue of the list-mode subsampling used
   for real low-dose data (Xu et al. 2017, ``shared/papers/xu2017-ultra-low-dose-unet.txt``: 0.5 % of the
   events; Gong et al. 2018, ``gong2018-finetuned-cnn-perceptual-loss.txt`` section III: 1/5 and 1/10 of the
   counts; the conditional DIP paper: 1/2, 1/5 and 1/10 of the list-mode events);
4. each level is reconstructed with ML-EM (``subsets=1``; Gong 2018: 100 to 120 iterations; Shen et al. 2023,
   ``shen2023-bc-dpm-diffusion.txt`` section 4: 100 iterations, 160 radial bins x 192 angles, randoms 20 % of the
   trues) or OSEM, with attenuation, PSF and the expected scatter + randoms modelled (as the "correction factors
   for randoms, scatters were included in the forward model" of Gong 2018), and brought back to the phantom's
   activity units (``Sinograms.to_activity``), optionally post-filtered.

Activity scale
--------------
Reconstructions are in the phantom's units. ``meta["activity"]`` says how those map to SUV and Bq/ml:
``SUV = value * suv_per_unit`` and ``Bq/ml = value * bqml_per_unit`` with
``bqml_per_unit = suv_per_unit * dose_at_scan_start / weight`` for a 370 MBq FDG injection, 75 kg patient and a
60 min uptake (the DICOM export is decay corrected to the series start, DecayCorrection START, so the SUVbw a
DICOM reader computes from the exported headers gives back the phantom's SUV-like values).

Limits: 2-D physics (no oblique planes, no axial blur or axial scatter), Joseph projector, a Gaussian PSF in the
transverse plane, scatter as a radially smoothed copy of the trues.

Sizes (``preset``)
------------------
``ci``: brain 24 x 64 x 64 at 3 mm (a 72 mm slab through the deep nuclei), torso 24 x 64 x 64 at 6 mm (144 mm
around the diaphragm: lung bases, heart, liver); 100 ML-EM iterations; under a second per count level and
realization on two CPU cores.
``full``: brain 105 x 128 x 128 at 2 mm (as Gong 2018), torso 150 x 128 x 128 at 4 mm (the whole trunk, 600 mm);
100 ML-EM iterations; about 15 s (brain) and 22 s (torso) per count level and realization on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training import TrainingError

logger = logging.getLogger(__name__)

__all__ = [
    "DOSE_BQ",
    "HALF_LIFE_S",
    "INJECTION_TIME",
    "PHANTOMS",
    "SERIES_TIME",
    "SIZES",
    "WEIGHT_KG",
    "SimulatedCase",
    "SimulationError",
    "activity_scale",
    "export_dicom",
    "format_level",
    "load_case",
    "parse_levels",
    "pet_series_name",
    "preset",
    "recon_name",
    "save_case",
    "simulate_case",
]

FORMAT = "petnode-simulation/1"
NOISELESS_FILE = "recon_noiseless.npy"
PHANTOMS = ("brain", "torso", "real")
SIZES = ("ci", "full")

# What the DICOM export states (and what the SUV scale in meta["activity"] assumes): a standard FDG study.
DOSE_BQ = 3.7e8  # 370 MBq (10 mCi) injected
WEIGHT_KG = 75.0
HALF_LIFE_S = 6586.2  # F-18, 109.77 min
INJECTION_TIME = "080000"
SERIES_TIME = "090000"  # 60 min uptake: the decay-corrected reference of DecayCorrection START

# Per (phantom, size): phantom geometry and simulation parameters. Counts are the expected prompts in the whole
# volume (per slice on average: brain 15 M (ci) / 10 M (full), torso 3 M; BC-DPM's levels, 1 M, 0.3 M and 0.1 M
# per slice, are all "low" here), chosen so that full-count ML-EM images after 100 iterations carry about 8 %
# voxel noise in white matter (a 1 h brain scan, Gong 2018) and about 14 % in the liver (a clinical whole-body
# scan), at both sizes (measured over count levels: the rest of the white-matter spread is partial volume).
# Randoms / scatter as fractions of the trues: brain randoms 30 %, no scatter (Gong 2018 brain); torso randoms +
# scatter 60 % of the prompts, i.e. 1.5 x the trues (Gong 2018 lung/XCAT). The torso carries 3 random lesions
# (10-22 mm, lung or liver) so contrast recovery can be measured; the brain's hot spots are its deep nuclei.
_PRESETS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("brain", "ci"): {
        "phantom": {"shape": (24, 64, 64), "voxel_mm": (3.0, 3.0, 3.0)},
        "simulation": {"full_counts": 24 * 15e6, "iterations": 100, "psf_fwhm_mm": 4.0,
                       "randoms_fraction": 0.3, "scatter_fraction": 0.0},
    },
    ("brain", "full"): {
        "phantom": {"shape": (105, 128, 128), "voxel_mm": (2.0, 2.0, 2.0)},
        "simulation": {"full_counts": 105 * 10.0e6, "iterations": 100, "psf_fwhm_mm": 4.0,
                       "randoms_fraction": 0.3, "scatter_fraction": 0.0},
    },
    ("torso", "ci"): {
        "phantom": {"shape": (24, 64, 64), "voxel_mm": (6.0, 6.0, 6.0), "lesions": 3},
        "simulation": {"full_counts": 24 * 3e6, "iterations": 100, "psf_fwhm_mm": 6.0,
                       "randoms_fraction": 0.5, "scatter_fraction": 1.0},
    },
    ("torso", "full"): {
        "phantom": {"shape": (150, 128, 128), "voxel_mm": (4.0, 4.0, 4.0), "lesions": 3},
        "simulation": {"full_counts": 150 * 3.0e6, "iterations": 100, "psf_fwhm_mm": 6.0,
                       "randoms_fraction": 0.5, "scatter_fraction": 1.0},
    },
}


# A real PET series as the activity (training.real_phantom): the torso's grids, physics and counts, no lesions.
for _size in SIZES:
    _PRESETS[("real", _size)] = {
        "phantom": {k: v for k, v in _PRESETS[("torso", _size)]["phantom"].items() if k != "lesions"},
        "simulation": dict(_PRESETS[("torso", _size)]["simulation"]),
    }


class SimulationError(TrainingError):
    """A simulation cannot run or a saved case cannot be read (the message says which value and why)."""


def preset(phantom: str, size: str) -> dict[str, dict[str, Any]]:
    """Keyword arguments for one preset size.

    Returns
    -------
    dict
        ``{"phantom": kwargs for brain_phantom / torso_phantom (shape, voxel_mm), "simulation": kwargs for
        simulate_case (full_counts, iterations, psf_fwhm_mm, randoms_fraction, scatter_fraction)}``; fresh dicts.
    """
    key = (phantom, size)
    if key not in _PRESETS:
        raise SimulationError(f"no preset for phantom {phantom!r} and size {size!r}: "
                              f"phantoms {list(PHANTOMS)}, sizes {list(SIZES)}")
    return {part: dict(values) for part, values in _PRESETS[key].items()}


def format_level(level: float) -> str:
    """A count level as written in file and folder names: 1 -> "1", 0.1 -> "0.1", 0.005 -> "0.005"."""
    return f"{float(level):g}"


def parse_levels(text: str) -> tuple[float, ...]:
    """``"1,0.1,0.02"`` -> ``(1.0, 0.1, 0.02)``; each in (0, 1], no duplicates (``ValueError`` otherwise)."""
    levels = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"count level {part!r} is not a number") from None
        levels.append(value)
    return _check_levels(levels)


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    if not levels:
        raise ValueError("no count level given")
    out: list[float] = []
    for level in levels:
        value = float(level)
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"count level {level!r} must be a fraction of the full counts in (0, 1]")
        if format_level(value) in {format_level(v) for v in out}:
            raise ValueError(f"count level {level!r} is given twice")
        out.append(value)
    return tuple(out)


@dataclass
class SimulatedCase:
    """One simulated phantom: the truth and its reconstructions at several count levels.

    Attributes
    ----------
    truth : ndarray
        float32 (z, y, x) phantom activity, in phantom units (see the module docstring, "Activity scale").
    recons : dict
        Count level (fraction of the full counts, 1.0 = full) -> one float32 volume per realization, in the
        truth's units. Realization ``k`` of every level comes from the same full-count acquisition.
    spacing : tuple of float
        (dz, dy, dx) mm.
    mu : ndarray
        float32 attenuation map (1/mm).
    prior : ndarray or None
        float32 anatomical prior on the same grid (MR T1 intensity or CT in HU).
    prior_kind : {"mr", "ct"} or None
    labels : ndarray or None
        Integer label map of the phantom (legend in ``meta["phantom"]["legend"]`` when the phantom gave one).
    meta : dict
        JSON-able: parameters, counts per level and realization, timings, seed, lesions, activity scale.
    iterates : dict
        Level -> iteration -> one volume per realization, for the ``keep_iterations`` asked (else empty).
    noiseless : ndarray or None
        The reconstruction of the full acquisition's expected prompts (``simulate_case(noiseless=True)``), in
        the truth's units: what every level's reconstruction would be without counting noise.
    """

    truth: np.ndarray
    recons: dict[float, list[np.ndarray]]
    spacing: tuple[float, float, float]
    mu: np.ndarray
    prior: np.ndarray | None = None
    prior_kind: Literal["mr", "ct"] | None = None
    labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    iterates: dict[float, dict[int, list[np.ndarray]]] = field(default_factory=dict)
    noiseless: np.ndarray | None = None

    @property
    def levels(self) -> list[float]:
        """Count levels, in the order simulated."""
        return list(self.recons)

    @property
    def realizations(self) -> int:
        """Number of realizations per level."""
        return len(next(iter(self.recons.values()))) if self.recons else 0

    def recon(self, level: float, realization: int = 0) -> np.ndarray:
        """The reconstruction at ``level`` (matched by its formatted name, so 0.1 finds 0.1000000001)."""
        for key, volumes in self.recons.items():
            if format_level(key) == format_level(level):
                return volumes[realization]
        raise KeyError(f"count level {format_level(level)} not in this case (levels {self._names()})")

    def _names(self) -> list[str]:
        return [format_level(v) for v in self.recons]


# --------------------------------------------------------------------------------------------------- phantoms


def _phantom_prior(phantom: Any) -> tuple[np.ndarray | None, Literal["mr", "ct"] | None]:
    mr = getattr(phantom, "mr_t1", None)
    if mr is not None:
        return np.asarray(mr, dtype=np.float32), "mr"
    ct = getattr(phantom, "ct_hu", None)
    if ct is not None:
        return np.asarray(ct, dtype=np.float32), "ct"
    return None, None


def _jsonable(value: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, tuples and enums as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "value"):  # enums
        return _jsonable(value.value)
    return str(value)


def _suv_per_unit(phantom: Any) -> float:
    """SUV of one phantom activity unit (the phantom's documented scale; 1 when it says nothing)."""
    for name in ("suv_per_unit",):
        value = getattr(phantom, name, None)
        if value is not None:
            return float(value)
    return 1.0


def activity_scale(suv_per_unit: float) -> dict[str, Any]:
    """The SUV and Bq/ml scale of phantom units for the standard study this module exports (see module doc)."""
    uptake_s = (dt.datetime.strptime(SERIES_TIME, "%H%M%S") - dt.datetime.strptime(INJECTION_TIME, "%H%M%S"))
    decay = 2.0 ** (-uptake_s.total_seconds() / HALF_LIFE_S)
    bqml_per_suv = DOSE_BQ * decay / (WEIGHT_KG * 1000.0)  # SUVbw = Bq/ml * weight_g / decayed dose
    return {
        "unit": "phantom activity units",
        "suv_per_unit": suv_per_unit,
        "bqml_per_unit": suv_per_unit * bqml_per_suv,
        "dose_bq": DOSE_BQ,
        "weight_kg": WEIGHT_KG,
        "half_life_s": HALF_LIFE_S,
        "injection_time": INJECTION_TIME,
        "series_time": SERIES_TIME,
        "uptake_s": uptake_s.total_seconds(),
        "decay_factor_at_series_start": decay,
    }


# ------------------------------------------------------------------------------------------------- simulation


def _square(volume: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad (z, y, x) to (z, n, n), centred (the projector needs square slices)."""
    _, ny, nx = volume.shape
    if ny == nx == n:
        return volume
    py, px = n - ny, n - nx
    return np.pad(volume, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)))


def _unsquare(volume: np.ndarray, ny: int, nx: int) -> np.ndarray:
    n = volume.shape[-1]
    y0, x0 = (n - ny) // 2, (n - nx) // 2
    return volume[:, y0:y0 + ny, x0:x0 + nx]


def _resolve_device(device: str) -> str:
    from denoisers.base import DeviceNeed
    from denoisers.devices import resolve_device
    from denoisers.errors import DenoiserError

    try:
        return resolve_device(device, DeviceNeed.GPU_PREFERRED)
    except (ValueError, DenoiserError) as exc:
        raise SimulationError(str(exc)) from exc


def _seed_int(*words: int) -> int:
    """A 63-bit seed for one random stream, from the case seed and the stream's coordinates."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def simulate_case(
    phantom: Any,
    *,
    count_levels: Sequence[float] = (1.0, 0.1),
    full_counts: float,
    realizations: int = 1,
    seed: int,
    iterations: int,
    subsets: int = 1,
    psf_fwhm_mm: float | None = None,
    randoms_fraction: float = 0.2,
    scatter_fraction: float = 0.3,
    radial_bins: int | None = None,
    angles: int | None = None,
    post_filter_fwhm_mm: float | None = None,
    counts_per: Literal["volume", "slice"] = "volume",
    keep_iterations: Sequence[int] = (),
    noiseless: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> SimulatedCase:
    """Simulate and reconstruct a phantom at several count levels (see the module docstring for the steps).

    Parameters
    ----------
    phantom : Phantom
        From ``training.phantoms``: ``activity`` (z, y, x), ``mu_map`` (1/mm), ``voxel_mm`` (dz, dy, dx) with
        dy == dx, and optionally ``mr_t1`` or ``ct_hu``, ``labels``, ``lesions``, ``suv_per_unit``.
    count_levels : sequence of float
        Fractions of ``full_counts`` in (0, 1] to reconstruct (1.0 = the full-count acquisition itself).
    full_counts : float
        Expected prompts (trues + scatter + randoms) of the full-count acquisition, whole volume
        (``counts_per="volume"``) or every slice (``"slice"``).
    realizations : int
        Independent full-count acquisitions; each level of realization ``k`` is thinned from acquisition ``k``.
    seed : int
        Seeds every random stream (acquisition ``k``: ``(seed, k)``; thinning to level ``i``: ``(seed, k, i)``),
        so results repeat on the same device (CPU and CUDA streams differ).
    iterations, subsets : int
        ML-EM iterations (``subsets=1``) or OSEM iterations with ``subsets`` subsets of angles.
    psf_fwhm_mm : float, optional
        Transverse Gaussian PSF, in the simulation and modelled in the reconstruction.
    randoms_fraction, scatter_fraction : float
        Expected randoms and scatter as fractions of the expected trues of each slice.
    radial_bins, angles : int, optional
        Sinogram size; default ``ceil(sqrt(2) n)`` radial bins of one pixel (the whole square is seen from
        every angle) and ``ceil(1.5 n)`` angles (192 for n = 128, as in the BC-DPM paper).
    post_filter_fwhm_mm : float, optional
        3-D Gaussian post-filter of every reconstruction (the ``gaussian`` denoiser).
    counts_per : {"volume", "slice"}
        How ``full_counts`` is meant.
    keep_iterations : sequence of int
        Also keep these intermediate iterates (in ``SimulatedCase.iterates``, post-filtered like the final
        images): an iteration sweep ("early stopping" as a smoothing knob, Gong 2018 figs 7 and 9) from one run.
    noiseless : bool
        Also reconstruct the full acquisition's expected prompts (no Poisson noise), with the same algorithm and
        iterations (``SimulatedCase.noiseless``): the image the reconstruction converges to as the counts grow,
        with its PSF, partial volume and positivity. A training target without the target's own noise, and the
        ceiling of any method trained to reproduce the reconstruction (``petnode bench quality``).
    device : str
        "cpu", "cuda", "cuda:N" or "auto" (CUDA when present).
    threads : int, optional
        torch CPU threads during the call (restored after; None keeps torch's setting). On a machine busy with
        other processes, 1 avoids the stalls of OpenMP threads waiting for each other at every small operation
        (seen here: a ci case taking 20 s instead of 1 s with 2 threads on 2 shared cores).
    progress : bool
        Show a tqdm bar over all reconstruction iterations.

    Returns
    -------
    SimulatedCase
    """
    import torch

    if threads is not None and (int(threads) != threads or threads < 1):
        raise SimulationError(f"threads must be a positive integer, got {threads!r}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _simulate(
            phantom, count_levels=count_levels, full_counts=full_counts, realizations=realizations, seed=seed,
            iterations=iterations, subsets=subsets, psf_fwhm_mm=psf_fwhm_mm, randoms_fraction=randoms_fraction,
            scatter_fraction=scatter_fraction, radial_bins=radial_bins, angles=angles,
            post_filter_fwhm_mm=post_filter_fwhm_mm, counts_per=counts_per, keep_iterations=keep_iterations,
            noiseless=noiseless, device=device, progress=progress)
    finally:
        torch.set_num_threads(previous)


def _simulate(
    phantom: Any,
    *,
    count_levels: Sequence[float],
    full_counts: float,
    realizations: int,
    seed: int,
    iterations: int,
    subsets: int,
    psf_fwhm_mm: float | None,
    randoms_fraction: float,
    scatter_fraction: float,
    radial_bins: int | None,
    angles: int | None,
    post_filter_fwhm_mm: float | None,
    counts_per: Literal["volume", "slice"],
    keep_iterations: Sequence[int],
    noiseless: bool,
    device: str,
    progress: bool,
) -> SimulatedCase:
    """:func:`simulate_case` with torch's thread count already set."""
    import torch
    from tqdm.auto import tqdm

    from denoisers.errors import InvalidInputError
    from denoisers.physics import (
        ParallelProjector,
        SystemModel,
        make_generator,
        osem,
        simulate_counts,
    )

    t_start = time.perf_counter()
    try:
        levels = _check_levels(count_levels)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    for name, value in (("realizations", realizations), ("iterations", iterations), ("subsets", subsets)):
        if int(value) != value or value < 1:
            raise SimulationError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(full_counts) and full_counts > 0):
        raise SimulationError(f"full_counts must be > 0, got {full_counts!r}")
    activity = np.asarray(phantom.activity, dtype=np.float32)
    if activity.ndim != 3:
        raise SimulationError(f"phantom activity must be 3-D (z, y, x), got shape {activity.shape}")
    mu = np.asarray(phantom.mu_map, dtype=np.float32)
    if mu.shape != activity.shape:
        raise SimulationError(f"phantom mu_map has shape {mu.shape}, the activity {activity.shape}")
    spacing = tuple(float(v) for v in phantom.voxel_mm)
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise SimulationError(f"phantom voxel_mm must be 3 positive numbers (dz, dy, dx), got {phantom.voxel_mm!r}")
    if not math.isclose(spacing[1], spacing[2], rel_tol=1e-6):
        raise SimulationError(f"the 2-D projector needs square pixels, phantom voxel_mm is {spacing} (dy != dx)")
    prior, prior_kind = _phantom_prior(phantom)
    labels = getattr(phantom, "labels", None)
    dev = _resolve_device(device)

    _, ny, nx = activity.shape
    n = max(ny, nx)
    pixel_mm = spacing[2]
    n_radial = int(radial_bins) if radial_bins else 2 * math.ceil(math.sqrt(2.0) * n / 2)
    n_angles = int(angles) if angles else math.ceil(1.5 * n)
    if subsets > n_angles:
        raise SimulationError(f"subsets ({subsets}) cannot exceed the number of angles ({n_angles})")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        projector = ParallelProjector(n, pixel_mm, n_radial, n_angles, device=dev)
        system = SystemModel(projector, mu=_square(mu, n), psf_fwhm_mm=psf_fwhm_mm)
    except InvalidInputError as exc:
        raise SimulationError(f"cannot build the system model: {exc}") from exc
    timings["system_s"] = time.perf_counter() - t0

    x_true = projector.as_tensor(_square(activity, n))
    recons: dict[float, list[np.ndarray]] = {level: [] for level in levels}
    keep = sorted({int(i) for i in keep_iterations})
    if keep and not 1 <= keep[0] <= keep[-1] <= iterations:
        raise SimulationError(f"keep_iterations must lie in [1, {iterations}], got {list(keep_iterations)}")
    iterates: dict[float, dict[int, list[np.ndarray]]] = {level: {i: [] for i in keep} for level in levels}
    counts: dict[str, list[dict[str, float]]] = {format_level(level): [] for level in levels}
    timings["simulate_s"] = 0.0
    timings["reconstruct_s"] = 0.0
    post = None
    if post_filter_fwhm_mm:
        from denoisers.registry import create

        post = create("gaussian", {"fwhm_mm": float(post_filter_fwhm_mm)})
    total_iterations = (realizations * len(levels) + int(bool(noiseless))) * iterations

    def as_volume(image: torch.Tensor, sino: Any) -> np.ndarray:
        """A reconstruction of ``sino`` in activity units on the phantom's grid, post-filtered like every image."""
        volume = _unsquare(sino.to_activity(image).cpu().numpy().astype(np.float32), ny, nx)
        if post is not None:
            from denoisers.base import DenoiseInputs

            volume = post.denoise(DenoiseInputs(pet=volume, spacing=spacing)).denoised  # type: ignore[arg-type]
        return np.ascontiguousarray(volume, dtype=np.float32)

    noise_free: np.ndarray | None = None
    algorithm = "MLEM" if subsets == 1 else f"OSEM {subsets} subsets"
    with tqdm(total=total_iterations, disable=not progress, unit="it", desc="simulate", leave=False) as bar:
        for k in range(realizations):
            t0 = time.perf_counter()
            try:
                full = simulate_counts(x_true, system, float(full_counts), randoms_fraction, scatter_fraction,
                                       generator=_seed_int(seed, k), counts_per=counts_per)
            except InvalidInputError as exc:
                raise SimulationError(f"cannot simulate the acquisition: {exc}") from exc
            timings["simulate_s"] += time.perf_counter() - t0
            for i, level in enumerate(levels):
                name = format_level(level)
                t0 = time.perf_counter()
                sino = full if level == 1.0 else full.thin(level, make_generator(_seed_int(seed, k, i + 1), dev))
                bar.set_description(f"L{name} r{k}")

                def callback(it: int, image: torch.Tensor, level: float = level, sino: Any = sino) -> None:
                    bar.update(1)
                    if it in keep and it != iterations:
                        iterates[level][it].append(as_volume(image, sino))

                image = osem(sino.prompts, system, sino.additive, n_iter=int(iterations), n_subsets=int(subsets),
                             callback=callback)
                recons[level].append(as_volume(image, sino))
                if iterations in keep:
                    iterates[level][int(iterations)].append(recons[level][-1])
                counts[name].append({
                    "prompts": float(sino.prompts.sum(dtype=torch.float64)),
                    "expected_prompts": float(sino.expected.sum(dtype=torch.float64)),
                    "expected_trues": float(sino.trues.sum(dtype=torch.float64)),
                    "expected_scatter": float(sino.scatter.sum(dtype=torch.float64)),
                    "expected_randoms": float(sino.randoms.sum(dtype=torch.float64)),
                })
                timings["reconstruct_s"] += time.perf_counter() - t0
                logger.info("realization %d, level %s: %.4g prompts, %d %s iterations", k, name,
                            counts[name][-1]["prompts"], iterations, algorithm)
            if noiseless and k == 0:
                # The expected prompts are the same for every realization: one reconstruction serves them all.
                t0 = time.perf_counter()
                bar.set_description("noiseless")
                image = osem(full.expected, system, full.additive, n_iter=int(iterations), n_subsets=int(subsets),
                             callback=lambda it, image: bar.update(1))
                noise_free = as_volume(image, full)
                timings["reconstruct_s"] += time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    lesions = getattr(phantom, "lesions", None) or []
    meta: dict[str, Any] = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "shape": list(activity.shape),
        "spacing": list(spacing),
        "levels": [format_level(v) for v in levels],
        "realizations": int(realizations),
        "prior_kind": prior_kind,
        "phantom": {
            "kind": getattr(phantom, "kind", None) or getattr(phantom, "name", None),
            "seed": _jsonable(getattr(phantom, "seed", None)),
            "voxel_mm": list(spacing),
            "lesions": _jsonable(list(lesions)),
            "legend": _jsonable(getattr(phantom, "legend", None)),
            "params": _jsonable(getattr(phantom, "params", None)),
        },
        "parameters": {
            "count_levels": [float(v) for v in levels],
            "full_counts": float(full_counts),
            "counts_per": counts_per,
            "realizations": int(realizations),
            "seed": int(seed),
            "algorithm": algorithm,
            "iterations": int(iterations),
            "subsets": int(subsets),
            "psf_fwhm_mm": float(psf_fwhm_mm) if psf_fwhm_mm else None,
            "randoms_fraction": float(randoms_fraction),
            "scatter_fraction": float(scatter_fraction),
            "radial_bins": n_radial,
            "angles": n_angles,
            "radial_mm": pixel_mm,
            "image_pixels": n,
            "post_filter_fwhm_mm": float(post_filter_fwhm_mm) if post_filter_fwhm_mm else None,
            "kept_iterations": keep,
            "noiseless": bool(noiseless),
            "device": dev,
            "threads": torch.get_num_threads() if dev == "cpu" else None,
        },
        "activity": activity_scale(_suv_per_unit(phantom)),
        "counts": counts,
        "timings_s": timings,
    }
    logger.info("simulated %s x %d realization(s) at levels %s in %.1f s", "x".join(map(str, activity.shape)),
                realizations, meta["levels"], timings["total_s"])
    return SimulatedCase(
        truth=activity,
        recons=recons,
        spacing=spacing,  # type: ignore[arg-type]
        mu=mu,
        prior=prior,
        prior_kind=prior_kind,
        labels=None if labels is None else np.asarray(labels),
        meta=meta,
        iterates=iterates if keep else {},
        noiseless=noise_free,
    )


# ------------------------------------------------------------------------------------------------ save / load


def recon_name(level: float | str, realization: int, iteration: int | None = None) -> str:
    """``recon_L0.1_r0.npy`` (``recon_L0.1_r0_it20.npy`` for a kept intermediate iterate)."""
    name = level if isinstance(level, str) else format_level(level)
    return f"recon_L{name}_r{realization}" + ("" if iteration is None else f"_it{iteration}") + ".npy"


def pet_series_name(level: float | str, realization: int) -> str:
    """``PET_L0.1_r0`` (the folder of that reconstruction's DICOM series under ``dicom/``)."""
    name = level if isinstance(level, str) else format_level(level)
    return f"PET_L{name}_r{realization}"


def save_case(case: SimulatedCase, directory: Path, *, dicom: bool = False) -> Path:
    """Write a case: ``truth.npy``, ``mu.npy``, ``prior.npy``, ``labels.npy`` (when present),
    ``recon_L{level}_r{k}.npy`` (and ``recon_L{level}_r{k}_it{n}.npy`` for kept iterates), ``recon_noiseless.npy``
    (when simulated), ``meta.json``; with
    ``dicom`` also ``dicom/PET_L{level}_r{k}/`` and
    ``dicom/MR/`` or ``dicom/CT/`` (see :func:`export_dicom`).

    Returns
    -------
    Path
        ``directory`` (created if needed).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "truth.npy", np.asarray(case.truth, dtype=np.float32))
    np.save(directory / "mu.npy", np.asarray(case.mu, dtype=np.float32))
    if case.prior is not None:
        np.save(directory / "prior.npy", np.asarray(case.prior, dtype=np.float32))
    if case.labels is not None:
        np.save(directory / "labels.npy", np.asarray(case.labels))
    for level, volumes in case.recons.items():
        for k, volume in enumerate(volumes):
            np.save(directory / recon_name(level, k), np.asarray(volume, dtype=np.float32))
    for level, by_iteration in case.iterates.items():
        for iteration, volumes in by_iteration.items():
            for k, volume in enumerate(volumes):
                np.save(directory / recon_name(level, k, iteration), np.asarray(volume, dtype=np.float32))
    if case.noiseless is not None:
        np.save(directory / NOISELESS_FILE, np.asarray(case.noiseless, dtype=np.float32))
    meta = dict(case.meta)
    meta.setdefault("format", FORMAT)
    meta["shape"] = list(case.truth.shape)
    meta["spacing"] = list(case.spacing)
    meta["levels"] = [format_level(v) for v in case.recons]
    meta["realizations"] = case.realizations
    meta["prior_kind"] = case.prior_kind
    meta["noiseless"] = case.noiseless is not None
    if dicom:
        meta["dicom"] = export_dicom(case, directory / "dicom")
    tmp = directory / "meta.json.tmp"
    tmp.write_text(json.dumps(_jsonable(meta), indent=2) + "\n")
    tmp.replace(directory / "meta.json")  # meta.json last: its presence means the case is complete
    logger.info("saved the simulated case to %s", directory)
    return directory


def load_case(directory: Path) -> SimulatedCase:
    """Read a case written by :func:`save_case` (the levels and realizations listed in its ``meta.json``)."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise SimulationError(f"{str(directory)!r} holds no meta.json: not a saved simulation case")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise SimulationError(f"cannot read {str(meta_path)!r}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise SimulationError(f"{str(meta_path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")

    def read(name: str, required: bool = True) -> np.ndarray | None:
        path = directory / name
        if not path.is_file():
            if required:
                raise SimulationError(f"{str(path)!r} is missing")
            return None
        return np.load(path)

    n_real = int(meta["realizations"])
    recons = {float(name): [read(recon_name(name, k)) for k in range(n_real)] for name in meta["levels"]}
    kept = [int(i) for i in meta.get("parameters", {}).get("kept_iterations", [])]
    iterates = {float(name): {i: [read(recon_name(name, k, i)) for k in range(n_real)] for i in kept}
                for name in meta["levels"]} if kept else {}
    return SimulatedCase(
        truth=read("truth.npy"),  # type: ignore[arg-type]
        recons=recons,  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in meta["spacing"]),  # type: ignore[arg-type]
        mu=read("mu.npy"),  # type: ignore[arg-type]
        prior=read("prior.npy", required=False),
        prior_kind=meta.get("prior_kind"),
        labels=read("labels.npy", required=False),
        meta=meta,
        iterates=iterates,  # type: ignore[arg-type]
        noiseless=read(NOISELESS_FILE) if meta.get("noiseless") else None,
    )


# ------------------------------------------------------------------------------------------------------ DICOM


def _series_description(kind: str, level: float, realization: int, meta: dict[str, Any]) -> str:
    p = meta.get("parameters", {})
    recon = (f"MLEM{p.get('iterations')}" if p.get("subsets", 1) == 1
             else f"OSEM{p.get('iterations')}i{p.get('subsets')}s")
    return f"SIM {kind} PET {100 * level:g}% counts r{realization} {recon}"[:64]


def export_dicom(case: SimulatedCase, directory: Path) -> dict[str, Any]:
    """Write every reconstruction as a PET series, and the prior as an MR or CT series, in one study.

    All series share one Study and Frame of Reference and the case's grid (slice ``i`` at ``z = i * dz``, centred;
    array axes are the DICOM patient axes: x to the patient's left, y posterior, z superior). PET values are
    Bq/ml (``meta["activity"]["bqml_per_unit"]``), DecayCorrection START, FDG 370 MBq injected 60 min before the
    series start, 75 kg, so SUVbw read from the headers equals ``value * suv_per_unit``.

    Returns
    -------
    dict
        ``{"study_uid", "frame_of_reference_uid", "series": {folder name: series UID}}`` (stored in meta.json).
    """
    from pydicom.uid import generate_uid

    from training.dicom_export import (
        F18_CODE_SCT,
        FDG_CODE_SCT,
        make_ct_series,
        make_mr_series,
        make_pet_series,
        write_series,
    )

    directory = Path(directory)
    meta = case.meta
    scale = meta.get("activity") or activity_scale(1.0)
    bqml_per_unit = float(scale["bqml_per_unit"])
    kind = str(meta.get("phantom", {}).get("kind") or "phantom")
    brain = kind == "brain"
    study_uid, for_uid = generate_uid(), generate_uid()
    seed = meta.get("parameters", {}).get("seed", 0)
    patient = {"PatientName": f"PETNODE^SIM^{kind.upper()}", "PatientID": f"SIM-{kind}-{seed}"[:64],
               "StudyDescription": f"petnode simulation ({kind})"}
    if brain:
        patient["BodyPartExamined"] = "BRAIN"
    spacing = tuple(float(v) for v in case.spacing)
    series: dict[str, str] = {}
    number = 1
    if case.prior is not None:
        folder = "MR" if case.prior_kind == "mr" else "CT"
        uid = generate_uid()
        if case.prior_kind == "mr":
            prior = np.clip(np.asarray(case.prior, dtype=np.float64), 0.0, None)
            peak = float(prior.max())
            intensity = prior * (4000.0 / peak) if peak > 0 else prior  # 12-bit unsigned stored values
            datasets = make_mr_series(intensity=intensity, spacing=spacing, study_uid=study_uid, series_uid=uid,
                                      for_uid=for_uid, series_number=number, series_description="SIM T1 prior",
                                      **patient)
        else:
            datasets = make_ct_series(hu=np.asarray(case.prior, dtype=np.float64), spacing=spacing,
                                      study_uid=study_uid, series_uid=uid, for_uid=for_uid, series_number=number,
                                      series_description="SIM CT prior", **patient)
        write_series(datasets, directory / folder)
        series[folder] = uid
    p = meta.get("parameters", {})
    method = "MLEM" if p.get("subsets", 1) == 1 else "OSEM"
    recon_method = f"{method} {p.get('iterations')}i" + ("" if method == "MLEM" else f"{p.get('subsets')}s")
    for level, volumes in case.recons.items():
        for k, volume in enumerate(volumes):
            number += 1
            uid = generate_uid()
            folder = pet_series_name(level, k)
            datasets = make_pet_series(
                activity=np.asarray(volume, dtype=np.float64) * bqml_per_unit, spacing=spacing,
                study_uid=study_uid, series_uid=uid, for_uid=for_uid, series_number=number,
                series_description=_series_description(kind, level, k, meta),
                patient_weight=WEIGHT_KG, dose_bq=DOSE_BQ, half_life_s=HALF_LIFE_S, injection_time=INJECTION_TIME,
                series_time=SERIES_TIME, decay_correction="START", station="PETNODE-SIM",
                tracer_code=FDG_CODE_SCT, radionuclide_code=F18_CODE_SCT,
                ReconstructionMethod=recon_method[:64],
                SeriesType=["STATIC", "IMAGE"] if brain else ["WHOLE BODY", "IMAGE"],
                **patient,
            )
            write_series(datasets, directory / folder)
            series[folder] = uid
    logger.info("wrote %d DICOM series under %s", len(series), directory)
    return {"study_uid": study_uid, "frame_of_reference_uid": for_uid, "series": series}
