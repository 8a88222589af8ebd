"""A lean 3D U-Net for the conditional DIP (``denoisers.dip``; shared/papers/conditional-dip-stability-map.txt).

The paper uses "a typical 3D U-Net architecture" optimised afresh for every image, so the network is small and
its cost per voxel is what matters, most of it at full resolution. Each stage is ``convs`` x [3x3x3 convolution,
normalisation, LeakyReLU]. Downsampling is a 2x2x2 convolution with stride 2 (+ normalisation, LeakyReLU): cheaper
than a 3x3x3 one and, unlike max pooling's backward pass, deterministic on CUDA. Upsampling is a 2x2x2 transposed
convolution with stride 2 (``transpose``, the default, deterministic on CUDA) or trilinear interpolation
(``trilinear``, whose CUDA backward uses atomic adds). Skips are concatenated. Level ``i`` has
``features * 2**i`` channels.

Any input size works: the input is padded (edge values replicated) to a multiple of ``2**depth`` of at least
``2**(depth + 1)`` per axis, so the bottom level is never a single voxel, and the output is cropped back.

Normalisation: ``instance`` (the module default) has no running statistics, so training and evaluation mode compute
the same function. ``batch`` on a batch of one volume in training mode computes the same statistics (per channel,
over the volume); the conditional DIP uses it in training mode throughout because torch's batch-norm kernels are
faster on channels-last CPU tensors.

Plain ``nn.Module``, no I/O. :meth:`UNet3D.reset_parameters` re-initialises every weight from a
``torch.Generator``, so a seed makes the network reproducible without touching torch's global random state.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Norm = Literal["instance", "batch", "none"]
Upsample = Literal["transpose", "trilinear"]

NEGATIVE_SLOPE = 0.2  # LeakyReLU slope of the deep image prior (Ulyanov et al.)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


def _stage(cin: int, cout: int, convs: int, norm: Norm) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout),
                   nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)]
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """3D U-Net: (batch, in_channels, Z, Y, X) -> (batch, out_channels, Z, Y, X), any Z, Y, X >= 1.

    Parameters
    ----------
    in_channels : int
        Input channels (the prior; the prior and the PET when both are fed).
    out_channels : int
        Output channels.
    features : int
        Width of the first level; level ``i`` has ``features * 2**i`` channels.
    depth : int
        Number of downsamplings (1-5).
    convs : int
        3x3x3 convolutions per stage (1-3).
    norm : {"instance", "batch", "none"}
        Normalisation after each 3x3x3 convolution.
    upsample : {"transpose", "trilinear"}
        How the decoder upsamples (see the module docstring on CUDA determinism).
    """

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 8, depth: int = 3, convs: int = 2,
                 norm: Norm = "instance", upsample: Upsample = "transpose") -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or features < 1:
            raise ValueError(f"in_channels, out_channels and features must be >= 1, got {in_channels}, "
                             f"{out_channels}, {features}")
        if not 1 <= depth <= 5 or not 1 <= convs <= 3:
            raise ValueError(f"depth must be 1-5 and convs 1-3, got {depth} and {convs}")
        if norm not in ("instance", "batch", "none") or upsample not in ("transpose", "trilinear"):
            raise ValueError(f"norm must be instance, batch or none and upsample transpose or trilinear, got "
                             f"{norm!r} and {upsample!r}")
        self.in_channels, self.out_channels, self.depth, self.upsample = in_channels, out_channels, depth, upsample
        widths = [features * 2**i for i in range(depth + 1)]
        self.first = _stage(in_channels, widths[0], convs, norm)
        # A strided conv, then the stage: the downsampling conv is cheap (8 taps on 1/8 of the voxels).
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv3d(widths[i], widths[i + 1], 2, stride=2, bias=norm == "none"),
                          _norm(norm, widths[i + 1]), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
                          _stage(widths[i + 1], widths[i + 1], convs, norm))
            for i in range(depth))
        if upsample == "transpose":
            self.lift = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in reversed(range(depth)))
            up_in = [2 * widths[i] for i in reversed(range(depth))]
        else:
            self.lift = nn.ModuleList(nn.Identity() for _ in range(depth))
            up_in = [widths[i + 1] + widths[i] for i in reversed(range(depth))]
        self.up = nn.ModuleList(_stage(cin, widths[i], convs, norm)
                                for cin, i in zip(up_in, reversed(range(depth))))
        self.out = nn.Conv3d(widths[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        """Each axis is padded to a multiple of this."""
        return 2**self.depth

    def padded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The (Z, Y, X) the network computes on for an input of ``shape`` (Z, Y, X)."""
        m = self.multiple
        return tuple(max(2 * m, math.ceil(n / m) * m) for n in shape)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every weight as torch's defaults do (Kaiming uniform), drawing from ``generator``."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight.shape[1] * math.prod(module.weight.shape[2:])
                    if isinstance(module, nn.ConvTranspose3d):  # weight is (in, out / groups, k...)
                        fan_in = module.weight.shape[0] * math.prod(module.weight.shape[2:])
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d)) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (batch, {self.in_channels}, Z, Y, X), got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        padded = self.padded_shape(size)
        if padded != size:
            pad: list[int] = []
            for n, p in zip(reversed(size), reversed(padded)):
                pad += [0, p - n]
            # Replicate, not zeros: a zero border would be an edge the network has to model.
            x = F.pad(x, pad, mode="replicate")
        h = self.first(x)
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        skips.pop()
        for lift, stage, skip in zip(self.lift, self.up, reversed(skips)):
            h = lift(h) if self.upsample == "transpose" else F.interpolate(h, size=skip.shape[2:], mode="trilinear",
                                                                           align_corners=False)
            h = stage(torch.cat([h, skip], dim=1))
        h = self.out(h)
        return h[:, :, :size[0], :size[1], :size[2]]
