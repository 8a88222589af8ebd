"""2-D PET physics in PyTorch: a matched projector pair, attenuation, PSF, Poisson counts, thinning, MLEM and OSEM.

Used by ``training/`` to simulate (low-count, full-count) image pairs and by the BC-DPM sampler for its
"noise insertion in the sinogram domain" condition, ``P^dagger(Po(P(x) + r + s))`` (Shen et al. 2023,
``shared/papers/shen2023-bc-dpm-diffusion.txt``, section 3.1). The default simulation follows that paper's
section 4: a 2-D parallel-beam sinogram (160 radial bins x 192 angles there), uniform randoms as a fraction of the
trues (20 % there, 30 % in Gong et al. 2018, ``gong2018-finetuned-cnn-perceptual-loss.txt`` section III-A),
Poisson noise at a target number of events, and ML-EM reconstruction (100 to 120 iterations in both papers).
Dose fractions are made from the same full-count data by binomial thinning, the sinogram analogue of the
list-mode subsampling of Xu et al. 2017 (``xu2017-ultra-low-dose-unet.txt``: 0.5 % of the events for DRF 200).

Geometry
--------
An image is ``[..., H, W]`` with ``H == W == n_pix``; row ``i`` sits at ``v = (i - (n - 1) / 2) * pixel_mm``,
column ``j`` at ``u = (j - (n - 1) / 2) * pixel_mm``. The ray of angle ``phi_k = k * pi / n_angles`` and radial
bin ``r`` is the line ``u cos(phi) + v sin(phi) = s_r`` with ``s_r = (r - (n_radial - 1) / 2) * radial_mm``; so
angle 0 sums along the rows' direction (the sinogram row of angle 0 is the image's column profile). A sinogram
is ``[..., n_angles, n_radial]``. Projections are line integrals in mm (a uniform image of 1 projects to chord
lengths in mm), so ``exp(-forward(mu))`` with ``mu`` in 1/mm gives attenuation factors directly.

The projector is Joseph's method (linear interpolation between the two pixels that straddle the ray at each
row or column crossed), stored as one sparse CSR matrix and its explicit transpose. The back-projector *is* the
transpose of the forward matrix, so ``<A x, y> == <x, A^T y>`` holds to float rounding. Siddon's exact
intersection lengths (used in the BC-DPM paper) give the same line integrals but alias more with one ray per
bin; Joseph interpolation is smoother and vectorises well. Slices are independent: a 3-D volume is a batch of
2-D slices (no axial blur or oblique planes).

Everything batches over slices (the leading dimension); matrices are built on the CPU with numpy once per
projector and moved to the requested device, where ``torch.sparse`` (MKL on the CPU, cuSPARSE on CUDA) applies
them to all slices in one sparse-times-dense product.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from scipy import sparse

from denoisers.errors import InvalidInputError
from denoisers.gaussian import FWHM_PER_SIGMA, discrete_gaussian_kernel

logger = logging.getLogger(__name__)

__all__ = [
    "Iterates",
    "ParallelProjector",
    "Sinograms",
    "SystemModel",
    "make_generator",
    "mlem",
    "osem",
    "poisson_nll",
    "simulate_counts",
    "thin",
]

TensorLike = torch.Tensor | npt.NDArray[Any]
Callback = Callable[[int, torch.Tensor], None]

# Entries per numpy chunk while building a matrix: big enough to vectorise, small enough to stay in cache
# (building 128x128 / 160x192 in one piece spends most of its time on page faults of ~60 MB temporaries).
_BUILD_CHUNK_ENTRIES = 1 << 18


def make_generator(seed: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` from a seed (a generator is passed through, None stays None).

    The random streams of CPU and CUDA generators differ: the same seed gives different (equally valid) noise
    on different devices.
    """
    if isinstance(seed, torch.Generator):
        if seed.device.type != torch.device(device).type:
            raise InvalidInputError(f"the generator is on {seed.device}, the data on {device}: "
                                    "pass a generator of the data's device, or a seed")
        return seed
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def _joseph_matrix(
    n_pix: int, pixel_mm: float, radial_mm: float, n_radial: int, angles: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """CSR arrays (indptr, indices, data) of Joseph's projector; rows are (angle, radial) row-major.

    For each ray the dominant axis is the one it crosses most steeply: |sin(phi)| >= |cos(phi)| steps over
    columns and interpolates between rows, otherwise steps over rows and interpolates between columns. Each
    step contributes ``pixel_mm / |sin|`` (or ``/ |cos|``), the path length between two pixel centres, split
    linearly between the two neighbouring pixels; a neighbour outside the image counts as zero activity.
    """
    n = n_pix
    centre = (n - 1) / 2.0
    s = (np.arange(n_radial) - (n_radial - 1) / 2.0) * radial_mm
    c = (np.arange(n) - centre) * pixel_mm
    cos_p, sin_p = np.cos(angles), np.sin(angles)
    steep = np.abs(sin_p) >= np.abs(cos_p)
    a = np.where(steep, sin_p, cos_p)  # |a| >= 1/sqrt(2): never a division by ~0
    b = np.where(steep, cos_p, sin_p)
    steps = np.arange(n)[None, None, :, None]
    chunk = max(1, _BUILD_CHUNK_ENTRIES // (n_radial * n * 2))
    indices: list[npt.NDArray[np.int64]] = []
    data: list[npt.NDArray[np.float64]] = []
    counts: list[npt.NDArray[np.int64]] = []
    for k0 in range(0, len(angles), chunk):
        k = slice(k0, k0 + chunk)
        # fractional index along the interpolated axis, for every (angle, radial, step)
        f = (s[None, :, None] - c[None, None, :] * b[k, None, None]) / (a[k, None, None] * pixel_mm) + centre
        i0 = np.floor(f)
        frac = f - i0
        i0 = i0.astype(np.int64)
        length = (pixel_mm / np.abs(a[k]))[:, None, None, None]
        idx = np.stack([i0, i0 + 1], axis=-1)
        wts = np.stack([1.0 - frac, frac], axis=-1) * length
        keep = (idx >= 0) & (idx < n) & (wts > 0)
        pixel = np.where(steep[k, None, None, None], idx * n + steps, steps * n + idx)
        indices.append(pixel[keep])
        data.append(wts[keep])
        counts.append(keep.reshape(-1, n * 2).sum(axis=1))
    indptr = np.zeros(len(angles) * n_radial + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    return indptr, np.concatenate(indices), np.concatenate(data)


def _csr_transpose(
    indptr: npt.NDArray[np.int64], indices: npt.NDArray[np.int64], data: npt.NDArray[np.float64], n_cols: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """CSR arrays of the transpose (scipy's O(nnz) conversion; column indices come out sorted)."""
    t = sparse.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_cols)).T.tocsr()
    return t.indptr.astype(np.int64), t.indices.astype(np.int64), t.data


def _to_torch_csr(
    indptr: npt.NDArray[np.int64], indices: npt.NDArray[np.int64], data: npt.NDArray[np.float64],
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    # int32 indices: ~30 % faster SpMM with MKL and less memory; fine below 2**31 non-zeros.
    index_dtype = torch.int32 if len(indices) < 2**31 - 1 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr).to(index_dtype),
            torch.from_numpy(indices).to(index_dtype),
            torch.from_numpy(data).to(dtype),
            size=shape,
            check_invariants=False,
        ).to(device)


class _SparseApply(torch.autograd.Function):
    """``matrix @ x`` whose gradient uses the precomputed transpose (torch would transpose the CSR each time)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, matrix: torch.Tensor, matrix_t: torch.Tensor) -> torch.Tensor:
        ctx.matrix_t = matrix_t
        return matrix @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.matrix_t @ grad.contiguous(), None, None


def _batched(x: torch.Tensor, trailing: tuple[int, int], what: str) -> tuple[torch.Tensor, bool]:
    """``x`` as ``[B, *trailing]`` and whether a batch axis was added."""
    if x.dim() == 2 and tuple(x.shape) == trailing:
        return x.unsqueeze(0), True
    if x.dim() == 3 and tuple(x.shape[1:]) == trailing:
        return x, False
    raise InvalidInputError(f"{what} must have shape [B, {trailing[0]}, {trailing[1]}] or {list(trailing)}, "
                            f"got {list(x.shape)}")


class ParallelProjector:
    """2-D parallel-beam projector (Joseph's method) with its exact adjoint, batched over slices.

    Parameters
    ----------
    n_pix : int
        Image size (``n_pix`` x ``n_pix``).
    pixel_mm : float
        Pixel size in mm.
    n_radial, n_angles : int
        Sinogram size: radial bins and angles over [0, pi).
    radial_mm : float, optional
        Radial bin width in mm (default ``pixel_mm``). Pixels outside ``n_radial * radial_mm / 2`` of the centre
        are missed by some angles; pixels no ray reaches have zero sensitivity and reconstruct to 0.
    angles_rad : sequence of float, optional
        Explicit angles (overrides the uniform ``k * pi / n_angles``; ``n_angles`` must match its length).
    device : str or torch.device
        Where the matrices live and results are computed.
    dtype : torch.dtype
        float32 (default) or float64.

    Notes
    -----
    Inputs (tensors or numpy arrays) are converted to the projector's device and dtype. Memory: about
    16 bytes per non-zero (matrix and transpose, int32 indices); ~0.9 M non-zeros for 64 x 64 with 96 x 120,
    ~5.6 M for 128 x 128 with 160 x 192.
    """

    def __init__(
        self,
        n_pix: int,
        pixel_mm: float,
        n_radial: int,
        n_angles: int,
        radial_mm: float | None = None,
        *,
        angles_rad: Sequence[float] | npt.NDArray[np.float64] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if int(n_pix) != n_pix or n_pix < 1 or int(n_radial) != n_radial or n_radial < 1:
            raise InvalidInputError(f"n_pix and n_radial must be positive integers, got {n_pix!r}, {n_radial!r}")
        if not (math.isfinite(pixel_mm) and pixel_mm > 0):
            raise InvalidInputError(f"pixel_mm must be > 0, got {pixel_mm!r}")
        radial_mm = float(pixel_mm if radial_mm is None else radial_mm)
        if not (math.isfinite(radial_mm) and radial_mm > 0):
            raise InvalidInputError(f"radial_mm must be > 0, got {radial_mm!r}")
        if angles_rad is None:
            if int(n_angles) != n_angles or n_angles < 1:
                raise InvalidInputError(f"n_angles must be a positive integer, got {n_angles!r}")
            angles = np.arange(int(n_angles)) * (math.pi / int(n_angles))
        else:
            angles = np.asarray(angles_rad, dtype=np.float64).reshape(-1)
            if len(angles) != n_angles or len(angles) == 0 or not np.all(np.isfinite(angles)):
                raise InvalidInputError(f"angles_rad must hold n_angles={n_angles} finite angles, got {len(angles)}")
        if dtype not in (torch.float32, torch.float64):
            raise InvalidInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.n_pix = int(n_pix)
        self.pixel_mm = float(pixel_mm)
        self.n_radial = int(n_radial)
        self.radial_mm = radial_mm
        self.angles = angles
        self.device = torch.device(device)
        self.dtype = dtype
        self._subsets: dict[tuple[int, ...], ParallelProjector] = {}
        start = time.perf_counter()
        indptr, indices, data = _joseph_matrix(self.n_pix, self.pixel_mm, radial_mm, self.n_radial, angles)
        t_indptr, t_indices, t_data = _csr_transpose(indptr, indices, data, self.n_pix**2)
        self._matrix = _to_torch_csr(indptr, indices, data, (self.n_bins, self.n_pix**2), dtype, self.device)
        self._matrix_t = _to_torch_csr(t_indptr, t_indices, t_data, (self.n_pix**2, self.n_bins), dtype, self.device)
        self.nnz = len(data)
        logger.debug("projector %dx%d px %.3g mm -> %dx%d bins %.3g mm: %d non-zeros, built in %.2f s",
                     self.n_pix, self.n_pix, self.pixel_mm, self.n_angles, self.n_radial, radial_mm, self.nnz,
                     time.perf_counter() - start)

    @property
    def n_angles(self) -> int:
        """Number of projection angles."""
        return len(self.angles)

    @property
    def n_bins(self) -> int:
        """Sinogram bins per slice (angles x radial)."""
        return self.n_angles * self.n_radial

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        return (self.n_pix, self.n_pix)

    @property
    def sino_shape(self) -> tuple[int, int]:
        """``(n_angles, n_radial)`` of one sinogram."""
        return (self.n_angles, self.n_radial)

    def __repr__(self) -> str:
        return (f"ParallelProjector(n_pix={self.n_pix}, pixel_mm={self.pixel_mm}, n_radial={self.n_radial}, "
                f"n_angles={self.n_angles}, radial_mm={self.radial_mm}, device='{self.device}', dtype={self.dtype})")

    def as_tensor(self, x: TensorLike) -> torch.Tensor:
        """``x`` on this projector's device and dtype (no copy when it already is)."""
        return torch.as_tensor(x, dtype=self.dtype, device=self.device)

    def _apply(self, x: torch.Tensor, trailing_in: tuple[int, int], trailing_out: tuple[int, int],
               matrix: torch.Tensor, matrix_t: torch.Tensor, what: str) -> torch.Tensor:
        xb, added = _batched(self.as_tensor(x), trailing_in, what)
        batch = xb.shape[0]
        # [B, N] -> [N, B]: one sparse x dense product for the whole batch
        cols = xb.reshape(batch, -1).transpose(0, 1).contiguous()
        out = _SparseApply.apply(cols, matrix, matrix_t).transpose(0, 1).reshape(batch, *trailing_out)
        return out[0] if added else out

    def forward(self, x: TensorLike) -> torch.Tensor:
        """Line integrals (mm x image units) of ``x[B, H, W]`` (or ``[H, W]``) -> ``[B, n_angles, n_radial]``."""
        return self._apply(x, self.image_shape, self.sino_shape, self._matrix, self._matrix_t, "image")

    def adjoint(self, y: TensorLike) -> torch.Tensor:
        """Back-projection, the exact transpose of :meth:`forward`: ``[B, A, R]`` (or ``[A, R]``) -> ``[B, H, W]``."""
        return self._apply(y, self.sino_shape, self.image_shape, self._matrix_t, self._matrix, "sinogram")

    __call__ = forward

    def subset(self, angle_indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> ParallelProjector:
        """The projector restricted to some angles (for OSEM); built once per distinct subset and cached."""
        key = tuple(int(i) for i in np.asarray(angle_indices).reshape(-1))
        if not key or min(key) < 0 or max(key) >= self.n_angles:
            raise InvalidInputError(f"angle indices must be in [0, {self.n_angles}), got {key[:8]}...")
        if key not in self._subsets:
            self._subsets[key] = ParallelProjector(
                self.n_pix, self.pixel_mm, self.n_radial, len(key), self.radial_mm,
                angles_rad=self.angles[list(key)], device=self.device, dtype=self.dtype)
        return self._subsets[key]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ParallelProjector:
        """A copy on another device and/or dtype (the matrices are moved, not rebuilt)."""
        other = object.__new__(ParallelProjector)
        other.__dict__.update(self.__dict__)
        other.device = torch.device(device) if device is not None else self.device
        other.dtype = dtype or self.dtype
        other._subsets = {}
        other._matrix = self._matrix.to(device=other.device, dtype=other.dtype)
        other._matrix_t = self._matrix_t.to(device=other.device, dtype=other.dtype)
        return other


def _blur_matrix(fwhm_mm: float, step_mm: float, n: int) -> npt.NDArray[np.float64]:
    """Symmetric ``n x n`` Toeplitz matrix of a zero-padded Gaussian convolution (FWHM in mm, samples ``step_mm``).

    The kernel is the discrete Gaussian of ``denoisers.gaussian`` (exact variance even below a pixel). A dense
    matrix product beats ``conv1d`` / ``conv2d`` with one channel by 5 to 20 times on the CPU, and a symmetric
    matrix makes the blur self-adjoint.
    """
    kernel = discrete_gaussian_kernel(fwhm_mm / FWHM_PER_SIGMA / step_mm)
    r = (len(kernel) - 1) // 2
    offset = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.where(np.abs(offset) <= r, kernel[np.clip(offset + r, 0, 2 * r)], 0.0)


class SystemModel:
    """PET system matrix ``A = diag(attenuation) P G``: image-space Gaussian PSF, projection, attenuation.

    Parameters
    ----------
    projector : ParallelProjector
        Geometry, device and dtype.
    mu : tensor or array, optional
        Linear attenuation map in 1/mm, ``[H, W]`` (every slice) or ``[B, H, W]`` (one per slice); the
        attenuation factors ``exp(-P mu)`` are computed once here.
    psf_fwhm_mm : float, optional
        In-plane FWHM of the Gaussian resolution model (None or 0: none). The blur is a zero-padded separable
        convolution with a symmetric kernel, hence self-adjoint: ``adjoint`` stays the exact transpose.

    Notes
    -----
    ``forward`` / ``adjoint`` / ``sensitivity`` broadcast a single attenuation map over any batch; per-slice maps
    need a batch of the same size.
    """

    def __init__(self, projector: ParallelProjector, mu: TensorLike | None = None,
                 psf_fwhm_mm: float | None = None, *, _attenuation: torch.Tensor | None = None) -> None:
        self.projector = projector
        if psf_fwhm_mm is not None and not (math.isfinite(psf_fwhm_mm) and psf_fwhm_mm >= 0):
            raise InvalidInputError(f"psf_fwhm_mm must be >= 0, got {psf_fwhm_mm!r}")
        self.psf_fwhm_mm = float(psf_fwhm_mm) if psf_fwhm_mm else None
        self._blur: torch.Tensor | None = None
        if self.psf_fwhm_mm:
            self._blur = projector.as_tensor(_blur_matrix(self.psf_fwhm_mm, projector.pixel_mm, projector.n_pix))
        if _attenuation is not None:
            self.attenuation: torch.Tensor | None = _attenuation
        elif mu is not None:
            mu_t = projector.as_tensor(mu)
            mu_b, _ = _batched(mu_t, projector.image_shape, "mu")
            if not bool(torch.isfinite(mu_b).all()) or bool((mu_b < 0).any()):
                raise InvalidInputError("mu must be finite and >= 0 (1/mm)")
            self.attenuation = torch.exp(-projector.forward(mu_b))  # [Bm, A, R]
        else:
            self.attenuation = None

    @property
    def device(self) -> torch.device:
        """The projector's device."""
        return self.projector.device

    @property
    def dtype(self) -> torch.dtype:
        """The projector's dtype."""
        return self.projector.dtype

    def blur(self, x: TensorLike) -> torch.Tensor:
        """The PSF ``G`` (identity without one) on ``[B, H, W]``; ``G`` is symmetric so this is also ``G^T``."""
        xt = self.projector.as_tensor(x)
        if self._blur is None:
            return xt
        _batched(xt, self.projector.image_shape, "image")  # shape check only
        # separable: columns then rows; K is symmetric so K x K is K x K^T
        return torch.matmul(torch.matmul(self._blur, xt), self._blur)

    def _check_batch(self, batch: int) -> None:
        if self.attenuation is not None and self.attenuation.shape[0] not in (1, batch):
            raise InvalidInputError(f"the attenuation map has {self.attenuation.shape[0]} slices, the data {batch}")

    def forward(self, x: TensorLike) -> torch.Tensor:
        """Expected trues per unit scale: ``a * P(G x)``, ``[B, H, W]`` (or ``[H, W]``) -> ``[B, A, R]``."""
        y = self.projector.forward(self.blur(x))
        if self.attenuation is not None:
            self._check_batch(y.shape[0] if y.dim() == 3 else 1)
            y = y * (self.attenuation if y.dim() == 3 else self.attenuation[0])
        return y

    def adjoint(self, y: TensorLike) -> torch.Tensor:
        """Exact transpose of :meth:`forward`: ``G^T P^T (a * y)``."""
        yt = self.projector.as_tensor(y)
        if self.attenuation is not None:
            self._check_batch(yt.shape[0] if yt.dim() == 3 else 1)
            yt = yt * (self.attenuation if yt.dim() == 3 else self.attenuation[0])
        return self.blur(self.projector.adjoint(yt))

    __call__ = forward

    def sensitivity(self) -> torch.Tensor:
        """Sensitivity image ``A^T 1``: ``[1, H, W]``, or ``[B, H, W]`` with per-slice attenuation."""
        batch = 1 if self.attenuation is None else self.attenuation.shape[0]
        ones = torch.ones((batch, *self.projector.sino_shape), dtype=self.dtype, device=self.device)
        return self.adjoint(ones)

    def subset(self, angle_indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> SystemModel:
        """The model restricted to some projection angles (OSEM subsets)."""
        idx = [int(i) for i in np.asarray(angle_indices).reshape(-1)]
        att = None if self.attenuation is None else self.attenuation[:, idx, :].contiguous()
        return SystemModel(self.projector.subset(idx), psf_fwhm_mm=self.psf_fwhm_mm, _attenuation=att)


@dataclass(frozen=True)
class Sinograms:
    """One simulated acquisition, ``[B, A, R]`` each; expected values are noise-free means in counts.

    ``trues == scale[:, None, None] * system.forward(activity)``, so a reconstruction ``x`` of ``prompts`` with
    the same ``system`` is in activity units after :meth:`to_activity` (division by ``scale``).

    Attributes
    ----------
    prompts : torch.Tensor
        Poisson counts (float dtype, integer values).
    trues, scatter, randoms : torch.Tensor
        Expected true, scattered and random coincidences.
    scale : torch.Tensor
        ``[B]`` counts per (activity unit x mm) of line integral; 0 for slices without activity.
    """

    prompts: torch.Tensor
    trues: torch.Tensor
    scatter: torch.Tensor
    randoms: torch.Tensor
    scale: torch.Tensor = field(repr=False)

    @property
    def additive(self) -> torch.Tensor:
        """Expected scatter + randoms: the additive term of the reconstruction model."""
        return self.scatter + self.randoms

    @property
    def expected(self) -> torch.Tensor:
        """Expected prompts (trues + scatter + randoms)."""
        return self.trues + self.scatter + self.randoms

    def thin(self, fraction: float, generator: torch.Generator | int | None = None) -> Sinograms:
        """A dose fraction of this acquisition: prompts thinned binomially, expectations and scale scaled."""
        return replace(
            self,
            prompts=thin(self.prompts, fraction, generator),
            trues=self.trues * fraction,
            scatter=self.scatter * fraction,
            randoms=self.randoms * fraction,
            scale=self.scale * fraction,
        )

    def to_activity(self, image: torch.Tensor) -> torch.Tensor:
        """A reconstruction ``[B, H, W]`` of these prompts in the simulated activity's units (0 where scale is 0)."""
        scale = self.scale.to(image.dtype).view(-1, *([1] * (image.dim() - 1)))
        return torch.where(scale > 0, image / torch.where(scale > 0, scale, 1), 0)


def _smooth_radial(y: torch.Tensor, fwhm_mm: float, radial_mm: float) -> torch.Tensor:
    """Gaussian smoothing of ``[B, A, R]`` along the radial axis (zero padded)."""
    matrix = torch.as_tensor(_blur_matrix(fwhm_mm, radial_mm, y.shape[-1]), dtype=y.dtype, device=y.device)
    return torch.matmul(y, matrix)


def simulate_counts(
    activity: TensorLike,
    system: SystemModel,
    total_counts: float,
    randoms_fraction: float = 0.0,
    scatter_fraction: float = 0.0,
    generator: torch.Generator | int | None = None,
    *,
    counts_per: Literal["volume", "slice"] = "volume",
    scatter_fwhm_mm: float | None = None,
) -> Sinograms:
    """Noisy prompts from an activity image: trues, smooth scatter, uniform randoms, Poisson noise.

    Parameters
    ----------
    activity : tensor or array
        ``[B, H, W]`` (or ``[H, W]``), non-negative, any activity unit.
    system : SystemModel
        Projector, attenuation and PSF.
    total_counts : float
        Expected number of prompts (all events: trues + scatter + randoms), in the whole batch
        (``counts_per="volume"``: hotter slices get more counts) or in every slice (``"slice"``, as the 2-D
        simulation of the BC-DPM paper: 1 M, 0.3 M, 0.1 M events per slice).
    randoms_fraction, scatter_fraction : float
        Expected randoms and scatter as fractions of the expected trues of each slice (BC-DPM: randoms 0.2;
        Gong 2018: randoms 0.3 for the brain, randoms + scatter 0.6 for the torso).
    generator : torch.Generator or int, optional
        Seeded noise (a generator on the system's device, or a seed). None uses torch's global generator.
    counts_per : {"volume", "slice"}
        See ``total_counts``.
    scatter_fwhm_mm : float, optional
        Scatter shape: the expected trues smoothed along the radial axis by a Gaussian of this FWHM (default
        a quarter of the radial field of view), then scaled to ``scatter_fraction`` of the trues per slice.
        Randoms are uniform over the sinogram of each slice.

    Returns
    -------
    Sinograms
        Prompts and the expected components; with ``scale`` to map reconstructions back to activity units.
    """
    if not (math.isfinite(total_counts) and total_counts > 0):
        raise InvalidInputError(f"total_counts must be > 0, got {total_counts!r}")
    for name, value in (("randoms_fraction", randoms_fraction), ("scatter_fraction", scatter_fraction)):
        if not (math.isfinite(value) and value >= 0):
            raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
    if counts_per not in ("volume", "slice"):
        raise InvalidInputError(f"counts_per must be 'volume' or 'slice', got {counts_per!r}")
    proj = system.projector
    x, added = _batched(proj.as_tensor(activity), proj.image_shape, "activity")
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise InvalidInputError("activity must be finite and >= 0")
    gen = make_generator(generator, proj.device)

    trues = system.forward(x).clamp_min_(0)  # clamp: float rounding only; the operator is non-negative
    per_slice = trues.sum(dim=(1, 2), dtype=torch.float64)  # [B]
    if scatter_fraction > 0:
        fwhm = scatter_fwhm_mm if scatter_fwhm_mm is not None else 0.25 * proj.n_radial * proj.radial_mm
        if not (math.isfinite(fwhm) and fwhm > 0):
            raise InvalidInputError(f"scatter_fwhm_mm must be > 0, got {scatter_fwhm_mm!r}")
        shape = _smooth_radial(trues, fwhm, proj.radial_mm)
        shape_sum = shape.sum(dim=(1, 2), dtype=torch.float64)
        factor = torch.where(shape_sum > 0, scatter_fraction * per_slice / shape_sum.clamp_min(1e-300), 0)
        scatter = shape * factor.to(trues.dtype).view(-1, 1, 1)
    else:
        scatter = torch.zeros_like(trues)
    randoms = (randoms_fraction * per_slice / proj.n_bins).to(trues.dtype).view(-1, 1, 1).expand_as(trues)
    randoms = randoms.contiguous()

    events_per_unit = per_slice * (1.0 + randoms_fraction + scatter_fraction)  # expected prompts at scale 1
    if counts_per == "volume":
        total = events_per_unit.sum()
        if not total > 0:
            raise InvalidInputError("the activity projects to zero: nothing to scale to total_counts")
        scale = torch.full_like(per_slice, total_counts) / total
    else:
        scale = torch.where(events_per_unit > 0, total_counts / events_per_unit.clamp_min(1e-300), 0)
        if not bool((scale > 0).any()):
            raise InvalidInputError("the activity projects to zero: nothing to scale to total_counts")
    s = scale.to(trues.dtype).view(-1, 1, 1)
    trues, scatter, randoms = trues * s, scatter * s, randoms * s
    prompts = torch.poisson(trues + scatter + randoms, generator=gen)
    result = Sinograms(prompts=prompts, trues=trues, scatter=scatter, randoms=randoms, scale=scale.to(trues.dtype))
    logger.debug("simulated %d slice(s): %.4g prompts expected, %.4g drawn", x.shape[0],
                 float(result.expected.sum()), float(prompts.sum()))
    if added:
        return Sinograms(prompts[0], trues[0], scatter[0], randoms[0], result.scale)
    return result


def thin(counts: TensorLike, fraction: float, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """Keep each count independently with probability ``fraction`` (binomial thinning).

    Thinning Poisson(lambda) data gives exactly Poisson(fraction * lambda) data, so dose fractions (1/2, 1/5,
    1/10, 1/200) made from one full-count acquisition are statistically valid low-dose acquisitions that share
    their events with it, like list-mode subsampling.
    """
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise InvalidInputError(f"fraction must be in (0, 1], got {fraction!r}")
    c = torch.as_tensor(counts)
    if not c.is_floating_point():
        c = c.to(torch.float32)
    if bool((c < 0).any()) or not bool(torch.equal(c, torch.round(c))):
        raise InvalidInputError("counts must be non-negative integers")
    if fraction == 1:
        return c.clone()
    gen = make_generator(generator, c.device)
    return torch.binomial(c, torch.full_like(c, fraction), generator=gen)


def poisson_nll(x: TensorLike, prompts: TensorLike, system: SystemModel,
                additive: TensorLike | None = None) -> torch.Tensor:
    """Poisson negative log-likelihood per slice, ``sum(ybar - y log ybar)`` with ``ybar = A x + additive``.

    The constant ``sum(log y!)`` is left out. Returns ``[B]`` (a 0-d tensor for unbatched input); ``inf`` where
    a bin with counts has zero expectation.
    """
    y = system.projector.as_tensor(prompts)
    ybar = system.forward(x)
    if additive is not None:
        ybar = ybar + system.projector.as_tensor(additive)
    nll = ybar - torch.xlogy(y, ybar)
    return nll.sum(dim=(-2, -1))


def _check_recon_inputs(prompts: TensorLike, system: SystemModel, additive: TensorLike | None,
                        x0: TensorLike | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]:
    proj = system.projector
    y, added = _batched(proj.as_tensor(prompts), proj.sino_shape, "prompts")
    if not bool(torch.isfinite(y).all()) or bool((y < 0).any()):
        raise InvalidInputError("prompts must be finite and >= 0")
    add = None
    if additive is not None:
        add = proj.as_tensor(additive)
        add = add.unsqueeze(0) if add.dim() == 2 else add
        if add.shape[1:] != y.shape[1:] or add.shape[0] not in (1, y.shape[0]):
            raise InvalidInputError(f"additive has shape {list(add.shape)}, prompts {list(y.shape)}")
        if not bool(torch.isfinite(add).all()) or bool((add < 0).any()):
            raise InvalidInputError("additive (scatter + randoms) must be finite and >= 0")
    start = None
    if x0 is not None:
        start, _ = _batched(proj.as_tensor(x0), proj.image_shape, "x0")
        if start.shape[0] not in (1, y.shape[0]):
            raise InvalidInputError(f"x0 has {start.shape[0]} slices, the prompts {y.shape[0]}")
        start = start.expand(y.shape[0], -1, -1).clone()
        if not bool(torch.isfinite(start).all()) or bool((start < 0).any()):
            raise InvalidInputError("x0 must be finite and >= 0")
    return y, add, start, added


def _uniform_start(y: torch.Tensor, add: torch.Tensor | None, sens: torch.Tensor) -> torch.Tensor:
    """A uniform image whose projection holds the measured net counts (so early iterates are on scale)."""
    net = y.sum(dim=(1, 2))
    if add is not None:
        net = net - add.sum(dim=(1, 2))
    level = net.clamp_min(0) / sens.sum(dim=(1, 2)).clamp_min(torch.finfo(y.dtype).tiny)
    level = torch.where(level > 0, level, torch.ones_like(level))  # empty slice: any positive start works
    return level.view(-1, 1, 1) * (sens > 0).to(y.dtype)


def _inverse(sens: torch.Tensor) -> torch.Tensor:
    """``1 / sens``, 0 where the sensitivity is 0 (pixels no ray sees reconstruct to 0)."""
    return torch.where(sens > 0, 1.0 / sens, 0)


def _em_update(x: torch.Tensor, y: torch.Tensor, add: torch.Tensor | None, system: SystemModel,
               inv_sens: torch.Tensor) -> torch.Tensor:
    ybar = system.forward(x)
    if add is not None:
        ybar = ybar.add_(add)
    # 0 where ybar == 0: such a bin only sees pixels that are zero (and stay zero) whatever its counts
    ratio = torch.where(ybar > 0, y / ybar, 0)
    return system.adjoint(ratio).mul_(x).mul_(inv_sens)


def mlem(
    prompts: TensorLike,
    system: SystemModel,
    additive: TensorLike | None = None,
    n_iter: int = 100,
    x0: TensorLike | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """ML-EM reconstruction with an additive (scatter + randoms) term, batched over slices.

    ``x <- x / s * A^T(y / (A x + additive))`` with ``s = A^T 1`` (Shepp and Vardi 1982); iterates stay
    non-negative and the Poisson likelihood never decreases. Pixels of zero sensitivity are 0.

    Parameters
    ----------
    prompts : ``[B, A, R]`` (or ``[A, R]``) counts.
    system : SystemModel
    additive : ``[B, A, R]``, ``[1, A, R]`` or ``[A, R]``, optional
        Expected scatter + randoms, in counts.
    n_iter : int
        Iterations (the papers use 100 to 120).
    x0 : ``[B, H, W]`` or ``[H, W]``, optional
        Start (non-negative); default a uniform image matching the net counts.
    callback : callable, optional
        ``callback(iteration, image)`` after each iteration (1-based); ``image`` is the live iterate, so clone
        what you keep (see :class:`Iterates`).

    Returns
    -------
    torch.Tensor
        ``[B, H, W]`` (``[H, W]`` for unbatched prompts), in the units of ``system`` times counts; divide by
        :attr:`Sinograms.scale` (:meth:`Sinograms.to_activity`) for activity units.
    """
    return osem(prompts, system, additive, n_iter=n_iter, n_subsets=1, x0=x0, callback=callback)


def osem(
    prompts: TensorLike,
    system: SystemModel,
    additive: TensorLike | None = None,
    n_iter: int = 10,
    n_subsets: int = 8,
    x0: TensorLike | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """OSEM (Hudson and Larkin 1994): one EM update per subset of angles; ``n_subsets=1`` is ML-EM.

    Subset ``m`` holds angles ``m, m + n_subsets, ...`` (interleaved, so each subset spans the half circle).
    ``callback(iteration, image)`` runs after each full iteration (all subsets). Other parameters and the
    result as in :func:`mlem`.
    """
    if int(n_iter) != n_iter or n_iter < 0:
        raise InvalidInputError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    n_angles = system.projector.n_angles
    if int(n_subsets) != n_subsets or not 1 <= n_subsets <= n_angles:
        raise InvalidInputError(f"n_subsets must be an integer in [1, {n_angles}], got {n_subsets!r}")
    y, add, x, added = _check_recon_inputs(prompts, system, additive, x0)
    if n_subsets == 1:
        parts = [(system, y, add, _inverse(system.sensitivity()))]
    else:
        parts = []
        for m in range(n_subsets):
            idx = list(range(m, n_angles, n_subsets))
            sub = system.subset(idx)
            parts.append((sub, y[:, idx, :], None if add is None else add[:, idx, :], _inverse(sub.sensitivity())))
    if x is None:
        x = _uniform_start(y, add, system.sensitivity())
    x = x.expand(y.shape[0], -1, -1).contiguous()
    start = time.perf_counter()
    for it in range(1, int(n_iter) + 1):
        for sub, y_m, add_m, inv_sens_m in parts:
            x = _em_update(x, y_m, add_m, sub, inv_sens_m)
        if callback is not None:
            callback(it, x[0] if added else x)
    logger.debug("%s: %d slice(s), %d iteration(s) x %d subset(s) in %.2f s", "MLEM" if n_subsets == 1 else "OSEM",
                 y.shape[0], n_iter, n_subsets, time.perf_counter() - start)
    return x[0] if added else x


class Iterates:
    """A callback for :func:`mlem` / :func:`osem` that keeps copies of chosen iterates (for iteration sweeps).

    Examples
    --------
    >>> keep = Iterates({10, 50, 100})          # doctest: +SKIP
    >>> x = mlem(y, system, additive, n_iter=100, callback=keep)  # doctest: +SKIP
    >>> keep.images[50].shape                   # doctest: +SKIP
    """

    def __init__(self, iterations: Collection[int] | None = None) -> None:
        self.iterations = None if iterations is None else frozenset(int(i) for i in iterations)
        self.images: dict[int, torch.Tensor] = {}

    def __call__(self, iteration: int, image: torch.Tensor) -> None:
        if self.iterations is None or iteration in self.iterations:
            self.images[iteration] = image.detach().clone()
