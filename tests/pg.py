"""A real PostgreSQL server for tests: ``initdb`` + ``postgres`` in a temporary folder, on a free loopback port.

PostgreSQL refuses to run as root: as root the folder is given to the ``postgres`` user and the server runs as that
user (``setpriv``, else ``runuser``). Missing binaries fail the test in CI and skip it locally (like the DCMTK tools).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dicomtools import free_port, in_ci, terminate

START_TIMEOUT_S = 60.0


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` are: ``PETNODE_PG_BINDIR``, Debian's newest version, or the PATH."""
    env = os.environ.get("PETNODE_PG_BINDIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                                           else 0, reverse=True)]
    which = shutil.which("initdb")
    if which:
        candidates.append(Path(which).parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


class PostgresServer:
    """One running server; :meth:`create_database` gives each test its own database."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self._as_root = os.geteuid() == 0
        # As root: in /tmp, whose parents the postgres user can traverse (TMPDIR may be a private folder).
        self.root = Path(tempfile.mkdtemp(prefix="petnode-pg-", dir="/tmp" if self._as_root else None))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _cmd(self, *argv: str) -> list[str]:
        if not self._as_root:
            return list(argv)
        # setpriv execs the program itself (runuser would stay in between and not pass SIGINT on).
        setpriv = shutil.which("setpriv")
        if setpriv:
            return [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", "postgres", "--", *argv]

    def start(self) -> PostgresServer:
        init = subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                                        "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"),
                              capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stdout[-2000:]}{init.stderr[-2000:]}")
        for _ in range(3):  # a free port may be taken before the server binds it: try another
            self.port = free_port()
            with self.log.open("ab") as log:
                # fsync off: these tests are about concurrency and SQL, not about surviving a power cut.
                self.proc = subprocess.Popen(
                    self._cmd(str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.root),
                              "-p", str(self.port), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                              "-c", "full_page_writes=off", "-c", "max_connections=300"),
                    stdout=log, stderr=subprocess.STDOUT)
            if self._await_ready():
                return self
            self._terminate()
        raise RuntimeError(f"postgres did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def _await_ready(self) -> bool:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _terminate(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace_s=30.0, sig=signal.SIGINT)  # fast shutdown: clients are disconnected

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (skipped locally without the binaries, a failure in CI)."""
    bindir = postgres_bindir()
    if bindir is None:
        if in_ci():
            pytest.fail("PostgreSQL (initdb, postgres) not found: CI installs postgresql")
        pytest.skip("PostgreSQL (initdb, postgres) not installed")
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
