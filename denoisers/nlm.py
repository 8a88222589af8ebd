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
    b(i, j) = c(i) w(i, j) c(j) / max(r(i), r(j), 1)       symmetric, and every row sums to at most 1
    u(i)  = v(i) + sum_{j != i} b(i, j) (v(j) - v(i))

What ``i`` takes from ``j`` it gives back, so total activity is conserved exactly (to float32 rounding), a constant
image is unchanged, and ``u(i)`` is a convex combination of input values (non-negative input, non-negative output).
Balancing ``diag(c) w diag(c)`` towards unit row sums (Sinkhorn-Knopp; P. Milanfar, "Symmetrizing smoothing
filters", SIAM J. Imaging Sci. 6(1), 2013) keeps the smoothing of the row filter where patches are common; the
``max(r, 1)`` limiter, active only where one balancing step overshoots, keeps every row convex without breaking the
symmetry. Mass moves only between voxels within one search window, so there is no global rescaling and no regional
bias beyond the smoothing itself. It costs four passes over the weights instead of one (row sums, balancing,
row sums of the balanced filter, the exchange).

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

How it is fast. Each pass loops over search offsets, each a whole-slab tensor operation (no per-voxel Python), and
uses that ``w(i, i + d) = w(j, j - d)`` for ``j = i + d``: one distance field per pair of opposite offsets feeds both,
which halves the distance and ``exp`` work and makes the symmetric filter's pair weights bitwise equal. Patch
distances are separable filters (z, then y, then x) of the squared difference volume; scale and sign are folded into
the squaring so that ``exp`` runs in place. The volume is processed in slabs of whole z-slices with a halo, which
bounds memory (``peak_memory_bytes``) and keeps the working set in cache on a CPU. All arithmetic is float32;
results do not depend on the slab size beyond float32 rounding, nor on the run (no atomics, fixed order). On the
2-core development machine, 200 x 192 x 192 with patch 3 and search 5 took 0.94 s with the row normalisation on 2
threads and 1.44 s on one, against 8.3 s for scikit-image's fast mode (single-threaded), and 4.1-4.7 s with the
symmetric normalisation on 2 threads (``training/bench_speed.py``).

Inputs: PET (+ SPACING when a window is given in mm or the comparison image is pre-smoothed, the default). Outputs: DENOISED. GPU preferred (CUDA when the instance's
device is "cuda", "cuda:N", or "auto" with CUDA present); runs on CPU. Deterministic.
``info``: ``h``, ``h_source``, ``h_factor``, ``patch_vox``, ``search_vox``, ``gaussian_patch_weighting``,
``normalisation``, ``device``, ``chunk_slices``, ``seconds``.

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
import logging
import math
import time
from collections.abc import Iterator
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

# torch is imported lazily (validating a rules file must not pay for it), but a missing torch must still make the
# registry report this plugin as unavailable rather than fail at the first series.
if importlib.util.find_spec("torch") is None:
    raise ImportError("the nlm denoiser needs PyTorch (pip install torch)")

logger = logging.getLogger(__name__)

Triple = tuple[int, int, int]

BODY_FRACTION = 0.01
"""Voxels above this fraction of the image maximum count as "inside the body" for the h estimates."""

MAD_TO_SIGMA = 1.0 / 0.6744897501960817  # Gaussian: sigma = MAD / Phi^-1(3/4)

CPU_CHUNK_VOXELS = 1 << 18
"""Default slab size on a CPU (7 slices of 192 x 192): the temporaries of a slab stay in cache without the halo
and per-op overheads of thinner slabs. Measured on 2 cores, 200 x 192 x 192: 3 slices 1.5 s, 5-14 slices
1.0-1.1 s, 30-100 slices 1.05-1.15 s."""

CUDA_CHUNK_VOXELS = 1 << 25
"""Default slab size on a GPU: a whole typical PET volume in one go (under 1 GB of temporaries)."""

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
    one slice); None picks a device default.
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
    even = pet[tuple(slice(0, n - n % 2) if n >= 2 else slice(None) for n in pet.shape)].astype(np.float64)
    inside = body_mask(pet)[tuple(slice(0, n - n % 2) if n >= 2 else slice(None) for n in pet.shape)]
    coeff = np.zeros(1)
    all_inside = np.ones(1, bool)
    for corner in np.ndindex(*(2 if axis in axes else 1 for axis in range(3))):
        sel = tuple(slice(c, None, 2) if axis in axes else slice(None) for axis, c in enumerate(corner))
        sign = -1.0 if sum(corner) % 2 else 1.0
        coeff = coeff + sign * even[sel]
        all_inside = all_inside & inside[sel]
    coeff = np.abs(coeff[all_inside] if all_inside.any() else coeff.ravel()) / math.sqrt(2.0 ** len(axes))
    return float(np.median(coeff) * MAD_TO_SIGMA)


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


def peak_memory_bytes(
    shape: Triple, patch: Triple, search: Triple, chunk_slices: int, normalisation: Normalisation = "symmetric"
) -> int:
    """Return the peak memory of ``nonlocal_means`` beyond its input, in bytes (float32 everywhere).

    With ``P = (Z + 2Rz)(Y + 2Ry)(X + 2Rx)`` the padded volume, ``R = search // 2 + patch // 2`` per axis,
    ``V = Z Y X``, ``c`` slices per slab and ``B = (c + 2Rz)(Y + 2Ry)(X + 2Rx)`` a slab with its halo:

    - row: ``4 (P + V + 2 c Y X + 2 B)``: the padded copy, the output, the slab's sum and weight accumulators and two
      scratch buffers for the distances;
    - symmetric: ``4 (3 P + 2 V + c Y X + 4 B)``: the padded copy and two padded per-voxel vectors (balancing scale
      and row-sum limiter), one volume of neighbour sums, the output, one slab accumulator and four scratch buffers.

    On a GPU all but the output live on the device; the output array is on the host.
    """
    z, y, x = shape
    rz, ry, rx = (s // 2 + p // 2 for s, p in zip(search, patch))
    padded = (z + 2 * rz) * (y + 2 * ry) * (x + 2 * rx)
    scratch = (chunk_slices + 2 * rz) * (y + 2 * ry) * (x + 2 * rx)
    volume, slab = z * y * x, chunk_slices * y * x
    if normalisation == "row":
        return 4 * (padded + volume + 2 * slab + 2 * scratch)
    return 4 * (3 * padded + 2 * volume + slab + 4 * scratch)


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
        # The exponent's factor, clamped to float32: an infinite one would turn 0 * inf into NaN for identical
        # patches (with a tiny h only identical patches count, which the clamp still gives).
        h2 = h * h
        scale = -math.prod(float(k[k.size // 2]) for k in self.kernels) / h2 if h2 > 0 else -math.inf
        self.scale = max(scale, -float(np.finfo(np.float32).max))

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
            # Square, scale by -1/h**2 (times the kernels' centre taps) and negate in one pass; the filters are
            # linear, so what comes out of them is the exponent itself and exp runs in place.
            torch.addcmul(self.zero, sq, sq, value=self.scale, out=sq)
            yield (dz, dy, dx), lo, _separable_filter(torch, sq, self.kernels, self.scratch[1]).exp_()

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


def _neighbour_sums(pw: _PairWeights, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out(i) = sum_{j != i} w(i, j) x(j)`` over the search window; ``x`` is on the padded grid, 0 outside the
    volume, so neighbours outside it drop out."""
    for z0, z1 in pw.slabs():
        nz = z1 - z0
        acc = out[z0:z1]
        acc.zero_()
        for d, _, w in pw.pairs(z0, z1):
            acc.addcmul_(pw.forward(w, d, nz), pw.voxels(x, z0, z1, d))
            acc.addcmul_(pw.backward(w, d, nz), pw.voxels(x, z0, z1, (-d[0], -d[1], -d[2])))


def _exchange(
    pw: _PairWeights,
    scale: torch.Tensor,
    limit: torch.Tensor | None,
    out: npt.NDArray[np.float32],
    non_negative: bool,
) -> None:
    """``u(i) = v(i) + sum_j b(i, j) (v(j) - v(i))`` with ``b(i, j) = s(i) w(i, j) s(j) / max(l(i), l(j))`` into
    ``out``; ``scale`` (0 outside the volume) and ``limit`` (None: all 1) are on the padded grid.

    Each pair's flux ``f = b(p, p + d) (v(p + d) - v(p))`` is computed once on the field of positions ``p`` and added
    to ``p`` and subtracted from ``p + d``, so what one voxel gains its partner loses.
    """
    torch, padded = pw.torch, pw.padded
    _, y_n, x_n = pw.shape
    acc_buf = torch.empty(pw.chunk * y_n * x_n, dtype=torch.float32, device=padded.device)
    for z0, z1 in pw.slabs():
        nz = z1 - z0
        acc = acc_buf[: nz * y_n * x_n].view(nz, y_n, x_n)
        acc.zero_()
        for d, lo, w in pw.pairs(z0, z1):
            size = w.shape
            tmp_a = pw.scratch[2][: w.numel()].view(size)
            tmp_b = pw.scratch[3][: w.numel()].view(size)
            torch.mul(pw.region(scale, lo, size), pw.region(scale, lo, size, d), out=tmp_a)
            if limit is not None:
                torch.maximum(pw.region(limit, lo, size), pw.region(limit, lo, size, d), out=tmp_b)
                tmp_a.div_(tmp_b)
            torch.sub(pw.region(padded, lo, size, d), pw.region(padded, lo, size), out=tmp_b)
            w.mul_(tmp_a).mul_(tmp_b)  # the flux from p + d into p
            acc.add_(pw.forward(w, d, nz))
            acc.sub_(pw.backward(w, d, nz))
        acc.add_(pw.voxels(padded, z0, z1))
        if non_negative:
            acc.clamp_min_(0.0)  # float32 rounding only: the exact result is a convex combination of inputs >= 0
        out[z0:z1] = acc.cpu().numpy() if acc.device.type != "cpu" else acc.numpy()


def _symmetric_filter(pw: _PairWeights, out: npt.NDArray[np.float32], non_negative: bool) -> None:
    """The symmetric, doubly stochastic filter of the module docstring (four passes over the weights)."""
    torch, padded = pw.torch, pw.padded
    (hz, hy, hx), (z_n, y_n, x_n) = pw.halo, pw.shape
    # The balancing scale on the padded grid, 0 outside the volume: neighbours there drop out of every sum, which
    # keeps the filter symmetric (a reflected neighbour is another voxel's copy, not a partner that gives back).
    scale = torch.zeros_like(padded)
    inner = scale[hz : hz + z_n, hy : hy + y_n, hx : hx + x_n]
    sums = torch.empty((z_n, y_n, x_n), dtype=torch.float32, device=padded.device)
    inner.fill_(1.0)
    _neighbour_sums(pw, scale, sums)
    inner.copy_(sums.add_(1.0).rsqrt_())  # a = W**-1/2, W the row sums with the centre's weight 1
    _neighbour_sums(pw, scale, sums)
    sums.add_(inner)  # (W a)(i) = a(i) + sum_{j != i} w(i, j) a(j)
    inner.copy_(torch.div(inner, sums, out=sums).sqrt_())  # c = sqrt(a / (W a)): one Sinkhorn step
    _neighbour_sums(pw, scale, sums)
    rows = sums.mul_(inner)  # r = c * (W' c): off-diagonal row sums of diag(c) w diag(c)
    limit = None
    if float(rows.max()) > 1.0:
        limit = torch.ones_like(padded)
        limit[hz : hz + z_n, hy : hy + y_n, hx : hx + x_n].copy_(rows.clamp_min_(1.0))
    del sums, rows
    _exchange(pw, scale, limit, out, non_negative)


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
        z-slices per slab (memory bound: ``peak_memory_bytes``); None: one slab of ``CPU_CHUNK_VOXELS`` or
        ``CUDA_CHUNK_VOXELS`` voxels.
    device : str
        Torch device, e.g. "cpu" or "cuda:0".
    guide : ndarray, optional
        A volume of the same shape whose patches are compared instead of ``pet``'s (e.g. a pre-smoothed copy);
        the filter still averages ``pet``'s values, so activity is conserved as without it.

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
    dev = torch.device(device)
    shape: Triple = (int(pet.shape[0]), int(pet.shape[1]), int(pet.shape[2]))
    if chunk_slices is None:
        budget = CUDA_CHUNK_VOXELS if dev.type == "cuda" else CPU_CHUNK_VOXELS
        chunk_slices = chunk_slices_for(shape, budget)
    chunk_slices = max(1, min(int(chunk_slices), shape[0]))
    halo = [int(p) // 2 + int(s) // 2 for p, s in zip(patch, search)]

    # Reflect-padding once (numpy's, which also handles pads wider than the axis) lets every slab and offset be a
    # plain slice; the symmetric trick then is exact because both patches of a pair live in the same array.
    padded_np = np.pad(np.asarray(pet, dtype=np.float32), tuple((r, r) for r in halo), mode="reflect")
    padded = torch.from_numpy(padded_np).to(dev)
    del padded_np  # on a GPU the host copy is no longer needed (on a CPU ``padded`` shares it)
    guide_t = None
    if guide is not None:
        if guide.shape != pet.shape:
            raise InvalidInputError(f"guide shape {guide.shape} differs from the volume's {pet.shape}")
        guide_np = np.pad(np.asarray(guide, dtype=np.float32), tuple((r, r) for r in halo), mode="reflect")
        guide_t = torch.from_numpy(guide_np).to(dev)
    out = np.empty(shape, np.float32)
    symmetric = normalisation == "symmetric"
    pw = _PairWeights(
        torch, padded, shape, patch, search, gaussian_patch_weighting, h, chunk_slices, 4 if symmetric else 2,
        guide=guide_t,
    )
    if symmetric:
        _symmetric_filter(pw, out, non_negative=bool(pet.min() >= 0))
    else:
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
    ``gaussian_patch_weighting``, ``normalisation``, ``device``, ``chunk_slices``, ``seconds``.

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
        shape = inputs.pet.shape
        budget = self.params.chunk_voxels
        if budget is None:
            budget = CUDA_CHUNK_VOXELS if device.startswith("cuda") else CPU_CHUNK_VOXELS
        chunk = chunk_slices_for((shape[0], shape[1], shape[2]), budget)
        guide_fwhm = self.params.effective_guide_fwhm_mm
        guide = None
        if guide_fwhm > 0:
            from scipy import ndimage

            sigma = [guide_fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / s for s in spacing]
            guide = ndimage.gaussian_filter(inputs.pet.astype(np.float32), sigma, mode="reflect")
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
                "seconds": round(seconds, 4),
            },
        )
