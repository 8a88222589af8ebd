from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.errors import ConfigError, DiskFullError
from dicom_node.node import backoff_delay
from dicom_node.settings import DiskSettings, load_settings
from dicom_node.spool import Spool, safe_name, write_durable, write_new_durable
from dicom_node.state import InstanceRecord, Payload, SendState, SeriesState, StateDB


def _rec(sop: str, series: str = "1.2.3", path: Path = Path("/x"), expected: int | None = 3) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, series_uid=series, study_uid="1.2", sop_class_uid="1.2.840",
                          modality="PT", path=path, ipp=(0.0, 0.0, float(len(sop))), iop=(1, 0, 0, 0, 1, 0),
                          expected_count=expected, calling_ae="SCANNER", called_ae="PETNODE", peer_host="127.0.0.1")


@pytest.fixture(params=["sqlite", "postgresql"])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], StateDB]]:
    """Opens the state database of this test, on each backend: the same schema, migrations and behaviour."""
    target: Path | str = (tmp_path / "state.sqlite3" if request.param == "sqlite"
                          else request.getfixturevalue("postgres_url"))
    opened: list[StateDB] = []

    def _open() -> StateDB:
        opened.append(StateDB(target))
        return opened[-1]

    yield _open
    for d in opened:
        d.close()


@pytest.fixture
def db(open_db: Callable[[], StateDB]) -> StateDB:
    return open_db()


def raw_sql(db: StateDB, script: str) -> None:
    """Statements run as they are on the database behind ``db`` (to build an older schema)."""
    with db._tx() as c:
        for stmt in script.strip().split(";"):
            if stmt.strip():
                c.execute(stmt)


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


def test_recover_after_crash(open_db: Callable[[], StateDB]):
    db = open_db()
    db.record_instance(_rec("1.1"))
    db.set_state("1.2.3", SeriesState.PROCESSING)
    db.add_send("1.2.3", "A", "h", 1, total=1)
    db.claim_due_sends(now=1e12)
    db.association_opened("x", "A", "B", "p")
    db.close()  # what kill -9 leaves behind: states mid-flight
    db = open_db()
    assert db.recover() == {"processing": 1, "sending": 1}
    assert db.series("1.2.3")["state"] == "complete"
    assert db.sends("1.2.3")[0]["state"] == "pending" and db.associations() == []


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


def test_received_instances_are_written_under_their_name_and_replace_only_atomically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import errno
    import os

    spool = Spool(tmp_path / "var", DiskSettings(min_free_mb=1, max_used_percent=100))
    path = spool.store("1.2", "1.2.3", "1.2.3.4", b"first")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.4.dcm"]  # straight there: no temp, no rename
    assert write_new_durable(path, b"other") is False and path.read_bytes() == b"first"  # never over a file
    # What a crash in the middle of a write leaves (never recorded, so never acknowledged): the sender's retry
    # replaces it whole, through a temp file and a rename.
    path.write_bytes(b"fir")
    inode = path.stat().st_ino
    assert spool.store("1.2", "1.2.3", "1.2.3.4", b"first again") == path
    assert path.read_bytes() == b"first again" and path.stat().st_ino != inode

    def no_space(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(DiskFullError, match="out of space"):
        spool.store("1.2", "1.2.3", "1.2.3.5", b"data")
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.2.3.4.dcm"]  # the partial file is gone


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


def test_changed_content_is_a_new_version_and_reopens(db: StateDB, tmp_path: Path):
    from dataclasses import replace

    from dicom_node.state import StoreOutcome

    first = replace(_rec("1.1"), sha256="aa")
    assert db.store_instance(first)[0] is StoreOutcome.NEW
    assert db.store_instance(first)[0] is StoreOutcome.DUPLICATE  # same digest
    db.set_state("1.2.3", SeriesState.DELIVERED)
    outcome, before = db.store_instance(replace(first, sha256="bb", path=Path("/y")), previous_path=Path("/old"))
    assert outcome is StoreOutcome.REPLACED and before["state"] == "delivered"
    row = db.series("1.2.3")
    assert row["state"] == "receiving" and row["revision"] == 1 and row["received_count"] == 1
    assert [(v["path"], v["sha256"]) for v in db.instance_versions("1.2.3")] == [("/old", "aa")]
    assert db.instances("1.2.3")[0]["path"] == "/y"
    # The same SOP Instance UID in another series is a new instance there.
    assert db.store_instance(replace(first, series_uid="7.7"))[0] is StoreOutcome.NEW
    assert {r["series_uid"] for r in db.find_instance("1.1")} == {"1.2.3", "7.7"}


def test_changed_instance_while_sending_cancels_stale_sends(db: StateDB):
    from dataclasses import replace

    db.store_instance(replace(_rec("1.1"), sha256="aa"))
    db.set_outputs("1.2.3", "9.9.9", Path("/out"))
    db.add_send("1.2.3", "A", "h", 1, total=1, output_series_uid="9.9.9")
    db.set_state("1.2.3", SeriesState.SENDING)
    db.store_instance(replace(_rec("1.1"), sha256="bb"))
    assert db.series("1.2.3")["state"] == "receiving"
    assert db.sends("1.2.3") == [] and db.sends("1.2.3", include_cancelled=True)[0]["state"] == "cancelled"
    assert db.settle_series("1.2.3") is None  # a cancelled send never marks the series delivered


def test_sends_keyed_on_output_and_confirmed_instances(db: StateDB):
    db.add_send("1.2.3", "A", "h", 1, total=2, output_series_uid="9.1")
    db.add_send("1.2.3", "A", "h", 1, total=2, output_series_uid="9.2")  # a new output is a new send
    assert len(db.sends("1.2.3")) == 2
    db.confirm_sent("A@h:1", "1.2.3", ["5.1", "5.2"])
    db.confirm_sent("A@h:1", "1.2.3", ["5.1"])  # idempotent
    assert db.confirmed_for("A@h:1", "1.2.3") == {"5.1", "5.2"}
    assert db.confirmed_for("B@h:2", "1.2.3") == set()


def test_claim_allows_several_sends_per_destination(db: StateDB):
    for i in range(4):
        db.add_send(f"1.{i}", "A", "h", 1, total=1, output_series_uid=f"9.{i}")
    first = db.claim_due_sends(now=1e12, busy=[], per_destination=2)
    assert len(first) == 2
    assert db.claim_due_sends(now=1e12, busy=["A@h:1", "A@h:1"], per_destination=2) == []
    assert len(db.claim_due_sends(now=1e12, busy=["A@h:1"], per_destination=2)) == 1


def test_version_1_database_is_migrated_keeping_rows(tmp_path: Path):
    import sqlite3

    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, ipp TEXT, iop TEXT, received_at REAL NOT NULL);
        CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT, modality TEXT, sop_class_uid TEXT,
            calling_ae TEXT, called_ae TEXT, peer_host TEXT, expected_count INTEGER,
            received_count INTEGER NOT NULL DEFAULT 0, first_received REAL, last_received REAL,
            state TEXT NOT NULL, rule TEXT, error TEXT, force_complete INTEGER NOT NULL DEFAULT 0,
            output_series_uid TEXT, output_dir TEXT, processed_at REAL, delivered_at REAL, purged_at REAL,
            updated_at REAL NOT NULL);
        CREATE TABLE sends (id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL, destination TEXT NOT NULL,
            ae_title TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT,
            sent INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL,
            UNIQUE (series_uid, destination));
        INSERT INTO instances VALUES ('1.1', '1.2.3', '1.2.840', '/x', NULL, NULL, 5.0);
        INSERT INTO series (series_uid, state, received_count, output_series_uid, updated_at)
            VALUES ('1.2.3', 'sending', 1, '9.9', 5.0);
        INSERT INTO sends (series_uid, destination, ae_title, host, port, state, attempts, updated_at)
            VALUES ('1.2.3', 'A@h:1', 'A', 'h', 1, 'pending', 3, 7.0);
    """)
    conn.close()
    db = StateDB(path)
    try:
        assert db.has_instance("1.1", "1.2.3") and db.series("1.2.3")["revision"] == 0
        send = db.sends("1.2.3")[0]
        assert send["output_series_uid"] == "9.9" and send["attempts"] == 3 and send["created_at"] == 7.0
    finally:
        db.close()


# --------------------------------------------------------------------------------------------------------------
# Forwarding: original sends, study holds, the memory of forwards


def test_original_send_is_woken_not_duplicated(db: StateDB):
    db.record_instance(_rec("1.1"))
    db.add_send("1.2.3", "PACS", "h", 104, 1, output_series_uid="1.2.3", kind=Payload.ORIGINAL)
    (send,) = db.claim_due_sends(0.0 + 1e12)
    db.finish_send(send["id"], ok=True, sent=1, error=None, retry_at=None)
    db.add_send("1.2.3", "PACS", "h", 104, 2, output_series_uid="1.2.3", kind=Payload.ORIGINAL)  # more arrived
    (again,) = db.sends("1.2.3")
    assert again["id"] == send["id"] and again["state"] == "pending" and again["total"] == 2
    db.add_send("1.2.3", "PACS", "h", 104, 2, output_series_uid="1.2.3")  # a derived output of the same UID key
    assert len(db.sends("1.2.3")) == 1  # same (series, output, destination): still one row
    db.claim_due_sends(1e12)
    assert db.wake_original_sends("1.2.3") == 0  # running: not woken twice


def test_reopen_cancels_derived_sends_but_keeps_the_original(db: StateDB):
    db.record_instance(_rec("1.1"))
    db.add_send("1.2.3", "PACS", "h", 104, 1, output_series_uid="1.2.3", kind=Payload.ORIGINAL)
    db.add_send("1.2.3", "PACS", "h", 104, 1, output_series_uid="9.9.9")
    db.set_state("1.2.3", SeriesState.SENDING)
    db.record_instance(_rec("1.12"))  # a late instance: the derived output is stale, the original is not
    states = {s["kind"]: s["state"] for s in db.sends("1.2.3", include_cancelled=True)}
    assert states == {"original": "pending", "derived": "cancelled"}


def test_settle_leaves_a_series_failed_in_processing_alone(db: StateDB):
    db.record_instance(_rec("1.1"))
    db.add_send("1.2.3", "PACS", "h", 104, 1, output_series_uid="1.2.3", kind=Payload.ORIGINAL)
    db.set_state("1.2.3", SeriesState.FAILED, error="denoiser crashed")
    (send,) = db.claim_due_sends(1e12)
    db.finish_send(send["id"], ok=True, sent=1, error=None, retry_at=None)
    assert db.settle_series("1.2.3") is None  # the original arrived, but processing failed: still failed
    assert db.series("1.2.3")["state"] == "failed" and db.series("1.2.3")["error"] == "denoiser crashed"


def _held_study(db: StateDB, now: float) -> None:
    db.record_instance(_rec("1.1", series="s.pet"), now=now)
    db.record_instance(_rec("2.1", series="s.ct"), now=now)
    db.add_send("s.ct", "PACS", "h", 104, 1, output_series_uid="s.ct", kind=Payload.ORIGINAL, study_uid="1.2",
                hold_quiet_s=60.0)
    db.set_state("s.ct", SeriesState.SENDING)


def test_held_sends_wait_for_every_series_of_the_study(db: StateDB):
    now = 1_000_000.0
    _held_study(db, now)
    assert db.claim_due_sends(now + 1e6) == []  # held
    assert db.release_held(now + 600, max_hold_s=3600) == []  # the PET is still receiving
    db.set_state("s.pet", SeriesState.PROCESSING)
    assert db.release_held(now + 600, max_hold_s=3600) == []  # ... then processing
    db.set_state("s.pet", SeriesState.SENDING)
    assert db.release_held(now + 30, max_hold_s=3600) == []  # processed, but the study is not quiet for 60 s
    ((study, why),) = db.release_held(now + 61, max_hold_s=3600)
    assert study == "1.2" and "quiet" in why
    assert [s["series_uid"] for s in db.claim_due_sends(now + 1e6)] == ["s.ct"]


def test_held_sends_go_after_the_maximum_hold(db: StateDB):
    _held_study(db, time.time())
    db.set_state("s.pet", SeriesState.INCOMPLETE, error="slices missing")  # never completes by itself
    assert db.release_held(time.time() + 10, max_hold_s=3600) == []
    ((_, why),) = db.release_held(time.time() + 3601, max_hold_s=3600)
    assert "maximum" in why


def test_forwards_are_remembered_beyond_the_series(db: StateDB):
    db.record_instance(_rec("1.1"))
    db.remember_forwards("PACS@h:104", "PACS", "1.2.3", ["1.1"])  # before it goes out
    db.confirm_sent("PACS@h:104", "1.2.3", ["1.1", "7.7"])  # 7.7: a derived instance, not a forward
    db.mark_purged("1.2.3")
    db.forget_sends("1.2.3")
    assert [r["ae_title"] for r in db.forwarded_to("1.1")] == ["PACS"]
    assert db.forwarded_to("7.7") == []
    assert db.forget_forwarded(before=time.time() + 1) == 1 and db.forwarded_to("1.1") == []


def test_version_2_database_gains_the_forwarding_columns(open_db: Callable[[], StateDB]):
    old = open_db()
    old.record_instance(_rec("1.1"))
    old.add_send("1.2.3", "PACS", "h", 104, 1, output_series_uid="9.9")
    # Back to the version-2 sends table (no kind, hold or study), with the same statements on both backends.
    raw_sql(old, """
        CREATE TABLE sends_v2 AS SELECT id, series_uid, output_series_uid, destination, ae_title, host, port, state,
            attempts, next_attempt_at, last_error, sent, total, updated_at, created_at FROM sends;
        DROP TABLE sends; ALTER TABLE sends_v2 RENAME TO sends; DROP TABLE forwarded;
        ALTER TABLE series DROP COLUMN owner; ALTER TABLE associations DROP COLUMN owner; DROP TABLE nodes;
        UPDATE meta SET value = '2' WHERE key = 'schema_version';""")
    old.close()
    db = open_db()
    (send,) = db.sends("1.2.3")
    assert send["kind"] == "derived" and send["held"] == 0 and send["output_series_uid"] == "9.9"
    assert db.forwarded_to("1.1") == []
    assert db.claim_due_sends(time.time())[0]["id"] == send["id"]
    assert db.series("1.2.3")["owner"] is None and db.nodes() == []  # version 5's columns and table
    with db._read() as c:
        assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "5"


def test_a_dropped_series_can_be_routed_again(db: StateDB):
    """A drop rule that was wrong: the operator routes the series again after fixing the rules."""
    db.record_instance(_rec("1.1"))
    db.set_state("1.2.3", SeriesState.DROPPED, error="dropped by rule 'scouts'")
    assert db.reprocess("1.2.3")
    row = db.series("1.2.3")
    assert row["state"] == "receiving" and row["force_complete"] == 1 and row["error"] is None


def test_a_non_durable_transaction_commits_and_leaves_the_next_one_durable(db: StateDB):
    """Send confirmations commit without waiting for the disk; every other commit still does (SQLite:
    synchronous back to FULL after it, also when it failed; PostgreSQL: SET LOCAL ends with the transaction)."""

    def setting(c: Any) -> str:
        if db._db.dialect == "sqlite":
            return {0: "off", 1: "normal", 2: "full", 3: "extra"}[c.execute("PRAGMA synchronous").fetchone()[0]]
        return str(c.execute("SHOW synchronous_commit").fetchone()[0])

    def synchronous() -> str:
        with db._read() as c:
            return setting(c)

    durable = synchronous()
    assert durable in ("full", "on")
    with db._tx(durable=False) as c:
        assert setting(c) in ("normal", "off")
    db.confirm_sent("A@h:1", "1.2.3", ["5.1"])
    assert db.confirmed_for("A@h:1", "1.2.3") == {"5.1"} and synchronous() == durable
    with pytest.raises(RuntimeError), db._tx(durable=False) as c:
        c.execute("INSERT INTO sent_instances VALUES (?, ?, ?, ?)", ("A@h:1", "5.2", "1.2.3", 0.0))
        raise RuntimeError("rolled back")
    assert db.confirmed_for("A@h:1", "1.2.3") == {"5.1"} and synchronous() == durable
