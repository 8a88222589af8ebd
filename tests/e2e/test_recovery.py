"""Never lose data: kill -9 while a series arrives, restart, finish; and a destination that is down at first."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from dicom_node.state import StateDB
from tests.conftest import wait_until
from tests.dicomtools import Orthanc, StoreSCP, free_port
from tests.e2e.conftest import NodeProcess, pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_pet_series

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_kill9_while_receiving_then_restart(tmp_path: Path, orthanc: Orthanc):
    datasets = make_pet_series(shape=(20, 24, 24), seed=11)
    uid = str(datasets[0].SeriesInstanceUID)
    config = write_config(
        tmp_path, [pet_rule([{"peer": "pacs"}])],
        peers=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    node = NodeProcess(config, tmp_path / "node.log").start()
    acknowledged: list[str] = []
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PETNODE")
        assert assoc.is_established
        for i, ds in enumerate(datasets):
            if i == 12:
                node.kill9()  # mid-series, association still open
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
        assoc.abort()
        assert 1 <= len(acknowledged) <= 13  # an instance in flight during the kill may or may not be acked

        # Every acknowledged instance is on disk and in the database after the crash.
        db = StateDB(tmp_path / "var" / "state.sqlite3")
        stored = {r["sop_instance_uid"]: Path(r["path"]) for r in db.instances(uid)}
        db.close()
        assert set(acknowledged) <= set(stored)
        for sop in acknowledged:
            assert dcmread(stored[sop]).SOPInstanceUID == sop

        # Restart; the scanner re-sends the whole series (what a sender does after a failure).
        node.start(port=node.port)
        statuses = send_datasets(datasets, node.port)
        assert statuses == [0] * len(datasets)
        db = StateDB(tmp_path / "var" / "state.sqlite3")
        try:
            state = wait_until(lambda: db.series(uid)["state"] in ("delivered", "failed") and db.series(uid),
                               timeout=60)
            assert state and state["state"] == "delivered", state
            assert state["received_count"] == len(datasets)  # duplicates stored once
            derived_uid = state["output_series_uid"]
        finally:
            db.close()
        found = orthanc.wait_for_series(lambda s: s["MainDicomTags"]["SeriesInstanceUID"] == derived_uid)
        assert found is not None and len(found["Instances"]) == len(datasets)
        derived = [s for s in orthanc.series(expand=True)
                   if s["MainDicomTags"].get("SeriesDescription", "").endswith("]")]
        assert len(derived) == 1  # one derived series, no duplicate
    finally:
        node.stop()


def test_down_destination_does_not_delay_the_other(start_node, storescp_sink: StoreSCP, tmp_path: Path):
    late_port = free_port()
    node = start_node(
        [pet_rule([{"peer": "up"}, {"peer": "late"}])],
        peers=[{"name": "up", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port},
               {"name": "late", "ae_title": "LATE", "host": "127.0.0.1", "port": late_port}],
        send={"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "poll_interval_s": 0.1, "timeout_s": 5,
              "max_attempts": 100},
    )
    datasets = make_pet_series(shape=(8, 24, 24), seed=13)
    uid = str(datasets[0].SeriesInstanceUID)
    assert send_datasets(datasets, node.port) == [0] * 8
    # The healthy destination gets everything while the other one is still down.
    assert storescp_sink.wait_for(8, timeout=30)
    late_send = wait_until(lambda: next((s for s in node.db.sends(uid) if s["ae_title"] == "LATE"
                                         and s["attempts"] >= 2), None), timeout=30)
    assert late_send is not None and late_send["state"] == "pending"
    assert "cannot connect" in late_send["last_error"] or "no association" in late_send["last_error"]
    assert node.db.series(uid)["state"] == "sending"
    with StoreSCP(tmp_path / "late", ae_title="LATE", port=late_port) as late:
        assert late.wait_for(8, timeout=30)
        assert wait_state(node, uid, ["delivered"], timeout=30) == "delivered"
    sends = {s["ae_title"]: s for s in node.db.sends(uid)}
    assert sends["SINK"]["attempts"] == 1 and sends["LATE"]["attempts"] >= 3
