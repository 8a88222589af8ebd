"""Series lifecycle (issue 8): retention of every final state, room made under disk pressure, purges exclusive
with receiving, sends keyed on the output, work that cannot vanish, and reprocessing after a rules fix."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_node import retention, scu
from dicom_node import spool as spool_module
from dicom_node.cli import main
from dicom_node.state import SeriesState
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP
from tests.e2e.conftest import pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_ct_series, make_pet_series

pytestmark = pytest.mark.network

NOWHERE = [{"ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}]
HOUR = 3600.0


def _sink_peer(sink: StoreSCP) -> dict[str, Any]:
    return {"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": sink.port}


def _files_of(node: Any, uid: str) -> list[Path]:
    return [Path(i["path"]) for i in node.db.instances(uid)]


def test_every_final_state_has_a_retention_age(start_node):
    node = start_node([pet_rule(NOWHERE)], send={"max_attempts": 1, "poll_interval_s": 0.1},
                      retention={"unrouted_max_age_h": 2, "failed_max_age_h": 5})
    ct = make_ct_series(shape=(3, 16, 16), seed=1)
    pet = make_pet_series(shape=(3, 8, 8), seed=2)
    assert send_datasets(ct, node.port) == [0] * 3
    assert send_datasets(pet, node.port) == [0] * 3
    ct_uid, pet_uid = str(ct[0].SeriesInstanceUID), str(pet[0].SeriesInstanceUID)
    assert wait_state(node, ct_uid, ["unrouted"]) == "unrouted"
    assert wait_state(node, pet_uid, ["failed"]) == "failed"
    ct_files, pet_files = _files_of(node, ct_uid), _files_of(node, pet_uid)
    now = time.time()
    assert node.run_retention(now=now + 1 * HOUR) == 0
    assert node.run_retention(now=now + 3 * HOUR) == 1  # the CT of the PET/CT study no longer stays forever
    assert node.db.series(ct_uid)["purged_at"] is not None and not any(f.exists() for f in ct_files)
    assert all(f.exists() for f in pet_files)
    assert node.run_retention(now=now + 6 * HOUR) == 1
    assert not any(f.exists() for f in pet_files)


def test_disk_pressure_removes_oldest_finished_series_first(start_node, monkeypatch: pytest.MonkeyPatch):
    node = start_node([pet_rule(NOWHERE)])
    series = [make_ct_series(shape=(2, 8, 8), seed=10 + i) for i in range(3)]
    for s in series:
        assert send_datasets(s, node.port) == [0, 0]
        assert wait_state(node, str(s[0].SeriesInstanceUID), ["unrouted"]) == "unrouted"
    receiving = make_ct_series(shape=(2, 8, 8), seed=20)  # still receiving: never a candidate
    uids = [str(s[0].SeriesInstanceUID) for s in series]
    removed: list[str] = []
    real_purge = retention.purge_series

    def purge(db: Any, spool: Any, row: dict[str, Any], reason: str) -> bool:
        removed.append(row["series_uid"])
        return real_purge(db, spool, row, reason)

    # The disk is "pressed" until two series are gone.
    monkeypatch.setattr(retention, "_pressure", lambda settings: "pressed" if len(removed) < 2 else None)
    monkeypatch.setattr(retention, "purge_series", purge)
    assert send_datasets(receiving[:1], node.port) == [0]
    oldest_first = sorted(uids, key=lambda u: node.db.series(u)["updated_at"])
    assert node.make_room() == 2
    assert removed == oldest_first[:2]
    assert node.db.series(oldest_first[2])["purged_at"] is None
    assert node.db.series(str(receiving[0].SeriesInstanceUID))["purged_at"] is None


def test_store_makes_room_before_refusing(start_node, monkeypatch: pytest.MonkeyPatch):
    node = start_node([pet_rule(NOWHERE)])
    old = make_ct_series(shape=(2, 8, 8), seed=30)
    assert send_datasets(old, node.port) == [0, 0]
    assert wait_state(node, str(old[0].SeriesInstanceUID), ["unrouted"]) == "unrouted"
    # "Full" until something finished is removed; then a new instance is accepted instead of 0xA700.
    full = {"on": True}
    monkeypatch.setattr(node.spool, "space_problem", lambda: "full" if full["on"] else None)
    monkeypatch.setattr(retention, "_pressure", lambda settings: "full" if full["on"] else None)
    real_purge = retention.purge_series

    def purge(*args: Any) -> bool:
        ok = real_purge(*args)
        full["on"] = not ok
        return ok

    monkeypatch.setattr(retention, "purge_series", purge)
    new = make_pet_series(shape=(1, 8, 8), seed=31)
    assert send_datasets(new, node.port) == [0]
    assert node.db.series(str(old[0].SeriesInstanceUID))["purged_at"] is not None


def test_status_shows_disk_budget_and_next_removal(start_node, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    node = start_node([pet_rule(NOWHERE)])
    ct = make_ct_series(shape=(2, 8, 8), seed=40)
    assert send_datasets(ct, node.port) == [0, 0]
    assert wait_state(node, str(ct[0].SeriesInstanceUID), ["unrouted"]) == "unrouted"
    assert main(["-c", str(tmp_path / "config" / "node.yaml"), "status"]) == 0
    out = capsys.readouterr().out
    assert "MB free of" in out and "finished series are removed below" in out
    assert "next to remove" in out and str(ct[0].SeriesInstanceUID) in out and "unrouted" in out


def test_series_received_again_after_purge_is_sent_again(start_node, storescp_sink: StoreSCP):
    node = start_node([pet_rule([{"peer": "sink"}])], peers=[_sink_peer(storescp_sink)])
    series = make_pet_series(shape=(3, 8, 8), seed=50)
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series, node.port) == [0] * 3
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered"
    assert node.run_retention(now=time.time() + 100 * HOUR) == 1
    stores_before = storescp_sink.log_text().count("storing DICOM file")
    assert send_datasets(series, node.port) == [0] * 3  # the same series again, after its purge
    assert wait_until(lambda: node.db.series(uid)["state"] == "delivered" and node.db.sends(uid), timeout=60)
    assert wait_until(lambda: storescp_sink.log_text().count("storing DICOM file") >= stores_before + 3,
                      timeout=30), "marked delivered without a single C-STORE"
    assert node.db.sends(uid)[0]["sent"] == 3


def test_purge_and_receive_exclude_each_other(start_node, monkeypatch: pytest.MonkeyPatch):
    node = start_node([pet_rule(NOWHERE)])
    ct = make_ct_series(shape=(3, 8, 8), seed=60)
    uid = str(ct[0].SeriesInstanceUID)
    assert send_datasets(ct[:2], node.port) == [0, 0]
    assert wait_state(node, uid, ["unrouted"]) == "unrouted"
    in_purge, go_on = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        in_purge.set()
        go_on.wait(10)  # the purge is deleting while an instance of the series arrives
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(spool_module.shutil, "rmtree", slow_rmtree)
    purger = threading.Thread(target=node.run_retention, kwargs={"now": time.time() + 100 * HOUR})
    purger.start()
    assert in_purge.wait(10)
    # From here on, note when the C-STORE's handler asks for its series' lock (the purge holds it).
    asked = threading.Event()
    real_lock = node.spool.series_lock

    def series_lock(series_uid: str) -> Any:
        if threading.current_thread() is not purger:
            asked.set()
        return real_lock(series_uid)

    monkeypatch.setattr(node.spool, "series_lock", series_lock)
    statuses: list[int] = []
    sender = threading.Thread(target=lambda: statuses.extend(send_datasets(ct[2:], node.port)))
    sender.start()
    assert asked.wait(10), "the C-STORE never reached the node"
    assert not statuses, "the C-STORE was answered while its series was being deleted"
    go_on.set()
    purger.join(10)
    sender.join(10)
    assert statuses == [0]
    files = _files_of(node, uid)
    assert len(files) == 1 and files[0].exists()  # acknowledged, and still there


def test_failed_purge_is_not_recorded(start_node, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule(NOWHERE)])
    ct = make_ct_series(shape=(2, 8, 8), seed=70)
    uid = str(ct[0].SeriesInstanceUID)
    assert send_datasets(ct, node.port) == [0, 0]
    assert wait_state(node, uid, ["unrouted"]) == "unrouted"

    def broken(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(spool_module.shutil, "rmtree", broken)
    assert node.run_retention(now=time.time() + 100 * HOUR) == 0
    assert node.db.series(uid)["purged_at"] is None and len(node.db.instances(uid)) == 2
    assert "could not remove its files" in caplog.text


def test_error_in_the_error_path_is_swept(start_node, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    from dicom_node import node as node_module
    from dicom_node.errors import DicomNodeError

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise DicomNodeError("the denoiser failed")

    monkeypatch.setattr(node_module, "process_series", failing)
    node = start_node([pet_rule(NOWHERE)])
    real_set_state = node.db.set_state

    def locked_when_failing(uid: str, state: SeriesState, **kw: Any) -> bool:
        if state is SeriesState.FAILED:
            raise sqlite3.OperationalError("database is locked")
        return real_set_state(uid, state, **kw)

    monkeypatch.setattr(node.db, "set_state", locked_when_failing)
    pet = make_pet_series(shape=(2, 8, 8), seed=80)
    uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet, node.port) == [0, 0]
    assert wait_until(lambda: "crashed outside its own error handling" in caplog.text, timeout=30)
    assert node.db.series(uid)["state"] == "processing"  # what vanished work looks like
    monkeypatch.setattr(node.db, "set_state", real_set_state)
    assert node.sweep_stuck(now=time.time() + 1000)["processing"] == 1
    # Queued again, processed again (still failing), and this time its failure is recorded.
    assert wait_state(node, uid, ["failed"], timeout=30) == "failed"


def test_crashing_send_obeys_the_retry_policy(start_node, monkeypatch: pytest.MonkeyPatch):
    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(scu, "send_files", crash)
    node = start_node([pet_rule(NOWHERE)], send={"max_attempts": 2, "backoff_initial_s": 0.1,
                                                 "backoff_max_s": 0.1, "poll_interval_s": 0.1})
    pet = make_pet_series(shape=(2, 8, 8), seed=90)
    uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet, node.port) == [0, 0]
    assert wait_state(node, uid, ["failed"], timeout=30) == "failed"
    send = node.db.sends(uid)[0]
    assert send["state"] == "failed" and send["attempts"] == 2 and "boom" in send["last_error"]


def test_reprocess_after_a_rules_fix(tmp_path: Path, start_node, storescp_sink: StoreSCP,
                                     capsys: pytest.CaptureFixture[str]):
    node = start_node([pet_rule([{"peer": "sink"}], match={"modality": ["PT"], "series_description": "^WB"})],
                      peers=[_sink_peer(storescp_sink)])
    pet = make_pet_series(shape=(3, 8, 8), seed=100, series_description="PET WB")
    uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet, node.port) == [0] * 3
    assert wait_state(node, uid, ["unrouted"]) == "unrouted"  # the rule's regex was wrong
    assert send_datasets(pet, node.port) == [0] * 3  # a re-send is a duplicate: no way back that way
    node.stop()
    config = write_config(tmp_path, [pet_rule([{"peer": "sink"}], match={"modality": ["PT"]})],
                          peers=[_sink_peer(storescp_sink)])
    assert main(["-c", str(config), "series", "reprocess", uid[:40]]) == 0
    assert "routed again with the current rules" in capsys.readouterr().out
    fixed = start_node([pet_rule([{"peer": "sink"}], match={"modality": ["PT"]})], peers=[_sink_peer(storescp_sink)])
    assert wait_state(fixed, uid, ["delivered", "failed"]) == "delivered"
    assert storescp_sink.wait_for(3)
    assert main(["-c", str(config), "series", "reprocess", uid, "--rule", "nope"]) == 2
    assert main(["-c", str(config), "series", "reprocess", uid, "--rule", "pet-gaussian"]) == 0
    assert wait_until(lambda: fixed.db.series(uid)["state"] == "delivered" and fixed.db.sends(uid)
                      and fixed.db.sends(uid)[0]["sent"] == 3, timeout=60)


def test_instance_after_delivery_reopens_the_series(start_node, storescp_sink: StoreSCP,
                                                    caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    node = start_node([pet_rule([{"peer": "sink"}])], peers=[_sink_peer(storescp_sink)])
    pet = make_pet_series(shape=(4, 8, 8), seed=110)
    for ds in pet:
        del ds.NumberOfSlices
        del ds.ImageIndex
    uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet[:3], node.port) == [0] * 3
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered"
    first = node.db.series(uid)["output_series_uid"]
    assert send_datasets(pet[3:], node.port) == [0]  # a straggler
    assert "arrived after the series was delivered" in caplog.text
    assert wait_until(lambda: node.db.series(uid)["state"] == "delivered"
                      and node.db.series(uid)["output_series_uid"] != first, timeout=60), node.db.series(uid)
    new = node.db.series(uid)["output_series_uid"]
    assert [s["total"] for s in node.db.sends(uid) if s["output_series_uid"] == new] == [4]
