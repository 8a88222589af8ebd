"""The node's state: one database and every state transition.

By default one SQLite database (WAL) in the data directory. A ``postgresql://`` URL (``state.database_url`` in
node.yaml) puts it on a PostgreSQL server instead, where several nodes sharing one spool (the same data directory on
shared storage) share one state: the same schema and migrations run on both (see :mod:`dicom_node.database`).

Disk plus this database are the truth. Each instance is recorded with ``synchronous=FULL`` (PostgreSQL: a
synchronous commit) before its C-STORE is acknowledged, so after ``kill -9`` a restart finds every acknowledged
instance, and :meth:`StateDB.recover` puts interrupted work (processing, sending) back where it can resume.

Several nodes on one database: work in progress carries its owner (the node id) and every node beats a heartbeat in
``nodes``; interrupted work is only taken back from a node that is gone (its heartbeat stale), never from a live
one (:meth:`StateDB.recover`, :meth:`StateDB.reclaimable`).
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import socket
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.database import Database, open_database
from dicom_node.errors import StorageError

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings


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
# and since when it waits for one. 5 adds the owner (node id) of work in progress and the nodes' heartbeats, so
# several nodes can share one database.
SCHEMA_VERSION = 5


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
    waiting_since REAL,
    owner TEXT
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
    owner TEXT,
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
    started_at REAL NOT NULL,
    owner TEXT
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
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER,
    ae_title TEXT,
    port INTEGER,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Columns added to a table after its first version, oldest first: a database written by an older petnode gains
# the ones it lacks (the same statements on SQLite and PostgreSQL; types translated by dicom_node.database).
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("series", "revision", "INTEGER NOT NULL DEFAULT 0"),  # 2
    ("sends", "kind", "TEXT NOT NULL DEFAULT 'derived'"),  # 3
    ("sends", "study_uid", "TEXT"),
    ("sends", "held", "INTEGER NOT NULL DEFAULT 0"),
    ("sends", "hold_quiet_s", "REAL"),
    ("series", "prior_series_uid", "TEXT"),  # 4
    ("series", "waiting_since", "REAL"),
    ("series", "owner", "TEXT"),  # 5
    ("sends", "owner", "TEXT"),
    ("associations", "owner", "TEXT"),
)

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


def default_node_id(settings: NodeSettings) -> str:
    """``state.node_id``, else ``<host name>:<port>`` (stable across restarts, so a restarted node recognises its
    own interrupted work); with port 0 (any free port) the process id and a random suffix keep nodes apart."""
    if settings.state.node_id:
        return settings.state.node_id
    host = socket.gethostname()
    if settings.port:
        return f"{host}:{settings.port}"
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


def open_state(settings: NodeSettings, *, node_id: str | None = None) -> StateDB:
    """The state database the settings name: ``state.database_url``, else ``<data_dir>/state.sqlite3``."""
    # PostgreSQL: one connection per busy thread. A C-STORE handler keeps its connection while it holds its
    # series' lock and may then wait for a node lock the sends job holds while it waits for a connection: the
    # pool must outnumber the associations for that wait to end.
    return StateDB(settings.state.database_url or settings.state_db, node_id=node_id,
                   max_connections=settings.max_associations + 16)


def _row_dict(row: Any) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


def _floats(text: str | None) -> tuple[float, ...] | None:
    return tuple(json.loads(text)) if text else None


class StateDB:
    """Thread-safe access to the state database.

    ``target``: a path (a SQLite file: one connection, one lock; WAL for the CLI's readers) or a database URL
    (``sqlite:///path``, ``postgresql://user@host/db``: a small pool of connections). ``node_id`` names the node
    that uses it: work it takes (processing, sending, associations) is recorded as its own, so that other nodes
    sharing the database leave it alone while this node is alive.
    """

    def __init__(self, target: Path | str, *, node_id: str | None = None, max_connections: int = 16) -> None:
        self._db: Database = open_database(target, max_connections=max_connections)
        self.dialect = self._db.dialect
        # Whether other nodes may share this database (PostgreSQL): the multi-node guards apply.
        self.shared = self._db.shared
        self.node_id = node_id
        # Several processes of one node write here (receive_processes): association ids need the process's id.
        self.multi_process = False
        self.path: Path | None = getattr(self._db, "path", None)
        if self.dialect == "sqlite":  # what tests and tools that read the file directly use
            self._conn = self._db.conn  # type: ignore[attr-defined]
            self._lock = self._db.lock  # type: ignore[attr-defined]
        # One node creates or migrates the schema at a time (DDL is transactional on both backends).
        with self._tx(lock="petnode:schema") as c:
            self._migrate(c)
            self._db.run_script(c, _SCHEMA)
            c.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET "
                      "value = excluded.value", (str(SCHEMA_VERSION),))
            # Whether anything was ever forwarded: until then the loop guard costs no query per received instance.
            # Shared: another node may forward at any time, so the guard always looks (its memory is shared).
            self._forwarded_any = self.shared or c.execute("SELECT 1 FROM forwarded LIMIT 1").fetchone() is not None

    def describe(self) -> str:
        """Where the state lives (a path or a URL without its password), for logs and messages."""
        return self._db.describe()

    def _migrate(self, c: Any) -> None:
        """Bring a database written by an older petnode to this schema, keeping every row."""
        instance_cols = self._db.columns(c, "instances")
        if instance_cols and "sha256" not in instance_cols:
            # Version 1 (instances keyed on the SOP Instance UID alone): rebuilt in place. Only SQLite databases
            # can be that old: PostgreSQL came with version 5 (and its renamed tables would keep their index names).
            if self.dialect != "sqlite":
                raise StorageError(f"state database {self.describe()!r} has a version-1 schema that only SQLite "
                                   "databases can be migrated from")
            for script in (_MIGRATE_V1, _SCHEMA, _COPY_V1):
                self._db.run_script(c, script)
        existing: dict[str, list[str]] = {}
        for table, column, definition in _ADDED_COLUMNS:
            if table not in existing:
                existing[table] = self._db.columns(c, table)
            if existing[table] and column not in existing[table]:
                c.execute(self._db.ddl(f"ALTER TABLE {table} ADD COLUMN {column} {definition}"))
                existing[table].append(column)

    def close(self) -> None:
        self._db.close()

    def _tx(self, lock: str | None = None, *, durable: bool = True) -> AbstractContextManager[Any]:
        """A write transaction. ``lock`` names what a read-then-write must have to itself across nodes (one
        series, one job); SQLite's BEGIN IMMEDIATE already serialises every transaction. ``durable=False``: see
        :meth:`dicom_node.database.Database.transaction`."""
        return self._db.transaction(lock, durable=durable)

    def _read(self) -> AbstractContextManager[Any]:
        return self._db.reading()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._read() as c:
            return [dict(r) for r in c.execute(sql, tuple(args)).fetchall()]

    def series_lock(self, series_uid: str) -> AbstractContextManager[None]:
        """Exclude the other nodes from this series while held: receiving an instance of it and purging it (the
        spool's in-process series lock does the same between this node's threads). A no-op on SQLite."""
        return self._db.session_lock(f"petnode:series:{series_uid}")

    # --- receive ---------------------------------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str, series_uid: str | None = None) -> bool:
        sql, args = "SELECT 1 FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid]
        if series_uid is not None:
            sql, args = sql + " AND series_uid = ?", [*args, series_uid]
        with self._read() as c:
            return c.execute(sql, args).fetchone() is not None

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
        # Shared: the series' lock makes the read of its row and instance and the writes one step, as BEGIN
        # IMMEDIATE does on SQLite (two nodes storing the same instance, or re-opening the series, at once).
        with self._tx(lock=f"petnode:series:{rec.series_uid}") as c:
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
                       received_count = series.received_count + 1,
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

    def _reopen(self, c: Any, before: dict[str, Any], now: float, reason: str) -> None:
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
        with self._read() as c:
            rows = c.execute("SELECT path FROM instances UNION SELECT path FROM instance_versions")
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

    def series_counts(self) -> dict[str, int]:
        """How many series (not purged) are in each state (the metrics, at scrape time)."""
        rows = self._query("SELECT state, COUNT(*) AS n FROM series WHERE purged_at IS NULL GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def is_own_output(self, series_uid: str) -> bool:
        with self._read() as c:
            row = c.execute(
                "SELECT 1 FROM series WHERE output_series_uid = ? LIMIT 1", (series_uid,)
            ).fetchone() or c.execute(
                "SELECT 1 FROM outputs WHERE output_series_uid = ? LIMIT 1", (series_uid,)
            ).fetchone()
        return row is not None

    # --- outputs ---------------------------------------------------------------------------------------------
    def record_output(self, series_uid: str, output_series_uid: str, *, payload: str, kind: str, fmt: str,
                      directory: Path, count: int, description: str = "") -> None:
        """Record one series a route wrote for ``series_uid`` (derived PET, or a map series) and where it is."""
        with self._tx() as c:
            c.execute("INSERT INTO outputs (series_uid, output_series_uid, payload, kind, format, dir, count, "
                      "description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                      "ON CONFLICT (series_uid, output_series_uid) DO UPDATE SET payload = excluded.payload, "
                      "kind = excluded.kind, format = excluded.format, dir = excluded.dir, count = excluded.count, "
                      "description = excluded.description, created_at = excluded.created_at",
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
            # Only those this call moved: another node waking the same series at once gets the others.
            return [uid for uid in uids if c.execute(
                "UPDATE series SET state = ?, updated_at = ? WHERE series_uid = ? AND state = ?",
                (SeriesState.COMPLETE.value, now, uid, SeriesState.WAITING_PRIOR.value)).rowcount]

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
        if state is SeriesState.PROCESSING:
            # Whose work it is: other nodes sharing the database leave it alone while this one is alive.
            sql += ", owner = ?"
            args.append(self.node_id)
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
    def _wake_originals(c: Any, series_uid: str, now: float, destination: str | None = None) -> int:
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
        with self._tx(lock="petnode:release_held") as c:  # one node at a time looks at the held studies
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
            return self._query(f"SELECT * FROM sends WHERE 1 = 1{where} ORDER BY id")
        return self._query(f"SELECT * FROM sends WHERE series_uid = ?{where} ORDER BY id", (series_uid,))

    def claim_due_sends(self, now: float, busy: Sequence[str] = (), per_destination: int = 1
                        ) -> list[dict[str, Any]]:
        """Atomically move due pending sends to ``sending`` and return them.

        ``busy`` lists the destinations of sends already running (a destination may appear once per running
        send); at most ``per_destination`` sends run at once for one destination.
        """
        with self._tx() as c:
            # Shared: FOR UPDATE SKIP LOCKED, so two nodes claiming at once never get the same send (each row is
            # locked by the first until it commits; the other skips it), and the UPDATE below checks the state.
            rows = [dict(r) for r in c.execute(
                "SELECT * FROM sends WHERE state = ? AND held = 0 AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id" + self._db.lock_rows,
                (SendState.PENDING.value, now),
            ).fetchall()]
            running: dict[str, int] = {}
            for dest in busy:
                running[dest] = running.get(dest, 0) + 1
            claimed = []
            for row in rows:
                if running.get(row["destination"], 0) >= per_destination:
                    continue
                if not c.execute("UPDATE sends SET state = ?, updated_at = ?, owner = ? WHERE id = ? AND state = ?",
                                 (SendState.SENDING.value, now, self.node_id, row["id"],
                                  SendState.PENDING.value)).rowcount:
                    continue
                running[row["destination"]] = running.get(row["destination"], 0) + 1
                claimed.append(row)
        return claimed

    def confirm_sent(self, destination: str, series_uid: str, sop_instance_uids: Sequence[str]) -> None:
        """The destination acknowledged these instances: a later attempt does not send them again.

        Committed without waiting for the disk (one per instance, on the send's critical path: an fsync each was
        0.1 s of a 267-slice series): a killed node keeps them; a power cut may lose the last ones, and the
        restarted send then repeats those instances under the same UIDs (the destination has them already).
        """
        if not sop_instance_uids:
            return
        now = time.time()
        with self._tx(durable=False) as c:
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
            c.executemany("INSERT INTO forwarded VALUES (?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid, destination) "
                          "DO UPDATE SET ae_title = excluded.ae_title, series_uid = excluded.series_uid, "
                          "forwarded_at = excluded.forwarded_at",
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
        with self._read() as c:
            rows = c.execute("SELECT DISTINCT series_uid FROM sends WHERE state IN ('pending', 'sending')")
            return {r[0] for r in rows.fetchall()}

    def send_backlog(self) -> list[dict[str, Any]]:
        """Per destination and state of the sends not done (pending, sending, failed): how many sends, how many
        instances they still have to deliver, the oldest one's creation time and the latest error."""
        return self._query(
            "SELECT destination, state, COUNT(*) AS sends, "
            "SUM(CASE WHEN total > sent THEN total - sent ELSE 0 END) AS remaining, MIN(created_at) AS oldest, "
            "(SELECT last_error FROM sends e WHERE e.destination = s.destination "
            "AND e.last_error IS NOT NULL AND e.state != 'cancelled' ORDER BY e.updated_at DESC LIMIT 1) "
            "AS last_error FROM sends s WHERE state IN ('pending', 'sending', 'failed') "
            "GROUP BY destination, state ORDER BY destination, state")

    def confirmed_for(self, destination: str, series_uid: str) -> set[str]:
        """Every output instance of this (source) series the destination has acknowledged."""
        with self._read() as c:
            rows = c.execute("SELECT sop_instance_uid FROM sent_instances WHERE destination = ? "
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
    def _cancel_sends(c: Any, series_uid: str, reason: str) -> int:
        # The original's sends stay: the series is still what was received, and more of it goes on.
        return c.execute("UPDATE sends SET state = 'cancelled', last_error = ?, updated_at = ? "
                         "WHERE series_uid = ? AND kind != 'original' AND state IN ('pending', 'sending', 'failed')",
                         (reason, time.time(), series_uid)).rowcount

    def settle_series(self, series_uid: str) -> SeriesState | None:
        """After a send finished: DELIVERED when every destination is done, FAILED when the rest gave up."""
        # Shared: two nodes finishing the series' last two sends at once each see the other's; the series lock
        # makes one of them settle it (the other then finds it no longer sending).
        with self._tx(lock=f"petnode:series:{series_uid}") as c:
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
    def _assoc_key(self, assoc_id: str) -> str:
        # Shared: association ids are only unique within one process; the node id keeps each node's apart.
        return f"{self.node_id}/{assoc_id}" if (self.shared or self.multi_process) and self.node_id else assoc_id

    def association_opened(self, assoc_id: str, calling_ae: str, called_ae: str, peer: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO associations VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                      "calling_ae = excluded.calling_ae, called_ae = excluded.called_ae, peer = excluded.peer, "
                      "started_at = excluded.started_at, owner = excluded.owner",
                      (self._assoc_key(assoc_id), calling_ae, called_ae, peer, time.time(), self.node_id))

    def association_closed(self, assoc_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM associations WHERE id = ?", (self._assoc_key(assoc_id),))

    def associations(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM associations ORDER BY started_at")

    # --- nodes sharing the database ------------------------------------------------------------------------
    def register_node(self, *, host: str, pid: int, ae_title: str, port: int, now: float | None = None) -> None:
        """This node (``node_id``) is alive: its row in ``nodes``, kept fresh by :meth:`beat`."""
        assert self.node_id is not None, "register_node needs the StateDB's node_id"
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute("INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                      "host = excluded.host, pid = excluded.pid, ae_title = excluded.ae_title, port = excluded.port, "
                      "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
                      (self.node_id, host, pid, ae_title, port, now, now))

    def beat(self, now: float | None = None) -> None:
        """The heartbeat: other nodes take this node's work back only once it has stopped beating."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute("UPDATE nodes SET heartbeat_at = ? WHERE node_id = ?", (now, self.node_id))

    def leave(self) -> None:
        """This node stops: its row goes, so whatever it leaves behind is taken back at once by the others."""
        with self._tx() as c:
            c.execute("DELETE FROM nodes WHERE node_id = ?", (self.node_id,))

    def nodes(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM nodes ORDER BY node_id")

    def live_nodes(self, since: float) -> set[str]:
        """Nodes whose heartbeat is not older than ``since`` (this one excluded)."""
        rows = self._query("SELECT node_id FROM nodes WHERE heartbeat_at >= ?", (since,))
        return {r["node_id"] for r in rows} - {self.node_id}

    def reclaimable(self, owner: str | None, live: set[str]) -> bool:
        """Whether work owned by ``owner`` may be taken back by this node: never from another live node."""
        return owner is None or owner == self.node_id or owner not in live

    # --- restart ---------------------------------------------------------------------------------------------
    def recover(self, live_since: float | None = None) -> dict[str, int]:
        """After a crash: interrupted processing restarts, interrupted sends retry, stale associations go.

        SQLite is one node's: everything in flight was this node's before it stopped. On a shared database
        (``live_since`` given: the oldest heartbeat of a live node) only what this node (its previous life under
        the same node id) or a node that is gone left behind is taken back: another live node's processing,
        sends and associations are its own (a restart of one node must not steal the other's work).
        """
        where, args = "", []
        if self.shared and live_since is not None:
            where = (" AND (owner IS NULL OR owner = ? OR owner NOT IN "
                     "(SELECT node_id FROM nodes WHERE heartbeat_at >= ? AND node_id != ?))")
            args = [self.node_id, live_since, self.node_id]
        with self._tx() as c:
            processing = c.execute(
                "UPDATE series SET state = ?, updated_at = ? WHERE state = ?" + where,
                (SeriesState.COMPLETE.value, time.time(), SeriesState.PROCESSING.value, *args),
            ).rowcount
            sending = c.execute(
                "UPDATE sends SET state = ?, next_attempt_at = 0 WHERE state = ?" + where,
                (SendState.PENDING.value, SendState.SENDING.value, *args),
            ).rowcount
            c.execute("DELETE FROM associations WHERE 1 = 1" + where, args)
        return {"processing": processing, "sending": sending}
