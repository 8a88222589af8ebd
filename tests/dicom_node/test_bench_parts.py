"""The references `petnode bench receive` measures against do the work they are said to do (the figures
themselves are printed by the benchmark, not asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.bench import naive_command_s, naive_round_trip
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
