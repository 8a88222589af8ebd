"""``petnode bench receive``: receive throughput beside DCMTK storescp, and end-to-end latency.

Both receivers get the same series from the same sender (DCMTK ``storescu``, TCP_NODELAY on) in the same run,
so the ratio means something on any machine. petnode fsyncs every instance; storescp does not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import DicomNodeError


@dataclass
class ReceiveFigures:
    instances: int
    storescp_per_s: list[float]
    petnode_per_s: list[float]
    latency_s: list[float]  # last instance acknowledged -> last derived instance acknowledged by the destination


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DicomNodeError(f"{name} (DCMTK) is needed for this benchmark: apt-get install dcmtk")
    return path


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        threading.Event().wait(0.05)
    raise DicomNodeError(f"nothing listens on port {port}")


def _storescu(series_dir: Path, port: int, called: str) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    subprocess.run([_tool("storescu"), "-aec", called, "-aet", "SCANNER", "+sd", "+r", "127.0.0.1", str(port),
                    str(series_dir)], check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def bench_receive(series_dir: Path, repeats: int = 3, progress: bool = True) -> ReceiveFigures:
    """Send ``series_dir`` ``repeats`` times to storescp and to petnode (gaussian route back to a storescp)."""
    from tqdm import tqdm

    from dicom_node.node import Node
    from dicom_node.rules import RuleSet, load_rules
    from dicom_node.settings import load_settings

    files = [p for p in series_dir.rglob("*") if p.is_file()]
    figures = ReceiveFigures(len(files), [], [], [])
    env = {**os.environ, "TCP_NODELAY": "1"}
    with tempfile.TemporaryDirectory(prefix="petnode-bench-") as tmp:
        tmpdir = Path(tmp)
        ref_port, sink_port = free_port(), free_port()
        ref = subprocess.Popen([_tool("storescp"), "-aet", "REF", "-od", str(tmpdir / "ref"), "-uf", str(ref_port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (tmpdir / "ref").mkdir()
        (tmpdir / "sink").mkdir()
        sink = subprocess.Popen([_tool("storescp"), "-aet", "SINK", "-od", str(tmpdir / "sink"), "-uf",
                                 str(sink_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(ref_port)
            wait_listening(sink_port)
            for i in tqdm(range(repeats), desc="bench receive", disable=not progress):
                figures.storescp_per_s.append(len(files) / _storescu(series_dir, ref_port, "REF"))
                rules_path = tmpdir / f"rules{i}.yaml"
                rules_path.write_text(
                    "rules:\n  - name: bench\n    match: {modality: [PT]}\n"
                    "    denoiser: {name: gaussian, params: {fwhm_mm: 4.0}}\n"
                    f"    destinations: [{{ae_title: SINK, host: 127.0.0.1, port: {sink_port}}}]\n")
                settings = load_settings(None, port=0, bind_address="127.0.0.1", data_dir=tmpdir / f"var{i}",
                                         completion={"poll_interval_s": 0.05},
                                         send={"poll_interval_s": 0.05}, disk={"min_free_mb": 1})
                ruleset: RuleSet = load_rules(rules_path)
                node = Node(settings, ruleset)
                node.start()
                try:
                    elapsed = _storescu(series_dir, node.port, "PETNODE")
                    figures.petnode_per_s.append(len(files) / elapsed)
                    deadline = time.monotonic() + 300
                    row = None
                    while time.monotonic() < deadline:
                        rows = node.db.list_series()
                        row = rows[0] if rows else None
                        if row and row["state"] in ("delivered", "failed"):
                            break
                        threading.Event().wait(0.02)
                    if not row or row["state"] != "delivered":
                        raise DicomNodeError(f"series not delivered in the benchmark: {row and row['error']}")
                    figures.latency_s.append(float(row["delivered_at"]) - float(row["last_received"]))
                finally:
                    node.stop()
        finally:
            for proc in (ref, sink):
                proc.terminate()
                proc.wait(timeout=10)
    return figures
