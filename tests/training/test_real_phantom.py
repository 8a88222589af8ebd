"""Real PET series as activity maps: other anatomy per seed, SUV scale, the held-out ACRIN study refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.phantoms import KBQ_PER_SUV, PhantomError
from training.real_phantom import real_pet_phantom
from training.simulate import simulate_case
from tests.factories import make_pet_series, write_series

SHAPE, VOXEL = (12, 48, 48), (6.0, 8.0, 8.0)


def test_a_real_series_becomes_varied_phantoms_on_the_suv_scale(realdata: Path) -> None:
    series = realdata / "mirp_tcia_sts_001_fdg_pet" / "PT_AC"
    a = real_pet_phantom(series, shape=SHAPE, voxel_mm=VOXEL, seed=1)
    again = real_pet_phantom(series, shape=SHAPE, voxel_mm=VOXEL, seed=1)
    b = real_pet_phantom(series, shape=SHAPE, voxel_mm=VOXEL, seed=2)
    assert a.activity.shape == SHAPE and a.voxel_mm == VOXEL and a.params["scale_from"] == "suv"
    np.testing.assert_array_equal(a.activity, again.activity)  # the seed fixes the transform
    assert not np.allclose(a.activity, b.activity)  # another seed, other anatomy
    body = a.mask("body")
    assert 0.05 < body.mean() < 0.8
    suv_in_body = float(np.mean(a.activity[body])) / KBQ_PER_SUV
    assert 0.2 < suv_in_body < 5.0  # soft tissue, organs and lesions of an FDG scan
    assert float(a.mu_map[body].min()) > 0 and float(a.mu_map[~body].max()) == 0
    case = simulate_case(a, count_levels=(1.0, 0.1), full_counts=12 * 1e6, seed=3, iterations=10, progress=False)
    assert case.recon(0.1).shape == SHAPE and np.isfinite(case.recon(0.1)).all()


def test_the_held_out_acrin_study_never_becomes_training_anatomy(realdata: Path) -> None:
    with pytest.raises(PhantomError, match="held-out ACRIN study"):
        real_pet_phantom(realdata / "ohif_acrin_nsclc_fdg_pet_042" / "PT_AC", shape=SHAPE, voxel_mm=VOXEL)


def test_series_without_suv_attributes_and_too_short_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    activity = rng.gamma(4.0, 1000.0, (30, 32, 32)).astype(np.float32)
    folder = tmp_path / "nosuv"
    write_series(make_pet_series(shape=(30, 32, 32), activity=activity, patient_weight=None, seed=5), folder)
    ph = real_pet_phantom(folder, shape=(8, 16, 16), voxel_mm=(6.0, 8.0, 8.0), seed=0, deform_mm=0.0)
    assert ph.params["scale_from"] == "median"
    with pytest.raises(PhantomError, match="covers 98 mm along z, the phantom needs 120 mm"):
        real_pet_phantom(folder, shape=(20, 16, 16), voxel_mm=(6.0, 8.0, 8.0))


@pytest.mark.slow
def test_simulate_real_from_the_command_line(realdata: Path, tmp_path: Path) -> None:
    from dicom_node.cli import main
    from training.datasets import from_simulation

    series = realdata / "mirp_tcia_sts_001_fdg_pet" / "PT_AC"
    assert main(["simulate", "real", "--out", str(tmp_path / "sim"), "--count-levels", "1,0.1", "--size", "ci",
                 "--iterations", "10", "--no-progress"]) == 1  # no --series
    assert main(["simulate", "real", "--series", str(series), "--out", str(tmp_path / "sim"), "--count-levels",
                 "1,0.1", "--size", "ci", "--iterations", "10", "--seed", "4", "--no-progress"]) == 0
    (pair,) = from_simulation(tmp_path / "sim", 0.1)
    assert pair.low.shape == (24, 64, 64) and pair.suv_factor is not None


def test_a_short_series_fits_the_grid_when_asked(realdata: Path) -> None:
    series = realdata / "mirp_tcia_sts_001_fdg_pet" / "PT_AC"  # 267 x 3.27 mm = 873 mm
    with pytest.raises(PhantomError, match="covers"):
        real_pet_phantom(series, shape=(100, 32, 32), voxel_mm=(10.0, 16.0, 16.0), seed=1)
    fitted = real_pet_phantom(series, shape=(100, 32, 32), voxel_mm=(10.0, 16.0, 16.0), seed=1, fit_z=True)
    assert fitted.activity.shape == (87, 32, 32) and fitted.mu_map.shape == (87, 32, 32)
