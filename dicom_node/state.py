"""The node's state: one SQLite database (WAL) in the data directory, and every state transition.

Disk plus this database are the truth. Each instance is recorded with ``synchronous=FULL`` before its C-STORE is
acknowledged, so after ``kill -9`` a restart finds every acknowledged instance, and :meth:`StateDB.recover`
puts interrupted work (processing, sending) back where it can resume.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.errors import StorageError


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving
    COMPLETE = "complete"  # all slices here; waiting for a worker
    WAITING_PRIOR = "waiting_prior"  # complete, but its rule's MR/CT prior has not arrived yet (see rules' prior)
    PROCESSING = "processing"  # denoising / writing outputs
    SENDING = "sending"  # outputs written; at least one destination not yet done
    DELIVERED = "delivered"  # every destination acknowledged every instance
    FAILED = "failed"  # processing failed, or a destination gave up (see error / sends)
    INCOMPLETE = "incomplete"  # quiet period over but slices missing or not contiguous: operator decides
    UNROUTED = "unrouted"  # no rule matched (kept, nothing sent)
    REFUSED = "refused"  # a rule matched but refused the series (e.g. not quantitative)
    OWN_OUTPUT = "own_output"  # our own derived series came back: never processed again (loop guard)
    DROPPED = "dropped"  # a drop rule matched: kept for its retention age, sent nowhere


class SendState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its output was superseded (a changed source instance re-opened the series)


class Payload(enum.StrEnum):
    """What a send carries: the received series as it is, the derived series, a map series."""

    ORIGINAL = "original"
    DERIVED = "derived"
    MAPS = "maps"


# Schema version: 2 keys instances on (series, SOP Instance UID) with a content digest, keeps superseded versions,
# keys sends on the output series and records every instance a destination confirmed. 3 adds what a send carries
# (original, derived, maps), study holds, and the memory of forwarded instances (loop guard). 4 adds the outputs
# table (every series a route wrote: derived PET and map series), and per series the prior it was processed with
# and since when it waits for one.
SCHEMA_VERSION = 4


_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    ipp TEXT,
    iop TEXT,
    received_at REAL NOT NULL,
    sha256 TEXT,
    image_index INTEGER,
    PRIMARY KEY (series_uid, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances(sop_instance_uid);
CREATE TABLE IF NOT EXISTS instance_versions (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT,
    received_at REAL,
    superseded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instance_versions_series ON instance_versions(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT,
    modality TEXT,
    sop_class_uid TEXT,
    calling_ae TEXT,
    called_ae TEXT,
    peer_host TEXT,
    expected_count INTEGER,
    received_count INTEGER NOT NULL DEFAULT 0,
    first_received REAL,
    last_received REAL,
    state TEXT NOT NULL,
    rule TEXT,
    error TEXT,
    force_complete INTEGER NOT NULL DEFAULT 0,
    output_series_uid TEXT,
    output_dir TEXT,
    processed_at REAL,
    delivered_at REAL,
    purged_at REAL,
    updated_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    prior_series_uid TEXT,
    waiting_since REAL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_output ON series(output_series_uid);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    output_series_uid TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    created_at REAL NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'derived',
    study_uid TEXT,
    held INTEGER NOT NULL DEFAULT 0,
    hold_quiet_s REAL,
    UNIQUE (series_uid, output_series_uid, destination)
);
CREATE TABLE IF NOT EXISTS forwarded (
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    forwarded_at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, destination)
);
CREATE TABLE IF NOT EXISTS sent_instances (
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    confirmed_at REAL NOT NULL,
    PRIMARY KEY (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS sent_instances_series ON sent_instances(series_uid);
CREATE TABLE IF NOT EXISTS associations (
    id TEXT PRIMARY KEY,
    calling_ae TEXT,
    called_ae TEXT,
    peer TEXT,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    series_uid TEXT NOT NULL,
    output_series_uid TEXT NOT NULL,
    payload TEXT NOT NULL,
    kind TEXT NOT NULL,
    format TEXT NOT NULL,
    dir TEXT NOT NULL,
    count INTEGER NOT NULL,
    description TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (series_uid, output_series_uid)
);
CREATE INDEX IF NOT EXISTS outputs_output ON outputs(output_series_uid);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Version-1 databases (instances keyed on the SOP Instance UID alone, sends on (series, destination)) are rebuilt
# in place: every row is kept.
_MIGRATE_V1 = """
ALTER TABLE instances RENAME TO instances_v1;
ALTER TABLE sends RENAME TO sends_v1;
DROP INDEX IF EXISTS instances_series;
"""
_COPY_V1 = """
INSERT INTO instances (series_uid, sop_instance_uid, sop_class_uid, path, ipp, iop, received_at)
    SELECT series_uid, sop_instance_uid, sop_class_uid, path, ipp, iop, received_at FROM instances_v1;
INSERT INTO sends (id, series_uid, output_series_uid, destination, ae_title, host, port, state, attempts,
                   next_attempt_at, last_error, sent, total, updated_at, created_at)
    SELECT s.id, s.series_uid, COALESCE(r.output_series_uid, ''), s.destination, s.ae_title, s.host, s.port,
           s.state, s.attempts, s.next_attempt_at, s.last_error, s.sent, s.total, s.updated_at, s.updated_at
    FROM sends_v1 s LEFT JOIN series r ON r.series_uid = s.series_uid;
DROP TABLE instances_v1;
DROP TABLE sends_v1;
"""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    modality: str
    path: Path
    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    expected_count: int | None
    calling_ae: str
    called_ae: str
    peer_host: str
    sha256: str | None = None
    image_index: int | None = None


class StoreOutcome(enum.StrEnum):
    """What :meth:`StateDB.record_instance` did with an instance."""

    NEW = "new"  # first copy of this SOP Instance UID in this series
    DUPLICATE = "duplicate"  # the same bytes again (or an old record without a digest): nothing changed
    REPLACED = "replaced"  # other bytes under the same UID in the same series: new version, old one kept


def _row_dict(row: sqlite3.Row | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


def _floats(text: str | None) -> tuple[float, ...] | None:
    return tuple(json.loads(text)) if text else None


class StateDB:
    """Thread-safe access to the state database (one connection, one lock; WAL for the CLI's readers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open state database {str(path)!r}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns, which the C-STORE acknowledgement relies on.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._migrate()
            self._conn.executescript(_SCHEMA)
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            # Whether anything was ever forwarded: until then the loop guard costs no query per received instance.
            self._forwarded_any = self._conn.execute("SELECT 1 FROM forwarded LIMIT 1").fetchone() is not None

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self._conn.execute(f"PRAGMA table_info({table})").fetchall()]

    def _migrate(self) -> None:
        """Bring a database written by an older petnode to this schema, keeping every row."""
        instance_cols = self._columns("instances")
        send_cols = self._columns("sends")
        series_cols = self._columns("series")
        if series_cols and "prior_series_uid" not in series_cols:
            # Version 4: the prior a series was processed with, and since when it waits for one.
            self._conn.execute("ALTER TABLE series ADD COLUMN prior_series_uid TEXT")
            self._conn.execute("ALTER TABLE series ADD COLUMN waiting_since REAL")
        if instance_cols and "sha256" in instance_cols and send_cols and "kind" not in send_cols:
            # Version 2: sends learn what they carry and whether they wait for their study.
            for column in ("kind TEXT NOT NULL DEFAULT 'derived'", "study_uid TEXT",
                           "held INTEGER NOT NULL DEFAULT 0", "hold_quiet_s REAL"):
                self._conn.execute(f"ALTER TABLE sends ADD COLUMN {column}")
        if instance_cols and "sha256" not in instance_cols:
            series_cols = self._columns("series")
            if series_cols and "revision" not in series_cols:
                self._conn.execute("ALTER TABLE series ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _MIGRATE_V1.strip().split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                for stmt in _COPY_V1.strip().split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, tuple(args)).fetchall()]

    # --- receive ---------------------------------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str, series_uid: str | None = None) -> bool:
        sql, args = "SELECT 1 FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid]
        if series_uid is not None:
            sql, args = sql + " AND series_uid = ?", [*args, series_uid]
        with self._lock:
            return self._conn.execute(sql, args).fetchone() is not None

    def find_instance(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        """Every series that holds this SOP Instance UID (normally one; a modality reusing UIDs makes more)."""
        return self._query("SELECT * FROM instances WHERE sop_instance_uid = ? ORDER BY received_at",
                           (sop_instance_uid,))

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Record a durable instance; False when this series already holds the SOP Instance UID (duplicate)."""
        return self.store_instance(rec, now=now)[0] is StoreOutcome.NEW

    def store_instance(self, rec: InstanceRecord, *, now: float | None = None, previous_path: Path | None = None
                       ) -> tuple[StoreOutcome, dict[str, Any] | None]:
        """Record a durable instance in its series and re-open the series if needed.

        A second copy under the same (series, SOP Instance UID) is a DUPLICATE when its digest matches (or the
        stored row has none). With another digest it is REPLACED: the old row goes to ``instance_versions``
        (``previous_path`` is where the caller kept the old file), the series' revision goes up and a series
        that had finished is re-opened, so the corrected instance is processed. Returns the outcome and the
        series row as it was before.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            before = _row_dict(c.execute("SELECT * FROM series WHERE series_uid = ?", (rec.series_uid,)).fetchone())
            old = c.execute("SELECT * FROM instances WHERE series_uid = ? AND sop_instance_uid = ?",
                            (rec.series_uid, rec.sop_instance_uid)).fetchone()
            values = (str(rec.path), json.dumps(rec.ipp) if rec.ipp else None,
                      json.dumps(rec.iop) if rec.iop else None, now, rec.sha256, rec.image_index)
            if old is not None:
                if old["sha256"] is None or rec.sha256 is None or old["sha256"] == rec.sha256:
                    return StoreOutcome.DUPLICATE, before
                c.execute("INSERT INTO instance_versions (series_uid, sop_instance_uid, path, sha256, received_at, "
                          "superseded_at) VALUES (?, ?, ?, ?, ?, ?)",
                          (rec.series_uid, rec.sop_instance_uid, str(previous_path or old["path"]), old["sha256"],
                           old["received_at"], now))
                c.execute("UPDATE instances SET path = ?, ipp = ?, iop = ?, received_at = ?, sha256 = ?, "
                          "image_index = ?, sop_class_uid = ? WHERE series_uid = ? AND sop_instance_uid = ?",
                          (*values, rec.sop_class_uid, rec.series_uid, rec.sop_instance_uid))
                c.execute("UPDATE series SET last_received = ?, updated_at = ? WHERE series_uid = ?",
                          (now, now, rec.series_uid))
                if before is not None:
                    self._reopen(c, before, now, f"superseded: instance {rec.sop_instance_uid} changed")
                return StoreOutcome.REPLACED, before
            c.execute(
                "INSERT INTO instances (series_uid, sop_instance_uid, sop_class_uid, path, ipp, iop, received_at, "
                "sha256, image_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.series_uid, rec.sop_instance_uid, rec.sop_class_uid, *values),
            )
            c.execute(
                """INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, calling_ae, called_ae,
                       peer_host, expected_count, received_count, first_received, last_received, state, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)
                   ON CONFLICT(series_uid) DO UPDATE SET
                       received_count = received_count + 1,
                       last_received = excluded.last_received,
                       expected_count = COALESCE(series.expected_count, excluded.expected_count),
                       state = CASE WHEN series.state IN ('complete', 'incomplete')
                                         OR series.purged_at IS NOT NULL THEN 'receiving'
                                    ELSE series.state END,
                       purged_at = NULL,
                       updated_at = excluded.updated_at""",
                (
                    rec.series_uid,
                    rec.study_uid,
                    rec.modality,
                    rec.sop_class_uid,
                    rec.calling_ae,
                    rec.called_ae,
                    rec.peer_host,
                    rec.expected_count,
                    now,
                    now,
                    SeriesState.RECEIVING.value,
                    now,
                ),
            )
            if before is not None and before["purged_at"] is None:
                self._reopen(c, before, now, "superseded: a new instance arrived after processing")
            elif before is not None:
                # Received again after a purge: its first life's sends (kept for `petnode status`) must not
                # mark the new output delivered with zero C-STOREs.
                c.execute("DELETE FROM sent_instances WHERE series_uid = ?", (rec.series_uid,))
                c.execute("DELETE FROM sends WHERE series_uid = ?", (rec.series_uid,))
        return StoreOutcome.NEW, before

    def _reopen(self, c: sqlite3.Connection, before: dict[str, Any], now: float, reason: str) -> None:
        """The series' content changed (a new instance, or other bytes under a stored UID): nothing may be left out.

        Processed series (processing, sending, delivered, failed) get a new revision, so their next output has
        new UIDs: a processing run notices when it ends (Node._process) and starts again, sends of the stale
        output are cancelled. Every series not processing goes back to receiving, so it is completed, routed and
        processed again.
        """
        state, uid = before["state"], before["series_uid"]
        if state in (SeriesState.PROCESSING, SeriesState.SENDING, SeriesState.DELIVERED, SeriesState.FAILED):
            c.execute("UPDATE series SET revision = revision + 1 WHERE series_uid = ?", (uid,))
        if state in (SeriesState.SENDING, SeriesState.FAILED):
            self._cancel_sends(c, uid, reason)
        if state not in (SeriesState.PROCESSING, SeriesState.RECEIVING):
            c.execute("UPDATE series SET state = 'receiving', error = NULL, updated_at = ? WHERE series_uid = ?",
                      (now, uid))

    def instance_versions(self, series_uid: str) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM instance_versions WHERE series_uid = ? ORDER BY id", (series_uid,))

    def known_paths(self) -> set[str]:
        """Every spool path the database refers to (current instances and kept previous versions)."""
        with self._lock:
            rows = self._conn.execute("SELECT path FROM instances UNION SELECT path FROM instance_versions")
            return {r[0] for r in rows.fetchall()}

    def instances(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM instances WHERE series_uid = ? ORDER BY received_at", (series_uid,))
        for r in rows:
            r["ipp"], r["iop"] = _floats(r["ipp"]), _floats(r["iop"])
        return rows

    def instance_paths(self, series_uid: str) -> list[Path]:
        return [Path(r["path"]) for r in self._query(
            "SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at", (series_uid,))]

    # --- series ----------------------------------------------------------------------------------------------
    def series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def find_series(self, prefix: str) -> list[dict[str, Any]]:
        """Series whose UID equals ``prefix`` or starts with it (operators type short prefixes)."""
        exact = self.series(prefix)
        if exact is not None:
            return [exact]
        return self._query("SELECT * FROM series WHERE series_uid LIKE ? ORDER BY first_received",
                           (prefix.replace("%", "") + "%",))

    def list_series(self, states: Sequence[str] = (), limit: int = 200) -> list[dict[str, Any]]:
        if states:
            marks = ",".join("?" * len(states))
            return self._query(
                f"SELECT * FROM series WHERE state IN ({marks}) ORDER BY first_received DESC LIMIT ?",
                [*states, limit],
            )
        return self._query("SELECT * FROM series ORDER BY first_received DESC LIMIT ?", (limit,))

    def is_own_output(self, series_uid: str) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM series WHERE output_series_uid = ? LIMIT 1", (series_uid,)
            ).fetchone() or self._conn.execute(
                "SELECT 1 FROM outputs WHERE output_series_uid = ? LIMIT 1", (series_uid,)
            ).fetchone()
        return row is not None

    # --- outputs ---------------------------------------------------------------------------------------------
    def record_output(self, series_uid: str, output_series_uid: str, *, payload: str, kind: str, fmt: str,
                      directory: Path, count: int, description: str = "") -> None:
        """Record one series a route wrote for ``series_uid`` (derived PET, or a map series) and where it is."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO outputs (series_uid, output_series_uid, payload, kind, format, dir, "
                      "count, description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (series_uid, output_series_uid, payload, kind, fmt, str(directory), count, description,
                       time.time()))

    def outputs(self, series_uid: str) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM outputs WHERE series_uid = ? ORDER BY created_at, output_series_uid",
                           (series_uid,))

    def output(self, output_series_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM outputs WHERE output_series_uid = ? ORDER BY created_at DESC LIMIT 1",
                           (output_series_uid,))
        return rows[0] if rows else None

    def forget_outputs(self, series_uid: str, keep: Sequence[str] = ()) -> None:
        """Forget the outputs of an earlier run (re-processing writes new ones), except ``keep``."""
        sql = "DELETE FROM outputs WHERE series_uid = ?"
        if keep:
            sql += f" AND output_series_uid NOT IN ({','.join('?' * len(keep))})"
        with self._tx() as c:
            c.execute(sql, (series_uid, *keep))

    # --- priors ----------------------------------------------------------------------------------------------
    def wait_for_prior(self, series_uid: str, reason: str, now: float | None = None) -> float | None:
        """Move a processing series to ``waiting_prior`` (keeping when it started waiting); returns that time,
        None when the series was not processing."""
        now = time.time() if now is None else now
        with self._tx() as c:
            moved = c.execute(
                "UPDATE series SET state = ?, error = ?, waiting_since = COALESCE(waiting_since, ?), updated_at = ? "
                "WHERE series_uid = ? AND state = ?",
                (SeriesState.WAITING_PRIOR.value, reason, now, now, series_uid, SeriesState.PROCESSING.value),
            ).rowcount
            if not moved:
                return None
            row = c.execute("SELECT waiting_since FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return float(row[0])

    def set_prior(self, series_uid: str, prior_series_uid: str | None) -> None:
        """The prior series a series is processed with (kept by retention while the series needs it)."""
        with self._tx() as c:
            c.execute("UPDATE series SET prior_series_uid = ?, waiting_since = NULL, updated_at = ? "
                      "WHERE series_uid = ?", (prior_series_uid, time.time(), series_uid))

    def wake_waiting(self, series_uids: Sequence[str] | None = None) -> list[str]:
        """Series waiting for a prior go back to complete (to be looked at again); all, or those given."""
        now = time.time()
        with self._tx() as c:
            sql = "SELECT series_uid FROM series WHERE state = ?"
            args: list[Any] = [SeriesState.WAITING_PRIOR.value]
            if series_uids is not None:
                if not series_uids:
                    return []
                sql += f" AND series_uid IN ({','.join('?' * len(series_uids))})"
                args.extend(series_uids)
            uids = [r[0] for r in c.execute(sql, args).fetchall()]
            for uid in uids:
                c.execute("UPDATE series SET state = ?, updated_at = ? WHERE series_uid = ? AND state = ?",
                          (SeriesState.COMPLETE.value, now, uid, SeriesState.WAITING_PRIOR.value))
        return uids

    def prior_candidates(self, modality: str, *, study_uid: str | None = None, since: float | None = None
                         ) -> list[dict[str, Any]]:
        """Complete series of ``modality`` whose files are here (in ``study_uid``, or received after ``since``)."""
        sql = ("SELECT * FROM series WHERE modality = ? AND purged_at IS NULL AND "
               "state NOT IN ('receiving', 'incomplete', 'own_output')")
        args: list[Any] = [modality]
        if study_uid is not None:
            sql += " AND study_uid = ?"
            args.append(study_uid)
        if since is not None:
            sql += " AND last_received >= ?"
            args.append(since)
        return self._query(sql + " ORDER BY last_received DESC LIMIT 500", args)

    def priors_in_use(self) -> set[str]:
        """Prior series that a series still waiting, queued, processing or sending depends on (not retired)."""
        rows = self._query("SELECT DISTINCT prior_series_uid FROM series WHERE prior_series_uid IS NOT NULL AND "
                           "state IN ('complete', 'processing', 'waiting_prior', 'sending')")
        return {r["prior_series_uid"] for r in rows}

    def set_state(self, series_uid: str, state: SeriesState, *, error: str | None = None,
                  rule: str | None = None, expect: Sequence[SeriesState] = ()) -> bool:
        """Move a series to ``state``; with ``expect``, only from one of those states. True when it moved."""
        now = time.time()
        sql = ("UPDATE series SET state = ?, error = ?, updated_at = ?, rule = COALESCE(?, rule), "
               "force_complete = 0")
        args: list[Any] = [state.value, error, now, rule]
        if state is SeriesState.DELIVERED:
            sql += ", delivered_at = ?"
            args.append(now)
        sql += " WHERE series_uid = ?"
        args.append(series_uid)
        if expect:
            sql += f" AND state IN ({','.join('?' * len(expect))})"
            args.extend(s.value for s in expect)
        with self._tx() as c:
            return c.execute(sql, args).rowcount > 0

    def request_complete(self, series_uid: str) -> bool:
        """Operator's force: the scheduler completes the series at its next check, whatever the count."""
        with self._tx() as c:
            return c.execute(
                "UPDATE series SET force_complete = 1, updated_at = ? WHERE series_uid = ? AND state IN (?, ?)",
                (time.time(), series_uid, SeriesState.RECEIVING.value, SeriesState.INCOMPLETE.value),
            ).rowcount > 0

    REPROCESSABLE = ("delivered", "failed", "unrouted", "refused", "incomplete", "dropped", "waiting_prior")

    def reprocess(self, series_uid: str, rule: str | None = None) -> bool:
        """Operator's reprocess: route again with the current rules (or process with ``rule``) and send in full.

        Only finished series whose files are still here; True when the series was queued.
        """
        now = time.time()
        marks = ",".join("?" * len(self.REPROCESSABLE))
        with self._tx() as c:
            if rule is None:  # completion routes it again, as if it had just completed
                moved = c.execute(
                    f"UPDATE series SET state = 'receiving', force_complete = 1, error = NULL, waiting_since = NULL, "
                    f"updated_at = ? WHERE series_uid = ? AND purged_at IS NULL AND state IN ({marks})",
                    (now, series_uid, *self.REPROCESSABLE)).rowcount
            else:
                moved = c.execute(
                    f"UPDATE series SET state = 'complete', rule = ?, force_complete = 0, error = NULL, "
                    f"waiting_since = NULL, updated_at = ? WHERE series_uid = ? AND purged_at IS NULL "
                    f"AND state IN ({marks})",
                    (rule, now, series_uid, *self.REPROCESSABLE)).rowcount
            if moved:
                c.execute("DELETE FROM sent_instances WHERE series_uid = ?", (series_uid,))
                c.execute("DELETE FROM sends WHERE series_uid = ?", (series_uid,))
        return moved > 0

    def set_outputs(self, series_uid: str, output_series_uid: str, output_dir: Path) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE series SET output_series_uid = ?, output_dir = ?, processed_at = ?, updated_at = ? "
                "WHERE series_uid = ?",
                (output_series_uid, str(output_dir), time.time(), time.time(), series_uid),
            )

    def mark_purged(self, series_uid: str) -> None:
        """Files are gone: forget the instances, so a later re-send is stored again instead of "duplicate"."""
        with self._tx() as c:
            c.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            c.execute("DELETE FROM instance_versions WHERE series_uid = ?", (series_uid,))
            c.execute("UPDATE series SET purged_at = ?, received_count = 0, updated_at = ? WHERE series_uid = ?",
                      (time.time(), time.time(), series_uid))

    # --- sends ---------------------------------------------------------------------------------------------
    def add_send(self, series_uid: str, ae_title: str, host: str, port: int, total: int,
                 *, output_series_uid: str = "", failed_reason: str | None = None,
                 kind: Payload = Payload.DERIVED, study_uid: str | None = None,
                 hold_quiet_s: float | None = None) -> None:
        """Queue one destination for one output series (idempotent: the same output and destination again is a
        no-op). Keyed on the output series, so a new output (new revision, new parameters) is sent anew.

        The original series is keyed on its own UID, so it is queued once per destination; queueing it again
        (more instances arrived, the series completed) wakes a finished or cancelled send, and the sender sends
        what the destination has not confirmed. ``hold_quiet_s`` holds the send until its study is complete,
        processed and quiet that long (:meth:`release_held`).
        """
        key = f"{ae_title}@{host}:{port}"
        state = SendState.FAILED if failed_reason else SendState.PENDING
        held = 1 if hold_quiet_s is not None and not failed_reason else 0
        now = time.time()
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO sends (series_uid, output_series_uid, destination, ae_title, host, port, "
                "state, total, last_error, updated_at, created_at, kind, study_uid, held, hold_quiet_s) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (series_uid, output_series_uid, key, ae_title, host, port, state.value, total, failed_reason,
                 now, now, kind.value, study_uid, held, hold_quiet_s),
            )
            if kind is Payload.ORIGINAL and not failed_reason:
                c.execute("UPDATE sends SET total = ? WHERE series_uid = ? AND destination = ? AND kind = 'original'",
                          (total, series_uid, key))
                self._wake_originals(c, series_uid, now, destination=key)

    def wake_original_sends(self, series_uid: str) -> int:
        """Instances arrived for a series forwarded on receipt: its finished original sends go again."""
        with self._tx() as c:
            return self._wake_originals(c, series_uid, time.time())

    @staticmethod
    def _wake_originals(c: sqlite3.Connection, series_uid: str, now: float, destination: str | None = None) -> int:
        """Original sends that finished (done, or cancelled) go back to pending: the sender sends what the
        destination has not confirmed (nothing, when it has everything)."""
        sql = ("UPDATE sends SET state = 'pending', next_attempt_at = 0, created_at = ?, updated_at = ? "
               "WHERE series_uid = ? AND kind = 'original' AND state IN ('done', 'cancelled')")
        args: list[Any] = [now, now, series_uid]
        if destination is not None:
            sql += " AND destination = ?"
            args.append(destination)
        return c.execute(sql, args).rowcount

    def release_held(self, now: float, max_hold_s: float) -> list[tuple[str, str]]:
        """Let the held sends of every study that is ready go: (study UID, why) for each released study.

        A study is ready when none of its series is still receiving, complete (queued) or processing, and no
        instance of it arrived for the longest quiet period its held sends ask for; or, whatever its series do,
        when its first held send has waited ``max_hold_s`` (an incomplete series must not hold a study forever).
        """
        released: list[tuple[str, str]] = []
        with self._tx() as c:
            studies = c.execute(
                "SELECT study_uid, MAX(hold_quiet_s) AS quiet, MIN(created_at) AS since FROM sends "
                "WHERE held = 1 AND state = 'pending' GROUP BY study_uid").fetchall()
            for study in studies:
                uid = study["study_uid"]
                busy = c.execute(
                    "SELECT COUNT(*) FROM series WHERE study_uid IS ? AND purged_at IS NULL "
                    "AND state IN ('receiving', 'complete', 'processing', 'incomplete')", (uid,)).fetchone()[0]
                last = c.execute("SELECT MAX(last_received) FROM series WHERE study_uid IS ?",
                                 (uid,)).fetchone()[0] or 0.0
                quiet = float(study["quiet"] or 0.0)
                if not busy and now - last >= quiet:
                    why = f"every series complete and processed, study quiet for {now - last:.0f} s"
                elif now - float(study["since"]) >= max_hold_s:
                    why = (f"held for the maximum of {max_hold_s:.0f} s with {busy} series not finished "
                           "(incomplete or still arriving)")
                else:
                    continue
                c.execute("UPDATE sends SET held = 0, next_attempt_at = 0, updated_at = ? WHERE held = 1 "
                          "AND study_uid IS ?", (now, uid))
                released.append((uid, why))
        return released

    def sends(self, series_uid: str | None = None, *, include_cancelled: bool = False) -> list[dict[str, Any]]:
        where = "" if include_cancelled else " AND state != 'cancelled'"
        if series_uid is None:
            return self._query(f"SELECT * FROM sends WHERE 1{where} ORDER BY id")
        return self._query(f"SELECT * FROM sends WHERE series_uid = ?{where} ORDER BY id", (series_uid,))

    def claim_due_sends(self, now: float, busy: Sequence[str] = (), per_destination: int = 1
                        ) -> list[dict[str, Any]]:
        """Atomically move due pending sends to ``sending`` and return them.

        ``busy`` lists the destinations of sends already running (a destination may appear once per running
        send); at most ``per_destination`` sends run at once for one destination.
        """
        with self._tx() as c:
            rows = [dict(r) for r in c.execute(
                "SELECT * FROM sends WHERE state = ? AND held = 0 AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id",
                (SendState.PENDING.value, now),
            ).fetchall()]
            running: dict[str, int] = {}
            for dest in busy:
                running[dest] = running.get(dest, 0) + 1
            claimed = []
            for row in rows:
                if running.get(row["destination"], 0) >= per_destination:
                    continue
                running[row["destination"]] = running.get(row["destination"], 0) + 1
                c.execute("UPDATE sends SET state = ?, updated_at = ? WHERE id = ?",
                          (SendState.SENDING.value, now, row["id"]))
                claimed.append(row)
        return claimed

    def confirm_sent(self, destination: str, series_uid: str, sop_instance_uids: Sequence[str]) -> None:
        """The destination acknowledged these instances: a later attempt does not send them again."""
        if not sop_instance_uids:
            return
        now = time.time()
        with self._tx() as c:
            c.executemany("INSERT OR IGNORE INTO sent_instances VALUES (?, ?, ?, ?)",
                          [(destination, uid, series_uid, now) for uid in sop_instance_uids])

    def remember_forwards(self, destination: str, ae_title: str, series_uid: str,
                          sop_instance_uids: Sequence[str]) -> None:
        """Received instances about to be forwarded as they are to ``destination``: remembered before they go
        (beyond the series' own life), so the same instances coming back from there are recognised
        (:meth:`forwarded_to`) even when the destination routes them back before it has answered."""
        if not sop_instance_uids:
            return
        now = time.time()
        self._forwarded_any = True
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO forwarded VALUES (?, ?, ?, ?, ?)",
                          [(uid, destination, ae_title, series_uid, now) for uid in sop_instance_uids])

    def forwarded_to(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        """Where the node forwarded this received instance (destination, AE title, when)."""
        if not self._forwarded_any:
            return []
        return self._query("SELECT * FROM forwarded WHERE sop_instance_uid = ?", (sop_instance_uid,))

    def forget_forwarded(self, before: float) -> int:
        """Forget forwards older than ``before`` (retention of the loop guard's memory)."""
        with self._tx() as c:
            return c.execute("DELETE FROM forwarded WHERE forwarded_at < ?", (before,)).rowcount

    def series_with_active_sends(self) -> set[str]:
        """Series that something is still being sent for (pending, held or sending): never purged."""
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT series_uid FROM sends WHERE state IN ('pending', 'sending')")
            return {r[0] for r in rows.fetchall()}

    def confirmed_for(self, destination: str, series_uid: str) -> set[str]:
        """Every output instance of this (source) series the destination has acknowledged."""
        with self._lock:
            rows = self._conn.execute("SELECT sop_instance_uid FROM sent_instances WHERE destination = ? "
                                      "AND series_uid = ?", (destination, series_uid)).fetchall()
        return {r[0] for r in rows}

    def finish_send(self, send_id: int, *, ok: bool, sent: int, error: str | None,
                    retry_at: float | None, total: int | None = None) -> SendState:
        """Record an attempt. ``retry_at`` None with ``ok`` False means the send gave up (failed). ``total``:
        how many instances the attempt found (an original forwarded while it arrives grows)."""
        state = SendState.DONE if ok else (SendState.PENDING if retry_at is not None else SendState.FAILED)
        with self._tx() as c:
            c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, sent = ?, last_error = ?, "
                "next_attempt_at = ?, updated_at = ?, total = COALESCE(?, total) WHERE id = ? AND state != 'cancelled'",
                (state.value, sent, error, retry_at or 0.0, time.time(), total, send_id),
            )
        return state

    def requeue_send(self, send_id: int, delay_s: float = 0.0) -> bool:
        """A send left in ``sending`` by a sender that is gone (or that found its output not written yet) goes
        back to ``pending``, due in ``delay_s``; attempts kept."""
        now = time.time()
        with self._tx() as c:
            return c.execute("UPDATE sends SET state = 'pending', next_attempt_at = ?, updated_at = ? "
                             "WHERE id = ? AND state = 'sending'",
                             (now + delay_s if delay_s > 0 else 0.0, now, send_id)).rowcount > 0

    def cancel_sends(self, series_uid: str, reason: str) -> int:
        """Cancel the unfinished sends of a series' outputs (its original's sends stay)."""
        with self._tx() as c:
            return self._cancel_sends(c, series_uid, reason)

    def forget_sends(self, series_uid: str) -> int:
        """Drop a series' send history and confirmations (its files are gone, or an operator reprocesses it):
        whatever it produces next is sent in full."""
        with self._tx() as c:
            c.execute("DELETE FROM sent_instances WHERE series_uid = ?", (series_uid,))
            return c.execute("DELETE FROM sends WHERE series_uid = ?", (series_uid,)).rowcount

    @staticmethod
    def _cancel_sends(c: sqlite3.Connection, series_uid: str, reason: str) -> int:
        # The original's sends stay: the series is still what was received, and more of it goes on.
        return c.execute("UPDATE sends SET state = 'cancelled', last_error = ?, updated_at = ? "
                         "WHERE series_uid = ? AND kind != 'original' AND state IN ('pending', 'sending', 'failed')",
                         (reason, time.time(), series_uid)).rowcount

    def settle_series(self, series_uid: str) -> SeriesState | None:
        """After a send finished: DELIVERED when every destination is done, FAILED when the rest gave up."""
        with self._tx() as c:
            row = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None or row["state"] != SeriesState.SENDING:
                # Re-opened (a changed instance), being processed, or failed in processing while its original
                # was forwarded: not the sends' call.
                return None
            states = [r[0] for r in c.execute(
                "SELECT state FROM sends WHERE series_uid = ? AND state != 'cancelled'", (series_uid,))]
            if not states or any(s in (SendState.PENDING, SendState.SENDING) for s in states):
                return None
            now = time.time()
            if all(s == SendState.DONE for s in states):
                c.execute("UPDATE series SET state = ?, error = NULL, delivered_at = ?, updated_at = ? "
                          "WHERE series_uid = ?", (SeriesState.DELIVERED.value, now, now, series_uid))
                return SeriesState.DELIVERED
            failed = [r[0] for r in c.execute(
                "SELECT destination FROM sends WHERE series_uid = ? AND state = ?",
                (series_uid, SendState.FAILED.value))]
            c.execute("UPDATE series SET state = ?, error = ?, updated_at = ? WHERE series_uid = ?",
                      (SeriesState.FAILED.value, f"send failed to {', '.join(failed)}", now, series_uid))
            return SeriesState.FAILED

    def retry_sends(self, series_uid: str) -> int:
        """Operator's retry: failed (and not yet done) sends of a series go back to pending, attempts reset."""
        now = time.time()
        with self._tx() as c:
            n = c.execute(
                "UPDATE sends SET state = ?, attempts = 0, next_attempt_at = 0, created_at = ?, updated_at = ? "
                "WHERE series_uid = ? AND state = ?",
                (SendState.PENDING.value, now, now, series_uid, SendState.FAILED.value),
            ).rowcount
            if n:
                c.execute("UPDATE series SET state = ?, error = NULL, updated_at = ? WHERE series_uid = ?",
                          (SeriesState.SENDING.value, now, series_uid))
        return n

    # --- associations (for `petnode status`) -----------------------------------------------------------------
    def association_opened(self, assoc_id: str, calling_ae: str, called_ae: str, peer: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO associations VALUES (?, ?, ?, ?, ?)",
                      (assoc_id, calling_ae, called_ae, peer, time.time()))

    def association_closed(self, assoc_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM associations WHERE id = ?", (assoc_id,))

    def associations(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM associations ORDER BY started_at")

    # --- restart ---------------------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """After a crash: interrupted processing restarts, interrupted sends retry, stale associations go."""
        with self._tx() as c:
            processing = c.execute(
                "UPDATE series SET state = ?, updated_at = ? WHERE state = ?",
                (SeriesState.COMPLETE.value, time.time(), SeriesState.PROCESSING.value),
            ).rowcount
            sending = c.execute(
                "UPDATE sends SET state = ?, next_attempt_at = 0 WHERE state = ?",
                (SendState.PENDING.value, SendState.SENDING.value),
            ).rowcount
            c.execute("DELETE FROM associations")
        return {"processing": processing, "sending": sending}
