"""NLMDenoiser: agreement with plain-loop references of both normalisations, slabs, activity conservation at low
counts, the noise-based h, quality against the Gaussian default, params, devices and the speed bench."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from denoisers import devices, metrics, physics, registry
from denoisers.base import DenoiseInputs, DeviceNeed, InputKind
from denoisers.errors import DenoiserError, DenoiserUnavailableError
from denoisers.gaussian import GaussianDenoiser, GaussianParams
from denoisers.nlm import (
    CPU_WEIGHT_CACHE_BYTES,
    NLMDenoiser,
    NLMParams,
    _FlatGeometry,
    _SymmetricFilter,
    default_chunk_slices,
    estimate_image_std,
    estimate_noise_sigma,
    gaussian_guide,
    mm_to_odd_vox,
    nonlocal_means,
    patch_kernel_1d,
    peak_memory_bytes,
    resolve_device,
    weight_cache_bytes,
)

Triple = tuple[int, int, int]


def reference_row(
    vol: npt.NDArray[np.float32], h: float, patch: Triple, search: Triple, gaussian: bool
) -> npt.NDArray[np.float64]:
    """The row normalisation of the module docstring, voxel by voxel and offset by offset, in float64 (slow: tiny
    volumes)."""
    v = vol.astype(np.float64)
    pr = [p // 2 for p in patch]
    sr = [s // 2 for s in search]
    pad = [a + b for a, b in zip(pr, sr)]
    padded = np.pad(v, [(r, r) for r in pad], mode="reflect")
    kernels = []
    for p, r in zip(patch, pr):
        if gaussian and p > 1:
            sigma = (p - 1) / 4.0
            k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma))
        else:
            k = np.ones(p)
        kernels.append(k / k.sum())
    g = kernels[0][:, None, None] * kernels[1][None, :, None] * kernels[2][None, None, :]

    def patch_at(c: list[int]) -> npt.NDArray[np.float64]:
        return padded[c[0] - pr[0] : c[0] + pr[0] + 1, c[1] - pr[1] : c[1] + pr[1] + 1, c[2] - pr[2] : c[2] + pr[2] + 1]

    out = np.empty_like(v)
    for i in np.ndindex(*v.shape):
        centre = [a + b for a, b in zip(i, pad)]
        own = patch_at(centre)
        num = den = 0.0
        for d in itertools.product(*(range(-s, s + 1) for s in sr)):
            j = [a + b for a, b in zip(centre, d)]
            w = math.exp(-float((g * (own - patch_at(j)) ** 2).sum()) / (h * h))
            num += w * padded[j[0], j[1], j[2]]
            den += w
        out[i] = num / den
    return out


def reference_symmetric(
    vol: npt.NDArray[np.float32],
    h: float,
    patch: Triple,
    search: Triple,
    gaussian: bool,
    row_sums: list[npt.NDArray[np.float64]] | None = None,
) -> npt.NDArray[np.float64]:
    """The symmetric normalisation of the module docstring with a dense float64 weight matrix (tiny volumes);
    appends the balanced off-diagonal row sums ``r`` to ``row_sums`` when given."""
    v = vol.astype(np.float64)
    pr = [p // 2 for p in patch]
    sr = [s // 2 for s in search]
    pad = [a + b for a, b in zip(pr, sr)]
    padded = np.pad(v, [(r, r) for r in pad], mode="reflect")
    ks = [patch_kernel_1d(p, gaussian) for p in patch]
    g = ks[0][:, None, None] * ks[1][None, :, None] * ks[2][None, None, :]
    voxels = list(np.ndindex(*v.shape))
    index = {voxel: k for k, voxel in enumerate(voxels)}

    def patch_at(c: list[int]) -> npt.NDArray[np.float64]:
        return padded[c[0] - pr[0] : c[0] + pr[0] + 1, c[1] - pr[1] : c[1] + pr[1] + 1, c[2] - pr[2] : c[2] + pr[2] + 1]

    w = np.zeros((len(voxels), len(voxels)))  # off-diagonal weights between voxels of the volume
    for k, i in enumerate(voxels):
        own = patch_at([a + b for a, b in zip(i, pad)])
        for d in itertools.product(*(range(-s, s + 1) for s in sr)):
            j = tuple(a + b for a, b in zip(i, d))
            if any(d) and j in index:
                other = patch_at([a + b for a, b in zip(j, pad)])
                w[k, index[j]] = math.exp(-float((g * (own - other) ** 2).sum()) / (h * h))
    a = (1.0 + w.sum(axis=1)) ** -0.5
    c = np.sqrt(a / (a + w @ a))
    rows = c * (w @ c)
    if row_sums is not None:
        row_sums.append(rows)
    limited = c / np.maximum(rows, 1.0)  # c' = c / max(r, 1): every row of diag(c') w diag(c') sums to <= 1
    b = limited[:, None] * w * limited[None, :]
    assert (b.sum(axis=1) <= 1.0 + 1e-12).all()
    x = v.ravel()
    return (x + b @ x - b.sum(axis=1) * x).reshape(v.shape)


REFERENCES = {"row": reference_row, "symmetric": reference_symmetric}


def small_volume(shape: Triple = (6, 7, 8), seed: int = 0) -> npt.NDArray[np.float32]:
    """Noise on a step, so that the weights span (0, 1] instead of all being ~1 or ~0."""
    rng = np.random.default_rng(seed)
    vol = rng.random(shape) * 60.0
    vol[:, :, shape[2] // 2 :] += 100.0
    return vol.astype(np.float32)


def phantom(
    shape: Triple = (24, 48, 48), seed: int = 0, counts: float = 50.0
) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[Any]]]:
    """A uniform cylinder (1000 Bq/ml) with a hot sphere in a warm background (10 Bq/ml), Poisson noise of
    ``counts`` expected counts per cylinder voxel (50: about 14 % noise)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    radius = np.hypot(y, x)
    sphere = z**2 + (y - 8) ** 2 + (x - 8) ** 2
    activity = np.where(radius < 20, 1000.0, 10.0)
    activity[sphere < 16] = 4000.0
    calibration = 1000.0 / counts  # Bq/ml per count
    pet = (rng.poisson(activity / calibration) * calibration).astype(np.float32)
    # Far from the sphere and the cylinder's edge by more than the search + patch radius.
    uniform = (radius < 12) & (np.abs(z) < 6) & (sphere >= 64)
    return pet, {"uniform": uniform}


def run(pet: npt.NDArray[np.float32], spacing: tuple[float, float, float] = (3.27, 4.0, 4.0), **params: Any) -> Any:
    return NLMDenoiser(NLMParams(**params)).denoise(DenoiseInputs(pet, spacing))


# --- the definition --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalisation", ["symmetric", "row"])
@pytest.mark.parametrize(
    ("patch", "search", "gaussian"),
    [
        ((3, 3, 3), (5, 5, 5), False),  # the default (Gong 2018 windows, uniform patch as scikit-image's fast mode)
        ((3, 3, 3), (5, 5, 5), True),
        ((5, 5, 5), (3, 3, 3), True),
        ((1, 3, 5), (3, 5, 3), True),  # anisotropic windows
        ((3, 1, 3), (7, 3, 1), False),  # a search wider than the volume's padding on z: repeated reflection
        ((1, 1, 1), (3, 3, 3), True),  # single-voxel patches
    ],
)
def test_matches_reference_loops(patch: Triple, search: Triple, gaussian: bool, normalisation: str) -> None:
    vol = small_volume()
    expected = REFERENCES[normalisation](vol, 40.0, patch, search, gaussian)
    got = nonlocal_means(vol, 40.0, patch, search, gaussian_patch_weighting=gaussian, normalisation=normalisation)
    assert got.dtype == np.float32 and got.shape == vol.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))
    # Guard: the filter did something, so agreement is not trivial.
    assert np.abs(expected - vol).max() > 5.0


def test_symmetric_reference_exercises_the_limiter_and_conserves() -> None:
    # The default case above is one where one balancing step overshoots (some row sum > 1), so the limiter is
    # part of what the reference comparison checks; and the reference itself conserves the total exactly.
    vol = small_volume()
    rows: list[npt.NDArray[np.float64]] = []
    expected = reference_symmetric(vol, 40.0, (3, 3, 3), (5, 5, 5), False, rows)
    assert rows[0].max() > 1.05 and rows[0].min() < 1.0
    assert expected.sum() == pytest.approx(float(vol.sum(dtype=np.float64)), rel=1e-12)
    assert not np.allclose(expected, reference_row(vol, 40.0, (3, 3, 3), (5, 5, 5), False), rtol=1e-3)


def test_anisotropic_mm_windows_match_reference() -> None:
    vol = small_volume((6, 8, 7), seed=3)
    spacing = (4.0, 2.0, 3.0)
    result = run(vol, spacing, patch_mm=6.0, search_mm=8.0, h=35.0)
    patch, search = (1, 3, 3), (3, 5, 3)  # 6 mm: 1.5, 3, 2 voxels; 8 mm: 2, 4, 2.67 voxels -> nearest odd
    assert result.info["patch_vox"] == list(patch) and result.info["search_vox"] == list(search)
    expected = reference_symmetric(vol, 35.0, patch, search, False)
    np.testing.assert_allclose(result.denoised, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))


@pytest.mark.parametrize("normalisation", ["symmetric", "row"])
def test_thin_volume_and_one_slice(normalisation: str) -> None:
    for shape in ((1, 9, 10), (2, 5, 6)):
        vol = small_volume(shape, seed=1)
        expected = REFERENCES[normalisation](vol, 50.0, (3, 3, 3), (5, 5, 5), True)
        got = nonlocal_means(
            vol, 50.0, (3, 3, 3), (5, 5, 5), gaussian_patch_weighting=True, normalisation=normalisation
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))


@pytest.mark.parametrize("normalisation", ["symmetric", "row"])
def test_slabs_give_the_same_result(normalisation: str) -> None:
    vol = small_volume((11, 13, 17), seed=2)
    whole = nonlocal_means(vol, 30.0, (3, 1, 3), (5, 3, 5), normalisation=normalisation, chunk_slices=11)
    for slices in (1, 2, 5, None):
        got = nonlocal_means(vol, 30.0, (3, 1, 3), (5, 3, 5), normalisation=normalisation, chunk_slices=slices)
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6 * float(whole.max()))
    via_params = run(vol, h=30.0, chunk_voxels=1, normalisation=normalisation)  # below one slice: one per slab
    assert via_params.info["chunk_slices"] == 1
    np.testing.assert_allclose(
        via_params.denoised, run(vol, h=30.0, normalisation=normalisation).denoised, rtol=1e-5, atol=1e-6 * 200
    )


def test_tiny_and_huge_h_limits() -> None:
    vol = small_volume((10, 11, 12))
    for normalisation in ("symmetric", "row"):
        # h -> 0: only identical patches count, so each voxel keeps its value (no NaN from 0 * inf).
        same = nonlocal_means(vol, 1e-30, (3, 3, 3), (3, 3, 3), normalisation=normalisation)
        np.testing.assert_allclose(same, vol, rtol=1e-6)
    # h -> inf: all weights 1. Row: a 3 x 3 x 3 mean with reflection everywhere.
    padded = np.pad(vol.astype(np.float64), 1, mode="reflect")
    box = sum(padded[a : a + 10, b : b + 11, c : c + 12] for a, b, c in itertools.product(range(3), repeat=3)) / 27
    np.testing.assert_allclose(nonlocal_means(vol, 1e12, (3, 3, 3), (3, 3, 3), normalisation="row"), box, rtol=1e-5)
    # Symmetric: the same mean four voxels or more from the edges (where every row is balanced to 26/27 off the
    # diagonal); nearer the edges neighbours outside are not used, and the total is kept.
    flat = nonlocal_means(vol, 1e12, (3, 3, 3), (3, 3, 3))
    np.testing.assert_allclose(flat[4:-4, 4:-4, 4:-4], box[4:-4, 4:-4, 4:-4], rtol=1e-5)
    assert flat.sum(dtype=np.float64) == pytest.approx(float(vol.sum(dtype=np.float64)), rel=1e-6)


# --- activity and quality on PET-like data ----------------------------------------------------------------------


@pytest.mark.parametrize("counts", [50.0, 10.0, 3.0, 1.0])
def test_activity_preserved_at_low_counts(counts: float, capsys: pytest.CaptureFixture[str]) -> None:
    # Raw Poisson counts: at 1-3 counts per voxel in the cylinder and 0.01-0.2 in the background, the image is
    # mostly isolated hot spikes, the case where the row-normalised filter loses activity.
    pet, regions = phantom(counts=counts)
    uniform = regions["uniform"]
    result = run(pet)
    out = result.denoised
    total_ratio = float(out.sum(dtype=np.float64) / pet.sum(dtype=np.float64))
    mean_ratio = float(out[uniform].mean() / pet[uniform].mean())
    noise_ratio = float(out[uniform].std() / pet[uniform].std())
    row = run(pet, normalisation="row", h=result.info["h"]).denoised
    row_ratio = float(row.sum(dtype=np.float64) / pet.sum(dtype=np.float64))
    with capsys.disabled():
        print(
            f"\nnlm {counts:g} counts/voxel: total activity x{total_ratio:.6f} (row normalisation x{row_ratio:.4f}),"
            f" uniform-region mean x{mean_ratio:.4f}, noise std x{noise_ratio:.3f}"
        )
    assert abs(total_ratio - 1.0) < 1e-4  # conserved by construction: float32 rounding only
    assert abs(mean_ratio - 1.0) < 0.01  # no regional bias in a uniform region away from edges
    assert noise_ratio < 0.5
    if counts <= 10.0:
        assert abs(row_ratio - 1.0) > 0.005  # guard: the case is one where the classical filter drifts


def test_non_negative_input_gives_non_negative_output() -> None:
    rng = np.random.default_rng(1)
    pet = np.where(rng.random((10, 16, 16)) < 0.03, 1e5, 0.0).astype(np.float32)
    for normalisation in ("symmetric", "row"):
        out = run(pet, h=3e4, normalisation=normalisation).denoised
        assert out.min() >= 0.0
        assert out.max() > 0.0 and not np.array_equal(out, pet)


def test_constant_image_is_returned_unchanged() -> None:
    pet = np.full((5, 6, 7), 1234.5, np.float32)
    for mode in ("std", "noise"):
        result = run(pet, h_mode=mode)
        assert np.isfinite(result.info["h"]) and result.info["h"] > 0
        np.testing.assert_allclose(result.denoised, pet, rtol=1e-6)
    np.testing.assert_array_equal(run(np.zeros((4, 5, 6), np.float32)).denoised, 0.0)


def brain_slab(shape: Triple = (8, 48, 48)) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A brain-like slab (Bq/ml-like units): white matter 1, cortex and two deep nuclei 4, a ventricle 0.2; and its
    mu-map (water, 1/mm)."""
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    head = (y / 0.85) ** 2 + (x / 0.7) ** 2 + (z / 1.6) ** 2
    activity = np.where(head < 1.0, 1.0, 0.0)
    activity[(head >= 0.72) & (head < 1.0)] = 4.0
    for cy, cx in ((0.05, -0.22), (0.05, 0.22)):
        activity[((y - cy) / 0.14) ** 2 + ((x - cx) / 0.09) ** 2 + (z / 1.2) ** 2 < 1.0] = 4.0
    activity[((y + 0.2) / 0.18) ** 2 + (x / 0.06) ** 2 < 1.0] = 0.2
    mu = np.where(head < 1.0, 0.0096, 0.0)
    return activity.astype(np.float32), mu.astype(np.float32)


COUNTS_PER_SLICE = (1e6, 3e5, 1e5)  # BC-DPM's levels (Shen et al. 2023)


@pytest.fixture(scope="module")
def low_count_scans() -> tuple[npt.NDArray[np.float32], dict[float, npt.NDArray[np.float32]]]:
    """The brain slab and its ML-EM reconstructions (3 mm voxels, 4 mm PSF, 30 % randoms, 100 iterations) at
    1 M, 0.3 M and 0.1 M expected prompts per slice, one seeded realization each."""
    truth, mu = brain_slab()
    n = truth.shape[1]
    proj = physics.ParallelProjector(n, 3.0, math.ceil(math.sqrt(2) * n), math.ceil(1.5 * n))
    system = physics.SystemModel(proj, mu, psf_fwhm_mm=4.0)
    scans = {}
    for counts in COUNTS_PER_SLICE:
        sino = physics.simulate_counts(truth, system, counts, 0.3, generator=0, counts_per="slice")
        recon = physics.mlem(sino.prompts, system, sino.additive, n_iter=100)
        scans[counts] = sino.to_activity(recon).numpy().astype(np.float32)
    return truth, scans


def test_activity_preserved_on_simulated_low_count_scans(
    low_count_scans: tuple[npt.NDArray[np.float32], dict[float, npt.NDArray[np.float32]]],
) -> None:
    _, scans = low_count_scans
    for counts, pet in scans.items():
        total = pet.sum(dtype=np.float64)
        ratio = float(run(pet).denoised.sum(dtype=np.float64) / total)
        assert abs(ratio - 1.0) < 0.01, (counts, ratio)
        assert abs(ratio - 1.0) < 1e-4, (counts, ratio)  # in fact exact up to float32 rounding
    # Guard: the old default (image std, Gaussian patch, row normalisation) lost more than 1 % at 0.3 M and 0.1 M.
    old = NLMParams(h_mode="std", h_factor=1.0, gaussian_patch_weighting=True, normalisation="row")
    for counts in (3e5, 1e5):
        out = NLMDenoiser(old).denoise(DenoiseInputs(scans[counts], (3.0, 3.0, 3.0))).denoised
        assert out.sum(dtype=np.float64) / scans[counts].sum(dtype=np.float64) < 0.99


def test_default_not_worse_than_the_default_gaussian(
    low_count_scans: tuple[npt.NDArray[np.float32], dict[float, npt.NDArray[np.float32]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 0.3 M counts per slice: NLM's default h from the noise against the Gaussian default (4 mm, config/rules.yaml).
    truth, scans = low_count_scans
    pet, body, spacing = scans[3e5], truth > 0, (3.0, 3.0, 3.0)
    nlm = metrics.nrmse(run(pet, spacing).denoised, truth, body)
    gauss = metrics.nrmse(GaussianDenoiser(GaussianParams()).denoise(DenoiseInputs(pet, spacing)).denoised, truth, body)
    old_params = NLMParams(h_mode="std", h_factor=1.0, gaussian_patch_weighting=True, normalisation="row")
    old = metrics.nrmse(NLMDenoiser(old_params).denoise(DenoiseInputs(pet, spacing)).denoised, truth, body)
    with capsys.disabled():
        print(f"\n0.3 M counts/slice NRMSE: nlm default {nlm:.4f}, gaussian 4 mm {gauss:.4f}, old default {old:.4f}")
    assert nlm <= gauss
    assert old > gauss  # guard: the case separates the old default from the new one


# --- h --------------------------------------------------------------------------------------------------------


def test_h_from_noise_std_or_given() -> None:
    pet, _ = phantom()
    info = run(pet).info
    # The default: 1.25 x the noise estimate, patches compared on a 4 mm-smoothed copy. Poisson: sigma =
    # sqrt(1000 / 20) * 20 = 141 Bq/ml in the cylinder.
    assert info["h_source"] == "noise" and info["h_factor"] == 1.25 and info["guide_fwhm_mm"] == 4.0
    assert info["h"] == pytest.approx(1.25 * estimate_noise_sigma(pet), rel=1e-6)
    assert info["h"] == pytest.approx(1.25 * 141.4, rel=0.1)
    # Without the pre-smoothing the default factor is the raw-patch calibration, 2.
    info = run(pet, guide_fwhm_mm=0.0).info
    assert info["h_factor"] == 2.0 and info["guide_fwhm_mm"] == 0.0
    assert run(pet, h_factor=0.5).info["h"] == pytest.approx(0.5 * estimate_noise_sigma(pet), rel=1e-6)
    inside = pet > 0.01 * pet.max()
    std = float(pet[inside].std(dtype=np.float64))
    assert estimate_image_std(pet) == pytest.approx(std, rel=1e-6)
    info = run(pet, h_mode="std").info
    assert info["h_source"] == "std" and info["h_factor"] == 1.0 and info["h"] == pytest.approx(std, rel=1e-6)
    info = run(pet, h=123.0).info
    assert info["h"] == 123.0 and info["h_source"] == "given"


def test_default_h_follows_the_noise_level() -> None:
    # The same smooth image with white noise of 10, 20 and 40: the default h doubles with the noise (h = 1.25 sigma).
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (16, 40, 40)), indexing="ij")
    body = y**2 + x**2 < 0.8
    smooth = np.where(body, 1000.0 + 300.0 * np.sin(3 * x) * np.cos(2 * y), 0.0)
    unit_noise = rng.normal(0.0, 1.0, body.shape)
    hs = []
    for sigma in (10.0, 20.0, 40.0):
        pet = np.where(body, smooth + sigma * unit_noise, 0.0).astype(np.float32)
        hs.append(run(pet).info["h"])
        assert hs[-1] == pytest.approx(1.25 * sigma, rel=0.1)
    assert hs[0] < hs[1] < hs[2]


def test_default_h_grows_as_counts_fall(
    low_count_scans: tuple[npt.NDArray[np.float32], dict[float, npt.NDArray[np.float32]]],
) -> None:
    _, scans = low_count_scans
    hs = [run(scans[counts]).info["h"] for counts in COUNTS_PER_SLICE]
    assert hs[0] < hs[1] < hs[2]
    assert hs[2] / hs[0] > 2.0  # 10 x fewer counts: noise up by about sqrt(10) in activity units


def test_noise_estimate_ignores_smooth_activity_and_air() -> None:
    rng = np.random.default_rng(4)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (20, 40, 40)), indexing="ij")
    body = y**2 + x**2 < 0.8
    smooth = 2000.0 + 800.0 * np.sin(3 * x) * np.cos(2 * y) + 300.0 * z
    pet = np.where(body, smooth + rng.normal(0.0, 50.0, body.shape), 0.0).astype(np.float32)
    assert estimate_noise_sigma(pet) == pytest.approx(50.0, rel=0.05)
    assert estimate_noise_sigma(pet[:1]) == pytest.approx(50.0, rel=0.1)  # one slice: the 2-D band


# --- windows, params, spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size_mm", "spacing", "expected"),
    [
        (12.0, (3.27, 4.0, 2.0), (3, 3, 7)),
        (1.0, (4.0, 4.0, 4.0), (1, 1, 1)),  # below one voxel
        (6.0, (1.0, 1.5, 2.5), (7, 5, 3)),  # 6 voxels: a tie between 5 and 7 goes up
        (20.0, (2.0, 2.0, 5.0), (11, 11, 5)),  # 10 voxels -> 11; 4 voxels -> 5
    ],
)
def test_mm_to_odd_vox(size_mm: float, spacing: tuple[float, float, float], expected: Triple) -> None:
    assert mm_to_odd_vox(size_mm, spacing) == expected


def test_windows_from_vox_or_mm() -> None:
    assert NLMDenoiser(NLMParams()).windows((3.0, 4.0, 4.0)) == ((3, 3, 3), (5, 5, 5))
    den = NLMDenoiser(NLMParams(patch_mm=8.0, search_vox=7))
    assert den.windows((2.0, 4.0, 8.0)) == ((5, 3, 1), (7, 7, 7))


def test_spec_requires_spacing_only_for_mm_windows_or_guide() -> None:
    spec = NLMDenoiser(NLMParams()).spec
    assert spec.requires == {InputKind.PET, InputKind.SPACING}  # the default 4 mm pre-smoothed comparison image
    assert NLMDenoiser(NLMParams(guide_fwhm_mm=0.0)).spec.requires == {InputKind.PET}
    assert NLMDenoiser(NLMParams(h=10.0)).spec.requires == {InputKind.PET}
    assert NLMDenoiser(NLMParams(h_mode="std")).spec.requires == {InputKind.PET}
    assert not spec.stochastic and not spec.needs_weights
    assert InputKind.SPACING in NLMDenoiser(NLMParams(search_mm=20.0)).spec.requires
    vol = small_volume()
    a = run(vol, (2.0, 2.0, 2.0), search_mm=10.0, h=40.0)
    b = run(vol, (4.0, 4.0, 4.0), search_mm=10.0, h=40.0)
    assert a.info["search_vox"] == [5, 5, 5] and b.info["search_vox"] == [3, 3, 3]
    assert not np.array_equal(a.denoised, b.denoised)


def test_gpu_preferred_for_the_node_and_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    # The node picks the lane from the class attribute (dicom_node.node.lane_for); the spec must say the same.
    cls = registry.get_class("nlm")
    assert cls.device_need is DeviceNeed.GPU_PREFERRED
    assert NLMDenoiser(NLMParams(patch_mm=6.0)).spec.device is cls.device_need
    # So a route configured for CUDA gets a GPU lane where there is one, and the CPU where "auto" finds none.
    monkeypatch.setattr(devices, "cuda_count", lambda: 1)
    assert devices.resolve_device("cuda", cls.device_need) == "cuda:0"
    assert devices.resolve_device("cuda", registry.get_class("gaussian").device_need) == "cpu"
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    assert devices.resolve_device("auto", cls.device_need) == "cpu"


def test_info_names_what_was_done() -> None:
    info = run(small_volume(), h=40.0).info
    assert info["patch_vox"] == [3, 3, 3] and info["search_vox"] == [5, 5, 5]
    assert info["device"] == "cpu" and info["gaussian_patch_weighting"] is False
    assert info["normalisation"] == "symmetric"
    assert info["seconds"] > 0 and info["chunk_slices"] >= 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"patch_vox": 4}, "patch_vox must be odd"),
        ({"search_vox": 0}, "greater than or equal to 1"),
        ({"patch_vox": True}, "valid integer"),
        ({"search_vox": 5.0}, "valid integer"),
        ({"patch_vox": 3, "patch_mm": 6.0}, "patch_vox or patch_mm, not both"),
        ({"search_vox": 5, "search_mm": 12.0}, "search_vox or search_mm, not both"),
        ({"patch_mm": -1.0}, "greater than 0"),
        ({"h": 0.0}, "greater than 0"),
        ({"h": 10.0, "h_factor": 2.0}, "h is absolute"),
        ({"h": 10.0, "h_mode": "noise"}, "h is absolute"),
        ({"h_mode": "mad"}, "'noise' or 'std'"),
        ({"h_factor": float("inf")}, "finite"),
        ({"normalisation": "column"}, "'symmetric' or 'row'"),
        ({"chunk_voxels": 0}, "greater than or equal to 1"),
        ({"patch_size": 3}, "did you mean 'patch_mm'"),
        ({"search_voxels": 5}, "did you mean 'search_vox'"),
    ],
)
def test_bad_params_rejected(params: dict[str, Any], message: str) -> None:
    with pytest.raises(DenoiserError, match=message):
        registry.validate_params("nlm", params)


def test_good_params_accepted() -> None:
    params = registry.validate_params("nlm", {"patch_mm": 8, "search_mm": 16.0, "h_factor": 0.8, "h_mode": "std"})
    assert isinstance(params, NLMParams) and params.patch_mm == 8.0 and params.uses_mm
    assert params.effective_h_factor == 0.8
    defaults = registry.validate_params("nlm", {})
    assert isinstance(defaults, NLMParams) and defaults.h_factor is None and defaults.effective_h_factor == 1.25
    assert defaults.effective_guide_fwhm_mm == 4.0 and NLMParams(guide_fwhm_mm=0.0).effective_h_factor == 2.0
    assert NLMParams(h_mode="std").effective_h_factor == 1.0
    assert defaults.normalisation == "symmetric" and defaults.gaussian_patch_weighting is False
    assert registry.validate_params("nlm", {"h": 1500}).h == 1500.0
    assert registry.available()["nlm"] is None


def test_validating_params_does_not_import_torch() -> None:
    # Loading a rules file validates every rule's params; that must not cost a torch import.
    code = (
        "import sys\n"
        "from denoisers import registry\n"
        "registry.validate_params('nlm', {'patch_mm': 8.0})\n"
        "print('torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_peak_memory_formula_is_small() -> None:
    # 200 x 192 x 192 float32 is 29.5 MB. Row: the padded copy, the output and one slab of scratch, about 2.2x that;
    # symmetric: the padded volume, three padded per-voxel vectors, the output and the slab scratch, about 5.4x, plus
    # the weights cached between the passes (at most CPU_WEIGHT_CACHE_BYTES; 168 MB at the default 9-slice slabs).
    shape, volume = (200, 192, 192), 200 * 192 * 192 * 4
    assert peak_memory_bytes(shape, (3, 3, 3), (5, 5, 5), 7, "row") < 2.5 * volume
    assert peak_memory_bytes(shape, (3, 3, 3), (5, 5, 5), 7, cache_bytes=0) < 6.0 * volume
    chunk = default_chunk_slices(shape)
    cache = weight_cache_bytes(shape, (3, 3, 3), (5, 5, 5), chunk, None)
    assert chunk == 9 and 0 < cache <= CPU_WEIGHT_CACHE_BYTES
    assert peak_memory_bytes(shape, (3, 3, 3), (5, 5, 5), chunk) == (
        peak_memory_bytes(shape, (3, 3, 3), (5, 5, 5), chunk, cache_bytes=0) - 4 * 9 * 194 * 194 + cache
    )
    # Planes too large for the bound: the weights are recomputed, and the memory is that of no cache.
    big = (100, 400, 400)
    assert weight_cache_bytes(big, (3, 3, 3), (5, 5, 5), default_chunk_slices(big), None) == 0


def allocated_bytes(sym: _SymmetricFilter) -> int:
    """Bytes of the distinct tensor storages a symmetric filter holds."""
    tensors = [sym.v, sym.g, *sym.acc, sym.sq, sym.spare, *sym.tmp, sym.field, sym.cache]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("guide", [True, False])
def test_peak_memory_is_what_the_symmetric_filter_allocates(cached: bool, guide: bool) -> None:
    import torch

    shape, patch, search, chunk = (23, 17, 19), (3, 1, 5), (5, 3, 3), 4
    vol = small_volume(shape)
    geometry = _FlatGeometry(shape, patch, search, chunk)
    kernels = tuple(patch_kernel_1d(p, False) for p in patch)
    sym = _SymmetricFilter(torch, geometry, vol, vol + 1 if guide else None, kernels, 40.0, torch.device("cpu"), cached)
    budget = None if cached else 0
    output = 4 * vol.size
    expected = peak_memory_bytes(shape, patch, search, chunk, guide=guide, cache_bytes=budget)
    assert allocated_bytes(sym) + output == expected
    assert (sym.cache is not None) == cached


def test_cached_and_recomputed_weights_agree_and_the_ring_wraps() -> None:
    # 14 slices in slabs of 1-3: the weight cache's ring (slab + 3 lags of 3 slices, a multiple of the slab) is
    # shorter than the volume, so slices are overwritten while the passes trail each other, and passes 1-3 split
    # where the ring wraps. Cached, recomputed and the dense reference agree; each is deterministic.
    vol = small_volume((14, 6, 7), seed=5)
    expected = reference_symmetric(vol, 40.0, (3, 3, 3), (5, 5, 5), False)
    for chunk in (1, 2, 3, 14):
        geometry = _FlatGeometry(vol.shape, (3, 3, 3), (5, 5, 5), chunk)
        assert geometry.lag == 3 and (geometry.ring < vol.shape[0]) == (chunk < 14)
        cached = nonlocal_means(vol, 40.0, chunk_slices=chunk)
        again = nonlocal_means(vol, 40.0, chunk_slices=chunk)
        recomputed = nonlocal_means(vol, 40.0, chunk_slices=chunk, cache_bytes=0)
        np.testing.assert_array_equal(cached, again)
        np.testing.assert_allclose(recomputed, cached, rtol=1e-6, atol=1e-6 * float(cached.max()))
        np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))
        assert cached.sum(dtype=np.float64) == pytest.approx(float(vol.sum(dtype=np.float64)), rel=1e-6)


def test_weight_cache_bound_falls_back_to_recomputing() -> None:
    vol = small_volume((12, 10, 11), seed=6)
    shape, patch, search = vol.shape, (3, 3, 3), (5, 5, 5)
    need = _FlatGeometry(shape, patch, search, 3).cache_bytes()
    assert weight_cache_bytes(shape, patch, search, 3, need) == need
    assert weight_cache_bytes(shape, patch, search, 3, need - 1) == 0  # one byte short: recompute
    assert peak_memory_bytes(shape, patch, search, 3, cache_bytes=need - 1) < peak_memory_bytes(
        shape, patch, search, 3, cache_bytes=need
    )
    cached = run(vol, h=40.0, chunk_voxels=3 * 10 * 11)
    recomputed = run(vol, h=40.0, chunk_voxels=3 * 10 * 11, weight_cache_mb=0.0)
    assert cached.info["weight_cache_mb"] == round(need / (1 << 20), 1) and recomputed.info["weight_cache_mb"] == 0
    np.testing.assert_allclose(recomputed.denoised, cached.denoised, rtol=1e-6, atol=1e-6 * float(vol.max()))
    assert not np.allclose(cached.denoised, vol)  # guard: the filter did something
    assert run(vol, h=40.0, normalisation="row").info["weight_cache_mb"] == 0  # the row filter needs one pass


@pytest.mark.parametrize("shape", [(1, 9, 10), (2, 5, 6), (3, 3, 3), (9, 16, 12)])
@pytest.mark.parametrize("spacing", [(3.27, 4.0, 4.0), (1.0, 1.0, 1.0), (4.0, 2.0, 8.0)])
def test_torch_guide_matches_scipy(shape: Triple, spacing: tuple[float, float, float]) -> None:
    # The comparison image is scipy's gaussian_filter (mode "reflect", truncate 4), computed in float32 torch.
    from scipy import ndimage

    vol = small_volume(shape, seed=7)
    sigma = [4.0 / (2.0 * math.sqrt(2.0 * math.log(2.0))) / s for s in spacing]
    expected = ndimage.gaussian_filter(vol, sigma, mode="reflect")
    got = gaussian_guide(vol, 4.0, spacing, chunk_slices=4)
    assert got.dtype == np.float32 and got.shape == vol.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))
    assert np.abs(expected - vol).max() > 1.0  # guard: it smoothed


# --- devices --------------------------------------------------------------------------------------------------


def test_device_resolution() -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DenoiserUnavailableError, match="invalid device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(DenoiserUnavailableError, match="CUDA is not available"):
            NLMDenoiser(NLMParams(), device="cuda").denoise(DenoiseInputs(small_volume(), (2.0, 2.0, 2.0)))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    pet, _ = phantom()
    inputs = DenoiseInputs(pet, (3.27, 4.0, 4.0))
    for normalisation in ("symmetric", "row"):
        params = NLMParams(patch_mm=8.0, search_mm=16.0, normalisation=normalisation)
        cpu = NLMDenoiser(params).denoise(inputs).denoised
        for device in ("cuda", "auto"):
            first = NLMDenoiser(params, device=device).denoise(inputs)
            assert first.info["device"].startswith("cuda")
            np.testing.assert_allclose(first.denoised, cpu, rtol=1e-5, atol=1e-5 * float(cpu.max()))
            again = NLMDenoiser(params, device=device).denoise(inputs).denoised
            np.testing.assert_array_equal(first.denoised, again)  # deterministic on the GPU too
        # Slabs on the GPU as well.
        slab_params = NLMParams(patch_mm=8.0, search_mm=16.0, chunk_voxels=1, normalisation=normalisation)
        slabs = NLMDenoiser(slab_params, device="cuda").denoise(inputs)
        np.testing.assert_allclose(slabs.denoised, cpu, rtol=1e-5, atol=1e-5 * float(cpu.max()))
        total = float(pet.sum(dtype=np.float64))
        if normalisation == "symmetric":
            assert float(slabs.denoised.sum(dtype=np.float64)) == pytest.approx(total, rel=1e-5)


# --- the speed benchmark (smoke: tiny volume) -----------------------------------------------------------------


def test_bench_nlm_smoke() -> None:
    pytest.importorskip("skimage")
    import torch
    from skimage.restoration import denoise_nl_means

    from training.bench_speed import bench_nlm, bench_volume, format_nlm_table

    threads = torch.get_num_threads()
    shape = (6, 16, 16)
    result = bench_nlm(shape=shape, repeats=2, threads=2)
    assert torch.get_num_threads() == threads  # restored
    # Every row says how many threads it used: ours on the requested 2 (one for _1t), scikit-image on one.
    assert result["threads"] == 2 and result["skimage_threads"] == 1
    expected_threads = {
        "ours_gaussian": 2, "ours_uniform": 2, "ours_uniform_1t": 1, "ours_symmetric": 2, "node_nlm": 2,
        "node_nlm_1t": 1, "skimage": 1,
    }
    for label, n in expected_threads.items():
        assert result[f"{label}_threads"] == n
        assert result[f"{label}_s"] > 0 and len(result[f"{label}_times_s"]) == 2
        assert result[f"{label}_per_slice_ms"] == pytest.approx(1000 * result[f"{label}_s"] / 6)
        if label != "skimage":
            assert result[f"speedup_{label}"] == pytest.approx(result["skimage_s"] / result[f"{label}_s"])
    # The reported difference is the one between the same row filter and scikit-image, recomputed here.
    vol = bench_volume(shape)
    ours = nonlocal_means(vol, result["h"], normalisation="row")
    ref = denoise_nl_means(vol, patch_size=3, patch_distance=2, h=result["h"], fast_mode=True, channel_axis=None,
                           preserve_range=True)
    assert result["max_abs_diff_vs_skimage"] == pytest.approx(float(np.abs(ours - ref).max()), rel=1e-5)
    assert result["max_abs_change_ours_uniform"] == pytest.approx(float(np.abs(ours - vol).max()), rel=1e-5)
    assert result["max_abs_diff_vs_skimage"] > 0  # two implementations (its box differs), not one compared to itself
    table = format_nlm_table(result)
    assert "ours_uniform_1t" in table and "skimage" in table and "threads" in table and "one thread each" in table
    # The node rows run NLMDenoiser with its defaults (its own h from the noise, the 4 mm comparison image).
    node = NLMDenoiser(NLMParams()).denoise(DenoiseInputs(vol, (2.0, 2.0, 2.0)))
    assert result["node_info"]["h"] == pytest.approx(node.info["h"]) and result["node_info"]["guide_fwhm_mm"] == 4.0
    assert "the node's NLM" in table and "node_nlm_1t" in table


def test_bench_nlm_on_a_given_volume_and_main(capsys: pytest.CaptureFixture[str]) -> None:
    from training.bench_speed import bench_nlm, main

    vol = small_volume((5, 12, 14), seed=8)
    result = bench_nlm(repeats=1, threads=1, include_skimage=False, volume=vol, spacing=(3.0, 4.0, 4.0))
    assert result["shape"] == [5, 12, 14] and result["source"] == "volume" and result["spacing"] == [3.0, 4.0, 4.0]
    assert result["node_nlm_s"] > 0 and "speedup_node_nlm" not in result and "skimage_s" not in result
    assert main(["--shape", "4,10,12", "--repeats", "1", "--threads", "1", "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "4x10x12 (phantom)" in out and "node_nlm" in out and "skimage" not in out.split("\n", 1)[1]


def test_guide_changes_weights_not_mass_and_smoothed_guide_helps_correlated_noise() -> None:
    # Correlated noise (white noise blurred over ~1.5 voxels, as ML-EM at 2 mm) on a piecewise-constant volume: raw
    # patches at the default h barely tell noise from structure, 4 mm-smoothed ones do. Activity stays exact.
    rng = np.random.default_rng(3)
    truth = np.full((24, 40, 40), 100.0, np.float32)
    truth[:, 10:30, 10:20] = 300.0
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, truth.shape), 0.7)
    pet = (truth + 40.0 * noise / noise.std()).astype(np.float32)
    body = np.ones(truth.shape, bool)
    guided = run(pet, (2.0, 2.0, 2.0))
    raw = run(pet, (2.0, 2.0, 2.0), guide_fwhm_mm=0.0)
    assert guided.info["guide_fwhm_mm"] == 4.0
    total = pet.sum(dtype=np.float64)
    assert abs(guided.denoised.sum(dtype=np.float64) / total - 1.0) < 1e-4
    assert metrics.nrmse(guided.denoised, truth, body) < 0.85 * metrics.nrmse(raw.denoised, truth, body)  # 0.78
    # The guide only enters the weights: a guide equal to the image gives the plain filter, bit for bit.
    assert np.array_equal(nonlocal_means(pet, 50.0, guide=pet), nonlocal_means(pet, 50.0))
