"""Plugin registry: lookup with did-you-mean, params validation, lazy and failure-tolerant loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from denoisers import registry
from denoisers.base import DenoiseInputs, DenoiseResult, Denoiser, DenoiserParams, DenoiserSpec, InputKind
from denoisers.errors import DenoiserError, DenoiserUnavailableError, UnknownDenoiserError
from denoisers.gaussian import GaussianDenoiser, GaussianParams


class _FakeParams(DenoiserParams):
    strength: int = 1


class _FakeDenoiser(Denoiser[_FakeParams]):
    """A plugin registered only by a table entry, as later plugins will be."""

    name = "fake"
    Params = _FakeParams

    @property
    def spec(self) -> DenoiserSpec:
        return DenoiserSpec(requires=frozenset({InputKind.PET}))

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        return DenoiseResult(inputs.pet + np.float32(self.params.strength))


def test_gaussian_is_registered_and_usable() -> None:
    assert "gaussian" in registry.names()
    assert registry.available()["gaussian"] is None
    assert registry.get_class("gaussian") is GaussianDenoiser


@pytest.mark.parametrize(
    ("typo", "suggestion"), [("gausian", "gaussian"), ("Gaussian", "gaussian"), ("gauss", "gaussian")]
)
def test_unknown_name_suggests_closest(typo: str, suggestion: str) -> None:
    with pytest.raises(UnknownDenoiserError, match=f"unknown denoiser '{typo}' \\(did you mean '{suggestion}'\\?\\)"):
        registry.get_class(typo)


def test_unknown_name_without_close_match_lists_known_names() -> None:
    with pytest.raises(UnknownDenoiserError) as excinfo:
        registry.create("wavelet", {})
    message = str(excinfo.value)
    assert "did you mean" not in message
    assert "'wavelet'" in message and "gaussian" in message
    assert isinstance(excinfo.value, KeyError)  # callers may treat it as a failed lookup


def test_validate_params_applies_defaults_and_returns_the_plugin_model() -> None:
    params = registry.validate_params("gaussian", {"fwhm_mm": 6})
    assert params == GaussianParams(fwhm_mm=6.0)
    assert registry.validate_params("gaussian", {}) == GaussianParams()
    assert registry.validate_params("gaussian", None) == GaussianParams()


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ({"fwhm": 6.0}, ["unknown parameter 'fwhm'", "did you mean 'fwhm_mm'?", "allowed: fwhm_mm, fwhm_mm_z"]),
        ({"fwhm_mm": -1.0}, ["fwhm_mm", "greater than 0", "got -1.0"]),
        ({"fwhm_mm": "wide"}, ["fwhm_mm", "got 'wide'"]),
        ({"fwhm_mm_z": 0, "fwhmz": 3}, ["fwhm_mm_z", "got 0", "did you mean 'fwhm_mm_z'?"]),
        ([6.0], ["params", "got [6.0]"]),
    ],
    ids=["unknown-key", "negative", "not-a-number", "two-problems", "not-a-mapping"],
)
def test_bad_params_raise_denoiser_error_naming_key_and_value(params: object, fragments: list[str]) -> None:
    with pytest.raises(DenoiserError) as excinfo:
        registry.validate_params("gaussian", params)  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert message.startswith("invalid params for denoiser 'gaussian': ")
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(DenoiserError):
        registry.create("gaussian", params)  # type: ignore[arg-type]


def test_validate_params_unknown_denoiser() -> None:
    with pytest.raises(UnknownDenoiserError, match="did you mean 'gaussian'"):
        registry.validate_params("gausian", {"fwhm_mm": 4.0})


def test_create_passes_params_device_and_seed() -> None:
    den = registry.create("gaussian", {"fwhm_mm": 5.0, "fwhm_mm_z": 7.0}, seed=3)
    assert isinstance(den, GaussianDenoiser)
    assert den.params == GaussianParams(fwhm_mm=5.0, fwhm_mm_z=7.0)
    assert (den.device, den.seed, den.weights) == ("cpu", 3, None)
    assert isinstance(registry.create_example("gaussian"), GaussianDenoiser)


def test_a_table_entry_is_all_a_plugin_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._BUILTIN, "fake", f"{__name__}:_FakeDenoiser")
    assert registry.available()["fake"] is None
    den = registry.create("fake", {"strength": 2})
    result = den.denoise(DenoiseInputs(np.zeros((2, 3, 4), np.float32), (1.0, 1.0, 1.0)))
    assert np.array_equal(result.denoised, np.full((2, 3, 4), 2.0, np.float32))


def test_unimportable_plugin_is_reported_not_crashed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._BUILTIN, "needs_missing", "denoisers._petnode_no_such_module:Missing")
    report = registry.available()
    assert report["gaussian"] is None
    assert report["needs_missing"] is not None and "_petnode_no_such_module" in report["needs_missing"]
    with pytest.raises(DenoiserUnavailableError, match="needs_missing"):
        registry.get_class("needs_missing")
    with pytest.raises(DenoiserUnavailableError):
        registry.validate_params("needs_missing", {})


@pytest.mark.parametrize(
    "path", ["denoisers.errors:DenoiserError", "denoisers.gaussian:NoSuchClass", "denoisers.gaussian:GaussianDenoiser"]
)
def test_bad_table_entry_is_a_denoiser_error(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # The last case points at a real plugin whose ``name`` differs from the key.
    monkeypatch.setitem(registry._BUILTIN, "mislabelled", path)
    with pytest.raises(DenoiserError, match="not a Denoiser subclass named 'mislabelled'"):
        registry.get_class("mislabelled")


def test_importing_the_package_stays_light() -> None:
    code = (
        "import sys, denoisers\n"
        "heavy = sorted(m for m in ('torch', 'scipy', 'pydicom', 'pynetdicom', 'denoisers.gaussian')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == ""
