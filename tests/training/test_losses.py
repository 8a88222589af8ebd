"""Training losses against hand-computed values and an independent SSIM (scikit-image), and their pitfalls."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training.losses import (
    VGG_KEYS,
    LossError,
    PerceptualLoss,
    l1_loss,
    lesion_weight_map,
    ms_ssim,
    mse_loss,
    ssim,
    weighted_mse_loss,
    weighted_ssim,
)


def test_mse_l1_and_weighted_against_hand_values() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [3.0, 7.0]]]])
    assert float(mse_loss(pred, target)) == pytest.approx((0 + 4 + 0 + 9) / 4)
    assert float(l1_loss(pred, target)) == pytest.approx((0 + 2 + 0 + 3) / 4)
    weights = torch.tensor([[[[1.0, 10.0], [1.0, 1.0]]]])
    assert float(weighted_mse_loss(pred, target, weights)) == pytest.approx((10 * 4 + 9) / 13)
    assert float(weighted_mse_loss(pred, target, torch.ones_like(pred))) == pytest.approx(float(mse_loss(pred, target)))


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    a = rng.random((40, 36))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, None)
    ref = metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    ours = ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None], 1.0)
    assert float(ours) == pytest.approx(ref, abs=1e-6)
    assert float(ssim(torch.tensor(a)[None, None], torch.tensor(a)[None, None], 1.0)) == pytest.approx(1.0)


def test_ssim_on_images_smaller_than_the_window() -> None:
    x = torch.rand(2, 1, 5, 7)
    assert float(ssim(x, x, 1.0)) == pytest.approx(1.0)
    assert float(ssim(x, torch.rand(2, 1, 5, 7), 1.0)) < 0.9
    with pytest.raises(LossError, match="at least 3 x 3"):
        ssim(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), 1.0)
    with pytest.raises(LossError, match="data_range"):
        ssim(x, x, 0.0)


def test_ms_ssim_identity_size_guard_and_anti_correlated_images_stay_finite() -> None:
    x = torch.rand(2, 1, 48, 48, requires_grad=True)
    assert float(ms_ssim(x.detach(), x.detach(), 1.0)) == pytest.approx(1.0, abs=1e-6)
    anti = (1.0 - x).detach()  # negative contrast-structure terms: the NaN pitfall of fractional powers
    value = ms_ssim(x, anti, 1.0)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    with pytest.raises(LossError, match="at least two scales"):
        ms_ssim(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20), 1.0)


def test_ms_ssim_falls_with_noise_and_uses_the_scales_that_fit() -> None:
    torch.manual_seed(4)
    clean = F.avg_pool2d(torch.rand(1, 1, 200, 200), 5, stride=1, padding=2)
    noisy = clean + 0.05 * torch.randn_like(clean)
    noisier = clean + 0.2 * torch.randn_like(clean)
    assert 1.0 > float(ms_ssim(noisy, clean, 1.0)) > float(ms_ssim(noisier, clean, 1.0)) > 0.0


def test_lesion_weight_map_marks_hot_spots_not_organs() -> None:
    target = torch.ones(1, 1, 64, 64)
    target[..., 10:50, 10:50] = 3.0  # an organ: uniform, not a lesion
    target[..., 28:31, 28:31] = 12.0  # a small hot lesion inside it
    weights = lesion_weight_map(target, smooth_sigma=0.0)
    assert float(weights[0, 0, 29, 29]) == 10.0
    assert float(weights[0, 0, 15, 15]) == 1.0 and float(weights[0, 0, 2, 2]) == 1.0
    assert int((weights == 10.0).sum()) == 9
    smooth = lesion_weight_map(target, smooth_sigma=1.0)
    assert 1.0 < float(smooth[0, 0, 29, 29]) < 10.0 and float(smooth[0, 0, 2, 2]) == pytest.approx(1.0)
    torch.testing.assert_close(lesion_weight_map(torch.full((1, 1, 32, 32), 2.0)), torch.ones(1, 1, 32, 32))


def _vgg_file(tmp_path: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    torch.manual_seed(5)
    state = {VGG_KEYS[0]: torch.randn(64, 3, 3, 3) * 0.1, VGG_KEYS[1]: torch.randn(64) * 0.01,
             VGG_KEYS[2]: torch.randn(64, 64, 3, 3) * 0.05, VGG_KEYS[3]: torch.randn(64) * 0.01,
             "features.5.weight": torch.zeros(1)}  # torchvision files hold more layers: ignored
    path = tmp_path / "vgg19-trimmed.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def test_perceptual_loss_is_the_distance_of_the_first_vgg_block(tmp_path: Path) -> None:
    path, sha, state = _vgg_file(tmp_path)
    loss = PerceptualLoss(path, sha, scale=2.0)
    pred = torch.rand(2, 1, 16, 16, requires_grad=True)
    target = torch.rand(2, 1, 16, 16)

    def features(x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (x.expand(-1, 3, -1, -1) / 2.0 - mean) / std
        x = F.relu(F.conv2d(x, state[VGG_KEYS[0]], state[VGG_KEYS[1]], padding=1))
        return F.relu(F.conv2d(x, state[VGG_KEYS[2]], state[VGG_KEYS[3]], padding=1))

    value = loss(pred, target)
    expected = F.mse_loss(features(pred.detach()), features(target))
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-5)
    value.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in loss.parameters())  # VGG stays frozen


def test_perceptual_loss_refuses_a_missing_or_altered_weights_file(tmp_path: Path) -> None:
    path, sha, _ = _vgg_file(tmp_path)
    with pytest.raises(LossError, match="expected at .*nowhere.pth with sha256 " + sha):
        PerceptualLoss(tmp_path / "nowhere.pth", sha)
    with pytest.raises(LossError, match="not configured"):
        PerceptualLoss(None, None)
    with pytest.raises(LossError, match="does not match"):
        PerceptualLoss(path, "0" * 64)
    partial = tmp_path / "partial.pth"
    torch.save({VGG_KEYS[0]: torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(LossError, match="lack features.0.bias"):
        PerceptualLoss(partial, hashlib.sha256(partial.read_bytes()).hexdigest())


def test_weighted_ssim_is_ssim_with_uniform_weights_and_ignores_what_weighs_nothing() -> None:
    gen = torch.Generator().manual_seed(5)
    y = torch.rand(2, 1, 40, 40, generator=gen)
    x = y + 0.05 * torch.randn(2, 1, 40, 40, generator=gen)
    assert float(weighted_ssim(x, y, 1.0, torch.ones_like(x))) == pytest.approx(float(ssim(x, y, 1.0)), rel=1e-6)
    # Ruin the left half of x: with weights that leave it out, the SSIM is that of the right half alone.
    spoiled = x.clone()
    spoiled[..., :20] = torch.rand(2, 1, 40, 20, generator=gen)
    right = torch.zeros_like(x)
    right[..., 30:] = 1.0  # far enough from the ruined half that no 11-pixel window reaches it
    assert float(weighted_ssim(spoiled, y, 1.0, right)) == pytest.approx(float(weighted_ssim(x, y, 1.0, right)),
                                                                         rel=1e-6)
    assert float(ssim(spoiled, y, 1.0)) < float(ssim(x, y, 1.0)) - 0.1
    with pytest.raises(LossError):
        weighted_ssim(x, y, 1.0, torch.ones(2, 1, 40, 39))
