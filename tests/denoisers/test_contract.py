"""The interface contract, checked for every denoiser in the registry and for the base class itself.

A new plugin is covered by adding its entry to ``denoisers.registry``; it is built with its ``example`` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from denoisers import registry
from denoisers.base import (
    DenoiseInputs,
    DenoiseResult,
    Denoiser,
    DenoiserParams,
    DenoiserSpec,
    DeviceNeed,
    InputKind,
    OutputKind,
)
from denoisers.errors import DenoiserError, InvalidInputError, MissingInputError

SHAPE = (12, 20, 24)  # distinct sizes so that swapped axes show
SPACING = (3.27, 4.0, 4.0)
PRIORS = (InputKind.MR_PRIOR, InputKind.CT_PRIOR)


def make_inputs(kinds: frozenset[InputKind], *, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> DenoiseInputs:
    """A noisy body with a hot sphere (Bq/ml), plus the priors named in ``kinds``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    body = (y**2 + x**2 < 0.8).astype(np.float64)
    sphere = (z**2 + (y - 0.2) ** 2 + (x + 0.3) ** 2 < 0.1).astype(np.float64)
    pet = rng.poisson(50.0 * (body + 4.0 * sphere) + 1.0) * 100.0
    mr = 800.0 * body + 400.0 * sphere
    ct = np.where(body > 0, 40.0, -1000.0)
    return DenoiseInputs(
        pet=pet.astype(np.float32),
        spacing=SPACING,
        mr_prior=mr.astype(np.float32) if InputKind.MR_PRIOR in kinds else None,
        ct_prior=ct.astype(np.float32) if InputKind.CT_PRIOR in kinds else None,
    )


def _full_inputs(den: Denoiser[Any]) -> DenoiseInputs:
    return make_inputs(den.spec.requires | den.spec.optional)


def _assert_same_result(a: DenoiseResult, b: DenoiseResult) -> None:
    assert a.outputs().keys() == b.outputs().keys()
    for kind, arr in a.outputs().items():
        assert np.array_equal(arr, b.outputs()[kind]), kind


@pytest.fixture(params=list(registry.available().items()), ids=lambda item: item[0])
def name(request: pytest.FixtureRequest) -> str:
    """Every registered denoiser; the unavailable ones are skipped with the reason."""
    plugin, reason = request.param
    if reason is not None:
        pytest.skip(f"{plugin} unavailable here: {reason}")
    return str(plugin)


@pytest.fixture
def spy_run(monkeypatch: pytest.MonkeyPatch) -> Callable[[Denoiser[Any]], list[DenoiseInputs]]:
    """Replace an instance's ``_run`` by a recorder, to prove that validation happens before any work."""

    def install(den: Denoiser[Any]) -> list[DenoiseInputs]:
        calls: list[DenoiseInputs] = []

        def fake_run(inputs: DenoiseInputs) -> DenoiseResult:
            calls.append(inputs)
            raise AssertionError("_run reached despite invalid inputs")

        monkeypatch.setattr(den, "_run", fake_run)
        return calls

    return install


# --- every registered denoiser --------------------------------------------------------------------------------


def test_outputs_have_pet_shape_float32_finite_and_match_the_spec(name: str) -> None:
    den = registry.create_example(name, seed=0)
    spec = den.spec
    assert InputKind.PET in spec.requires
    assert OutputKind.DENOISED in spec.produces
    inputs = _full_inputs(den)
    result = den.denoise(inputs)
    assert result.outputs().keys() == spec.produces  # declared present, nothing undeclared
    for kind, arr in result.outputs().items():
        assert arr.shape == SHAPE, kind
        assert arr.dtype == np.float32, kind
        assert np.isfinite(arr).all(), kind
    assert isinstance(result.info, Mapping)


def test_device_need_agrees_with_spec(name: str) -> None:
    # The node picks a worker lane from the class attribute before any instance exists (dicom_node.node.lane_for);
    # an instance whose spec says otherwise would run on the wrong lane without a word (NLM once declared
    # GPU-preferred in its spec while the class said CPU, so `device: cuda` was ignored).
    cls = registry.get_class(name)
    den = registry.create_example(name, seed=0)
    assert type(den) is cls
    assert isinstance(cls.device_need, DeviceNeed)
    assert den.spec.device == cls.device_need


def test_missing_prior_rejected_before_work(name: str, spy_run: Callable[[Denoiser[Any]], list[DenoiseInputs]]) -> None:
    den = registry.create_example(name, seed=0)
    required_priors = [kind for kind in PRIORS if kind in den.spec.requires]
    if not required_priors:
        pytest.skip(f"{name} requires no prior")
    calls = spy_run(den)
    for kind in required_priors:
        with pytest.raises(MissingInputError, match=str(kind)):
            den.denoise(make_inputs(den.spec.requires - {kind}))
    assert calls == []


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda i: replace(i, pet=i.pet.astype(np.float64)),
        lambda i: replace(i, pet=i.pet[0]),
        lambda i: replace(i, pet=np.where(i.pet > 0, np.nan, i.pet).astype(np.float32)),
        lambda i: replace(i, spacing=(3.27, 0.0, 4.0)),
        lambda i: replace(i, spacing=(4.0, 4.0)),
        lambda i: replace(i, mr_prior=np.zeros((2, 2, 2), np.float32)),
    ],
    ids=["float64", "2-d", "nan", "zero-spacing", "two-spacings", "prior-shape"],
)
def test_invalid_inputs_rejected_before_work(
    name: str,
    corrupt: Callable[[DenoiseInputs], DenoiseInputs],
    spy_run: Callable[[Denoiser[Any]], list[DenoiseInputs]],
) -> None:
    den = registry.create_example(name, seed=0)
    calls = spy_run(den)
    with pytest.raises(InvalidInputError):
        den.denoise(corrupt(_full_inputs(den)))
    assert calls == []


def test_same_seed_same_result(name: str) -> None:
    den = registry.create_example(name, seed=1234)
    inputs = _full_inputs(den)
    first = den.denoise(inputs)
    _assert_same_result(first, den.denoise(inputs))  # no hidden state between calls
    _assert_same_result(first, registry.create_example(name, seed=1234).denoise(inputs))
    if den.spec.stochastic:
        other = registry.create_example(name, seed=4321).denoise(inputs)
        assert not np.array_equal(first.denoised, other.denoised), "stochastic, yet the seed changes nothing"


def test_inputs_never_modified(name: str) -> None:
    den = registry.create_example(name, seed=0)
    inputs = _full_inputs(den)
    originals = {kind: arr.copy() for kind, arr in inputs.arrays().items()}
    for arr in inputs.arrays().values():
        arr.flags.writeable = False  # any in-place write raises
    result = den.denoise(inputs)
    for kind, arr in inputs.arrays().items():
        assert np.array_equal(arr, originals[kind]), kind
    for out in result.outputs().values():
        assert not any(np.may_share_memory(out, arr) for arr in inputs.arrays().values())


def test_spacing_honoured(name: str) -> None:
    # A plugin that requires SPACING must let it change the result (or refuse a spacing it cannot handle, e.g. a
    # CNN trained at another one); one that does not require it must give the same result at any spacing.
    den = registry.create_example(name, seed=0)
    inputs = _full_inputs(den)
    base = den.denoise(inputs)
    other_spacing = (SPACING[0] * 1.5, SPACING[1], SPACING[2] * 0.5)
    if InputKind.SPACING in den.spec.requires:
        try:
            other = den.denoise(replace(inputs, spacing=other_spacing))
        except InvalidInputError:
            return
        assert not np.array_equal(base.denoised, other.denoised), "requires SPACING but ignores it"
    else:
        _assert_same_result(base, den.denoise(replace(inputs, spacing=other_spacing)))


# --- the base class, through test-only subclasses -------------------------------------------------------------


class _ProbeParams(DenoiserParams):
    scale: float = 1.0


class _Probe(Denoiser[_ProbeParams]):
    """Copies the PET (times ``scale``) or returns what ``make`` builds; counts calls to ``_run``."""

    name = "probe"
    Params = _ProbeParams

    def __init__(
        self,
        spec: DenoiserSpec,
        make: Callable[[DenoiseInputs], object] | None = None,
        params: _ProbeParams | None = None,
    ) -> None:
        super().__init__(params or _ProbeParams())
        self._spec = spec
        self._make = make
        self.calls = 0
        self.closed = False

    @property
    def spec(self) -> DenoiserSpec:
        return self._spec

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        self.calls += 1
        if self._make is not None:
            return self._make(inputs)  # type: ignore[return-value]  # deliberately anything, to test check_result
        return DenoiseResult(denoised=inputs.pet * np.float32(self.params.scale))

    def close(self) -> None:
        self.closed = True


_PET_ONLY = DenoiserSpec(requires=frozenset({InputKind.PET, InputKind.SPACING}))
_NEEDS_MR = DenoiserSpec(requires=frozenset({InputKind.PET, InputKind.SPACING, InputKind.MR_PRIOR}))


def test_base_rejects_missing_mr_prior_before_work() -> None:
    den = _Probe(_NEEDS_MR)
    with pytest.raises(MissingInputError, match="mr_prior"):
        den.denoise(make_inputs(frozenset()))
    assert den.calls == 0
    result = den.denoise(make_inputs(frozenset({InputKind.MR_PRIOR})))
    assert den.calls == 1
    assert result.denoised.shape == SHAPE


def _pet(i: DenoiseInputs) -> np.ndarray:
    return i.pet.copy()


@pytest.mark.parametrize(
    ("produces", "make", "message"),
    [
        ({OutputKind.DENOISED}, lambda i: _pet(i), "expected DenoiseResult"),
        ({OutputKind.DENOISED}, lambda i: DenoiseResult(_pet(i)[1:]), "shape"),
        ({OutputKind.DENOISED}, lambda i: DenoiseResult(_pet(i) * np.float32(np.nan)), "non-finite"),
        ({OutputKind.DENOISED}, lambda i: DenoiseResult(_pet(i).astype(np.float64)), "float32"),
        ({OutputKind.DENOISED}, lambda i: DenoiseResult(_pet(i), stability=_pet(i)), "undeclared"),
        ({OutputKind.DENOISED, OutputKind.UNCERTAINTY}, lambda i: DenoiseResult(_pet(i)), "did not return"),
        ({OutputKind.DENOISED}, lambda i: DenoiseResult(i.pet), "shares memory"),
        ({OutputKind.DENOISED}, lambda i: DenoiseResult(_pet(i), info=[1]), "info"),  # type: ignore[arg-type]
    ],
    ids=["not-a-result", "shape", "nan", "float64", "undeclared", "missing-declared", "alias", "info"],
)
def test_base_rejects_results_that_break_the_contract(
    produces: set[OutputKind], make: Callable[[DenoiseInputs], object], message: str
) -> None:
    den = _Probe(DenoiserSpec(requires=_PET_ONLY.requires, produces=frozenset(produces)), make)
    with pytest.raises(DenoiserError, match=message):
        den.denoise(make_inputs(frozenset()))


def test_base_refuses_a_spec_that_disagrees_with_device_need() -> None:
    den = _Probe(replace(_PET_ONLY, device=DeviceNeed.GPU_PREFERRED))  # the class says CPU
    with pytest.raises(DenoiserError, match="device_need"):
        den.denoise(make_inputs(frozenset()))
    assert den.calls == 0

    class _GpuProbe(_Probe):
        device_need = DeviceNeed.GPU_REQUIRED

    spec = _GpuProbe.make_spec(frozenset({InputKind.PET}), stochastic=True)
    assert spec.device is DeviceNeed.GPU_REQUIRED and spec.stochastic
    assert _GpuProbe(spec).denoise(make_inputs(frozenset())).denoised.shape == SHAPE


def test_base_accepts_read_only_float32_and_numpy_spacing() -> None:
    inputs = make_inputs(frozenset())
    inputs.pet.flags.writeable = False
    den = _Probe(_PET_ONLY, params=_ProbeParams(scale=2.0))
    result = den.denoise(replace(inputs, spacing=tuple(np.array(SPACING, np.float32))))  # type: ignore[arg-type]
    assert np.array_equal(result.denoised, inputs.pet * 2)


def test_base_checks_params_type_and_closes_as_context_manager() -> None:
    with pytest.raises(TypeError, match="_ProbeParams"):
        _Probe(_PET_ONLY, params=DenoiserParams())  # type: ignore[arg-type]
    with _Probe(_PET_ONLY) as den:
        assert not den.closed
    assert den.closed


def test_example_hook_builds_from_default_params() -> None:
    class _Simple(Denoiser[_ProbeParams]):
        name = "simple"
        Params = _ProbeParams
        spec = _PET_ONLY  # type: ignore[assignment]  # a constant spec is fine for a test plugin

        def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
            return DenoiseResult(inputs.pet.copy())

    den = _Simple.example(seed=5)
    assert den.params == _ProbeParams() and den.seed == 5 and den.device == "cpu"
