from __future__ import annotations

import pytest

from denoisers.base import DeviceNeed
from denoisers.devices import check_device_name, cuda_count, resolve_device
from denoisers.errors import DenoiserUnavailableError


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_names_accepted(name: str):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "CPU", "cuda:x", ""])
def test_device_names_refused(name: str):
    with pytest.raises(ValueError, match="must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        check_device_name(name)


def test_cpu_methods_never_touch_a_gpu():
    assert resolve_device("cuda:7", DeviceNeed.CPU) == "cpu"


def test_auto_and_explicit_cuda():
    n = cuda_count()
    assert resolve_device("auto", DeviceNeed.GPU_PREFERRED) == ("cuda:0" if n else "cpu")
    assert resolve_device("cpu", DeviceNeed.GPU_PREFERRED) == "cpu"
    if n == 0:
        with pytest.raises(DenoiserUnavailableError, match="has 0 CUDA device"):
            resolve_device("cuda:0", DeviceNeed.GPU_PREFERRED)
        with pytest.raises(DenoiserUnavailableError, match="requires a CUDA GPU"):
            resolve_device("auto", DeviceNeed.GPU_REQUIRED)
    else:
        assert resolve_device("cuda", DeviceNeed.GPU_REQUIRED) == "cuda:0"
        with pytest.raises(DenoiserUnavailableError):
            resolve_device(f"cuda:{n}", DeviceNeed.GPU_PREFERRED)
