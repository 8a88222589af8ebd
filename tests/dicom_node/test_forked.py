"""Forked per-item work (dicom_node/forked.py): every item reported once, a child's error or death raised, no
child left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dicom_node.forked import ForkedWorkError, run_forked


def test_every_item_is_done_once_in_a_child(tmp_path: Path) -> None:
    done: list[int] = []
    run_forked(25, lambda k: (tmp_path / f"{k}").write_text(str(os.getpid())), 4, done.append)
    assert sorted(done) == list(range(25))
    pids = {(tmp_path / f"{k}").read_text() for k in range(25)}
    assert len(pids) == 4 and str(os.getpid()) not in pids  # the parent only relayed


def test_more_processes_than_items_and_no_items() -> None:
    done: list[int] = []
    run_forked(2, lambda k: None, 8, done.append)
    assert sorted(done) == [0, 1]
    run_forked(0, lambda k: None, 2, done.append)
    assert sorted(done) == [0, 1]


def test_an_error_in_a_child_is_raised_after_every_child_has_exited(tmp_path: Path) -> None:
    def work(k: int) -> None:
        if k == 1:
            raise ValueError("slice 1 is bad")
        time.sleep(0.01)
        (tmp_path / f"{k}").touch()

    done: list[int] = []
    with pytest.raises(ForkedWorkError, match="ValueError: slice 1 is bad"):
        run_forked(40, work, 2, done.append)
    # The odd child stopped at its first item; the even one was waited for to its end before the raise.
    assert sorted(done) == list(range(0, 40, 2))
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(0, 40, 2))


def test_a_child_that_dies_is_an_error() -> None:
    def work(k: int) -> None:
        if k == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(ForkedWorkError, match="status -9"):
        run_forked(8, work, 2)
