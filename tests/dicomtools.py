"""Test helpers around the real external DICOM programs used as peers in tests.

Wraps DCMTK (``storescp``, ``storescu``, ``echoscu``), Orthanc and dicom3tools' ``dciodvfy``. Everything listens
and connects on 127.0.0.1 with free ports, and every process started here is stopped when its context manager (or
pytest fixture) exits, even when the test fails.

This is test code, not product code: it may use ``pytest.skip``/``pytest.fail`` (see `require_tool`).

Quirks worth knowing
--------------------
- DCMTK 3.6.7 only sets TCP_NODELAY when the environment variable ``TCP_NODELAY=1`` is set; without it every
  C-STORE stalls for tens of milliseconds (Nagle + delayed ACK). Every DCMTK process here, Orthanc included (it
  uses DCMTK's network layer), runs with it.
- ``storescp`` writes each object in place under its final name (no temporary name and rename) and only then
  answers the C-STORE, so a file may be visible while half written. `StoreSCP` reads storescp's verbose log to
  tell which files are complete.
- Orthanc 1.10 has no option to bind to one address: both its DICOM and HTTP ports listen on all interfaces.
  ``RemoteAccessAllowed: false`` makes the HTTP server refuse non-local clients; the DICOM port stays open.
- Orthanc reads only the configuration file given on its command line, so the Debian default
  ``/etc/orthanc/orthanc.json`` (which loads ``/usr/share/orthanc/plugins``) is not used; ``"Plugins": []`` is
  set anyway. ``GET /plugins`` still lists the built-in ``explorer.js``.
- urllib honours ``http_proxy`` even for 127.0.0.1 unless ``no_proxy`` says otherwise, so the REST client
  disables proxies explicitly.
- ``dciodvfy`` writes its report to stderr and exits 1 when it found errors (0 with warnings only); messages look
  like ``Error - ...``, ``Warning - ...``, ``Abort - ...`` or ``(0xgggg,0xeeee) VR - Error - ...``.
"""

from __future__ import annotations

import atexit
import json as jsonlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Extra places to look for tools: Debian installs Orthanc in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_TOOL_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# Polling interval for external processes, which give no event we could wait on. Short because the waits are
# usually satisfied within milliseconds; each poll is a cheap stat/log read or a local HTTP request.
_POLL_S = 0.02

# Processes still running, stopped at interpreter exit in case a caller neither used a context manager nor
# reached its teardown (e.g. KeyboardInterrupt inside a fixture setup).
_LIVE: set[subprocess.Popen[bytes]] = set()


def _stop_live_at_exit() -> None:
    for proc in list(_LIVE):
        terminate(proc, grace_s=5.0)


atexit.register(_stop_live_at_exit)


class ToolError(RuntimeError):
    """An external tool could not be started or misbehaved."""


class OrthancError(ToolError):
    """Orthanc's REST API answered with an HTTP error.

    Parameters
    ----------
    method, path
        The request.
    status
        HTTP status code.
    body
        Response body, decoded as text.
    """

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {body.strip()[:2000]}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


# --------------------------------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Binds port 0, reads the port the kernel chose and releases it. Another process may take it before the caller
    binds it; the servers below retry with a new port when their program exits at startup.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tool_path(name: str) -> str | None:
    """Return the absolute path of an external program, or None when it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _EXTRA_TOOL_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def have_tool(name: str) -> bool:
    """Return True when the external program ``name`` is installed."""
    return tool_path(name) is not None


def in_ci() -> bool:
    """Return True when running in CI (env ``CI`` set to anything but empty, ``0`` or ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """Return the path of ``name``; skip the test when it is missing, but fail in CI.

    CI installs every tool, so a missing one there is a broken setup and must not hide behind a skip.

    Parameters
    ----------
    name
        Program name, e.g. ``"storescp"``, ``"Orthanc"``, ``"dciodvfy"``.

    Returns
    -------
    str
        Absolute path of the program.
    """
    path = tool_path(name)
    if path is None:
        message = f"external tool {name!r} is not installed"
        if in_ci():
            pytest.fail(f"{message} (CI must not skip)")
        pytest.skip(message)
    return path


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # DCMTK only disables Nagle when asked; see module docstring
    return env


def terminate(proc: subprocess.Popen[Any], grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM), wait up to ``grace_s``, then SIGKILL; nothing when the process has ended."""
    try:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM for %.1f s; killing it", proc.pid, grace_s)
                proc.kill()
                proc.wait(timeout=grace_s)
    finally:
        _LIVE.discard(proc)


def _spawn(argv: Sequence[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        # The child keeps its own copy of the descriptor, so closing ours right away is fine.
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_tool_env(),
            cwd=cwd,
        )
    _LIVE.add(proc)
    return proc


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# dciodvfy
# --------------------------------------------------------------------------------------------------------------

_DCIODVFY_MSG = re.compile(r"(?<![A-Za-z])(Error|Warning|Abort) - ")


def run_dciodvfy(path: Path | str, *, timeout: float = 120.0) -> tuple[list[str], list[str]]:
    """Validate one DICOM file with dicom3tools' ``dciodvfy``.

    Parameters
    ----------
    path
        The file.
    timeout
        Seconds before giving up.

    Returns
    -------
    errors, warnings
        The ``Error - ...`` (and ``Abort - ...``) lines and the ``Warning - ...`` lines, stripped. When dciodvfy
        exits non-zero without printing an error line, one error describing the exit status is added, so a crash
        never passes as valid.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist (dciodvfy would only report "Abort - File open for read failed").
    """
    exe = require_tool("dciodvfy")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, errors="replace", timeout=timeout, check=False
    )
    errors: list[str] = []
    warnings: list[str] = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        found = _DCIODVFY_MSG.search(line)
        if found is None:
            continue
        (warnings if found.group(1) == "Warning" else errors).append(line.strip())
    if proc.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with status {proc.returncode} without an error line")
    return errors, warnings


# --------------------------------------------------------------------------------------------------------------
# DCMTK clients
# --------------------------------------------------------------------------------------------------------------


def storescu(
    files: Sequence[Path | str] | Path | str,
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK ``storescu`` (TCP_NODELAY=1, plain uncompressed proposals, ``-R``).

    Parameters
    ----------
    files
        Files and/or directories; directories are scanned recursively (``+sd +r``).
    host, port
        The peer.
    called_ae, calling_ae
        AE titles.
    extra_args
        More storescu options, placed before the peer address.
    timeout
        Seconds for the whole run.

    Returns
    -------
    subprocess.CompletedProcess
        With text ``stdout``/``stderr``; not checked, callers assert on ``returncode``.

    Notes
    -----
    ``-R`` proposes only the SOP classes present in the files, so any storage class works, not only those in
    storescu's built-in list. Timeouts (``-to``/``-ta``) keep a dead peer from hanging a test.
    """
    exe = require_tool("storescu")
    items = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    if not items:
        raise ValueError("storescu needs at least one file or directory")
    argv = [exe, "-R", "-to", "10", "-ta", "10", "-aet", calling_ae, "-aec", called_ae]
    if any(item.is_dir() for item in items):
        argv += ["+sd", "+r"]
    argv += [*extra_args, host, str(port), *(str(item) for item in items)]
    return subprocess.run(
        argv, capture_output=True, text=True, errors="replace", env=_tool_env(), timeout=timeout, check=False
    )


def echoscu(
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO a peer with DCMTK ``echoscu``; returncode 0 means success."""
    exe = require_tool("echoscu")
    argv = [exe, "-to", "10", "-ta", "10", "-aet", calling_ae, "-aec", called_ae, host, str(port)]
    return subprocess.run(
        argv, capture_output=True, text=True, errors="replace", env=_tool_env(), timeout=timeout, check=False
    )


# --------------------------------------------------------------------------------------------------------------
# storescp
# --------------------------------------------------------------------------------------------------------------

_STORING = "I: storing DICOM file: "


def _complete_dicom(path: Path) -> bool:
    """Whether a file reads as a whole DICOM file (Pixel Data as long as its image attributes say)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path)
        if "PixelData" not in ds:
            return True
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated)) // 8
        return len(ds.PixelData) >= expected
    except Exception:  # noqa: BLE001 - half-written: anything may fail to parse
        return False


class StoreSCP:
    """DCMTK ``storescp`` on 127.0.0.1 as a context manager.

    Files are named by storescp from the SOP Instance UID (``-uf``, e.g. ``PT.<uid>.dcm``), so a resent
    instance overwrites its file and `files` counts distinct instances.

    Parameters
    ----------
    output_dir
        Where received files go (created if needed).
    ae_title
        storescp's AE title (it accepts any called AE title anyway).
    extra_args
        More storescp options.
    log_path
        storescp's verbose log; default ``<output_dir>.storescp.log`` beside the output directory, so it never
        counts as a received file.
    startup_timeout
        Seconds to wait for the port to accept connections.
    """

    def __init__(
        self,
        output_dir: Path | str,
        *,
        ae_title: str = "STORESCP",
        extra_args: Sequence[str] = (),
        log_path: Path | str | None = None,
        startup_timeout: float = 15.0,
        port: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.fixed_port = port  # a port a test already told someone about (a destination coming up late)
        self.ae_title = ae_title
        self.extra_args = tuple(extra_args)
        default_log = self.output_dir.with_name(self.output_dir.name + ".storescp.log")
        self.log_path = Path(log_path) if log_path else default_log
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The listening port (only valid once started)."""
        if self._port is None:
            raise ToolError("storescp is not running")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the storescp process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> StoreSCP:
        """Start storescp on a free port and wait until it accepts connections."""
        exe = require_tool("storescp")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        last_log = ""
        for _attempt in range(5):
            port = self.fixed_port or free_port()
            self.log_path.write_bytes(b"")
            argv = [
                exe, "-v", "-dhl", "-aet", self.ae_title, "-od", str(self.output_dir), "-uf", "-fe", ".dcm",
                *self.extra_args, str(port),
            ]  # fmt: skip
            proc = _spawn(argv, self.log_path)
            if self._await_listening(proc, port):
                self._proc, self._port = proc, port
                logger.debug("storescp %s listening on %d (pid %d)", self.ae_title, port, proc.pid)
                return self
            last_log = _tail(self.log_path)
            terminate(proc)
            # Most likely the port was taken between free_port() and storescp's bind; try another one.
        raise ToolError(f"storescp did not start; last log:\n{last_log}")

    def _await_listening(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            # A bare connect only makes storescp log "Association Received"; it is the cheapest readiness probe.
            if _port_accepts(port):
                return proc.poll() is None
            try:
                proc.wait(timeout=_POLL_S)  # doubles as the poll interval, and returns at once if it died
                return False
            except subprocess.TimeoutExpired:
                pass
        return False

    def stop(self) -> None:
        """Stop storescp (SIGTERM, then SIGKILL); idempotent."""
        if self._proc is not None:
            terminate(self._proc)
            self._proc = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """storescp's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _in_flight(self) -> Path | None:
        """The file storescp is writing right now, if any.

        storescp logs "storing DICOM file: X" before writing X and answers the C-STORE after writing it; the next
        info line ("Received Store Request", "Association Release", ...) therefore means X is complete.
        """
        lines = [line for line in self.log_text().splitlines() if line.startswith(("I: ", "W: ", "E: "))]
        for line in reversed(lines):
            if line.startswith(_STORING):
                return Path(line[len(_STORING):].strip())
            if line.startswith("I: "):
                return None
        return None

    def files(self, settle_s: float = 1.0) -> list[Path]:
        """Completely written received files, sorted by name.

        A file storescp still seems to be writing (no log line after its "storing" line yet) is waited for up to
        ``settle_s``: the sender may have had its answer, released and moved on before storescp's next log line
        reached the file (seen once in CI with a fast sender), and leaving out a complete file then fails a test.
        After that, it is left out only if it does not read as a whole DICOM file.
        """
        in_flight = self._in_flight() if self.running else None
        deadline = time.monotonic() + settle_s
        while in_flight is not None and time.monotonic() < deadline:
            time.sleep(_POLL_S / 5)
            in_flight = self._in_flight() if self.running else None
        found = sorted(p for p in self.output_dir.iterdir() if p.is_file())
        if in_flight is not None:
            found = [p for p in found if p.name != in_flight.name or _complete_dicom(p)]
        return found

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until at least ``count`` complete files were received.

        storescp offers no notification we could block on, so this polls the output directory and the log
        every 20 ms (cheap, and the files usually arrive within milliseconds).

        Returns
        -------
        bool
            True when ``count`` files are there, False on timeout or when storescp died.
        """
        deadline = time.monotonic() + timeout
        while True:
            if len(self.files()) >= count:
                return True
            if self._proc is None or time.monotonic() >= deadline:
                return False
            try:
                self._proc.wait(timeout=_POLL_S)
                return len(self.files()) >= count  # storescp exited: whatever is there is all there will be
            except subprocess.TimeoutExpired:
                pass


# --------------------------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------------------------


class Orthanc:
    """A throw-away Orthanc server as a context manager.

    It writes its own configuration in a temporary directory (storage and index there too, no plugins, free DICOM
    and HTTP ports, AE title ``aet``, stores accepted from anyone, called AE title not checked, remote HTTP access
    refused, no authentication) and is stopped with SIGTERM (then SIGKILL) on exit; the directory is removed.

    Parameters
    ----------
    aet
        Orthanc's DICOM AE title.
    modalities
        Known DICOM peers, ``{name: (aet, host, port)}``; more can be added later with `add_modality`.
    extra_config
        Configuration keys overriding the defaults written here (e.g. ``{"OverwriteInstances": True}``).
    workdir
        Directory for config, storage and log; default a new temporary directory removed at `stop`.
    startup_timeout
        Seconds to wait for ``GET /system`` to answer.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        workdir: Path | str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.aet = aet
        self.host = LOOPBACK
        self._modalities = dict(modalities or {})
        self._extra_config = dict(extra_config or {})
        self._given_workdir = Path(workdir) if workdir else None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.startup_timeout = startup_timeout
        self.name = f"petnode-test-{uuid.uuid4().hex[:12]}"  # lets us check /system answers from *our* Orthanc
        self._proc: subprocess.Popen[bytes] | None = None
        self._dicom_port: int | None = None
        self._http_port: int | None = None
        self.workdir: Path | None = None
        self.startup_s: float | None = None
        # No proxy, whatever the environment says: everything here is loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def dicom_port(self) -> int:
        """Orthanc's DICOM port."""
        if self._dicom_port is None:
            raise ToolError("Orthanc is not running")
        return self._dicom_port

    @property
    def http_port(self) -> int:
        """Orthanc's HTTP (REST) port."""
        if self._http_port is None:
            raise ToolError("Orthanc is not running")
        return self._http_port

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """Orthanc's log file (stdout and stderr)."""
        if self.workdir is None:
            raise ToolError("Orthanc was not started")
        return self.workdir / "orthanc.log"

    def config(self, dicom_port: int, http_port: int) -> dict[str, Any]:
        """The configuration written for the given ports."""
        assert self.workdir is not None
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: [a, h, p] for name, (a, h, p) in self._modalities.items()},
            "DicomModalitiesInDatabase": False,
            # Orthanc's SCU otherwise holds each association open 5 s after a store; peers would see it late.
            "DicomAssociationCloseDelay": 0,
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "SaveJobs": False,
            # Default is 60 s; tests that wait for IsStable should not wait a minute.
            "StableAge": 2,
        }
        cfg.update(self._extra_config)
        return cfg

    def start(self) -> Orthanc:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers."""
        exe = require_tool("Orthanc")
        if self._given_workdir is not None:
            self.workdir = self._given_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="petnode-orthanc-")
            self.workdir = Path(self._tmpdir.name)
        (self.workdir / "storage").mkdir(exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        last_log = ""
        try:
            for _attempt in range(5):
                dicom_port, http_port = free_port(), free_port()
                if dicom_port == http_port:
                    continue
                config_path.write_text(jsonlib.dumps(self.config(dicom_port, http_port), indent=2))
                self.log_path.write_bytes(b"")
                started = time.monotonic()
                proc = _spawn([exe, str(config_path)], self.log_path, cwd=self.workdir)
                self._dicom_port, self._http_port = dicom_port, http_port
                if self._await_ready(proc):
                    self._proc = proc
                    self.startup_s = time.monotonic() - started
                    logger.debug("Orthanc up in %.2f s (dicom %d, http %d)", self.startup_s, dicom_port, http_port)
                    return self
                last_log = _tail(self.log_path)
                terminate(proc)
                self._dicom_port = self._http_port = None
                # Usually a port taken between free_port() and Orthanc's bind; try new ones.
            raise ToolError(f"Orthanc did not start; last log:\n{last_log}")
        except BaseException:
            self.stop()
            raise

    def _await_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                system = self.rest("GET", "/system", timeout=2.0)
                # Orthanc starts its DICOM server before its HTTP server, so an answer means both listen.
                return proc.poll() is None and isinstance(system, dict) and system.get("Name") == self.name
            except (OSError, OrthancError):
                pass
            try:
                proc.wait(timeout=_POLL_S)  # the poll interval, cut short if Orthanc exits (bad port, bad config)
                return False
            except subprocess.TimeoutExpired:
                pass
        return False

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and remove its temporary directory; idempotent."""
        if self._proc is not None:
            terminate(self._proc, grace_s=15.0)
            self._proc = None
        self._dicom_port = self._http_port = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def reset(self) -> None:
        """Delete every stored resource and every modality added at runtime; restore the configured modalities.

        A clean stop of Orthanc 1.10 takes about 3.5 s (its HTTP and DICOM server threads poll for the stop
        flag), so the `orthanc` fixture shares one server per session and resets it before each test.
        """
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")
        for name in self.rest("GET", "/modalities"):
            if name not in self._modalities:
                self.rest("DELETE", f"/modalities/{name}")
        for name, (aet, host, port) in self._modalities.items():
            self.add_modality(name, aet, host, port)

    def log_text(self) -> str:
        """Orthanc's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST ----------------------------------------------------------------------------------------------------

    def rest(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> Any:
        """Call Orthanc's REST API with urllib.

        Parameters
        ----------
        method
            HTTP method.
        path
            Path starting with ``/`` (query string allowed).
        json
            Body serialised as JSON (ignored when ``data`` is given).
        data, content_type
            Raw body, e.g. a DICOM file.
        timeout
            Seconds.

        Returns
        -------
        Any
            Decoded JSON when the answer is JSON, None when empty, raw bytes otherwise.

        Raises
        ------
        OrthancError
            On an HTTP error status.
        """
        body: bytes | None = data
        headers: dict[str, str] = {}
        if body is None and json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = content_type or "application/octet-stream"
        request = urllib.request.Request(self.url + path, data=body, method=method.upper(), headers=headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                payload = response.read()
                mime = response.headers.get_content_type()
        except urllib.error.HTTPError as err:
            raise OrthancError(method.upper(), path, err.code, err.read().decode(errors="replace")) from None
        if not payload:
            return None
        if mime == "application/json":
            return jsonlib.loads(payload)
        return payload

    def system(self) -> dict[str, Any]:
        """``GET /system``."""
        return dict(self.rest("GET", "/system"))

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a DICOM peer under symbolic ``name`` (kept in memory only)."""
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def echo_modality(self, name: str) -> None:
        """C-ECHO the peer registered as ``name``; raises OrthancError when it fails."""
        self.rest("POST", f"/modalities/{name}/echo", {})

    def upload(self, path: Path | str) -> dict[str, Any]:
        """``POST /instances`` one DICOM file; returns Orthanc's answer (ID, ParentSeries, Status ...)."""
        answer = self.rest("POST", "/instances", data=Path(path).read_bytes(), content_type="application/dicom")
        return dict(answer)

    def upload_all(self, paths: Sequence[Path | str]) -> list[dict[str, Any]]:
        """Upload several files (see `upload`)."""
        return [self.upload(p) for p in paths]

    def store_to_modality(self, name: str, resource_ids: Sequence[str] | str) -> dict[str, Any]:
        """C-STORE Orthanc resources (instances, series, studies or patients) to peer ``name``, synchronously.

        Returns
        -------
        dict
            Orthanc's job answer (``InstancesCount``, ``FailedInstancesCount``, ...). An association or store
            failure raises OrthancError.
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        answer = self.rest("POST", f"/modalities/{name}/store", {"Resources": ids, "Synchronous": True})
        return dict(answer)

    def series(self, *, expand: bool = False) -> list[Any]:
        """Orthanc IDs of all series, or their full descriptions when ``expand``."""
        return list(self.rest("GET", "/series?expand" if expand else "/series"))

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        """The instances of one series (Orthanc series ID), each with ID, MainDicomTags, ..."""
        return list(self.rest("GET", f"/series/{series_id}/instances"))

    def find_series(self, series_instance_uid: str) -> dict[str, Any] | None:
        """The expanded series description for a SeriesInstanceUID, or None when Orthanc does not have it."""
        found = self.rest(
            "POST",
            "/tools/find",
            {"Level": "Series", "Query": {"SeriesInstanceUID": series_instance_uid}, "Expand": True},
        )
        return dict(found[0]) if found else None

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags`` (keyword -> value)."""
        return dict(self.rest("GET", f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        return bytes(self.rest("GET", f"/instances/{instance_id}/file"))

    def wait_for_series(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any] | None:
        """Wait until some series satisfies ``predicate``.

        Orthanc has no change notification over plain REST, so this polls ``GET /series?expand`` every 20 ms.

        Parameters
        ----------
        predicate
            Called with each expanded series (keys ``ID``, ``Instances``, ``MainDicomTags``, ``IsStable`` ...),
            e.g. ``lambda s: len(s["Instances"]) == 8``.
        timeout
            Seconds.

        Returns
        -------
        dict or None
            The first matching series, None on timeout or when Orthanc died.
        """
        deadline = time.monotonic() + timeout
        while True:
            for item in self.series(expand=True):
                if predicate(item):
                    return dict(item)
            if self._proc is None or time.monotonic() >= deadline:
                return None
            try:
                self._proc.wait(timeout=_POLL_S)
                return None  # Orthanc exited
            except subprocess.TimeoutExpired:
                pass


# --------------------------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module or conftest.py)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def orthanc_server() -> Iterator[Orthanc]:
    """One `Orthanc` for the whole session (see `orthanc`); stopped at the end of the session."""
    require_tool("Orthanc")
    with Orthanc() as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """A running `Orthanc` (AE title ORTHANC) with no stored data and no runtime-added modalities.

    The server is shared with other tests (restarted if a test stopped it) and emptied with `Orthanc.reset`
    before each test, because a clean Orthanc stop costs about 3.5 s. Tests needing their own configuration
    start an `Orthanc` themselves. Needs ``orthanc_server`` importable where ``orthanc`` is used (conftest).
    """
    if not orthanc_server.running:
        orthanc_server.stop()
        orthanc_server.start()
    orthanc_server.reset()
    return orthanc_server


@pytest.fixture
def storescp_sink(tmp_path: Path) -> Iterator[StoreSCP]:
    """A running `StoreSCP` (AE title SINK) writing to ``tmp_path / "sink"``, stopped after the test."""
    require_tool("storescp")
    with StoreSCP(tmp_path / "sink", ae_title="SINK") as scp:
        yield scp

