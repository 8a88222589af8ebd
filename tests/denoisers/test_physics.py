"""PET physics: matched projector pair, attenuation and PSF, count simulation, thinning, MLEM and OSEM."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy import ndimage, stats

from denoisers.errors import InvalidInputError
from denoisers.gaussian import FWHM_PER_SIGMA
from denoisers.physics import (
    Iterates,
    ParallelProjector,
    SystemModel,
    mlem,
    osem,
    poisson_nll,
    simulate_counts,
    thin,
)

N, PIX, N_RADIAL, N_ANGLES = 32, 4.0, 48, 40

def _grid(n: int = N) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row and column offsets from the image centre, in pixels."""
    yy, xx = np.mgrid[:n, :n].astype(float)
    return yy - (n - 1) / 2, xx - (n - 1) / 2


def _phantom() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """An elliptical body (1) with an off-centre hot disk (+5) at row 9, column 20; and the two masks."""
    yy, xx = np.mgrid[:N, :N].astype(float)
    body = (yy - 15.5) ** 2 / 14**2 + (xx - 15.5) ** 2 / 12**2 < 1
    hot = (yy - 9) ** 2 + (xx - 20) ** 2 <= 2.5**2
    return body * 1.0 + hot * 5.0, body, hot


@pytest.fixture(scope="module")
def proj64() -> ParallelProjector:
    return ParallelProjector(N, PIX, N_RADIAL, N_ANGLES, dtype=torch.float64)


@pytest.fixture(scope="module")
def proj32() -> ParallelProjector:
    return ParallelProjector(N, PIX, N_RADIAL, N_ANGLES)


def _adjoint_error(op: ParallelProjector | SystemModel, batch: int, dtype: torch.dtype, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    proj = op if isinstance(op, ParallelProjector) else op.projector
    x = torch.rand((batch, *proj.image_shape), generator=gen, dtype=dtype).to(proj.device)
    y = torch.rand((batch, *proj.sino_shape), generator=gen, dtype=dtype).to(proj.device)
    lhs = torch.sum(op.forward(x).double() * y.double())
    rhs = torch.sum(x.double() * op.adjoint(y).double())
    return float(abs(lhs - rhs) / abs(lhs))


# ---------------------------------------------------------------------------------------------------- adjoint


@pytest.mark.parametrize("batch", [1, 3])
def test_projector_adjoint_float64(proj64: ParallelProjector, batch: int) -> None:
    assert _adjoint_error(proj64, batch, torch.float64) < 1e-13


def test_projector_adjoint_float32(proj32: ParallelProjector) -> None:
    assert _adjoint_error(proj32, 2, torch.float32) < 1e-5


@pytest.mark.parametrize(
    ("with_mu", "psf"), [(True, None), (False, 6.0), (True, 6.0), (True, 2.0)], ids=["mu", "psf", "mu+psf", "psf<px"]
)
def test_system_adjoint(proj64: ParallelProjector, with_mu: bool, psf: float | None) -> None:
    body = _phantom()[1]
    mu = np.stack([body * 0.0096, body * 0.015, body * 0.0]) if with_mu else None  # per-slice maps
    system = SystemModel(proj64, mu=mu, psf_fwhm_mm=psf)
    assert _adjoint_error(system, 3, torch.float64) < 1e-13


def test_adjoint_of_subsets_and_irregular_geometry() -> None:
    proj = ParallelProjector(17, 2.5, 29, 23, radial_mm=1.7, dtype=torch.float64)  # odd sizes, bins != pixels
    assert _adjoint_error(proj, 2, torch.float64) < 1e-13
    sub = proj.subset([0, 5, 11, 22])
    assert sub.sino_shape == (4, 29)
    assert _adjoint_error(sub, 2, torch.float64) < 1e-13
    x = torch.rand(2, 17, 17, dtype=torch.float64)
    torch.testing.assert_close(sub.forward(x), proj.forward(x)[:, [0, 5, 11, 22], :])
    assert proj.subset([0, 5, 11, 22]) is sub  # cached


def test_autograd_gradient_is_the_adjoint(proj64: ParallelProjector) -> None:
    system = SystemModel(proj64, mu=_phantom()[1] * 0.0096, psf_fwhm_mm=5.0)
    x = torch.rand(2, N, N, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, N_ANGLES, N_RADIAL, dtype=torch.float64)
    (system.forward(x) * y).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, system.adjoint(y))


def test_unbatched_and_numpy_inputs(proj32: ParallelProjector) -> None:
    x = np.random.default_rng(0).random((N, N))
    y = proj32.forward(x)
    assert y.shape == (N_ANGLES, N_RADIAL) and y.dtype == torch.float32
    torch.testing.assert_close(y, proj32.forward(torch.as_tensor(x)[None])[0])
    assert proj32.adjoint(y).shape == (N, N)
    with pytest.raises(InvalidInputError, match="shape"):
        proj32.forward(np.zeros((2, N, N + 1)))


# ---------------------------------------------------------------------------------------------------- geometry


def test_projections_are_line_integrals_in_mm() -> None:
    # A uniform disk of radius 50 mm: the projection is the chord 2 sqrt(r^2 - s^2) at every angle.
    n, pix, radius = 64, 2.0, 50.0
    proj = ParallelProjector(n, pix, 80, 36, dtype=torch.float64)
    yy, xx = _grid(n)
    disk = (np.hypot(yy, xx) * pix < radius).astype(float)
    sino = proj.forward(disk).numpy()
    s = (np.arange(80) - 39.5) * pix
    inner = np.abs(s) < 0.8 * radius
    chord = 2 * np.sqrt(radius**2 - s[inner] ** 2)
    # pixelised edge: a few per cent on single bins, tighter on the mean over angles
    assert np.max(np.abs(sino[:, inner] - chord) / chord) < 0.04
    assert np.max(np.abs(sino[:, inner].mean(axis=0) - chord) / chord) < 0.01
    # sum_r p(r) * dr = integral of the image: exact at 0 and 90 degrees, within 0.1 % in between (Joseph's
    # interpolation footprints sampled at the bin spacing)
    np.testing.assert_allclose(sino.sum(axis=1) * pix, disk.sum() * pix * pix, rtol=2e-3)
    np.testing.assert_allclose(sino[[0, 18]].sum(axis=1) * pix, disk.sum() * pix * pix, rtol=1e-12)


def test_attenuation_factors_of_a_uniform_disk() -> None:
    n, pix, radius, mu = 64, 2.0, 50.0, 0.0096
    proj = ParallelProjector(n, pix, 80, 36, dtype=torch.float64)
    yy, xx = _grid(n)
    disk = (np.hypot(yy, xx) * pix < radius).astype(float)
    system = SystemModel(proj, mu=disk * mu)
    assert system.attenuation is not None
    central = system.attenuation[0, :, 39:41].numpy()  # rays through the centre, every angle
    np.testing.assert_allclose(central, math.exp(-mu * 2 * radius), rtol=0.02)
    # emission through the attenuated system is the unattenuated projection times the factors
    x = torch.rand(1, n, n, dtype=torch.float64)
    torch.testing.assert_close(system.forward(x), proj.forward(x) * system.attenuation)


def test_orientation_of_the_sinogram(proj64: ParallelProjector) -> None:
    # angle 0 integrates along the columns' direction: a point at column j shows up at radial offset u_j
    img = np.zeros((N, N))
    img[5, 27] = 1.0  # u = (27 - 15.5) * 4 = 46 mm, v = (5 - 15.5) * 4 = -42 mm
    sino = proj64.forward(img).numpy()
    s = (np.arange(N_RADIAL) - (N_RADIAL - 1) / 2) * PIX
    for k in (0, N_ANGLES // 2):  # phi = 0 and pi / 2
        phi = k * math.pi / N_ANGLES
        expected = 46 * math.cos(phi) - 42 * math.sin(phi)
        centre = float(np.sum(s * sino[k]) / np.sum(sino[k]))
        assert centre == pytest.approx(expected, abs=0.1)


def test_psf_has_the_asked_fwhm_and_keeps_interior_activity(proj64: ParallelProjector) -> None:
    fwhm = 9.0
    system = SystemModel(proj64, psf_fwhm_mm=fwhm)
    point = np.zeros((N, N))
    point[16, 13] = 1.0
    blurred = system.blur(point).numpy()
    assert blurred.sum() == pytest.approx(1.0, rel=1e-9)
    assert blurred.min() >= 0
    cols = np.arange(N) - 13
    sigma_mm = math.sqrt(np.sum(blurred.sum(axis=0) * cols**2)) * PIX
    assert sigma_mm * FWHM_PER_SIGMA == pytest.approx(fwhm, rel=1e-3)  # kernel cut at 4 sigma


def test_sensitivity_is_the_back_projection_of_ones(proj64: ParallelProjector) -> None:
    system = SystemModel(proj64, mu=_phantom()[1] * 0.0096, psf_fwhm_mm=4.0)
    sens = system.sensitivity()
    assert sens.shape == (1, N, N)
    torch.testing.assert_close(sens, system.adjoint(torch.ones(1, N_ANGLES, N_RADIAL, dtype=torch.float64)))
    assert float(sens.min()) > 0  # 48 bins of 4 mm cover the 32 x 32 image's diagonal (181 mm < 192 mm)


def test_bad_inputs_are_refused(proj32: ParallelProjector) -> None:
    with pytest.raises(InvalidInputError):
        ParallelProjector(0, 1.0, 10, 10)
    with pytest.raises(InvalidInputError):
        ParallelProjector(8, -1.0, 10, 10)
    with pytest.raises(InvalidInputError, match="mu"):
        SystemModel(proj32, mu=-np.ones((N, N)))
    system = SystemModel(proj32, mu=np.zeros((2, N, N)))
    with pytest.raises(InvalidInputError, match="slices"):
        system.forward(np.zeros((3, N, N)))
    with pytest.raises(InvalidInputError, match="activity"):
        simulate_counts(-np.ones((N, N)), system, 1e3)
    with pytest.raises(InvalidInputError, match="total_counts"):
        simulate_counts(np.ones((N, N)), SystemModel(proj32), 0)
    with pytest.raises(InvalidInputError, match="fraction"):
        thin(torch.ones(3), 1.5)
    with pytest.raises(InvalidInputError, match="integers"):
        thin(torch.tensor([0.5]), 0.5)
    with pytest.raises(InvalidInputError, match="n_subsets"):
        osem(torch.ones(N_ANGLES, N_RADIAL), SystemModel(proj32), n_subsets=N_ANGLES + 1)
    with pytest.raises(InvalidInputError, match="prompts"):
        mlem(-torch.ones(N_ANGLES, N_RADIAL), SystemModel(proj32))


# ---------------------------------------------------------------------------------------------------- counts


def test_total_counts_honoured_per_volume_and_per_slice(proj32: ParallelProjector) -> None:
    act, body, _ = _phantom()
    volume = np.stack([act, 0.5 * act, 2.0 * act])
    system = SystemModel(proj32, mu=body * 0.0096, psf_fwhm_mm=5.0)
    target = 2e5
    totals = []
    for seed in range(5):
        sino = simulate_counts(volume, system, target, 0.2, 0.3, generator=seed)
        assert float(sino.expected.sum()) == pytest.approx(target, rel=1e-5)
        totals.append(float(sino.prompts.sum()))
        # components in the asked proportions, per slice
        trues = sino.trues.sum(dim=(1, 2))
        torch.testing.assert_close(sino.randoms.sum(dim=(1, 2)), 0.2 * trues)
        torch.testing.assert_close(sino.scatter.sum(dim=(1, 2)), 0.3 * trues)
        assert torch.equal(sino.prompts, torch.round(sino.prompts)) and float(sino.prompts.min()) >= 0
    # Poisson total: mean within 4 standard errors (sqrt(N / 5)), spread of the right size
    assert abs(np.mean(totals) - target) < 4 * math.sqrt(target / 5)
    assert 0.2 * math.sqrt(target) < np.std(totals, ddof=1) < 2.5 * math.sqrt(target)
    # hotter slices get more counts with counts_per="volume"
    per_slice = sino.expected.sum(dim=(1, 2))
    assert float(per_slice[2]) == pytest.approx(4 * float(per_slice[1]), rel=1e-5)

    sino = simulate_counts(volume, system, 1e5, 0.2, generator=0, counts_per="slice")
    torch.testing.assert_close(sino.expected.sum(dim=(1, 2)), torch.full((3,), 1e5), rtol=1e-5, atol=0)
    assert np.all(np.abs(sino.prompts.sum(dim=(1, 2)).numpy() - 1e5) < 5 * math.sqrt(1e5))


def test_simulation_is_seeded_and_scale_maps_back_to_activity(proj32: ParallelProjector) -> None:
    act, body, _ = _phantom()
    system = SystemModel(proj32, mu=body * 0.0096)
    a = simulate_counts(act, system, 1e5, 0.2, 0.1, generator=7)
    b = simulate_counts(act, system, 1e5, 0.2, 0.1, generator=torch.Generator().manual_seed(7))
    c = simulate_counts(act, system, 1e5, 0.2, 0.1, generator=8)
    assert torch.equal(a.prompts, b.prompts) and not torch.equal(a.prompts, c.prompts)
    torch.testing.assert_close(a.trues, a.scale * system.forward(act))
    # the scale makes the activity of the truth come back from its expected trues
    torch.testing.assert_close(a.to_activity(a.scale * torch.as_tensor(act, dtype=torch.float32)),
                               torch.as_tensor(act, dtype=torch.float32))
    # scatter is smooth and wider than the trues; randoms uniform
    assert bool((a.randoms == a.randoms[0, 0]).all())
    assert float(a.scatter[:, :5].sum()) > float(a.trues[:, :5].sum())  # tails outside the body


def test_thinning_statistics() -> None:
    lam, p, n = 20.0, 0.1, 200_000
    gen = torch.Generator().manual_seed(3)
    full = torch.poisson(torch.full((n,), lam, dtype=torch.float64), generator=gen)
    low = thin(full, p, generator=gen)
    assert bool((low <= full).all())
    mean, var = float(low.mean()), float(low.var())
    se = math.sqrt(p * lam / n)
    assert abs(mean - p * lam) < 5 * se
    assert abs(var / mean - 1) < 0.02  # dispersion index of a Poisson variable
    # the whole distribution is Poisson(p * lam): chi-square goodness of fit on the bins 0..7 and a tail bin
    k = np.arange(8)
    observed = np.array([(low == i).sum().item() for i in k] + [(low >= 8).sum().item()])
    probs = np.append(stats.poisson.pmf(k, p * lam), stats.poisson.sf(7, p * lam))
    assert stats.chisquare(observed, probs * n).pvalue > 1e-3
    # and it is not the same as scaling the counts (which would keep a variance of p^2 lambda)
    assert float((full * p).var()) < 0.5 * var


def test_dose_fractions_from_one_acquisition(proj32: ParallelProjector) -> None:
    act, body, _ = _phantom()
    sino = simulate_counts(act, SystemModel(proj32, mu=body * 0.0096), 1e6, 0.2, generator=0)
    for fraction in (0.5, 0.2, 0.1, 1 / 200):
        low = sino.thin(fraction, generator=1)
        assert bool((low.prompts <= sino.prompts).all())
        torch.testing.assert_close(low.expected, sino.expected * fraction)
        torch.testing.assert_close(low.scale, sino.scale * fraction)
        expected_total = 1e6 * fraction
        assert abs(float(low.prompts.sum()) - expected_total) < 5 * math.sqrt(expected_total)


# ---------------------------------------------------------------------------------------------------- MLEM / OSEM


def test_mlem_decreases_the_poisson_nll_monotonically(proj64: ParallelProjector) -> None:
    act, body, _ = _phantom()
    system = SystemModel(proj64, mu=body * 0.0096, psf_fwhm_mm=6.0)
    sino = simulate_counts(np.stack([act, act.T]), system, 1e5, 0.2, 0.1, generator=1)
    nll: list[torch.Tensor] = []
    x = mlem(sino.prompts, system, sino.additive, n_iter=15,
             callback=lambda k, img: nll.append(poisson_nll(img, sino.prompts, system, sino.additive)))
    curve = torch.stack(nll).numpy()  # [iterations, slices]
    assert curve.shape == (15, 2)
    assert np.all(np.diff(curve, axis=0) <= 1e-9 * np.abs(curve[1:]))
    assert np.all(curve[-1] < curve[0])
    assert float(x.min()) >= 0


def test_hot_disk_reconstructs_in_the_right_place(proj32: ParallelProjector) -> None:
    act, body, hot = _phantom()
    system = SystemModel(proj32, mu=body * 0.0096, psf_fwhm_mm=6.0)
    sino = simulate_counts(act, system, 2e5, 0.2, 0.1, generator=1)
    image = sino.to_activity(mlem(sino.prompts, system, sino.additive, n_iter=30)).numpy()
    assert image.shape == (N, N) and image.min() >= 0
    top = image > 0.5 * image.max()
    cy, cx = ndimage.center_of_mass(image * top)
    assert math.hypot(cy - 9, cx - 20) < 0.5  # rows 9, column 20: not transposed, not flipped
    assert image[hot].mean() > 4 * image[body & ~hot].mean()
    assert image[body & ~hot].mean() == pytest.approx(1.0, rel=0.1)  # quantitative through the scale
    assert image[~body].mean() < 0.1


def test_mlem_of_noise_free_data_is_quantitative(proj32: ParallelProjector) -> None:
    act, body, hot = _phantom()
    system = SystemModel(proj32, mu=body * 0.0096, psf_fwhm_mm=6.0)
    sino = simulate_counts(act, system, 2e5, 0.2, 0.1, generator=1)
    image = sino.to_activity(mlem(sino.expected, system, sino.additive, n_iter=30)).numpy()
    # with scatter and randoms in the model: no bias (without them the background would be ~18 % high)
    assert image[body & ~hot].mean() == pytest.approx(1.0, rel=0.01)
    assert image.sum() == pytest.approx(act.sum(), rel=0.01)


def test_osem_converges_close_to_mlem(proj32: ParallelProjector) -> None:
    act, body, _ = _phantom()
    system = SystemModel(proj32, mu=body * 0.0096, psf_fwhm_mm=6.0)
    sino = simulate_counts(act, system, 2e5, 0.2, 0.1, generator=1)
    clean = sino.expected  # consistent data: OSEM has no limit cycle to blur the comparison
    reference = mlem(clean, system, sino.additive, n_iter=80)
    fast = osem(clean, system, sino.additive, n_iter=10, n_subsets=8)  # 80 sub-iterations
    slow = mlem(clean, system, sino.additive, n_iter=10)

    def dist(a: torch.Tensor) -> float:
        return float((a - reference).norm() / reference.norm())

    assert dist(fast) < 0.02
    assert dist(slow) > 5 * dist(fast)
    assert float(fast.min()) >= 0


def test_iterates_and_starting_image(proj32: ParallelProjector) -> None:
    act, _, _ = _phantom()
    system = SystemModel(proj32)
    sino = simulate_counts(act, system, 1e5, 0.1, generator=0)
    keep = Iterates({1, 3, 5})
    final = mlem(sino.prompts, system, sino.additive, n_iter=5, callback=keep)
    assert sorted(keep.images) == [1, 3, 5]
    torch.testing.assert_close(keep.images[5], final)
    assert not torch.equal(keep.images[1], keep.images[3])  # copies, not the live tensor
    again = mlem(sino.prompts, system, sino.additive, n_iter=2, x0=keep.images[3])
    torch.testing.assert_close(again, final)
    assert torch.equal(mlem(sino.prompts, system, n_iter=0, x0=act), torch.as_tensor(act, dtype=torch.float32))


def test_pixels_no_ray_sees_reconstruct_to_zero() -> None:
    # one angle (phi = 0: rays along the columns' direction) and 48 mm of radial coverage for a 96 mm image:
    # the outer columns are never seen
    proj = ParallelProjector(24, 4.0, 12, 1, angles_rad=[0.0])
    system = SystemModel(proj)
    sens = system.sensitivity()[0]
    assert float(sens[:, :5].abs().max()) == 0 and float(sens[:, 7:17].min()) > 0
    x = mlem(torch.poisson(system.forward(torch.ones(24, 24)) * 100), system, n_iter=5)
    assert bool(torch.isfinite(x).all()) and float(x[:, :5].abs().max()) == 0


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(proj64: ParallelProjector) -> None:
    act, body, _ = _phantom()
    cpu = SystemModel(proj64, mu=np.stack([body * 0.0096] * 2), psf_fwhm_mm=6.0)
    gpu_proj = proj64.to("cuda")
    gpu = SystemModel(gpu_proj, mu=np.stack([body * 0.0096] * 2), psf_fwhm_mm=6.0)
    assert _adjoint_error(gpu, 2, torch.float64) < 1e-13
    x = torch.rand(2, N, N, dtype=torch.float64)
    torch.testing.assert_close(gpu.forward(x).cpu(), cpu.forward(x))
    sino = simulate_counts(np.stack([act, act]), cpu, 1e5, 0.2, 0.1, generator=0)
    ref = osem(sino.prompts, cpu, sino.additive, n_iter=3, n_subsets=4)
    out = osem(sino.prompts.cuda(), gpu, sino.additive.cuda(), n_iter=3, n_subsets=4)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
    gsino = simulate_counts(np.stack([act, act]), gpu, 1e5, 0.2, generator=0)  # CUDA generator
    assert gsino.prompts.is_cuda and abs(float(gsino.prompts.sum()) - 1e5) < 5 * math.sqrt(1e5)
    assert thin(gsino.prompts, 0.1, generator=1).is_cuda
    float32 = ParallelProjector(N, PIX, N_RADIAL, N_ANGLES, device="cuda")
    assert _adjoint_error(float32, 4, torch.float32) < 1e-5
