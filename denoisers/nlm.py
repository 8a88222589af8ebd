"""Non-local means (NLM): the classical patch-based baseline of the PET denoising papers, in 3-D, in PyTorch.

Definition (the one ``tests/denoisers/test_nlm.py`` checks against plain loops). With the volume ``v`` reflect-padded
(``numpy.pad(mode="reflect")``), for every voxel ``i`` and every offset ``d`` of the search window ``S``::

    D(i, d) = sum_k g(k) * (v(i + k) - v(i + d + k))**2      k over the patch window, sum_k g(k) = 1
    w(i, d) = exp(-D(i, d) / h**2)
    u(i)    = sum_{d in S} w(i, d) v(i + d) / sum_{d in S} w(i, d)

``g`` is uniform (``gaussian_patch_weighting=False``) or a separable Gaussian with a standard deviation of
``(p - 1) / 4`` voxels per axis for a patch of ``p`` voxels along it (Buades et al.; the width scikit-image's slow
mode uses). So ``D`` is a weighted *mean* squared difference and ``h`` is in image units, as in scikit-image's slow
mode (its fast mode's box is not quite this one: see ``training/bench_speed.py``). The centre voxel (d = 0) gets
the weight the definition gives it,
``exp(0) = 1`` (Buades et al. 2005), not the maximum of the other weights. The result is a convex combination of
input values: non-negative input gives non-negative output. The window sizes are odd voxel counts per axis,
given in voxels or in mm (then converted per axis through the spacing, so windows may be anisotropic).

The filtering parameter ``h`` is given (``h``), or ``h_factor`` times an estimate from the image: ``h_mode="std"``
uses the standard deviation of the voxels inside the body, as the NLM baseline of Gong et al. 2018 does (patch
3 x 3 x 3, search window 5 x 5 x 5, "the standard deviation of the NLM Gaussian weighting function was set to be
the standard deviation of the image"); ``h_mode="noise"`` uses an estimate of the noise standard deviation
(``estimate_noise_sigma``).

How it is fast. The loop runs over search offsets, each a whole-slab tensor operation (no per-voxel Python), and
uses that ``D(i, d) = D(i - d, -d)`` shifted: one distance field per pair of opposite offsets feeds both, which
halves the distance and ``exp`` work. Patch distances are separable filters (z, then y, then x) of the squared
difference volume; scale and sign are folded into the squaring so that ``exp`` runs in place. The volume is
processed in slabs of whole z-slices with a halo, which bounds memory (``peak_memory_bytes``; with the default
slab about 2.2 times the volume beyond the input, e.g. 65 MB for 200 x 192 x 192, as measured) and keeps the
working set in cache on a CPU. All arithmetic is float32; results do not depend on the slab size beyond float32
rounding, nor on the run (no atomics, fixed order). On 2 CPU cores, 200 x 192 x 192 with patch 3 and search 5
takes about 1.0-1.1 s against 7.1 s for scikit-image's fast mode (``training/bench_speed.py``); the torch op
sequence is memory-bound, about 13 passes over the slab per pair of offsets.

Inputs: PET (+ SPACING when a window is given in mm). Outputs: DENOISED. GPU preferred (CUDA when the instance's
device is "cuda", "cuda:N", or "auto" with CUDA present); runs on CPU. Deterministic.
``info``: ``h``, ``h_source``, ``patch_vox``, ``search_vox``, ``gaussian_patch_weighting``, ``device``,
``chunk_slices``, ``seconds``.

References
----------
shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt (section III.E, the NLM reference method).
A. Buades, B. Coll, J.-M. Morel, "A non-local algorithm for image denoising", CVPR 2005.
J. Darbon et al., "Fast nonlocal filtering applied to electron cryomicroscopy", ISBI 2008 (loop over offsets).
D. L. Donoho, I. M. Johnstone, "Ideal spatial adaptation by wavelet shrinkage", Biometrika 81(3), 1994 (MAD).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
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


class NLMParams(DenoiserParams):
    """Window sizes (voxels or mm), filtering parameter and memory bound of the NLM filter.

    ``patch_vox`` / ``search_vox`` and ``patch_mm`` / ``search_mm`` are mutually exclusive per window. ``h`` is
    absolute (image units, e.g. Bq/ml); without it ``h = h_factor * estimate`` (``h_mode``). ``chunk_voxels``
    bounds the voxels per slab of whole z-slices (at least one slice); None picks a device default.
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
    h_factor: float = Field(1.0, gt=0, strict=True, allow_inf_nan=False, description="h = h_factor * estimate")
    h_mode: Literal["std", "noise"] = Field("std", description="estimate: image std in the body, or noise sigma")
    gaussian_patch_weighting: bool = Field(True, strict=True, description="Gaussian (True) or uniform patch kernel")
    chunk_voxels: int | None = Field(None, ge=1, strict=True, description="max voxels per slab; None: device default")

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


def peak_memory_bytes(shape: Triple, patch: Triple, search: Triple, chunk_slices: int) -> int:
    """Return the peak memory of ``nonlocal_means`` beyond its input, in bytes (float32 everywhere).

    ``4 * [(Z + 2Rz)(Y + 2Ry)(X + 2Rx)  +  Z Y X  +  2 c Y X  +  2 (c + 2Rz)(Y + 2Ry)(X + 2Rx)]``: the padded copy,
    the output, the slab's sum and weight accumulators (``c`` slices) and two scratch buffers for the distances of
    a slab with its halo, where ``R = search // 2 + patch // 2`` per axis. On a GPU the padded copy, the slab
    buffers and one slab of output live on the device; the output array is on the host.
    """
    z, y, x = shape
    rz, ry, rx = (s // 2 + p // 2 for s, p in zip(search, patch))
    padded = (z + 2 * rz) * (y + 2 * ry) * (x + 2 * rx)
    scratch = (chunk_slices + 2 * rz) * (y + 2 * ry) * (x + 2 * rx)
    return 4 * (padded + z * y * x + 2 * chunk_slices * y * x + 2 * scratch)


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


def nonlocal_means(
    pet: npt.NDArray[np.float32],
    h: float,
    patch: Triple = (3, 3, 3),
    search: Triple = (5, 5, 5),
    *,
    gaussian_patch_weighting: bool = True,
    chunk_slices: int | None = None,
    device: str = "cpu",
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
    chunk_slices : int or None
        z-slices per slab (memory bound: ``peak_memory_bytes``); None: one slab of ``CPU_CHUNK_VOXELS`` or
        ``CUDA_CHUNK_VOXELS`` voxels.
    device : str
        Torch device, e.g. "cpu" or "cuda:0".

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
    dev = torch.device(device)
    shape: Triple = (int(pet.shape[0]), int(pet.shape[1]), int(pet.shape[2]))
    z_n, y_n, x_n = shape
    if chunk_slices is None:
        budget = CUDA_CHUNK_VOXELS if dev.type == "cuda" else CPU_CHUNK_VOXELS
        chunk_slices = chunk_slices_for(shape, budget)
    chunk_slices = max(1, min(int(chunk_slices), z_n))

    kernels = tuple(patch_kernel_1d(int(p), gaussian_patch_weighting) for p in patch)
    pz, py, px = prad = (int(patch[0]) // 2, int(patch[1]) // 2, int(patch[2]) // 2)
    srad = (int(search[0]) // 2, int(search[1]) // 2, int(search[2]) // 2)
    hz, hy, hx = halo = (pz + srad[0], py + srad[1], px + srad[2])

    # Reflect-padding once (numpy's, which also handles pads wider than the axis) lets every slab and offset be a
    # plain slice; the symmetric trick then is exact because both patches of a pair live in the same array.
    padded_np = np.pad(np.asarray(pet, dtype=np.float32), tuple((r, r) for r in halo), mode="reflect")
    padded = torch.from_numpy(padded_np).to(dev)
    del padded_np  # on a GPU the host copy is no longer needed (on a CPU ``padded`` shares it)
    out = np.empty(shape, np.float32)
    offsets = _half_offsets(srad)

    # Scratch sized for the largest slab with its halo; views are carved per offset (no allocation in the loop).
    box = (chunk_slices + 2 * hz) * (y_n + 2 * hy) * (x_n + 2 * hx)
    scratch = (torch.empty(box, dtype=torch.float32, device=dev), torch.empty(box, dtype=torch.float32, device=dev))
    acc_buf = torch.empty(chunk_slices * y_n * x_n, dtype=torch.float32, device=dev)
    wsum_buf = torch.empty_like(acc_buf)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    # The exponent's factor, clamped to float32: an infinite one would turn 0 * inf into NaN for identical patches
    # (with a tiny h only identical patches count, which the clamp still gives).
    h2 = h * h
    scale = -math.prod(float(k[k.size // 2]) for k in kernels) / h2 if h2 > 0 else -math.inf
    scale = max(scale, -float(np.finfo(np.float32).max))

    for z0 in range(0, z_n, chunk_slices):
        z1 = min(z_n, z0 + chunk_slices)
        nz = z1 - z0
        acc = acc_buf[: nz * y_n * x_n].view(nz, y_n, x_n)
        wsum = wsum_buf[: nz * y_n * x_n].view(nz, y_n, x_n)
        acc.copy_(padded[hz + z0 : hz + z1, hy : hy + y_n, hx : hx + x_n])  # the centre, weight exp(0) = 1
        wsum.fill_(1.0)
        for dz, dy, dx in offsets:
            # The distance field of offset d over the slab and the slab shifted by -d (for offset -d).
            lo = (hz + z0 - max(dz, 0), hy - max(dy, 0), hx - max(dx, 0))
            hi = (hz + z1 + max(-dz, 0), hy + y_n + max(-dy, 0), hx + x_n + max(-dx, 0))
            ext = [b - a + 2 * p for a, b, p in zip(lo, hi, prad)]
            a = padded[lo[0] - pz : hi[0] + pz, lo[1] - py : hi[1] + py, lo[2] - px : hi[2] + px]
            b = padded[
                lo[0] - pz + dz : hi[0] + pz + dz, lo[1] - py + dy : hi[1] + py + dy, lo[2] - px + dx : hi[2] + px + dx
            ]
            sq = scratch[0][: math.prod(ext)].view(ext)
            torch.sub(a, b, out=sq)
            # Square, scale by -1/h**2 (times the kernels' centre taps) and negate in one pass; the filters are
            # linear, so what comes out of them is the exponent itself and exp runs in place.
            torch.addcmul(zero, sq, sq, value=scale, out=sq)
            weights = _separable_filter(torch, sq, kernels, scratch[1]).exp_()
            oz, oy, ox = max(dz, 0), max(dy, 0), max(dx, 0)
            w_fwd = weights[oz : oz + nz, oy : oy + y_n, ox : ox + x_n]
            wsum.add_(w_fwd)
            acc.addcmul_(w_fwd, padded[hz + z0 + dz : hz + z1 + dz, hy + dy : hy + y_n + dy, hx + dx : hx + x_n + dx])
            oz, oy, ox = max(-dz, 0), max(-dy, 0), max(-dx, 0)
            w_bwd = weights[oz : oz + nz, oy : oy + y_n, ox : ox + x_n]
            wsum.add_(w_bwd)
            acc.addcmul_(w_bwd, padded[hz + z0 - dz : hz + z1 - dz, hy - dy : hy + y_n - dy, hx - dx : hx + x_n - dx])
        torch.div(acc, wsum, out=acc)
        out[z0:z1] = acc.cpu().numpy() if dev.type != "cpu" else acc.numpy()
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
    """3-D non-local means with windows in voxels or mm and h from the image (module docstring: definition).

    Inputs: PET, plus SPACING when a window is given in mm. Outputs: DENOISED. GPU preferred; deterministic.
    ``info``: ``h`` (image units), ``h_source`` ("given", "std" or "noise"), ``h_factor``, ``patch_vox`` and
    ``search_vox`` per axis (z, y, x), ``gaussian_patch_weighting``, ``device``, ``chunk_slices``, ``seconds``.

    References
    ----------
    shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt, section III.E: NLM with a 3 x 3 x 3 patch, a
    5 x 5 x 5 search window and h equal to the standard deviation of the image (the defaults here).
    """

    name = "nlm"
    Params = NLMParams

    @property
    def spec(self) -> DenoiserSpec:
        requires = {InputKind.PET}
        if self.params.uses_mm:
            requires.add(InputKind.SPACING)
        return DenoiserSpec(
            requires=frozenset(requires),
            produces=frozenset({OutputKind.DENOISED}),
            device=DeviceNeed.GPU_PREFERRED,
        )

    def windows(self, spacing: tuple[float, float, float]) -> tuple[Triple, Triple]:
        """Return the (patch, search) window sizes in voxels per axis (z, y, x) for this spacing."""
        p = self.params
        patch = mm_to_odd_vox(p.patch_mm, spacing) if p.patch_mm is not None else (p.patch_vox,) * 3
        search = mm_to_odd_vox(p.search_mm, spacing) if p.search_mm is not None else (p.search_vox,) * 3
        return patch, search  # type: ignore[return-value]

    def filtering_h(self, pet: npt.NDArray[np.float32]) -> tuple[float, str]:
        """Return h in image units and where it came from ("given", "std", "noise")."""
        p = self.params
        if p.h is not None:
            return float(p.h), "given"
        estimate = estimate_image_std(pet) if p.h_mode == "std" else estimate_noise_sigma(pet)
        h = p.h_factor * estimate
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
        denoised = nonlocal_means(
            inputs.pet,
            h,
            patch,
            search,
            gaussian_patch_weighting=self.params.gaussian_patch_weighting,
            chunk_slices=chunk,
            device=device,
        )
        seconds = time.perf_counter() - start
        logger.debug("nlm: shape=%s patch=%s search=%s h=%g device=%s %.2f s", shape, patch, search, h, device, seconds)
        return DenoiseResult(
            denoised=denoised,
            info={
                "h": h,
                "h_source": source,
                "h_factor": self.params.h_factor if source != "given" else 1.0,
                "patch_vox": list(patch),
                "search_vox": list(search),
                "gaussian_patch_weighting": self.params.gaussian_patch_weighting,
                "device": device,
                "chunk_slices": chunk,
                "seconds": round(seconds, 4),
            },
        )
