"""The references `petnode bench receive` measures against do the work they are said to do (the figures
themselves are printed by the benchmark, not asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.bench import naive_command_s, naive_round_trip, series_copies
from tests.factories import make_pet_series, write_series


def test_the_naive_round_trip_in_process_and_as_a_program_write_the_same_images(tmp_path: Path) -> None:
    files = write_series(make_pet_series(shape=(4, 8, 8), seed=2), tmp_path / "in")
    assert naive_round_trip(files, tmp_path / "inproc") > 0
    assert naive_command_s(files, tmp_path / "program") > 0
    for out in ("inproc", "program"):
        written = sorted((tmp_path / out).glob("*.dcm"))
        assert len(written) == len(files)
        for source, copy in zip(files, written):
            assert np.array_equal(dcmread(source).pixel_array, dcmread(copy).pixel_array)


def test_series_copies_are_other_series_with_the_same_images_and_the_same_uids_every_run(tmp_path: Path) -> None:
    files = write_series(make_pet_series(shape=(3, 8, 8), seed=4), tmp_path / "in")
    first = series_copies(files, tmp_path / "a", 2)
    again = series_copies(files, tmp_path / "b", 2)
    uids = set()
    for copy_files, again_files in zip(first, again):
        assert len(copy_files) == len(files)
        for source, copy, twin in zip(files, copy_files, again_files):
            src, ds, ds2 = dcmread(source), dcmread(copy), dcmread(twin)
            assert np.array_equal(src.pixel_array, ds.pixel_array)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                assert ds[keyword].value != src[keyword].value  # another series, not a duplicate of the original
                assert ds[keyword].value == ds2[keyword].value  # derived from the originals: the same every run
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            uids.add(ds.SOPInstanceUID)
        assert len({dcmread(p).SeriesInstanceUID for p in copy_files}) == 1
    assert len(uids) == 2 * len(files)  # no two copies share an instance
