"""SQLite writers of several processes queue on a file lock (dicom_node/database.py: SQLiteDatabase)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicom_node.database import SQLiteDatabase
from tests.locks import flock_is_held


def test_a_write_transaction_holds_the_file_lock_and_gives_it_back(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "state.sqlite3")
    try:
        with db.transaction() as c:
            c.execute("CREATE TABLE t (x INTEGER)")
            assert flock_is_held(db._write_lock_path)
        assert not flock_is_held(db._write_lock_path)
        with pytest.raises(RuntimeError):
            with db.transaction() as c:
                c.execute("INSERT INTO t VALUES (1)")
                raise RuntimeError("rolled back")
        assert not flock_is_held(db._write_lock_path)  # given back after a rollback too
        with db.reading() as c:
            assert c.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
            assert not flock_is_held(db._write_lock_path)  # readers do not take it
    finally:
        db.close()


def test_a_second_writer_waits_for_the_first_and_then_goes_on(tmp_path: Path) -> None:
    """Two connections, as two receiver processes have: the second writer waits for the first to commit and then
    writes; both rows are there (that it waits in flock rather than in SQLite's busy handler is the test above:
    the lock is held for the whole transaction)."""
    first, second = SQLiteDatabase(tmp_path / "state.sqlite3"), SQLiteDatabase(tmp_path / "state.sqlite3")
    try:
        with first.transaction() as c:
            c.execute("CREATE TABLE t (x INTEGER)")
        inside, order = threading.Event(), []

        def hold() -> None:
            with first.transaction() as c:
                inside.set()
                time.sleep(0.3)
                c.execute("INSERT INTO t VALUES (1)")
                order.append("first")

        holder = threading.Thread(target=hold)
        holder.start()
        assert inside.wait(5)
        with second.transaction() as c:
            order.append("second")
            c.execute("INSERT INTO t VALUES (2)")
        holder.join(5)
        assert order == ["first", "second"]
        with second.reading() as c:
            assert [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")] == [1, 2]
    finally:
        first.close()
        second.close()


def test_no_lock_file_where_it_cannot_be_made_still_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = SQLiteDatabase(tmp_path / "state.sqlite3")
    monkeypatch.setattr(db, "_write_lock_path", tmp_path / "missing-dir" / "x.writelock")
    try:
        with db.transaction() as c:
            c.execute("CREATE TABLE t (x INTEGER)")
        assert db._write_lock_fd == -1
    finally:
        db.close()
