"""Metrics: hand-computed values on tiny arrays (arithmetic in the comments), properties, and refused inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from denoisers import metrics
from denoisers.errors import InvalidInputError

T, F = True, False


# ------------------------------------------------------------------------------------------------ PSNR / NRMSE


def test_psnr_hand_computed() -> None:
    image = np.array([[1.0, 2.0], [3.0, 4.0]])
    reference = np.array([[1.0, 2.0], [3.0, 6.0]])
    # MSE = (0 + 0 + 0 + 2^2) / 4 = 1, MAX = 6 -> 20 log10(6 / 1)
    assert metrics.psnr(image, reference) == pytest.approx(20.0 * math.log10(6.0), abs=1e-12)
    assert metrics.psnr(image, reference) == pytest.approx(15.563025007672874, abs=1e-12)
    # Mask keeps voxels (0,0) and (1,1): MSE = (0 + 4) / 2 = 2, MAX = 6 -> 20 log10(6 / sqrt 2) = 12.5527 dB
    diag = np.array([[T, F], [F, T]])
    assert metrics.psnr(image, reference, diag) == pytest.approx(12.552725051033060, abs=1e-12)
    # Explicit peak 12 doubles MAX: + 20 log10(2) = + 6.0206 dB
    assert metrics.psnr(image, reference, diag, peak=12.0) == pytest.approx(12.552725051033060 + 6.020599913279624)


def test_psnr_peak_is_taken_inside_the_mask() -> None:
    image = np.array([1.0, 2.0, 0.0])
    reference = np.array([2.0, 2.0, 100.0])  # the 100 is outside the body mask and must not set MAX
    body = np.array([T, T, F])
    # MSE = (1 + 0) / 2 = 0.5, MAX = 2 -> 20 log10(2 / sqrt 0.5) = 20 log10(2.8284) = 9.0309 dB
    assert metrics.psnr(image, reference, body) == pytest.approx(9.030899869919436, abs=1e-12)


def test_psnr_identical_is_inf_and_noise_lowers_it() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((4, 16, 16)) + 1.0
    assert metrics.psnr(ref, ref) == math.inf
    low = metrics.psnr(ref + rng.normal(0, 0.2, ref.shape), ref)
    high = metrics.psnr(ref + rng.normal(0, 0.05, ref.shape), ref)
    assert high > low
    # Scaling the noise by 4 costs 20 log10(4) = 12.04 dB in expectation
    assert high - low == pytest.approx(12.04, abs=0.5)


def test_nrmse_hand_computed() -> None:
    image = np.array([1.0, 2.0, 3.0])
    reference = np.array([1.0, 2.0, 5.0])
    # sum (x - y)^2 = 4, sum y^2 = 1 + 4 + 25 = 30 -> sqrt(4 / 30) = 0.365148
    assert metrics.nrmse(image, reference) == pytest.approx(math.sqrt(4.0 / 30.0), abs=1e-15)
    # Mask keeps voxels 1, 2: sum (x - y)^2 = 4, sum y^2 = 4 + 25 = 29
    assert metrics.nrmse(image, reference, np.array([F, T, T])) == pytest.approx(math.sqrt(4.0 / 29.0), abs=1e-15)
    assert metrics.nrmse(reference, reference) == 0.0


def test_nrmse_is_normalised_by_the_reference_not_the_image() -> None:
    # x = 0: sum (x - y)^2 / sum y^2 = 1 exactly, whatever y; the swapped order would divide by zero.
    y = np.array([3.0, 4.0])
    assert metrics.nrmse(np.zeros(2), y) == 1.0
    with pytest.raises(InvalidInputError, match="zero"):
        metrics.nrmse(y, np.zeros(2))


# -------------------------------------------------------------------------------------------------------- SSIM


def test_ssim_hand_computed_on_constant_images() -> None:
    # Constant images: every local variance/covariance is 0, so the structure term is C2 / C2 = 1 and
    # SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with a = 1, b = 2, L = 1, C1 = (0.01 * 1)^2 = 1e-4:
    # (4 + 1e-4) / (5 + 1e-4) = 0.79998400...
    ref = np.ones((3, 12, 12))
    img = 2.0 * ref
    expected = (4.0 + 1e-4) / (5.0 + 1e-4)
    for mode in ("2d", "3d"):
        assert metrics.ssim(img, ref, data_range=1.0, mode=mode) == pytest.approx(expected, abs=1e-12)
    # data_range 10 -> C1 = 0.01: (4.01) / (5.01)
    assert metrics.ssim(img, ref, data_range=10.0) == pytest.approx(4.01 / 5.01, abs=1e-12)


def test_ssim_identical_is_one_and_symmetric_and_noise_lowers_it() -> None:
    rng = np.random.default_rng(1)
    ref = rng.gamma(4.0, 1.0, (6, 24, 24))
    body = np.zeros(ref.shape, bool)
    body[:, 4:20, 4:20] = True
    assert metrics.ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(ref, ref, body, mode="3d") == pytest.approx(1.0, abs=1e-12)
    noisy = ref + rng.normal(0.0, 1.0, ref.shape)
    noisier = ref + rng.normal(0.0, 3.0, ref.shape)
    assert metrics.ssim(noisy, ref, body, data_range=5.0) == pytest.approx(
        metrics.ssim(ref, noisy, body, data_range=5.0), abs=1e-12
    )  # symmetric for a fixed L
    assert 0.0 < metrics.ssim(noisier, ref, body) < metrics.ssim(noisy, ref, body) < 1.0


def test_ssim_default_data_range_is_the_reference_range_inside_the_mask() -> None:
    rng = np.random.default_rng(2)
    ref = rng.random((2, 16, 16)) * 4.0 + 1.0
    ref[0, 0, 0] = 1000.0  # outside the mask: must not widen L
    img = ref + rng.normal(0.0, 0.3, ref.shape)
    mask = np.zeros(ref.shape, bool)
    mask[:, 2:14, 2:14] = True
    span = float(ref[mask].max() - ref[mask].min())
    assert metrics.ssim(img, ref, mask) == metrics.ssim(img, ref, mask, data_range=span)


def test_ssim_map_matches_scikit_image() -> None:
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    ref = rng.gamma(3.0, 1.0, (11, 20, 22))  # scikit-image wants >= 11 voxels per axis (its window)
    img = ref + rng.normal(0.0, 0.7, ref.shape)
    span = float(ref.max() - ref.min())
    kw = {"data_range": span, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "full": True}
    # 3-D window
    _, expected_3d = skm.structural_similarity(img, ref, **kw)
    np.testing.assert_allclose(metrics.ssim_map(img, ref, data_range=span, mode="3d"), expected_3d, atol=1e-10)
    # 2-D per slice: scikit-image on each slice alone
    ours = metrics.ssim_map(img, ref, data_range=span, mode="2d")
    for z in range(ref.shape[0]):
        _, expected_2d = skm.structural_similarity(img[z], ref[z], **kw)
        np.testing.assert_allclose(ours[z], expected_2d, atol=1e-10)
    # And the scalar is the plain mean of the map (no edge crop)
    assert metrics.ssim(img, ref, data_range=span) == pytest.approx(float(ours.mean()), abs=1e-12)


def test_ssim_2d_mode_keeps_slices_apart() -> None:
    rng = np.random.default_rng(4)
    ref = rng.random((5, 16, 16)) + 1.0
    img = ref.copy()
    img[2] += rng.normal(0.0, 0.5, (16, 16))  # only slice 2 differs
    smap2 = metrics.ssim_map(img, ref, data_range=1.0, mode="2d")
    smap3 = metrics.ssim_map(img, ref, data_range=1.0, mode="3d")
    np.testing.assert_allclose(smap2[[0, 1, 3, 4]], 1.0, atol=1e-12)
    assert smap2[2].mean() < 0.9
    assert smap3[1].mean() < 1.0 - 1e-3  # the 3-D window does reach into the neighbouring slice


# ------------------------------------------------------------------------------------- CRC / STD / CR (Gong)


def test_crc_hand_computed_eq6() -> None:
    hot = np.array([T, T, F, F])
    bg = np.array([F, F, T, T])
    truth = np.array([4.0, 4.0, 1.0, 1.0])  # a_true / b_true - 1 = 4 / 1 - 1 = 3
    realizations = np.array(
        [
            [3.0, 5.0, 1.0, 1.0],  # a_1 = 4, b_1 = 1 -> a/b - 1 = 3
            [2.0, 2.0, 1.0, 1.0],  # a_2 = 2, b_2 = 1 -> 1
        ]
    )
    # CRC = mean(3, 1) / 3 = 2 / 3
    assert metrics.crc(realizations, hot, bg, truth) == pytest.approx(2.0 / 3.0, abs=1e-15)
    assert metrics.crc_from_means([[4.0], [2.0]], [[1.0], [1.0]], 4.0, 1.0) == pytest.approx(2.0 / 3.0, abs=1e-15)
    # a sequence of images works like the stacked array
    assert metrics.crc(list(realizations), [hot], [bg], truth) == pytest.approx(2.0 / 3.0, abs=1e-15)


def test_crc_averages_roi_means_not_pooled_voxels() -> None:
    # Eq. (6): a_r = 1/Ka sum_k a_{r,k}. Hot ROI 1 is one voxel, hot ROI 2 three voxels.
    hot_rois = [np.array([T, F, F, F, F, F]), np.array([F, T, T, T, F, F])]
    bg = np.array([F, F, F, F, T, T])
    truth = np.array([4.0, 4.0, 4.0, 4.0, 1.0, 1.0])  # true contrast 4 / 1 - 1 = 3
    real = np.array([[6.0, 2.0, 2.0, 2.0, 1.0, 1.0]])
    # ROI means 6 and 2 -> a = (6 + 2) / 2 = 4, b = 1 -> (4 - 1) / 3 = 1.  (Pooled voxels: 12 / 4 = 3 -> 2/3.)
    assert metrics.crc(real, hot_rois, bg, truth) == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(metrics.roi_means(real, hot_rois), [[6.0, 2.0]])
    # a (K, *shape) boolean stack is the same as the list
    assert metrics.crc(real, np.stack(hot_rois), bg, truth) == pytest.approx(1.0, abs=1e-15)


def test_crc_is_one_for_perfect_recovery() -> None:
    truth = np.ones((4, 10, 10))
    truth[:, 2:5, 2:5] = 4.0
    hot = truth == 4.0
    bgs = [np.zeros(truth.shape, bool) for _ in range(3)]
    for k, b in enumerate(bgs):
        b[k, 6:9, 6:9] = True
    assert metrics.crc(np.stack([truth] * 3), hot, bgs, truth) == pytest.approx(1.0, abs=1e-14)
    # Scaling every realization keeps CRC (it is a contrast) ...
    assert metrics.crc(np.stack([truth * 2.5] * 3), hot, bgs, truth) == pytest.approx(1.0, abs=1e-14)
    # ... and a half-contrast image (hot 2.5 on 1: 1.5 / 3) gives 0.5
    half = np.where(hot, 2.5, 1.0)
    assert metrics.crc(half[None], hot, bgs, truth) == pytest.approx(0.5, abs=1e-14)


def test_background_std_hand_computed_eq7() -> None:
    # ROI 1 = voxels 0, 1; ROI 2 = voxel 2. R = 3.
    rois = [np.array([T, T, F]), np.array([F, F, T])]
    realizations = np.array(
        [
            [8.0, 10.0, 2.0],  # b_{1,1} = 9,  b_{1,2} = 2
            [10.0, 10.0, 4.0],  # b_{2,1} = 10, b_{2,2} = 4
            [12.0, 10.0, 6.0],  # b_{3,1} = 11, b_{3,2} = 6
        ]
    )
    # ROI 1: mean 10, sqrt((1 + 0 + 1) / (3 - 1)) = 1 -> 0.1
    # ROI 2: mean 4,  sqrt((4 + 0 + 4) / 2) = 2     -> 0.5
    # STD = (0.1 + 0.5) / 2 = 0.3
    assert metrics.background_std(realizations, rois) == pytest.approx(0.3, abs=1e-15)
    assert metrics.background_std_from_means([[9.0, 2.0], [10.0, 4.0], [11.0, 6.0]]) == pytest.approx(0.3)


def test_background_std_is_the_std_of_roi_means() -> None:
    # i.i.d. noise sigma on n voxels of mean mu: eq. (7) -> sigma / (sqrt(n) mu) (ROI-mean noise, not voxel noise)
    rng = np.random.default_rng(6)
    mu, sigma, n_real = 10.0, 2.0, 2000
    shape = (5, 4, 4)
    rois = [np.zeros(shape, bool) for _ in range(5)]
    for k, r in enumerate(rois):
        r[k] = True  # one 16-voxel slice each
    real = mu + rng.normal(0.0, sigma, (n_real, *shape))
    expected = sigma / (math.sqrt(16) * mu)  # 0.05
    assert metrics.background_std(real, rois) == pytest.approx(expected, rel=0.03)
    # the voxel-wise ensemble STD sees the voxel noise sigma / mu = 0.2 instead
    assert metrics.ensemble_std(real, np.ones(shape, bool)) == pytest.approx(sigma / mu, rel=0.03)
    assert metrics.background_std(np.stack([np.full(shape, mu)] * 4), rois) == 0.0


def test_tumor_contrast_recovery_hand_computed_eq8() -> None:
    lesion = np.array([T, T, F])
    tumor_only = np.array([[2.0, 4.0, 0.0], [1.0, 1.0, 0.0]])  # l_1 = 3, l_2 = 1
    # CR = 1/2 (3 / 4 + 1 / 4) = 0.5
    assert metrics.tumor_contrast_recovery(tumor_only, lesion, 4.0) == pytest.approx(0.5, abs=1e-15)
    assert metrics.tumor_contrast_recovery(tumor_only, lesion, np.array([4.0, 4.0, 0.0])) == pytest.approx(0.5)
    # one image of the mask's shape is R = 1: 3 / 4
    assert metrics.tumor_contrast_recovery(tumor_only[0], lesion, 4.0) == pytest.approx(0.75, abs=1e-15)


def test_lesion_contrast_recovery_single_image() -> None:
    lesion = np.array([T, T, F, F])
    bg = np.array([F, F, T, T])
    truth = np.array([6.0, 6.0, 2.0, 2.0])  # true contrast 6 / 2 - 1 = 2
    image = np.array([5.0, 3.0, 2.0, 2.0])  # 4 / 2 - 1 = 1
    assert metrics.lesion_contrast_recovery(image, lesion, bg, truth) == pytest.approx(0.5, abs=1e-15)
    assert metrics.lesion_contrast_recovery(truth, lesion, bg, truth) == pytest.approx(1.0, abs=1e-15)


# ------------------------------------------------------------------------------------------- spatial / ensemble


def test_roi_std_hand_computed() -> None:
    image = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    roi = np.array([T, T, T, T, F])
    # deviations from 2.5: 1.5, 0.5, 0.5, 1.5 -> sum of squares 5 -> sample std sqrt(5 / 3) = 1.290994
    assert metrics.roi_std(image, roi) == pytest.approx(math.sqrt(5.0 / 3.0), abs=1e-15)
    assert metrics.roi_std(image, roi, ddof=0) == pytest.approx(math.sqrt(5.0 / 4.0), abs=1e-15)
    assert metrics.roi_std(image, roi, relative=True) == pytest.approx(math.sqrt(5.0 / 3.0) / 2.5, abs=1e-15)
    with pytest.raises(InvalidInputError, match="more than 1 voxel"):
        metrics.roi_std(image, np.array([T, F, F, F, F]))


def test_ensemble_std_hand_computed() -> None:
    real = np.array([[1.0, 10.0], [3.0, 14.0]])
    roi = np.array([T, T])
    # voxel stds (ddof 1): |1 - 3| / sqrt 2 = sqrt 2, |10 - 14| / sqrt 2 = 2 sqrt 2 -> mean 1.5 sqrt 2 = 2.12132
    # ensemble mean over the ROI: (2 + 12) / 2 = 7 -> relative 2.12132 / 7 = 0.303046
    assert metrics.ensemble_std(real, roi, relative=False) == pytest.approx(1.5 * math.sqrt(2.0), abs=1e-14)
    assert metrics.ensemble_std(real, roi) == pytest.approx(1.5 * math.sqrt(2.0) / 7.0, abs=1e-14)


# ------------------------------------------------------------------------------------- peak/valley, SUV, activity


def test_peak_to_valley_hand_computed() -> None:
    profile = np.array([1.0, 5.0, 3.0, 2.0, 4.0, 1.0])
    peaks = np.array([F, T, F, F, T, F])
    valley = np.array([F, F, T, T, F, F])
    # mean/mean: (5 + 4) / 2 / ((3 + 2) / 2) = 4.5 / 2.5 = 1.8 ; max/min: 5 / 2 = 2.5
    assert metrics.peak_to_valley_ratio(profile, peaks, valley) == pytest.approx(1.8, abs=1e-15)
    assert metrics.peak_to_valley_ratio(profile, peaks, valley, peak_stat="max", valley_stat="min") == 2.5
    with pytest.raises(InvalidInputError, match="peak_stat"):
        metrics.peak_to_valley_ratio(profile, peaks, valley, peak_stat="top")  # type: ignore[arg-type]


def test_suv_mean_and_max_bias_hand_computed() -> None:
    image = np.array([2.0, 4.0, 9.0])
    truth = np.array([2.0, 5.0, 9.0])
    roi = np.array([T, T, F])
    # SUVmean: (3 - 3.5) / 3.5 = -1/7 ; SUVmax: (4 - 5) / 5 = -0.2
    assert metrics.suv_mean_bias(image, truth, roi) == pytest.approx(-1.0 / 7.0, abs=1e-15)
    assert metrics.suv_max_bias(image, truth, roi) == pytest.approx(-0.2, abs=1e-15)
    assert metrics.suv_mean_bias(truth, truth, roi) == 0.0


def test_suv_peak_hand_computed() -> None:
    # 1 ml sphere: radius (3000 / (4 pi))^(1/3) = 6.2035 mm.
    img = np.zeros((5, 5, 5))
    img[2, 2, 2] = 14.0
    for dz, dy, dx in [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]:
        img[2 + dz, 2 + dy, 2 + dx] = 7.0
    centre = np.zeros(img.shape, bool)
    centre[2, 2, 2] = True
    # 5 mm voxels: the sphere holds the centre and its 6 face neighbours (5 mm), not the diagonals (7.07 mm):
    # (14 + 6 * 7) / 7 = 8
    assert metrics.suv_peak(img, centre, (5.0, 5.0, 5.0)) == pytest.approx(8.0, abs=1e-12)
    # Whole-volume ROI: no other centre beats it (a neighbour sees 7 + 14 = 21 / 7 = 3)
    assert metrics.suv_peak(img, np.ones(img.shape, bool), (5.0, 5.0, 5.0)) == pytest.approx(8.0, abs=1e-12)
    # 10 mm voxels: only the centre voxel is within 6.2 mm -> SUVpeak = SUVmax = 14
    assert metrics.suv_peak(img, centre, (10.0, 10.0, 10.0)) == pytest.approx(14.0, abs=1e-12)
    # Anisotropic (10, 5, 5): the z neighbours (10 mm) drop out -> (14 + 4 * 7) / 5 = 8.4
    assert metrics.suv_peak(img, centre, (10.0, 5.0, 5.0)) == pytest.approx(8.4, abs=1e-12)


def test_suv_peak_leaves_voxels_outside_the_volume_out() -> None:
    img = np.zeros((4, 4, 4))
    img[0, 0, 0] = 7.0
    corner = np.zeros(img.shape, bool)
    corner[0, 0, 0] = True
    # In-volume sphere voxels at the corner: itself + 3 face neighbours -> 7 / 4 = 1.75 (not 7 / 7 = 1)
    assert metrics.suv_peak(img, corner, (5.0, 5.0, 5.0)) == pytest.approx(1.75, abs=1e-12)


def test_suv_peak_bias() -> None:
    truth = np.zeros((3, 3, 3))
    truth[1, 1, 1] = 10.0
    image = truth * 0.9
    roi = truth > 0
    assert metrics.suv_peak_bias(image, truth, roi, (10.0, 10.0, 10.0)) == pytest.approx(-0.1, abs=1e-12)


def test_total_activity_ratio_hand_computed() -> None:
    image = np.array([1.0, 2.0, 3.0])
    reference = np.array([2.0, 2.0, 2.0])
    assert metrics.total_activity_ratio(image, reference) == pytest.approx(1.0, abs=1e-15)  # 6 / 6
    assert metrics.total_activity_ratio(image, reference, np.array([T, F, F])) == pytest.approx(0.5)  # 1 / 2


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b, m: metrics.psnr(a, b[:, :-1]),
        lambda a, b, m: metrics.nrmse(a, b[:-1]),
        lambda a, b, m: metrics.ssim(a, b[:, :, :-1]),
        lambda a, b, m: metrics.total_activity_ratio(a, b.T),
        lambda a, b, m: metrics.suv_mean_bias(a, b[:1], m),
        lambda a, b, m: metrics.lesion_contrast_recovery(a, m, m, b[:, 1:]),
    ],
    ids=["psnr", "nrmse", "ssim", "activity", "suv", "lesion-cr"],
)
def test_mismatched_shapes_are_refused(call) -> None:  # type: ignore[no-untyped-def]
    a = np.ones((3, 4, 5))
    b = np.ones((3, 4, 5))
    m = np.ones((3, 4, 5), bool)
    with pytest.raises(ValueError, match="shape"):
        call(a, b, m)


def test_mask_problems_are_refused_clearly() -> None:
    img = np.ones((2, 3))
    empty = np.zeros((2, 3), bool)
    with pytest.raises(InvalidInputError, match="empty"):
        metrics.psnr(img, img, empty)
    with pytest.raises(InvalidInputError, match="empty"):
        metrics.roi_std(img, empty)
    with pytest.raises(InvalidInputError, match="boolean"):
        metrics.nrmse(img, img, np.ones((2, 3), int))  # a label map, not a mask
    with pytest.raises(InvalidInputError, match="shape"):
        metrics.suv_max_bias(img, img, np.ones((3, 2), bool))
    with pytest.raises(InvalidInputError, match=r"background_rois\[1\] is empty"):
        metrics.crc(img[None], np.ones((2, 3), bool), [np.ones((2, 3), bool), empty], img)
    with pytest.raises(InvalidInputError, match="no ROI"):
        metrics.background_std(np.stack([img, img]), [])
    assert issubclass(InvalidInputError, ValueError)


def test_realization_problems_are_refused() -> None:
    truth = np.array([4.0, 1.0])
    hot, bg = np.array([T, F]), np.array([F, T])
    with pytest.raises(InvalidInputError, match="one shape"):
        metrics.roi_means([np.ones(2), np.ones(3)], hot)
    with pytest.raises(InvalidInputError, match="expected"):
        metrics.crc(np.ones((2, 3)), hot, bg, truth)  # realizations (2, 3) vs truth (2,)
    with pytest.raises(InvalidInputError, match="at least 2 realizations"):
        metrics.background_std(np.ones((1, 2)), bg)
    with pytest.raises(InvalidInputError, match="at least 2 realizations"):
        metrics.ensemble_std(np.ones((1, 2)), bg)
    with pytest.raises(InvalidInputError, match="no contrast"):
        metrics.crc(np.ones((2, 2)), hot, bg, np.ones(2))
    with pytest.raises(InvalidInputError, match="realizations"):
        metrics.crc_from_means(np.ones((3, 1)), np.ones((2, 1)), 4.0, 1.0)


def test_undefined_values_and_non_finite_inputs_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="NaN"):
        metrics.psnr(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(InvalidInputError, match="positive peak"):
        metrics.psnr(np.ones(2), np.zeros(2))
    with pytest.raises(InvalidInputError, match="data range"):
        metrics.ssim(np.ones((4, 4)), np.ones((4, 4)))
    with pytest.raises(InvalidInputError, match="at least 2 dimensions"):
        metrics.ssim(np.ones(4), np.arange(4.0))
    with pytest.raises(InvalidInputError, match="mode"):
        metrics.ssim_map(np.ones((4, 4)), np.ones((4, 4)), data_range=1.0, mode="4d")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="zero"):
        metrics.peak_to_valley_ratio(np.array([1.0, 0.0]), np.array([T, F]), np.array([F, T]))
    with pytest.raises(InvalidInputError, match="zero"):
        metrics.suv_mean_bias(np.ones(2), np.zeros(2), np.array([T, T]))
    with pytest.raises(InvalidInputError, match="spacing"):
        metrics.suv_peak(np.ones((2, 2, 2)), np.ones((2, 2, 2), bool), (1.0, 1.0))
    with pytest.raises(InvalidInputError, match="real numeric"):
        metrics.total_activity_ratio(np.array(["a"]), np.ones(1))


def test_slice_flicker_counts_error_jumps_between_slices_not_anatomy() -> None:
    from denoisers.metrics import slice_flicker

    truth = np.ones((6, 8, 8)) * np.arange(1, 7)[:, None, None]  # anatomy that changes from slice to slice
    mask = np.ones(truth.shape, bool)
    assert slice_flicker(truth, truth, mask) == 0.0
    banded = truth + 0.35 * (np.arange(6) % 2)[:, None, None]  # every other slice 0.35 too high
    assert slice_flicker(banded, truth, mask) == pytest.approx(0.35 / truth.mean())
    assert slice_flicker(truth * 1.1, truth, mask) == pytest.approx(0.1 / 3.5, rel=1e-6)  # a smooth trend, small
    with pytest.raises(InvalidInputError, match="non-zero truth"):
        slice_flicker(truth, np.zeros_like(truth), mask)
