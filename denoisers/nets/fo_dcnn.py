"""The feature-oriented DCNN of the clinical DL-vs-Gaussian study
(shared/papers/clinical-dcnn-feature-oriented-vs-gaussian.txt, "Deep CNN architecture").

"A DCNN with 8 layers ... the residual network architecture that tries to estimate the noise n instead of [the]
high-quality image x out of low-quality image y = x + n" (DnCNN, its reference [19]: a first [conv, ReLU], then
[conv, BN, ReLU] layers, then a last conv). "The inputs and outputs of the networks are 3-channels (3 consecutive
slices) ... The outputs slices are weight averaged in the axial direction to form the final volume." The 3x3
kernels capture local noise. The paper does not give the feature count; DnCNN's 64 is the default here. The
network returns the denoised slices ``y - F(y)``; its lesion-weighted training loss is in ``training/losses.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class FoDCNN(nn.Module):
    """Noise-estimating DCNN: (batch, slices, H, W) -> denoised (batch, slices, H, W), any H and W."""

    def __init__(self, slices: int = 3, layers: int = 8, features: int = 64, level_input: bool = False) -> None:
        super().__init__()
        if slices < 1 or slices % 2 == 0:
            raise ValueError(f"slices must be odd and >= 1, got {slices}")
        if layers < 3 or features < 1:
            raise ValueError(f"layers >= 3 and features >= 1 are needed, got {layers} and {features}")
        self.slices, self.level_input = slices, bool(level_input)
        body: list[nn.Module] = [nn.Conv2d(slices + self.level_input, features, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(layers - 2):
            body += [nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features),
                     nn.ReLU(inplace=True)]
        body.append(nn.Conv2d(features, slices, 3, padding=1))
        self.noise = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.slices] - self.noise(x)
