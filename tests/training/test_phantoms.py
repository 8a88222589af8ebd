from __future__ import annotations

import numpy as np
import pytest

from training import TrainingError
from training.phantoms import LEGEND, MU_BONE, MU_SOFT, Lesion, brain_phantom, torso_phantom

CI_BRAIN = dict(shape=(16, 48, 48), voxel_mm=(3.0, 3.0, 3.0))
CI_TORSO = dict(shape=(24, 48, 48), voxel_mm=(6.0, 6.0, 6.0))


@pytest.mark.parametrize("shape,voxel", [((16, 48, 48), (3.0, 3.0, 3.0)), ((10, 40, 36), (4.0, 3.0, 3.5))])
def test_brain_grid_and_ratio(shape, voxel):
    ph = brain_phantom(shape, voxel, seed=1, gm_wm_ratio=4.0)
    assert ph.activity.shape == ph.mu_map.shape == ph.labels.shape == ph.mr_t1.shape == shape
    assert ph.activity.dtype == np.float32 and ph.voxel_mm == voxel
    gm = ph.activity[ph.mask("grey_matter")].mean()
    wm = ph.activity[ph.mask("white_matter")].mean()
    assert gm / wm == pytest.approx(4.0, rel=0.05)
    assert ph.activity[ph.mask("csf", "skull")].max() <= 0.1 * wm  # CSF and skull near zero
    assert ph.activity[ph.mask("deep_nuclei")].mean() > gm  # hot structures for peak-to-valley


def test_brain_mu_map_and_mr_prior():
    ph = brain_phantom(**CI_BRAIN, seed=2)
    assert np.allclose(ph.mu_map[ph.mask("skull")], MU_BONE)
    assert np.allclose(ph.mu_map[ph.mask("grey_matter", "white_matter")], MU_SOFT)
    assert ph.mu_map[ph.labels == LEGEND["background"]].max() == 0.0
    # T1: white matter brighter than grey matter, as on a real T1.
    assert ph.mr_t1[ph.mask("white_matter")].mean() > ph.mr_t1[ph.mask("grey_matter")].mean()


def test_brain_lesion_size_contrast_and_mismatch():
    lesion = Lesion((0.0, 0.0, 20.0), diameter_mm=15.0, contrast=3.0)
    ph = brain_phantom(**CI_BRAIN, seed=3, lesions=[lesion], deform=False)
    voxels = np.count_nonzero(ph.mask("lesion"))
    expected = (4 / 3) * np.pi * 7.5**3 / np.prod(CI_BRAIN["voxel_mm"])
    assert voxels == pytest.approx(expected, rel=0.35)  # a 15 mm sphere on a 3 mm grid
    inside = ph.activity[ph.mask("lesion")]
    assert inside.min() > 1.5 * ph.activity[ph.mask("white_matter")].mean()
    assert np.allclose(ph.mr_t1[ph.mask("lesion")], 0.35)  # visible in MR
    mism = brain_phantom(**CI_BRAIN, seed=3, lesions=[lesion], deform=False, mismatch=True)
    assert not mism.lesions[0].present_in_mr
    assert not np.allclose(mism.mr_t1[mism.mask("lesion")], 0.35)  # absent from MR, present in PET


def test_brain_seeded_variety_and_determinism():
    a = brain_phantom(**CI_BRAIN, seed=5, random_lesions=1)
    b = brain_phantom(**CI_BRAIN, seed=5, random_lesions=1)
    c = brain_phantom(**CI_BRAIN, seed=6, random_lesions=1)
    assert np.array_equal(a.activity, b.activity) and a.lesions == b.lesions
    assert not np.array_equal(a.activity, c.activity)


def test_torso_organs_activities_and_lesions():
    ph = torso_phantom(**CI_TORSO, seed=1)
    present = {name for name, code in LEGEND.items() if np.any(ph.labels == code)}
    assert {"soft_tissue", "lung", "liver", "myocardium", "spine", "kidney", "bladder", "lesion"} <= present
    mean = {n: float(ph.activity[ph.mask(n)].mean()) for n in ("soft_tissue", "lung", "liver", "myocardium",
                                                                 "bladder")}
    assert mean["lung"] < mean["soft_tissue"] < mean["liver"] < mean["myocardium"] < mean["bladder"]
    assert {les.organ for les in ph.lesions} == {"lung", "liver"}
    assert all(10 <= les.diameter_mm <= 22 for les in ph.lesions)
    assert ph.ct_hu[ph.mask("lung")].max() < -500 and ph.ct_hu[ph.mask("spine")].min() > 300
    assert ph.mu_map[ph.mask("lung")].max() < ph.mu_map[ph.mask("liver")].min()


def test_torso_any_voxel_size_and_bad_lesion():
    big = torso_phantom((150, 64, 64), (4.0, 8.0, 8.0), seed=0)
    assert big.activity.shape == (150, 64, 64) and big.voxel_mm == (4.0, 8.0, 8.0)
    with pytest.raises(TrainingError, match="outside the volume"):
        torso_phantom(**CI_TORSO, lesions=[Lesion((5000.0, 0.0, 0.0), 12.0, 4.0)])
