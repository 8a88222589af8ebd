"""Xu et al. 2017 (shared/papers/xu2017-ultra-low-dose-unet.txt, section II.B and IV.D).

"An encoder-decoder structure with symmetry concatenate connections between corresponding stages ... each stage
consists of convolution with 3x3 kernels, batch normalization, and rectified linear unit (ReLU). The downsampling
and upsampling between stages are done by 2x2 max pooling and bilinear interpolation respectively." A residual
connection runs "from input to output directly": the network learns the difference between the standard-dose and
the low-dose image, so the output is the input's centre slice plus what the network adds. Multi-slice input: the
adjoining slices are input channels. Depth: ``depth`` poolings (np) and ``convs`` convolutions per stage (nc);
the paper's grid search found np = 3, nc = 2 best. Input slices: 1, 3, 5 or 7, three by default (the paper's
Fig. 3: three slices remove the noise a single slice turns into structure). Input height and width must be
multiples of ``2**depth`` (inference pads to them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _stage(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class XuUNet(nn.Module):
    """Residual U-Net: (batch, in_slices, H, W) -> (batch, 1, H, W), H and W multiples of ``2**depth``."""

    def __init__(self, in_slices: int = 3, depth: int = 3, convs: int = 2, features: int = 64,
                 level_input: bool = False) -> None:
        super().__init__()
        if in_slices not in (1, 3, 5, 7):
            raise ValueError(f"in_slices must be 1, 3, 5 or 7 (the paper's multi-slice inputs), got {in_slices}")
        if not 1 <= depth <= 6 or not 1 <= convs <= 4 or features < 1:
            raise ValueError(f"depth 1-6, convs 1-4 and features >= 1 are supported, got {depth}, {convs}, "
                             f"{features}")
        self.in_slices, self.depth, self.level_input = in_slices, depth, bool(level_input)
        widths = [features * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList(_stage(in_slices + self.level_input if i == 0 else widths[i - 1], widths[i], convs)
                                  for i in range(depth))
        self.bottom = _stage(widths[depth - 1], widths[depth], convs)
        self.up = nn.ModuleList(_stage(widths[i + 1] + widths[i], widths[i], convs) for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** self.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")
        skips = []
        h = x
        for stage in self.down:
            h = stage(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottom(h)
        for stage, skip in zip(self.up, reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = stage(torch.cat([h, skip], dim=1))
        centre = x[:, self.in_slices // 2: self.in_slices // 2 + 1]
        return centre + self.out(h)
