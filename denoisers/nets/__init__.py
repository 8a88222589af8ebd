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

``build(architecture, config)`` makes the module; ``spec(architecture, config)`` says how many slices go in and
come out, and the smallest in-plane size multiple the network needs (the U-Net pads to it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from denoisers.errors import DenoiserError

__all__ = ["ARCHITECTURES", "NetSpec", "build", "spec"]


@dataclass(frozen=True)
class NetSpec:
    """How a network meets a volume: slices read, slices written (centred), in-plane size multiple."""

    in_slices: int
    out_slices: int
    multiple: int = 1


def _gong(config: Mapping[str, Any]) -> tuple[Any, NetSpec]:
    from denoisers.nets.gong_resnet import GongResNet

    net = GongResNet(**config)
    return net, NetSpec(net.in_slices, 1)


def _xu(config: Mapping[str, Any]) -> tuple[Any, NetSpec]:
    from denoisers.nets.xu_unet import XuUNet

    net = XuUNet(**config)
    return net, NetSpec(net.in_slices, 1, 2 ** net.depth)


def _fo(config: Mapping[str, Any]) -> tuple[Any, NetSpec]:
    from denoisers.nets.fo_dcnn import FoDCNN

    net = FoDCNN(**config)
    return net, NetSpec(net.slices, net.slices)


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
