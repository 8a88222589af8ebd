from __future__ import annotations

from dicom_node.completion import Verdict, contiguity_problem, decide

IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _stack(zs: list[float]) -> list[tuple[float, float, float]]:
    return [(-100.0, -100.0, z) for z in zs]


def test_contiguous_stack_in_any_order():
    zs = [3.27 * i for i in range(10)]
    assert contiguity_problem(_stack(zs[::-1]), [IOP] * 10) is None


def test_gap_is_named_with_positions():
    zs = [3.27 * i for i in range(10) if i != 4]
    problem = contiguity_problem(_stack(zs), [IOP] * 9)
    assert problem is not None and "1 slice(s) missing" in problem and "9.81" in problem


def test_duplicate_position_and_orientation_mismatch():
    assert "same position" in contiguity_problem(_stack([0.0, 3.0, 3.0]), [IOP] * 3)
    tilted = (1.0, 0.0, 0.0, 0.0, 0.98, 0.17)
    assert "ImageOrientationPatient" in contiguity_problem(_stack([0.0, 3.0, 6.0]), [IOP, tilted, IOP])


def test_oblique_stack_uses_the_normal():
    # Slices stacked along a tilted normal: positions differ in y and z, still contiguous.
    iop = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)
    normal = (0.0, 0.6, 0.8)
    pos = [(0.0, 2.0 * i * normal[1], 2.0 * i * normal[2]) for i in range(5)]
    assert contiguity_problem(pos, [iop] * 5) is None


def _decide(**kw):
    base = dict(modality="PT", received=10, expected=10, seconds_quiet=0.0, quiet_period_s=30.0,
                positions=_stack([3.0 * i for i in range(10)]), orientations=[IOP] * 10)
    base.update(kw)
    return decide(**base)


def test_pet_completes_on_count_without_waiting():
    assert _decide().verdict is Verdict.COMPLETE


def test_pet_waits_for_missing_slices_then_incomplete():
    pos = _stack([3.0 * i for i in range(7)])
    assert _decide(received=7, positions=pos, orientations=[IOP] * 7).verdict is Verdict.WAIT
    d = _decide(received=7, positions=pos, orientations=[IOP] * 7, seconds_quiet=31.0)
    assert d.verdict is Verdict.INCOMPLETE and "7 of 10" in d.reason


def test_count_reached_but_gap_waits_then_incomplete():
    pos = _stack([3.0 * i for i in range(9)] + [40.0])
    assert _decide(positions=pos).verdict is Verdict.WAIT
    assert _decide(positions=pos, seconds_quiet=60).verdict is Verdict.INCOMPLETE


def test_without_count_quiet_period_then_contiguity():
    kw = dict(modality="CT", expected=None)
    assert _decide(**kw, seconds_quiet=5).verdict is Verdict.WAIT
    assert _decide(**kw, seconds_quiet=31).verdict is Verdict.COMPLETE
    gap = _stack([0.0, 3.0, 9.0])
    assert _decide(**kw, received=3, positions=gap, orientations=[IOP] * 3,
                   seconds_quiet=31).verdict is Verdict.INCOMPLETE


def test_images_without_geometry_complete_after_quiet_period():
    d = _decide(modality="OT", expected=None, received=2, positions=[None, None], orientations=[None, None],
                seconds_quiet=31)
    assert d.verdict is Verdict.COMPLETE


def test_forced_completes_whatever_the_count():
    d = _decide(received=3, positions=_stack([0.0, 3.0, 6.0]), orientations=[IOP] * 3, forced=True)
    assert d.verdict is Verdict.COMPLETE and "forced" in d.reason


def test_image_index_tells_partial_from_short():
    from dicom_node.completion import image_index_problem

    assert image_index_problem([3, 1, 2]) is None
    assert image_index_problem([]) is None and image_index_problem([1, None]) is None
    problem = image_index_problem(list(range(69, 136)))  # the first 67 files of a 135-slice GE series
    assert problem is not None and "68 slice(s) missing" in problem and "1-68" in problem
    assert "4, 7-8" in (image_index_problem([1, 2, 3, 5, 6, 9]) or "")
    assert "two slices with Image Index 2" in (image_index_problem([1, 2, 2]) or "")


def test_decide_without_number_of_slices_uses_image_index():
    positions = [(0.0, 0.0, float(z)) for z in range(3)]
    kwargs = dict(modality="PT", received=3, expected=None, seconds_quiet=60, quiet_period_s=30,
                  positions=positions, orientations=[(1, 0, 0, 0, 1, 0)] * 3)
    assert decide(**kwargs, image_indices=[1, 2, 3]).verdict is Verdict.COMPLETE
    partial = decide(**kwargs, image_indices=[5, 6, 7])
    assert partial.verdict is Verdict.INCOMPLETE and "1-4" in partial.reason


def test_completion_and_loader_share_one_contiguity_rule():
    """One gap 6.7 % wider than the rest (as at real bed junctions) neither blocks completion nor loading."""
    from pydicom.dataset import Dataset

    from dicom_node.completion import DEFAULT_SPACING_TOLERANCE, spacing_problem
    from dicom_node.series import SLICE_SPACING_RTOL, check_contiguity
    from dicom_node.settings import CompletionSettings

    assert SLICE_SPACING_RTOL == DEFAULT_SPACING_TOLERANCE == CompletionSettings().spacing_tolerance
    zs = [0.0, 3.0, 6.0, 9.2, 12.2, 15.2]  # one gap of 3.2 mm against 3.0 mm
    positions = [(0.0, 0.0, z) for z in zs]
    assert contiguity_problem(positions, [(1, 0, 0, 0, 1, 0)] * len(zs)) is None
    headers = []
    for k, z in enumerate(zs):
        ds = Dataset()
        ds.SOPInstanceUID, ds.SeriesInstanceUID = f"1.2.{k}", "1.2"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.Rows, ds.Columns = [2, 2], 4, 4
        headers.append(ds)
    assert check_contiguity(headers) is None
    missing = [0.0, 3.0, 9.0, 12.0]
    for problem in (spacing_problem(missing), check_contiguity(headers[:2] + headers[3:])):
        assert problem is not None and "slice(s) missing" in problem
