"""Training losses of the supervised denoisers: MSE, L1, SSIM / MS-SSIM, the lesion-weighted loss of the
feature-oriented DCNN, and the VGG19 perceptual loss of Gong et al. 2018.

All take (batch, channels, H, W) tensors and return a scalar to minimise (SSIM-type losses return ``1 - SSIM``).

- SSIM (Wang et al. 2004): Gaussian window (11 taps, sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``, a fixed
  ``data_range`` (PET has no natural maximum: pass the normalised range, e.g. the target's robust maximum).
  Pitfalls guarded: images smaller than the window use a window cut to the image (odd, at least 3) instead of an
  empty or padded one; MS-SSIM raises its per-scale terms to fractional powers, which is NaN for the negative
  contrast-structure terms of anti-correlated patches: they are clamped at 0 first (and the gradient stays
  finite). MS-SSIM's five scales need 16 times the window; smaller images use the scales that fit, with the
  weights renormalised, and at least two scales or a clear error.
- Lesion weighting (shared/papers/clinical-dcnn-feature-oriented-vs-gaussian.txt): lesions are segmented in the
  target by adaptive thresholding, their voxels weigh 10 and the background 1, and the map is smoothed with a
  Gaussian to forgive segmentation errors; the loss is the voxel-weighted MSE.
- Perceptual (shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt, II.B): the squared distance of VGG19
  feature maps before the first pooling layer (conv1_1, ReLU, conv1_2, ReLU) between output and label. The VGG19
  weights cannot be downloaded here: they come from a local file (torchvision's ``vgg19`` state dict, or a file of
  just those four tensors under the same keys), checked against a configured sha256 before use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from denoisers.models import sha256_file

__all__ = [
    "LossError",
    "PerceptualLoss",
    "l1_loss",
    "lesion_weight_map",
    "ms_ssim",
    "mse_loss",
    "ssim",
    "weighted_mse_loss",
    "weighted_ssim",
]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli, Bovik 2003
VGG_KEYS = ("features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LossError(ValueError):
    """A loss cannot be computed as asked (missing weights file, images too small, bad arguments)."""


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def weighted_mse_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Voxel-weighted MSE, normalised by the weights' sum (uniform weights give the plain MSE)."""
    if weights.shape != pred.shape:
        weights = weights.expand_as(pred)
    return (weights * (pred - target).square()).sum() / weights.sum().clamp_min(torch.finfo(pred.dtype).tiny)


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2.0
    g = torch.exp(-coords.square() / (2.0 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _fitting_window(height: int, width: int, size: int) -> int:
    fit = min(size, height, width)
    fit -= 1 - fit % 2  # odd
    if fit < 3:
        raise LossError(f"SSIM needs images of at least 3 x 3 pixels, got {height} x {width}")
    return fit


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int, sigma: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and mean contrast-structure term (valid convolution, no padding)."""
    full, cs = _ssim_maps(x, y, data_range, window, sigma)
    return full.flatten(1).mean(1), cs.flatten(1).mean(1)


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int, sigma: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSIM and contrast-structure maps (valid convolution: each side shorter by the window less one)."""
    channels = x.shape[1]
    size = _fitting_window(x.shape[-2], x.shape[-1], window)
    w = _gaussian_window(size, sigma * size / window, channels, x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, w, groups=channels), F.conv2d(y, w, groups=channels)
    sxx = F.conv2d(x * x, w, groups=channels) - mu_x.square()
    syy = F.conv2d(y * y, w, groups=channels) - mu_y.square()
    sxy = F.conv2d(x * y, w, groups=channels) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    return lum * cs, cs


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, *, window: int = 11, sigma: float = 1.5
         ) -> torch.Tensor:
    """Mean SSIM over the batch (1 for identical images)."""
    _check(x, y, data_range)
    return _ssim_terms(x, y, data_range, window, sigma)[0].mean()


def weighted_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, weights: torch.Tensor, *, window: int = 11,
                  sigma: float = 1.5) -> torch.Tensor:
    """Mean over the batch of each image's SSIM map averaged with ``weights`` (same shape as the images; the map
    is the valid part, so the weights are cropped to it around the centre)."""
    _check(x, y, data_range)
    if weights.shape != x.shape:
        raise LossError(f"weights of shape {tuple(weights.shape)} for images of shape {tuple(x.shape)}")
    full, _ = _ssim_maps(x, y, data_range, window, sigma)
    top, left = (x.shape[-2] - full.shape[-2]) // 2, (x.shape[-1] - full.shape[-1]) // 2
    w = weights[..., top:top + full.shape[-2], left:left + full.shape[-1]]
    return ((full * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)).mean()


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, *, window: int = 11, sigma: float = 1.5,
            weights: Sequence[float] = MS_SSIM_WEIGHTS) -> torch.Tensor:
    """Mean multi-scale SSIM over the batch, with as many of the scales as the image size allows (>= 2)."""
    _check(x, y, data_range)
    smallest = min(x.shape[-2:])
    scales = sum(1 for s in range(len(weights)) if smallest // 2 ** s >= window)
    if scales < 2:
        raise LossError(f"MS-SSIM needs at least two scales of the {window}-pixel window: images of at least "
                        f"{2 * window} pixels per side, got {tuple(x.shape[-2:])} (use SSIM)")
    w = torch.tensor(weights[:scales], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    values = []
    for s in range(scales):
        full, cs = _ssim_terms(x, y, data_range, window, sigma)
        values.append(full if s == scales - 1 else cs)
        if s < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=0)  # (scales, batch)
    # Negative terms (anti-correlated patches) to fractional powers are NaN, and 0 ** w has an infinite gradient:
    # a tiny positive floor avoids both.
    return torch.prod(stacked.clamp_min(1e-8) ** w[:, None], dim=0).mean()


def _check(x: torch.Tensor, y: torch.Tensor, data_range: float) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise LossError(f"expected two (batch, channels, H, W) tensors of one shape, got {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    if not (math.isfinite(data_range) and data_range > 0):
        raise LossError(f"data_range must be a positive number, got {data_range!r}")


def lesion_weight_map(target: torch.Tensor, *, lesion_weight: float = 10.0, block: int = 15,
                      offset_sigmas: float = 3.0, smooth_sigma: float = 1.0, min_pixels: int = 2) -> torch.Tensor:
    """The feature-oriented paper's training weight map for (batch, channels, H, W) targets.

    Adaptive thresholding: a pixel is lesion when it exceeds its ``block``-pixel local mean by ``offset_sigmas``
    local standard deviations and is above the image mean, which picks out small hot spots against their own
    surroundings (a liver lesion against the liver, a lung nodule against lung) rather than whole organs. Lesion
    pixels weigh ``lesion_weight`` (10 in the paper), the rest 1; the map is then smoothed with a Gaussian of
    ``smooth_sigma`` pixels. Images with fewer than ``min_pixels`` lesion pixels get a uniform map.
    """
    if target.ndim != 4:
        raise LossError(f"expected a (batch, channels, H, W) target, got shape {tuple(target.shape)}")
    with torch.no_grad():
        k = max(3, block | 1)
        pad = k // 2
        padded = F.pad(target, (pad, pad, pad, pad), mode="replicate")
        local_mean = F.avg_pool2d(padded, k, stride=1)
        local_sq = F.avg_pool2d(padded.square(), k, stride=1)
        local_std = (local_sq - local_mean.square()).clamp_min(0).sqrt()
        image_mean = target.mean(dim=(-2, -1), keepdim=True)
        lesion = (target > local_mean + offset_sigmas * local_std) & (target > image_mean)
        enough = lesion.flatten(1).sum(1) >= min_pixels
        lesion = lesion & enough[:, None, None, None]
        weights = torch.where(lesion, torch.full_like(target, lesion_weight), torch.ones_like(target))
        if smooth_sigma > 0:
            size = 2 * math.ceil(3 * smooth_sigma) + 1
            w = _gaussian_window(size, smooth_sigma, target.shape[1], target)
            weights = F.conv2d(F.pad(weights, (size // 2,) * 4, mode="replicate"), w, groups=target.shape[1])
    return weights


class PerceptualLoss(nn.Module):
    """Squared distance of VGG19 features before the first pooling (Gong et al. 2018), from a local weights file.

    Single-channel images are repeated to the three channels VGG expects and standardised with ImageNet's mean
    and standard deviation after ``scale`` (the images' normalised range to [0, 1]). The VGG layers are frozen.
    """

    def __init__(self, weights_file: Path | str | None, expected_sha256: str | None, *, scale: float = 1.0
                 ) -> None:
        super().__init__()
        path = Path(weights_file) if weights_file else None
        if path is None or not path.is_file():
            raise LossError(
                f"perceptual loss needs the VGG19 weights as a local file (torchvision 'vgg19' state dict, or its "
                f"{', '.join(VGG_KEYS)} tensors), expected at {str(path) if path else '(not configured)'}"
                + (f" with sha256 {expected_sha256}" if expected_sha256 else "")
                + "; nothing can be downloaded here: copy the file there, or train with another loss")
        actual = sha256_file(path)
        if expected_sha256 is None or actual != expected_sha256.strip().lower():
            raise LossError(f"VGG19 weights {path}: sha256 {actual} does not match the configured "
                            f"{expected_sha256!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in VGG_KEYS if k not in state]
        if missing:
            raise LossError(f"VGG19 weights {path} lack {', '.join(missing)} (not a torchvision vgg19 state dict)")
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        with torch.no_grad():
            for conv, (wk, bk) in ((self.conv1, VGG_KEYS[:2]), (self.conv2, VGG_KEYS[2:])):
                if state[wk].shape != conv.weight.shape or state[bk].shape != conv.bias.shape:
                    raise LossError(f"VGG19 weights {path}: {wk} has shape {tuple(state[wk].shape)}, expected "
                                    f"{tuple(conv.weight.shape)}")
                conv.weight.copy_(state[wk])
                conv.bias.copy_(state[bk])
        for p in self.parameters():
            p.requires_grad_(False)
        self.scale = float(scale)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise LossError(f"perceptual loss takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = (x / self.scale - self.mean) / self.std
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.features(pred), self.features(target))
