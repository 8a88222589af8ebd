"""NLMDenoiser: agreement with a plain-loop reference of the same definition, slabs, activity, noise, params."""

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

from denoisers import registry
from denoisers.base import DenoiseInputs, DeviceNeed, InputKind
from denoisers.errors import DenoiserError, DenoiserUnavailableError
from denoisers.nlm import (
    NLMDenoiser,
    NLMParams,
    estimate_image_std,
    estimate_noise_sigma,
    mm_to_odd_vox,
    nonlocal_means,
    peak_memory_bytes,
    resolve_device,
)

Triple = tuple[int, int, int]


def reference_nlm(
    vol: npt.NDArray[np.float32], h: float, patch: Triple, search: Triple, gaussian: bool
) -> npt.NDArray[np.float64]:
    """The module docstring's definition, voxel by voxel and offset by offset, in float64 (slow: tiny volumes)."""
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


def small_volume(shape: Triple = (6, 7, 8), seed: int = 0) -> npt.NDArray[np.float32]:
    """Noise on a step, so that the weights span (0, 1] instead of all being ~1 or ~0."""
    rng = np.random.default_rng(seed)
    vol = rng.random(shape) * 60.0
    vol[:, :, shape[2] // 2 :] += 100.0
    return vol.astype(np.float32)


def phantom(shape: Triple = (24, 48, 48), seed: int = 0) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[Any]]]:
    """A uniform cylinder (1000 Bq/ml) with a hot sphere, Poisson noise of about 14 % in the cylinder."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    radius = np.hypot(y, x)
    sphere = z**2 + (y - 8) ** 2 + (x - 8) ** 2
    activity = np.where(radius < 20, 1000.0, 10.0)
    activity[sphere < 16] = 4000.0
    pet = (rng.poisson(activity / 20.0) * 20.0).astype(np.float32)
    # Far from the sphere and the cylinder's edge by more than the search + patch radius.
    uniform = (radius < 12) & (np.abs(z) < 6) & (sphere >= 64)
    return pet, {"uniform": uniform}


def run(pet: npt.NDArray[np.float32], spacing: tuple[float, float, float] = (3.27, 4.0, 4.0), **params: Any) -> Any:
    return NLMDenoiser(NLMParams(**params)).denoise(DenoiseInputs(pet, spacing))


# --- the definition --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "search", "gaussian"),
    [
        ((3, 3, 3), (5, 5, 5), True),  # the Gong 2018 configuration
        ((3, 3, 3), (5, 5, 5), False),  # scikit-image's fast-mode weighting
        ((5, 5, 5), (3, 3, 3), True),
        ((1, 3, 5), (3, 5, 3), True),  # anisotropic windows
        ((3, 1, 3), (7, 3, 1), False),  # a search wider than the volume's padding on z: repeated reflection
        ((1, 1, 1), (3, 3, 3), True),  # single-voxel patches
    ],
)
def test_matches_reference_loops(patch: Triple, search: Triple, gaussian: bool) -> None:
    vol = small_volume()
    expected = reference_nlm(vol, 40.0, patch, search, gaussian)
    got = nonlocal_means(vol, 40.0, patch, search, gaussian_patch_weighting=gaussian)
    assert got.dtype == np.float32 and got.shape == vol.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))
    # Guard: the filter did something, so agreement is not trivial.
    assert np.abs(expected - vol).max() > 5.0


def test_anisotropic_mm_windows_match_reference() -> None:
    vol = small_volume((6, 8, 7), seed=3)
    spacing = (4.0, 2.0, 3.0)
    result = run(vol, spacing, patch_mm=6.0, search_mm=8.0, h=35.0)
    patch, search = (1, 3, 3), (3, 5, 3)  # 6 mm: 1.5, 3, 2 voxels; 8 mm: 2, 4, 2.67 voxels -> nearest odd
    assert result.info["patch_vox"] == list(patch) and result.info["search_vox"] == list(search)
    expected = reference_nlm(vol, 35.0, patch, search, True)
    np.testing.assert_allclose(result.denoised, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))


def test_thin_volume_and_one_slice() -> None:
    for shape in ((1, 9, 10), (2, 5, 6)):
        vol = small_volume(shape, seed=1)
        expected = reference_nlm(vol, 50.0, (3, 3, 3), (5, 5, 5), True)
        got = nonlocal_means(vol, 50.0, (3, 3, 3), (5, 5, 5))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))


def test_slabs_give_the_same_result() -> None:
    vol = small_volume((11, 13, 17), seed=2)
    whole = nonlocal_means(vol, 30.0, (3, 1, 3), (5, 3, 5), chunk_slices=11)
    for slices in (1, 2, 5, None):
        got = nonlocal_means(vol, 30.0, (3, 1, 3), (5, 3, 5), chunk_slices=slices)
        np.testing.assert_allclose(got, whole, rtol=1e-6, atol=0)
    via_params = run(vol, h=30.0, chunk_voxels=1)  # below one slice: one slice per slab
    assert via_params.info["chunk_slices"] == 1
    np.testing.assert_allclose(via_params.denoised, run(vol, h=30.0).denoised, rtol=1e-6, atol=0)


def test_tiny_and_huge_h_limits() -> None:
    vol = small_volume()
    # h -> 0: only identical patches count, so each voxel keeps its value (no NaN from 0 * inf).
    np.testing.assert_allclose(nonlocal_means(vol, 1e-30, (3, 3, 3), (3, 3, 3)), vol, rtol=1e-6)
    # h -> inf: all weights 1, a 3 x 3 x 3 mean with reflection.
    padded = np.pad(vol.astype(np.float64), 1, mode="reflect")
    box = sum(padded[a : a + 6, b : b + 7, c : c + 8] for a, b, c in itertools.product(range(3), repeat=3)) / 27
    np.testing.assert_allclose(nonlocal_means(vol, 1e12, (3, 3, 3), (3, 3, 3)), box, rtol=1e-5)


# --- behaviour on PET-like data ---------------------------------------------------------------------------------


def test_activity_preserved_and_noise_reduced_on_a_phantom(capsys: pytest.CaptureFixture[str]) -> None:
    pet, regions = phantom()
    uniform = regions["uniform"]
    for weighting in (True, False):
        out = run(pet, gaussian_patch_weighting=weighting).denoised
        mean_ratio = float(out[uniform].mean() / pet[uniform].mean())
        total_ratio = float(out.sum(dtype=np.float64) / pet.sum(dtype=np.float64))
        noise_ratio = float(out[uniform].std() / pet[uniform].std())
        with capsys.disabled():
            print(
                f"\nnlm gaussian={weighting}: uniform-region mean x{mean_ratio:.5f}, total activity x{total_ratio:.5f},"
                f" noise std x{noise_ratio:.3f}"
            )
        assert abs(mean_ratio - 1.0) < 0.005
        assert abs(total_ratio - 1.0) < 0.01  # NLM is not mass-preserving by construction; measured ~0.1 %
        assert noise_ratio < 0.5


def test_non_negative_input_gives_non_negative_output() -> None:
    rng = np.random.default_rng(1)
    pet = np.where(rng.random((10, 16, 16)) < 0.03, 1e5, 0.0).astype(np.float32)
    out = run(pet, h_factor=3.0).denoised
    assert out.min() >= 0.0
    assert out.max() > 0.0


def test_constant_image_is_returned_unchanged() -> None:
    pet = np.full((5, 6, 7), 1234.5, np.float32)
    for mode in ("std", "noise"):
        result = run(pet, h_mode=mode)
        assert np.isfinite(result.info["h"]) and result.info["h"] > 0
        np.testing.assert_allclose(result.denoised, pet, rtol=1e-6)
    np.testing.assert_array_equal(run(np.zeros((4, 5, 6), np.float32)).denoised, 0.0)


# --- h --------------------------------------------------------------------------------------------------------


def test_h_from_image_std_noise_or_given() -> None:
    pet, _ = phantom()
    inside = pet > 0.01 * pet.max()
    std = float(pet[inside].std(dtype=np.float64))
    assert estimate_image_std(pet) == pytest.approx(std, rel=1e-6)
    info = run(pet).info
    assert info["h_source"] == "std" and info["h"] == pytest.approx(std, rel=1e-6)
    assert run(pet, h_factor=0.5).info["h"] == pytest.approx(0.5 * std, rel=1e-6)
    info = run(pet, h=123.0).info
    assert info["h"] == 123.0 and info["h_source"] == "given"
    noise = run(pet, h_mode="noise").info
    assert noise["h_source"] == "noise"
    # Poisson: sigma = sqrt(1000 / 20) * 20 = 141 Bq/ml in the cylinder, most of the body.
    assert noise["h"] == pytest.approx(141.4, rel=0.1)


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


def test_spec_requires_spacing_only_for_mm_windows() -> None:
    spec = NLMDenoiser(NLMParams()).spec
    assert spec.requires == {InputKind.PET}
    assert spec.device is DeviceNeed.GPU_PREFERRED and not spec.stochastic and not spec.needs_weights
    assert InputKind.SPACING in NLMDenoiser(NLMParams(search_mm=20.0)).spec.requires
    vol = small_volume()
    a = run(vol, (2.0, 2.0, 2.0), search_mm=10.0, h=40.0)
    b = run(vol, (4.0, 4.0, 4.0), search_mm=10.0, h=40.0)
    assert a.info["search_vox"] == [5, 5, 5] and b.info["search_vox"] == [3, 3, 3]
    assert not np.array_equal(a.denoised, b.denoised)


def test_info_names_what_was_done() -> None:
    info = run(small_volume(), h=40.0).info
    assert info["patch_vox"] == [3, 3, 3] and info["search_vox"] == [5, 5, 5]
    assert info["device"] == "cpu" and info["gaussian_patch_weighting"] is True
    assert info["seconds"] >= 0 and info["chunk_slices"] >= 1


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
        ({"h_mode": "mad"}, "'std' or 'noise'"),
        ({"h_factor": float("inf")}, "finite"),
        ({"chunk_voxels": 0}, "greater than or equal to 1"),
        ({"patch_size": 3}, "did you mean 'patch_mm'"),
        ({"search_voxels": 5}, "did you mean 'search_vox'"),
    ],
)
def test_bad_params_rejected(params: dict[str, Any], message: str) -> None:
    with pytest.raises(DenoiserError, match=message):
        registry.validate_params("nlm", params)


def test_good_params_accepted() -> None:
    params = registry.validate_params("nlm", {"patch_mm": 8, "search_mm": 16.0, "h_factor": 0.8, "h_mode": "noise"})
    assert isinstance(params, NLMParams) and params.patch_mm == 8.0 and params.uses_mm
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
    # 200 x 192 x 192 float32 is 29.5 MB; the padded copy, the output and one slab of scratch stay near 2.3x that.
    volume = 200 * 192 * 192 * 4
    assert peak_memory_bytes((200, 192, 192), (3, 3, 3), (5, 5, 5), 7) < 2.5 * volume


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
    params = NLMParams(patch_mm=8.0, search_mm=16.0)
    cpu = NLMDenoiser(params).denoise(inputs).denoised
    for device in ("cuda", "auto"):
        first = NLMDenoiser(params, device=device).denoise(inputs)
        assert first.info["device"].startswith("cuda")
        np.testing.assert_allclose(first.denoised, cpu, rtol=1e-5, atol=1e-5 * float(cpu.max()))
        again = NLMDenoiser(params, device=device).denoise(inputs).denoised
        np.testing.assert_array_equal(first.denoised, again)  # deterministic on the GPU too
    # Slabs on the GPU as well.
    slabs = NLMDenoiser(NLMParams(patch_mm=8.0, search_mm=16.0, chunk_voxels=1), device="cuda").denoise(inputs)
    np.testing.assert_allclose(slabs.denoised, cpu, rtol=1e-5, atol=1e-5 * float(cpu.max()))


# --- the speed benchmark (smoke: tiny volume) -----------------------------------------------------------------


def test_bench_nlm_smoke() -> None:
    pytest.importorskip("skimage")
    import torch

    from training.bench_speed import bench_nlm, format_nlm_table

    threads = torch.get_num_threads()
    result = bench_nlm(shape=(6, 16, 16), repeats=2, threads=1)
    assert torch.get_num_threads() == threads  # restored
    for label in ("ours_gaussian", "ours_uniform", "skimage"):
        assert result[f"{label}_s"] > 0 and len(result[f"{label}_times_s"]) == 2
        assert result[f"{label}_per_slice_ms"] == pytest.approx(1000 * result[f"{label}_s"] / 6)
    assert result["speedup_uniform"] > 0 and result["max_abs_diff_vs_skimage"] >= 0
    table = format_nlm_table(result)
    assert "ours_uniform" in table and "skimage" in table
