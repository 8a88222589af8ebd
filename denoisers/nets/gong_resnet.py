"""Gong et al. 2018 (shared/papers/gong2018-finetuned-cnn-perceptual-loss.txt, section II.C and Fig. 2).

"The network consists of a cascade of five residual blocks. Each residual block contains two repetitions of a
3 x 3 convolutional layer, a batch normalization layer, and a ReLU layer. Skip connection is added between the
start and the end of each block. Another skip connection is added between the first and last stages of the whole
network. The number of features for each convolutional layer is 64 ... Five input channels are used to include the
center slice as well as four neighboring axial slices."

Read here as: a first stage (3x3 conv from the slices to 64 features, BN, ReLU), five blocks whose output is
their input plus [conv, BN, ReLU, conv, BN, ReLU] of it, the first stage's features added to the last block's
output (the global skip), and a last stage (3x3 conv to one channel) that gives the denoised centre slice. The
paper fine-tunes "the last few layers" and every batch norm: ``fine_tune_parameters`` names them
(``last_blocks`` blocks and the last stage, plus all BN parameters).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features), nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class GongResNet(nn.Module):
    """Residual CNN: (batch, in_slices, H, W) -> (batch, 1, H, W), any H and W."""

    def __init__(self, in_slices: int = 5, features: int = 64, blocks: int = 5, level_input: bool = False) -> None:
        super().__init__()
        if in_slices < 1 or in_slices % 2 == 0:
            raise ValueError(f"in_slices must be odd and >= 1 (a centre slice and its neighbours), got {in_slices}")
        if features < 1 or blocks < 1:
            raise ValueError(f"features and blocks must be >= 1, got {features} and {blocks}")
        self.in_slices, self.features, self.level_input = in_slices, features, bool(level_input)
        self.first = nn.Sequential(nn.Conv2d(in_slices + self.level_input, features, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(features), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(_Block(features) for _ in range(blocks))
        self.last = nn.Conv2d(features, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.first(x)
        h = first
        for block in self.blocks:
            h = block(h)
        return self.last(h + first)

    def fine_tune_parameters(self, last_blocks: int = 1) -> Iterator[nn.Parameter]:
        """What fine-tuning trains (Gong: the last layers and every batch norm); the rest stays frozen."""
        tuned: list[nn.Module] = [self.last, *list(self.blocks)[len(self.blocks) - last_blocks:]]
        seen: set[int] = set()
        for module in tuned:
            for p in module.parameters():
                seen.add(id(p))
                yield p
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p
