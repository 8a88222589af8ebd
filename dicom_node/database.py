"""Connections to the state database: a SQLite file (one node) or a PostgreSQL server (several nodes share it).

:class:`~dicom_node.state.StateDB` writes its SQL once, in the common subset of both dialects with ``?``
placeholders; this module runs it on either backend. The differences are translated mechanically here (and only
here): placeholders, ``INSERT OR IGNORE``, ``IS ?`` comparisons with NULL, and in DDL the column types (SQLite's
``REAL`` is a double, PostgreSQL's is a 4-byte float that would round timestamps to minutes; an ``INTEGER PRIMARY
KEY`` is SQLite's rowid, PostgreSQL needs an identity column).

Transactions: on SQLite ``BEGIN IMMEDIATE`` takes the database's one write lock, so every read-then-write in a
transaction is serialised. PostgreSQL runs transactions concurrently (READ COMMITTED), so a method that reads and
then writes names a lock key: the transaction first takes ``pg_advisory_xact_lock`` on it (one series, one job),
which gives the same guarantee across every node sharing the database. Single-statement compare-and-swap updates
(``UPDATE ... WHERE state = ?``) and counters (``x = x + 1``) are atomic on both without it.

psycopg 3 is imported only when a ``postgresql://`` URL is used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dicom_node.errors import StorageError

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


def check_url(url: str) -> str:
    """``url`` when it names a backend petnode knows (``sqlite:///path`` or ``postgresql://...``), else ValueError."""
    if url.startswith(SQLITE_PREFIX) and len(url) > len(SQLITE_PREFIX):
        return url
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        return url
    raise ValueError(f"database URL {redact(url)!r} must be sqlite:///<path> or postgresql://[user@]host[:port]/db")


def redact(url: str) -> str:
    """The URL without its password (for logs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks (the same on every node and Python run)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                          "big", signed=True)


class Database:
    """One backend. ``transaction()`` and ``reading()`` yield an object with ``execute(sql, args)`` (returning a
    cursor: ``fetchone``, ``fetchall``, ``rowcount``, iteration) and ``executemany``; rows answer ``row["name"]``,
    ``row[0]`` and ``dict(row)``."""

    dialect: str = ""
    # Whether other processes (other nodes) may use the same database at the same time.
    shared: bool = False
    # Appended to a SELECT whose rows the transaction then updates: other nodes skip rows already taken.
    lock_rows: str = ""

    def transaction(self, lock: str | None = None, *, durable: bool = True) -> AbstractContextManager[Any]:
        """A write transaction. ``durable=False``: its commit survives the process (kill -9) but not the machine
        (a power cut may lose it); for records whose loss costs a repeat, never data (a send's confirmations)."""
        raise NotImplementedError

    def reading(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def session_lock(self, name: str) -> AbstractContextManager[None]:
        """Exclude every other node from ``name`` while held (and this thread's transactions run inside it)."""
        return nullcontext()

    def columns(self, c: Any, table: str) -> list[str]:
        raise NotImplementedError

    def ddl(self, sql: str) -> str:
        """A DDL statement written for SQLite, in this dialect."""
        return sql

    def run_script(self, c: Any, script: str) -> None:
        for stmt in script.strip().split(";"):
            if stmt.strip():
                c.execute(self.ddl(stmt))

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    """One connection and one lock (WAL, so the CLI's readers do not block the node).

    Between processes (the node's receiver processes, the CLI) write transactions queue on an ``flock`` of a
    file beside the database before ``BEGIN IMMEDIATE``. SQLite's own wait for its write lock is a poll that sleeps
    1, 2, 5, 10 ... ms between tries: with two receiver processes committing an instance each a few hundred times a
    second, those sleeps left a third of the two cores idle while instances waited (docs/bench/data-path.md). A
    process blocked in ``flock`` is woken the moment the holder's transaction ends. The file lock is advisory:
    a writer that does not take it (an older petnode, ``sqlite3`` at a shell) still meets SQLite's own lock and
    ``busy_timeout``, as before.
    """

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock_path = path.with_name(path.name + ".writelock")
        self._write_lock_fd: int | None = None
        try:
            self.conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open state database {str(path)!r}: {exc}") from exc
        self.conn.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        with self.lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns, which the C-STORE acknowledgement relies on.
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=30000")

    def _writer_fd(self) -> int | None:
        """The descriptor of the write-lock file (opened once; None where it cannot be, e.g. a read-only dir)."""
        if self._write_lock_fd is None:
            try:
                self._write_lock_fd = os.open(self._write_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._write_lock_fd = -1  # SQLite's own lock and busy_timeout still serialise the writers
        return self._write_lock_fd if self._write_lock_fd >= 0 else None

    @contextmanager
    def _between_processes(self) -> Iterator[None]:
        fd = self._writer_fd()
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self, lock: str | None = None, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock at once: every transaction is serialised, ``lock`` is implied.
        with self.lock, self._between_processes():
            if not durable:
                # WAL with synchronous=NORMAL: the commit is in the WAL (the OS has it, a killed process loses
                # nothing) without an fsync; the next FULL commit's fsync of the same WAL makes it durable too.
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            finally:
                if not durable:
                    self.conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            yield self.conn

    def columns(self, c: Any, table: str) -> list[str]:
        return [r[1] for r in c.execute(f"PRAGMA table_info({table})").fetchall()]

    def describe(self) -> str:
        return f"{SQLITE_PREFIX}{self.path}"

    def close(self) -> None:
        with self.lock:
            self.conn.close()
            if self._write_lock_fd is not None and self._write_lock_fd >= 0:
                os.close(self._write_lock_fd)
            self._write_lock_fd = None


class Row(dict):  # type: ignore[type-arg]
    """A PostgreSQL row that reads like ``sqlite3.Row``: by name, by position, and as a dict."""

    __slots__ = ("_values",)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return self._values[key]
        return dict.__getitem__(self, key)


def _row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description] if cursor.description else []

    def make(values: Sequence[Any]) -> Row:
        row = Row(zip(names, values))
        row._values = values
        return row

    return make


_IS_PARAM = re.compile(r"\bIS \?")
_INSERT_OR_IGNORE = re.compile(r"^\s*INSERT OR IGNORE INTO", re.IGNORECASE)


@lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """A statement written for SQLite (``?`` placeholders), for psycopg (``%s``)."""
    out = sql.replace("%", "%%")
    out = _IS_PARAM.sub("IS NOT DISTINCT FROM ?", out)  # SQLite's IS compares with NULL as a value
    if _INSERT_OR_IGNORE.match(out):
        out = _INSERT_OR_IGNORE.sub("INSERT INTO", out, count=1).rstrip() + " ON CONFLICT DO NOTHING"
    return out.replace("?", "%s")


@lru_cache(maxsize=128)
def postgres_ddl(sql: str) -> str:
    out = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", out)


class _PgConnection:
    """What a transaction sees: ``execute`` / ``executemany`` taking SQLite-dialect SQL."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.conn.execute(postgres_sql(sql), tuple(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(postgres_sql(sql), [tuple(r) for r in rows])


class PostgresDatabase(Database):
    """A small pool of psycopg connections, one per thread while it works.

    A thread keeps the connection it took until its outermost use ends, so a thread that holds a session lock
    (:meth:`session_lock`) runs its transactions on the same connection: it never waits for a second connection
    while holding one (no deadlock when the pool is exhausted), and PostgreSQL sees one session holding the lock.
    """

    dialect = "postgresql"
    shared = True
    lock_rows = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, max_connections: int = 16) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - psycopg[binary] is a dependency
            raise StorageError(f"state database {redact(url)!r} needs psycopg 3 (pip install 'psycopg[binary]')"
                               ) from exc
        self._psycopg = psycopg
        self.url = url
        self.max_connections = max_connections
        self._idle: list[Any] = []
        self._open = 0
        self._cond = threading.Condition()
        self._local = threading.local()
        self._closed = False
        with self._connection():  # a wrong URL or a server that is down fails here, at start, with its reason
            pass

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, row_factory=_row_factory, connect_timeout=10)
        except self._psycopg.Error as exc:
            raise StorageError(f"cannot connect to the state database {redact(self.url)!r}: "
                               f"{str(exc).strip()}") from exc

    def _checkout(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise StorageError("the state database is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.max_connections:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _checkin(self, conn: Any) -> None:
        from psycopg.pq import TransactionStatus

        healthy = not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE
        with self._cond:
            if healthy and not self._closed:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._cond.notify()
        if not healthy or self._closed:
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        held = getattr(self._local, "conn", None)
        if held is not None:  # this thread is already working: same connection, same session
            yield held
            return
        conn = self._checkout()
        self._local.conn = conn
        try:
            yield conn
        finally:
            self._local.conn = None
            self._checkin(conn)

    @contextmanager
    def transaction(self, lock: str | None = None, *, durable: bool = True) -> Iterator[_PgConnection]:
        with self._connection() as conn, conn.transaction():
            if not durable:  # the server answers the commit before its WAL flush (this transaction only)
                conn.execute("SET LOCAL synchronous_commit = off")
            if lock is not None:
                # Released at commit/rollback; another node's transaction on the same key waits here.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(lock),))
            yield _PgConnection(conn)

    @contextmanager
    def reading(self) -> Iterator[_PgConnection]:
        with self._connection() as conn:
            yield _PgConnection(conn)

    @contextmanager
    def session_lock(self, name: str) -> Iterator[None]:
        key = lock_key(name)
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                if not conn.broken:  # a broken connection released its locks with its session
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def columns(self, c: Any, table: str) -> list[str]:
        rows = c.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                         "AND table_name = ? ORDER BY ordinal_position", (table,)).fetchall()
        return [r[0] for r in rows]

    def ddl(self, sql: str) -> str:
        return postgres_ddl(sql)

    def describe(self) -> str:
        return redact(self.url)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


def open_database(target: Path | str, max_connections: int = 16) -> Database:
    """The backend for a path (a SQLite file) or a URL (``sqlite:///path``, ``postgresql://...``);
    ``max_connections``: PostgreSQL's pool size."""
    if isinstance(target, Path):
        return SQLiteDatabase(target)
    url = check_url(target)
    if url.startswith(SQLITE_PREFIX):
        return SQLiteDatabase(Path(url[len(SQLITE_PREFIX):]))
    return PostgresDatabase(url, max_connections=max_connections)
