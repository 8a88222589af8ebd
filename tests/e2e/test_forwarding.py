"""Forwarding rules against real peers: DCMTK storescu as the scanner, Orthanc as the PACS, storescp as a sink.

The scanner sends to petnode only; the PACS must end with the originals (same SOP Instance UIDs, the same data set
bytes), the derived PET, and nothing it should not get; a PACS that routes everything back must not start a loop.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEGLSLossless

from dicom_node import scu
from dicom_node.cli import main
from tests.conftest import wait_until
from tests.dicomtools import Orthanc, StoreSCP, storescu
from tests.e2e.conftest import send_datasets, wait_state
from tests.factories import make_ct_series, make_pet_series, write_series

pytestmark = pytest.mark.network

ACRIN = "ohif_acrin_nsclc_fdg_pet_042"


def _dataset_digest(data: bytes) -> str:
    """sha256 of a Part 10 file's data set: the bytes after the file meta information (which every store
    rewrites: implementation UID and version, source AE)."""
    stream = BytesIO(data)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    return hashlib.sha256(data[stream.tell():]).hexdigest()


def _orthanc_instances(orthanc: Orthanc) -> dict[str, dict[str, Any]]:
    """SOP Instance UID -> Orthanc's expanded instance record."""
    out = {}
    for item in orthanc.rest("GET", "/instances?expand"):
        out[item["MainDicomTags"]["SOPInstanceUID"]] = item
    return out


def _orthanc_series_of(orthanc: Orthanc, instance: dict[str, Any]) -> str:
    return str(orthanc.rest("GET", f"/series/{instance['ParentSeries']}")["MainDicomTags"]["SeriesInstanceUID"])


def _pacs(orthanc: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, **extra}


def _sent_first_at(node: Any, kind: str) -> float | None:
    """When the destination first confirmed an instance of this kind (petnode's own per-instance record)."""
    con = sqlite3.connect(node.settings.state_db)
    try:
        row = con.execute("SELECT MIN(i.confirmed_at) FROM sent_instances i JOIN sends s ON s.series_uid = "
                          "i.series_uid AND s.destination = i.destination WHERE s.kind = ?", (kind,)).fetchone()
    finally:
        con.close()
    return row[0]


def test_scanner_to_petnode_to_pacs_real_study(start_node, orthanc: Orthanc, realdata: Path,
                                               capsys: pytest.CaptureFixture[str]):
    """The whole ACRIN PET/CT study goes to petnode only; Orthanc ends with every original byte for byte, the
    derived PET, not the scout, and nothing before the study was complete and processed (hold_study)."""
    study = realdata / ACRIN
    hold = {"hold_study": True, "study_quiet_period_s": 2.0}
    node = start_node([
        {"name": "pet-to-pacs", "priority": 40,
         "match": {"modality": "PT", "tracer": "FDG", "conditions": [{"attribute": "Units", "equals": "BQML"}]},
         "denoiser": {"name": "gaussian", "params": {"fwhm_mm": 6.0}}, **hold,
         "destinations": [{"peer": "pacs", "send": ["original", "derived", "maps"]}]},
        {"name": "drop-scouts", "priority": 45,
         "match": {"modality": "CT", "conditions": [{"attribute": "ImageType", "regex": "LOCALIZER"}]},
         "drop": True},
        {"name": "forward-rest", "priority": 900, **hold, "destinations": [{"peer": "pacs"}]},
    ], peers=[_pacs(orthanc)])
    sources = {str(p): dcmread(p, stop_before_pixels=True) for p in sorted(study.rglob("*.dcm"))}
    scout = {str(ds.SOPInstanceUID) for ds in sources.values() if "LOCALIZER" in ds.get("ImageType", [])}
    pet_ac = next(ds for ds in sources.values() if ds.Modality == "PT" and ds.get("Units") == "BQML")
    originals = {str(ds.SOPInstanceUID): path for path, ds in sources.items() if str(ds.SOPInstanceUID) not in scout}
    assert len(scout) == 1 and len(originals) == len(sources) - 1 >= 400
    n_pet = sum(1 for ds in sources.values() if ds.SeriesInstanceUID == pet_ac.SeriesInstanceUID)

    result = storescu(list(sources), "127.0.0.1", node.port, called_ae="PETNODE", calling_ae="SCANNER",
                      timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = len(originals) + n_pet  # every original but the scout, and the derived PET
    assert wait_until(lambda: len(orthanc.rest("GET", "/instances")) >= expected, timeout=240), (
        len(orthanc.rest("GET", "/instances")), node.db.sends())
    pet_uid = str(pet_ac.SeriesInstanceUID)
    assert wait_state(node, pet_uid, ["delivered", "failed"], timeout=60) == "delivered", node.db.series(pet_uid)

    stored = _orthanc_instances(orthanc)
    assert len(stored) == expected
    assert scout.isdisjoint(stored)  # dropped
    for sop, path in originals.items():
        assert sop in stored, f"original {sop} missing at the PACS"
        pacs_file = orthanc.rest("GET", f"/instances/{stored[sop]['ID']}/file")
        assert _dataset_digest(pacs_file) == _dataset_digest(Path(path).read_bytes()), f"{sop} changed on the way"
    derived = [i for sop, i in stored.items() if sop not in originals]
    derived_series = {_orthanc_series_of(orthanc, i) for i in derived[:3]}
    row = node.db.series(pet_uid)
    assert derived_series == {row["output_series_uid"]} and len(derived) == n_pet

    # Held: the PACS confirmed nothing before the PET was processed and the study had been quiet 2 s.
    last_instance = max(r["last_received"] for r in node.db.list_series(limit=100))
    first_confirmed = min(t for t in (_sent_first_at(node, "original"), _sent_first_at(node, "derived")) if t)
    assert first_confirmed >= row["processed_at"] and first_confirmed >= last_instance + 2.0
    states = {r["series_uid"]: r["state"] for r in node.db.list_series(limit=100)}
    scout_series = str(next(ds for ds in sources.values() if str(ds.SOPInstanceUID) in scout).SeriesInstanceUID)
    assert states.pop(scout_series) == "dropped"
    assert set(states.values()) == {"delivered"}, states  # PET AC, PET NAC, CT, RWV

    assert main(["series", "show", pet_uid, "--data-dir", str(node.settings.data_dir)]) == 0
    out = capsys.readouterr().out
    assert f"send original to ORTHANC@127.0.0.1:{orthanc.dicom_port}: done, {n_pet}/{n_pet} stored" in out
    assert f"send derived to ORTHANC@127.0.0.1:{orthanc.dicom_port}: done, {n_pet}/{n_pet} stored" in out


def test_ct_forwarding_drop_and_lossless_conversion(start_node, orthanc: Orthanc, storescp_sink: StoreSCP,
                                                    tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A CT-only forwarding rule: the CT reaches the PACS as it came (JPEG-LS stays JPEG-LS) and a sink that takes
    only uncompressed syntaxes gets it decompressed without loss; the scout is dropped; the PET goes nowhere."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    pet = make_pet_series(shape=(4, 16, 16), seed=90)
    study = str(pet[0].StudyInstanceUID)
    ct = make_ct_series(shape=(5, 32, 32), seed=91, study_uid=study, transfer_syntax=JPEGLSLossless)
    scout = make_ct_series(shape=(1, 32, 32), seed=92, study_uid=study, series_description="Scout", series_number=1)
    node = start_node([
        {"name": "drop-scouts", "priority": 10, "match": {"modality": "CT", "series_description": "(?i)scout"},
         "drop": True},
        {"name": "ct-to-pacs", "match": {"modality": "CT"},
         "destinations": [{"peer": "pacs"}, {"peer": "sink", "send": ["original"]}]},
    ], peers=[_pacs(orthanc), {"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                               "port": storescp_sink.port}])
    for series in (pet, ct, scout):
        write_series(series, tmp_path / "scanner" / str(series[0].SeriesNumber))
    result = storescu(tmp_path / "scanner", "127.0.0.1", node.port, called_ae="PETNODE", calling_ae="SCANNER",
                      extra_args=["-xt"])  # propose JPEG-LS lossless as well as the uncompressed syntaxes
    assert result.returncode == 0, result.stderr[-2000:]
    ct_uid = str(ct[0].SeriesInstanceUID)
    assert wait_state(node, ct_uid, ["delivered", "failed"]) == "delivered", node.db.sends(ct_uid)
    assert wait_state(node, str(pet[0].SeriesInstanceUID), ["unrouted"]) == "unrouted"
    assert wait_state(node, str(scout[0].SeriesInstanceUID), ["dropped"]) == "dropped"
    assert any("dropped by the rule" in r.getMessage() for r in caplog.records)

    stored = _orthanc_instances(orthanc)
    assert set(stored) == {str(ds.SOPInstanceUID) for ds in ct}  # the CT only
    spool = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in node.db.instance_paths(ct_uid)}
    for sop, item in stored.items():
        pacs_file = orthanc.rest("GET", f"/instances/{item['ID']}/file")
        assert _dataset_digest(pacs_file) == _dataset_digest(spool[sop].read_bytes())
        assert orthanc.rest("GET", f"/instances/{item['ID']}/metadata/TransferSyntax").decode() == JPEGLSLossless
    assert storescp_sink.wait_for(len(ct))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct}
    for path in storescp_sink.files():
        got = dcmread(path)
        assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, "1.2.840.10008.1.2")
        assert str(got.SOPInstanceUID) in by_uid  # the same instance, not a copy under a new UID
        assert np.array_equal(got.pixel_array, by_uid[str(got.SOPInstanceUID)].pixel_array)  # lossless
    assert any("converted without loss" in r.getMessage() and "JPEG-LS Lossless" in r.getMessage()
               for r in caplog.records)


def test_lossy_original_is_never_converted(start_node, storescp_sink: StoreSCP, tmp_path: Path):
    """A lossy JPEG 2000 CT and a sink that accepts only uncompressed syntaxes: not sent, and the reason says so."""
    ct = make_ct_series(shape=(3, 32, 32), seed=93)
    for ds in ct:
        ds.compress(JPEG2000, j2k_cr=[20])
    node = start_node([{"name": "ct-to-sink", "match": {"modality": "CT"}, "destinations": [{"peer": "sink"}]}],
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    assert send_datasets(ct, node.port) == [0] * 3  # lossy is accepted for classes petnode only forwards
    uid = str(ct[0].SeriesInstanceUID)
    send = wait_until(lambda: next((s for s in node.db.sends(uid) if s["attempts"] >= 1), None), timeout=30)
    assert send is not None and send["sent"] == 0
    assert "lossy compressed image is never converted" in send["last_error"], send["last_error"]
    assert storescp_sink.files() == []


def test_forward_on_receipt_reaches_pacs_before_the_series_completes(start_node, orthanc: Orthanc,
                                                                     realdata: Path):
    ct_dir = realdata / ACRIN / "CT"
    files = sorted(ct_dir.glob("*.dcm"))
    node = start_node([{"name": "ct-now", "match": {"modality": "CT"}, "forward": "on_receipt",
                        "quiet_period_s": 600, "destinations": [{"peer": "pacs"}]}], peers=[_pacs(orthanc)])
    first, rest = files[:20], files[20:]
    assert storescu(first, "127.0.0.1", node.port, called_ae="PETNODE").returncode == 0
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert wait_until(lambda: len(orthanc.rest("GET", "/instances")) >= len(first), timeout=60)
    assert node.db.series(uid)["state"] == "receiving"  # the PACS has them; the series is far from complete
    assert storescu(rest, "127.0.0.1", node.port, called_ae="PETNODE").returncode == 0
    assert wait_until(lambda: len(orthanc.rest("GET", "/instances")) >= len(files), timeout=120)
    assert node.db.series(uid)["state"] == "receiving"
    assert node.db.request_complete(uid)  # the operator's force instead of the 10-minute quiet period
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.sends(uid)
    send = node.db.sends(uid)[0]
    assert send["kind"] == "original" and send["sent"] == send["total"] == len(files)
    con = sqlite3.connect(node.settings.state_db)
    try:
        confirmed = con.execute("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM sent_instances").fetchone()
    finally:
        con.close()
    assert confirmed == (len(files), len(files))  # every instance confirmed once


def test_pacs_routing_everything_back_starts_no_loop(start_node, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture):
    """Orthanc stores in Implicit VR (other bytes than it got) and routes every stored instance back to petnode
    at once: without the loop guard the echoed PET would re-open its series, be processed again and forwarded
    again, for ever. With it, the echoes are acknowledged and go nowhere."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    lua = tmp_path / "route-back.lua"
    lua.write_text("function OnStoredInstance(instanceId, tags, metadata, origin)\n"
                   "   SendToModality(instanceId, 'petnode')\nend\n")
    pet = make_pet_series(shape=(6, 16, 16), seed=94)
    ct = make_ct_series(shape=(6, 32, 32), seed=95, study_uid=str(pet[0].StudyInstanceUID))
    with Orthanc(extra_config={"LuaScripts": [str(lua)], "IngestTranscoding": "1.2.840.10008.1.2"}) as pacs:
        node = start_node([
            {"name": "pet", "match": {"modality": "PT"}, "denoiser": {"name": "gaussian"},
             "destinations": [{"peer": "pacs", "send": ["original", "derived"]}]},
            {"name": "ct", "match": {"modality": "CT"}, "forward": "on_receipt", "destinations": [{"peer": "pacs"}]},
        ], peers=[_pacs(pacs)])
        pacs.add_modality("petnode", "PETNODE", "127.0.0.1", node.port)
        assert send_datasets(pet, node.port) == [0] * 6
        assert send_datasets(ct, node.port) == [0] * 6
        pet_uid, ct_uid = str(pet[0].SeriesInstanceUID), str(ct[0].SeriesInstanceUID)
        assert wait_state(node, pet_uid, ["delivered", "failed"]) == "delivered"
        node.db.request_complete(ct_uid)
        assert wait_state(node, ct_uid, ["delivered", "failed"]) == "delivered"

        def returned() -> int:
            return sum(int(r.getMessage().split("returned ")[1].split()[0]) for r in caplog.records
                       if "returned " in r.getMessage() and "association" in r.getMessage())

        # Orthanc sends back the 6 PET and 6 CT originals and the 6 derived; the derived come back as our own
        # output (stored, never routed).
        own = wait_until(lambda: [r for r in node.db.list_series(limit=100) if r["state"] == "own_output"],
                         timeout=60)
        assert own and own[0]["series_uid"] == node.db.series(pet_uid)["output_series_uid"]
        time.sleep(3.0)  # a loop shows within this: the PET re-opened and processed again, Orthanc growing
        assert len(pacs.rest("GET", "/instances")) == 18
        assert node.db.series(pet_uid)["revision"] == 0 and node.db.series(pet_uid)["state"] == "delivered"
        assert node.db.series(ct_uid)["revision"] == 0
        assert len(node.db.list_series(limit=100)) == 3  # PET, CT, and the derived PET that came back
        sends = node.db.sends()
        assert sorted(s["kind"] for s in sends) == ["derived", "original", "original"]
        assert all(s["state"] == "done" and s["sent"] == 6 for s in sends)
        # The 12 originals came back, were acknowledged and not stored again (Orthanc sends each on its own
        # association; the count is logged when each closes).
        assert wait_until(lambda: returned() >= 12, timeout=60), returned()


def _capturing_scp(syntaxes: list[str]) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """A pynetdicom storage SCP accepting CT in ``syntaxes`` only; records (syntax, data set bytes) per UID."""
    from pynetdicom import AE, evt

    got: dict[str, tuple[str, bytes]] = {}

    def store(event: Any) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax),
                                                           event.encoded_dataset(include_meta=False))
        return 0x0000

    ae = AE(ae_title="CAPTURE")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", syntaxes)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    return server, got


@pytest.mark.parametrize("accepted", [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
def test_send_is_byte_for_byte_or_converted_without_loss(tmp_path: Path, accepted: str):
    files = write_series(make_ct_series(shape=(3, 16, 16), seed=96), tmp_path / "ct")
    server, got = _capturing_scp([accepted])
    try:
        report = scu.send_files(files, "CAPTURE", "127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()
    assert report.ok, report.summary()
    for path in files:
        ds = dcmread(path)
        syntax, data = got[str(ds.SOPInstanceUID)]
        assert syntax == accepted
        raw = path.read_bytes()
        if accepted == ExplicitVRLittleEndian:  # the file's own syntax: its very bytes
            assert hashlib.sha256(data).hexdigest() == _dataset_digest(raw)
            assert report.converted == {}
        else:  # converted: other bytes, the same image
            assert hashlib.sha256(data).hexdigest() != _dataset_digest(raw)
            back = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
            assert back.PixelData == ds.PixelData and back.SOPInstanceUID == ds.SOPInstanceUID
            assert report.converted == {"Explicit VR Little Endian -> Implicit VR Little Endian": 3}


class _SlowSink:
    """A pynetdicom storage SCP for CT that takes ``delay_s`` per C-STORE and counts every C-STORE per UID."""

    def __init__(self, delay_s: float) -> None:
        import threading

        from pynetdicom import AE, evt

        self.delay_s = delay_s
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="SLOW")
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event: Any) -> int:
        time.sleep(self.delay_s)  # a slow PACS: the kill lands mid-series
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.mark.slow
def test_forward_resumes_after_kill9_without_duplicates(tmp_path: Path):
    from tests.e2e.conftest import NodeProcess, write_config

    sink = _SlowSink(delay_s=0.05)
    ct = make_ct_series(shape=(40, 16, 16), seed=97)
    config = write_config(tmp_path, [{"name": "ct", "match": {"modality": ["CT"]},
                                      "destinations": [{"peer": "slow"}]}],
                          peers=[{"name": "slow", "ae_title": "SLOW", "host": "127.0.0.1", "port": sink.port}])
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        assert send_datasets(ct, node.port) == [0] * 40
        assert wait_until(lambda: len(sink.received) >= 10, timeout=60)
        node.kill9()  # mid-forward
        at_kill = len(sink.received)
        assert at_kill < 40
        node.start(port=node.port)
        assert wait_until(lambda: len(set(sink.received)) == 40, timeout=60), len(set(sink.received))
        assert wait_until(lambda: "delivered" in (tmp_path / "node.log").read_text(), timeout=30)
        assert len(sink.received) <= 41  # at most the instance in flight at the kill arrives twice
        assert set(sink.received) == {str(ds.SOPInstanceUID) for ds in ct}
    finally:
        node.stop()
        sink.server.shutdown()
