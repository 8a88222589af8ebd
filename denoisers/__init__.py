"""Pure numerics for PET denoising: volumes in, volumes out; no DICOM, no network, no config files.

Importing this package is cheap: plugins (and their scipy / torch imports) load only when asked for by name.
"""

from __future__ import annotations

import logging

from denoisers.base import (
    DenoiseInputs,
    DenoiseResult,
    Denoiser,
    DenoiserParams,
    DenoiserSpec,
    DeviceNeed,
    InputKind,
    OutputKind,
    Volume,
    check_inputs,
    check_result,
)
from denoisers.errors import (
    DenoiserError,
    DenoiserUnavailableError,
    InvalidInputError,
    MissingInputError,
    UnknownDenoiserError,
    WeightsError,
)
from denoisers.registry import available, create, create_example, get_class, names, validate_params

__all__ = [
    "DenoiseInputs",
    "DenoiseResult",
    "Denoiser",
    "DenoiserError",
    "DenoiserParams",
    "DenoiserSpec",
    "DenoiserUnavailableError",
    "DeviceNeed",
    "InputKind",
    "InvalidInputError",
    "MissingInputError",
    "OutputKind",
    "UnknownDenoiserError",
    "Volume",
    "WeightsError",
    "available",
    "check_inputs",
    "check_result",
    "create",
    "create_example",
    "get_class",
    "names",
    "validate_params",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
