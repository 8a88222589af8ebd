from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError, DiskFullError
from dicom_node.node import backoff_delay
from dicom_node.settings import DiskSettings, load_settings
from dicom_node.spool import Spool, safe_name, write_durable
from dicom_node.state import InstanceRecord, SendState, SeriesState, StateDB


def _rec(sop: str, series: str = "1.2.3", path: Path = Path("/x"), expected: int | None = 3) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, series_uid=series, study_uid="1.2", sop_class_uid="1.2.840",
                          modality="PT", path=path, ipp=(0.0, 0.0, float(len(sop))), iop=(1, 0, 0, 0, 1, 0),
                          expected_count=expected, calling_ae="SCANNER", called_ae="PETNODE", peer_host="127.0.0.1")


@pytest.fixture
def db(tmp_path: Path):
    d = StateDB(tmp_path / "state.sqlite3")
    yield d
    d.close()


def test_record_counts_and_duplicates(db: StateDB):
    assert db.record_instance(_rec("1.1"))
    assert db.record_instance(_rec("1.11"))
    assert not db.record_instance(_rec("1.1"))  # duplicate SOP Instance UID: stored once
    row = db.series("1.2.3")
    assert row["received_count"] == 2 and row["expected_count"] == 3 and row["state"] == "receiving"
    assert [i["ipp"] for i in db.instances("1.2.3")] == [(0.0, 0.0, 3.0), (0.0, 0.0, 4.0)]


def test_concurrent_records_are_all_kept(db: StateDB):
    def worker(k: int) -> None:
        for i in range(50):
            db.record_instance(_rec(f"{k}.{i}", series="9.9"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.series("9.9")["received_count"] == 200 == len(db.instances("9.9"))


def test_state_transitions_and_reopen_on_late_instance(db: StateDB):
    db.record_instance(_rec("1.1"))
    assert db.set_state("1.2.3", SeriesState.INCOMPLETE, error="gap", expect=[SeriesState.RECEIVING])
    assert not db.set_state("1.2.3", SeriesState.PROCESSING, expect=[SeriesState.COMPLETE])
    db.record_instance(_rec("1.12"))  # a late slice re-opens an incomplete series
    assert db.series("1.2.3")["state"] == "receiving"


def test_force_complete_only_from_receiving_or_incomplete(db: StateDB):
    db.record_instance(_rec("1.1"))
    assert db.request_complete("1.2.3") and db.series("1.2.3")["force_complete"] == 1
    db.set_state("1.2.3", SeriesState.COMPLETE)
    assert db.series("1.2.3")["force_complete"] == 0
    assert not db.request_complete("1.2.3")


def test_sends_claim_finish_settle_and_retry(db: StateDB):
    db.record_instance(_rec("1.1"))
    db.set_state("1.2.3", SeriesState.SENDING)
    db.add_send("1.2.3", "A", "h", 1, total=1)
    db.add_send("1.2.3", "A", "h", 1, total=1)  # idempotent
    db.add_send("1.2.3", "B", "h", 2, total=1)
    assert len(db.sends("1.2.3")) == 2
    claimed = db.claim_due_sends(now=1e12, busy=["B@h:2"])
    assert [c["ae_title"] for c in claimed] == ["A"]
    assert db.claim_due_sends(now=1e12) and not db.claim_due_sends(now=1e12)  # B now, nothing twice
    a, b = db.sends("1.2.3")
    assert db.finish_send(a["id"], ok=True, sent=1, error=None, retry_at=None) is SendState.DONE
    assert db.settle_series("1.2.3") is None  # B still sending
    assert db.finish_send(b["id"], ok=False, sent=0, error="down", retry_at=None) is SendState.FAILED
    assert db.settle_series("1.2.3") is SeriesState.FAILED
    assert "B@h:2" in db.series("1.2.3")["error"]
    assert db.retry_sends("1.2.3") == 1
    assert db.series("1.2.3")["state"] == "sending"
    assert [s["state"] for s in db.sends("1.2.3")] == ["done", "pending"]


def test_recover_after_crash(tmp_path: Path):
    db = StateDB(tmp_path / "s.db")
    db.record_instance(_rec("1.1"))
    db.set_state("1.2.3", SeriesState.PROCESSING)
    db.add_send("1.2.3", "A", "h", 1, total=1)
    db.claim_due_sends(now=1e12)
    db.association_opened("x", "A", "B", "p")
    db.close()  # what kill -9 leaves behind: states mid-flight
    db = StateDB(tmp_path / "s.db")
    assert db.recover() == {"processing": 1, "sending": 1}
    assert db.series("1.2.3")["state"] == "complete"
    assert db.sends("1.2.3")[0]["state"] == "pending" and db.associations() == []
    db.close()


def test_purge_forgets_instances_so_a_resend_is_stored_again(db: StateDB):
    db.record_instance(_rec("1.1"))
    db.set_state("1.2.3", SeriesState.DELIVERED)
    db.mark_purged("1.2.3")
    assert not db.has_instance("1.1")
    assert db.record_instance(_rec("1.1"))
    row = db.series("1.2.3")
    assert row["state"] == "receiving" and row["received_count"] == 1 and row["purged_at"] is None


def test_backoff_doubles_and_caps():
    assert [backoff_delay(n, 5, 60) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]


def test_write_durable_is_atomic_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "a" / "b" / "x.dcm"
    write_durable(target, b"hello")
    assert target.read_bytes() == b"hello"
    import errno
    import os

    def no_space(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(DiskFullError):
        write_durable(tmp_path / "a" / "b" / "y.dcm", b"data")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["x.dcm"]  # no temp left behind


def test_spool_watermark_and_safe_names(tmp_path: Path):
    spool = Spool(tmp_path / "var", DiskSettings(min_free_mb=1e12, max_used_percent=100))
    with pytest.raises(DiskFullError, match="below the minimum"):
        spool.store("1.2", "1.2.3", "1.2.3.4", b"x")
    assert safe_name("1.2.3") == "1.2.3"
    assert safe_name("../../etc/passwd").startswith("x") and "/" not in safe_name("../../etc/passwd")


def test_settings_errors_name_file_key_and_value(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text("ae_title: WAY_TOO_LONG_AE_TITLE_X\nport: 70000\nsend: {max_atempts: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert str(path) in text and "ae_title = 'WAY_TOO_LONG_AE_TITLE_X'" in text and "port = 70000" in text
    assert "send.max_atempts: unknown key; did you mean 'max_attempts'?" in text


def test_settings_relative_paths_follow_the_file(tmp_path: Path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "node.yaml"
    path.write_text("data_dir: ../data\nrules_file: r.yaml\npeers: [{name: pacs, ae_title: PACS, host: h, port: 104}]\n")
    s = load_settings(path)
    assert s.data_dir == (tmp_path / "data").resolve()
    assert s.resolved_rules_file() == (tmp_path / "cfg" / "r.yaml").resolve()
    assert s.peer("pacs").port == 104 and s.peer_by_ae("PACS").name == "pacs"
