"""Derived series go out while they are written: the send follows the writer over one association, and a writer
that stops half-way leaves no send marked done (real pynetdicom associations over loopback)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.outputs import derived_pet
from tests.conftest import wait_until
from tests.e2e.conftest import RecordingSCP, pet_rule, send_datasets, wait_state
from tests.factories import make_pet_series

pytestmark = pytest.mark.network


def _slow_writer(monkeypatch: pytest.MonkeyPatch, written: list[float], pause_s: float,
                 fail_at: int | None = None) -> None:
    """Each derived file takes ``pause_s`` longer to write; the ``fail_at``-th (from 0) fails like a full disk."""
    original = derived_pet.write_durable

    def write(path: Path, data: bytes, *, fsync: bool = True) -> None:
        if fail_at is not None and len(written) == fail_at:
            raise OSError(28, "No space left on device")
        time.sleep(pause_s)
        original(path, data, fsync=fsync)
        written.append(time.monotonic())

    monkeypatch.setattr(derived_pet, "write_durable", write)


def test_send_starts_before_the_last_file_is_written(start_node, recorder: RecordingSCP,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[float] = []
    _slow_writer(monkeypatch, written, pause_s=0.05)
    node = start_node([pet_rule([{"ae_title": "RECORDER", "host": "127.0.0.1", "port": recorder.port}])])
    datasets = make_pet_series(shape=(16, 16, 16), seed=61)
    assert send_datasets(datasets, node.port) == [0] * 16
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)
    assert len(written) == 16 and len(recorder.arrivals) == 16
    first_arrival = min(t for t, _, _ in recorder.arrivals)
    assert first_arrival < written[-1]  # the PACS had instances while the writer was still at work
    assert len({assoc for _, _, assoc in recorder.arrivals}) == 1  # one association for the whole series
    sends = node.db.sends(uid)
    assert [(s["state"], s["sent"], s["total"]) for s in sends] == [("done", 16, 16)]
    steps = node.timings[uid]  # what `petnode bench receive` reads for a running node's denoise step
    assert set(steps) == {"load", "denoise", "write", "total"} and steps["write"] >= 16 * 0.05


def test_a_writer_that_fails_half_way_leaves_no_send_done(start_node, recorder: RecordingSCP,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[float] = []
    _slow_writer(monkeypatch, written, pause_s=0.02, fail_at=6)
    node = start_node([pet_rule([{"ae_title": "RECORDER", "host": "127.0.0.1", "port": recorder.port}])])
    datasets = make_pet_series(shape=(12, 16, 16), seed=62)
    assert send_datasets(datasets, node.port) == [0] * 12
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "failed", node.db.series(uid)
    assert "No space left on device" in node.db.series(uid)["error"]
    time.sleep(0.5)  # let the send that followed the writer finish
    sends = node.db.sends(uid, include_cancelled=True)
    assert [s["state"] for s in sends] == ["cancelled"], sends
    assert len(recorder.arrivals) <= 6  # at most what was written went out


def test_a_send_queued_by_a_run_that_stopped_waits_for_the_new_run(start_node, recorder: RecordingSCP) -> None:
    """After a restart mid-write the send row exists but the output on disk may be partial: the sender puts it
    back (no attempt counted) until processing has written the series again."""
    from dicom_node.state import Payload, SeriesState

    node = start_node([pet_rule([{"ae_title": "RECORDER", "host": "127.0.0.1", "port": recorder.port}])])
    datasets = make_pet_series(shape=(4, 16, 16), seed=63)
    assert send_datasets(datasets, node.port) == [0] * 4
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered"]) == "delivered"
    node._scheduler.pause()  # no scheduled jobs from here: the test drives the sender itself
    arrived = len(recorder.arrivals)
    node.db.set_state(uid, SeriesState.COMPLETE)  # as recover() leaves a series that was being processed
    node.db.add_send(uid, "RECORDER", "127.0.0.1", recorder.port + 0, 4, output_series_uid="2.25.1",
                     kind=Payload.DERIVED)
    (row,) = node.db.claim_due_sends(time.time() + 1)
    node._send(row)
    (after,) = [s for s in node.db.sends(uid) if s["output_series_uid"] == "2.25.1"]
    assert (after["state"], after["attempts"]) == ("pending", 0)
    assert len(recorder.arrivals) == arrived


def test_a_send_that_fails_while_the_writer_runs_keeps_the_series_count(start_node,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination is down: the first attempt fails with one or two files written; status must still say
    0/16, not 0/1 (the send was queued with the derived series' full count)."""
    written: list[float] = []
    _slow_writer(monkeypatch, written, pause_s=0.1)
    from tests.dicomtools import free_port

    node = start_node([pet_rule([{"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}])])
    datasets = make_pet_series(shape=(16, 16, 16), seed=62)
    assert send_datasets(datasets, node.port) == [0] * 16
    uid = str(datasets[0].SeriesInstanceUID)
    derived = wait_until(lambda: [s for s in node.db.sends(uid) if s["kind"] == "derived" and s["attempts"] >= 1],
                         timeout=30)
    assert derived, node.db.sends(uid)
    assert len(written) < 16, "the writer finished before the first attempt: the test proves nothing"
    assert [(s["sent"], s["total"]) for s in derived] == [(0, 16)]

