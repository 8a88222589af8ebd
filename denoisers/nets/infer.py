"""Applying a 2.5D network to a whole volume: neighbour stacks, batching, padding, averaging of overlaps.

Each output slice ``z`` comes from the stack of input slices ``z - k//2 .. z + k//2``; at the volume's ends the
missing neighbours replicate the end slice (no slice of another patient region is invented). In-plane, the image
is padded by edge replication to the network's size multiple (the U-Net's ``2**depth``) and cropped back. A
network that returns as many slices as it reads (``fo-dcnn``) sees every slice in up to ``k`` windows; those
predictions are averaged with weights that favour the window centred on the slice (``centre_weight``; the paper
says "weight averaged" without giving the weights). A dose-aware network (``spec.level_input``) gets its level
channel, constant, after the slices.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from denoisers.nets import NetSpec


def stack_indices(depth: int, in_slices: int) -> npt.NDArray[np.int64]:
    """(depth, in_slices) source slice of each channel of each window, ends replicated."""
    half = in_slices // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)


@torch.no_grad()
def apply_25d(net: nn.Module, spec: NetSpec, volume: npt.NDArray[np.float32], *, batch: int = 8,
              device: str = "cpu", half_precision: bool = False, centre_weight: float = 2.0,
              level: float | None = None) -> npt.NDArray[np.float32]:
    """Run ``net`` over a (z, y, x) volume, slice stack by slice stack; returns a float32 volume of the same shape.

    ``half_precision`` runs the network in float16 (CUDA only; ignored on a CPU). ``level`` is the level channel's
    value (:func:`denoisers.nets.level_feature`), required by and only given to dose-aware networks.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume.shape}")
    if spec.level_input and level is None:
        raise ValueError("this network is dose-aware: give the series' level (denoisers.nets.level_feature)")
    if spec.out_slices not in (1, spec.in_slices):
        raise ValueError(f"networks return 1 slice or as many as they read, not {spec.out_slices}")
    net = net.to(device).eval()
    dtype = torch.float16 if half_precision and device.startswith("cuda") else torch.float32
    if dtype == torch.float16:
        net = net.half()
    depth, height, width = volume.shape
    m = spec.multiple
    pad_h, pad_w = (-height) % m, (-width) % m
    source = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    windows = stack_indices(depth, spec.in_slices)
    out = np.zeros(volume.shape, np.float32)
    weights = np.zeros(depth, np.float32)
    half = spec.in_slices // 2
    window_w = (np.ones(1, np.float32) if spec.out_slices == 1 else
                np.where(np.arange(spec.in_slices) == half, centre_weight, 1.0).astype(np.float32))
    for start in range(0, depth, max(1, batch)):
        idx = windows[start:start + batch]
        x = source[torch.from_numpy(idx.reshape(-1))].reshape(len(idx), spec.in_slices, height, width)
        if spec.level_input:
            x = torch.cat([x, torch.full((len(idx), 1, height, width), float(level))], dim=1)  # type: ignore[arg-type]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        y = net(x.to(device=device, dtype=dtype)).float().cpu()[..., :height, :width].numpy()
        for j, z in enumerate(range(start, start + len(idx))):
            if spec.out_slices == 1:
                out[z] += y[j, 0]
                weights[z] += 1.0
                continue
            for c in range(spec.in_slices):
                target = z - half + c
                if 0 <= target < depth:
                    out[target] += window_w[c] * y[j, c]
                    weights[target] += window_w[c]
    out /= weights[:, None, None]
    return out
