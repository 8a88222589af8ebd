"""The one root exception of the numerics package and its specific subclasses."""

from __future__ import annotations


class DenoiserError(Exception):
    """Root of every error raised by ``denoisers``."""


class InvalidInputError(DenoiserError, ValueError):
    """Inputs have the wrong shape, dtype, non-finite values or a non-positive spacing."""


class MissingInputError(DenoiserError):
    """A required input (e.g. an MR prior) was not supplied; raised before any work starts."""


class UnknownDenoiserError(DenoiserError, KeyError):
    """No denoiser is registered under that name (the message suggests the closest one)."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class DenoiserUnavailableError(DenoiserError):
    """The denoiser exists but cannot load here (missing dependency); the message says which."""


class WeightsError(DenoiserError):
    """Model weights are missing, unreadable or fail their checksum."""


class ModelRegistryError(DenoiserError):
    """A model-store operation was refused or failed (unknown model or version, in use, duplicate, bad card)."""
