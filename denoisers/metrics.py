"""Image-quality metrics for denoised PET, each written as the cited paper defines it.

Conventions shared by every function:

- ``image`` is the image under test (denoised, or a noisy input), ``reference`` / ``truth`` the ground truth on the
  same grid and in the same units (SUV or Bq/ml: every metric here is a ratio or in the image's own units, never a
  unit conversion).
- Masks and ROIs are boolean arrays of the image's shape (an integer label map is refused rather than silently used
  as fancy indices: write ``labels == k``). An empty mask is an error, not a NaN.
- Multi-realization metrics take ``realizations`` as an array of shape ``(R, *image_shape)`` (or a sequence of R
  images), one independent noise realization each.
- Everything is computed in float64; bad shapes, empty masks, non-finite values and undefined ratios raise
  :class:`denoisers.errors.InvalidInputError` (a ``ValueError``) with a message naming the argument.

Papers (copies in shared/papers):

- [Xu2017] J. Xu et al., "200x Low-dose PET Reconstruction using Deep Learning", arXiv 2017: eq. (4) SSIM,
  eq. (6) NRMSE, eq. (7) PSNR, computed inside a brain mask.
- [Gong2018] K. Gong et al., "PET Image Denoising Using a Deep Neural Network Through Fine Tuning", IEEE TRPMS
  2018: eq. (6) CRC, eq. (7) background STD, eq. (8) tumour contrast recovery CR.
- [Wang2004] Z. Wang et al., "Image quality assessment: from error visibility to structural similarity",
  IEEE TIP 13(4), 2004 (SSIM with an 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03).
- [DIP] the conditional-DIP stability-map paper: peak-to-valley ratio in small nuclei vs white-matter STD.
- [Clinical] the clinical DCNN vs Gaussian paper: SUVmax / SUVmean / SUVpeak in VOIs compared between images.
- [PERCIST] R. L. Wahl et al., J Nucl Med 50 (2009) 122S: SUVpeak = mean in a 1 cm^3 sphere placed for the
  highest mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from denoisers.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "background_std",
    "background_std_from_means",
    "crc",
    "crc_from_means",
    "ensemble_std",
    "lesion_contrast_recovery",
    "nrmse",
    "peak_to_valley_ratio",
    "psnr",
    "roi_means",
    "roi_std",
    "ssim",
    "ssim_map",
    "suv_max_bias",
    "suv_mean_bias",
    "suv_peak",
    "suv_peak_bias",
    "total_activity_ratio",
    "tumor_contrast_recovery",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
RoiStat = Literal["mean", "max", "min", "median"]

SSIM_SIGMA = 1.5  # [Wang2004] Gaussian window sigma, in voxels
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> the 11-tap window of [Wang2004] (also scikit-image's)
SSIM_K1 = 0.01
SSIM_K2 = 0.03

_STATS: dict[str, Callable[[FloatArray], float]] = {
    "mean": lambda v: float(np.mean(v)),
    "max": lambda v: float(np.max(v)),
    "min": lambda v: float(np.min(v)),
    "median": lambda v: float(np.median(v)),
}


# --------------------------------------------------------------------------------------------------- validation


def _image(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidInputError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.size == 0:
        raise InvalidInputError(f"{name} must be a non-empty array, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values ({int((~np.isfinite(arr)).sum())} voxels)")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise InvalidInputError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _mask(mask: npt.ArrayLike | None, shape: tuple[int, ...], name: str) -> BoolArray | None:
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise InvalidInputError(
            f"{name} must be a boolean array, got dtype {arr.dtype} (for a label map write labels == k)"
        )
    if arr.shape != shape:
        raise InvalidInputError(f"{name} has shape {arr.shape} but the image has shape {shape}")
    if not arr.any():
        raise InvalidInputError(f"{name} is empty (no voxel is True)")
    return arr


def _required_mask(mask: npt.ArrayLike, shape: tuple[int, ...], name: str) -> BoolArray:
    if mask is None:
        raise InvalidInputError(f"{name} is required")
    checked = _mask(mask, shape, name)
    assert checked is not None  # _mask only returns None for None
    return checked


def _values(arr: FloatArray, mask: BoolArray | None) -> FloatArray:
    return arr.ravel() if mask is None else arr[mask]


def _realizations(realizations: npt.ArrayLike | Sequence[npt.ArrayLike], name: str) -> FloatArray:
    if isinstance(realizations, np.ndarray):
        stack = realizations
    else:
        try:
            stack = np.stack([np.asarray(r) for r in realizations])  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{name}: the realizations must be images of one shape ({exc})") from exc
    arr = _image(stack, name)
    if arr.ndim < 2:
        raise InvalidInputError(f"{name} must have shape (R, *image_shape), got {arr.shape}")
    return arr


def _rois(rois: npt.ArrayLike | Sequence[npt.ArrayLike], shape: tuple[int, ...], name: str) -> list[BoolArray]:
    """One boolean mask of ``shape``, a stack ``(K, *shape)``, or a sequence of K masks -> list of K masks."""
    if isinstance(rois, np.ndarray) and rois.shape == shape:
        items: list[npt.ArrayLike] = [rois]
    elif isinstance(rois, np.ndarray) and rois.ndim == len(shape) + 1:
        items = list(rois)
    elif isinstance(rois, np.ndarray):
        raise InvalidInputError(f"{name} has shape {rois.shape}; expected {shape} or (K, *{shape})")
    else:
        items = list(rois)  # type: ignore[arg-type]
    if not items:
        raise InvalidInputError(f"{name} holds no ROI")
    return [_required_mask(m, shape, f"{name}[{k}]") for k, m in enumerate(items)]


def _check_realizations_vs_shape(stack: FloatArray, shape: tuple[int, ...], name: str) -> None:
    if stack.shape[1:] != shape:
        raise InvalidInputError(
            f"{name} has shape {stack.shape}; expected (R, *{shape}) to match the ROIs / truth"
        )


def _ratio(num: float, den: float, what: str) -> float:
    if den == 0.0:
        raise InvalidInputError(f"{what} is undefined: its denominator is zero")
    return num / den


# --------------------------------------------------------------------------------------------------- [Xu2017]


def psnr(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    *,
    peak: float | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB, [Xu2017] eq. (7): ``20 log10(MAX / sqrt(MSE))``.

    Parameters
    ----------
    image, reference
        Test image and ground truth, same shape.
    mask
        Boolean body/brain mask: the MSE is the mean over its voxels only, and MAX is taken inside it (as
        [Xu2017] computes every metric after applying a brain mask). ``None`` uses every voxel.
    peak
        MAX; default the maximum of ``reference`` inside the mask ("the peak intensity of the image").

    Returns
    -------
    float
        PSNR in dB; ``inf`` when the images are identical inside the mask.
    """
    x, y = _image(image, "image"), _image(reference, "reference")
    _same_shape(x, y, "image", "reference")
    m = _mask(mask, y.shape, "mask")
    yv = _values(y, m)
    peak_value = float(yv.max()) if peak is None else float(peak)
    if not math.isfinite(peak_value) or peak_value <= 0.0:
        raise InvalidInputError(f"PSNR needs a positive peak (MAX), got {peak_value}")
    mse = float(np.mean((_values(x, m) - yv) ** 2))
    if mse == 0.0:
        return math.inf
    return 20.0 * math.log10(peak_value / math.sqrt(mse))


def nrmse(image: npt.ArrayLike, reference: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Normalised RMSE, [Xu2017] eq. (6): ``sqrt(sum (x - y)^2 / sum y^2)`` with ``y`` the reference.

    Normalised by the reference's energy (not its range or mean), so scaling the test image down is not rewarded.

    Parameters
    ----------
    image, reference
        Test image ``x`` and ground truth ``y``, same shape.
    mask
        Boolean mask; both sums run over its voxels only. ``None`` uses every voxel.

    Returns
    -------
    float
        NRMSE as a fraction (0 for identical images).
    """
    x, y = _image(image, "image"), _image(reference, "reference")
    _same_shape(x, y, "image", "reference")
    m = _mask(mask, y.shape, "mask")
    xv, yv = _values(x, m), _values(y, m)
    energy = float(np.sum(yv**2))
    return math.sqrt(_ratio(float(np.sum((xv - yv) ** 2)), energy, "NRMSE (reference is all zero in the mask)"))


def ssim_map(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    data_range: float,
    mode: Literal["2d", "3d"] = "2d",
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> FloatArray:
    """Local SSIM at every voxel, [Xu2017] eq. (4) = [Wang2004] eq. (13) with a Gaussian window.

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``; means, variances and covariance are Gaussian-weighted
    (sigma in voxels, truncated at 3.5 sigma: 11 taps for sigma 1.5) population moments, as in [Wang2004].
    Volume edges use half-sample reflection (scipy ``mode="reflect"``), so the map has the image's shape; it
    equals scikit-image's ``structural_similarity(..., gaussian_weights=True, full=True)`` map.

    Parameters
    ----------
    image, reference
        Same shape, at least 2-D.
    data_range
        ``L`` (> 0).
    mode
        ``"2d"``: windows within each slice of the last two axes (axial slices of a (z, y, x) volume, as
        [Xu2017] evaluates 2-D slices; no smoothing across the often coarser z spacing). ``"3d"``: an isotropic
        window over every axis.
    sigma, k1, k2
        Window width (voxels) and the stabilising constants of [Wang2004].

    Returns
    -------
    numpy.ndarray
        float64 map of ``image``'s shape, values in [-1, 1].
    """
    x, y = _image(image, "image"), _image(reference, "reference")
    _same_shape(x, y, "image", "reference")
    if x.ndim < 2:
        raise InvalidInputError(f"SSIM needs an image of at least 2 dimensions, got shape {x.shape}")
    if mode not in ("2d", "3d"):
        raise InvalidInputError(f"mode must be '2d' or '3d', got {mode!r}")
    if not (math.isfinite(data_range) and data_range > 0.0):
        raise InvalidInputError(f"data_range must be positive, got {data_range}")
    if not sigma > 0.0:
        raise InvalidInputError(f"sigma must be positive, got {sigma}")
    sigmas = [sigma] * x.ndim if mode == "3d" else [0.0] * (x.ndim - 2) + [sigma, sigma]  # sigma 0: axis untouched

    def blur(a: FloatArray) -> FloatArray:
        return ndimage.gaussian_filter(a, sigmas, mode="reflect", truncate=SSIM_TRUNCATE)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(
    image: npt.ArrayLike,
    reference: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    *,
    data_range: float | None = None,
    mode: Literal["2d", "3d"] = "2d",
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> float:
    """Mean SSIM, [Xu2017] eq. (4) / [Wang2004], averaged over the mask.

    The local map (:func:`ssim_map`) is computed on the whole images, so windows at the mask border still see
    the real neighbouring voxels of both images, and then averaged over the mask's voxels (``None``: every voxel,
    including the edge strip scikit-image crops).

    Parameters
    ----------
    image, reference
        Test image and ground truth, same shape, at least 2-D.
    mask
        Boolean body/brain mask for the average and for the default data range.
    data_range
        ``L``; default ``max - min`` of ``reference`` inside the mask ("data range from the reference").
    mode, sigma, k1, k2
        As in :func:`ssim_map` (default per-slice 2-D, sigma 1.5, K1 0.01, K2 0.03).

    Returns
    -------
    float
        Mean SSIM (1 for identical images).
    """
    x, y = _image(image, "image"), _image(reference, "reference")
    _same_shape(x, y, "image", "reference")
    m = _mask(mask, y.shape, "mask")
    if data_range is None:
        yv = _values(y, m)
        data_range = float(yv.max() - yv.min())
        if data_range <= 0.0:
            raise InvalidInputError("SSIM data range of the reference is zero (constant in the mask): pass data_range")
    smap = ssim_map(x, y, data_range=data_range, mode=mode, sigma=sigma, k1=k1, k2=k2)
    return float(_values(smap, m).mean())


# ------------------------------------------------------------------------------------------------- [Gong2018]


def roi_means(
    realizations: npt.ArrayLike | Sequence[npt.ArrayLike],
    rois: npt.ArrayLike | Sequence[npt.ArrayLike],
) -> FloatArray:
    """Mean of each ROI in each realization: the ``a_{r,k}`` / ``b_{r,k}`` of [Gong2018] eqs. (6)-(7).

    Parameters
    ----------
    realizations
        ``(R, *shape)`` array or sequence of R images.
    rois
        One boolean mask of ``shape``, a ``(K, *shape)`` boolean stack, or a sequence of K masks.

    Returns
    -------
    numpy.ndarray
        ``(R, K)`` float64 ROI means.
    """
    stack = _realizations(realizations, "realizations")
    masks = _rois(rois, stack.shape[1:], "rois")
    flat = stack.reshape(stack.shape[0], -1)
    return np.stack([flat[:, np.flatnonzero(m)].mean(axis=1) for m in masks], axis=1)


def crc_from_means(
    hot_means: npt.ArrayLike,
    background_means: npt.ArrayLike,
    hot_true: float,
    background_true: float,
) -> float:
    """Contrast recovery coefficient, [Gong2018] eq. (6), from ROI means.

    ``CRC = 1/R sum_r (a_r / b_r - 1) / (a_true / b_true - 1)`` with ``a_r = 1/Ka sum_k a_{r,k}`` (mean of the
    hot ROI means of realization r) and ``b_r = 1/Kb sum_k b_{r,k}`` (same for the background ROIs).

    Parameters
    ----------
    hot_means
        ``a_{r,k}``, shape ``(R, Ka)`` (a 1-D array is read as ``(R,)`` with Ka = 1).
    background_means
        ``b_{r,k}``, shape ``(R, Kb)`` (1-D: Kb = 1); same R.
    hot_true, background_true
        True hot and background uptake; their ratio must differ from 1.

    Returns
    -------
    float
        CRC (1 for perfect contrast recovery).
    """
    a = _means_2d(hot_means, "hot_means")
    b = _means_2d(background_means, "background_means")
    if a.shape[0] != b.shape[0]:
        raise InvalidInputError(f"hot_means has {a.shape[0]} realizations but background_means has {b.shape[0]}")
    a_r, b_r = a.mean(axis=1), b.mean(axis=1)
    if np.any(b_r == 0.0):
        raise InvalidInputError("CRC is undefined: a realization's background mean is zero")
    true_contrast = _ratio(float(hot_true), float(background_true), "CRC (background_true)") - 1.0
    if true_contrast == 0.0:
        raise InvalidInputError("CRC is undefined: the true hot and background uptakes are equal (no contrast)")
    return float(np.mean(a_r / b_r - 1.0) / true_contrast)


def crc(
    realizations: npt.ArrayLike | Sequence[npt.ArrayLike],
    hot_rois: npt.ArrayLike | Sequence[npt.ArrayLike],
    background_rois: npt.ArrayLike | Sequence[npt.ArrayLike],
    truth: npt.ArrayLike,
) -> float:
    """Contrast recovery coefficient over realizations, [Gong2018] eq. (6), from images and ROIs.

    ``a_true`` and ``b_true`` are the ground truth's values averaged the same way as ``a_r`` and ``b_r``
    (mean over ROIs of the ROI means of ``truth``), so a realization equal to the truth gives exactly 1.

    Parameters
    ----------
    realizations
        ``(R, *shape)`` images (e.g. 20 i.i.d. reconstructions, one denoiser setting).
    hot_rois
        The Ka hot ROIs (e.g. grey-matter spheres), boolean masks of ``shape``.
    background_rois
        The Kb background ROIs (e.g. white-matter circles).
    truth
        Ground-truth image of ``shape``.

    Returns
    -------
    float
        CRC.
    """
    stack = _realizations(realizations, "realizations")
    t = _image(truth, "truth")
    _check_realizations_vs_shape(stack, t.shape, "realizations")
    hot = _rois(hot_rois, t.shape, "hot_rois")
    bg = _rois(background_rois, t.shape, "background_rois")
    true_hot = float(roi_means(t[None], hot).mean())
    true_bg = float(roi_means(t[None], bg).mean())
    return crc_from_means(roi_means(stack, hot), roi_means(stack, bg), true_hot, true_bg)


def background_std_from_means(background_means: npt.ArrayLike) -> float:
    """Background STD, [Gong2018] eq. (7), from the ROI means ``b_{r,k}``.

    ``STD = 1/Kb sum_k sqrt(1/(R-1) sum_r (b_{r,k} - b_k)^2) / b_k`` with ``b_k = 1/R sum_r b_{r,k}``: the
    ensemble (across-realization) standard deviation of each background ROI's mean, relative to that ROI's
    ensemble mean, averaged over the ROIs.

    Parameters
    ----------
    background_means
        ``(R, Kb)`` (1-D: Kb = 1), R >= 2.

    Returns
    -------
    float
        STD as a fraction (multiply by 100 for the percent the paper's axes show).
    """
    b = _means_2d(background_means, "background_means")
    if b.shape[0] < 2:
        raise InvalidInputError(f"background STD needs at least 2 realizations, got {b.shape[0]}")
    b_k = b.mean(axis=0)
    if np.any(b_k == 0.0):
        raise InvalidInputError("background STD is undefined: a background ROI's mean over realizations is zero")
    return float(np.mean(b.std(axis=0, ddof=1) / b_k))


def background_std(
    realizations: npt.ArrayLike | Sequence[npt.ArrayLike],
    background_rois: npt.ArrayLike | Sequence[npt.ArrayLike],
) -> float:
    """Background STD over realizations, [Gong2018] eq. (7), from images and ROIs.

    Parameters
    ----------
    realizations
        ``(R, *shape)`` images, R >= 2.
    background_rois
        The Kb background ROIs (e.g. 37 white-matter circles, or liver ROIs for the lung phantom).

    Returns
    -------
    float
        STD as a fraction (see :func:`background_std_from_means`).
    """
    return background_std_from_means(roi_means(realizations, background_rois))


def tumor_contrast_recovery(
    tumor_images: npt.ArrayLike | Sequence[npt.ArrayLike],
    lesion_mask: npt.ArrayLike,
    lesion_true: float | npt.ArrayLike,
) -> float:
    """Tumour contrast recovery CR, [Gong2018] eq. (8): ``CR = 1/R sum_r l_r / l_true``.

    [Gong2018] reconstructs each realization with and without the inserted lesion and takes the difference, so
    ``tumor_images`` are those lesion-only images; ``l_r`` is the mean inside the lesion ROI of realization r.

    Parameters
    ----------
    tumor_images
        ``(R, *shape)`` lesion-only images (a single image of ``lesion_mask``'s shape is read as R = 1).
    lesion_mask
        Boolean lesion ROI.
    lesion_true
        ``l_true``: the true lesion intensity, or a ground-truth lesion-only image (its mean in the ROI is used).

    Returns
    -------
    float
        CR (1 for perfect recovery).
    """
    mask_arr = np.asarray(lesion_mask)
    stack_in = tumor_images
    if isinstance(stack_in, np.ndarray) and stack_in.shape == mask_arr.shape:
        stack_in = stack_in[None]  # one image: R = 1
    stack = _realizations(stack_in, "tumor_images")
    shape = stack.shape[1:]
    m = _required_mask(mask_arr, shape, "lesion_mask")
    true_arr = np.asarray(lesion_true)
    if true_arr.ndim == 0:
        l_true = float(_image(true_arr[None], "lesion_true")[0])
    else:
        t = _image(true_arr, "lesion_true")
        _same_shape(t, mask_arr, "lesion_true", "lesion_mask")
        l_true = float(t[m].mean())
    if l_true == 0.0:
        raise InvalidInputError("CR is undefined: the true lesion intensity is zero")
    return float(np.mean(roi_means(stack, m)[:, 0]) / l_true)


def lesion_contrast_recovery(
    image: npt.ArrayLike,
    lesion_mask: npt.ArrayLike,
    background_mask: npt.ArrayLike,
    truth: npt.ArrayLike,
) -> float:
    """Lesion contrast recovery of a single image: [Gong2018] eq. (6) with R = 1 and one ROI each.

    ``CR = (l / b - 1) / (l_true / b_true - 1)``, means of ``image`` and ``truth`` in the lesion and background
    ROIs. Use this when there is no lesion-free reconstruction to subtract (eq. (8) needs one).

    Parameters
    ----------
    image
        Test image.
    lesion_mask, background_mask
        Boolean ROIs of ``image``'s shape.
    truth
        Ground truth (true lesion/background contrast must not be 1).

    Returns
    -------
    float
        Contrast recovery (1 for perfect recovery).
    """
    x, t = _image(image, "image"), _image(truth, "truth")
    _same_shape(x, t, "image", "truth")
    lesion = _required_mask(lesion_mask, x.shape, "lesion_mask")
    bg = _required_mask(background_mask, x.shape, "background_mask")
    return crc_from_means(
        np.array([x[lesion].mean()]), np.array([x[bg].mean()]), float(t[lesion].mean()), float(t[bg].mean())
    )


def _means_2d(values: npt.ArrayLike, name: str) -> FloatArray:
    arr = _image(values, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must have shape (R, K), got {arr.shape}")
    return arr


# ------------------------------------------------------------------------------------------------ noise in ROIs


def roi_std(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    *,
    relative: bool = False,
    ddof: int = 1,
) -> float:
    """Spatial standard deviation inside one ROI of one image (the white-matter "background" STD of [DIP]).

    Parameters
    ----------
    image
        One image.
    mask
        Boolean ROI (e.g. white matter, liver); at least ``ddof + 1`` voxels.
    relative
        Divide by the ROI mean (coefficient of variation, a fraction) instead of returning image units.
    ddof
        Delta degrees of freedom (1: sample STD).

    Returns
    -------
    float
        STD in image units, or relative to the ROI mean.
    """
    x = _image(image, "image")
    v = x[_required_mask(mask, x.shape, "mask")]
    if v.size <= ddof:
        raise InvalidInputError(f"roi_std needs more than {ddof} voxel(s) in the mask, got {v.size}")
    std = float(v.std(ddof=ddof))
    return _ratio(std, float(v.mean()), "relative ROI STD (ROI mean is zero)") if relative else std


def ensemble_std(
    realizations: npt.ArrayLike | Sequence[npt.ArrayLike],
    mask: npt.ArrayLike,
    *,
    relative: bool = True,
) -> float:
    """Voxel-wise standard deviation across realizations, averaged over an ROI.

    ``1/N sum_j sqrt(1/(R-1) sum_r (x_{r,j} - x_j)^2)``, ``x_j`` the ensemble mean of voxel j, over the N ROI
    voxels; with ``relative`` divided by ``1/N sum_j x_j``. Unlike [Gong2018] eq. (7), which takes the STD of ROI
    *means* (noise at the ROI's scale), this is the per-voxel noise, insensitive to the ROI's size.

    Parameters
    ----------
    realizations
        ``(R, *shape)``, R >= 2.
    mask
        Boolean ROI of ``shape``.
    relative
        Return a fraction of the ROI's ensemble mean (default) instead of image units.

    Returns
    -------
    float
        Mean voxel STD.
    """
    stack = _realizations(realizations, "realizations")
    if stack.shape[0] < 2:
        raise InvalidInputError(f"ensemble STD needs at least 2 realizations, got {stack.shape[0]}")
    m = _required_mask(mask, stack.shape[1:], "mask")
    v = stack.reshape(stack.shape[0], -1)[:, np.flatnonzero(m)]
    std = float(v.std(axis=0, ddof=1).mean())
    return _ratio(std, float(v.mean()), "relative ensemble STD (ROI mean is zero)") if relative else std


# --------------------------------------------------------------------------------------- contrast and SUV in ROIs


def peak_to_valley_ratio(
    image: npt.ArrayLike,
    peak_mask: npt.ArrayLike,
    valley_mask: npt.ArrayLike,
    *,
    peak_stat: RoiStat = "mean",
    valley_stat: RoiStat = "mean",
) -> float:
    """Peak-to-valley ratio ([DIP]): uptake in a hot structure over uptake in the valley beside/between it.

    [DIP] reports it for small nuclei and the inferior colliculus without an equation; here it is
    ``peak_stat(image[peak_mask]) / valley_stat(image[valley_mask])``. The default mean/mean is robust to noise;
    ``peak_stat="max", valley_stat="min"`` on 1-D masks along a line profile gives the classic profile ratio.

    Parameters
    ----------
    image
        Any-dimensional image (a 1-D line profile works too).
    peak_mask, valley_mask
        Boolean ROIs of the hot structure and of the valley.
    peak_stat, valley_stat
        ``"mean"``, ``"max"``, ``"min"`` or ``"median"``.

    Returns
    -------
    float
        The ratio (> 1 when the peak is hotter).
    """
    x = _image(image, "image")
    p = _required_mask(peak_mask, x.shape, "peak_mask")
    v = _required_mask(valley_mask, x.shape, "valley_mask")
    peak = float(_stat(peak_stat, "peak_stat")(x[p]))
    valley = float(_stat(valley_stat, "valley_stat")(x[v]))
    return _ratio(peak, valley, "peak-to-valley ratio (valley value is zero)")


def _stat(name: str, arg: str) -> Callable[[FloatArray], float]:
    try:
        return _STATS[name]
    except KeyError:
        raise InvalidInputError(f"{arg} must be one of {sorted(_STATS)}, got {name!r}") from None


def _relative_bias(measured: float, true: float, what: str) -> float:
    return _ratio(measured - true, true, f"{what} bias (true value is zero)")


def _image_truth_mask(
    image: npt.ArrayLike, truth: npt.ArrayLike, mask: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, BoolArray]:
    x, t = _image(image, "image"), _image(truth, "truth")
    _same_shape(x, t, "image", "truth")
    return x, t, _required_mask(mask, x.shape, "mask")


def suv_mean_bias(image: npt.ArrayLike, truth: npt.ArrayLike, mask: npt.ArrayLike) -> float:
    """Relative SUVmean bias in an ROI: ``(mean(image[roi]) - mean(truth[roi])) / mean(truth[roi])``.

    The SUVmean comparison of [Clinical] (VOIs compared between two images) and the ROI SUV analysis of [DIP],
    against the ground truth. Units cancel: image and truth in SUV or both in Bq/ml.

    Parameters
    ----------
    image, truth
        Same shape, same units.
    mask
        Boolean ROI (organ, lesion, ...).

    Returns
    -------
    float
        Signed fraction (-0.05 = 5 % under-estimation).
    """
    x, t, m = _image_truth_mask(image, truth, mask)
    return _relative_bias(float(x[m].mean()), float(t[m].mean()), "SUVmean")


def suv_max_bias(image: npt.ArrayLike, truth: npt.ArrayLike, mask: npt.ArrayLike) -> float:
    """Relative SUVmax bias in an ROI: ``(max(image[roi]) - max(truth[roi])) / max(truth[roi])`` ([Clinical]).

    Parameters
    ----------
    image, truth
        Same shape, same units.
    mask
        Boolean ROI.

    Returns
    -------
    float
        Signed fraction. Noise alone pushes it up, smoothing pulls it down.
    """
    x, t, m = _image_truth_mask(image, truth, mask)
    return _relative_bias(float(x[m].max()), float(t[m].max()), "SUVmax")


def _sphere_kernel(spacing: Sequence[float], volume_ml: float) -> FloatArray:
    radius_mm = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # 1 ml = 1000 mm^3
    half = [int(math.floor(radius_mm / s)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    inside = sum(g * g for g in grids) <= radius_mm * radius_mm * (1.0 + 1e-9)  # voxel centres in the sphere
    return inside.astype(np.float64)


def suv_peak(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    spacing: Sequence[float],
    *,
    volume_ml: float = 1.0,
) -> float:
    """SUVpeak ([Clinical], defined as in [PERCIST]): highest mean in a sphere of ``volume_ml`` centred in the ROI.

    The sphere (1 ml: 12.4 mm diameter) holds the voxels whose centres lie within its radius, in mm through
    ``spacing``; its centre runs over the ROI's voxels, it may reach outside the ROI, and voxels outside the
    volume are left out of the mean rather than counted as zero. With voxels larger than the sphere it is the
    single-voxel maximum.

    Parameters
    ----------
    image
        Image (SUV or any consistent unit), ``len(spacing)`` dimensions.
    mask
        Boolean ROI where the sphere's centre may be.
    spacing
        Voxel size in mm per axis, e.g. (dz, dy, dx).
    volume_ml
        Sphere volume in ml (> 0).

    Returns
    -------
    float
        SUVpeak in image units.
    """
    x = _image(image, "image")
    m = _required_mask(mask, x.shape, "mask")
    sp = [float(s) for s in spacing]
    if len(sp) != x.ndim or not all(math.isfinite(s) and s > 0.0 for s in sp):
        raise InvalidInputError(f"spacing must be {x.ndim} positive numbers, got {tuple(spacing)}")
    if not (math.isfinite(volume_ml) and volume_ml > 0.0):
        raise InvalidInputError(f"volume_ml must be positive, got {volume_ml}")
    kernel = _sphere_kernel(sp, volume_ml)
    # Only the ROI's bounding box plus the kernel radius matters: keeps large volumes cheap.
    idx = np.nonzero(m)
    half = [k // 2 for k in kernel.shape]
    box = tuple(
        slice(max(int(i.min()) - h, 0), min(int(i.max()) + h + 1, n)) for i, h, n in zip(idx, half, x.shape)
    )
    sums = ndimage.correlate(x[box], kernel, mode="constant", cval=0.0)
    counts = ndimage.correlate(np.ones(x[box].shape), kernel, mode="constant", cval=0.0)
    return float((sums / counts)[m[box]].max())


def suv_peak_bias(
    image: npt.ArrayLike,
    truth: npt.ArrayLike,
    mask: npt.ArrayLike,
    spacing: Sequence[float],
    *,
    volume_ml: float = 1.0,
) -> float:
    """Relative SUVpeak bias in an ROI, ``(peak(image) - peak(truth)) / peak(truth)`` with :func:`suv_peak`.

    Parameters
    ----------
    image, truth
        Same shape, same units.
    mask
        Boolean ROI.
    spacing, volume_ml
        As in :func:`suv_peak`.

    Returns
    -------
    float
        Signed fraction.
    """
    x, t, m = _image_truth_mask(image, truth, mask)
    measured = suv_peak(x, m, spacing, volume_ml=volume_ml)
    return _relative_bias(measured, suv_peak(t, m, spacing, volume_ml=volume_ml), "SUVpeak")


def total_activity_ratio(
    image: npt.ArrayLike, reference: npt.ArrayLike, mask: npt.ArrayLike | None = None
) -> float:
    """Total activity of ``image`` over that of ``reference`` (same grid): ``sum x / sum y`` over the mask.

    A denoiser should keep it at 1 (counts are conserved by a mass-preserving filter).

    Parameters
    ----------
    image, reference
        Same shape.
    mask
        Optional boolean mask; ``None`` sums the whole volume.

    Returns
    -------
    float
        The ratio.
    """
    x, y = _image(image, "image"), _image(reference, "reference")
    _same_shape(x, y, "image", "reference")
    m = _mask(mask, y.shape, "mask")
    return _ratio(float(_values(x, m).sum()), float(_values(y, m).sum()), "total activity ratio (reference sums to 0)")


def slice_flicker(image: npt.ArrayLike, truth: npt.ArrayLike, mask: npt.ArrayLike) -> float:
    """Slice-to-slice flicker: how much the error's mean jumps from one slice to the next.

    With ``e_z`` the mean of ``image - truth`` over the mask in slice ``z``, relative to the truth's mean over the
    whole mask, the flicker is the median of ``|e_z - e_(z-1)|`` over adjacent slices that both hold mask voxels.
    A 2.5D network that treats slices independently shows it as a banded coronal view; a 3-D filter has about
    none beyond the noise. The truth's own slice-to-slice changes cancel, so anatomy is not counted.

    Returns
    -------
    float
        A fraction (0.01 = 1 % of the mean activity); NaN for fewer than two slices with mask voxels.
    """
    x, t, m = _image_truth_mask(image, truth, mask)
    if x.ndim != 3:
        raise InvalidInputError(f"slice flicker needs (z, y, x) volumes, got shape {x.shape}")
    level = float(t[m].mean()) if m.any() else 0.0
    if level == 0:
        raise InvalidInputError("slice flicker needs a mask with non-zero truth")
    counts = m.reshape(m.shape[0], -1).sum(axis=1)
    errors = np.where(m, x - t, 0.0).reshape(m.shape[0], -1).sum(axis=1)
    per_slice = np.where(counts > 0, errors / np.maximum(counts, 1), np.nan) / level
    steps = np.abs(np.diff(per_slice))
    steps = steps[np.isfinite(steps)]
    return float(np.median(steps)) if steps.size else float("nan")
