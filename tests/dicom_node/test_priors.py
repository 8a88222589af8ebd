"""MR and CT priors on the PET grid (dicom_node.priors): reading, resampling by Frame of Reference, rigid
registration of another Frame of Reference and its quality gate (synthetic phantoms; real PET/CT and MR when the
shared data are there)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid
from scipy import ndimage

from dicom_node.errors import PriorError
from dicom_node.priors import (
    PreparedPrior,
    PriorImage,
    QualityGate,
    Registration,
    RegistrationParams,
    pet_image,
    pet_reference,
    prepare_prior,
    read_prior_series,
    reference_grid,
    register_rigid,
    resample_onto,
    same_frame_of_reference,
)
from dicom_node.series import PetVolume, load_pet_series
from tests.factories import make_ct_series, make_mr_series, make_pet_series, write_series

# --- a brain-like phantom in patient coordinates (mm) -----------------------------------------------------------------

# (centre (x, y, z), radii, PET activity, T1 MR intensity), painted in order. The contrasts differ on purpose (white
# matter brighter than grey on T1 but with less uptake, bright scalp fat without uptake): no monotonic mapping links
# them, only mutual information does. Radii differ along every axis so that each rotation changes the image.
BRAIN = [
    ((0, 0, 0), (52, 66, 62), 1.0, 700.0),  # scalp
    ((0, 0, 2), (47, 61, 57), 0.3, 80.0),  # skull
    ((0, 2, 6), (42, 56, 50), 6.0, 450.0),  # grey matter
    ((0, 4, 12), (28, 40, 32), 3.0, 650.0),  # white matter
    ((-7, 0, 14), (4, 16, 8), 0.5, 120.0),  # ventricles
    ((7, 0, 14), (4, 16, 8), 0.5, 120.0),
    ((-20, -2, 2), (5, 12, 8), 7.0, 480.0),  # putamen
    ((20, -2, 2), (5, 12, 8), 7.0, 480.0),
    ((-21, -54, -22), (9, 9, 9), 1.5, 250.0),  # eyes (anterior is -y)
    ((21, -54, -22), (9, 9, 9), 1.5, 250.0),
    ((0, 38, -38), (30, 18, 13), 5.0, 500.0),  # cerebellum
]
LESION = ((18, -15, 20), (7, 7, 7), 14.0)  # on PET only
PET_SHAPE, PET_SPACING = (40, 40, 40), (4.0, 4.0, 4.0)
MR_SHAPE, MR_SPACING = (44, 48, 48), (3.5, 3.5, 3.5)
# The known motion from PET to MR coordinates: Euler angles (deg) about x, y, z and a translation (mm).
MOTION_DEG, MOTION_MM = (5.0, -3.0, 6.0), (9.0, -7.0, 6.0)


def centred_origin(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """ImagePositionPatient of the first slice of an axial grid centred on (0, 0, 0) (the factories' default)."""
    return tuple(-(n - 1) / 2 * d for n, d in zip(shape[::-1], spacing[::-1]))  # type: ignore[return-value]


def voxel_points(shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Patient coordinates (z, y, x, 3) of an axial grid's voxel centres."""
    z, y, x = np.meshgrid(*(np.arange(n) * d for n, d in zip(shape, spacing)), indexing="ij")
    return np.stack([x + origin[0], y + origin[1], z + origin[2]], axis=-1)


def paint(points: np.ndarray, which: int, lesion: bool = False) -> np.ndarray:
    """The phantom at ``points`` (which: 0 PET, 1 MR); edges 1 mm soft so grids sample it without aliasing."""
    items = [(c, r, values[which]) for c, r, *values in BRAIN] + ([LESION] if lesion else [])
    out = np.zeros(points.shape[:-1])
    for centre, radii, value in items:
        rr = np.sqrt((((points - np.asarray(centre, float)) / np.asarray(radii, float)) ** 2).sum(-1))
        inside = 1.0 / (1.0 + np.exp(np.clip((rr - 1.0) * min(radii), -50, 50)))
        out = out * (1 - inside) + value * inside
    return out


def brain_pet(noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Activity (Bq/ml) on the PET grid: blurred to about 6 mm FWHM, multiplicative noise."""
    points = voxel_points(PET_SHAPE, PET_SPACING, centred_origin(PET_SHAPE, PET_SPACING))
    activity = ndimage.gaussian_filter(paint(points, 0, lesion=True), 2.55 / np.asarray(PET_SPACING))
    return 5000.0 * activity * np.clip(np.random.default_rng(seed).normal(1.0, noise, activity.shape), 0, None)


def euler(angles_deg: Sequence[float], translation: Sequence[float]) -> sitk.Euler3DTransform:
    return sitk.Euler3DTransform((0.0, 0.0, 0.0), *np.radians(angles_deg), tuple(translation))


def moved_back(motion: sitk.Euler3DTransform, q: np.ndarray) -> np.ndarray:
    """The points p with motion(p) = q, for an (..., 3) array: R (p - c) + c + t = q."""
    matrix = np.asarray(motion.GetMatrix()).reshape(3, 3)
    centre, shift = np.asarray(motion.GetCenter()), np.asarray(motion.GetTranslation())
    return (q - centre - shift) @ matrix + centre  # row vectors: v @ R is R^T v


def brain_mr(motion: sitk.Euler3DTransform | None = None, seed: int = 1) -> np.ndarray:
    """T1-like intensities on the MR grid of an MR scanner that sees PET point p at ``motion(p)``."""
    q = voxel_points(MR_SHAPE, MR_SPACING, centred_origin(MR_SHAPE, MR_SPACING))
    mr = paint(q if motion is None else moved_back(motion, q), 1)
    return np.abs(mr + np.random.default_rng(seed).normal(0.0, 10.0, mr.shape))


def memory_prior(values: np.ndarray, spacing: Sequence[float] = MR_SPACING, kind: str = "mr",
                 for_uid: str = "1.2.826.0.1.3680043.10.1.99") -> PriorImage:
    """A prior straight from an array on an axial grid centred on the origin (no DICOM round trip)."""
    image = sitk.GetImageFromArray(np.asarray(values, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    image.SetOrigin(centred_origin(values.shape, spacing))
    return PriorImage(image, kind, generate_uid(), for_uid, "", "test")  # type: ignore[arg-type]


def point_errors(found: sitk.Transform, truth: sitk.Transform, centre: Sequence[float], half: float = 40.0
                 ) -> list[float]:
    """Distances between where the two transforms send the centre and the corners of a cube around it (mm)."""
    c = np.asarray(centre, dtype=float)
    points = [c] + [c + half * (2 * np.asarray(s) - 1) for s in np.ndindex(2, 2, 2)]
    return [float(np.linalg.norm(np.subtract(found.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p)))))
            for p in points]


def rotation_error_deg(found: sitk.Euler3DTransform, truth: sitk.Euler3DTransform) -> float:
    a = np.asarray(found.GetMatrix()).reshape(3, 3)
    b = np.asarray(truth.GetMatrix()).reshape(3, 3)
    return float(np.degrees(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1, 1))))


@pytest.fixture(scope="module")
def brain_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """PET, an MR in its Frame of Reference, and an MR moved by the known motion in another Frame of Reference."""
    root = tmp_path_factory.mktemp("brain")
    study, pet_for, mr_for = generate_uid(), generate_uid(), generate_uid()
    motion = euler(MOTION_DEG, MOTION_MM)
    pet_paths = write_series(make_pet_series(activity=brain_pet(), spacing=PET_SPACING, study_uid=study,
                                             for_uid=pet_for), root / "pet")
    write_series(make_mr_series(intensity=brain_mr(), spacing=MR_SPACING, study_uid=study, for_uid=pet_for),
                 root / "mr_same")
    write_series(make_mr_series(intensity=brain_mr(motion), spacing=MR_SPACING, study_uid=study, for_uid=mr_for),
                 root / "mr_moved")
    return {"root": root, "volume": load_pet_series(pet_paths), "motion": motion, "pet_for": pet_for,
            "mr_for": mr_for}


@pytest.fixture(scope="module")
def moved_mr(brain_study: dict[str, object]) -> PriorImage:
    return read_prior_series(sorted((brain_study["root"] / "mr_moved").iterdir()))  # type: ignore[operator]


@pytest.fixture(scope="module")
def registered(brain_study: dict[str, object], moved_mr: PriorImage) -> Registration:
    return register_rigid(brain_study["volume"], moved_mr)  # type: ignore[arg-type]


# --- reading ----------------------------------------------------------------------------------------------------------


def test_read_prior_series_sorts_shuffled_files_and_keeps_the_dicom_geometry(tmp_path: Path) -> None:
    # Sagittal slices (rows along +y, columns along -z, slices along their cross product -x): the direction matrix
    # must hold these axes.
    shape, spacing, origin = (6, 10, 12), (3.0, 2.0, 1.5), (-7.5, -11.0, 9.0)
    orientation = (0, 1, 0, 0, 0, -1)
    k, i, j = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")  # slice, row, column
    x = origin[0] - k * spacing[0]
    y = origin[1] + j * spacing[2]
    z = origin[2] - i * spacing[1]
    intensity = 1000.0 + 20.0 * x + 10.0 * y + 5.0 * z
    datasets = make_mr_series(intensity=intensity, spacing=spacing, orientation=orientation, origin=origin)
    paths = write_series(datasets, tmp_path / "ordered")
    renamed = []
    for n, path in enumerate(paths):  # the spool's names say nothing about order
        renamed.append(path.rename(tmp_path / f"{generate_uid()}_{n}"))
    random.Random(2).shuffle(renamed)

    prior = read_prior_series(renamed)

    assert prior.kind == "mr" and prior.shape == shape and prior.spacing == pytest.approx(spacing)
    assert prior.series_uid == datasets[0].SeriesInstanceUID
    assert prior.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert prior.study_uid == datasets[0].StudyInstanceUID and prior.description == "T1 MPRAGE"
    image = prior.image
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetOrigin() == pytest.approx(origin)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], [0, 1, 0], atol=1e-12)  # x index: along a row
    np.testing.assert_allclose(direction[:, 1], [0, 0, -1], atol=1e-12)  # y index: down a column
    np.testing.assert_allclose(direction[:, 2], [-1, 0, 0], atol=1e-12)  # z index: the slice normal
    for index in [(0, 0, 0), (11, 9, 5), (3, 7, 2)]:
        px, py, pz = image.TransformIndexToPhysicalPoint(index)
        assert image[index] == pytest.approx(1000.0 + 20.0 * px + 10.0 * py + 5.0 * pz, abs=0.5)


def test_ct_rescale_padding_and_values_below_air(tmp_path: Path) -> None:
    hu = np.full((3, 8, 8), 40.0)
    hu[:, 0, :] = -3024.0  # outside the reconstruction circle, as GE writes it
    hu[:, 1, :] = -1200.0
    hu[:, 2, :] = 1000.0
    datasets = make_ct_series(hu=hu, spacing=(2.5, 1.0, 1.0))
    for ds in datasets:
        ds.PixelPaddingValue = 1024 + 1000  # stored value of 1000 HU: padding wins over the rescale
    prior = read_prior_series(write_series(datasets, tmp_path))
    values = sitk.GetArrayFromImage(prior.image)
    assert prior.kind == "ct"
    np.testing.assert_array_equal(values[:, 0], -1000.0)
    np.testing.assert_array_equal(values[:, 1], -1000.0)
    np.testing.assert_array_equal(values[:, 2], -1000.0)
    np.testing.assert_array_equal(values[:, 3:], 40.0)


@pytest.mark.parametrize("problem, match", [
    ("pet", r"modality 'PT'.*MR or CT"),
    ("one slice", r"has 1 slice"),
    ("pixel spacing", r"not a regular 3-D volume: pixel spacing mismatch.*\[1\.5, 1\.5\].*\[2\.0, 2\.0\]"),
    ("orientation", r"not a regular 3-D volume: orientation mismatch"),
    ("gap", r"not a regular 3-D volume: not contiguous.*1 slice\(s\) missing"),
    ("two series", r"hold 2 series"),
    ("no files", r"no files"),
])
def test_refused_priors_say_why(tmp_path: Path, problem: str, match: str) -> None:
    mr = make_mr_series(shape=(5, 8, 8), spacing=(3.0, 2.0, 2.0))
    if problem == "pet":
        mr = make_pet_series(shape=(5, 8, 8))
    elif problem == "one slice":
        mr = mr[:1]
    elif problem == "pixel spacing":
        mr[2].PixelSpacing = [1.5, 1.5]
    elif problem == "orientation":
        mr[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    elif problem == "gap":
        del mr[2]
    elif problem == "two series":
        mr = mr + make_mr_series(shape=(2, 8, 8))
    paths = [] if problem == "no files" else write_series(mr, tmp_path)
    with pytest.raises(PriorError, match=match):
        read_prior_series(paths)


def test_series_uid_picks_one_series_from_a_mixed_folder(tmp_path: Path) -> None:
    mr = make_mr_series(shape=(4, 8, 8))
    write_series(mr, tmp_path)
    write_series(make_ct_series(shape=(3, 8, 8)), tmp_path)
    (tmp_path / "notes.txt").write_text("not DICOM")
    prior = read_prior_series(sorted(tmp_path.iterdir()), series_uid=mr[0].SeriesInstanceUID)
    assert prior.kind == "mr" and prior.shape == (4, 8, 8)
    with pytest.raises(PriorError, match="none of the 8 file"):
        read_prior_series(sorted(tmp_path.iterdir()), series_uid="1.2.3.4")


@pytest.mark.parametrize("a, b, same", [
    ("1.2.3", "1.2.3", True),
    ("1.2.3", "1.2.4", False),
    (None, None, False),
    ("", "", False),
    ("1.2.3", None, False),
    (None, "1.2.3", False),
    ("", "1.2.3", False),
    ("1.2.3 ", "1.2.3", True),  # DICOM pads UIDs to an even length
])
def test_same_frame_of_reference(a: str | None, b: str | None, same: bool) -> None:
    assert same_frame_of_reference(a, b) is same


# --- same Frame of Reference: resampling from the geometry ----------------------------------------------------------


def small_pet(tmp_path: Path, for_uid: str, study_uid: str) -> PetVolume:
    """10 slices of 24 x 24 at 4 mm, centred on the origin."""
    return load_pet_series(write_series(
        make_pet_series(shape=(10, 24, 24), spacing=(4.0, 4.0, 4.0), study_uid=study_uid, for_uid=for_uid),
        tmp_path / "pet"))


def test_same_frame_of_reference_puts_the_mr_on_the_right_pet_voxels(tmp_path: Path) -> None:
    study, for_uid = generate_uid(), generate_uid()
    volume = small_pet(tmp_path, for_uid, study)
    # MR on another grid: 2.5 mm pixels, 3 mm slices, more of them, origin offset from the PET's.
    shape, spacing, origin = (20, 44, 42), (3.0, 2.5, 2.5), (-52.0, -55.5, -27.0)
    points = voxel_points(shape, spacing, origin)
    ramp = 1000.0 + 4.0 * points[..., 0] - 3.0 * points[..., 1] + 6.0 * points[..., 2]
    # A bright block over PET voxels z 3-5, y 14-17, x 6-8 (PET voxel centres at -46 + 4 i mm, z: -18 + 4 k)
    block = ((points[..., 0] > -23) & (points[..., 0] < -13) & (points[..., 1] > 9) & (points[..., 1] < 23)
             & (points[..., 2] > -7) & (points[..., 2] < 5))
    write_series(make_mr_series(intensity=ramp, spacing=spacing, origin=origin, study_uid=study, for_uid=for_uid),
                 tmp_path / "ramp")
    write_series(make_mr_series(intensity=np.where(block, 3000.0, 100.0), spacing=spacing, origin=origin,
                                study_uid=study, for_uid=for_uid), tmp_path / "block")

    prepared = prepare_prior(volume, read_prior_series(sorted((tmp_path / "ramp").iterdir())))

    assert isinstance(prepared, PreparedPrior)
    assert prepared.method == "frame-of-reference" and prepared.registration is None and prepared.kind == "mr"
    assert prepared.array.shape == volume.shape and prepared.array.dtype == np.float32
    assert not prepared.array.flags.writeable
    assert prepared.field_of_view == 1.0
    pet_points = voxel_points(volume.shape, volume.spacing, volume.positions[0])
    expected = 1000.0 + 4.0 * pet_points[..., 0] - 3.0 * pet_points[..., 1] + 6.0 * pet_points[..., 2]
    np.testing.assert_allclose(prepared.array, expected, atol=0.6)  # linear interpolation of a ramp is exact

    block_prior = prepare_prior(volume, read_prior_series(sorted((tmp_path / "block").iterdir())))
    bright = np.argwhere(block_prior.array > 1550.0)
    assert bright.min(axis=0).tolist() == [3, 14, 6] and bright.max(axis=0).tolist() == [5, 17, 8]
    assert prepared.provenance() == {"kind": "mr", "series_uid": prepared.series_uid, "method": "frame-of-reference",
                                     "frame_of_reference_uid": for_uid, "field_of_view": 1.0}


def test_outside_the_prior_is_air_for_ct_and_dark_for_mr(tmp_path: Path) -> None:
    study, for_uid = generate_uid(), generate_uid()
    volume = small_pet(tmp_path, for_uid, study)
    # Both priors cover only the upper PET slices (z from 2 mm on) and x < 0.
    kwargs = dict(spacing=(2.0, 2.0, 2.0), origin=(-60.0, -60.0, 2.0), study_uid=study, for_uid=for_uid)
    ct = read_prior_series(write_series(make_ct_series(hu=np.full((12, 60, 30), 40.0), **kwargs), tmp_path / "ct"))
    mr = read_prior_series(write_series(make_mr_series(intensity=np.full((12, 60, 30), 500.0), **kwargs),
                                        tmp_path / "mr"))
    on_ct, on_mr = prepare_prior(volume, ct), prepare_prior(volume, mr)
    assert on_ct.kind == "ct" and on_ct.method == "frame-of-reference"
    # PET slices sit at z = -18 + 4 k: k <= 4 lie below the priors' first slice (z 2); columns x = -46 + 4 i: i >= 12
    # lie beyond their last column (x -2) by more than half a voxel.
    np.testing.assert_array_equal(on_ct.array[:5], -1000.0)
    np.testing.assert_array_equal(on_ct.array[:, :, 12:], -1000.0)
    np.testing.assert_array_equal(on_mr.array[:5], 0.0)
    np.testing.assert_array_equal(on_mr.array[:, :, 12:], 0.0)
    np.testing.assert_allclose(on_ct.array[5:, :, :12], 40.0, atol=1e-3)
    np.testing.assert_allclose(on_mr.array[5:, :, :12], 500.0, atol=1e-3)
    assert 0.2 < on_ct.field_of_view < 0.4


def test_disjoint_fields_of_view_are_refused(tmp_path: Path) -> None:
    study, for_uid = generate_uid(), generate_uid()
    volume = small_pet(tmp_path, for_uid, study)
    far = read_prior_series(write_series(make_mr_series(shape=(4, 8, 8), origin=(0.0, 0.0, 500.0), study_uid=study,
                                                        for_uid=for_uid), tmp_path / "mr"))
    with pytest.raises(PriorError, match="does not overlap"):
        prepare_prior(volume, far)


def test_registration_never_refuses_another_frame_of_reference(brain_study: dict[str, object],
                                                               moved_mr: PriorImage) -> None:
    with pytest.raises(PriorError, match=r"Frame of Reference.*registration is 'never'"):
        prepare_prior(brain_study["volume"], moved_mr, registration="never")  # type: ignore[arg-type]


def test_pet_reference_and_image_share_the_pet_geometry(brain_study: dict[str, object]) -> None:
    volume: PetVolume = brain_study["volume"]  # type: ignore[assignment]
    reference, image = pet_reference(volume), pet_image(volume)
    assert reference.GetSize() == image.GetSize() == volume.shape[::-1]
    assert reference.GetOrigin() == pytest.approx(volume.positions[0])
    assert reference.GetSpacing() == pytest.approx(volume.spacing[::-1])
    last = reference.TransformIndexToPhysicalPoint((0, 0, volume.shape[0] - 1))
    assert last == pytest.approx(volume.positions[-1])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.array)


# --- another Frame of Reference: rigid registration -------------------------------------------------------------------


def test_registration_recovers_a_known_rigid_motion(brain_study: dict[str, object], registered: Registration,
                                                    moved_mr: PriorImage) -> None:
    truth: sitk.Euler3DTransform = brain_study["motion"]  # type: ignore[assignment]
    assert registered.ok, registered.reason
    assert rotation_error_deg(registered.transform, truth) < 1.0
    errors = point_errors(registered.transform, truth, registered.center_mm)
    assert errors[0] < 1.0  # at the head's centre
    assert max(errors) < 1.5  # anywhere within 40 mm of it (the corners of an 80 mm cube)
    assert registered.rotation_deg == pytest.approx(np.degrees(np.arccos((np.trace(
        np.asarray(truth.GetMatrix()).reshape(3, 3)) - 1) / 2)), abs=1.0)
    assert registered.mi_ratio > registered.initial_mi_ratio
    # Resampled through the found transform the MR matches the unmoved phantom on the PET grid; without, it does not.
    volume: PetVolume = brain_study["volume"]  # type: ignore[assignment]
    truth_on_pet = paint(voxel_points(volume.shape, volume.spacing, volume.positions[0]), 1)
    aligned = resample_onto(moved_mr, pet_reference(volume), registered.transform)
    unaligned = resample_onto(moved_mr, pet_reference(volume))
    assert np.corrcoef(aligned.ravel(), truth_on_pet.ravel())[0, 1] > 0.98  # measured 0.997
    assert np.corrcoef(unaligned.ravel(), truth_on_pet.ravel())[0, 1] < 0.9  # measured 0.78


def test_prepare_prior_registers_another_frame_of_reference(brain_study: dict[str, object], moved_mr: PriorImage,
                                                            registered: Registration,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    volume: PetVolume = brain_study["volume"]  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="dicom_node.priors"):
        prepared = prepare_prior(volume, moved_mr)
    assert prepared.method == "rigid-registration" and prepared.kind == "mr"
    assert prepared.series_uid == moved_mr.series_uid
    assert prepared.frame_of_reference_uid == brain_study["mr_for"]
    assert prepared.array.shape == volume.shape and prepared.array.dtype == np.float32
    # Same inputs, same seed: the same transform as the registration run earlier, to the last digit kept.
    assert prepared.registration == registered.summary()
    np.testing.assert_array_equal(prepared.array, resample_onto(moved_mr, pet_reference(volume),
                                                                registered.transform))
    assert prepared.provenance()["registration"]["mi_ratio"] > 0.1
    line = next(r for r in caplog.records if "rigid registration" in r.getMessage())
    assert line.levelno == logging.INFO
    message = line.getMessage()
    assert volume.series_uid in message and moved_mr.series_uid in message and "MI ratio" in message
    assert "PETNODE" not in message  # no patient name or ID


def test_always_registers_even_in_the_same_frame_of_reference(brain_study: dict[str, object]) -> None:
    volume: PetVolume = brain_study["volume"]  # type: ignore[assignment]
    same = read_prior_series(sorted((brain_study["root"] / "mr_same").iterdir()))  # type: ignore[operator]
    assert prepare_prior(volume, same).method == "frame-of-reference"
    prepared = prepare_prior(volume, same, registration="always")
    assert prepared.method == "rigid-registration"
    summary = prepared.registration
    assert summary is not None
    assert summary["rotation_deg"] < 0.5 and np.linalg.norm(summary["translation_mm"]) < 0.5  # already aligned


def test_unrelated_priors_fail_the_quality_gate(brain_study: dict[str, object]) -> None:
    volume: PetVolume = brain_study["volume"]  # type: ignore[assignment]
    rng = np.random.default_rng(7)
    q = voxel_points(MR_SHAPE, MR_SPACING, centred_origin(MR_SHAPE, MR_SPACING))
    radius = np.sqrt((q**2).sum(-1))
    quick = RegistrationParams(iterations=60)  # the gate judges wherever the search stops; no need to search long
    # Noise: nothing in it explains the activity.
    noise = register_rigid(volume, memory_prior(rng.uniform(0.0, 1000.0, MR_SHAPE)), params=quick)
    assert not noise.ok and noise.mi_ratio < 0.03 and "min_mi_ratio" in noise.reason
    # A uniform ball larger than the head: it covers the activity, but its inside is featureless.
    ball = register_rigid(volume, memory_prior(np.where(radius < 75.0, 600.0, 0.0)), params=quick)
    assert not ball.ok and "min_mi_ratio" in ball.reason
    # A head half the size: the activity spills over its background.
    small = register_rigid(volume, memory_prior(np.where(radius < 35.0, 600.0, 0.0)), params=quick)
    assert not small.ok and small.coverage < 0.5 and "min_coverage" in small.reason
    # prepare_prior turns a refused registration into a PriorError naming the limit.
    with pytest.raises(PriorError, match=r"failed its quality gate: normalised mutual information .* below"):
        prepare_prior(volume, memory_prior(rng.uniform(0.0, 1000.0, MR_SHAPE)), params=quick)
    # The limits are parameters: with none, the same noise passes.
    lax = QualityGate(min_mi_ratio=0.0, min_coverage=0.0, min_overlap=0.0, max_rotation_deg=180.0, max_shift_mm=1e3)
    assert lax.problems(noise) == []


def test_gate_limits_on_motion_and_overlap(registered: Registration) -> None:
    gate = QualityGate()
    assert gate.problems(registered) == []
    assert "max_rotation_deg 30" in gate.problems(replace(registered, rotation_deg=40.0))[0]
    assert "max_shift_mm 100" in gate.problems(replace(registered, shift_mm=150.0))[0]
    assert "min_overlap 25%" in gate.problems(replace(registered, overlap=0.1))[0]
    assert len(QualityGate(min_mi_ratio=0.5, min_coverage=1.01).problems(registered)) == 2


def test_registration_params_are_checked() -> None:
    with pytest.raises(ValueError, match="one value per level"):
        RegistrationParams(shrink_factors=(4, 2, 1), smoothing_sigmas=(2.0, 1.0))
    with pytest.raises(ValueError, match="initializer"):
        RegistrationParams(initializer="centre")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relaxation"):
        RegistrationParams(relaxation=1.0)


def test_ct_prior_registers_onto_a_torso_pet() -> None:
    # A small torso: CT body 40 HU with lungs -800 HU and a bony spine, PET uptake in the body, more in the heart
    # and liver, little in the lungs; the CT is rotated and shifted (another Frame of Reference).
    def torso(points: np.ndarray, ct: bool) -> np.ndarray:
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        body = (x / 70) ** 2 + (y / 50) ** 2 <= 1
        out = np.where(body, 40.0 if ct else 1.0, -1000.0 if ct else 0.0)
        for side in (-1, 1):
            lung = ((x - side * 32) / 24) ** 2 + ((y + 2) / 30) ** 2 + ((z - 20) / 45) ** 2 <= 1
            out = np.where(lung, -800.0 if ct else 0.2, out)
        spine = (x / 9) ** 2 + ((y - 36) / 9) ** 2 <= 1
        heart = ((x + 10) / 20) ** 2 + ((y + 10) / 18) ** 2 + ((z - 5) / 20) ** 2 <= 1
        liver = ((x + 25) / 35) ** 2 + (y / 30) ** 2 + ((z + 45) / 22) ** 2 <= 1
        out = np.where(spine, 700.0 if ct else 0.5, out)
        out = np.where(heart, 45.0 if ct else 6.0, out)
        return np.where(liver, 60.0 if ct else 2.5, out)

    pet_shape, pet_spacing = (32, 32, 40), (5.0, 5.0, 5.0)
    pet_points = voxel_points(pet_shape, pet_spacing, centred_origin(pet_shape, pet_spacing))
    activity = ndimage.gaussian_filter(torso(pet_points, ct=False), 1.0) * 5000.0
    pet = sitk.GetImageFromArray(activity.astype(np.float32))
    pet.SetSpacing(pet_spacing[::-1])
    pet.SetOrigin(centred_origin(pet_shape, pet_spacing))
    motion = euler((-4.0, 3.0, 5.0), (-8.0, 6.0, 10.0))
    ct_shape, ct_spacing = (40, 48, 64), (4.0, 3.0, 3.0)
    q = voxel_points(ct_shape, ct_spacing, centred_origin(ct_shape, ct_spacing))
    ct = memory_prior(torso(moved_back(motion, q), ct=True), ct_spacing, kind="ct")

    found = register_rigid(pet, ct)

    assert found.ok, found.reason
    assert rotation_error_deg(found.transform, motion) < 1.0
    assert point_errors(found.transform, motion, found.center_mm)[0] < 1.0


# --- real data --------------------------------------------------------------------------------------------------------

ACRIN = "ohif_acrin_nsclc_fdg_pet_042"
MPRAGE = "ohif_mr_t1_brain/siemens_trio_mprage"


def test_real_ct_on_the_real_pet_by_frame_of_reference(realdata: Path) -> None:
    study = realdata / ACRIN
    volume = load_pet_series(sorted((study / "PT_AC").iterdir()))
    ct = read_prior_series(sorted((study / "CT").iterdir()))
    assert ct.kind == "ct" and ct.shape == (135, 512, 512)
    assert same_frame_of_reference(volume.frame_of_reference_uid, ct.frame_of_reference_uid)
    prepared = prepare_prior(volume, ct)
    assert prepared.method == "frame-of-reference" and prepared.array.shape == volume.shape
    assert prepared.array.min() >= -1000.0
    # Where the CT sees soft tissue the PET sees activity; where it sees air (outside the body) almost none.
    suv = volume.array * volume.suv_factor
    inside = prepared.array > -200.0
    air = prepared.array < -950.0
    assert np.median(suv[inside]) > 0.5 and np.percentile(suv[air], 95) < 0.2


@pytest.mark.slow
def test_real_ct_moved_to_another_frame_of_reference_is_registered_back(realdata: Path) -> None:
    study = realdata / ACRIN
    volume = load_pet_series(sorted((study / "PT_AC").iterdir()))
    ct = read_prior_series(sorted((study / "CT").iterdir()))
    # Move the CT's coordinates as another scanner would see the patient: point p shows at motion(p).
    motion = euler((4.0, -3.0, 6.0), (10.0, -8.0, 12.0))
    matrix = np.asarray(motion.GetMatrix()).reshape(3, 3)
    image = sitk.Image(ct.image)
    image.SetDirection(tuple((matrix @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel()))
    image.SetOrigin(motion.TransformPoint(image.GetOrigin()))
    moved = PriorImage(image, "ct", ct.series_uid, generate_uid(), ct.study_uid, ct.description)

    found = register_rigid(volume, moved)

    assert found.ok, found.reason
    # The PET/CT pair itself is not perfectly aligned (breathing): its own registration optimum sits ~0.7 deg and
    # ~1.4 mm away from the scanner's alignment.
    assert rotation_error_deg(found.transform, motion) < 1.5
    assert point_errors(found.transform, motion, found.center_mm)[0] < 2.5
    # The gate separates this result from the unregistered images (same motion, identity transform).
    assert found.mi_ratio > 0.1 and found.initial_mi_ratio < QualityGate().min_mi_ratio


@pytest.mark.slow
def test_real_mprage_is_registered_onto_a_pet_made_from_it(realdata: Path) -> None:
    mr = read_prior_series(sorted((realdata / MPRAGE).iterdir()))
    assert mr.kind == "mr" and mr.shape == (128, 256, 256)  # sagittal, 1.33 mm slices, oblique
    # An FDG-like PET from the T1 on a 3 mm axial grid: grey matter hot, white matter warm, CSF and bone cold,
    # scalp fat faint; ~6 mm FWHM and 20 % noise. Then the MR moves to another Frame of Reference.
    centre = np.asarray(mr.image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in mr.image.GetSize()]))
    shape, spacing = (60, 72, 72), (3.0, 3.0, 3.0)
    grid = reference_grid(centre - np.array([36, 36, 30]) * 3.0 + 1.5, (1, 0, 0, 0, 1, 0), spacing, shape)
    t1 = resample_onto(mr, grid)
    relative = t1 / np.percentile(t1[t1 > 0], 99)
    activity = np.interp(relative, [0, 0.15, 0.3, 0.45, 0.55, 0.7, 0.85, 1.2], [0, 0.3, 1, 8, 6, 2.5, 1, 1])
    activity = ndimage.gaussian_filter(activity, 2.5 / 3.0)
    activity *= np.clip(np.random.default_rng(0).normal(1.0, 0.2, shape), 0, None) * 5000.0
    pet = sitk.GetImageFromArray(activity.astype(np.float32))
    pet.CopyInformation(grid)
    motion = euler((7.0, -5.0, 6.0), (12.0, -8.0, 5.0))
    matrix = np.asarray(motion.GetMatrix()).reshape(3, 3)
    image = sitk.Image(mr.image)
    image.SetDirection(tuple((matrix @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel()))
    image.SetOrigin(motion.TransformPoint(image.GetOrigin()))
    moved = PriorImage(image, "mr", mr.series_uid, generate_uid(), mr.study_uid, mr.description)

    found = register_rigid(pet, moved)

    assert found.ok, found.reason
    assert rotation_error_deg(found.transform, motion) < 1.0
    assert max(point_errors(found.transform, motion, found.center_mm, half=60.0)) < 1.5
