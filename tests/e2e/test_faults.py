"""The node under faults and hostile peers (issue 7): idle sockets, conflicting re-sends, interrupted sends, the
SCU response race, called AE titles, bad UIDs, partial series without NumberOfSlices, undecodable data, orphan
spool files and a night-long PACS outage. Real peers over loopback: DCMTK, pynetdicom, Orthanc."""

from __future__ import annotations

import copy
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from dicom_node import scu
from dicom_node.cli import main
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP, echoscu
from tests.e2e.conftest import pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_pet_series, write_series

pytestmark = pytest.mark.network

SINK = [{"ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}]  # never reached in these tests
PET = "1.2.840.10008.5.1.4.1.1.128"


def _idle_sockets(port: int, count: int, source: str = "127.0.0.2") -> list[socket.socket]:
    """TCP connections that never send an A-ASSOCIATE-RQ (a port scanner, a health check, a stuck modality)."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


# --- 1. idle sockets ------------------------------------------------------------------------------------------
def test_idle_sockets_do_not_lock_scanners_out(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)], max_associations=2, association_request_timeout_s=3,
                      max_connections_per_host=10)
    socks = _idle_sockets(node.port, 50)
    try:
        t0 = time.monotonic()
        echo = echoscu("127.0.0.1", node.port, called_ae="PETNODE", calling_ae="SCANNER")
        stored = send_datasets(make_pet_series(shape=(2, 8, 8), seed=11), node.port)
        elapsed = time.monotonic() - t0
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert stored == [0, 0]
        assert elapsed < 2.0, f"a scanner waited {elapsed:.2f} s behind idle sockets"
        # The real causes are logged: per-address refusals, then idle connections closed by the ACSE timeout.
        assert "max_connections_per_host=10" in caplog.text
        assert wait_until(lambda: sum(_closed_by_peer(s) for s in socks) == 50, timeout=10)
        assert "without an association request" in caplog.text
        assert "association rejected" not in caplog.text  # nobody innocent was refused
        assert wait_until(lambda: node._server.guard.connections == 0, timeout=5)
    finally:
        for s in socks:
            s.close()


def test_max_associations_counts_real_associations(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)], max_associations=2)
    held = []
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    try:
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", node.port, ae_title="PETNODE")
            assert assoc.is_established
            held.append(assoc)
        third = echoscu("127.0.0.1", node.port, called_ae="PETNODE", calling_ae="LATECOMER")
        assert third.returncode != 0
        assert "'LATECOMER'" in caplog.text and "2 associations in progress (max_associations=2)" in caplog.text
    finally:
        for assoc in held:
            assoc.release()
    assert wait_until(lambda: node._server.guard.associations == 0, timeout=5)
    assert echoscu("127.0.0.1", node.port, called_ae="PETNODE", calling_ae="LATECOMER").returncode == 0


# --- 2. conflicting re-sends ----------------------------------------------------------------------------------
def _changed(ds: Dataset, delta: int = 7) -> Dataset:
    out = copy.deepcopy(ds)
    arr = out.pixel_array.copy()
    arr[0, 0] += delta
    out.PixelData = arr.tobytes()
    return out


def test_changed_instance_is_stored_as_new_version_and_reprocessed(start_node, storescp_sink: StoreSCP,
                                                                     caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule([{"peer": "sink"}])],
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    series = make_pet_series(shape=(4, 16, 16), seed=21)
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series, node.port) == [0] * 4
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered"
    first_output = node.db.series(uid)["output_series_uid"]
    assert storescp_sink.wait_for(4)

    # The same bytes again: a harmless duplicate, nothing re-opened.
    assert send_datasets(series[:1], node.port) == [0]
    assert node.db.series(uid)["state"] == "delivered" and node.db.series(uid)["revision"] == 0

    # A corrected re-send under the same UID: stored, the old version kept, the series processed again.
    fixed = _changed(series[1])
    assert send_datasets([fixed], node.port) == [0]
    assert "came again with other content" in caplog.text
    versions = node.db.instance_versions(uid)
    assert len(versions) == 1 and Path(versions[0]["path"]).is_file()
    assert dcmread(versions[0]["path"]).PixelData == series[1].PixelData
    stored = dcmread(next(i["path"] for i in node.db.instances(uid)
                          if i["sop_instance_uid"] == str(series[1].SOPInstanceUID)))
    assert stored.PixelData == fixed.PixelData
    assert wait_until(lambda: node.db.series(uid)["output_series_uid"] != first_output
                      and node.db.series(uid)["state"] == "delivered", timeout=60), node.db.series(uid)
    assert node.db.series(uid)["revision"] == 1
    assert storescp_sink.wait_for(8)  # the corrected derived series arrived as a new series
    outputs = {str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in storescp_sink.files()}
    assert outputs == {first_output, node.db.series(uid)["output_series_uid"]}


def test_reused_uid_in_another_series_is_stored_there(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    first = make_pet_series(shape=(3, 8, 8), seed=31)
    second = make_pet_series(shape=(3, 8, 8), seed=32)
    second[0].SOPInstanceUID = first[0].SOPInstanceUID  # a modality that reuses SOP Instance UIDs
    assert send_datasets(first, node.port) == [0, 0, 0]
    assert send_datasets(second, node.port) == [0, 0, 0]
    uid2 = str(second[0].SeriesInstanceUID)
    assert node.db.series(uid2)["received_count"] == 3  # not 2 of 3, waiting forever
    assert "already stored in series" in caplog.text
    # Processed (its send to the unreachable sink is retrying); "failed" would be a processing failure.
    assert wait_state(node, uid2, ["sending", "failed", "delivered"]) == "sending"


def test_refuse_policy_answers_duplicate_sop_instance(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)], conflicting_instance="refuse")
    series = make_pet_series(shape=(2, 8, 8), seed=41)
    assert send_datasets(series, node.port) == [0, 0]
    assert send_datasets(series[:1], node.port) == [0]  # identical: still fine
    assert send_datasets([_changed(series[0])], node.port) == [0x0111]
    assert "conflicting_instance: refuse" in caplog.text
    other = make_pet_series(shape=(1, 8, 8), seed=42)
    other[0].SOPInstanceUID = series[1].SOPInstanceUID
    assert send_datasets(other, node.port) == [0x0111]


# --- 3. an interrupted send resends only what was not confirmed ------------------------------------------------
class FlakySink:
    """A pynetdicom storage SCP that fails the Nth C-STORE of its first association (as a PACS that runs out of
    space mid-series, or an association that breaks) and counts every C-STORE it receives per SOP Instance."""

    def __init__(self, fail_from: int) -> None:
        self.fail_from = fail_from
        self.received: list[str] = []
        self.associations = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="FLAKY")
        ae.add_supported_context(PET, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)])
        self.port = self.server.server_address[1]

    def _accepted(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def _store(self, event: Any) -> int:
        with self._lock:
            if self.associations == 1 and len(self.received) >= self.fail_from:
                event.assoc.abort()  # the association breaks mid-series
                return 0xA700
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def flaky_sink() -> Iterator[FlakySink]:
    sink = FlakySink(fail_from=5)
    yield sink
    sink.stop()


def test_retry_sends_only_unconfirmed_instances(start_node, flaky_sink: FlakySink):
    node = start_node([pet_rule([{"peer": "flaky"}])],
                      peers=[{"name": "flaky", "ae_title": "FLAKY", "host": "127.0.0.1", "port": flaky_sink.port}])
    series = make_pet_series(shape=(12, 8, 8), seed=51)
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series, node.port) == [0] * 12
    assert wait_state(node, uid, ["delivered", "failed"], timeout=60) == "delivered", node.db.sends(uid)
    assert flaky_sink.associations >= 2
    assert len(flaky_sink.received) == 12 == len(set(flaky_sink.received)), "duplicates at the destination"
    send = node.db.sends(uid)[0]
    assert send["sent"] == 12 and send["attempts"] == 2


# --- 4. the SCU response race -------------------------------------------------------------------------------
def _preempted_reactor(event: Any) -> None:
    """Fault injection: the association's reactor thread is descheduled right after its pause checkpoint (its
    flag still says "paused") and, when it runs again, polls the DIMSE queue as the responses land: what GIL
    contention does to it while the node also receives. Each C-STORE then has a fair chance of losing its
    response to the reactor (about one in ten here), as in the field."""
    scu_conn_open(event)
    assoc = event.assoc

    class LateCheckpoint(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            result = super().wait(timeout)
            time.sleep(0.03)  # descheduled here, with _is_paused still True
            return result

    checkpoint = LateCheckpoint()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    get_msg = assoc.dimse.get_msg

    def reactor_polls_as_responses_land(block: bool = False) -> Any:
        if threading.current_thread() is assoc and not block:
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline:
                try:
                    return assoc.dimse.msg_queue.get_nowait()
                except queue.Empty:
                    time.sleep(0.00005)
            return None, None
        return get_msg(block)

    assoc.dimse.get_msg = reactor_polls_as_responses_land


scu_conn_open = scu.handle_conn_open


def test_sends_survive_a_preempted_reactor(monkeypatch: pytest.MonkeyPatch, storescp_sink: StoreSCP,
                                           tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(scu, "handle_conn_open", _preempted_reactor)
    files = write_series(make_pet_series(shape=(80, 4, 4), seed=61), tmp_path / "out")
    report = scu.send_files(files, "SINK", "127.0.0.1", storescp_sink.port, timeout_s=3)
    assert report.ok, report.summary()
    assert "Received unexpected" not in caplog.text
    assert storescp_sink.wait_for(80)


def test_one_slow_series_does_not_block_the_next(start_node, tmp_path: Path):
    """Two sends to one destination run on two associations: a stalled one does not hold the other back."""
    release = threading.Event()
    got: list[str] = []
    ae = AE(ae_title="SLOW")
    ae.add_supported_context(PET, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])

    def store(event: Any) -> int:
        series = str(event.dataset.SeriesDescription)
        if "first" in series:
            release.wait(30)  # the first series stalls at the destination
        got.append(series)
        return 0

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        node = start_node([pet_rule([{"peer": "slow"}])], send={"timeout_s": 40, "poll_interval_s": 0.1,
                                                                  "associations_per_destination": 2},
                          peers=[{"name": "slow", "ae_title": "SLOW", "host": "127.0.0.1",
                                  "port": server.server_address[1]}])
        a = make_pet_series(shape=(2, 8, 8), seed=71, series_description="first")
        b = make_pet_series(shape=(2, 8, 8), seed=72, series_description="second")
        assert send_datasets(a, node.port) == [0, 0]
        assert wait_until(lambda: node.db.sends(str(a[0].SeriesInstanceUID)), timeout=30)
        assert send_datasets(b, node.port) == [0, 0]
        assert wait_state(node, str(b[0].SeriesInstanceUID), ["delivered"], timeout=30) == "delivered"
        assert not release.is_set() and all("second" in g for g in got)
    finally:
        release.set()
        server.shutdown()


# --- 5. called AE ---------------------------------------------------------------------------------------------
def test_called_ae_is_recorded_and_routes(start_node):
    rules = [pet_rule(SINK, name="by-called-ae", match={"modality": ["PT"], "called_ae": ["PETNODE_BRAIN"]},
                      priority=10),
             pet_rule(SINK, name="other")]
    node = start_node(rules, called_ae_aliases=["PETNODE_BRAIN"])
    series = make_pet_series(shape=(2, 8, 8), seed=81)
    assert send_datasets(series, node.port, called_ae="PETNODE_BRAIN") == [0, 0]
    uid = str(series[0].SeriesInstanceUID)
    assert node.db.series(uid)["called_ae"] == "PETNODE_BRAIN"
    assert wait_until(lambda: node.db.series(uid)["rule"], timeout=30) == "by-called-ae"


def test_unknown_called_ae_refused_when_configured(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)], refuse_unknown_called_ae=True, called_ae_aliases=["PETNODE2"])
    assert echoscu("127.0.0.1", node.port, called_ae="WRONGAE").returncode != 0
    assert "called AE 'WRONGAE' is not ours" in caplog.text
    assert echoscu("127.0.0.1", node.port, called_ae="PETNODE2").returncode == 0
    assert echoscu("127.0.0.1", node.port, called_ae="PETNODE").returncode == 0


# --- 6. invalid UIDs ------------------------------------------------------------------------------------------
def test_invalid_uids_refused_leading_zero_logged(start_node, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    bad = make_pet_series(shape=(1, 8, 8), seed=91)
    bad[0].SeriesInstanceUID = "../../x"
    assert send_datasets(bad, node.port) == [0xA900]
    assert "SeriesInstanceUID '../../x' is not a valid UID" in caplog.text
    assert node.db.series("../../x") is None
    long_uid = make_pet_series(shape=(1, 8, 8), seed=92)
    long_uid[0].StudyInstanceUID = "1." + "2" * 70
    assert send_datasets(long_uid, node.port) == [0xA900]
    odd = make_pet_series(shape=(1, 8, 8), seed=93)
    odd[0].SOPInstanceUID = "1.2.840.0123.4"
    assert send_datasets(odd, node.port) == [0]
    assert "accepted although a component has a leading zero" in caplog.text
    assert node.db.has_instance("1.2.840.0123.4")


# --- 7. half a series without NumberOfSlices ------------------------------------------------------------------
def test_half_real_series_without_number_of_slices_stays_incomplete(realdata: Path, start_node):
    files = sorted((realdata / "ohif_acrin_nsclc_fdg_pet_042" / "PT_AC").glob("*.dcm"))[:67]
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        del ds.NumberOfSlices
    node = start_node([pet_rule(SINK)])
    assert send_datasets(datasets, node.port) == [0] * 67
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["incomplete", "sending", "failed", "delivered"]) == "incomplete"
    error = node.db.series(uid)["error"]
    assert "68 slice(s) missing by Image Index" in error and "1-68" in error


def test_short_series_without_number_of_slices_completes(start_node):
    series = make_pet_series(shape=(5, 8, 8), seed=101)
    for ds in series:
        del ds.NumberOfSlices
    node = start_node([pet_rule(SINK)])
    assert send_datasets(series, node.port) == [0] * 5
    uid = str(series[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["incomplete", "sending", "failed", "delivered"]) == "sending"


# --- 8. undecodable data after a valid file meta ----------------------------------------------------------------
def test_garbage_after_valid_file_meta_is_cannot_understand(start_node, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    garbage = np.random.default_rng(0).bytes(3000)
    assert _send_raw(garbage, node.port) == 0xC210
    assert "cannot be decoded" in caplog.text


def _send_raw(data: bytes, port: int) -> int:
    """C-STORE ``data`` as the data set bytes, exactly as given (what a broken modality puts on the wire)."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(PET, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="PETNODE")
    assert assoc.is_established
    scu.keep_responses_for_caller(assoc)
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = PET, generate_uid()
        req.DataSet = BytesIO(data)
        assoc.dimse.send_msg(req, next(iter(assoc.accepted_contexts)).context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        return int(rsp.Status) if rsp is not None else -1
    finally:
        assoc.release()


# --- 9. orphan spool files --------------------------------------------------------------------------------------
def test_unknown_spool_files_are_swept_at_start(start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(SINK)])
    series = make_pet_series(shape=(2, 8, 8), seed=121)
    assert send_datasets(series, node.port) == [0, 0]
    known = sorted(p for p in (node.settings.data_dir / "spool").rglob("*.dcm"))
    node.stop()
    # What a kill -9 between the file's rename and its database record leaves: a file nobody knows, a temp file.
    orphan = known[0].parent / "1.2.3.999.dcm"
    orphan.write_bytes(known[0].read_bytes())
    temp = known[0].parent / ".1.2.3.998.dcm.abc.tmp"
    temp.write_bytes(b"half")
    node2 = start_node([pet_rule(SINK)])
    assert not orphan.exists() and not temp.exists()
    assert all(p.exists() for p in known)
    assert "removed 2 spool file(s) the database does not know" in caplog.text
    assert len(node2.db.instances(str(series[0].SeriesInstanceUID))) == 2


# --- 10. a night-long PACS outage -------------------------------------------------------------------------------
def test_default_retry_policy_outlasts_a_night(start_node):
    node = start_node([pet_rule(SINK)], send={})  # the embedded defaults
    row = {"created_at": 0.0}
    t, attempts = 0.0, 0
    while True:  # walk the schedule of a destination that never answers
        attempts += 1
        nxt = node.retry_at(row, attempts, t)
        if nxt is None:
            break
        assert nxt - t <= node.settings.send.backoff_max_s  # capped backoff
        t = nxt
    assert t >= 24 * 3600, f"gave up after {t / 3600:.1f} h"
    assert attempts > 50


def test_status_shows_retrying_and_next_attempt(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from dicom_node.node import Node
    from dicom_node.rules import load_rules
    from dicom_node.settings import load_settings

    config = write_config(tmp_path, [pet_rule([{"peer": "pacs"}])],
                          peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
                          send={"backoff_initial_s": 600, "poll_interval_s": 0.1, "timeout_s": 2})
    settings = load_settings(config)
    node = Node(settings, load_rules(settings.resolved_rules_file(), peer_names=["pacs"]))
    node.start()
    try:
        series = make_pet_series(shape=(2, 8, 8), seed=131)
        uid = str(series[0].SeriesInstanceUID)
        assert send_datasets(series, node.port) == [0, 0]
        assert wait_until(lambda: any(s["attempts"] for s in node.db.sends(uid)), timeout=60)
    finally:
        node.stop()
    assert main(["-c", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert "retrying, next attempt at" in out and "(attempt 2;" in out
