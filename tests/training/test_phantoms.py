"""Phantoms: grids honoured, FDG ratios, anatomy where it belongs, lesions of the asked size, seeds, mismatch."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from tests.dicomtools import in_ci
from training import TrainingError, phantoms
from training.phantoms import (
    KBQ_PER_SUV,
    LABELS,
    LESION_LABEL_BASE,
    MU_BONE,
    MU_SOFT,
    TORSO_SUV,
    LesionSpec,
    PhantomError,
    brain_phantom,
    hu_to_mu,
    torso_phantom,
)

SMALL_BRAIN = {"shape": (24, 64, 64), "voxel_mm": 3.0}  # the CI slab through the basal ganglia
SMALL_TORSO = {"voxel_mm": 8.0}  # the whole trunk, 75 x 64 x 64


@pytest.fixture(autouse=True, scope="module")
def _templates() -> None:
    """The brain needs nilearn's MNI152 templates: skipped locally without nilearn, a failure in CI."""
    if importlib.util.find_spec("nilearn") is None:
        if in_ci():
            pytest.fail("nilearn is not installed: the brain phantom cannot be tested")
        pytest.skip("nilearn is not installed")


def sphere_volume(diameter_mm: float) -> float:
    return math.pi / 6.0 * diameter_mm**3


# ---------------------------------------------------------------------------------------------------- brain


@pytest.mark.parametrize(("shape", "voxel", "expected"), [
    (None, 4.0, (53, 64, 64)),  # BRAIN_FOV_MM 210 x 256 x 256 mm
    ((20, 40, 36), (3.0, 4.0, 3.5), (20, 40, 36)),
    ((12, 48, 48), (2.5, 3.0, 3.0), (12, 48, 48)),
])
def test_brain_grid_honoured(shape, voxel, expected) -> None:
    ph = brain_phantom(shape, voxel, seed=1)
    assert ph.kind == "brain" and ph.prior_kind == "mr" and ph.ct_hu is None
    assert ph.voxel_mm == ((float(voxel),) * 3 if isinstance(voxel, float) else voxel)
    for arr in (ph.activity, ph.mu_map, ph.mr_t1):
        assert arr.shape == expected and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert ph.labels.shape == expected and ph.labels.dtype == np.int16
    assert ph.activity.min() >= 0
    present = set(np.unique(ph.labels).tolist())
    assert present <= set(ph.legend.values())
    assert {LABELS["grey_matter"], LABELS["white_matter"], LABELS["skull"]} <= present


@pytest.mark.parametrize(("ratio", "texture"), [(4.0, 0.0), (2.5, 0.0), (4.0, 0.15)])
def test_brain_grey_white_ratio(ratio: float, texture: float) -> None:
    ph = brain_phantom(**SMALL_BRAIN, seed=2, gm_wm_ratio=ratio, texture=texture)
    gm = ph.activity[ph.mask("grey_matter")].mean()
    wm = ph.activity[ph.mask("white_matter")].mean()
    assert gm / wm == pytest.approx(ratio, rel=0.05)
    # White matter is 2.5 SUV: activity is kBq/ml at KBQ_PER_SUV.
    assert wm * ph.suv_per_unit == pytest.approx(2.5, rel=0.01) and ph.suv_per_unit == 1.0 / KBQ_PER_SUV
    if texture:
        assert ph.activity[ph.mask("white_matter")].std() / wm > 0.05  # texture there, region means kept


def test_brain_ratio_range_is_drawn_per_seed() -> None:
    drawn = [brain_phantom(**SMALL_BRAIN, seed=s, gm_wm_ratio=(3.0, 5.0), deform=False) for s in (0, 1, 2)]
    ratios = [ph.params["gm_wm_ratio"] for ph in drawn]
    assert all(3.0 <= r <= 5.0 for r in ratios) and len(set(ratios)) == 3
    for ph, r in zip(drawn, ratios):
        assert (ph.activity[ph.mask("grey_matter")].mean() / ph.activity[ph.mask("white_matter")].mean()
                == pytest.approx(r, rel=1e-5))


def test_brain_cold_and_hot_structures() -> None:
    ph = brain_phantom(**SMALL_BRAIN, seed=3)
    gm = ph.activity[ph.mask("grey_matter")].mean()
    assert ph.activity[ph.mask("csf", "skull")].max() <= 0.02 * gm  # CSF and skull near zero
    assert ph.activity[ph.labels == 0].max() == 0.0
    for name in ("caudate", "putamen", "thalamus", "colliculus"):
        assert ph.mask(name).any(), name
    assert ph.activity[ph.mask("hot_nuclei")].min() > gm  # hot spots for peak-to-valley
    assert ph.mask("deep_nuclei").sum() > 300  # about 23 ml of deep grey matter at 3 mm (27 mm^3 voxels)


def test_brain_orientation_is_lps() -> None:
    """Anterior at low y index, superior at high z (DICOM LPS, identity orientation), nuclei at their MNI places.

    The MNI 2009a template is left-right symmetric, so x is checked only for the putamen's distance from the
    midline (lesions are placed in the volume's own frame, where x is patient left by definition).
    """
    ph = brain_phantom((40, 80, 80), 2.0, seed=0, deform=False)

    def centroid_mm(mask: np.ndarray) -> np.ndarray:
        return (np.argwhere(mask).mean(axis=0) - (np.array(ph.shape) - 1) / 2) * np.array(ph.voxel_mm)

    putamen = ph.mask("putamen")
    x_mm = (np.arange(ph.shape[2]) - (ph.shape[2] - 1) / 2) * ph.voxel_mm[2]
    assert centroid_mm(putamen & (x_mm < 0)[None, None, :])[2] == pytest.approx(-25.0, abs=4.0)
    assert centroid_mm(putamen & (x_mm > 0)[None, None, :])[2] == pytest.approx(25.0, abs=4.0)
    # Caudate (MNI y 10) anterior of the thalamus (y -18): smaller LPS y. Colliculi (z -10) below the caudate.
    assert centroid_mm(ph.mask("caudate"))[1] + 15 < centroid_mm(ph.mask("thalamus"))[1]
    assert centroid_mm(ph.mask("colliculus"))[0] + 12 < centroid_mm(ph.mask("caudate"))[0]
    # The volume centre is MNI (0, -18, 10): the thalamus (MNI y -18, z 7) sits about there.
    assert centroid_mm(ph.mask("thalamus"))[:2] == pytest.approx([-3.0, 0.0], abs=4.0)


def test_brain_mu_map_and_t1() -> None:
    ph = brain_phantom(**SMALL_BRAIN, seed=4)
    assert set(np.unique(ph.mu_map).tolist()) <= {0.0, np.float32(MU_SOFT), np.float32(MU_BONE)}
    assert 0.0150 <= MU_BONE <= 0.0172 and MU_SOFT == pytest.approx(0.0096)
    assert np.allclose(ph.mu_map[ph.mask("skull")], MU_BONE)
    assert np.allclose(ph.mu_map[ph.mask("intracranial")], MU_SOFT)
    assert np.array_equal(ph.mu_map > 0, ph.mask("body"))
    t1 = {n: ph.mr_t1[ph.mask(n)].mean() for n in ("white_matter", "grey_matter", "csf", "skull")}
    assert t1["white_matter"] > t1["grey_matter"] > t1["csf"] and t1["skull"] < 0.1  # as on a T1


def test_brain_lesion_where_asked_with_the_right_size() -> None:
    spec = LesionSpec(diameter_mm=16.0, contrast=3.0, centre_mm=(4.0, 20.0, -30.0))
    plain = brain_phantom((24, 64, 64), 2.0, seed=5)
    ph = brain_phantom((24, 64, 64), 2.0, seed=5, lesions=[spec])
    (les,) = ph.lesions
    mask = ph.lesion_mask(0)
    assert les.label == LESION_LABEL_BASE and np.array_equal(mask, ph.mask("lesions"))
    assert les.centre_mm == spec.centre_mm and les.present_in_prior and les.present_in_mr
    assert les.n_voxels == mask.sum()
    assert mask.sum() * 8.0 == pytest.approx(sphere_volume(16.0), rel=0.1)
    assert np.allclose(np.argwhere(mask).mean(axis=0), ph.index_of(spec.centre_mm), atol=0.5)
    host = plain.labels[tuple(np.round(ph.index_of(spec.centre_mm)).astype(int))]
    assert LABELS[les.region] == host
    host_activity = plain.activity[plain.labels == host].mean()
    assert np.allclose(ph.activity[mask], 3.0 * host_activity, rtol=1e-5) and les.activity == pytest.approx(
        3.0 * host_activity, rel=1e-5)
    assert np.array_equal(ph.activity[~mask], plain.activity[~mask])  # nothing else changed
    assert np.allclose(ph.mr_t1[mask], 0.6 * plain.mr_t1[mask])  # hypointense on T1
    assert np.array_equal(ph.mu_map, plain.mu_map)  # a lesion does not change attenuation


def test_brain_random_lesions_inside_the_brain_and_apart() -> None:
    ph = brain_phantom((40, 80, 80), 2.5, seed=6, lesions=3)
    assert len(ph.lesions) == 3
    brain = brain_phantom((40, 80, 80), 2.5, seed=6).mask("brain")
    for i, les in enumerate(ph.lesions):
        m = ph.lesion_mask(i)
        assert 8.0 <= les.diameter_mm <= 20.0 and 1.5 <= les.contrast <= 4.0
        assert m.sum() * 2.5**3 == pytest.approx(sphere_volume(les.diameter_mm), rel=0.3)
        assert brain[m].mean() > 0.7  # (nearly) all in grey / white matter
    centres = [np.array(les.centre_mm) for les in ph.lesions]
    for i in range(3):
        for j in range(i + 1, 3):
            gap = np.linalg.norm(centres[i] - centres[j])
            assert gap > (ph.lesions[i].diameter_mm + ph.lesions[j].diameter_mm) / 2


def test_brain_determinism_and_variety() -> None:
    a = brain_phantom(**SMALL_BRAIN, seed=7, lesions=1)
    b = brain_phantom(**SMALL_BRAIN, seed=7, lesions=1)
    c = brain_phantom(**SMALL_BRAIN, seed=8, lesions=1)
    for name in ("activity", "mu_map", "labels", "mr_t1"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.lesions == b.lesions and a.params == b.params
    assert not np.array_equal(a.labels, c.labels) and a.lesions != c.lesions  # deformation and placement vary
    assert np.mean(a.labels != c.labels) > 0.02
    # Without deformation the anatomy is the template's, whatever the seed.
    assert np.array_equal(brain_phantom(**SMALL_BRAIN, seed=1, deform=False).labels,
                          brain_phantom(**SMALL_BRAIN, seed=2, deform=False).labels)


def test_same_seed_same_anatomy_with_or_without_lesions() -> None:
    plain = brain_phantom(**SMALL_BRAIN, seed=9)
    with_lesions = brain_phantom(**SMALL_BRAIN, seed=9, lesions=2)
    outside = ~with_lesions.mask("lesions")
    assert with_lesions.mask("lesions").any()
    assert np.array_equal(plain.labels[outside], with_lesions.labels[outside])


def test_mismatch_lesion_in_pet_not_in_mr() -> None:
    plain = brain_phantom(**SMALL_BRAIN, seed=10)
    ph = brain_phantom(**SMALL_BRAIN, seed=10, lesions=1, mismatch=True)
    (les,) = ph.lesions
    m = ph.lesion_mask(0)
    assert not les.present_in_prior and not les.present_in_mr
    assert np.array_equal(ph.mr_t1, plain.mr_t1)  # absent from MR ...
    assert ph.activity[m].mean() > 1.4 * plain.activity[m].mean()  # ... present in PET
    # mismatch with no lesion asked adds one; an explicit present_in_prior wins over mismatch.
    assert len(brain_phantom(**SMALL_BRAIN, seed=10, mismatch=True).lesions) == 1
    shown = brain_phantom(**SMALL_BRAIN, seed=10, mismatch=True,
                          lesions=[LesionSpec(12.0, 3.0, (0.0, 0.0, 30.0), present_in_prior=True)])
    assert shown.lesions[0].present_in_prior
    assert not np.array_equal(shown.mr_t1, plain.mr_t1)
    # The reverse mismatch: contrast 1 in PET (invisible), shown in MR.
    mr_only = brain_phantom(**SMALL_BRAIN, seed=10, lesions=[LesionSpec(12.0, 1.0, (0.0, 0.0, 30.0))])
    assert np.allclose(mr_only.activity, plain.activity) and not np.array_equal(mr_only.mr_t1, plain.mr_t1)


# ---------------------------------------------------------------------------------------------------- torso


def test_torso_grid_and_canonical_activities() -> None:
    ph = torso_phantom(**SMALL_TORSO, seed=0, variability=0.0, lesions=0)
    assert ph.shape == (75, 64, 64) and ph.voxel_mm == (8.0, 8.0, 8.0)
    assert ph.kind == "torso" and ph.prior_kind == "ct" and ph.mr_t1 is None
    assert ph.activity.dtype == ph.ct_hu.dtype == ph.mu_map.dtype == np.float32 and ph.labels.dtype == np.int16
    assert set(np.unique(ph.labels).tolist()) == set(ph.legend.values())  # every organ present
    suv = {n: ph.activity[ph.mask(n)].mean() * ph.suv_per_unit for n in TORSO_SUV if n != "background"}
    for name, value in suv.items():
        assert value == pytest.approx(TORSO_SUV[name], rel=1e-5), name
    # The contract's relative activities: background 1, liver 2.5, myocardium 4-8, kidneys 4, bladder 10-20,
    # lungs 0.3, bone 1.5.
    assert suv["liver"] / suv["soft_tissue"] == pytest.approx(2.5) and 4 <= suv["myocardium"] <= 8
    assert suv["kidney"] == pytest.approx(4.0) and 10 <= suv["bladder"] <= 20 and suv["lung"] == pytest.approx(0.3)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_torso_seeded_variety_stays_anatomical(seed: int) -> None:
    ph = torso_phantom(**SMALL_TORSO, seed=seed, lesions=0)
    suv = {n: ph.activity[ph.mask(n)].mean() * ph.suv_per_unit for n in ("soft_tissue", "liver", "myocardium",
                                                                         "bladder", "lung", "kidney")}
    assert 4 <= suv["myocardium"] <= 8 and 10 <= suv["bladder"] <= 20
    assert suv["lung"] < suv["soft_tissue"] < suv["liver"] < suv["kidney"] < suv["bladder"]
    assert suv["liver"] == pytest.approx(2.5, rel=0.3)
    volumes = {n: ph.mask(n).sum() * 512 / 1000 for n in ("lung", "liver", "kidney", "myocardium")}  # ml
    assert 2000 < volumes["lung"] < 7000 and 1000 < volumes["liver"] < 3500 and volumes["kidney"] > 150
    # Anatomy: lungs above the liver, bladder at the bottom, heart between the lungs.
    z = {n: np.argwhere(ph.mask(n))[:, 0].mean() for n in ("lung", "liver", "bladder", "myocardium")}
    assert z["bladder"] < z["liver"] < z["myocardium"] < z["lung"] + 10
    other = torso_phantom(**SMALL_TORSO, seed=seed + 100, lesions=0)
    assert not np.array_equal(ph.labels, other.labels)


def test_torso_ct_and_mu_map() -> None:
    ph = torso_phantom(voxel_mm=6.0, seed=4, lesions=0)
    assert np.allclose(ph.ct_hu[ph.mask("lung")], -800) and np.allclose(ph.ct_hu[ph.labels == 0], -1000)
    assert ph.ct_hu[ph.mask("bone")].min() >= 300 and ph.ct_hu[ph.mask("fat")].max() < 0
    mu = ph.mu_map
    assert mu.min() == 0.0 and mu.max() <= 0.0172 and np.array_equal(mu > 0, ph.mask("body"))
    assert 0.0150 <= mu[ph.mask("bone")].min() <= mu[ph.mask("bone")].max() <= 0.0172
    assert np.allclose(mu[ph.mask("soft_tissue")], 0.0096, rtol=0.05)
    assert mu[ph.mask("lung")].max() < 0.004
    assert np.allclose(hu_to_mu(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.0096, 0.0172])


def test_torso_random_lesions_in_lung_and_liver() -> None:
    ph = torso_phantom(voxel_mm=4.0, seed=5, lesions=6)
    plain = torso_phantom(voxel_mm=4.0, seed=5, lesions=0)
    assert len(ph.lesions) == 6
    for i, les in enumerate(ph.lesions):
        m = ph.lesion_mask(i)
        assert les.region in ("lung", "liver") and 10.0 <= les.diameter_mm <= 22.0
        assert m.sum() * 64 == pytest.approx(sphere_volume(les.diameter_mm), rel=0.35)
        host = plain.mask(les.region)
        assert host[m].mean() > 0.9  # the sphere sits in its organ
        suv = les.activity * ph.suv_per_unit
        if les.region == "lung":
            assert 2.0 <= suv <= 6.0
        else:
            assert 1.5 <= les.contrast <= 3.0
        assert np.allclose(ph.activity[m], les.activity)
        assert np.all(ph.ct_hu[m] != plain.ct_hu[m])  # visible on CT (nodule / hypodense)
    assert {les.region for les in ph.lesions} == {"lung", "liver"}


def test_torso_explicit_lesion_and_mismatch() -> None:
    grid = {"shape": (40, 160, 160), "voxel_mm": 2.0}  # an 80 mm slab at the diaphragm
    plain = torso_phantom(**grid, seed=6, lesions=0)
    spec = LesionSpec(20.0, 2.0, region="liver")
    ph = torso_phantom(**grid, seed=6, lesions=[spec], mismatch=True)
    (les,) = ph.lesions
    m = ph.lesion_mask(0)
    assert les.region == "liver" and not les.present_in_prior
    assert np.allclose(ph.activity[m], 2.0 * plain.activity[plain.mask("liver")].mean())
    assert np.array_equal(ph.ct_hu, plain.ct_hu) and np.array_equal(ph.mu_map, plain.mu_map)
    assert m.sum() * 8 == pytest.approx(sphere_volume(20.0), rel=0.05)
    assert np.allclose(np.argwhere(m).mean(axis=0), ph.index_of(les.centre_mm), atol=0.25)


def test_torso_short_field_of_view_shows_the_diaphragm() -> None:
    ph = torso_phantom((24, 64, 64), 6.0, seed=0)  # training.simulate's CI size: 144 mm axial
    for name in ("lung", "liver", "myocardium", "bone"):
        assert ph.mask(name).any(), name
    assert len(ph.lesions) == 4  # the default: the benchmarks' hot ROIs


# ------------------------------------------------------------------------------------------- errors, speed


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"voxel_mm": 0.0}, "voxel_mm"),
    ({"voxel_mm": (2.0, float("nan"), 2.0)}, "voxel_mm"),
    ({"shape": (0, 10, 10)}, "shape"),
    ({"shape": (10, 10)}, "shape"),
    ({"seed": -1}, "seed"),
    ({"lesions": [LesionSpec(12.0, 3.0, (1e4, 0.0, 0.0))]}, "outside"),
    ({"lesions": [LesionSpec(12.0, 3.0, region="lvier")]}, "did you mean 'liver'"),
    ({"lesions": [LesionSpec(-1.0)]}, "diameter_mm"),
    ({"activities": {"livr": 2.0}}, "did you mean 'liver'"),
    ({"variability": 2.0}, "variability"),
])
def test_torso_bad_arguments(kwargs, match) -> None:
    args = {"voxel_mm": 8.0, **kwargs}
    with pytest.raises(PhantomError, match=match) as info:
        torso_phantom(**args)
    assert isinstance(info.value, TrainingError) and isinstance(info.value, ValueError)


def test_brain_bad_arguments_and_masks() -> None:
    with pytest.raises(PhantomError, match="gm_wm_ratio"):
        brain_phantom(**SMALL_BRAIN, gm_wm_ratio=(5.0, 3.0))
    with pytest.raises(PhantomError, match="no room"):
        brain_phantom(**SMALL_BRAIN, lesions=[LesionSpec(12.0, region="lung")])
    ph = brain_phantom(**SMALL_BRAIN, seed=0, deform=False)
    with pytest.raises(PhantomError, match="did you mean 'white_matter'"):
        ph.mask("white_mater")
    with pytest.raises(PhantomError, match="out of range"):
        ph.lesion_mask(0)


def test_missing_nilearn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    phantoms._template_raw.cache_clear()
    phantoms._template_reduced.cache_clear()
    try:
        with pytest.raises(PhantomError, match="nilearn"):
            brain_phantom(**SMALL_BRAIN)
    finally:
        monkeypatch.undo()
        phantoms._template_raw.cache_clear()


def test_import_is_light_and_nilearn_never_imported() -> None:
    """Importing the module loads neither nibabel nor nilearn; a brain reads the wheel's files with nibabel only."""
    code = ("import sys; import training.phantoms as p; assert 'nibabel' not in sys.modules; "
            "p.brain_phantom((4, 16, 16), 8.0); assert 'nibabel' in sys.modules; "
            "assert not any(m == 'nilearn' or m.startswith('nilearn.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_small_sizes_are_deterministic_per_seed() -> None:
    """The small sizes the test suite uses: same seed, same phantom; another seed, another one.

    (Their speed is measured by the benchmarks, not asserted here: a wall-clock limit fails on a busy machine.)
    """
    for make, kwargs in ((brain_phantom, {**SMALL_BRAIN, "lesions": 2, "texture": 0.1}),
                         (torso_phantom, {"shape": (24, 64, 64), "voxel_mm": 6.0, "lesions": 4}),
                         (torso_phantom, SMALL_TORSO)):
        a, b, c = make(**kwargs, seed=11), make(**kwargs, seed=11), make(**kwargs, seed=12)
        assert np.array_equal(a.activity, b.activity), make.__name__
        assert not np.array_equal(a.activity, c.activity), make.__name__


def test_masks_and_legend() -> None:
    ph = torso_phantom(**SMALL_TORSO, seed=0, lesions=2)
    assert np.array_equal(ph.mask("body"), ph.labels != 0)
    assert np.array_equal(ph.mask("heart"), ph.mask("myocardium", "blood"))
    assert ph.legend["lesion_1"] == LESION_LABEL_BASE + 1 and ph.legend["liver"] == LABELS["liver"]
    assert not (ph.mask("liver") & ph.mask("lesions")).any()  # organ masks exclude their lesions
    assert ndimage.label(ph.lesion_mask(0))[1] == 1  # one connected sphere
