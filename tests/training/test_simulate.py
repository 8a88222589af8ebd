"""Simulated low/full-count PET (training.simulate): physics-level checks, save/load, DICOM export."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from tests.dicomtools import run_dciodvfy
from training.simulate import (
    SimulatedCase,
    SimulationError,
    activity_scale,
    format_level,
    load_case,
    parse_levels,
    preset,
    save_case,
    simulate_case,
)


@dataclass
class DiskPhantom:
    """The Phantom contract of training.phantoms, reduced to a uniform elliptical body with a hot disk."""

    activity: np.ndarray
    mu_map: np.ndarray
    voxel_mm: tuple[float, float, float]
    labels: np.ndarray
    mr_t1: np.ndarray | None = None
    ct_hu: np.ndarray | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "disk"


def disk_phantom(shape: tuple[int, int, int] = (12, 48, 48), voxel: float = 4.0, *, prior: str = "mr",
                 hot: float = 4.0) -> DiskPhantom:
    """Body (label 1, activity 1) and a hot cylinder (label 2, activity ``hot``), water attenuation."""
    _, ny, nx = shape
    y = (np.arange(ny) - (ny - 1) / 2) * voxel
    x = (np.arange(nx) - (nx - 1) / 2) * voxel
    yy, xx = np.meshgrid(y, x, indexing="ij")
    body = (yy / (0.38 * ny * voxel)) ** 2 + (xx / (0.42 * nx * voxel)) ** 2 <= 1
    disk = (yy - 0.1 * ny * voxel) ** 2 + (xx + 0.15 * nx * voxel) ** 2 <= (0.1 * nx * voxel) ** 2
    labels = np.zeros(shape, np.int16)
    labels[:, body] = 1
    labels[:, disk & body] = 2
    activity = np.select([labels == 2, labels == 1], [hot, 1.0], 0.0).astype(np.float32)
    mu = (labels > 0) * np.float32(0.0096)
    ph = DiskPhantom(activity, mu.astype(np.float32), (voxel, voxel, voxel), labels,
                     lesions=[{"centre_mm": [0.0, 0.1 * ny * voxel, -0.15 * nx * voxel], "diameter_mm": 0.2 * nx * voxel,
                               "contrast": hot, "present_in_mr": True}])
    if prior == "mr":
        ph.mr_t1 = np.select([labels == 2, labels == 1], [300.0, 600.0], 0.0).astype(np.float32)
    elif prior == "ct":
        ph.ct_hu = np.where(labels > 0, 40.0, -1000.0).astype(np.float32)
    return ph


def uniform_roi(ph: DiskPhantom) -> np.ndarray:
    """The body away from its edge and from the hot disk (where the PSF and Gibbs ringing reach)."""
    in_plane = ndimage.generate_binary_structure(3, 1)
    in_plane[0] = in_plane[2] = False  # slices are simulated independently: erode within each slice
    body = ph.labels > 0
    far_from_disk = ~ndimage.binary_dilation(ph.labels == 2, in_plane, iterations=3)
    return ndimage.binary_erosion(body, in_plane, iterations=3) & far_from_disk


# threads=1: steady timings on a machine shared with other jobs (see simulate_case's ``threads``)
SIM = {"full_counts": 12 * 2e6, "iterations": 60, "psf_fwhm_mm": 5.0, "randoms_fraction": 0.2,
       "scatter_fraction": 0.3, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def phantom() -> DiskPhantom:
    return disk_phantom()


@pytest.fixture(scope="module")
def case(phantom: DiskPhantom) -> SimulatedCase:
    return simulate_case(phantom, count_levels=(1.0, 0.1, 0.02), realizations=2, seed=3, **SIM)


def test_case_shapes_and_metadata(case: SimulatedCase, phantom: DiskPhantom) -> None:
    assert case.levels == [1.0, 0.1, 0.02]
    assert case.realizations == 2
    for level in case.levels:
        for k in range(2):
            r = case.recon(level, k)
            assert r.shape == phantom.activity.shape and r.dtype == np.float32
            assert np.isfinite(r).all() and (r >= 0).all()
    assert case.spacing == (4.0, 4.0, 4.0)
    assert case.prior_kind == "mr" and case.prior is not None and case.prior.shape == phantom.activity.shape
    np.testing.assert_array_equal(case.truth, phantom.activity)
    meta = case.meta
    assert meta["levels"] == ["1", "0.1", "0.02"]
    assert meta["parameters"]["seed"] == 3 and meta["parameters"]["iterations"] == 60
    assert meta["parameters"]["algorithm"] == "MLEM"
    assert meta["phantom"]["kind"] == "disk" and meta["phantom"]["lesions"][0]["contrast"] == 4.0
    # default sinogram: the whole 48 x 48 square seen from every angle, 1.5 n angles
    assert meta["parameters"]["radial_bins"] >= math.sqrt(2) * 48 and meta["parameters"]["angles"] == 72
    json.dumps(meta)  # JSON-able as it is


def test_full_count_mean_matches_truth(case: SimulatedCase, phantom: DiskPhantom) -> None:
    roi = uniform_roi(phantom)
    assert roi.sum() > 2000
    for k in range(2):
        mean = float(case.recon(1.0, k)[roi].mean())
        print(f"full-count mean in the uniform ROI, realization {k}: {mean:.4f} (truth 1)")
        assert mean == pytest.approx(1.0, rel=0.03)
    # the hot disk is recovered at the right place with most of its contrast
    disk_core = np.zeros_like(phantom.labels, dtype=bool)
    disk_core[:] = ndimage.binary_erosion(phantom.labels[0] == 2, iterations=2)
    assert float(case.recon(1.0, 0)[disk_core].mean()) == pytest.approx(4.0, rel=0.1)


def test_noise_increases_as_count_level_decreases_and_means_are_kept(case: SimulatedCase,
                                                                      phantom: DiskPhantom) -> None:
    roi = uniform_roi(phantom)
    stds, means = [], []
    for level in case.levels:
        r = case.recon(level, 0)[roi]
        stds.append(float(r.std()))
        means.append(float(r.mean()))
    print("ROI std per level", dict(zip(case.meta["levels"], np.round(stds, 4).tolist())),
          "means", np.round(means, 4).tolist())
    assert stds[0] < stds[1] < stds[2]
    # Poisson noise: std grows roughly like 1 / sqrt(level); at least a factor 2 for 10x fewer counts
    assert stds[1] > 2 * stds[0]
    for mean in means:  # thinning keeps the means (MLEM stays nearly unbiased in a large uniform region)
        assert mean == pytest.approx(1.0, rel=0.05)


def test_thinned_counts(case: SimulatedCase) -> None:
    counts = case.meta["counts"]
    for k in range(2):
        full = counts["1"][k]
        assert full["expected_prompts"] == pytest.approx(SIM["full_counts"], rel=1e-5)
        # drawn prompts: Poisson around the expectation (5 sigma)
        assert abs(full["prompts"] - full["expected_prompts"]) < 5 * math.sqrt(full["expected_prompts"])
        assert full["expected_randoms"] == pytest.approx(0.2 * full["expected_trues"], rel=1e-4)
        assert full["expected_scatter"] == pytest.approx(0.3 * full["expected_trues"], rel=1e-4)
        for name, level in (("0.1", 0.1), ("0.02", 0.02)):
            low = counts[name][k]
            assert low["expected_prompts"] == pytest.approx(level * full["expected_prompts"], rel=1e-5)
            # binomial thinning of the drawn full-count prompts: mean p N, variance p (1 - p) N
            sd = math.sqrt(level * (1 - level) * full["prompts"])
            assert abs(low["prompts"] - level * full["prompts"]) < 5 * sd


def test_realizations_are_independent(case: SimulatedCase) -> None:
    a, b = case.recon(0.1, 0), case.recon(0.1, 1)
    assert not np.array_equal(a, b)
    assert case.meta["counts"]["1"][0]["prompts"] != case.meta["counts"]["1"][1]["prompts"]


def test_same_seed_same_result_other_seed_differs(phantom: DiskPhantom) -> None:
    kw = dict(SIM, iterations=5)
    a = simulate_case(phantom, count_levels=(1.0, 0.1), seed=11, **kw)
    b = simulate_case(phantom, count_levels=(1.0, 0.1), seed=11, **kw)
    c = simulate_case(phantom, count_levels=(1.0, 0.1), seed=12, **kw)
    for level in (1.0, 0.1):
        np.testing.assert_array_equal(a.recon(level), b.recon(level))
        assert not np.array_equal(a.recon(level), c.recon(level))


def test_osem_and_post_filter(phantom: DiskPhantom) -> None:
    roi = uniform_roi(phantom)
    kw = dict(SIM, iterations=10)
    osem = simulate_case(phantom, count_levels=(0.1,), seed=5, subsets=6, **kw)
    assert osem.meta["parameters"]["algorithm"] == "OSEM 6 subsets"
    assert float(osem.recon(0.1)[roi].mean()) == pytest.approx(1.0, rel=0.05)
    plain = simulate_case(phantom, count_levels=(0.1,), seed=5, **kw)
    smooth = simulate_case(phantom, count_levels=(0.1,), seed=5, post_filter_fwhm_mm=8.0, **kw)
    assert smooth.meta["parameters"]["post_filter_fwhm_mm"] == 8.0
    assert float(smooth.recon(0.1)[roi].std()) < 0.7 * float(plain.recon(0.1)[roi].std())
    assert float(smooth.recon(0.1).sum()) == pytest.approx(float(plain.recon(0.1).sum()), rel=1e-3)


def test_non_square_slices_and_ct_prior() -> None:
    ph = disk_phantom((4, 40, 56), prior="ct")
    ph.activity = np.ascontiguousarray(ph.activity)
    c = simulate_case(ph, count_levels=(1.0,), seed=0, **dict(SIM, iterations=20, full_counts=4e6))
    assert c.recon(1.0).shape == (4, 40, 56)
    assert c.prior_kind == "ct"
    roi = uniform_roi(ph)
    assert float(c.recon(1.0)[roi].mean()) == pytest.approx(1.0, rel=0.05)


def test_invalid_input_is_refused(phantom: DiskPhantom) -> None:
    kw = dict(SIM, iterations=1)
    with pytest.raises(SimulationError, match="in \\(0, 1\\]"):
        simulate_case(phantom, count_levels=(1.0, 1.5), seed=0, **kw)
    with pytest.raises(SimulationError, match="twice"):
        simulate_case(phantom, count_levels=(0.1, 0.1), seed=0, **kw)
    with pytest.raises(SimulationError, match="realizations"):
        simulate_case(phantom, realizations=0, seed=0, **kw)
    with pytest.raises(SimulationError, match="full_counts"):
        simulate_case(phantom, seed=0, **dict(kw, full_counts=0))
    bad = disk_phantom((2, 16, 16))
    bad.voxel_mm = (4.0, 4.0, 3.0)
    with pytest.raises(SimulationError, match="square pixels"):
        simulate_case(bad, seed=0, **kw)
    bad = disk_phantom((2, 16, 16))
    bad.mu_map = bad.mu_map[:1]
    with pytest.raises(SimulationError, match="mu_map"):
        simulate_case(bad, seed=0, **kw)
    with pytest.raises(SimulationError, match="device"):
        simulate_case(phantom, seed=0, device="gpu0", **kw)


def test_levels_parsing_and_names() -> None:
    assert parse_levels("1, 0.1,0.02") == (1.0, 0.1, 0.02)
    assert [format_level(v) for v in (1.0, 0.1, 0.005, 0.5)] == ["1", "0.1", "0.005", "0.5"]
    for text, message in (("1,x", "not a number"), ("0", "in \\(0, 1\\]"), ("0.1,0.10", "twice"), ("", "no count")):
        with pytest.raises(ValueError, match=message):
            parse_levels(text)


def test_presets() -> None:
    for phantom in ("brain", "torso"):
        for size in ("ci", "full"):
            p = preset(phantom, size)
            assert set(p) == {"phantom", "simulation"}
            assert len(p["phantom"]["shape"]) == 3 and len(p["phantom"]["voxel_mm"]) == 3
            assert p["simulation"]["full_counts"] > 0 and p["simulation"]["iterations"] >= 1
    assert preset("brain", "ci")["phantom"]["shape"] == (24, 64, 64)
    p = preset("torso", "ci")
    p["simulation"]["iterations"] = 1  # callers get their own copy
    assert preset("torso", "ci")["simulation"]["iterations"] == 100
    with pytest.raises(SimulationError, match="sizes"):
        preset("brain", "huge")


def test_save_load_round_trip(case: SimulatedCase, tmp_path: Path) -> None:
    out = save_case(case, tmp_path / "case")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["truth.npy", "mu.npy", "prior.npy", "labels.npy", "meta.json"]
                           + [f"recon_L{lv}_r{k}.npy" for lv in ("1", "0.1", "0.02") for k in (0, 1)])
    back = load_case(out)
    assert back.levels == case.levels and back.realizations == 2
    for level in case.levels:
        for k in range(2):
            np.testing.assert_array_equal(back.recon(level, k), case.recon(level, k))
    np.testing.assert_array_equal(back.truth, case.truth)
    np.testing.assert_array_equal(back.mu, case.mu)
    np.testing.assert_array_equal(back.prior, case.prior)  # type: ignore[arg-type]
    np.testing.assert_array_equal(back.labels, case.labels)  # type: ignore[arg-type]
    assert back.spacing == case.spacing and back.prior_kind == "mr"
    assert back.meta["counts"] == case.meta["counts"]
    with pytest.raises(SimulationError, match="meta.json"):
        load_case(tmp_path)
    (out / "recon_L0.1_r1.npy").unlink()
    with pytest.raises(SimulationError, match="recon_L0.1_r1.npy"):
        load_case(out)


def test_dicom_export(tmp_path: Path) -> None:
    from dicom_node.series import load_pet_series

    ph = disk_phantom((6, 32, 32), voxel=5.0, prior="mr")
    ph.suv_per_unit = 2.0  # type: ignore[attr-defined] - the phantom's documented scale: 1 unit = SUV 2
    case = simulate_case(ph, count_levels=(1.0, 0.1), seed=1, **dict(SIM, iterations=10, full_counts=6e6))
    out = save_case(case, tmp_path / "case", dicom=True)
    meta = json.loads((out / "meta.json").read_text())
    folders = sorted(p.name for p in (out / "dicom").iterdir())
    assert folders == ["MR", "PET_L0.1_r0", "PET_L1_r0"]
    assert sorted(meta["dicom"]["series"]) == folders
    scale = activity_scale(2.0)
    # SUVbw = Bq/ml * weight / (dose decayed to the series start): 60 min of F-18 decay
    expected_factor = 75000.0 / (3.7e8 * 2 ** (-3600 / 6586.2))
    assert scale["bqml_per_unit"] == pytest.approx(2.0 / expected_factor)
    study_uids, for_uids, descriptions = set(), set(), []
    for level in ("1", "0.1"):
        files = sorted((out / "dicom" / f"PET_L{level}_r0").iterdir())
        vol = load_pet_series(files)
        assert vol.spacing == pytest.approx((5.0, 5.0, 5.0))
        assert vol.units == "BQML" and vol.is_quantitative
        assert vol.suv_factor == pytest.approx(expected_factor, rel=1e-6)
        suv = vol.array * vol.suv_factor
        recon = case.recon(float(level))
        # SUV read from DICOM = phantom units x suv_per_unit, within int16 quantisation of each slice
        tol = 2.0 * np.abs(recon).max(axis=(1, 2), keepdims=True) / 32767 + 1e-6
        assert (np.abs(suv - 2.0 * recon) <= tol).all()
        study_uids.add(vol.study_uid)
        for_uids.add(vol.frame_of_reference_uid)
        descriptions.append(vol.headers[0].SeriesDescription)
        assert vol.headers[0].ReconstructionMethod == "MLEM 10i"
        errors, warnings = run_dciodvfy(files[0])
        print(f"dciodvfy PET_L{level}_r0: warnings {warnings}")
        assert errors == []
    assert descriptions == ["SIM disk PET 100% counts r0 MLEM10", "SIM disk PET 10% counts r0 MLEM10"]
    import pydicom

    mr_files = sorted((out / "dicom" / "MR").iterdir())
    assert len(mr_files) == 6
    mr = pydicom.dcmread(mr_files[0])
    study_uids.add(mr.StudyInstanceUID)
    for_uids.add(mr.FrameOfReferenceUID)
    assert len(study_uids) == 1 and len(for_uids) == 1  # one study, one frame of reference
    errors, warnings = run_dciodvfy(mr_files[0])
    print(f"dciodvfy MR: warnings {warnings}")
    assert errors == []


@pytest.mark.gpu
def test_cuda_simulation_matches_cpu_statistically(phantom: DiskPhantom) -> None:
    """CUDA and CPU random streams differ, so compare means and noise, not voxels."""
    kw = dict(SIM, iterations=30)
    cpu = simulate_case(phantom, count_levels=(1.0, 0.1), seed=4, device="cpu", **kw)
    gpu = simulate_case(phantom, count_levels=(1.0, 0.1), seed=4, device="cuda", **kw)
    assert gpu.meta["parameters"]["device"].startswith("cuda")
    roi = uniform_roi(phantom)
    for level in (1.0, 0.1):
        a, b = cpu.recon(level)[roi], gpu.recon(level)[roi]
        assert float(b.mean()) == pytest.approx(float(a.mean()), rel=0.03)
        assert float(b.std()) == pytest.approx(float(a.std()), rel=0.2)


def test_kept_iterates(phantom: DiskPhantom, tmp_path: Path) -> None:
    kw = dict(SIM, iterations=12)
    case = simulate_case(phantom, count_levels=(1.0, 0.1), realizations=2, seed=8, keep_iterations=(3, 12), **kw)
    assert sorted(case.iterates[0.1]) == [3, 12] and len(case.iterates[0.1][3]) == 2
    np.testing.assert_array_equal(case.iterates[0.1][12][1], case.recon(0.1, 1))
    short = simulate_case(phantom, count_levels=(1.0, 0.1), realizations=2, seed=8, **dict(kw, iterations=3))
    np.testing.assert_array_equal(case.iterates[0.1][3][1], short.recon(0.1, 1))  # the same data, stopped early
    roi = uniform_roi(phantom)
    assert float(case.iterates[0.1][3][0][roi].std()) < float(case.recon(0.1, 0)[roi].std())
    back = load_case(save_case(case, tmp_path / "c"))
    np.testing.assert_array_equal(back.iterates[1.0][3][0], case.iterates[1.0][3][0])
    assert (tmp_path / "c" / "recon_L0.1_r1_it3.npy").is_file()
    with pytest.raises(SimulationError, match="keep_iterations"):
        simulate_case(phantom, seed=0, keep_iterations=(13,), **kw)


def test_noiseless_reconstruction(phantom: DiskPhantom, tmp_path: Path) -> None:
    """The reconstruction of the expected prompts: the same for every seed (no counting noise in it), near the
    full-count images' mean, far smoother than any of them; saved and loaded with the case, absent unless asked."""
    kw = dict(SIM, iterations=20)
    case = simulate_case(phantom, count_levels=(1.0, 0.1), realizations=2, seed=11, noiseless=True, **kw)
    other = simulate_case(phantom, count_levels=(1.0,), realizations=1, seed=12, noiseless=True, **kw)
    assert case.noiseless is not None and other.noiseless is not None
    assert case.noiseless.shape == phantom.activity.shape and case.noiseless.dtype == np.float32
    assert np.isfinite(case.noiseless).all() and (case.noiseless >= 0).all()
    np.testing.assert_allclose(other.noiseless, case.noiseless, rtol=1e-4, atol=1e-5)  # the seed draws only noise
    assert not np.allclose(other.recon(1.0), case.recon(1.0), rtol=1e-3)
    roi = uniform_roi(phantom)
    full = [case.recon(1.0, k)[roi] for k in range(2)]
    assert float(case.noiseless[roi].mean()) == pytest.approx(float(np.mean(full)), rel=0.02)
    assert float(case.noiseless[roi].std()) < 0.5 * min(float(f.std()) for f in full)
    assert case.meta["parameters"]["noiseless"] is True
    back = load_case(save_case(case, tmp_path / "c"))
    np.testing.assert_array_equal(back.noiseless, case.noiseless)
    plain = simulate_case(phantom, count_levels=(1.0,), seed=11, **kw)
    assert plain.noiseless is None and load_case(save_case(plain, tmp_path / "p")).noiseless is None
    assert not (tmp_path / "p" / "recon_noiseless.npy").exists()


# ------------------------------------------------------------------------------ with training.phantoms, and the CLI


def test_cli_simulate_brain_ci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main
    from dicom_node.series import load_pet_series

    out = tmp_path / "brain"
    rc = main(["simulate", "brain", "--size", "ci", "--count-levels", "1,0.1", "--realizations", "1",
               "--iterations", "20", "--seed", "3", "--out", str(out), "--dicom", "--no-progress", "--device", "cpu",
               "--threads", "1"])
    captured = capsys.readouterr()
    print(captured.out)
    assert rc == 0, captured.err
    assert f"saved to {out}" in captured.out and "0.1" in captured.out and "DICOM: 3 series" in captured.out
    case = load_case(out)
    assert case.truth.shape == (24, 64, 64) and case.spacing == (3.0, 3.0, 3.0)
    assert case.prior_kind == "mr" and case.meta["phantom"]["kind"] == "brain"
    assert case.meta["phantom"]["legend"]["white_matter"] == 3
    # training.phantoms activity is kBq/ml: the DICOM export writes Bq/ml, and SUV comes back as the phantom's
    assert case.meta["activity"]["bqml_per_unit"] == pytest.approx(1000.0, rel=1e-9)
    vol = load_pet_series(sorted((out / "dicom" / "PET_L1_r0").iterdir()))
    wm = case.labels == 3
    from training.phantoms import KBQ_PER_SUV

    suv_truth = float(case.truth[wm].mean()) / KBQ_PER_SUV
    assert suv_truth == pytest.approx(2.5, rel=1e-3)  # white matter SUV of the brain phantom
    suv = vol.array * vol.suv_factor
    np.testing.assert_allclose(suv, case.recon(1.0) / KBQ_PER_SUV, atol=1e-4 * float(suv.max()))
    # ML-EM keeps the total activity (noise and the edge slices aside): SUV x volume within a few %
    assert float(suv.sum()) == pytest.approx(float(case.truth.sum()) / KBQ_PER_SUV, rel=0.05)
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["MR", "PET_L0.1_r0", "PET_L1_r0"]


def test_cli_simulate_torso_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    out = tmp_path / "torso"
    rc = main(["simulate", "torso", "--count-levels", "0.2", "--iterations", "10", "--out", str(out),
               "--no-progress", "--subsets", "4", "--post-filter-fwhm-mm", "6", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    case = load_case(out)
    assert case.levels == [0.2] and case.prior_kind == "ct"
    assert case.meta["parameters"]["algorithm"] == "OSEM 4 subsets"
    assert len(case.meta["phantom"]["lesions"]) == 3  # the torso presets carry lesions (CRC needs them)
    assert main(["simulate", "torso", "--count-levels", "1,2", "--out", str(out)]) == 2
    assert "in (0, 1]" in capsys.readouterr().err
    assert main(["simulate", "liver", "--out", str(out)]) == 2
    rc = main(["simulate", "torso", "--iterations", "1", "--subsets", "1000", "--out", str(out), "--no-progress"])
    assert rc == 1 and "subsets" in capsys.readouterr().err


def test_threads_are_set_for_the_call_and_restored(phantom: DiskPhantom) -> None:
    import torch

    before = torch.get_num_threads()
    case = simulate_case(phantom, count_levels=(1.0,), seed=0, **dict(SIM, iterations=2, threads=1))
    assert case.meta["parameters"]["threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(SimulationError, match="threads"):
        simulate_case(phantom, seed=0, **dict(SIM, iterations=1, threads=0))
