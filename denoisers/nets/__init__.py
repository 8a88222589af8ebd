"""The supervised denoising networks of the papers in ``shared/papers/``, built from a model card's config.

Pure torch: no DICOM, no I/O. Each architecture maps a stack of neighbouring slices (2.5D: the slices are the
input channels) to the denoised centre slice, or to as many slices as it reads (``fo-dcnn``):

- ``gong-resnet``: Gong et al. 2018, five residual blocks of two [3x3 conv, BN, ReLU], 64 features, a global skip,
  five input slices, one output slice (:mod:`denoisers.nets.gong_resnet`).
- ``xu-unet``: Xu et al. 2017, encoder-decoder with concatenating skips, 2x2 max pooling, bilinear upsampling,
  a residual connection from the input's centre slice to the output; ``depth`` poolings and ``convs`` per stage
  (paper's best 3 and 2); 1, 3, 5 or 7 input slices (:mod:`denoisers.nets.xu_unet`).
- ``fo-dcnn``: the feature-oriented DCNN of the clinical DL-vs-Gaussian study, an 8-layer residual network that
  estimates the noise of 3 slices and returns 3 slices; overlapping outputs are averaged along z at inference
  (:mod:`denoisers.nets.fo_dcnn`).

Dose awareness (``level_input: true`` in the config, any architecture): one more input channel, constant over the
slice, carries the series' count level as :func:`level_feature` of its noise index (``denoisers.cnn.noise_index``:
the noise over the mean activity, estimated from the image itself). One network then serves series from 10 M down
to 0.05 M counts per slice: it is told how much noise to expect instead of guessing it from a 64-pixel patch, so
it neither leaves noise at low counts nor smooths lesions at high counts (DDPET-3D's argument for dose-conditioned
denoisers). The residual connections take the image channels only.

``build(architecture, config)`` makes the module; ``spec(architecture, config)`` says how many slices go in and
come out, and the smallest in-plane size multiple the network needs (the U-Net pads to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from denoisers.errors import DenoiserError

__all__ = ["ARCHITECTURES", "NetSpec", "build", "level_feature", "spec"]


@dataclass(frozen=True)
class NetSpec:
    """How a network meets a volume: slices read, slices written (centred), in-plane size multiple."""

    in_slices: int
    out_slices: int
    multiple: int = 1
    level_input: bool = False


def level_feature(noise_index: float) -> float:
    """The level channel's value for a series of ``noise_index``: its natural log relative to 0.1 (about a 0.3 M
    counts per slice brain), so the values the networks see stay within a few units of zero; clamped at 1e-4 so a
    noise-free image gives a finite value."""
    return math.log(max(float(noise_index), 1e-4) / 0.1)


def _gong(config: Mapping[str, Any]) -> tuple[Any, NetSpec]:
    from denoisers.nets.gong_resnet import GongResNet

    net = GongResNet(**config)
    return net, NetSpec(net.in_slices, 1, 1, net.level_input)


def _xu(config: Mapping[str, Any]) -> tuple[Any, NetSpec]:
    from denoisers.nets.xu_unet import XuUNet

    net = XuUNet(**config)
    return net, NetSpec(net.in_slices, 1, 2 ** net.depth, net.level_input)


def _fo(config: Mapping[str, Any]) -> tuple[Any, NetSpec]:
    from denoisers.nets.fo_dcnn import FoDCNN

    net = FoDCNN(**config)
    return net, NetSpec(net.slices, net.slices, 1, net.level_input)


ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], tuple[Any, NetSpec]]] = {
    "gong-resnet": _gong,
    "xu-unet": _xu,
    "fo-dcnn": _fo,
}


def build(architecture: str, config: Mapping[str, Any] | None = None) -> tuple[Any, NetSpec]:
    """The ``torch.nn.Module`` of ``architecture`` with ``config`` (a card's ``extra["net"]``) and its spec.

    Raises
    ------
    DenoiserError
        Unknown architecture, or a config the architecture does not take (the message names both).
    """
    maker = ARCHITECTURES.get(architecture)
    if maker is None:
        raise DenoiserError(f"unknown network architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    try:
        return maker(dict(config or {}))
    except (TypeError, ValueError) as exc:
        raise DenoiserError(f"network {architecture!r} cannot be built from {dict(config or {})}: {exc}") from exc


def spec(architecture: str, config: Mapping[str, Any] | None = None) -> NetSpec:
    """The spec of a network without keeping it."""
    return build(architecture, config)[1]
