"""The ``cdip`` plugin (conditional DIP with a stability map) and its 3D U-Net: shapes, seeds, the stability map and
the paper's blend, kept activity, a PET-only lesion, blocks without seams, the CT path, refused params and priors.

Every fit here is a few dozen epochs of a tiny network on one CPU thread (faster than two on a busy machine)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from denoisers import dip, registry
from denoisers.base import DenoiseInputs, InputKind, OutputKind
from denoisers.dip import CdipParams, ConditionalDIPDenoiser, blend, keep_total, plan_blocks, run_conditional_dip
from denoisers.errors import DenoiserError, InvalidInputError, MissingInputError
from denoisers.nets.unet3d import UNet3D

SPACING = (2.0, 2.0, 2.0)
FAST: dict[str, Any] = {"features": 4, "depth": 2, "convs": 1, "threads": 1, "epochs": 24, "sample_from": 12,
                        "sample_every": 3}


def _phantom(shape: tuple[int, int, int] = (16, 28, 28), *, counts: float = 30.0, seed: int = 0,
             lesion_contrast: float = 4.0, extent: float = 0.4) -> dict[str, np.ndarray]:
    """A head-like ellipsoid (semi-axes ``extent`` of the matrix) in air: uniform background (1), a slab of 'grey
    matter' (3) that the MR shows, and a small hot lesion that only the PET shows; Poisson noise at ``counts`` per
    unit activity."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in shape), indexing="ij")
    body = ((z / (extent * shape[0])) ** 2 + (y / (extent * shape[1])) ** 2 + (x / (extent * shape[2])) ** 2) <= 1.0
    slab = body & (np.abs(y + 0.18 * shape[1]) <= 2.0)
    lesion = (z**2 + (y - 0.15 * shape[1]) ** 2 + (x - 0.12 * shape[2]) ** 2) <= 1.6**2
    truth = np.where(body, 1.0, 0.0) + 2.0 * slab + (lesion_contrast - 1.0) * lesion
    rng = np.random.default_rng(seed)
    pet = rng.poisson(truth * counts) / counts
    mr = np.where(body, 400.0, 0.0) + 500.0 * slab  # no lesion: a PET-only finding
    background = body & ~slab & ~lesion
    return {"pet": pet.astype(np.float32), "mr": mr.astype(np.float32), "truth": truth.astype(np.float32),
            "body": body, "lesion": lesion, "background": background}


def _run(params: CdipParams, data: dict[str, np.ndarray], seed: int = 0, **kw: Any) -> dip.DipRun:
    return run_conditional_dip(data["pet"], data["mr"], params=params, seed=seed, **kw)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny networks gain nothing from a second thread, and lose a lot when another job holds the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the network ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upsample", ["transpose", "trilinear"])
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_unet3d_takes_any_size_and_every_parameter_learns(upsample: str, norm: str) -> None:
    net = UNet3D(2, 1, features=3, depth=2, convs=2, norm=norm, upsample=upsample)  # type: ignore[arg-type]
    for shape in [(5, 7, 9), (1, 1, 1), (8, 8, 8)]:
        y = net(torch.rand(1, 2, *shape))
        assert y.shape == (1, 1, *shape)
    net(torch.rand(1, 2, 6, 10, 3)).square().mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())
    assert net.padded_shape((5, 7, 9)) == (8, 8, 12)  # a multiple of 4, at least 8: the bottom is never 1 voxel
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(1, 1, 4, 4, 4))


def test_unet3d_initialisation_follows_the_generator() -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        net = UNet3D(1, features=4, depth=2)
        net.reset_parameters(torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in net.parameters()]

    state = torch.random.get_rng_state()
    a, b, c = weights(1), weights(1), weights(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    net = UNet3D(1, features=4, depth=2)
    torch.random.set_rng_state(state)
    net.reset_parameters(torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is not touched
    with pytest.raises(ValueError, match="depth"):
        UNet3D(1, depth=0)


# --- the plugin -----------------------------------------------------------------------------------------------


def test_outputs_info_and_seeds() -> None:
    data = _phantom((12, 20, 20))
    inputs = DenoiseInputs(pet=data["pet"], spacing=SPACING, mr_prior=data["mr"])
    den = registry.create("cdip", FAST, seed=7)
    assert den.spec.requires == {InputKind.PET, InputKind.MR_PRIOR}
    assert den.spec.produces == {OutputKind.DENOISED, OutputKind.STABILITY} and den.spec.stochastic
    result = den.denoise(inputs)
    assert result.denoised.shape == result.stability.shape == data["pet"].shape  # type: ignore[union-attr]
    assert result.denoised.dtype == result.stability.dtype == np.float32  # type: ignore[union-attr]
    info = dict(result.info)
    json.dumps(info)  # small JSON-friendly values only
    assert info["seed"] == 7 and info["samples"] == 5 and info["blocks"] == 1 and info["alpha"] == 0.6
    assert info["stability_mean"] > 0 and info["epochs"] == 24 and info["sample_from"] == 12
    again = registry.create("cdip", FAST, seed=7).denoise(inputs)
    assert np.array_equal(result.denoised, again.denoised)
    assert np.array_equal(result.stability, again.stability)  # type: ignore[arg-type]
    other = registry.create("cdip", FAST, seed=8).denoise(inputs)
    assert not np.array_equal(result.denoised, other.denoised)


def test_stability_is_zero_outside_the_crop_and_positive_inside() -> None:
    data = _phantom((16, 32, 32), extent=0.25)
    run = _run(CdipParams(**FAST, crop_margin_vox=1), data)
    inside = np.zeros(data["pet"].shape, bool)
    inside[run.crop] = True
    assert not inside.all()  # the air around the head is cropped away
    assert run.mask[data["body"]].mean() > 0.99 and not run.mask[~inside].any()
    assert np.all(run.stability[~inside] == 0)
    assert np.array_equal(run.dip[~inside], data["pet"][~inside])
    assert (run.stability[run.mask] > 0).mean() > 0.99
    assert run.stability_mean == pytest.approx(float(run.stability[run.mask].mean()), rel=1e-6)
    den = ConditionalDIPDenoiser(CdipParams(**FAST, crop_margin_vox=1))
    out = den.denoise(DenoiseInputs(pet=data["pet"], spacing=SPACING, mr_prior=data["mr"]))
    assert np.array_equal(out.denoised[~inside], data["pet"][~inside])
    assert out.info["crop"] == run.crop_text()


def test_blend_matches_the_paper_by_hand() -> None:
    x0 = np.array([[[10.0, 20.0, 30.0, 40.0]]], np.float32)
    net = np.array([[[12.0, 12.0, 12.0, 12.0]]], np.float32)
    s = np.array([[[1.0, 2.0, 3.0, 100.0]]], np.float32)
    mask = np.array([[[True, True, True, False]]])  # S-bar = 2, not 26.5: the mean is taken in the mask
    out, s_norm = blend(x0, net, s, mask, 0.6)
    np.testing.assert_allclose(s_norm, [[[0.3, 0.6, 0.9, 1.0]]], rtol=1e-6)  # capped at 1
    np.testing.assert_allclose(out, [[[0.3 * 10 + 0.7 * 12, 0.6 * 20 + 0.4 * 12, 0.9 * 30 + 0.1 * 12, 40.0]]],
                               rtol=1e-6)
    out0, s0 = blend(x0, net, s, mask, 0.0)
    assert np.array_equal(out0, net) and not s0.any()  # alpha 0: the DIP output
    out_flat, s_flat = blend(x0, net, np.zeros_like(s), mask, 0.6)
    assert np.array_equal(out_flat, net) and not s_flat.any()  # a perfectly stable run: nothing to blend


def test_total_activity_is_kept_and_regional_means_are_honest() -> None:
    data = _phantom(counts=20.0)
    den = ConditionalDIPDenoiser(CdipParams(**{**FAST, "epochs": 40, "sample_from": 20, "sample_every": 4}))
    result = den.denoise(DenoiseInputs(pet=data["pet"], spacing=SPACING, mr_prior=data["mr"]))
    out, pet = result.denoised, data["pet"]
    assert float(out.min()) >= 0.0
    assert float(out.sum(dtype=np.float64)) == pytest.approx(float(pet.sum(dtype=np.float64)), rel=1e-5)
    assert 0.9 < result.info["activity_scale"] < 1.1
    for region in ("background", "body"):
        m = data[region]
        assert float(out[m].mean()) == pytest.approx(float(data["truth"][m].mean()), rel=0.03), region
    # keep_total on its own: clipped, scaled inside the region only
    ref = np.ones((2, 2, 2), np.float32)
    img = np.array([-1.0, 3.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0], np.float32).reshape(2, 2, 2)
    kept, scale = keep_total(img, ref, (slice(0, 1), slice(None), slice(None)))
    assert scale == pytest.approx(4.0 / 5.0) and kept[0, 0, 0] == 0 and np.array_equal(kept[1], ref[1])


def test_a_pet_only_lesion_survives_better_with_the_stability_blend() -> None:
    # The MR does not show the lesion, so the network is slow to fit it: the DIP output loses contrast there,
    # the outputs keep moving (high S), and the blend takes the lesion from the PET while smoothing the rest.
    data = _phantom((16, 28, 28), counts=25.0, seed=3)
    params = CdipParams(features=8, depth=2, convs=1, threads=1, epochs=60, sample_from=30, sample_every=3)
    run = _run(params, data, seed=0)
    lesion, background, truth = data["lesion"], data["background"], data["truth"]
    plain, s0 = blend(data["pet"], run.dip, run.stability, run.mask, 0.0)
    mixed, s_norm = blend(data["pet"], run.dip, run.stability, run.mask, 0.6)

    def recovery(img: np.ndarray) -> float:  # lesion contrast over the background, relative to the truth's
        return float((img[lesion].mean() - img[background].mean()) / (truth[lesion].mean() - truth[background].mean()))

    assert recovery(plain) < 0.85  # the plain DIP output does lose the lesion (else this test proves nothing)
    assert recovery(mixed) > recovery(plain) + 0.1
    assert float(s_norm[lesion].mean()) > 1.3 * float(s_norm[background].mean())  # S points at the lesion
    noise_in = float(data["pet"][background].std())
    assert float(mixed[background].std()) < 0.85 * noise_in  # and the background is still denoised


def test_blocks_have_no_seam_and_match_the_single_fit() -> None:
    data = _phantom((36, 20, 20), counts=30.0, seed=5)
    base = {**FAST, "epochs": 30, "sample_from": 15, "crop_margin_vox": 8}
    whole = _run(CdipParams(**base), data)
    nz, ny, nx = (s.stop - s.start for s in whole.crop)
    limit = math.ceil((nz + 6) / 2) * ny * nx  # two blocks along z, overlapping by 6 slices
    blocks = plan_blocks((nz, ny, nx), limit, 6)
    assert len(blocks) == 2 and blocks[0][0].stop - blocks[1][0].start >= 6
    split = _run(CdipParams(**base, max_block_voxels=limit, block_overlap=6), data)
    assert split.blocks == 2 and whole.blocks == 1
    body, truth = data["body"], data["truth"]
    noise = float(np.std(data["pet"][data["background"]]))
    # Blocks differ from the single fit no more than another seed does, and are as close to the truth.
    reseeded = _run(CdipParams(**base), data, seed=1)
    by_blocks = float(np.abs(split.dip - whole.dip)[body].mean())
    by_seed = float(np.abs(reseeded.dip - whole.dip)[body].mean())
    assert by_blocks < 1.5 * by_seed

    def rmse(img: np.ndarray) -> float:
        return float(np.sqrt(np.mean((img[body] - truth[body]) ** 2)))

    assert rmse(split.dip) < 1.1 * rmse(whole.dip)
    # No seam: the step between neighbouring slices across the join is like the steps elsewhere in the body.
    profile = np.array([float(split.dip[z][body[z]].mean()) if body[z].any() else 0.0 for z in range(36)])
    inner = [z for z in range(1, 36) if body[z].sum() > 50 and body[z - 1].sum() > 50]
    steps = {z: abs(profile[z] - profile[z - 1]) for z in inner}
    join = whole.crop[0].start + (blocks[0][0].stop + blocks[1][0].start) // 2
    near = max(steps[z] for z in range(join - 2, join + 3) if z in steps)
    assert near <= 2.0 * float(np.median(list(steps.values()))) + 0.05 * noise


def test_ct_prior_path() -> None:
    data = _phantom()
    ct = np.where(data["body"], 40.0, -1000.0).astype(np.float32)
    ct[data["mr"] > 600] = 400.0  # the slab as bone-like HU
    den = registry.create("cdip", {**FAST, "prior": "ct"}, seed=0)
    assert InputKind.CT_PRIOR in den.spec.requires and InputKind.MR_PRIOR not in den.spec.requires
    with pytest.raises(MissingInputError, match="ct_prior"):
        den.denoise(DenoiseInputs(pet=data["pet"], spacing=SPACING, mr_prior=data["mr"]))
    result = den.denoise(DenoiseInputs(pet=data["pet"], spacing=SPACING, ct_prior=ct))
    assert result.info["prior"] == "ct" and np.isfinite(result.denoised).all()
    np.testing.assert_allclose(dip.normalise_prior(np.array([[[-1000.0, -2000.0, 0.0, 1000.0]]], np.float32), "ct"),
                               [[[0.0, 0.0, 1.0, 2.0]]])


def test_snapshots_progress_and_pet_input() -> None:
    data = _phantom((8, 12, 12))
    calls: list[tuple[int, int, float]] = []
    params = CdipParams(**{**FAST, "epochs": 10, "sample_from": 4, "sample_every": 2}, pet_input=True)
    assert dip.sample_epochs(params) == [4, 6, 8, 10]
    run = _run(params, data, snapshot_epochs=(5, 10), progress=lambda *a: calls.append(a))
    assert sorted(run.snapshots) == [5, 10] and np.array_equal(run.snapshots[10], run.dip)
    assert not np.array_equal(run.snapshots[5], run.dip)
    assert [c[:2] for c in calls] == [(i, 10) for i in range(1, 11)] and all(math.isfinite(c[2]) for c in calls)
    assert run.samples == 4
    with pytest.raises(ValueError, match="outside 1-10"):
        _run(params, data, snapshot_epochs=(0,))
    assert dip.sample_epochs(CdipParams(epochs=200, sample_from=98, sample_every=5))[:2] == [100, 105]
    assert len(dip.sample_epochs(CdipParams())) == 21  # the paper's 100, 105, ..., 200


def test_tiny_volume_is_padded_and_threads_are_restored() -> None:
    torch.set_num_threads(2)  # the fixture restores the process's own setting
    rng = np.random.default_rng(0)
    pet = rng.poisson(20.0, (3, 5, 4)).astype(np.float32)
    mr = rng.uniform(100, 200, (3, 5, 4)).astype(np.float32)
    run = run_conditional_dip(pet, mr, params=CdipParams(**{**FAST, "depth": 3}), seed=0)  # on 1 thread
    assert run.dip.shape == pet.shape and np.isfinite(run.dip).all()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("what", "prior", "message"), [
    ("mr", np.zeros, "no positive values"),
    ("mr", lambda s, dtype: np.full(s, 500.0, dtype), "constant"),
    ("ct", lambda s, dtype: np.full(s, -1000.0, dtype), "constant"),
], ids=["mr-zeros", "mr-constant", "ct-air"])
def test_a_prior_without_anatomy_is_refused_before_fitting(monkeypatch: pytest.MonkeyPatch, what: str, prior: Any,
                                                           message: str) -> None:
    def no_fit(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fitting started")

    monkeypatch.setattr(dip, "_fit_block", no_fit)
    data = _phantom((8, 12, 12))
    bad = prior(data["pet"].shape, dtype=np.float32)
    inputs = DenoiseInputs(pet=data["pet"], spacing=SPACING, **{f"{what}_prior": bad})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=message):
        ConditionalDIPDenoiser(CdipParams(**FAST, prior=what)).denoise(inputs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="no positive activity"):
        ConditionalDIPDenoiser(CdipParams(**FAST)).denoise(
            replace(inputs, pet=np.zeros_like(data["pet"]), mr_prior=data["mr"]))


@pytest.mark.parametrize(("params", "message"), [
    ({"sample_from": 250}, r"sample_from \(250\) must be below epochs \(200\)"),
    ({"epochs": 10, "sample_from": 9, "sample_every": 5}, "1 stability sample"),
    ({"alpha": -0.1}, "alpha: Input should be greater than or equal to 0"),
    ({"epochs": "many"}, "epochs: Input should be a valid integer"),
    ({"prior": "pet"}, "prior: Input should be 'mr' or 'ct'"),
    ({"max_iter": 3}, "unknown parameter 'max_iter'"),
])
def test_invalid_params_are_refused_readably(params: dict[str, Any], message: str) -> None:
    with pytest.raises(DenoiserError, match=message):
        registry.validate_params("cdip", params)


def test_plan_blocks_covers_the_crop_with_overlaps() -> None:
    assert plan_blocks((10, 20, 30), 10_000, 4) == [(slice(0, 10), slice(0, 20), slice(0, 30))]
    shape = (100, 60, 60)
    blocks = plan_blocks(shape, 100_000, 6)
    covered = np.zeros(shape, np.int32)
    for block in blocks:
        assert math.prod(s.stop - s.start for s in block) <= 100_000
        covered[block] += 1
    assert covered.min() >= 1 and len(blocks) > 1
    zs = sorted({(b[0].start, b[0].stop) for b in blocks})
    assert all(a[1] - b[0] >= 6 for a, b in zip(zs, zs[1:]))  # neighbours overlap by at least block_overlap
    assert len(plan_blocks((30, 30, 30), 10, 16)) == 1  # cannot be cut finer: one large block, never a failure
