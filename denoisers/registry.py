"""Plugin registry: short names mapped to ``module:Class`` import paths, loaded lazily.

Nothing is imported until a name is asked for, so importing ``denoisers`` stays cheap and a plugin whose heavy
dependency is missing is reported by ``available()`` instead of crashing the node. This registry knows which
*classes* exist; trained weights and their versions live in the separate model store.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from denoisers.base import Denoiser, DenoiserParams
from denoisers.errors import DenoiserError, DenoiserUnavailableError, UnknownDenoiserError

logger = logging.getLogger(__name__)

_BUILTIN: dict[str, str] = {
    "gaussian": "denoisers.gaussian:GaussianDenoiser",
    "nlm": "denoisers.nlm:NLMDenoiser",
    "cnn": "denoisers.cnn:CNNDenoiser",
    "cdip": "denoisers.dip:ConditionalDIPDenoiser",
    "bcdpm": "denoisers.diffusion:BCDPMDenoiser",
    # Later plugins plug in here by one entry each (and the contract test picks them up).
}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def names() -> list[str]:
    """Return every registered denoiser name, usable here or not, in registry order."""
    return list(_BUILTIN)


def get_class(name: str) -> type[Denoiser[Any]]:
    """Import and return the denoiser class registered as ``name``.

    Raises
    ------
    UnknownDenoiserError
        No such name (the message suggests the closest one).
    DenoiserUnavailableError
        The plugin's module cannot be imported here (e.g. a missing dependency); the message says why.
    DenoiserError
        The table entry does not point at a ``Denoiser`` subclass with that ``name`` (a packaging bug).
    """
    try:
        path = _BUILTIN[name]
    except (KeyError, TypeError):
        raise UnknownDenoiserError(
            f"unknown denoiser {name!r}{_did_you_mean(str(name), _BUILTIN)}; known: {', '.join(_BUILTIN)}"
        ) from None
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:  # OSError: e.g. a native library of torch failing to load
        raise DenoiserUnavailableError(f"denoiser {name!r} is unavailable: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not issubclass(cls, Denoiser) or getattr(cls, "name", None) != name:
        raise DenoiserError(f"registry entry {name!r} -> {path!r} is not a Denoiser subclass named {name!r}")
    return cls


def available() -> dict[str, str | None]:
    """Return ``{name: None}`` for usable denoisers and ``{name: reason}`` for those that cannot load here."""
    report: dict[str, str | None] = {}
    for name in names():
        try:
            get_class(name)
        except DenoiserUnavailableError as exc:
            report[name] = str(exc)
        else:
            report[name] = None
    return report


def _describe(exc: ValidationError, fields: Iterable[str]) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "params"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown parameter {where!r}{_did_you_mean(where, fields)}")
        else:
            parts.append(f"{where}: {err['msg']} (got {err['input']!r})")
    return "; ".join(parts)


def validate_params(name: str, params: Mapping[str, Any] | None = None) -> DenoiserParams:
    """Validate ``params`` against denoiser ``name``'s ``Params`` model (missing keys take their defaults).

    Raises
    ------
    UnknownDenoiserError, DenoiserUnavailableError
        As ``get_class``.
    DenoiserError
        Invalid params; the message names each bad key and value and suggests the closest known key.
    """
    cls = get_class(name)
    try:
        return cls.Params.model_validate({} if params is None else params)
    except ValidationError as exc:
        fields = list(cls.Params.model_fields)
        raise DenoiserError(
            f"invalid params for denoiser {name!r}: {_describe(exc, fields)}; allowed: {', '.join(fields) or 'none'}"
        ) from exc


def create(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    weights: Path | None = None,
    seed: int | None = None,
    model: Any = None,
) -> Denoiser[Any]:
    """Validate ``params`` and build denoiser ``name`` (errors as ``validate_params``); ``model`` is a checked
    registry model (``denoisers.models.ResolvedModel``) for plugins built from a model card."""
    cls = get_class(name)
    denoiser = cls(validate_params(name, params), device=device, weights=weights, seed=seed, model=model)
    logger.debug("created %r", denoiser)
    return denoiser


def create_example(name: str, *, seed: int | None = None) -> Denoiser[Any]:
    """Build a small, fast, valid instance of denoiser ``name`` (its ``example`` hook), for tests and smoke checks."""
    return get_class(name).example(seed=seed)
