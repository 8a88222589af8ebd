"""Paired volumes and 2.5-D slabs (training.datasets): simulation and DICOM readers, augmentation, normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from tests.training.test_simulate import SIM, disk_phantom
from training.datasets import (
    DatasetError,
    PairedVolume,
    SlabDataset,
    from_dicom_pair,
    from_simulation,
    normalise_prior,
    volume_scale,
)
from training.dicom_export import make_mr_series, make_pet_series, write_series
from training.simulate import save_case, simulate_case

# ----------------------------------------------------------------------------------------------- PairedVolume


def ramp_volume(shape: tuple[int, int, int] = (6, 16, 16)) -> np.ndarray:
    """Every voxel different: value = 10000 z + 100 y + x (so any slice, flip or transpose is recognisable)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (10000.0 * z + 100.0 * y + x).astype(np.float32)


def test_paired_volume_validates() -> None:
    a = np.ones((2, 4, 4))
    v = PairedVolume(a, a, spacing=(2, 3, 3), source="x")
    assert v.low.dtype == np.float32 and v.spacing == (2.0, 3.0, 3.0) and v.shape == (2, 4, 4)
    with pytest.raises(DatasetError, match="same"):
        PairedVolume(a, np.ones((2, 4, 5)), spacing=(1, 1, 1))
    with pytest.raises(DatasetError, match="finite"):
        PairedVolume(a, a * np.nan, spacing=(1, 1, 1))
    with pytest.raises(DatasetError, match="prior"):
        PairedVolume(a, a, np.ones((1, 4, 4)), spacing=(1, 1, 1))
    with pytest.raises(DatasetError, match="spacing"):
        PairedVolume(a, a, spacing=(1, 0, 1))
    with pytest.raises(TypeError):
        PairedVolume(a, a, None, (1, 1, 1))  # type: ignore[misc] - spacing is keyword-only


# ------------------------------------------------------------------------------------------------ simulations


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ph = disk_phantom((5, 32, 32), voxel=5.0)
    ph.suv_per_unit = 1.5  # type: ignore[attr-defined]
    case = simulate_case(ph, count_levels=(1.0, 0.2), realizations=2, seed=2,
                         **dict(SIM, iterations=8, full_counts=5e6))
    return save_case(case, tmp_path_factory.mktemp("sim") / "case")


def test_from_simulation(sim_dir: Path) -> None:
    pairs = from_simulation(sim_dir, 0.2)
    assert len(pairs) == 2
    for k, pair in enumerate(pairs):
        np.testing.assert_array_equal(pair.low, np.load(sim_dir / f"recon_L0.2_r{k}.npy"))
        np.testing.assert_array_equal(pair.full, np.load(sim_dir / f"recon_L1_r{k}.npy"))
        np.testing.assert_array_equal(pair.prior, np.load(sim_dir / "prior.npy"))  # type: ignore[arg-type]
        assert pair.prior_kind == "mr" and pair.spacing == (5.0, 5.0, 5.0) and pair.suv_factor == 1.5
        assert f"recon_L0.2_r{k}" in pair.source
    truth = from_simulation(sim_dir, 0.2, target="truth", realizations=[1])
    assert len(truth) == 1
    np.testing.assert_array_equal(truth[0].full, np.load(sim_dir / "truth.npy"))
    np.testing.assert_array_equal(truth[0].low, np.load(sim_dir / "recon_L0.2_r1.npy"))
    with pytest.raises(DatasetError, match="no count level 0.1"):
        from_simulation(sim_dir, 0.1)
    with pytest.raises(DatasetError, match="full-count level itself"):
        from_simulation(sim_dir, 1.0)
    with pytest.raises(DatasetError, match="realization 2"):
        from_simulation(sim_dir, 0.2, realizations=[2])
    with pytest.raises(DatasetError, match="meta.json"):
        from_simulation(sim_dir.parent, 0.2)


def test_from_simulation_without_full_level(tmp_path: Path) -> None:
    ph = disk_phantom((2, 16, 16))
    case = simulate_case(ph, count_levels=(0.5,), seed=0, **dict(SIM, iterations=2, full_counts=1e5))
    out = save_case(case, tmp_path / "c")
    with pytest.raises(DatasetError, match="no full-count level"):
        from_simulation(out, 0.5)
    assert len(from_simulation(out, 0.5, target="truth")) == 1
    with pytest.raises(DatasetError, match="--noiseless"):
        from_simulation(out, 0.5, target="noiseless")
    with pytest.raises(DatasetError, match="target must be"):
        from_simulation(out, 0.5, target="expected")  # type: ignore[arg-type]


def test_from_simulation_noiseless_target(tmp_path: Path) -> None:
    """target="noiseless": every realization's input paired with the one noise-free reconstruction; the
    full-count level may be an input too (no level 1 needed)."""
    ph = disk_phantom((2, 16, 16))
    case = simulate_case(ph, count_levels=(1.0, 0.5), realizations=2, seed=0, noiseless=True,
                         **dict(SIM, iterations=2, full_counts=1e5))
    out = save_case(case, tmp_path / "c")
    pairs = from_simulation(out, 0.5, target="noiseless")
    assert len(pairs) == 2
    for k, pair in enumerate(pairs):
        np.testing.assert_array_equal(pair.full, np.load(out / "recon_noiseless.npy"))
        np.testing.assert_array_equal(pair.low, np.load(out / f"recon_L0.5_r{k}.npy"))
    assert len(from_simulation(out, 1.0, target="noiseless")) == 2


# ------------------------------------------------------------------------------------------------ real DICOM


def write_pet(directory: Path, activity: np.ndarray, *, spacing: tuple[float, float, float] = (3.0, 4.0, 4.0),
              origin: tuple[float, float, float] | None = None, **kw: object) -> Path:
    write_series(make_pet_series(activity=activity, spacing=spacing, origin=origin, **kw), directory)  # type: ignore[arg-type]
    return directory


@pytest.fixture
def uids() -> dict[str, str]:
    return {"study_uid": generate_uid(), "for_uid": generate_uid()}


def test_dicom_pair_matches_slices_by_position(tmp_path: Path, uids: dict[str, str]) -> None:
    full = ramp_volume((10, 16, 16)) + 1.0
    low = full[2:8] * 0.9  # the low-count reconstruction covers slices 2..7 of the full-count one
    write_pet(tmp_path / "full", full, origin=(-30.0, -30.0, -100.0), **uids)
    write_pet(tmp_path / "low", low, origin=(-30.0, -30.0, -100.0 + 2 * 3.0), **uids)
    pair = from_dicom_pair(tmp_path / "low", tmp_path / "full")
    assert pair.shape == (6, 16, 16) and pair.spacing == pytest.approx((3.0, 4.0, 4.0))
    np.testing.assert_allclose(pair.full, full[2:8], rtol=1e-4)
    np.testing.assert_allclose(pair.low, low, rtol=1e-4)
    assert pair.suv_factor is not None and pair.suv_factor > 0
    # the other way round: a full-count series shorter than the low-count one
    pair = from_dicom_pair(tmp_path / "full", tmp_path / "low")
    np.testing.assert_allclose(pair.low, full[2:8], rtol=1e-4)


def test_dicom_pair_refuses_mismatches(tmp_path: Path, uids: dict[str, str]) -> None:
    vol = ramp_volume((4, 16, 16)) + 1.0
    write_pet(tmp_path / "full", vol, origin=(-30.0, -30.0, 0.0), **uids)
    cases = {
        "do not overlap": {"origin": (-30.0, -30.0, 100.0)},
        "offset along the normal": {"origin": (-30.0, -30.0, 1.5)},
        "pixel spacings differ": {"origin": (-30.0, -30.0, 0.0), "spacing": (3.0, 3.0, 3.0)},
        "slice spacings differ": {"origin": (-30.0, -30.0, 0.0), "spacing": (2.0, 4.0, 4.0)},
        "in-plane origins differ": {"origin": (-20.0, -30.0, 0.0)},
        "orientations differ": {"origin": (-30.0, -30.0, 0.0), "orientation": (0, 1, 0, 1, 0, 0)},
        "units differ": {"origin": (-30.0, -30.0, 0.0), "units": "PROPCNTS"},
    }
    for i, (message, kw) in enumerate(cases.items()):
        low = write_pet(tmp_path / f"low{i}", vol, **{**uids, **kw})  # type: ignore[arg-type]
        with pytest.raises(DatasetError, match=message):
            from_dicom_pair(low, tmp_path / "full")
    small = write_pet(tmp_path / "small", vol[:, :8, :8], origin=(-30.0, -30.0, 0.0), **uids)
    with pytest.raises(DatasetError, match="slice matrices differ"):
        from_dicom_pair(small, tmp_path / "full")
    with pytest.raises(DatasetError, match="same series"):
        from_dicom_pair(tmp_path / "full", tmp_path / "full")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no files"):
        from_dicom_pair(tmp_path / "empty", tmp_path / "full")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"not dicom")
    with pytest.raises(DatasetError, match="low-count series"):
        from_dicom_pair(tmp_path / "junk", tmp_path / "full")


def test_dicom_pair_resamples_the_prior(tmp_path: Path, uids: dict[str, str]) -> None:
    pet = np.ones((6, 16, 16), np.float32) * 1000
    write_pet(tmp_path / "full", pet, origin=(-30.0, -30.0, -7.5), **uids)
    write_pet(tmp_path / "low", pet * 0.5, origin=(-30.0, -30.0, -7.5), **uids)
    # MR on a finer grid (2 mm, 1.5 mm slices) covering the PET field, intensity a linear ramp in patient x, y, z
    shape, spacing, origin = (20, 40, 40), (1.5, 2.0, 2.0), (-40.0, -40.0, -14.25)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    x_mm = origin[0] + x * spacing[2]
    y_mm = origin[1] + y * spacing[1]
    z_mm = origin[2] + z * spacing[0]
    intensity = 1000.0 + 10.0 * x_mm + 5.0 * y_mm + 20.0 * z_mm
    write_series(make_mr_series(intensity=intensity, spacing=spacing, origin=origin, **uids), tmp_path / "mr")
    pair = from_dicom_pair(tmp_path / "low", tmp_path / "full", tmp_path / "mr")
    assert pair.prior_kind == "mr" and pair.prior is not None and pair.prior.shape == (6, 16, 16)
    pz, py, px = np.meshgrid(*(np.arange(n) for n in (6, 16, 16)), indexing="ij")
    expected = 1000.0 + 10.0 * (-30.0 + 4.0 * px) + 5.0 * (-30.0 + 4.0 * py) + 20.0 * (-7.5 + 3.0 * pz)
    np.testing.assert_allclose(pair.prior, expected, atol=1.0)  # linear interpolation of a ramp is exact (+ rounding)


# ----------------------------------------------------------------------------------------------- SlabDataset


def test_slab_shapes_and_channels() -> None:
    vol = ramp_volume()
    pair = PairedVolume(vol, vol + 1, vol * 0 + 7, spacing=(1, 1, 1))
    ds = SlabDataset([pair, pair], k=5, patch=None, flips=False, transposes=False, normalise="none")
    assert len(ds) == 12 and ds.in_channels == 10 and ds.use_prior
    x, y = ds[0]
    assert x.shape == (10, 16, 16) and y.shape == (1, 16, 16) and x.dtype == torch.float32
    # slice 0: neighbours below the volume repeat the end slice; prior channels follow the k PET channels
    np.testing.assert_array_equal(x[:5].numpy(), vol[[0, 0, 0, 1, 2]])
    np.testing.assert_array_equal(x[5:].numpy(), np.ones((5, 16, 16)))  # MR prior / its 99th percentile
    np.testing.assert_array_equal(y[0].numpy(), vol[0] + 1)
    x, y = ds[9]  # second volume, slice 3
    np.testing.assert_array_equal(x[:5].numpy(), vol[[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(y[0].numpy(), vol[3] + 1)
    x, _ = ds[-1]  # last slice
    np.testing.assert_array_equal(x[:5].numpy(), vol[[3, 4, 5, 5, 5]])
    with pytest.raises(IndexError):
        ds[12]
    no_prior = SlabDataset([pair], k=3, patch=(8, 12), transposes=False, use_prior=False)
    x, y = no_prior[2]
    assert no_prior.in_channels == 3
    assert x.shape == (3, 8, 12) and y.shape == (1, 8, 12)


def test_augmentation_is_paired_and_varies() -> None:
    vol = ramp_volume((4, 24, 24))
    pair = PairedVolume(vol, vol, spacing=(2, 2, 2))  # low == full: the centre input slice must equal the target
    ds = SlabDataset([pair], k=3, patch=(10, 10), normalise="none", seed=4)
    plans = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, y = ds[i]
            torch.testing.assert_close(x[1], y[0], rtol=0, atol=0)
            # neighbours got the same geometric transform: they differ from the centre by exactly +-10000 (one z)
            z = i
            dz = np.array([max(z - 1, 0) - z, 0, min(z + 1, 3) - z]) * 10000.0
            np.testing.assert_array_equal((x - y).numpy(), np.broadcast_to(dz[:, None, None], x.shape))
            plans.append(ds.sample_plan(i))
    # every augmentation occurs, and patches move around
    for key in ("flip_y", "flip_x", "transpose"):
        assert any(p[key] for p in plans) and not all(p[key] for p in plans)
    assert len({(p["y0"], p["x0"]) for p in plans}) > 10
    # the plan really is what was applied: undo it and find the source patch
    ds.set_epoch(0)
    for i in range(len(ds)):
        p = ds.sample_plan(i)
        _, y = ds[i]
        img = y[0].numpy()
        if p["transpose"]:
            img = img.T
        if p["flip_x"]:
            img = img[:, ::-1]
        if p["flip_y"]:
            img = img[::-1, :]
        np.testing.assert_array_equal(img, vol[i, p["y0"]:p["y0"] + 10, p["x0"]:p["x0"] + 10])


def test_deterministic_per_seed_and_epoch() -> None:
    rng = np.random.default_rng(0)
    low, full = rng.random((5, 20, 20)), rng.random((5, 20, 20))
    pair = PairedVolume(low, full, spacing=(1, 1, 1))
    a = SlabDataset([pair], k=3, patch=(8, 8), seed=1)
    b = SlabDataset([pair], k=3, patch=(8, 8), seed=1)
    c = SlabDataset([pair], k=3, patch=(8, 8), seed=2)
    same = [torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(5)]
    assert all(same)
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(5))
    before = [a[i][0].clone() for i in range(5)]
    a.set_epoch(1)
    assert not all(torch.equal(a[i][0], before[i]) for i in range(5))
    # works with a DataLoader (workers get copies; the same index gives the same sample)
    loader = torch.utils.data.DataLoader(b, batch_size=2, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 1, 8, 8)
    torch.testing.assert_close(x[1], b[1][0])


def test_normalisation() -> None:
    low = np.full((3, 8, 8), 4.0, np.float32)
    low[:, :2] = 0.0  # mean over the whole grid: 3.0
    pair = PairedVolume(low, low * 2, spacing=(1, 1, 1), suv_factor=0.5)
    assert volume_scale(pair, "mean") == pytest.approx(1 / 3.0)
    assert volume_scale(pair, "suv") == 0.5
    assert volume_scale(pair, "none") == 1.0
    for mode, scale in (("mean", 1 / 3.0), ("suv", 0.5), ("none", 1.0)):
        ds = SlabDataset([pair], k=1, patch=None, flips=False, transposes=False, normalise=mode)  # type: ignore[arg-type]
        x, y = ds[1]
        np.testing.assert_allclose(x[0].numpy(), low[1] * scale, rtol=1e-6)
        np.testing.assert_allclose(y[0].numpy(), low[1] * 2 * scale, rtol=1e-6)
    with pytest.raises(DatasetError, match="SUV factor"):
        SlabDataset([PairedVolume(low, low, spacing=(1, 1, 1))], normalise="suv", patch=None)
    with pytest.raises(DatasetError, match="positive mean"):
        SlabDataset([PairedVolume(low * 0, low, spacing=(1, 1, 1))], patch=None)
    with pytest.raises(DatasetError, match="normalise"):
        volume_scale(pair, "max")  # type: ignore[arg-type]
    ct = normalise_prior(np.array([-1000.0, 0.0, 1000.0, -1200.0]), "ct")
    np.testing.assert_allclose(ct, [0.0, 1.0, 2.0, 0.0])
    mr = normalise_prior(np.linspace(0, 100, 101), "mr")
    assert mr.max() == pytest.approx(100 / 99.0, rel=1e-3)


def test_slab_dataset_refuses_bad_arguments() -> None:
    a = np.ones((3, 8, 12), np.float32)
    pair = PairedVolume(a, a, spacing=(1, 1, 1))
    with pytest.raises(DatasetError, match="odd"):
        SlabDataset([pair], k=4, patch=None, transposes=False)
    with pytest.raises(DatasetError, match="does not fit"):
        SlabDataset([pair], patch=(16, 16))
    with pytest.raises(DatasetError, match="square"):
        SlabDataset([pair], patch=None)
    with pytest.raises(DatasetError, match="at least one"):
        SlabDataset([])
    with pytest.raises(DatasetError, match="samples_per_slice"):
        SlabDataset([pair], patch=(8, 8), samples_per_slice=0)
    two = SlabDataset([pair], patch=(8, 8), samples_per_slice=2)
    assert len(two) == 6
    assert [two._index[i] for i in (0, 3)] == [(0, 0), (0, 0)]  # items i and i + 3: the same centre slice
    assert any(two.sample_plan(i)["x0"] != two.sample_plan(i + 3)["x0"] for i in range(3))  # other patches
    with_prior = PairedVolume(a, a, a, spacing=(1, 1, 1))
    with pytest.raises(DatasetError, match="no prior"):
        SlabDataset([with_prior, pair], patch=(8, 8), use_prior=True)
    assert not SlabDataset([with_prior, pair], patch=(8, 8)).use_prior  # default: only when every volume has one


def test_level_input_adds_each_volumes_count_level_as_a_constant_channel() -> None:
    from denoisers.cnn import noise_index
    from denoisers.nets import level_feature

    rng = np.random.default_rng(5)
    mean = np.full((4, 16, 16), 500.0, np.float32)
    volumes = [PairedVolume((rng.poisson(mean / s) * s).astype(np.float32), mean, spacing=(2, 2, 2),
                            source=f"x{s}") for s in (1.0, 9.0)]
    data = SlabDataset(volumes, k=3, patch=(8, 8), level_input=True, seed=1)
    assert data.in_channels == 4
    assert data.noise_indices == [pytest.approx(noise_index(v.low)) for v in volumes]
    assert data.noise_indices[1] == pytest.approx(3 * data.noise_indices[0], rel=0.25)
    for index, vi in ((0, 0), (len(data) - 1, 1)):
        x, t = data[index]
        assert x.shape == (4, 8, 8) and t.shape == (1, 8, 8)
        np.testing.assert_allclose(x[-1].numpy(), level_feature(data.noise_indices[vi]), rtol=1e-6)
    assert SlabDataset(volumes, k=3, patch=(8, 8))[0][0].shape[0] == 3
    with pytest.raises(DatasetError, match="count level"):
        SlabDataset([PairedVolume(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)), spacing=(2, 2, 2))], k=3,
                    patch=None, level_input=True, normalise="none")


def test_pairs_csv_and_the_validation_block(tmp_path: Path) -> None:
    from training.datasets import read_pairs_csv, split_slices

    (tmp_path / "p.csv").write_text("low,full\na/low,a/full\n/abs/low,/abs/full\n")
    assert read_pairs_csv(tmp_path / "p.csv") == [(tmp_path / "a/low", tmp_path / "a/full", "train"),
                                                  (Path("/abs/low"), Path("/abs/full"), "train")]
    (tmp_path / "q.csv").write_text("low,other\nx,y\n")
    with pytest.raises(DatasetError, match="expected low, full"):
        read_pairs_csv(tmp_path / "q.csv")
    (tmp_path / "r.csv").write_text("low,full\nx,\n")
    with pytest.raises(DatasetError, match="line 2"):
        read_pairs_csv(tmp_path / "r.csv")
    v = PairedVolume(ramp_volume((10, 4, 4)), ramp_volume((10, 4, 4)) + 1, spacing=(2, 2, 2), source="v")
    train, val = split_slices(v, 0.2)
    assert train.shape[0] == 8 and val.shape[0] == 2
    np.testing.assert_array_equal(val.low, v.low[8:])
    with pytest.raises(DatasetError, match="too few"):
        split_slices(PairedVolume(np.ones((3, 4, 4)), np.ones((3, 4, 4)), spacing=(2, 2, 2)), 0.2)
