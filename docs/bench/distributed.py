"""Jobs per minute: in-process lanes against Celery workers (one, then two) on this machine.

Usage (from the repository root; needs ``redis-server`` on PATH):

    .venv/bin/python docs/bench/distributed.py [--series 8] [--shape 32,96,96] [--search 11] [--repeat 1]
                                               [--method nlm|gaussian]

For each mode the same ``--series`` synthetic PET series (``--shape`` z,y,x) are sent to a fresh node (pynetdicom
SCU, one association per series, back to back) with an NLM rule (``search_vox`` = ``--search``) and a pynetdicom
sink (``--method gaussian``: a Gaussian rule instead, which measures the cost of a job around the denoiser:
queue, result, loading and writing on the node); the clock runs from the first C-STORE to the last derived
instance stored at the sink. Workers run as
``petnode worker --concurrency 1`` processes with one torch thread each (``OMP_NUM_THREADS=1``), and the in-process
baseline gets the same single thread and a single CPU lane (``workers.cpu: 1``), so the rows compare one
denoising slot against two. Prints a table and appends it to ``docs/bench/distributed.csv``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pynetdicom import AE, StoragePresentationContexts, evt  # noqa: E402

from dicom_node.node import Node  # noqa: E402
from dicom_node.rules import load_rules  # noqa: E402
from dicom_node.settings import load_settings  # noqa: E402
from training.dicom_export import make_pet_series  # noqa: E402

FAST = {"bind_address": "127.0.0.1", "port": 0, "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.1},
        "send": {"poll_interval_s": 0.1, "backoff_initial_s": 0.3}, "disk": {"min_free_mb": 1, "max_used_percent": 100},
        "web": {"enabled": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.last = 0.0
        self.lock = threading.Lock()
        ae = AE(ae_title="SINK")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)])
        self.port = int(self.server.server_address[1])

    def store(self, event: Any) -> int:
        nodelay(event.assoc)  # no Nagle stalls on the acknowledgements (DESIGN.md: TCP_NODELAY)
        with self.lock:
            self.counts[str(event.request.AffectedSOPInstanceUID)] += 1
            self.last = time.perf_counter()
        return 0


def nodelay(assoc: Any) -> None:
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send(datasets: list[Any], port: int) -> None:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(datasets[0].SOPClassUID), [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PETNODE")
    nodelay(assoc)  # a scanner sends as fast as it can: pynetdicom's SCU would wait on Nagle for each C-STORE
    for ds in datasets:
        assoc.send_c_store(ds)
    assoc.release()


def run(mode: str, workers: int, series: list[list[Any]], denoiser: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """One measurement: ``mode`` in-process or celery with ``workers`` worker processes."""
    tmp.mkdir(parents=True)
    sink = Sink()
    procs: list[subprocess.Popen[str]] = []
    settings: dict[str, Any] = {**FAST, "data_dir": str(tmp / "shared" / "node"), "rules_file": str(tmp / "rules.yaml"),
                                "workers": {"cpu": 1}, "device": "cpu",
                                "peers": [{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1",
                                           "port": sink.port}]}
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"rules": [{
        "name": "bench", "match": {"modality": ["PT"]}, "denoiser": denoiser,
        "destinations": [{"peer": "sink"}]}]}))
    redis = None
    if mode == "celery":
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        settings["distributed"] = {"broker_url": f"redis://127.0.0.1:{port}/0", "shared_root": str(tmp / "shared"),
                                   "visibility_timeout_s": 600}
        (tmp / "worker.yaml").write_text(yaml.safe_dump({**settings, "data_dir": str(tmp / "shared")}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for i in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "-c", str(tmp / "worker.yaml"), "--log-level", "WARNING",
                 "worker", "-n", f"w{i + 1}@%h"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                env=env, cwd=ROOT))
        for p in procs:
            assert p.stdout is not None and "ready" in p.stdout.readline(), "a worker did not start"
    else:
        import torch

        torch.set_num_threads(1)
    (tmp / "node.yaml").write_text(yaml.safe_dump(settings))
    node_settings = load_settings(tmp / "node.yaml")
    node = Node(node_settings, load_rules(node_settings.resolved_rules_file(), peer_names=["sink"]))
    node.start()
    expected = sum(len(s) for s in series)
    try:
        t0 = time.perf_counter()
        for datasets in series:
            send(datasets, node.port)
        deadline = time.monotonic() + 1800
        while len(sink.counts) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = sink.last - t0
        assert len(sink.counts) == expected and set(sink.counts.values()) == {1}, "not delivered exactly once"
        per_worker = collections.Counter(str(r.worker).split("@")[0] for r in node.remote.jobs.values()) \
            if node.remote is not None else {}
        denoise = [t.get("denoise", 0.0) for t in node.timings.values()]
        # The node's own work per job (load from its decoded cache, write the derived series), and, with workers,
        # the time a job spent around its run on the worker (queue, transport, waiting for a free worker).
        node_s = [t.get("load", 0.0) + t.get("write", 0.0) for t in node.timings.values()]
        around = [t["queued"] for t in node.timings.values() if "queued" in t]
    finally:
        node.stop()
        sink.server.shutdown()
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        if redis is not None:
            redis.terminate()
            redis.wait()
    return {"method": denoiser["name"], "mode": mode, "workers": workers, "series": len(series),
            "seconds": round(elapsed, 2),
            "jobs_per_min": round(60.0 * len(series) / elapsed, 1),
            "mean_denoise_s": round(sum(denoise) / max(1, len(denoise)), 2),
            "mean_node_s": round(sum(node_s) / max(1, len(node_s)), 2),
            "mean_queued_s": round(sum(around) / len(around), 2) if around else "",
            "jobs_per_worker": " ".join(f"{k}:{v}" for k, v in sorted(per_worker.items()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--shape", default="32,96,96")
    parser.add_argument("--search", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--method", choices=["nlm", "gaussian"], default="nlm")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs" / "bench" / "distributed.csv")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    series = [make_pet_series(shape=shape, seed=100 + i) for i in range(args.series)]  # type: ignore[arg-type]
    denoiser = ({"name": "nlm", "params": {"search_vox": args.search}} if args.method == "nlm"
                else {"name": "gaussian", "params": {"fwhm_mm": 6.0}})
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for rep in range(args.repeat):
            for mode, workers in (("in-process", 0), ("celery", 1), ("celery", 2)):
                row = run(mode, workers, series, denoiser, Path(tmpdir) / f"{mode}-{workers}-{rep}")
                rows.append(row)
                print(f"{row['method']:>8} {row['mode']:>10} workers={row['workers']}  {row['series']} series in "
                      f"{row['seconds']:6.2f} s"
                      f"  {row['jobs_per_min']:6.1f} jobs/min  denoise {row['mean_denoise_s']:.2f} s/job  "
                      f"node {row['mean_node_s']:.2f} s/job  queued {row['mean_queued_s'] or '-'} s/job  "
                      f"{row['jobs_per_worker']}", flush=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:  # appends: one file for every method and run
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"written {args.csv}; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
