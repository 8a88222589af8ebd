"""BC-DPM numerics: respacing, the reverse step, the conditional block, noise insertion, count level, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from denoisers import DenoiseInputs, registry
from denoisers.diffusion import (
    BCDPMParams,
    NoiseInserter,
    NoiseSchedule,
    _body_box,
    _slabs,
    activity_reference,
    cond_steps_for,
    conditional_block,
    estimate_counts,
    from_latent,
    gaussian_2d,
    reverse_step,
    spaced_timesteps,
    to_latent,
)


def _direct_alphas_cumprod(steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> list[float]:
    """The cumulative alphas by an explicit loop over the paper's definition (no numpy cumprod)."""
    out, prod = [], 1.0
    for t in range(steps):
        beta = start + (end - start) * t / (steps - 1)
        prod *= 1.0 - beta
        out.append(prod)
    return out


def test_linear_schedule_is_the_papers() -> None:
    s = NoiseSchedule.linear()
    assert s.steps == 1000 and s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(s.alphas_cumprod, _direct_alphas_cumprod(), rtol=1e-12)


def test_100_of_1000_steps_are_evenly_spaced_from_0_to_999() -> None:
    kept = spaced_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {10, 11}
    assert list(spaced_timesteps(1000, 5, start=300)) == [0, 75, 150, 225, 300]


def test_respaced_betas_are_recomputed_from_the_cumulative_alphas() -> None:
    direct = _direct_alphas_cumprod()
    kept = spaced_timesteps(1000, 100)
    chain = NoiseSchedule.linear().respace(kept)
    expected = [1.0 - direct[kept[0]]] + [1.0 - direct[b] / direct[a] for a, b in zip(kept[:-1], kept[1:])]
    np.testing.assert_allclose(chain.betas, expected, rtol=1e-10)
    # the respaced chain has the original marginals at the kept steps
    np.testing.assert_allclose(np.cumprod(1.0 - chain.betas), [direct[k] for k in kept], rtol=1e-10)
    # the mistake of a widely used scheduler (the original beta at the kept step, or abar of t - 1): far off
    naive = NoiseSchedule.linear().betas[kept]
    assert np.median(chain.betas[1:] / naive[1:]) > 5  # ~10x too little noise removed per step


def _ddpm_posterior(x: torch.Tensor, x0: torch.Tensor, ab: float, ab_prev: float) -> tuple[torch.Tensor, float]:
    """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 7) for a respaced step."""
    beta = 1.0 - ab / ab_prev
    mean = (beta * math.sqrt(ab_prev) / (1 - ab)) * x0 + ((1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)) * x
    return mean, beta * (1 - ab_prev) / (1 - ab)


@pytest.mark.parametrize("i", [1, 7, 42, 99])
def test_the_step_at_eta_1_is_the_ddpm_posterior(i: int) -> None:
    chain = NoiseSchedule.linear().respace(spaced_timesteps(1000, 100))
    gen = torch.Generator().manual_seed(i)
    x0 = torch.rand(2, 8, 8, generator=gen, dtype=torch.float64) * 2 - 0.5  # >= -1: no clamp
    eps = torch.randn(2, 8, 8, generator=gen, dtype=torch.float64)
    ab = float(chain.alphas_cumprod[i])
    x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    z = torch.randn(2, 8, 8, generator=gen, dtype=torch.float64)
    mean, var = _ddpm_posterior(x, x0, ab, float(chain.alphas_cumprod_prev[i]))
    no_noise, x0_hat = reverse_step(x, eps, i, chain, 1.0, None)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(no_noise, mean)
    with_noise, _ = reverse_step(x, eps, i, chain, 1.0, z)
    torch.testing.assert_close(with_noise - no_noise, math.sqrt(var) * z)
    assert chain.posterior_variance[i] == pytest.approx(var, rel=1e-12)
    # eta 0 (DDIM) is deterministic and differs
    ddim, _ = reverse_step(x, eps, i, chain, 0.0, z)
    torch.testing.assert_close(ddim, reverse_step(x, eps, i, chain, 0.0, None)[0])
    assert not torch.allclose(ddim, no_noise)


def test_the_x0_estimate_never_goes_below_zero_activity() -> None:
    chain = NoiseSchedule.linear().respace([0, 100, 200])
    x = torch.full((4, 4), -3.0)
    _, x0 = reverse_step(x, torch.zeros_like(x), 2, chain, 1.0, None)
    assert float(x0.min()) == -1.0


def test_the_conditional_block_is_equation_10_on_a_tiny_case() -> None:
    rng = np.random.default_rng(0)
    x_prime = rng.normal(size=(2, 9, 9))
    y_prev = rng.normal(size=(2, 9, 9))
    lam, fwhm = 0.2, 3.0
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    radius = math.ceil(3 * sigma)

    def gf_ref(a: np.ndarray) -> np.ndarray:  # the same filter written with scipy
        return ndimage.gaussian_filter(a, sigma=(0, sigma, sigma), mode="nearest", truncate=radius / sigma)

    def insert_ref(a: np.ndarray) -> np.ndarray:  # any fixed operator stands for P+(Po(P(.) + r + s)) here
        return 0.7 * a + 0.1 * np.roll(a, 1, axis=-1)

    expected = ((1 - lam) * (gf_ref(y_prev) + x_prime - gf_ref(x_prime))
                + lam * (y_prev + x_prime - insert_ref(x_prime)))
    got = conditional_block(torch.from_numpy(x_prime), torch.from_numpy(y_prev), lam,
                            lambda v: gaussian_2d(v, fwhm), lambda v: torch.from_numpy(insert_ref(v.numpy())))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    # lambda 0: restoration only; lambda 1: noise insertion only
    only_gf = conditional_block(torch.from_numpy(x_prime), torch.from_numpy(y_prev), 0.0,
                                lambda v: gaussian_2d(v, fwhm), lambda v: v * 0)
    np.testing.assert_allclose(only_gf.numpy(), gf_ref(y_prev) + x_prime - gf_ref(x_prime), atol=1e-10)


def test_gaussian_2d_keeps_the_mean_and_smooths_in_plane_only() -> None:
    x = torch.zeros(3, 21, 21)
    x[1, 10, 10] = 1.0
    out = gaussian_2d(x, 4.0)
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(out[0].abs().sum()) == 0.0 and float(out[2].abs().sum()) == 0.0  # no blur along z
    assert float(out[1, 10, 10]) < 0.2


def _disc(n: int = 48, batch: int = 6) -> torch.Tensor:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = np.where(xx**2 + yy**2 < (0.35 * n) ** 2, 1.0, 0.0) + np.where((xx - 5)**2 + yy**2 < 16, 2.0, 0.0)
    return torch.from_numpy(np.repeat(img[None], batch, axis=0).astype(np.float32))


def test_noise_insertion_keeps_the_activity_and_its_noise_falls_with_counts() -> None:
    u = _disc()
    inside = u > 0.5
    stds = []
    for counts in (2e4, 2e5):
        ins = NoiseInserter(48, 2.0, counts, iterations=4, subsets=4)
        first = ins(u, torch.Generator().manual_seed(1))
        second = ins(u, torch.Generator().manual_seed(2))
        assert float(first.sum()) == pytest.approx(float(u.sum()), rel=0.05)
        stds.append(float((first - second)[inside].std()) / math.sqrt(2))  # the noise alone
    assert 2.5 < stds[0] / stds[1] < 4.0  # ~ sqrt(10): Poisson


def test_the_count_level_is_estimated_from_the_image() -> None:
    from denoisers.cnn import noise_index

    u = _disc(batch=12) * 1000.0
    truth_counts = 1e5
    params = BCDPMParams(recon_iterations=2, recon_subsets=4)
    ins = NoiseInserter(48, 2.0, truth_counts, iterations=2, subsets=4)
    y = ins(u, torch.Generator().manual_seed(5))
    est = estimate_counts(y, 2.0, params, noise_index(y.numpy()), torch.Generator().manual_seed(9), "cpu")
    assert truth_counts / 1.6 < est < truth_counts * 1.6


def test_cond_steps_follow_the_papers_table() -> None:
    assert [cond_steps_for(c) for c in (1e6, 3e5, 1e5)] == [5, 10, 15]
    assert cond_steps_for(1e9) == 2 and cond_steps_for(10) == 30


def test_the_noise_index_maps_onto_the_papers_count_scale() -> None:
    from denoisers.diffusion import paper_counts_for_noise

    # the simulated brain's noise index at 1 M, 0.3 M and 0.1 M counts per slice (ML-EM 100, PSF, attenuation)
    assert paper_counts_for_noise(0.0774) == pytest.approx(1e6, rel=1e-3)
    assert paper_counts_for_noise(0.3034) == pytest.approx(1e5, rel=1e-3)
    assert 2.2e5 < paper_counts_for_noise(0.1733) < 3.5e5
    assert [cond_steps_for(paper_counts_for_noise(n)) for n in (0.0774, 0.1733, 0.3034)] == [5, 11, 15]


def test_latent_round_trip_and_reference() -> None:
    rng = np.random.default_rng(3)
    vol = np.zeros((8, 32, 32), np.float32)
    vol[:, 8:24, 8:24] = 5.0
    ref = activity_reference(vol)
    assert 0.7 * 5.0 < ref <= 5.0  # the body's mean, diluted by its one-voxel rim
    noisy = (vol * rng.gamma(4, 1 / 4, vol.shape)).astype(np.float32)  # 50 % noise
    assert activity_reference(noisy) == pytest.approx(ref, rel=0.1)  # a noisy and a clean image agree
    np.testing.assert_allclose(from_latent(to_latent(vol, ref), ref), vol, atol=1e-5)
    assert float(to_latent(np.float32(0), ref)) == -1.0


def test_slabs_give_each_slice_its_neighbours() -> None:
    x = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1, 1).expand(2, 4, 2, 2)
    s = _slabs(x, 3)
    assert s.shape == (8, 3, 2, 2)
    assert s[0, :, 0, 0].tolist() == [0, 0, 1] and s[2, :, 0, 0].tolist() == [1, 2, 3]
    assert s[7, :, 0, 0].tolist() == [6, 7, 7]


def test_the_body_box_is_a_multiple_and_holds_the_body() -> None:
    vol = np.zeros((3, 40, 50), np.float32)
    vol[:, 10:20, 5:33] = 1.0
    rows, cols, ph, pw = _body_box(vol, 8)
    assert ph % 8 == 0 and pw % 8 == 0 and ph >= rows.stop - rows.start and pw >= cols.stop - cols.start
    assert rows.start <= 10 and rows.stop >= 20 and cols.start <= 5 and cols.stop >= 33


def _phantom(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (16, 24, 24)), indexing="ij")
    body = y**2 + x**2 < 0.7
    hot = (y - 0.2) ** 2 + x**2 < 0.05
    act = np.where(hot, 4000.0, np.where(body, 1000.0, 0.0))
    return (act * rng.gamma(10, 0.1, act.shape)).astype(np.float32)


def test_sampling_is_deterministic_with_a_seed_and_keeps_total_activity() -> None:
    pet = _phantom(1)
    inputs = DenoiseInputs(pet=pet, spacing=(3.0, 3.0, 3.0))
    a = registry.create_example("bcdpm", seed=11).denoise(inputs)
    b = registry.create_example("bcdpm", seed=11).denoise(inputs)
    c = registry.create_example("bcdpm", seed=12).denoise(inputs)
    np.testing.assert_array_equal(a.denoised, b.denoised)
    np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
    assert not np.array_equal(a.denoised, c.denoised)
    assert float(a.denoised.sum(dtype=np.float64)) == pytest.approx(float(pet.sum(dtype=np.float64)), rel=1e-5)
    assert a.denoised.min() >= 0 and a.uncertainty.min() >= 0 and a.uncertainty.max() > 0
    for key in ("counts_per_slice", "counts_source", "cond_steps", "noise_index", "samples", "model", "seed"):
        assert key in a.info
    assert a.info["counts_source"] == "estimated" and a.info["seed"] == 11


def test_one_sample_has_no_spread_and_a_given_count_level_is_used() -> None:
    d = registry.get_class("bcdpm")(BCDPMParams(samples=1, steps=2, counts_per_slice=3e5),
                                     seed=1, model=registry.create_example("bcdpm").model)
    out = d.denoise(DenoiseInputs(pet=_phantom(2), spacing=(3.0, 3.0, 3.0)))
    assert float(out.uncertainty.max()) == 0.0
    assert out.info["counts_source"] == "rule" and out.info["counts_per_slice"] == 3e5
    assert out.info["level_steps"] == 10 and out.info["start_t"] == 400 and out.info["conditioned_transitions"] == 2


def test_params_are_checked() -> None:
    with pytest.raises(Exception, match="white noise"):
        registry.validate_params("bcdpm", {"mode": "paper", "start_t": 300})
    with pytest.raises(Exception, match="samples"):
        registry.validate_params("bcdpm", {"samples": 0})
    paper = registry.validate_params("bcdpm", {"mode": "paper"})
    assert paper.resolved(10) == {"start_t": 999, "steps": 100, "eta": 1.0, "cond_steps": 10, "lam": 0.2,
                                  "gf_fwhm_px": 3.0}
    practical = registry.validate_params("bcdpm", {})
    # the count level sets where sampling starts, the GF width, and every transition is conditioned
    assert practical.resolved(10) == {"start_t": 400, "steps": 10, "eta": 0.0, "cond_steps": 41, "lam": 0.05,
                                      "gf_fwhm_px": 6.5}
    assert practical.resolved(15)["start_t"] == 600 and practical.resolved(5)["start_t"] == 200


def test_a_series_without_activity_is_refused() -> None:
    from denoisers.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="no activity"):
        registry.create_example("bcdpm").denoise(DenoiseInputs(pet=np.zeros((4, 16, 16), np.float32),
                                                               spacing=(2.0, 2.0, 2.0)))


def test_without_a_model_the_message_says_how_to_name_one() -> None:
    from denoisers.errors import DenoiserError

    d = registry.create("bcdpm", {})
    with pytest.raises(DenoiserError, match="model: NAME"):
        d.denoise(DenoiseInputs(pet=_phantom(3), spacing=(3.0, 3.0, 3.0)))


def test_the_shipped_model_keeps_regional_means_and_total_activity() -> None:
    """The shipped fdg-bcdpm on a small noisy phantom it never saw: the total activity exactly, each large
    region's mean within a few percent of the series' (quantitation), less noise than the series."""
    from pathlib import Path

    from denoisers.models import ModelStore

    shipped = Path(__file__).resolve().parents[2] / "models"
    store = ModelStore(Path(__import__("tempfile").mkdtemp(prefix="petnode-bcdpm-test-")))
    store.register_shipped(shipped)
    model = store.resolve("fdg-bcdpm")
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (12, 48, 48)), indexing="ij")
    body = y**2 + x**2 < 0.7
    hot = (y - 0.25) ** 2 + x**2 < 0.1
    act = ndimage.gaussian_filter(np.where(hot, 4000.0, np.where(body, 1000.0, 0.0)), (0, 1.5, 1.5))  # a PSF
    pet = (act * rng.gamma(8, 1 / 8, act.shape)).astype(np.float32)
    den = registry.create("bcdpm", {"samples": 3, "steps": 8}, model=model, seed=2)
    result = den.denoise(DenoiseInputs(pet=pet, spacing=(4.0, 4.0, 4.0)))
    out = result.denoised
    assert float(out.sum(dtype=np.float64)) == pytest.approx(float(pet.sum(dtype=np.float64)), rel=1e-5)
    inner_hot = ndimage.binary_erosion(hot, iterations=3)
    inner_body = ndimage.binary_erosion(body, iterations=3) & ~ndimage.binary_dilation(hot, iterations=3)
    for region in (inner_hot, inner_body):
        # measured: the 15-voxel hot disc -3.4 %, the body -0.2 % (the prior restores less contrast than GF
        # takes from a small hot region: the GF width is kept moderate for this, see the module docstring)
        assert float(out[region].mean()) == pytest.approx(float(pet[region].mean()), rel=0.05)
        assert float(out[region].std()) < 0.8 * float(pet[region].std())
    assert result.info["model"] == "fdg-bcdpm@1.0.0" and result.uncertainty[body].mean() > 0
