"""The score network of BC-DPM: an ADM-style U-Net (Dhariwal and Nichol 2021), sized for a 2-core CPU.

BC-DPM (``shared/papers/shen2023-bc-dpm-diffusion.txt``, section 2.1) uses the epsilon network of Dhariwal and
Nichol unchanged. This keeps its parts and drops its size:

- residual blocks [GroupNorm, SiLU, 3x3 conv, GroupNorm with a scale and shift from the timestep embedding
  ("use_scale_shift_norm"), SiLU, dropout, 3x3 conv] with a 1x1 skip when the width changes;
- a sinusoidal timestep embedding through a two-layer MLP;
- self-attention (multi-head, GroupNorm before it) in the middle block, at the coarsest level;
- strided 3x3 convolutions down, nearest-neighbour upsampling + 3x3 convolution up, concatenated skips;
- the last convolution initialised to zero (the network starts by predicting no noise), as ADM does.

ADM's 128-256 channels and 2-3 blocks per level are GPU sizes: here ``base`` channels (default 32), widths
``base * mult`` per level, ``blocks`` per level (default 1): about 2.5 M parameters, 10 MB of float32.

2.5D: the input channels are ``in_slices`` neighbouring slices of the *noisy latent* (all at the same timestep),
the output is the noise of the centre slice. At sampling the whole volume's latent moves together, so each slice
sees its neighbours' current state and adjacent output slices agree (2-D diffusion models flicker along z:
DDPET-3D's finding); training needs only high-count volumes, no pairs. Inputs must be a multiple of
``2 ** (len(mults) - 1)`` in-plane; :attr:`multiple` says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (possibly fractional) timesteps ``t[B]`` (ADM's / the Transformer's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class ResBlock(nn.Module):
    """ADM's residual block with the timestep as a scale and shift of the second normalisation."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = max(1, min(heads, channels // 8))
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        out = out.permute(0, 1, 3, 2).reshape(b, c, h * w)
        return x + self.out(out).reshape(b, c, h, w)


class AdmUNet(nn.Module):
    """Epsilon network ``eps(x_t, t)`` for ``in_slices`` noisy slices -> the noise of the centre slice.

    Parameters
    ----------
    in_slices : int
        Odd number of neighbouring latent slices read (1 = a 2-D model).
    base : int
        Channels of the first level.
    mults : sequence of int
        Width multipliers per level (``len(mults) - 1`` downsamplings).
    blocks : int
        Residual blocks per level.
    attention : bool
        Self-attention in the middle block (the coarsest level).
    dropout : float
        Dropout in the residual blocks (ADM: 0.1 on small datasets).
    """

    def __init__(self, in_slices: int = 3, base: int = 32, mults: Sequence[int] = (1, 2, 2, 2), blocks: int = 1,
                 attention: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if in_slices < 1 or in_slices % 2 == 0:
            raise ValueError(f"in_slices must be odd and >= 1, got {in_slices}")
        if not mults or base < 4 or blocks < 1:
            raise ValueError(f"need base >= 4, blocks >= 1 and at least one level, got {base}, {blocks}, {mults}")
        self.in_slices = int(in_slices)
        self.base = int(base)
        self.mults = tuple(int(m) for m in mults)
        self.blocks = int(blocks)
        self.attention = bool(attention)
        emb_dim = 4 * base
        self.emb = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_slices, base, 3, padding=1)
        widths = [base * m for m in self.mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [base]
        ch = base
        for level, width in enumerate(widths):
            stage = nn.ModuleList()
            for _ in range(self.blocks):
                stage.append(ResBlock(ch, width, emb_dim, dropout))
                ch = width
                skips.append(ch)
            self.down.append(stage)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = Attention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stage = nn.ModuleList()
            for _ in range(self.blocks + 1):
                stage.append(ResBlock(ch + skips.pop(), widths[level], emb_dim, dropout))
                ch = widths[level]
            self.up.append(stage)
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.head = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def multiple(self) -> int:
        """The in-plane size must be a multiple of this."""
        return 2 ** (len(self.mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x[B, in_slices, H, W]``, ``t[B]`` (timesteps 0..T-1) -> predicted noise ``[B, 1, H, W]``."""
        emb = self.emb(timestep_embedding(t, self.base))
        h = self.stem(x)
        hs = [h]
        for level, stage in enumerate(self.down):
            for block in stage:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, stage in enumerate(self.up):
            for block in stage:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)
