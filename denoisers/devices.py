"""Which device a denoiser runs on: ``auto`` (CUDA when present), ``cpu`` or ``cuda:N``.

torch is imported only when a GPU-capable denoiser asks, so CPU-only methods (gaussian) never pay for it.
"""

from __future__ import annotations

import functools
import re

from denoisers.base import DeviceNeed
from denoisers.errors import DenoiserUnavailableError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(text: str) -> str:
    """Validate a configured device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if not _DEVICE_RE.match(text):
        raise ValueError(f"device {text!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return text


@functools.cache
def cuda_count() -> int:
    """Number of usable CUDA devices (0 when torch is missing or has no CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def resolve_device(requested: str, need: DeviceNeed) -> str:
    """The concrete device (``cpu`` or ``cuda:N``) for a denoiser that declares ``need``.

    Raises
    ------
    DenoiserUnavailableError
        A CUDA device was asked for (or the method requires one) and is not there.
    """
    check_device_name(requested)
    if need is DeviceNeed.CPU:
        return "cpu"
    count = cuda_count() if requested != "cpu" else 0
    if requested == "auto":
        if count:
            return "cuda:0"
    elif requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        if index >= count:
            raise DenoiserUnavailableError(
                f"device {requested!r} was configured but this machine has {count} CUDA device(s); "
                "use 'auto' to fall back to the CPU")
        return f"cuda:{index}"
    if need is DeviceNeed.GPU_REQUIRED:
        raise DenoiserUnavailableError("this method requires a CUDA GPU and none is available")
    return "cpu"
