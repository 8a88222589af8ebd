"""``petnode bench receive``: the data path against references measured in the same run, on the same series.

Four rows, each a ratio to a reference taken in the same run on the same machine (so it means something anywhere):

1. latency: last instance acknowledged -> last derived instance stored at a DCMTK storescp sink (Gaussian route),
   against a naive pydicom round trip of the same files (read, decode, re-encode, write, fsync each);
2. ``petnode denoise --method gaussian`` (the command, a process of its own) against the same naive round trip;
3. receive rate over one association (DCMTK storescu, TCP_NODELAY on) against a minimal pynetdicom SCP that writes
   ``event.encoded_dataset()`` and fsyncs it (pynetdicom as shipped, and with petnode's event-driven reactors), and
   DCMTK storescp (no fsync); then 1, 4 and 10 senders at once (the series split between them, and a copy of the
   series each), in one process and with the default ``receive_processes``;
4. NLM in the node's own path against scikit-image's ``denoise_nl_means`` (patch 3, distance 2, fast mode, one
   thread) on the same volume: the denoise step of a running node's NLM route (torch imported once, as a node
   has it), and ``petnode denoise --method nlm`` minus the Gaussian command (which includes importing torch).

Plus the peak memory of the Gaussian command against the volume's size in float32 and the interpreter's baseline.
Rows 1, 3 (one association) and 4 (the node's step) take petnode and its reference in the same round, the
reference right after it, ``pairs`` rounds; the commands take theirs in the round of each repeat.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import DicomNodeError


@dataclass
class ReceiveFigures:
    instances: int
    storescp_per_s: list[float]
    petnode_per_s: list[float]
    latency_s: list[float]  # last instance acknowledged -> last derived instance acknowledged by the destination
    minimal_per_s: list[float] = field(default_factory=list)  # pynetdicom SCP: encoded_dataset() + fsync
    # The same minimal SCP with petnode's event-driven reactors (dicom_node/reactor.py) and C-STORE messages
    # (dicom_node/fastdimse.py): what is left between it and petnode is the handler's own work (checks,
    # directory entry and record made durable, decode kept).
    minimal_event_driven_per_s: list[float] = field(default_factory=list)
    naive_round_trip_s: list[float] = field(default_factory=list)
    # The same round trip as a program of its own (start, imports, work): the like-for-like reference of a command.
    naive_command_s: list[float] = field(default_factory=list)
    denoise_gaussian_s: list[float] = field(default_factory=list)
    denoise_nlm_s: list[float] = field(default_factory=list)
    skimage_nlm_s: list[float] = field(default_factory=list)
    # Concurrent senders (senders -> instances/s), the node receiving in one process: the series split between
    # the senders, and each sender its own copy of the series (new UIDs: ten scanners sending ten series).
    concurrent_per_s: dict[int, list[float]] = field(default_factory=dict)
    concurrent_own_per_s: dict[int, list[float]] = field(default_factory=dict)
    # The same with the default receive_processes ("auto": dicom_node/receivers.py), when that is more than one.
    concurrent_multi_per_s: dict[int, list[float]] = field(default_factory=dict)
    concurrent_multi_own_per_s: dict[int, list[float]] = field(default_factory=dict)
    receive_processes: int = 1
    # The machine's cores busy during each of those runs (/proc/stat; senders and node together), same keys.
    concurrent_busy: dict[tuple[int, bool, int], list[float]] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the Gaussian command
    baseline_rss_mb: float = 0.0  # the same interpreter with petnode's CLI imported, doing nothing
    libraries_rss_mb: float = 0.0  # ... and the libraries the Gaussian command loads (numpy, pydicom, pydantic)
    volume_mb: float = 0.0  # the series as float32
    torch_threads: int = 0
    send_only_s: list[float] = field(default_factory=list)  # petnode's SCU sending the series to the same sink
    libraries_s: list[float] = field(default_factory=list)  # starting an interpreter and importing the libraries
    node_nlm_s: list[float] = field(default_factory=list)  # a running node's NLM step on the series
    # The naive round trip again, each right after a latency measurement (same round, same load): the latency's
    # paired reference.
    naive_paired_s: list[float] = field(default_factory=list)


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


def _storescu_each(series: list[list[Path]], port: int, called: str) -> float:
    """Seconds for one storescu process per series (one association each) to send them all at once."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([_tool("storescu"), "-aec", called, "-aet", f"SCANNER{i}", "127.0.0.1", str(port),
                               *map(str, paths)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, paths in enumerate(series)]
    for proc in procs:
        if proc.wait() != 0:
            raise DicomNodeError(f"storescu failed (exit {proc.returncode}) in the concurrent receive benchmark")
    return time.perf_counter() - t0


def _storescu_parallel(files: list[Path], port: int, called: str, senders: int) -> float:
    """Seconds for ``senders`` storescu processes (one association each) to send ``files`` between them."""
    chunks = [files[i::senders] for i in range(senders)]
    return _storescu_each([chunk for chunk in chunks if chunk], port, called)


def naive_round_trip(files: list[Path], out_dir: Path) -> float:
    """Seconds for the simplest correct pydicom pass over a series: read, decode the pixels, encode them again,
    write and fsync each file. The reference for the series latency and the denoise command."""
    from pydicom import dcmread

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, path in enumerate(files):
        ds = dcmread(path)
        ds.PixelData = ds.pixel_array.tobytes()
        target = out_dir / f"{i:04d}.dcm"
        ds.save_as(target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


_NAIVE_COMMAND = (
    "import sys\nfrom pathlib import Path\nfrom dicom_node.bench import naive_round_trip\n"
    "naive_round_trip([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))\n"
)


def naive_command_s(files: list[Path], out_dir: Path) -> float:
    """Seconds for :func:`naive_round_trip` run as a program (an interpreter started, pydicom and numpy imported):
    what a command that does the same work cannot go below."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _NAIVE_COMMAND, str(out_dir), *map(str, files)], capture_output=True,
                   check=True)
    return time.perf_counter() - t0


class MinimalScp:
    """The least a durable pynetdicom storage SCP can do: write ``event.encoded_dataset()`` and fsync it.

    ``event_driven``: with petnode's reactors (dicom_node/reactor.py) and byte-level C-STORE messages
    (dicom_node/fastdimse.py, which come with them) instead of pynetdicom's as shipped."""

    def __init__(self, directory: Path, *, event_driven: bool = False) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._count = 0
        ae = AE(ae_title="MINIMAL")
        if event_driven:
            from dicom_node import reactor

            reactor.enable(ae)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        self._count += 1
        path = self.directory / f"{self._count:06d}-{threading.get_ident()}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, event.encoded_dataset())
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


# The command as the ``petnode`` program runs it (``dicom_node.cli.run``, which ends the way the program does), with
# its peak RSS reported by an exit handler.
_MEASURED = (
    "import atexit, sys\n"
    "from dicom_node.cli import run\n"
    "def peak():\n"
    "    lines = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')]\n"
    "    print('PEAK_KB', lines[0].split()[1] if lines else 0, file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "run(sys.argv[1:])\n"
)


def _run_measured(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one ``petnode`` command in a process of its own.

    The peak is the process's own high-water mark (VmHWM) read at its end: rusage's ru_maxrss would also count the
    pages of this (large) benchmark process that the child shared between fork and exec.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *args], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise DicomNodeError(f"petnode {' '.join(args[:2])} ... failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    peak = next((line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")), "0")
    return elapsed, int(peak) / 1024.0


_LIBRARIES = (
    "import dicom_node.cli, dicom_node.pipeline, denoisers.gaussian, pydicom.pixels\n"
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n"
)


def _send_only(files: list[Path], port: int) -> float:
    """Seconds for petnode's SCU (pynetdicom) to C-STORE the files to the sink over one association."""
    from dicom_node.scu import send_files

    t0 = time.perf_counter()
    report = send_files(files, "SINK", "127.0.0.1", port, calling_ae="BENCH")
    elapsed = time.perf_counter() - t0
    if not report.ok:
        raise DicomNodeError(f"sending to the benchmark sink failed: {report.summary()}")
    return elapsed


def _libraries_s() -> float:
    """Seconds to start an interpreter that imports what the Gaussian command runs on."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LIBRARIES], capture_output=True, check=True)
    return time.perf_counter() - t0


def _libraries_rss_mb() -> float:
    """Peak RSS of an interpreter that has imported what the Gaussian command runs on, and done nothing else."""
    proc = subprocess.run([sys.executable, "-c", _LIBRARIES], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip()) / 1024.0


def _skimage_nlm_s(volume: Any) -> float:
    import numpy as np
    from skimage.restoration import denoise_nl_means

    sigma = float(np.std(volume[volume < np.percentile(volume, 50)])) or 1.0
    t0 = time.perf_counter()
    denoise_nl_means(volume, patch_size=3, patch_distance=2, h=0.8 * sigma, sigma=sigma, fast_mode=True)
    return time.perf_counter() - t0


def bench_receive(series_dir: Path, repeats: int = 3, progress: bool = True, pairs: int = 5) -> ReceiveFigures:
    """Send ``series_dir`` to storescp and to petnode (gaussian route back to a storescp), with the references.

    ``pairs`` rounds for the rows whose reference runs in the same round as petnode (one association, the latency,
    NLM in a node); ``repeats`` for the rest (commands, concurrent senders)."""
    from tqdm import tqdm

    from dicom_node.node import Node
    from dicom_node.rules import RuleSet, load_rules
    from dicom_node.settings import load_settings

    from dicom_node.series import load_pet_series

    files = [p for p in series_dir.rglob("*") if p.is_file()]
    figures = ReceiveFigures(len(files), [], [], [])
    volume = load_pet_series(sorted(files)).array  # scikit-image's input, and the memory rows' yardstick
    figures.volume_mb = volume.astype("float32").nbytes / 2**20
    env = {**os.environ, "TCP_NODELAY": "1"}
    with tempfile.TemporaryDirectory(prefix="petnode-bench-") as tmp:
        tmpdir = Path(tmp)
        ref_port, sink_port = free_port(), free_port()
        # The output folders first: storescp checks its -od folder at start and exits when it is missing.
        (tmpdir / "ref").mkdir()
        (tmpdir / "sink").mkdir()
        ref = subprocess.Popen([_tool("storescp"), "-aet", "REF", "-od", str(tmpdir / "ref"), "-uf", str(ref_port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sink = subprocess.Popen([_tool("storescp"), "-aet", "SINK", "-od", str(tmpdir / "sink"), "-uf",
                                 str(sink_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The references run in the same rounds as petnode, each right after it: a ratio then compares two runs
        # made under the same load (a shared machine's load drifts over the minutes a benchmark takes).
        minimals = [(MinimalScp(tmpdir / f"minimal-{event_driven}", event_driven=event_driven), table)
                    for event_driven, table in ((False, figures.minimal_per_s),
                                                (True, figures.minimal_event_driven_per_s))]
        try:
            wait_listening(ref_port)
            wait_listening(sink_port)
            for i in tqdm(range(pairs), desc="bench receive", disable=not progress):
                figures.storescp_per_s.append(len(files) / _storescu(series_dir, ref_port, "REF"))
                rules_path = tmpdir / f"rules{i}.yaml"
                rules_path.write_text(
                    "rules:\n  - name: bench\n    match: {modality: [PT]}\n"
                    "    denoiser: {name: gaussian, params: {fwhm_mm: 4.0}}\n"
                    f"    destinations: [{{ae_title: SINK, host: 127.0.0.1, port: {sink_port}}}]\n")
                settings = load_settings(None, port=0, bind_address="127.0.0.1", data_dir=tmpdir / f"var{i}",
                                         completion={"poll_interval_s": 0.05},
                                         send={"poll_interval_s": 0.05}, disk={"min_free_mb": 1},
                                         web={"enabled": False})
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
                for minimal, table in minimals:
                    table.append(len(files) / _storescu(series_dir, minimal.port, "MINIMAL"))
                figures.naive_paired_s.append(naive_round_trip(sorted(files), tmpdir / f"naive-paired{i}"))
                shutil.rmtree(tmpdir / f"naive-paired{i}", ignore_errors=True)
            _node_nlm(figures, series_dir, volume, tmpdir, sink_port, pairs)
            for _ in range(repeats):  # the latency's floor: only sending, the same way, to the same sink
                figures.send_only_s.append(_send_only(sorted(files), sink_port))
            _concurrent(figures, files, tmpdir, repeats)
            _offline(figures, series_dir, files, tmpdir, repeats)
        finally:
            for minimal, _ in minimals:
                minimal.stop()
            for proc in (ref, sink):
                proc.terminate()
                proc.wait(timeout=10)
    return figures


def _node_nlm(figures: ReceiveFigures, series_dir: Path, volume: Any, tmpdir: Path, sink_port: int,
              rounds: int) -> None:
    """The denoise step of a running node's NLM route on the series (torch imported once, as in a node), each run
    followed by scikit-image's NLM on the same volume (the reference, under the same load)."""
    import torch  # noqa: F401 - a running node has it; its import is the command's cost, not the step's

    from dicom_node.node import Node
    from dicom_node.rules import load_rules
    from dicom_node.settings import load_settings

    rules_path = tmpdir / "nlm.yaml"
    rules_path.write_text("rules:\n  - name: bench-nlm\n    match: {modality: [PT]}\n    denoiser: {name: nlm}\n"
                          f"    destinations: [{{ae_title: SINK, host: 127.0.0.1, port: {sink_port}}}]\n")
    for i in range(rounds):
        settings = load_settings(None, port=0, bind_address="127.0.0.1", data_dir=tmpdir / f"nlm-node{i}",
                                 completion={"poll_interval_s": 0.05}, send={"poll_interval_s": 0.05},
                                 disk={"min_free_mb": 1}, web={"enabled": False})
        node = Node(settings, load_rules(rules_path))
        node.start()
        try:
            _storescu(series_dir, node.port, "PETNODE")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not node.timings:
                threading.Event().wait(0.05)
            if not node.timings:
                raise DicomNodeError("the NLM route did not process the series in the benchmark")
            figures.node_nlm_s.append(next(iter(node.timings.values()))["denoise"])
        finally:
            node.stop()
        figures.skimage_nlm_s.append(_skimage_nlm_s(volume))


def series_copies(files: list[Path], out_dir: Path, copies: int) -> list[list[Path]]:
    """``copies`` copies of a series, each with its own study, series and instance UIDs (derived from the originals,
    so the same in every run): what several scanners sending at once deliver."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    result = []
    for k in range(copies):
        folder = out_dir / f"copy{k}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, path in enumerate(files):
            ds = dcmread(path)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
                if keyword in ds:
                    setattr(ds, keyword, generate_uid(entropy_srcs=[f"petnode-bench-copy-{k}", str(ds[keyword].value)]))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            target = folder / f"{i:04d}.dcm"
            ds.save_as(target)
            paths.append(target)
        result.append(paths)
    return result


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


def _concurrent(figures: ReceiveFigures, files: list[Path], tmpdir: Path, repeats: int) -> None:
    """Receive rate with 1, 4 and 10 senders at once (a rule that routes nothing: receiving alone), in one process
    and with the default receive_processes; the series split between the senders, and a series per sender."""
    from dicom_node.node import Node
    from dicom_node.rules import load_rules
    from dicom_node.settings import load_settings

    rules_path = tmpdir / "receive-only.yaml"
    rules_path.write_text("rules:\n  - name: keep\n    match: {modality: [MG]}\n    drop: true\n")
    figures.receive_processes = load_settings(None).receive_process_count
    copies = series_copies(files, tmpdir / "copies", 10)
    runs = [(1, False, figures.concurrent_per_s), (1, True, figures.concurrent_own_per_s)]
    if figures.receive_processes > 1:
        runs += [(figures.receive_processes, False, figures.concurrent_multi_per_s),
                 (figures.receive_processes, True, figures.concurrent_multi_own_per_s)]
    # Interleaved (every configuration once per round): the machine's drift then touches them all alike.
    for i in range(repeats):
        for processes, own, table in runs:
            for senders in (1, 4, 10):
                rates = table.setdefault(senders, [])
                settings = load_settings(None, port=0, bind_address="127.0.0.1",
                                         data_dir=tmpdir / f"c{processes}-{own}-{senders}-{i}",
                                         disk={"min_free_mb": 1}, max_associations=20, web={"enabled": False},
                                         receive_processes=processes)
                node = Node(settings, load_rules(rules_path))
                node.start()
                try:
                    before = _cpu_ticks()
                    if own:
                        rates.append(senders * len(files) / _storescu_each(copies[:senders], node.port, "PETNODE"))
                    else:
                        rates.append(len(files) / _storescu_parallel(files, node.port, "PETNODE", senders))
                    after = _cpu_ticks()
                    if before and after and after[1] > before[1]:
                        figures.concurrent_busy.setdefault((processes, own, senders), []).append(
                            (after[0] - before[0]) / (after[1] - before[1]))
                finally:
                    node.stop()
                    shutil.rmtree(settings.data_dir, ignore_errors=True)  # ten series a run: keep the disk free


def _offline(figures: ReceiveFigures, series_dir: Path, files: list[Path], tmpdir: Path, repeats: int) -> None:
    """The naive round trip and the denoise commands (time and peak memory)."""
    _, figures.baseline_rss_mb = _run_measured(["--version"])
    figures.libraries_rss_mb = _libraries_rss_mb()
    for i in range(repeats):
        figures.naive_round_trip_s.append(naive_round_trip(sorted(files), tmpdir / f"naive{i}"))
        figures.naive_command_s.append(naive_command_s(sorted(files), tmpdir / f"naive-command{i}"))
        figures.libraries_s.append(_libraries_s())
        seconds, rss = _run_measured(["denoise", str(series_dir), str(tmpdir / f"gauss{i}"), "--method",
                                      "gaussian"])
        figures.denoise_gaussian_s.append(seconds)
        figures.peak_rss_mb = max(figures.peak_rss_mb, rss)
        figures.denoise_nlm_s.append(_run_measured(["denoise", str(series_dir), str(tmpdir / f"nlm{i}"),
                                                    "--method", "nlm"])[0])
    import torch

    figures.torch_threads = torch.get_num_threads()
