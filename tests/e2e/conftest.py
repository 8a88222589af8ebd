"""A real node on loopback (port 0) for whole-system scenarios, in-process or as a ``petnode serve`` process."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_node.node import Node
from dicom_node.rules import load_rules
from dicom_node.settings import load_settings
from dicom_node.state import StateDB
from tests.conftest import wait_until
from tests.dicomtools import terminate

FAST = {
    "bind_address": "127.0.0.1",
    "port": 0,
    "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.1},
    "send": {"backoff_initial_s": 0.3, "backoff_max_s": 1.0, "poll_interval_s": 0.1, "timeout_s": 10,
             "max_attempts": 30},
    "disk": {"min_free_mb": 1, "max_used_percent": 100},
    "web": {"port": 0},  # the status page on any free port: test nodes never contend for 8080
    # One receiving process (the default, "auto", starts one per core): a receiver costs a node about 0.8 s to start
    # and stop, and these tests are about other things; test_receivers.py tests receiving on several processes.
    "receive_processes": 1,
}


def write_config(tmp_path: Path, rules: list[dict[str, Any]], **settings: Any) -> Path:
    """Write node.yaml + rules.yaml into ``tmp_path/config`` and return node.yaml."""
    cfg = tmp_path / "config"
    cfg.mkdir(exist_ok=True)
    (cfg / "rules.yaml").write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    data = {**FAST, "data_dir": str(tmp_path / "var"), "rules_file": "rules.yaml", **settings}
    (cfg / "node.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg / "node.yaml"


def pet_rule(destinations: list[Any], name: str = "pet-gaussian", **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"modality": ["PT"]},
            "denoiser": {"name": "gaussian", "params": {"fwhm_mm": 6.0}},
            "destinations": destinations, **extra}


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Factory: ``start_node(rules, **settings)`` -> a started in-process Node (stopped after the test)."""
    nodes: list[Node] = []

    def _start(rules: list[dict[str, Any]], **settings: Any) -> Node:
        path = write_config(tmp_path, rules, **settings)
        node_settings = load_settings(path)
        ruleset = load_rules(node_settings.resolved_rules_file(), peer_names=[p.name for p in node_settings.peers])
        node = Node(node_settings, ruleset)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


class NodeProcess:
    """``petnode serve`` as a real process (for kill -9); ``port`` read from its first stdout line."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, port: int = 0) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "-c", str(self.config), "serve", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until listening (or the process died)
        if "listening" not in line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"petnode serve did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.port = int(line.split("port=")[1].split()[0])
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace_s=15.0)
        if hasattr(self, "_log"):
            self._log.close()


def send_datasets(datasets: Sequence[Dataset], port: int, *, called_ae: str = "PETNODE",
                  calling_ae: str = "SCANNER") -> list[int]:
    """pynetdicom SCU: C-STORE each dataset over one association; the status of each (-1: no answer)."""
    ae = AE(ae_title=calling_ae)
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(cls, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "node refused the association"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def series_state(node_or_db: Node | StateDB, uid: str) -> str | None:
    db = node_or_db.db if isinstance(node_or_db, Node) else node_or_db
    row = db.series(uid)
    return row["state"] if row else None


def wait_state(node: Node, uid: str, states: Sequence[str], timeout: float = 60.0) -> str | None:
    return wait_until(lambda: series_state(node, uid) in states and series_state(node, uid), timeout)


class RecordingSCP:
    """A PACS stand-in (pynetdicom, every storage class): when each C-STORE arrived, its SOP Instance UID and the
    association it came on. ``stored`` and ``counts`` show duplicates (a UID repeated / counted twice)."""

    def __init__(self, ae_title: str = "RECORDER") -> None:
        self.arrivals: list[tuple[float, str, int]] = []  # (time, SOP Instance UID, association id)
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        with self._lock:
            self.arrivals.append((time.monotonic(), str(event.request.AffectedSOPInstanceUID), id(event.assoc)))
        return 0x0000

    @property
    def stored(self) -> list[str]:
        with self._lock:
            return [uid for _, uid, _ in self.arrivals]

    @property
    def counts(self) -> collections.Counter[str]:
        return collections.Counter(self.stored)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def recorder() -> Iterator[RecordingSCP]:
    scp = RecordingSCP()
    yield scp
    scp.stop()
