"""A real node on loopback (port 0) for whole-system scenarios, in-process or as a ``petnode serve`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom_node.node import Node
from dicom_node.rules import load_rules
from dicom_node.settings import load_settings
from dicom_node.state import StateDB
from tests.conftest import wait_until

FAST = {
    "bind_address": "127.0.0.1",
    "port": 0,
    "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.1},
    "send": {"backoff_initial_s": 0.3, "backoff_max_s": 1.0, "poll_interval_s": 0.1, "timeout_s": 10,
             "max_attempts": 30},
    "disk": {"min_free_mb": 1, "max_used_percent": 100},
    "web": {"port": 0},  # the status page on any free port: test nodes never contend for 8080
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
