"""The one interface every PET denoiser implements: inputs, result, spec, params and the ``Denoiser`` ABC.

Data in and out are plain numpy arrays in (z, y, x) order; torch stays inside the plugins. ``Denoiser.denoise``
is a template method: it checks the inputs against the instance's ``spec`` before any work, runs ``_run``, then
checks the result, so every plugin gets the same guarantees (see ``tests/denoisers/test_contract.py``).
"""

from __future__ import annotations

import abc
import enum
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from denoisers.errors import DenoiserError, InvalidInputError, MissingInputError
from denoisers.threads import run_released

logger = logging.getLogger(__name__)

Volume = npt.NDArray[np.float32]
"""A (z, y, x) float32 volume: activity concentration in the source units (e.g. Bq/ml), or a resampled prior."""


class InputKind(enum.StrEnum):
    """What a denoiser can be given."""

    PET = "pet"  # always supplied
    SPACING = "spacing"  # (dz, dy, dx) mm; always supplied, *required* iff the result depends on it
    MR_PRIOR = "mr_prior"  # already resampled onto the PET grid
    CT_PRIOR = "ct_prior"  # already resampled onto the PET grid (HU)


class OutputKind(enum.StrEnum):
    """What a denoiser can return."""

    DENOISED = "denoised"  # always produced
    STABILITY = "stability"  # e.g. std of DIP iterates (conditional-DIP paper)
    UNCERTAINTY = "uncertainty"  # e.g. std of diffusion posterior samples


class DeviceNeed(enum.StrEnum):
    """Where a denoiser can run."""

    CPU = "cpu"  # never touches a GPU
    GPU_PREFERRED = "gpu_preferred"  # runs on CPU (slowly) when there is no GPU, e.g. in CI
    GPU_REQUIRED = "gpu_required"  # refuses to run on CPU outside tests


@dataclass(frozen=True, slots=True)
class DenoiserSpec:
    """What one configured denoiser instance needs and produces (it may depend on params or a model card)."""

    requires: frozenset[InputKind]
    optional: frozenset[InputKind] = frozenset()
    produces: frozenset[OutputKind] = frozenset({OutputKind.DENOISED})
    device: DeviceNeed = DeviceNeed.CPU
    needs_weights: bool = False
    stochastic: bool = False  # if True, results depend on ``seed`` (and only on it)


@dataclass(frozen=True, slots=True)
class DenoiseInputs:
    """Everything a denoiser may look at; priors are already on the PET grid.

    Parameters
    ----------
    pet : Volume
        (z, y, x) float32 activity concentration.
    spacing : tuple of float
        Voxel spacing (dz, dy, dx) in mm.
    mr_prior, ct_prior : Volume or None
        Anatomical priors resampled onto the PET grid (same shape, float32).
    suv_factor : float or None
        SUVbw per unit of ``pet`` (g/ml per Bq/ml) when the series' metadata allows it; learned methods trained
        on SUV-normalised images use it.
    """

    pet: Volume
    spacing: tuple[float, float, float]
    mr_prior: Volume | None = None
    ct_prior: Volume | None = None
    suv_factor: float | None = None

    def provided(self) -> frozenset[InputKind]:
        """Return the kinds of input present."""
        kinds = {InputKind.PET, InputKind.SPACING}
        if self.mr_prior is not None:
            kinds.add(InputKind.MR_PRIOR)
        if self.ct_prior is not None:
            kinds.add(InputKind.CT_PRIOR)
        return frozenset(kinds)

    def arrays(self) -> dict[InputKind, Volume]:
        """Return the input volumes present, by kind."""
        found = {InputKind.PET: self.pet, InputKind.MR_PRIOR: self.mr_prior, InputKind.CT_PRIOR: self.ct_prior}
        return {kind: arr for kind, arr in found.items() if arr is not None}


@dataclass(frozen=True, slots=True)
class DenoiseResult:
    """A denoised volume, optional voxel-wise maps, and ``info`` for the DICOM provenance.

    ``info`` holds small JSON-friendly values (iterations, seed, model version, derived parameters ...).
    """

    denoised: Volume
    stability: Volume | None = None
    uncertainty: Volume | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def outputs(self) -> dict[OutputKind, Volume]:
        """Return the output volumes present, by kind."""
        found = {
            OutputKind.DENOISED: self.denoised,
            OutputKind.STABILITY: self.stability,
            OutputKind.UNCERTAINTY: self.uncertainty,
        }
        return {kind: arr for kind, arr in found.items() if arr is not None}


class DenoiserParams(BaseModel):
    """Base of every plugin's hyper-parameters (validated from the rules file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Options added after a denoiser first shipped, left out of ``dump`` while they are None (off): a route that
    # does not use them keeps the parameters, and so the derived series UIDs, it had before they existed.
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    def dump(self) -> dict[str, Any]:
        """The parameters as JSON-ready values, less the ``omit_when_none`` options that are off."""
        return {k: v for k, v in self.model_dump(mode="json").items() if not (v is None and k in self.omit_when_none)}


ParamsT = TypeVar("ParamsT", bound=DenoiserParams)


def all_finite(arr: npt.NDArray[np.floating[Any]]) -> bool:
    """Whether every value is finite, without a boolean copy of the volume: a NaN or an infinity makes the float64
    sum non-finite, and finite float32 values cannot overflow it (3.4e38 x 1e9 voxels < 1.8e308)."""
    return bool(np.isfinite(np.sum(arr, dtype=np.float64)))


def _check_volume(arr: object, what: str, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(arr, np.ndarray):
        raise InvalidInputError(f"{what} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 3 or arr.size == 0:
        raise InvalidInputError(f"{what} must be a non-empty 3-D (z, y, x) array, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise InvalidInputError(f"{what} has shape {arr.shape}, expected the PET shape {shape}")
    if arr.dtype != np.float32:
        raise InvalidInputError(f"{what} must be float32, got {arr.dtype}")
    if not all_finite(arr):
        raise InvalidInputError(f"{what} contains {int(np.count_nonzero(~np.isfinite(arr)))} non-finite values")


def check_inputs(spec: DenoiserSpec, inputs: DenoiseInputs, *, name: str = "denoiser") -> None:
    """Check that ``inputs`` satisfy ``spec`` and are well formed.

    Raises
    ------
    MissingInputError
        A required input is absent.
    InvalidInputError
        Wrong type, shape or dtype, non-finite values, or a spacing that is not three positive numbers.
    """
    missing = spec.requires - inputs.provided()
    if missing:
        raise MissingInputError(f"{name} requires {', '.join(sorted(missing))}, which was not supplied")
    _check_volume(inputs.pet, "pet")
    try:
        spacing = tuple(float(s) for s in inputs.spacing)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InvalidInputError(f"spacing must be three positive finite mm values (dz, dy, dx), got {inputs.spacing!r}")
    for kind, arr in inputs.arrays().items():
        if kind is not InputKind.PET:
            _check_volume(arr, str(kind), inputs.pet.shape)


def check_result(spec: DenoiserSpec, inputs: DenoiseInputs, result: object, *, name: str = "denoiser") -> None:
    """Check that ``result`` holds exactly the declared outputs, each a new finite float32 PET-shaped volume.

    Raises
    ------
    DenoiserError
        The plugin broke the contract (a bug in the plugin, not in the data).
    """
    if not isinstance(result, DenoiseResult):
        raise DenoiserError(f"{name} returned {type(result).__name__}, expected DenoiseResult")
    outputs = result.outputs()
    if missing := spec.produces - outputs.keys():
        raise DenoiserError(f"{name} declared but did not return: {', '.join(sorted(missing))}")
    if extra := outputs.keys() - spec.produces:
        raise DenoiserError(f"{name} returned undeclared outputs: {', '.join(sorted(extra))}")
    sources = inputs.arrays().values()
    for kind, arr in outputs.items():
        try:
            _check_volume(arr, f"{name} output {kind}", inputs.pet.shape)
        except InvalidInputError as exc:
            raise DenoiserError(str(exc)) from exc
        # Outputs outlive the inputs (they are written to DICOM); an alias would let a later write change both.
        if any(np.may_share_memory(arr, src) for src in sources):
            raise DenoiserError(f"{name} output {kind} shares memory with an input; return a new array")
    if not isinstance(result.info, Mapping):
        raise DenoiserError(f"{name} info must be a mapping, got {type(result.info).__name__}")


class Denoiser(abc.ABC, Generic[ParamsT]):
    """Base class of every PET denoiser.

    Subclasses set ``name`` (the registry key), ``Params`` and, when not CPU-only, ``device_need``; return their
    ``spec`` (per instance: it may depend on params or a model card; build it with ``make_spec`` so that its
    ``device`` is ``device_need``) and implement ``_run``. Callers use ``denoise``, which validates around ``_run``.

    Parameters
    ----------
    params : DenoiserParams
        An instance of the subclass's ``Params``.
    device : str
        Torch device string for plugins that use one ("cpu", "cuda", "cuda:1").
    weights : Path or None
        Model weights, for plugins whose ``spec.needs_weights`` (a bare path, unchecked).
    model : object or None
        A checked model from the registry (``denoisers.models.ResolvedModel``: its card, with the weights'
        sha256, and the weights' path), for plugins that build themselves from a model card (``cnn``).
    seed : int or None
        Seed for stochastic plugins; the same seed gives the same result.
    """

    name: ClassVar[str]
    Params: ClassVar[type[DenoiserParams]]
    # Where the method can run, known before an instance exists, so the node can pick a worker lane (a GPU
    # worker or the CPU pool) without loading weights. The one source of truth: ``make_spec`` copies it into the
    # instance's ``spec.device``, and ``denoise`` refuses a spec that disagrees (else a lane would be silently wrong).
    device_need: ClassVar[DeviceNeed] = DeviceNeed.CPU

    def __init__(
        self,
        params: ParamsT,
        *,
        device: str = "cpu",
        weights: Path | None = None,
        seed: int | None = None,
        model: Any = None,
    ) -> None:
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} needs {self.Params.__name__}, got {type(params).__name__}")
        self.params: ParamsT = params
        self.device = device
        self.weights = weights if weights is not None or model is None else model.weights_path
        self.model = model
        self.seed = seed

    @classmethod
    def example(cls, *, seed: int | None = None) -> Self:
        """Return a small, fast, valid instance for the contract test and smoke checks.

        The default uses ``Params()``; plugins with required params or weights override this (e.g. a tiny
        untrained network). The instance must accept a float32 volume of about 16 x 24 x 24 voxels at 2-4 mm
        spacing, plus any prior its spec requires, and finish in about a second on a CPU.
        """
        params: Any = cls.Params()
        return cls(params, seed=seed)

    @property
    @abc.abstractmethod
    def spec(self) -> DenoiserSpec:
        """What this instance requires and produces (build it with ``make_spec``)."""

    @classmethod
    def make_spec(
        cls,
        requires: frozenset[InputKind],
        *,
        optional: frozenset[InputKind] = frozenset(),
        produces: frozenset[OutputKind] = frozenset({OutputKind.DENOISED}),
        needs_weights: bool = False,
        stochastic: bool = False,
    ) -> DenoiserSpec:
        """Return a ``DenoiserSpec`` whose ``device`` is the class's ``device_need`` (the other fields as given)."""
        return DenoiserSpec(
            requires=requires,
            optional=optional,
            produces=produces,
            device=cls.device_need,
            needs_weights=needs_weights,
            stochastic=stochastic,
        )

    def denoise(self, inputs: DenoiseInputs) -> DenoiseResult:
        """Check ``inputs`` against ``spec``, run, then check the result.

        Raises
        ------
        MissingInputError, InvalidInputError
            Before any work is done.
        DenoiserError
            The plugin failed or returned something that breaks the contract (including a ``spec.device`` that
            disagrees with the class's ``device_need``, which the node schedules by).
        """
        spec = self.spec
        if spec.device != type(self).device_need:
            raise DenoiserError(
                f"{self.name}: spec.device {str(spec.device)!r} disagrees with {type(self).__name__}.device_need "
                f"{str(type(self).device_need)!r}; build the spec with make_spec"
            )
        check_inputs(spec, inputs, name=self.name)
        start = time.perf_counter()
        # Off the caller's thread when that is a worker lane: no OpenMP team outlives the run (denoisers.threads).
        result = run_released(lambda: self._run(inputs))
        check_result(spec, inputs, result, name=self.name)
        logger.debug("denoiser=%s shape=%s took %.3f s", self.name, inputs.pet.shape, time.perf_counter() - start)
        return result

    @abc.abstractmethod
    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        """Do the work on validated inputs; never modify them."""

    def close(self) -> None:
        """Release GPU memory or other resources. The default does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r}, device={self.device!r}, seed={self.seed!r})"
