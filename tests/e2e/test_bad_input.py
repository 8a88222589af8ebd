"""Bad input gets its documented status or state and a clear log line, and nothing already stored is lost."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.settings import DiskSettings
from tests.e2e.conftest import pet_rule, send_datasets, wait_state
from tests.factories import make_ct_series, make_pet_series, write_series

pytestmark = pytest.mark.network

SINK = [{"ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}]  # never reached in these tests


def _spool_files(node) -> list[Path]:
    return sorted(p for p in (node.settings.data_dir / "spool").rglob("*") if p.is_file())


def _send_file(path: Path, port: int, sop_class: str, ts: str) -> int:
    """Send a file as its raw bytes (pynetdicom does not decode it first), so broken data reaches the node."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="PETNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def test_truncated_file_and_missing_pixels(start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    good = make_pet_series(shape=(4, 16, 16), seed=1)
    assert send_datasets(good[:1], node.port) == [0]
    before = _spool_files(node)

    path = write_series(good[1:2], tmp_path / "trunc")[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # cut into the Pixel Data
    status = _send_file(path, node.port, str(good[1].SOPClassUID), str(good[1].file_meta.TransferSyntaxUID))
    assert status == 0xC210
    assert "0xC210" in caplog.text and "truncated" in caplog.text.lower()

    no_pixels = good[2].copy()
    del no_pixels.PixelData
    assert send_datasets([no_pixels], node.port) == [0xA900]
    assert "no Pixel Data" in caplog.text

    assert not node.db.has_instance(str(good[1].SOPInstanceUID))
    assert not node.db.has_instance(str(no_pixels.SOPInstanceUID))
    assert _spool_files(node) == before  # nothing half-written, nothing lost


def test_disk_above_watermark(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    series = make_pet_series(shape=(3, 16, 16), seed=2)
    assert send_datasets(series[:1], node.port) == [0]
    before = _spool_files(node)
    node.spool.disk = DiskSettings(min_free_mb=1e12, max_used_percent=100)  # the disk is now "full"
    assert send_datasets(series[1:], node.port) == [0xA700, 0xA700]
    assert "0xA700" in caplog.text and "below the minimum" in caplog.text
    assert _spool_files(node) == before
    assert node.db.has_instance(str(series[0].SOPInstanceUID))
    assert not any(p.name.endswith(".tmp") for p in (node.settings.data_dir / "spool").rglob("*"))


def test_inconsistent_orientation(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    series = make_pet_series(shape=(6, 16, 16), seed=3)
    series[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9848, 0.1736]  # one slice tilted by 10 degrees
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series, node.port) == [0] * 6
    assert wait_state(node, uid, ["incomplete"]) == "incomplete"
    assert "ImageOrientationPatient" in node.db.series(uid)["error"]
    assert "incomplete" in caplog.text
    # The operator forces it: processing refuses the geometry with a clear reason, files stay.
    assert node.db.request_complete(uid)
    assert wait_state(node, uid, ["failed"]) == "failed"
    assert "orientation" in node.db.series(uid)["error"].lower()
    assert len(_spool_files(node)) == 6


def test_mixed_series_uids(start_node):
    node = start_node([pet_rule(SINK)])
    series = make_pet_series(shape=(8, 16, 16), seed=4)
    other = generate_uid()
    for ds in series[4:]:
        ds.SeriesInstanceUID = other
    assert send_datasets(series, node.port) == [0] * 8
    for uid in (str(series[0].SeriesInstanceUID), other):
        assert wait_state(node, uid, ["incomplete"]) == "incomplete"
        assert "only 4 of 8" in node.db.series(uid)["error"]
    assert len(_spool_files(node)) == 8


def test_non_pet_to_pet_only_rule(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    ct = make_ct_series(shape=(4, 16, 16))
    uid = str(ct[0].SeriesInstanceUID)
    assert send_datasets(ct, node.port) == [0] * 4
    assert wait_state(node, uid, ["unrouted"]) == "unrouted"
    assert "no rule matched" in caplog.text
    assert node.db.sends(uid) == []


def test_rule_refuses_non_quantitative(start_node):
    node = start_node([pet_rule(SINK, non_quantitative="refuse")])
    series = make_pet_series(shape=(4, 16, 16), seed=6, units="PROPCNTS")
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series, node.port) == [0] * 4
    assert wait_state(node, uid, ["refused"]) == "refused"
    assert "PROPCNTS" in node.db.series(uid)["error"]
    assert node.db.sends(uid) == []
