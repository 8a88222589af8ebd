"""Non-local means (NLM): the classical patch-based baseline of the PET denoising papers, in 3-D, in PyTorch.

Definition (the one ``tests/denoisers/test_nlm.py`` checks against plain loops). With the volume ``v`` reflect-padded
(``numpy.pad(mode="reflect")``), for voxels ``i`` and ``j = i + d``, ``d`` an offset of the search window ``S``::

    D(i, j) = sum_k g(k) * (v(i + k) - v(j + k))**2      k over the patch window, sum_k g(k) = 1
    w(i, j) = exp(-D(i, j) / h**2)                       symmetric: w(i, j) = w(j, i); w(i, i) = 1

``g`` is uniform (``gaussian_patch_weighting=False``, the default) or a separable Gaussian with a standard deviation
of ``(p - 1) / 4`` voxels per axis for a patch of ``p`` voxels along it (Buades et al.; scikit-image's slow mode).
So ``D`` is a weighted *mean* squared difference and ``h`` is in image units. The uniform patch is the default
because the 3-voxel Gaussian one puts half its weight on the centre voxel, so its distance is nearly a one-voxel
difference and too noisy to tell patches apart at low counts (``petnode bench quality``, brain, ci size: 0.1-0.7 dB
lower PSNR at the best h for 1 M-0.1 M counts per slice, with a best h that drifts from 3 to 6 noise sigmas).

Two normalisations turn the weights into a filter:

``normalisation="row"`` (Buades et al. 2005, scikit-image): ``u(i) = sum_{d in S} w(i, i+d) v(i+d) / sum_d w``, with
neighbours in the padding taking the reflected values. Every *row* of the filter sums to 1, but its *columns* do not:
voxel ``j`` hands out ``sum_i w(i, j) / W(i)`` of its value (``W(i)`` the row sum). A voxel with a rare patch (a
hot noise spike) has a small own ``W`` and gives little to its neighbours, whose large ``W`` dilute what they take
from it, so its column sums to less than 1. PET noise is skewed towards hot spikes, so total activity drops, the more
the lower the counts: 2-8 % on a brain phantom at 1 M-0.1 M counts per slice with h = the image std, which
makes the node withhold the output. This mode is kept for comparison with scikit-image.

``normalisation="symmetric"`` (default): a symmetric, doubly stochastic version of the same weights, applied as an
exchange between pairs of voxels inside the volume (neighbours outside it are not used)::

    W(i)  = 1 + sum_{j != i} w(i, j)                      row sums
    a     = W**-1/2,   c = sqrt(a / (a + W' a))            one step of symmetric Sinkhorn balancing (W' = off-diagonal)
    r(i)  = c(i) * sum_{j != i} w(i, j) c(j)              off-diagonal row sums of diag(c) w diag(c)
    c'(i) = c(i) / max(r(i), 1)                            the limiter, where one balancing step overshoots
    b(i, j) = c'(i) w(i, j) c'(j)                          symmetric; row i sums to at most r(i) / max(r(i), 1)
    u(i)  = v(i) + sum_{j != i} b(i, j) (v(j) - v(i))

What ``i`` takes from ``j`` it gives back, so total activity is conserved exactly (to float32 rounding), a constant
image is unchanged, and ``u(i)`` is a convex combination of input values (non-negative input, non-negative output).
Balancing ``diag(c) w diag(c)`` towards unit row sums (Sinkhorn-Knopp; P. Milanfar, "Symmetrizing smoothing
filters", SIAM J. Imaging Sci. 6(1), 2013) keeps the smoothing of the row filter where patches are common; the
``max(r, 1)`` limiter, active only where one balancing step overshoots, keeps every row convex without breaking the
symmetry (``b``'s row ``i`` sums to ``c'(i) sum_j w(i, j) c'(j) <= c(i) sum_j w(i, j) c(j) / max(r(i), 1) <= 1``).
Dividing both ends' ``c`` by their own ``max(r, 1)`` rather than the pair by ``max(r(i), r(j), 1)`` makes ``b`` an
outer product, so the exchange costs four operations per offset instead of seven (``_SymmetricFilter._exchange``);
on the 267-slice FDG series the two limiters' results differ by at most 0.035 noise sigmas (RMS 0.0005).
Mass moves only between voxels within one search window, so there is no global rescaling and no regional
bias beyond the smoothing itself. It takes four passes over the weights instead of one (row sums, balancing,
row sums of the balanced filter, the exchange); the weights are computed once and kept between them (below).

The filtering parameter ``h`` is given (``h``), or ``h_factor`` times an estimate from the image. ``h_mode="noise"``
(default) uses an estimate of the noise standard deviation (``estimate_noise_sigma``: MAD of the finest diagonal
Haar band inside the body), so ``h`` follows the count level of the scan: ``h = 2 sigma`` by default, calibrated on
``petnode bench quality`` (brain phantom, ci size, 3 mm voxels: 1 M, 0.3 M and 0.1 M counts per slice, where the best
factor was 2 at every level; the estimate reads 1.4-1.5 times below the per-voxel noise of ML-EM images, whose noise
is correlated, hence a factor above the textbook ~1). With 2 mm voxels (``full`` size) the noise is correlated over
more voxels, the estimate reads 2-3 times low and the best factor was 4-6. Hence the default now compares patches
on a copy of the image smoothed with a 4 mm FWHM Gaussian (``guide_fwhm_mm``; the filter still averages the raw
values, so activity stays conserved) with ``h = 1.25 sigma`` (``DEFAULT_GUIDED_H_FACTOR``): on the same bench, 2
realizations, this beats the 4 mm Gaussian in PSNR and NRMSE at 1 M, 0.3 M and 0.1 M counts per slice at both
sizes (ci: +0.3, +0.5, +1.5 dB; full: +0.4, +0.4, +0.3 dB), where the raw-patch default lost 1.3-2.2 dB at full
size. The best factor with the guide was 1 (ci) and 1.5-2 (full); a larger search window (7 at 2 mm) did not help.
``h_mode="std"`` uses the standard deviation of the voxels inside the body, as the NLM baseline of Gong et al. 2018
does (patch 3 x 3 x 3, search window 5 x 5 x 5, "the standard deviation of the NLM Gaussian weighting function was set
to be the standard deviation of the image"; default factor 1); that h includes the anatomy's contrast, so it
over-smooths high-count scans and barely scales with the noise.

How it is fast. Each pass loops over the search offsets, each a whole-slab tensor operation (no per-voxel Python),
and uses that ``w(i, i + d) = w(j, j - d)`` for ``j = i + d``: one weight field per pair of opposite offsets feeds
both ends, which halves the distance and exponential work and makes the symmetric filter's pair weights bitwise
equal. Patch distances are separable filters (z, then y, then x) of the squared difference; the scale is folded into
the squaring so that ``exp2`` (3x faster than ``exp`` on a CPU) runs in place. The symmetric filter works on a
flat, padded copy of the volume (``_FlatGeometry``): each offset is one flat shift, so a slab is a few long
contiguous operations per offset with cheap views. It computes each pair's weight once, in its first pass, and keeps
it until the exchange in a ring of slices: the four passes run as a wavefront, each a few slices (the search reach)
behind the one before, so only the slab plus 9 slices are held, rounded up to whole slabs (32 slices, 134 MB, for
128 x 128 slices; bounded by ``weight_cache_mb``, beyond which every pass recomputes them, the same result to
float32 rounding). The 4 mm
comparison image is smoothed with float32 torch slabs (``gaussian_guide``, 8x faster than scipy's loop). Slabs of
whole z-slices bound memory (``peak_memory_bytes``) and keep the working set in cache. All arithmetic is float32;
results do not depend on the slab size or on caching beyond float32 rounding, nor on the run (no atomics, fixed
order). On the 2-core development machine with torch on 2 threads, the node's whole NLM step (noise estimate,
comparison image, symmetric filter; ``NLMDenoiser``) on a 267 x 128 x 128 FDG series takes 0.75-0.95 s (medians
at different moments of the shared machine; 1.2-1.3 s on one thread), against 5.2-5.9 s for scikit-image's fast
mode on one thread, 2.4 s before the weights were cached and 0.86-1.02 s before the exchange's factorised limiter;
the row filter takes 0.42 s (``training/bench_speed.py``, ``docs/bench/nlm-speed.md``).

Inputs: PET (+ SPACING when a window is given in mm or the comparison image is pre-smoothed, the default). Outputs: DENOISED. GPU preferred (CUDA when the instance's
device is "cuda", "cuda:N", or "auto" with CUDA present); runs on CPU. Deterministic.
``info``: ``h``, ``h_source``, ``h_factor``, ``patch_vox``, ``search_vox``, ``gaussian_patch_weighting``,
``normalisation``, ``guide_fwhm_mm``, ``device``, ``chunk_slices``, ``weight_cache_mb``, ``seconds``.

References
----------
shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt (section III.E, the NLM reference method).
A. Buades, B. Coll, J.-M. Morel, "A non-local algorithm for image denoising", CVPR 2005.
P. Milanfar, "Symmetrizing smoothing filters", SIAM J. Imaging Sciences 6(1), 2013 (doubly stochastic filters).
P. A. Knight, "The Sinkhorn-Knopp algorithm: convergence and applications", SIAM J. Matrix Anal. Appl. 30(1), 2008.
J. Darbon et al., "Fast nonlocal filtering applied to electron cryomicroscopy", ISBI 2008 (loop over offsets).
D. L. Donoho, I. M. Johnstone, "Ideal spatial adaptation by wavelet shrinkage", Biometrika 81(3), 1994 (MAD).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from denoisers.base import (
    DeviceNeed,
    DenoiseInputs,
    DenoiseResult,
    Denoiser,
    DenoiserParams,
    DenoiserSpec,
    InputKind,
    OutputKind,
)
from denoisers.errors import DenoiserUnavailableError, InvalidInputError

if TYPE_CHECKING:
    import torch

    # One patch-filter operation (``_SymmetricFilter._filter_steps``): (dst, a, b, centre, alpha).
    FilterStep = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]

# torch is imported lazily (validating a rules file must not pay for it), but a missing torch must still make the
# registry report this plugin as unavailable rather than fail at the first series.
if importlib.util.find_spec("torch") is None:
    raise ImportError("the nlm denoiser needs PyTorch (pip install torch)")

logger = logging.getLogger(__name__)

Triple = tuple[int, int, int]

BODY_FRACTION = 0.01
"""Voxels above this fraction of the image maximum count as "inside the body" for the h estimates."""

MAD_TO_SIGMA = 1.0 / 0.6744897501960817  # Gaussian: sigma = MAD / Phi^-1(3/4)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

CPU_CHUNK_VOXELS = 1 << 18
"""Default slab size on a CPU (7 slices of 192 x 192, 16 of 128 x 128): the temporaries of a slab stay in cache
without the halo and per-op overheads of thinner slabs. Measured on 2 cores, 200 x 192 x 192, row filter: 3 slices
1.5 s, 5-14 slices 1.0-1.1 s, 30-100 slices 1.05-1.15 s. The symmetric filter widens it to 9 slices where its
weight cache allows (``default_chunk_slices``)."""

CUDA_CHUNK_VOXELS = 1 << 25
"""Default slab size on a GPU: a whole typical PET volume in one go (under 1 GB of temporaries)."""

CPU_WEIGHT_CACHE_BYTES = 256 << 20
"""Default bound on the pair weights the symmetric filter keeps between its passes on a CPU: 62 offsets x (slab +
9) slices of float32 (``_FlatGeometry.cache_bytes``), 134 MB for 128 x 128 slices and 168 MB for 192 x 192 ones.
Planes of 256 x 256 still fit (264 MB at 4-slice slabs); larger ones recompute the weights in every pass."""

CUDA_WEIGHT_CACHE_BYTES = 4 << 30
"""Default bound on the cached pair weights on a GPU (a whole 267 x 128 x 128 volume's take 1.2 GB)."""

LOG2_E = 1.4426950408889634

Normalisation = Literal["symmetric", "row"]

DEFAULT_H_FACTOR: dict[str, float] = {"noise": 2.0, "std": 1.0}
"""``h_factor`` when none is given and patches are compared on the image itself (``guide_fwhm_mm=0``)."""

DEFAULT_GUIDE_FWHM_MM = 4.0
"""Default Gaussian pre-smoothing (FWHM, mm) of the image whose patches are compared, for ``h_mode="noise"`` with
no absolute ``h``. ML-EM noise is correlated over several voxels at 2 mm (``full`` size), so raw patch distances
are too noisy to tell patches apart at low counts and the finest-band noise estimate under-reads by 2-3x there;
comparing 4 mm-smoothed patches (still averaging the raw values, so activity stays conserved) makes one h factor
work at 2 and 3 mm voxels (``petnode bench quality``, brain, ci and full, 1 M-0.1 M counts per slice)."""

DEFAULT_GUIDED_H_FACTOR = 1.25
"""``h_factor`` of ``h_mode="noise"`` with the pre-smoothed comparison image (best 1 at ci, 1.5-2 at full size;
1.25 beats the default Gaussian at both sizes and 1M-0.1M counts per slice). Without pre-smoothing the defaults
are ``DEFAULT_H_FACTOR``: 2 x the noise sigma, or 1 x the image std (Gong et al. 2018)."""


class NLMParams(DenoiserParams):
    """Window sizes (voxels or mm), filtering parameter and memory bound of the NLM filter.

    ``patch_vox`` / ``search_vox`` and ``patch_mm`` / ``search_mm`` are mutually exclusive per window. ``h`` is
    absolute (image units, e.g. Bq/ml); without it ``h = h_factor * estimate`` (``h_mode``; ``h_factor`` None:
    ``DEFAULT_H_FACTOR`` of the mode). ``normalisation`` is "symmetric" (conserves activity) or "row" (Buades,
    scikit-image); see the module docstring. ``chunk_voxels`` bounds the voxels per slab of whole z-slices (at least
    one slice); None picks a device default. ``weight_cache_mb`` bounds the pair weights the symmetric filter keeps
    between its passes (``CPU_WEIGHT_CACHE_BYTES``); beyond it they are recomputed, the same result more slowly.
    """

    patch_vox: int = Field(3, ge=1, strict=True, description="patch size in voxels (odd), all axes")
    search_vox: int = Field(5, ge=1, strict=True, description="search window in voxels (odd), all axes")
    patch_mm: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False, description="patch size in mm (per axis: nearest odd voxel count)"
    )
    search_mm: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False, description="search window in mm, per axis as patch_mm"
    )
    h: float | None = Field(None, gt=0, strict=True, allow_inf_nan=False, description="absolute h in image units")
    h_factor: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False,
        description="h = h_factor * estimate; None: 1.25 (noise, smoothed patches), 2 (noise, guide_fwhm_mm 0), 1 (std)",
    )
    h_mode: Literal["noise", "std"] = Field("noise", description="estimate: noise sigma, or image std in the body")
    gaussian_patch_weighting: bool = Field(False, strict=True, description="Gaussian (True) or uniform patch kernel")
    normalisation: Normalisation = Field(
        "symmetric", description="symmetric (conserves activity) or row (Buades, scikit-image)"
    )
    chunk_voxels: int | None = Field(None, ge=1, strict=True, description="max voxels per slab; None: device default")
    weight_cache_mb: float | None = Field(
        None,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="max MiB of pair weights kept between the symmetric filter's passes (more: recomputed, slower); "
        "None: 256 on a CPU, 4096 on a GPU",
    )
    guide_fwhm_mm: float | None = Field(
        None,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="Gaussian pre-smoothing (FWHM mm) of the patch-comparison image; 0: none; None: 4 mm when h "
        "comes from the noise, else 0",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        given = self.model_fields_set
        for name in ("patch_vox", "search_vox"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd (a window centred on the voxel), got {getattr(self, name)}")
        for window in ("patch", "search"):
            if f"{window}_vox" in given and f"{window}_mm" in given and getattr(self, f"{window}_mm") is not None:
                raise ValueError(f"give {window}_vox or {window}_mm, not both")
        if self.h is not None and given & {"h_factor", "h_mode"}:
            raise ValueError("h is absolute; h_factor and h_mode apply only when h is not given")
        return self

    @property
    def uses_mm(self) -> bool:
        """Whether a window is given in mm (so the result depends on the spacing)."""
        return self.patch_mm is not None or self.search_mm is not None

    @property
    def effective_guide_fwhm_mm(self) -> float:
        """``guide_fwhm_mm``, or its default: ``DEFAULT_GUIDE_FWHM_MM`` for h from the noise estimate, else 0."""
        if self.guide_fwhm_mm is not None:
            return self.guide_fwhm_mm
        return DEFAULT_GUIDE_FWHM_MM if self.h is None and self.h_mode == "noise" else 0.0

    @property
    def needs_spacing(self) -> bool:
        """Whether the result depends on the spacing (a window in mm, or a pre-smoothed comparison image)."""
        return self.uses_mm or self.effective_guide_fwhm_mm > 0

    @property
    def effective_h_factor(self) -> float:
        """``h_factor``, or the default of ``h_mode`` (and of the pre-smoothing) when it is not given."""
        if self.h_factor is not None:
            return self.h_factor
        if self.h_mode == "noise" and self.effective_guide_fwhm_mm > 0:
            return DEFAULT_GUIDED_H_FACTOR
        return DEFAULT_H_FACTOR[self.h_mode]


def mm_to_odd_vox(size_mm: float, spacing: tuple[float, float, float]) -> Triple:
    """Convert a window size in mm to the nearest odd voxel count >= 1 per axis (z, y, x); ties go up.

    Examples
    --------
    >>> mm_to_odd_vox(12.0, (3.27, 4.0, 2.0))
    (3, 3, 7)
    """
    counts = []
    for step in spacing:
        half = math.floor((size_mm / float(step) - 1.0) / 2.0 + 0.5)
        counts.append(2 * max(half, 0) + 1)
    return counts[0], counts[1], counts[2]


def patch_kernel_1d(size: int, gaussian: bool) -> npt.NDArray[np.float64]:
    """Return the normalised 1-D patch kernel: uniform, or Gaussian with sigma ``(size - 1) / 4`` voxels."""
    if size == 1 or not gaussian:
        return np.full(size, 1.0 / size)
    radius = size // 2
    sigma = (size - 1) / 4.0
    k = np.exp(-(np.arange(-radius, radius + 1, dtype=np.float64) ** 2) / (2.0 * sigma * sigma))
    return k / k.sum()


def body_mask(pet: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Return the voxels above ``BODY_FRACTION`` of the maximum (all voxels when that selects none)."""
    top = float(pet.max())
    mask = pet > BODY_FRACTION * top if top > 0 else np.ones(pet.shape, bool)
    return mask if mask.any() else np.ones(pet.shape, bool)


def estimate_image_std(pet: npt.NDArray[np.float32]) -> float:
    """Return the standard deviation of the voxels inside the body (``body_mask``), the Gong 2018 choice of h."""
    return float(np.std(pet[body_mask(pet)], dtype=np.float64))


def estimate_noise_sigma(pet: npt.NDArray[np.float32]) -> float:
    """Estimate the noise standard deviation inside the body from the finest diagonal Haar wavelet band.

    The coefficient of each disjoint 2 x 2 x 2 block is its alternating-sign sum over ``sqrt(8)`` (axes of one
    voxel drop out), so white noise of standard deviation ``s`` gives coefficients of standard deviation ``s``
    while smooth activity and edges along the axes cancel. The median absolute coefficient over blocks whose voxels
    are all inside the body, divided by 0.6745, is robust to the edges that remain (Donoho & Johnstone 1994; the
    estimator of ``skimage.restoration.estimate_sigma``). The body restriction matters: zeros outside it would pull
    the median to zero. PET noise is spatially correlated after reconstruction and varies with activity, so this
    is the mean high-frequency noise level of the body, an under-estimate of the per-voxel noise for smoothed images.
    """
    axes = [axis for axis in range(3) if pet.shape[axis] >= 2]
    if not axes:
        return 0.0
    crop = tuple(slice(0, n - n % 2) if n >= 2 else slice(None) for n in pet.shape)
    even, inside = pet[crop], body_mask(pet)[crop]
    coeff = np.zeros(0)
    all_inside = np.ones(0, bool)
    for corner in np.ndindex(*(2 if axis in axes else 1 for axis in range(3))):
        sel = tuple(slice(c, None, 2) if axis in axes else slice(None) for axis, c in enumerate(corner))
        # Summed in float64 in place, the corners upcast one at a time (no float64 copy of the volume).
        if not coeff.size:
            coeff, all_inside = even[sel].astype(np.float64), inside[sel].copy()
            continue
        if sum(corner) % 2:
            coeff -= even[sel]
        else:
            coeff += even[sel]
        all_inside &= inside[sel]
    coeff = np.abs(coeff[all_inside] if all_inside.any() else coeff.ravel()) / math.sqrt(2.0 ** len(axes))
    return float(np.median(coeff) * MAD_TO_SIGMA)


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> npt.NDArray[np.float64]:
    """Return scipy.ndimage's normalised Gaussian kernel for ``sigma`` voxels (radius ``int(truncate sigma + 0.5)``);
    ``[1.0]`` for a sigma of 0 (scipy skips such an axis)."""
    if not sigma > 1e-15:
        return np.ones(1)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 / (sigma * sigma) * x.astype(np.float64) ** 2)
    return k / k.sum()


def gaussian_guide(
    pet: npt.NDArray[np.float32], fwhm_mm: float, spacing: tuple[float, float, float], chunk_slices: int = 16
) -> npt.NDArray[np.float32]:
    """Return the comparison image of ``guide_fwhm_mm``: ``scipy.ndimage.gaussian_filter(pet, sigma,
    mode="reflect")`` with ``sigma = fwhm / 2.3548 / spacing`` voxels per axis (truncated at 4 sigma), to float32
    rounding.

    The same separable correlation, but as float32 torch operations on slabs of ``chunk_slices`` z-slices that stay
    in cache, on torch's threads: about 3x faster than scipy's single-threaded double-precision loop on 2 cores.
    scipy's "reflect" border is numpy's "symmetric" padding.
    """
    import torch

    kernels = [gaussian_kernel_1d(fwhm_mm / FWHM_PER_SIGMA / float(s)) for s in spacing]
    radii = [k.size // 2 for k in kernels]
    src = torch.from_numpy(np.pad(np.asarray(pet, dtype=np.float32), [(r, r) for r in radii], mode="symmetric"))
    out = np.empty(pet.shape, np.float32)
    dst = torch.from_numpy(out)
    z_n, y_n, x_n = pet.shape
    chunk = max(1, min(chunk_slices, z_n))
    bufs = [torch.empty((chunk, y_n + 2 * radii[1], x_n + 2 * radii[2])), torch.empty((chunk, y_n, x_n + 2 * radii[2]))]
    for z0 in range(0, z_n, chunk):
        n = min(z_n, z0 + chunk) - z0
        cur = src[z0 : z0 + n + 2 * radii[0]]
        for axis, kernel in enumerate(kernels):
            size = cur.shape[axis] - 2 * radii[axis]
            res = dst[z0 : z0 + n] if axis == 2 else bufs[axis][:n]
            if kernel.size == 1:
                res.copy_(cur)
            else:
                torch.mul(cur.narrow(axis, 0, size), float(kernel[0]), out=res)
                for k in range(1, kernel.size):
                    res.add_(cur.narrow(axis, k, size), alpha=float(kernel[k]))
            cur = res
    return out


def _half_offsets(radius: Triple) -> list[Triple]:
    """Offsets of the search window that are > 0 in lexicographic order: one of each opposite pair."""
    rz, ry, rx = radius
    return [
        (dz, dy, dx)
        for dz in range(-rz, rz + 1)
        for dy in range(-ry, ry + 1)
        for dx in range(-rx, rx + 1)
        if (dz, dy, dx) > (0, 0, 0)
    ]


def chunk_slices_for(shape: Triple, chunk_voxels: int) -> int:
    """Return the z-slices per slab for a voxel budget (whole slices, at least one)."""
    return max(1, min(shape[0], chunk_voxels // max(1, shape[1] * shape[2])))


def default_cache_bytes(device_type: str) -> int:
    """Return the default bound on the symmetric filter's cached pair weights on a device type."""
    return CUDA_WEIGHT_CACHE_BYTES if device_type == "cuda" else CPU_WEIGHT_CACHE_BYTES


def default_chunk_slices(
    shape: Triple,
    device_type: str = "cpu",
    normalisation: Normalisation = "symmetric",
    patch: Triple = (3, 3, 3),
    search: Triple = (5, 5, 5),
    cache_bytes: int | None = None,
) -> int:
    """Return the default z-slices per slab on a device type ("cpu", "cuda").

    ``CPU_CHUNK_VOXELS`` or ``CUDA_CHUNK_VOXELS`` voxels; for the symmetric filter at least ``3 lag`` slices
    (``_FlatGeometry``) when its weight cache then still fits ``cache_bytes``: below that the cache's ring holds 3
    slabs instead of 2 (200 x 192 x 192 on 2 cores, best of 3: 9-slice slabs 1.25 s, 7-slice ones 1.37 s).
    """
    chunk = chunk_slices_for(shape, CUDA_CHUNK_VOXELS if device_type == "cuda" else CPU_CHUNK_VOXELS)
    if normalisation != "symmetric":
        return chunk
    wide = _FlatGeometry(shape, patch, search, max(chunk, 3 * _FlatGeometry(shape, patch, search, chunk).lag))
    budget = default_cache_bytes(device_type) if cache_bytes is None else cache_bytes
    return wide.chunk if wide.chunk > chunk and wide.cache_bytes() <= budget else chunk


def weight_cache_bytes(
    shape: Triple, patch: Triple, search: Triple, chunk_slices: int, cache_bytes: int | None, device_type: str = "cpu"
) -> int:
    """Return the bytes of pair weights the symmetric filter caches for these sizes under the bound ``cache_bytes``
    (None: the device default): all slices in flight, or 0 (recomputing) when they do not fit."""
    need = _FlatGeometry(shape, patch, search, chunk_slices).cache_bytes()
    budget = default_cache_bytes(device_type) if cache_bytes is None else cache_bytes
    return need if need <= budget else 0


def peak_memory_bytes(
    shape: Triple,
    patch: Triple,
    search: Triple,
    chunk_slices: int,
    normalisation: Normalisation = "symmetric",
    *,
    guide: bool = False,
    cache_bytes: int | None = None,
    device_type: str = "cpu",
) -> int:
    """Return the peak memory of ``nonlocal_means`` beyond its inputs (``pet``, ``guide``), in bytes (float32).

    - row: with ``P = (Z + 2Rz)(Y + 2Ry)(X + 2Rx)`` the volume padded by ``R = search // 2 + patch // 2``, ``V =
      Z Y X`` and ``B = (c + 2Rz)(Y + 2Ry)(X + 2Rx)`` a slab of ``c`` slices with its halo: ``4 (P + V + 2 c Y X +
      2 B)`` (the padded copy, the output, the slab's sum and weight accumulators and two distance buffers), plus
      ``4 P`` for the padded ``guide``;
    - symmetric: with ``P`` the flat padded grid of ``_FlatGeometry`` and ``S = c (Y + 2py)(X + 2px)`` a slab of it:
      ``4 (4 P + V + 3 S + 4 r) + cache`` (the padded volume and three per-voxel vectors, the output, the range
      scratch, ``r`` the patch reach) plus ``4 P`` for the padded ``guide``, ``4 S`` without a cache, and
      ``cache = weight_cache_bytes(...)``. 267 x 128 x 128 (17.5 MB) with the default guide and 16-slice slabs:
      115 MB + 134 MB of cached weights (recomputing instead: 116 MB in all).

    On a GPU all but the output live on the device; the output array is on the host.
    """
    if normalisation == "row":
        z, y, x = shape
        rz, ry, rx = (s // 2 + p // 2 for s, p in zip(search, patch))
        padded = (z + 2 * rz) * (y + 2 * ry) * (x + 2 * rx)
        scratch = (chunk_slices + 2 * rz) * (y + 2 * ry) * (x + 2 * rx)
        volume, slab = z * y * x, chunk_slices * y * x
        return 4 * (padded * (2 if guide else 1) + volume + 2 * slab + 2 * scratch)
    geo = _FlatGeometry(shape, patch, search, chunk_slices)
    cache = weight_cache_bytes(shape, patch, search, chunk_slices, cache_bytes, device_type)
    vectors = (5 if guide else 4) * geo.padded_voxels
    return 4 * (vectors + math.prod(shape) + geo.scratch_voxels(cache > 0)) + cache


def _separable_filter(
    torch: ModuleType, src: torch.Tensor, kernels: tuple[npt.NDArray[np.float64], ...], spare: torch.Tensor
) -> torch.Tensor:
    """Correlate ``src`` with the separable kernels ("valid" region), z then y then x, ping-ponging between the
    buffers behind ``src`` and ``spare``; return the result (a view of one of them).

    Each symmetric kernel is applied divided by its centre tap, so a 3-tap pass costs two ops (add the outer pair,
    then add the centre); the caller folds the product of the centre taps into its scale beforehand.
    """
    cur, other = src, spare
    for axis, kernel in enumerate(kernels):
        size = kernel.size
        if size == 1:
            continue
        r = size // 2
        n = cur.shape[axis] - 2 * r
        shape = list(cur.shape)
        shape[axis] = n
        out = other.view(-1)[: math.prod(shape)].view(shape)
        torch.add(cur.narrow(axis, 0, n), cur.narrow(axis, size - 1, n), out=out)
        torch.add(cur.narrow(axis, r, n), out, alpha=float(kernel[0] / kernel[r]), out=out)
        for k in range(1, r):
            ratio = float(kernel[k] / kernel[r])
            out.add_(cur.narrow(axis, k, n), alpha=ratio)
            out.add_(cur.narrow(axis, size - 1 - k, n), alpha=ratio)
        cur, other = out, cur
    return cur


class _PairWeights:
    """The patch weights of every pair of opposite search offsets, slab by slab, on one device.

    ``padded`` is the reflect-padded volume (halo ``patch // 2 + search // 2`` per axis). Scratch buffers are sized
    once for the largest slab; ``pairs`` hands out views into them, valid until its next step.
    """

    def __init__(
        self,
        torch: ModuleType,
        padded: torch.Tensor,
        shape: Triple,
        patch: Triple,
        search: Triple,
        gaussian: bool,
        h: float,
        chunk_slices: int,
        scratch_buffers: int,
        guide: torch.Tensor | None = None,
    ) -> None:
        self.torch = torch
        self.padded = padded
        self.guide = padded if guide is None else guide  # what patch distances are computed on
        self.shape = shape
        self.kernels = tuple(patch_kernel_1d(int(p), gaussian) for p in patch)
        self.prad: Triple = (int(patch[0]) // 2, int(patch[1]) // 2, int(patch[2]) // 2)
        srad: Triple = (int(search[0]) // 2, int(search[1]) // 2, int(search[2]) // 2)
        self.halo: Triple = (self.prad[0] + srad[0], self.prad[1] + srad[1], self.prad[2] + srad[2])
        self.offsets = _half_offsets(srad)
        self.chunk = chunk_slices
        hz, hy, hx = self.halo
        box = (chunk_slices + 2 * hz) * (shape[1] + 2 * hy) * (shape[2] + 2 * hx)
        dev = padded.device
        self.scratch = [torch.empty(box, dtype=torch.float32, device=dev) for _ in range(scratch_buffers)]
        self.zero = torch.zeros((), dtype=torch.float32, device=dev)
        self.scale = _exponent_scale(self.kernels, h)

    def slabs(self) -> Iterator[tuple[int, int]]:
        """Yield ``(z0, z1)`` of each slab of whole slices."""
        for z0 in range(0, self.shape[0], self.chunk):
            yield z0, min(self.shape[0], z0 + self.chunk)

    def pairs(self, z0: int, z1: int) -> Iterator[tuple[Triple, Triple, torch.Tensor]]:
        """Yield ``(d, lo, w)`` per offset ``d`` of the half window: ``w[k] = w(p, p + d)`` at the padded position
        ``p = lo + k``, over every ``p`` that pairs a voxel of the slab with its neighbour at ``+d`` or ``-d``."""
        torch, padded = self.torch, self.guide
        (hz, hy, hx), (pz, py, px) = self.halo, self.prad
        _, y_n, x_n = self.shape
        for dz, dy, dx in self.offsets:
            lo = (hz + z0 - max(dz, 0), hy - max(dy, 0), hx - max(dx, 0))
            hi = (hz + z1 + max(-dz, 0), hy + y_n + max(-dy, 0), hx + x_n + max(-dx, 0))
            ext = [b - a + 2 * p for a, b, p in zip(lo, hi, self.prad)]
            a = padded[lo[0] - pz : hi[0] + pz, lo[1] - py : hi[1] + py, lo[2] - px : hi[2] + px]
            b = padded[
                lo[0] - pz + dz : hi[0] + pz + dz, lo[1] - py + dy : hi[1] + py + dy, lo[2] - px + dx : hi[2] + px + dx
            ]
            sq = self.scratch[0][: math.prod(ext)].view(ext)
            torch.sub(a, b, out=sq)
            # Square and scale by -log2(e) / h**2 (times the kernels' centre taps) in one pass; the filters are
            # linear, so what comes out of them is log2 of the weight and exp2 runs in place.
            torch.addcmul(self.zero, sq, sq, value=self.scale, out=sq)
            yield (dz, dy, dx), lo, _separable_filter(torch, sq, self.kernels, self.scratch[1]).exp2_()

    def voxels(self, arr: torch.Tensor, z0: int, z1: int, shift: Triple = (0, 0, 0)) -> torch.Tensor:
        """The slab's voxels of a padded-grid tensor, each moved to its neighbour at ``shift``."""
        (hz, hy, hx), (sz, sy, sx) = self.halo, shift
        return arr[hz + z0 + sz : hz + z1 + sz, hy + sy : hy + self.shape[1] + sy, hx + sx : hx + self.shape[2] + sx]

    def forward(self, w: torch.Tensor, d: Triple, nz: int) -> torch.Tensor:
        """``w(i, i + d)`` for the slab's voxels ``i`` (from a ``pairs`` field)."""
        oz, oy, ox = max(d[0], 0), max(d[1], 0), max(d[2], 0)
        return w[oz : oz + nz, oy : oy + self.shape[1], ox : ox + self.shape[2]]

    def backward(self, w: torch.Tensor, d: Triple, nz: int) -> torch.Tensor:
        """``w(i - d, i)`` for the slab's voxels ``i``: the same elements as ``forward`` of the voxels ``i - d``."""
        oz, oy, ox = max(-d[0], 0), max(-d[1], 0), max(-d[2], 0)
        return w[oz : oz + nz, oy : oy + self.shape[1], ox : ox + self.shape[2]]

    def region(self, arr: torch.Tensor, lo: Triple, size: torch.Size, shift: Triple = (0, 0, 0)) -> torch.Tensor:
        """A padded-grid tensor over the positions of a ``pairs`` field, moved by ``shift``."""
        return arr[
            lo[0] + shift[0] : lo[0] + shift[0] + size[0],
            lo[1] + shift[1] : lo[1] + shift[1] + size[1],
            lo[2] + shift[2] : lo[2] + shift[2] + size[2],
        ]


def _row_filter(pw: _PairWeights, out: npt.NDArray[np.float32]) -> None:
    """``u(i) = sum_d w(i, i + d) v(i + d) / sum_d w(i, i + d)`` (reflected neighbours included) into ``out``."""
    torch, padded = pw.torch, pw.padded
    _, y_n, x_n = pw.shape
    acc_buf = torch.empty(pw.chunk * y_n * x_n, dtype=torch.float32, device=padded.device)
    wsum_buf = torch.empty_like(acc_buf)
    for z0, z1 in pw.slabs():
        nz = z1 - z0
        acc = acc_buf[: nz * y_n * x_n].view(nz, y_n, x_n)
        wsum = wsum_buf[: nz * y_n * x_n].view(nz, y_n, x_n)
        acc.copy_(pw.voxels(padded, z0, z1))  # the centre, weight exp(0) = 1
        wsum.fill_(1.0)
        for d, _, w in pw.pairs(z0, z1):
            back = (-d[0], -d[1], -d[2])
            w_fwd, w_bwd = pw.forward(w, d, nz), pw.backward(w, d, nz)
            wsum.add_(w_fwd)
            acc.addcmul_(w_fwd, pw.voxels(padded, z0, z1, d))
            wsum.add_(w_bwd)
            acc.addcmul_(w_bwd, pw.voxels(padded, z0, z1, back))
        torch.div(acc, wsum, out=acc)
        out[z0:z1] = acc.cpu().numpy() if acc.device.type != "cpu" else acc.numpy()


def _exponent_scale(kernels: tuple[npt.NDArray[np.float64], ...], h: float) -> float:
    """The factor that turns a patch filter's output (kernels divided by their centre taps) into ``log2`` of the
    weight, clamped to float32: an infinite one would turn 0 * inf into NaN for identical patches (with a tiny h only
    identical patches count, which the clamp still gives). ``exp2`` runs about 3x faster than ``exp`` on a CPU."""
    h2 = h * h
    scale = -LOG2_E * math.prod(float(k[k.size // 2]) for k in kernels) / h2 if h2 > 0 else -math.inf
    return max(scale, -float(np.finfo(np.float32).max))


class _FlatGeometry:
    """Where the symmetric filter's slabs, pairs and passes lie in the flat, padded copy of the volume.

    The volume is padded by ``patch // 2 + search // 2 + 2`` slices on z and by ``max(patch // 2, ceil(search //
    2 / 2))`` on y and x (reflect), then flattened. A search offset ``d`` is then one flat shift ``s``, a range of
    whole slices is one flat range, and the pairs a range owns are ``(p, p + s)`` for ``p`` in it and ``d`` in the
    half window (``s > 0``). Pairs with an end outside the volume (in the padding, or wrapped around a row or slice
    into the padding: the y and x pads together are at least the search radius wide) are computed too but weighted
    by 0, which removes them from every sum; so a slab is a handful of long contiguous operations per offset.

    Schedule: in step ``k`` pass 0 runs on slices ``[k c, (k + 1) c)`` (``c`` = ``chunk``) and pass ``p`` on the same
    range moved back by ``p * lag`` slices, ``lag`` being the slices a pair reaches ahead (``ceil(max s / plane)``):
    pass ``p`` then only reads what pass ``p - 1`` has finished. The slices whose weights are needed again are the
    last ``c + 3 lag`` ones, which a ring of ``ring`` slices (a multiple of ``c``, so pass 0 never wraps) holds.
    """

    def __init__(self, shape: Triple, patch: Triple, search: Triple, chunk_slices: int) -> None:
        self.shape = shape
        prad = [int(p) // 2 for p in patch]
        srad = [int(s) // 2 for s in search]
        # Two slices beyond the reach on z keep every flat read of a range (pairs, patches, row wrap) in the array.
        self.pads: Triple = (prad[0] + srad[0] + 2, max(prad[1], -(-srad[1] // 2)), max(prad[2], -(-srad[2] // 2)))
        self.padded: Triple = (shape[0] + 2 * self.pads[0], shape[1] + 2 * self.pads[1], shape[2] + 2 * self.pads[2])
        self.plane = self.padded[1] * self.padded[2]
        self.strides: Triple = (self.plane, self.padded[2], 1)
        half = _half_offsets((srad[0], srad[1], srad[2]))
        self.shifts = [dz * self.plane + dy * self.padded[2] + dx for dz, dy, dx in half]
        self.max_shift = max(self.shifts, default=0)
        self.prad: Triple = (prad[0], prad[1], prad[2])
        self.reach = sum(r * s for r, s in zip(prad, self.strides))  # flat reach of a patch
        z_n = shape[0]
        self.chunk = c = max(1, min(int(chunk_slices), z_n))
        self.lag = lag = max(1, -(-self.max_shift // self.plane))
        self.steps: list[list[tuple[int, int, int]]] = []
        for k in range(-(-(z_n + 3 * lag) // c)):  # until pass 3 has reached the last slice
            step = [(p, max(0, k * c - p * lag), min(z_n, (k + 1) * c - p * lag)) for p in range(4)]
            self.steps.append([(p, z0, z1) for p, z0, z1 in step if z1 > z0])
        self.ring = c * -(-(c + 3 * lag) // c)  # slices the weight cache holds (a multiple of c)

    @property
    def padded_voxels(self) -> int:
        return math.prod(self.padded)

    @property
    def slab_voxels(self) -> int:
        """Flat length of the largest range (its pairs' weights per offset)."""
        return self.chunk * self.plane

    def flat(self, z0: int, z1: int) -> tuple[int, int]:
        """The flat range of volume slices ``[z0, z1)``."""
        return (self.pads[0] + z0) * self.plane, (self.pads[0] + z1) * self.plane

    def cache_bytes(self) -> int:
        """Bytes of the weight cache: every half-window offset on ``ring`` slices (at most the volume's)."""
        return 4 * len(self.shifts) * min(self.ring, self.shape[0]) * self.plane

    def scratch_voxels(self, cached: bool) -> int:
        """float32 elements of the range scratch: squared differences and one filter pass (each a slab plus the
        patch reach on both sides), a flux temporary and, without a cache, the field of recomputed weights."""
        return 2 * (self.slab_voxels + 2 * self.reach) + (1 if cached else 2) * self.slab_voxels


class _SymmetricFilter:
    """The symmetric, doubly stochastic filter of the module docstring in four passes over the pair weights.

    Pass 0 computes every pair's weight once and, with a cache, keeps it in a ring of slices until pass 3 has used
    it (``_FlatGeometry``: the passes trail each other by a few slices). Without a cache each pass recomputes the
    weights of its range (the same values to float32 rounding). Per voxel, on the flat padded grid:

    - pass 0: ``W'(i) = sum_j w(i, j) m(j)`` (``m``: 1 in the volume, 0 in the padding), then ``a = (1 + W')**-1/2``;
    - pass 1: ``(W' a)(i)``, then ``c = sqrt(a / (a + W' a))``;
    - pass 2: ``(W' c)(i)``, then the row sums ``r = c W' c``, ``c' = c / max(r, 1)`` and ``c' v``;
    - pass 3: the exchange: each pair's flux ``w (c'(p) (c' v)(q) - (c' v)(p) c'(q)) = w c'(p) c'(q) (v(q) - v(p))``
      is added to ``p`` and subtracted from ``q``, so activity is conserved to float32 rounding.

    Each pass pushes a pair's terms to both ends (``p`` and ``p + s``, ``s > 0``), so a range's sums are complete
    once that pass has run on it. Buffers are reused: pass 1 accumulates where ``m`` was (``m`` is read only ahead of
    pass 1) and pass 3 where ``a`` was (read only ahead of pass 3), each zeroed just before it is reached; pass 2
    leaves ``c'`` where its sums were and ``c' v`` where ``c`` was (``c`` is read only at and ahead of pass 2).
    """

    def __init__(
        self,
        torch: ModuleType,
        geometry: _FlatGeometry,
        pet: npt.NDArray[np.float32],
        guide: npt.NDArray[np.float32] | None,
        kernels: tuple[npt.NDArray[np.float64], ...],
        h: float,
        device: torch.device,
        cache: bool,
    ) -> None:
        self.torch = torch
        self.geo = geo = geometry
        pads = tuple((p, p) for p in geo.pads)

        def flat(vol: npt.NDArray[np.float32]) -> torch.Tensor:
            return torch.from_numpy(np.pad(np.asarray(vol, dtype=np.float32), pads, mode="reflect")).to(device).view(-1)

        self.v = flat(pet)
        self.g = self.v if guide is None else flat(guide)
        n = geo.padded_voxels
        f32 = torch.float32
        self.acc = [
            torch.zeros(n, dtype=f32, device=device),
            torch.zeros(n, dtype=f32, device=device),
            torch.empty(n, dtype=f32, device=device),
        ]
        z_n, y_n, x_n = geo.shape
        (pz, py, px) = geo.pads
        self.acc[1].view(geo.padded)[pz : pz + z_n, py : py + y_n, px : px + x_n] = 1.0  # m, until pass 1 gets there
        self.cleared = [n, 0, 0, 0]  # flat index up to which each pass's sums are zeroed
        self.taps = tuple((s, k) for s, k in zip(geo.strides, kernels) if k.size > 1)
        self.scale = _exponent_scale(kernels, h)
        self.zero = torch.zeros((), dtype=f32, device=device)
        span = geo.slab_voxels + 2 * geo.reach
        self.sq = torch.empty(span, dtype=f32, device=device)
        self.spare = torch.empty(span, dtype=f32, device=device)
        self.tmp = torch.empty(geo.slab_voxels, dtype=f32, device=device)  # the exchange's per-offset term
        self.field = None if cache else torch.empty(geo.slab_voxels, dtype=f32, device=device)
        self.plans: dict[int, list[FilterStep]] = {}
        ring = min(geo.ring, z_n) * geo.plane
        self.cache = torch.empty((len(geo.shifts), ring), dtype=f32, device=device) if cache else None

    def _filter_steps(self, n: int) -> list[FilterStep]:
        """The patch filter's operations for a range of ``n`` positions, as views of the scratch buffers (the same
        for every offset, so they are made once per length): ``(dst, a, b, centre, alpha)`` for ``dst = a + b``
        then ``dst = centre + alpha dst`` (further taps of wider kernels follow as ``(dst, tap, None, None, ratio)``);
        ``dst`` None is the caller's output."""
        if n in self.plans:
            return self.plans[n]
        steps: list[FilterStep] = []
        cur, other = self.sq[: n + 2 * self.geo.reach], self.spare
        for index, (stride, kernel) in enumerate(self.taps):
            r = kernel.size // 2
            m = cur.numel() - 2 * r * stride
            dst = None if index == len(self.taps) - 1 else other[:m]
            steps.append((dst, cur[:m], cur[2 * r * stride : 2 * r * stride + m], cur[r * stride : r * stride + m],
                          float(kernel[0] / kernel[r])))
            for k in range(1, r):
                ratio = float(kernel[k] / kernel[r])
                steps.append((dst, cur[k * stride : k * stride + m], None, None, ratio))
                steps.append((dst, cur[(2 * r - k) * stride : (2 * r - k) * stride + m], None, None, ratio))
            cur, other = (dst if dst is not None else cur), cur
        self.plans[n] = steps
        return steps

    def fields(self, lo: int, hi: int, at: int, first: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(shift, w)`` per half-window offset for the pairs of the flat range ``[lo, hi)``: computed (into
        the cache at ring offset ``at`` on pass 0, or into scratch without a cache) or read from the cache.

        ``w(p, p + s)`` comes from the squared difference of the comparison image and its shifted copy over the
        range plus the patch reach, scaled by ``-log2(e) / h**2`` (times the kernels' centre taps) in the same
        pass; the patch filter is linear, so its output is ``log2`` of the weight and ``exp2`` runs in place.
        """
        torch, n, e, shifts = self.torch, hi - lo, self.geo.reach, self.geo.shifts
        if self.cache is not None and not first:
            yield from zip(shifts, self.cache[:, at : at + n].unbind(0))
            return
        if self.cache is not None:
            outs: Iterable[torch.Tensor] = self.cache[:, at : at + n].unbind(0)
        else:
            assert self.field is not None
            outs = itertools.repeat(self.field[:n])
        steps = self._filter_steps(n)
        here = self.g[lo - e : hi + e]
        sq = self.sq[: n + 2 * e]
        for s, out in zip(shifts, outs):
            if not steps:
                sq = out
            torch.sub(here, self.g[lo - e + s : hi + e + s], out=sq)
            torch.addcmul(self.zero, sq, sq, value=self.scale, out=sq)
            for dst, a, b, centre, alpha in steps:
                d = out if dst is None else dst
                if b is None or centre is None:
                    d.add_(a, alpha=alpha)  # a further tap pair of a wider kernel
                else:
                    torch.add(a, b, out=d)
                    torch.add(centre, d, alpha=alpha, out=d)
            yield s, out.exp2_()

    def pieces(self, z0: int, z1: int) -> list[tuple[int, int, int]]:
        """Split slices ``[z0, z1)`` where the cache's ring wraps: ``(lo, hi, ring offset)`` flat ranges."""
        geo = self.geo
        out = []
        while z0 < z1:
            z_end = min(z1, (z0 // geo.ring + 1) * geo.ring)
            lo, hi = geo.flat(z0, z_end)
            out.append((lo, hi, (z0 % geo.ring) * geo.plane))
            z0 = z_end
        return out

    def run(self, out: npt.NDArray[np.float32], non_negative: bool) -> None:
        for step in self.geo.steps:
            for p, z0, z1 in step:
                self._clear(p, min(self.geo.padded_voxels, self.geo.flat(z0, z1)[1] + self.geo.max_shift))
                for lo, hi, at in self.pieces(z0, z1):
                    if p == 3:
                        self._exchange(lo, hi, at)
                    else:
                        self._sums(p, lo, hi, at)
                if p == 3:
                    self._finish(z0, z1, out, non_negative)
                else:
                    self._finalise(p, z0, z1)

    def _clear(self, p: int, upto: int) -> None:
        """Zero pass ``p``'s sums on the flat range it is about to reach that was not zeroed yet."""
        acc = self.acc[0] if p == 3 else self.acc[p]
        if upto > self.cleared[p]:
            acc[self.cleared[p] : upto].zero_()
            self.cleared[p] = upto

    def _sums(self, p: int, lo: int, hi: int, at: int) -> None:
        """Passes 0-2 on a flat range: push ``w x(q)`` to ``p`` and ``w x(p)`` to ``q = p + s``."""
        acc, x = self.acc[p], self.acc[p - 1] if p else self.acc[1]  # x: m, then a, then c
        acc_p, x_p = acc[lo:hi], x[lo:hi]
        for s, w in self.fields(lo, hi, at, first=p == 0):
            acc_p.addcmul_(w, x[lo + s : hi + s])
            acc[lo + s : hi + s].addcmul_(w, x_p)

    def _finalise(self, p: int, z0: int, z1: int) -> None:
        """Turn pass ``p``'s complete sums on slices ``[z0, z1)`` into the vector the next pass reads."""
        torch, geo = self.torch, self.geo
        lo, hi = geo.flat(z0, z1)
        acc = self.acc[p][lo:hi]
        if p == 0:
            acc.add_(1.0).rsqrt_()  # a = W**-1/2, W the row sums with the centre's weight 1
        elif p == 1:
            a = self.acc[0][lo:hi]
            acc.add_(a)  # (W a)(i) = a(i) + sum_{j != i} w(i, j) a(j)
            torch.div(a, acc, out=acc).sqrt_()  # c = sqrt(a / (W a)): one Sinkhorn step
        else:
            c = self.acc[1][lo:hi]
            acc.mul_(c).clamp_min_(1.0)  # l = max(r, 1), r = c (W' c) the off-diagonal row sums of diag(c) w diag(c)
            torch.div(c, acc, out=acc)  # c' = c / l (0 in the padding, where c is 0)
            # c' v in place of c: pass 2 reads c only at and ahead of its range, pass 3 (behind it) only c' and c' v.
            torch.mul(acc, self.v[lo:hi], out=c)
            if z1 == geo.shape[0]:  # behind the volume pass 2's sums were pushed, not turned into c' (0 there)
                self.acc[2][hi:].zero_()
        if p < 2:
            self._zero_padding(self.acc[p], z0, z1)

    def _zero_padding(self, arr: torch.Tensor, z0: int, z1: int) -> None:
        """Zero ``arr`` outside the volume on slices ``[z0, z1)`` (and behind the volume after the last slice), so
        that pairs reaching there drop out of the next pass."""
        geo = self.geo
        (pz, py, px), (z_n, y_n, x_n) = geo.pads, geo.shape
        grid = arr.view(geo.padded)
        slab = grid[pz + z0 : pz + z1]
        slab[:, :py].zero_()
        slab[:, py + y_n :].zero_()
        slab[:, py : py + y_n, :px].zero_()
        slab[:, py : py + y_n, px + x_n :].zero_()
        if z1 == z_n:
            grid[pz + z_n :].zero_()

    def _exchange(self, lo: int, hi: int, at: int) -> None:
        """Pass 3 on a flat range: add each pair's flux ``w (c'(p) (c' v)(q) - (c' v)(p) c'(q))`` to ``p`` and subtract
        it from ``p + s`` (sums where ``a`` was); ``c' = c / l`` and ``c' v`` come from pass 2 (``_finalise``)."""
        torch = self.torch
        n = hi - lo
        flux, cv, cl = self.acc[0], self.acc[1], self.acc[2]
        t = self.tmp[:n]
        flux_p, cv_p, cl_p = flux[lo:hi], cv[lo:hi], cl[lo:hi]
        for s, w in self.fields(lo, hi, at, first=False):
            torch.mul(cl_p, cv[lo + s : hi + s], out=t)
            t.addcmul_(cv_p, cl[lo + s : hi + s], value=-1.0)  # c'(p) c'(q) (v(q) - v(p))
            flux_p.addcmul_(w, t)  # the flux from p + s into p ...
            flux[lo + s : hi + s].addcmul_(w, t, value=-1.0)  # ... is what p + s loses

    def _finish(self, z0: int, z1: int, out: npt.NDArray[np.float32], non_negative: bool) -> None:
        """Write slices ``[z0, z1)`` of ``v + flux`` into ``out`` (their exchange sums are complete)."""
        geo = self.geo
        (pz, py, px), (_, y_n, x_n) = geo.pads, geo.shape
        inner = (slice(pz + z0, pz + z1), slice(py, py + y_n), slice(px, px + x_n))
        res = self.acc[0].view(geo.padded)[inner]
        res.add_(self.v.view(geo.padded)[inner])
        if non_negative:
            res.clamp_min_(0.0)  # float32 rounding only: the exact result is a convex combination of inputs >= 0
        out[z0:z1] = res.cpu().numpy()


def nonlocal_means(
    pet: npt.NDArray[np.float32],
    h: float,
    patch: Triple = (3, 3, 3),
    search: Triple = (5, 5, 5),
    *,
    gaussian_patch_weighting: bool = False,
    normalisation: Normalisation = "symmetric",
    chunk_slices: int | None = None,
    device: str = "cpu",
    guide: npt.NDArray[np.float32] | None = None,
    cache_bytes: int | None = None,
) -> npt.NDArray[np.float32]:
    """Filter a (z, y, x) volume with 3-D non-local means as defined in the module docstring.

    Parameters
    ----------
    pet : ndarray
        float32 (z, y, x) volume; not modified.
    h : float
        Filtering parameter in image units (> 0).
    patch, search : tuple of int
        Odd window sizes in voxels per axis (z, y, x).
    gaussian_patch_weighting : bool
        Gaussian patch kernel (sigma ``(p - 1) / 4`` voxels) instead of a uniform one.
    normalisation : {"symmetric", "row"}
        "symmetric": conserves total activity (doubly stochastic); "row": Buades et al., as scikit-image.
    chunk_slices : int or None
        z-slices per slab (memory bound: ``peak_memory_bytes``); None: ``default_chunk_slices``.
    device : str
        Torch device, e.g. "cpu" or "cuda:0".
    guide : ndarray, optional
        A volume of the same shape whose patches are compared instead of ``pet``'s (e.g. a pre-smoothed copy);
        the filter still averages ``pet``'s values, so activity is conserved as without it.
    cache_bytes : int or None
        Symmetric filter: the most bytes of pair weights kept between its passes (``weight_cache_bytes``); when the
        slabs in flight need more, every pass recomputes the weights (the same result, bit for bit, slower).
        None: ``CPU_WEIGHT_CACHE_BYTES`` or ``CUDA_WEIGHT_CACHE_BYTES``; 0: never cache. With ``chunk_slices``
        None the slab size is chosen with this bound (``default_chunk_slices``).

    Returns
    -------
    ndarray
        A new float32 volume of the same shape.
    """
    import torch

    if pet.ndim != 3:
        raise InvalidInputError(f"expected a 3-D (z, y, x) volume, got shape {pet.shape}")
    if not (math.isfinite(h) and h > 0):
        raise InvalidInputError(f"h must be a positive finite number, got {h!r}")
    for what, sizes in (("patch", patch), ("search", search)):
        if len(sizes) != 3 or any(int(s) != s or s < 1 or s % 2 == 0 for s in sizes):
            raise InvalidInputError(f"{what} must be three odd voxel counts >= 1, got {sizes!r}")
    if normalisation not in ("symmetric", "row"):
        raise InvalidInputError(f"normalisation must be 'symmetric' or 'row', got {normalisation!r}")
    if guide is not None and guide.shape != pet.shape:
        raise InvalidInputError(f"guide shape {guide.shape} differs from the volume's {pet.shape}")
    dev = torch.device(device)
    shape: Triple = (int(pet.shape[0]), int(pet.shape[1]), int(pet.shape[2]))
    patch = (int(patch[0]), int(patch[1]), int(patch[2]))
    search = (int(search[0]), int(search[1]), int(search[2]))
    if chunk_slices is None:
        chunk_slices = default_chunk_slices(shape, dev.type, normalisation, patch, search, cache_bytes)
    chunk_slices = max(1, min(int(chunk_slices), shape[0]))
    out = np.empty(shape, np.float32)
    kernels = tuple(patch_kernel_1d(p, gaussian_patch_weighting) for p in patch)
    if normalisation == "symmetric":
        cached = weight_cache_bytes(shape, patch, search, chunk_slices, cache_bytes, dev.type) > 0
        geometry = _FlatGeometry(shape, patch, search, chunk_slices)
        _SymmetricFilter(torch, geometry, pet, guide, kernels, h, dev, cached).run(out, bool(pet.min() >= 0))
        return out
    halo = [p // 2 + s // 2 for p, s in zip(patch, search)]

    # Reflect-padding once (numpy's, which also handles pads wider than the axis) lets every slab and offset be a
    # plain slice; the symmetric trick then is exact because both patches of a pair live in the same array.
    padded_np = np.pad(np.asarray(pet, dtype=np.float32), tuple((r, r) for r in halo), mode="reflect")
    padded = torch.from_numpy(padded_np).to(dev)
    del padded_np  # on a GPU the host copy is no longer needed (on a CPU ``padded`` shares it)
    guide_t = None
    if guide is not None:
        guide_np = np.pad(np.asarray(guide, dtype=np.float32), tuple((r, r) for r in halo), mode="reflect")
        guide_t = torch.from_numpy(guide_np).to(dev)
    pw = _PairWeights(torch, padded, shape, patch, search, gaussian_patch_weighting, h, chunk_slices, 2, guide=guide_t)
    _row_filter(pw, out)
    return out


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" when CUDA is present (else "cpu"); refuse a CUDA device that is not there."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DenoiserUnavailableError(f"nlm: invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DenoiserUnavailableError(f"nlm: device {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise DenoiserUnavailableError(f"nlm: device {device!r} is not supported (cpu, cuda, cuda:N or auto)")
    return str(dev)


class NLMDenoiser(Denoiser[NLMParams]):
    """3-D non-local means with windows in voxels or mm and h from the noise (module docstring: definition).

    Activity is conserved (symmetric normalisation, default). Inputs: PET, plus SPACING when a window is given in
    mm. Outputs: DENOISED. GPU preferred (``device_need``); deterministic. ``info``: ``h`` (image units),
    ``h_source`` ("given", "noise" or "std"), ``h_factor``, ``patch_vox`` and ``search_vox`` per axis (z, y, x),
    ``gaussian_patch_weighting``, ``normalisation``, ``guide_fwhm_mm``, ``device``, ``chunk_slices``,
    ``weight_cache_mb`` (pair weights kept between the symmetric filter's passes; 0: recomputed), ``seconds``.

    References
    ----------
    shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt, section III.E: NLM with a 3 x 3 x 3 patch and a
    5 x 5 x 5 search window (the default windows here; its h, the image std, is ``h_mode="std"``).
    """

    name = "nlm"
    Params = NLMParams
    # GPU preferred: the node sends NLM routes to a GPU lane when one is configured (``spec`` reads this too).
    device_need = DeviceNeed.GPU_PREFERRED

    @property
    def spec(self) -> DenoiserSpec:
        requires = {InputKind.PET}
        if self.params.needs_spacing:
            requires.add(InputKind.SPACING)
        return self.make_spec(requires=frozenset(requires), produces=frozenset({OutputKind.DENOISED}))

    def windows(self, spacing: tuple[float, float, float]) -> tuple[Triple, Triple]:
        """Return the (patch, search) window sizes in voxels per axis (z, y, x) for this spacing."""
        p = self.params
        patch = mm_to_odd_vox(p.patch_mm, spacing) if p.patch_mm is not None else (p.patch_vox,) * 3
        search = mm_to_odd_vox(p.search_mm, spacing) if p.search_mm is not None else (p.search_vox,) * 3
        return patch, search  # type: ignore[return-value]

    def filtering_h(self, pet: npt.NDArray[np.float32]) -> tuple[float, str]:
        """Return h in image units and where it came from ("given", "noise", "std")."""
        p = self.params
        if p.h is not None:
            return float(p.h), "given"
        estimate = estimate_image_std(pet) if p.h_mode == "std" else estimate_noise_sigma(pet)
        h = p.effective_h_factor * estimate
        if not h > 0:
            # A constant image (or constant body): any h gives the same result; keep one that cannot overflow.
            h = max(float(np.abs(pet).max()), 1.0) * 1e-3
            logger.debug("nlm: %s estimate is 0 (constant image); using h=%g", p.h_mode, h)
        return h, p.h_mode

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        start = time.perf_counter()
        device = resolve_device(self.device)
        spacing = (float(inputs.spacing[0]), float(inputs.spacing[1]), float(inputs.spacing[2]))
        patch, search = self.windows(spacing)
        h, source = self.filtering_h(inputs.pet)
        shape: Triple = (int(inputs.pet.shape[0]), int(inputs.pet.shape[1]), int(inputs.pet.shape[2]))
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        p = self.params
        cache_bytes = None if p.weight_cache_mb is None else int(p.weight_cache_mb * (1 << 20))
        if p.chunk_voxels is not None:
            chunk = chunk_slices_for(shape, p.chunk_voxels)
        else:
            chunk = default_chunk_slices(shape, device_type, p.normalisation, patch, search, cache_bytes)
        cached = 0
        if p.normalisation == "symmetric":
            cached = weight_cache_bytes(shape, patch, search, chunk, cache_bytes, device_type)
        guide_fwhm = self.params.effective_guide_fwhm_mm
        guide = gaussian_guide(inputs.pet, guide_fwhm, spacing) if guide_fwhm > 0 else None
        denoised = nonlocal_means(
            inputs.pet,
            h,
            patch,
            search,
            gaussian_patch_weighting=self.params.gaussian_patch_weighting,
            normalisation=self.params.normalisation,
            chunk_slices=chunk,
            device=device,
            guide=guide,
            cache_bytes=cache_bytes,
        )
        seconds = time.perf_counter() - start
        logger.debug("nlm: shape=%s patch=%s search=%s h=%g device=%s %.2f s", shape, patch, search, h, device, seconds)
        return DenoiseResult(
            denoised=denoised,
            info={
                "h": h,
                "h_source": source,
                "h_factor": self.params.effective_h_factor if source != "given" else 1.0,
                "patch_vox": list(patch),
                "search_vox": list(search),
                "gaussian_patch_weighting": self.params.gaussian_patch_weighting,
                "normalisation": self.params.normalisation,
                "guide_fwhm_mm": guide_fwhm,
                "device": device,
                "chunk_slices": chunk,
                "weight_cache_mb": round(cached / (1 << 20), 1),
                "seconds": round(seconds, 4),
            },
        )
