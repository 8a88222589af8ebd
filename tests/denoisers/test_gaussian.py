"""GaussianDenoiser: FWHM in mm per axis, activity preservation at the edges, non-negativity, uniform regions."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError
from scipy import ndimage, special

from denoisers.base import DenoiseInputs
from denoisers import gaussian
from denoisers.gaussian import FWHM_PER_SIGMA, GaussianDenoiser, GaussianParams, discrete_gaussian_kernel


def _filter(pet: npt.NDArray[np.float32], spacing: tuple[float, float, float], **params: float) -> np.ndarray:
    result = GaussianDenoiser(GaussianParams(**params)).denoise(DenoiseInputs(pet, spacing))
    assert result.denoised.dtype == np.float32
    return result.denoised


def _edge_heavy_volume(shape: tuple[int, int, int], seed: int = 0) -> npt.NDArray[np.float32]:
    """Noisy activity that is hottest on the volume faces, where a careless filter loses or gains it."""
    rng = np.random.default_rng(seed)
    vol = rng.gamma(2.0, 500.0, shape)
    vol[0] += 20_000.0  # hot first slice
    vol[:, :, -1] += 30_000.0  # hot last column
    vol[-1, 0, :] += 50_000.0  # hot edge line
    return vol.astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "fwhm_mm"),
    [((17, 23, 29), 4.0), ((17, 23, 29), 12.0), ((5, 9, 7), 60.0), ((1, 16, 16), 6.0)],
    ids=["4mm", "12mm", "kernel-wider-than-volume", "one-slice"],
)
def test_total_activity_preserved_with_activity_on_the_edges(shape: tuple[int, int, int], fwhm_mm: float) -> None:
    pet = _edge_heavy_volume(shape)
    out = _filter(pet, (3.27, 4.0, 4.0), fwhm_mm=fwhm_mm)
    total_in, total_out = pet.sum(dtype=np.float64), out.sum(dtype=np.float64)
    # The filter is exact up to float rounding; the contract only asks for 0.1 %.
    assert abs(total_out / total_in - 1.0) < 1e-5


def test_edge_test_volume_is_sensitive_to_edge_handling() -> None:
    # Guard for the test above: zero padding or edge replication visibly changes this volume's total.
    pet = _edge_heavy_volume((17, 23, 29)).astype(np.float64)
    sigma = np.array([4.0 / 3.27, 1.0, 1.0]) * 4.0 / FWHM_PER_SIGMA
    for mode in ("constant", "nearest"):
        total = ndimage.gaussian_filter(pet, sigma, mode=mode).sum()
        assert abs(total / pet.sum() - 1.0) > 1e-3, mode


def test_non_negative_input_gives_non_negative_output() -> None:
    rng = np.random.default_rng(1)
    pet = np.where(rng.random((12, 20, 24)) < 0.02, 1e5, 0.0).astype(np.float32)  # sparse hot voxels in zeros
    out = _filter(pet, (2.0, 2.0, 2.0), fwhm_mm=7.0)
    assert out.min() >= 0.0
    assert out.max() > 0.0


@pytest.mark.parametrize(
    ("spacing", "fwhm_mm", "fwhm_mm_z"),
    [((3.27, 4.0, 4.0), 4.0, None), ((2.0, 1.5, 3.0), 9.0, 6.0), ((4.0, 2.0, 2.0), 5.0, 12.0)],
    ids=["clinical-4mm-on-4mm-voxels", "anisotropic", "coarse-z"],
)
def test_point_source_fwhm_in_mm_matches_per_axis(
    spacing: tuple[float, float, float], fwhm_mm: float, fwhm_mm_z: float | None
) -> None:
    shape = (41, 45, 43)
    pet = np.zeros(shape, np.float32)
    centre = tuple(n // 2 for n in shape)
    pet[centre] = 1000.0
    params = {"fwhm_mm": fwhm_mm} if fwhm_mm_z is None else {"fwhm_mm": fwhm_mm, "fwhm_mm_z": fwhm_mm_z}
    out = _filter(pet, spacing, **params).astype(np.float64)
    expected = (fwhm_mm if fwhm_mm_z is None else fwhm_mm_z, fwhm_mm, fwhm_mm)
    for axis in range(3):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        offsets_mm = (np.arange(shape[axis]) - centre[axis]) * spacing[axis]
        measured = FWHM_PER_SIGMA * np.sqrt((profile * offsets_mm**2).sum() / profile.sum())
        assert measured == pytest.approx(expected[axis], rel=5e-3), f"axis {axis}"


def test_regional_mean_preserved_in_uniform_region_touching_the_edges() -> None:
    spacing = (3.0, 4.0, 4.0)
    pet = np.full((20, 40, 40), 1.0, np.float32)
    pet[:, :, :20] = 10.0  # a uniform slab that touches five faces of the volume
    out = _filter(pet, spacing, fwhm_mm=8.0)
    # Farther than the kernel radius (ceil(4 sigma) + 1 = 5 voxels here) from the slab's inner boundary every voxel
    # keeps its value, the ones on the volume faces included (zero padding would halve those), so the regional
    # mean of a large organ is preserved.
    assert np.allclose(out[:, :, :14], 10.0, rtol=1e-5)
    assert np.allclose(out[:, :, 26:], 1.0, rtol=1e-5)
    assert out.mean() == pytest.approx(pet.mean(), rel=1e-5)


def test_info_reports_fwhm_and_sigma_per_axis() -> None:
    den = GaussianDenoiser(GaussianParams(fwhm_mm=6.0, fwhm_mm_z=9.0))
    info = den.denoise(DenoiseInputs(np.ones((4, 5, 6), np.float32), (3.0, 2.0, 1.5))).info
    assert info["fwhm_mm"] == [9.0, 6.0, 6.0]
    assert info["sigma_vox"] == pytest.approx([9.0 / 3.0 / FWHM_PER_SIGMA, 3.0 / FWHM_PER_SIGMA, 4.0 / FWHM_PER_SIGMA])


@pytest.mark.parametrize("sigma", [0.2, 0.4247, 1.0, 3.5])
def test_discrete_kernel_has_exact_variance(sigma: float) -> None:
    kernel = discrete_gaussian_kernel(sigma)
    offsets = np.arange(kernel.size) - kernel.size // 2
    assert kernel.sum() == pytest.approx(1.0)
    assert np.array_equal(kernel, kernel[::-1])
    assert kernel.min() >= 0.0
    assert (kernel * offsets**2).sum() == pytest.approx(sigma**2, rel=1e-3)


def test_params_defaults_and_validation() -> None:
    assert GaussianParams() == GaussianParams(fwhm_mm=4.0, fwhm_mm_z=None)
    for bad in ({"fwhm_mm": 0.0}, {"fwhm_mm": -2.0}, {"fwhm_mm": float("nan")}, {"fwhm_mm": float("inf")},
                {"fwhm_mm_z": 0.0}, {"fwhm_mm": True}, {"fwhm_mm": "4"}, {"sigma": 2.0}):
        with pytest.raises(ValidationError):
            GaussianParams.model_validate(bad)
    with pytest.raises(ValidationError):
        GaussianParams().fwhm_mm = 3.0  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("slab_voxels", [1, 40 * 24, 1 << 20])
def test_slab_wise_in_plane_passes_equal_three_whole_volume_passes(monkeypatch: pytest.MonkeyPatch,
                                                                   slab_voxels: int) -> None:
    """The memory-saving slab order computes the very same 1-D correlations: bit-identical output."""
    monkeypatch.setattr(gaussian, "SLAB_VOXELS", slab_voxels)
    rng = np.random.default_rng(7)
    pet = rng.gamma(2.0, 1000.0, size=(11, 24, 40)).astype(np.float32)
    spacing = (3.27, 2.0, 4.0)
    out = GaussianDenoiser(GaussianParams(fwhm_mm=6.0)).denoise(DenoiseInputs(pet=pet, spacing=spacing)).denoised
    expected, scipy_passes = pet, pet
    for axis, step in enumerate(spacing):
        kernel = gaussian.discrete_gaussian_kernel(6.0 / gaussian.FWHM_PER_SIGMA / step)
        whole = np.empty(pet.shape, np.float32)
        gaussian.correlate_reflect(expected, kernel, axis, whole)
        expected = whole
        scipy_passes = ndimage.correlate1d(scipy_passes, kernel, axis=axis, output=np.float32, mode="reflect")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    # and the numpy correlation is scipy's (which sums in double) to float32 rounding
    np.testing.assert_allclose(out, scipy_passes, rtol=2e-6, atol=0)


@pytest.mark.parametrize("sigma", [0.2, 0.4247, 0.85, 2.0, 6.0])
def test_discrete_kernel_is_the_bessel_kernel(sigma: float) -> None:
    """The FFT-computed kernel equals exp(-t) I_n(t) (scipy's scaled Bessel function), truncated and normalised."""
    kernel = discrete_gaussian_kernel(sigma)
    radius = kernel.size // 2
    bessel = special.ive(np.arange(-radius, radius + 1), sigma * sigma)
    np.testing.assert_allclose(kernel, bessel / bessel.sum(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 3, 2), (2, 5, 4), (7, 1, 9)])
def test_axes_shorter_than_the_kernel_reflect_as_scipy(shape: tuple[int, int, int]) -> None:
    """A kernel longer than its axis (a single slice, a 1-pixel-wide image) folds the reflection again, as
    scipy does, so such inputs stay mass-preserving and equal to the reference."""
    pet = np.random.default_rng(3).gamma(2.0, 10.0, size=shape).astype(np.float32)
    kernel = discrete_gaussian_kernel(3.0)  # radius 14: longer than every axis here
    for axis in range(3):
        out = np.empty(shape, np.float32)
        gaussian.correlate_reflect(pet, kernel, axis, out)
        ref = ndimage.correlate1d(pet, kernel, axis=axis, output=np.float32, mode="reflect")
        np.testing.assert_allclose(out, ref, rtol=2e-6)
        assert out.sum(dtype=np.float64) == pytest.approx(pet.sum(dtype=np.float64), rel=1e-6)


def test_slabs_shared_over_threads_give_the_same_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    pet = rng.gamma(2.0, 1000.0, size=(40, 24, 20)).astype(np.float32)
    monkeypatch.setattr(gaussian, "SLAB_VOXELS", 24 * 20 * 3)  # 14 slabs
    monkeypatch.setattr(gaussian.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(gaussian, "MAX_THREADS", 1)
    one = GaussianDenoiser(GaussianParams(fwhm_mm=8.0)).denoise(DenoiseInputs(pet, (2.0, 2.0, 2.0))).denoised
    monkeypatch.setattr(gaussian, "MAX_THREADS", 3)
    three = GaussianDenoiser(GaussianParams(fwhm_mm=8.0)).denoise(DenoiseInputs(pet, (2.0, 2.0, 2.0))).denoised
    np.testing.assert_array_equal(one, three)


def test_a_failing_slab_thread_fails_the_whole_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in one worker thread (here: out of memory in its third slab) is raised, not a partly filtered
    volume returned."""
    monkeypatch.setattr(gaussian, "SLAB_VOXELS", 8 * 8 * 2)
    monkeypatch.setattr(gaussian.os, "sched_getaffinity", lambda pid: {0, 1})
    real = gaussian.correlate_reflect
    calls = []

    def flaky(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 7:
            raise MemoryError("no room for the slab")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gaussian, "correlate_reflect", flaky)
    with pytest.raises(Exception, match="no room for the slab"):
        GaussianDenoiser(GaussianParams()).denoise(DenoiseInputs(np.ones((10, 8, 8), np.float32), (2.0, 2.0, 2.0)))
