"""``petnode demo``: a whole round trip on this machine, with nothing to configure.

A simulated patient (low-count PET of the torso phantom, as DICOM) is sent to a node started on a free port; the
node denoises it and sends the derived series to a sink: DCMTK ``storescp`` when installed, otherwise a small
pynetdicom storage SCP. The demo prints where the derived series is and writes a PNG comparison panel.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.bench import free_port, wait_listening
from dicom_node.errors import DicomNodeError

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    workdir: Path
    source_dir: Path
    derived_dir: Path
    panel: Path
    sink: str
    seconds: float


class _Sink:
    """Where the derived series lands: DCMTK storescp if installed, else an in-process pynetdicom SCP."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._server: Any = None
        exe = shutil.which("storescp")
        if exe:
            self.kind = "DCMTK storescp"
            self._proc = subprocess.Popen([exe, "-aet", "SINK", "-od", str(directory), "-uf", str(self.port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(self.port)
        else:
            from pynetdicom import AE, evt

            from dicom_node.handlers import IMAGE_STORAGE_CLASSES, TRANSFER_SYNTAXES

            def store(event: Any) -> int:
                ds = event.dataset
                ds.file_meta = event.file_meta
                ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                return 0x0000

            self.kind = "pynetdicom storage SCP (DCMTK not installed)"
            ae = AE(ae_title="SINK")
            for uid in IMAGE_STORAGE_CLASSES:
                ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
            self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, store)])

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._server is not None:
            self._server.shutdown()


def _panel(truth: Any, source_dir: Path, derived_files: list[Path], out: Path, title: str,
           truth_suv_per_unit: float = 1.0) -> None:
    """Truth, low-count input and derived series: a middle transverse slice, a coronal slice and a profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dicom_node.series import load_pet_series

    src = load_pet_series(sorted(p for p in source_dir.iterdir() if p.is_file()))
    out_vol = load_pet_series(derived_files)
    scale = src.suv_factor or 1.0
    unit = "SUVbw" if src.suv_factor else src.units
    images = [("low-count input", src.array * scale), ("petnode output", out_vol.array * scale)]
    if truth is not None:  # phantom units -> SUV with the phantom's documented scale
        images.insert(0, ("ground truth", np.asarray(truth) * truth_suv_per_unit))
    reference = images[0][1]
    z = int(np.argmax(reference.reshape(reference.shape[0], -1).max(axis=1)))  # the slice with the hottest spot
    y = int(np.unravel_index(int(np.argmax(reference[z])), reference[z].shape)[0])
    vmax = float(np.percentile(reference[reference > 0], 99.5)) if np.any(reference > 0) else 1.0
    fig, axes = plt.subplots(3, len(images), figsize=(4 * len(images), 11), squeeze=False)
    for col, (name, vol) in enumerate(images):
        axes[0, col].imshow(vol[z], cmap="gray_r", vmin=0, vmax=vmax)
        axes[0, col].set_title(f"{name}\ntransverse slice {z}")
        axes[1, col].imshow(vol[::-1, :, vol.shape[2] // 2], cmap="gray_r", vmin=0, vmax=vmax, aspect="auto")  # head up
        axes[1, col].set_title("sagittal")
        for ax in axes[:2, col]:
            ax.axis("off")
        axes[2, col].axis("off")
    ax = plt.subplot(3, 1, 3)
    for name, vol in images:
        ax.plot(vol[z, y], label=name)
    ax.set_xlabel("column (voxels)")
    ax.set_ylabel(unit)
    ax.set_title(f"profile through row {y} of slice {z}")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def run_demo(workdir: Path, *, phantom: str = "torso", count_level: float = 0.25, fwhm_mm: float = 8.0,
             seed: int = 7, progress: bool = True) -> DemoResult:
    """Simulate, start node and sink, send, wait for the derived series, draw the panel."""
    from dicom_node import scu
    from dicom_node.node import Node
    from dicom_node.rules import parse_rules
    from dicom_node.settings import load_settings
    from training.phantoms import brain_phantom, torso_phantom
    from training.simulate import preset, save_case, simulate_case

    t_start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    params = preset(phantom, "ci")
    make = torso_phantom if phantom == "torso" else brain_phantom
    ph = make(**params["phantom"], seed=seed)
    case = simulate_case(ph, count_levels=(count_level,), realizations=1, seed=seed, progress=progress,
                         **params["simulation"])
    case_dir = save_case(case, workdir / "simulated", dicom=True)
    source_dir = next(p for p in (case_dir / "dicom").iterdir() if p.name.startswith("PET_"))

    sink = _Sink(workdir / "received")
    node = None
    try:
        rules = {"rules": [{"name": "demo-gaussian", "match": {"modality": ["PT"]},
                            "denoiser": {"name": "gaussian", "params": {"fwhm_mm": fwhm_mm}},
                            "output": {"series_description_suffix": f" [petnode demo {fwhm_mm:g}mm]"},
                            "destinations": [{"ae_title": "SINK", "host": "127.0.0.1", "port": sink.port}]}]}
        settings = load_settings(None, port=0, bind_address="127.0.0.1", data_dir=workdir / "var",
                                 completion={"poll_interval_s": 0.1}, send={"poll_interval_s": 0.1},
                                 disk={"min_free_mb": 1}, web={"enabled": False})
        node = Node(settings, parse_rules(rules, source="(demo rules)"))
        node.start()
        files = sorted(p for p in source_dir.iterdir() if p.is_file())
        report = scu.send_files(files, settings.ae_title, "127.0.0.1", node.port, calling_ae="DEMO_SCANNER")
        if not report.ok:
            raise DicomNodeError(f"sending the simulated series to the node failed: {report.summary()}")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = node.db.list_series()
            if rows and rows[0]["state"] in ("delivered", "failed", "refused"):
                break
            threading.Event().wait(0.1)
        row = node.db.list_series()[0]
        if row["state"] != "delivered":
            raise DicomNodeError(f"the demo series ended {row['state']}: {row['error']}")
        waited = time.monotonic() + 30
        while len(sink.files()) < len(files) and time.monotonic() < waited:
            threading.Event().wait(0.05)
    finally:
        if node is not None:
            node.stop()
        sink.stop()
    panel = workdir / "demo_panel.png"
    truth = getattr(case, "truth", None)
    _panel(truth, source_dir, sink.files(), panel,
           f"petnode demo: {phantom} phantom at {count_level:g} of full counts, gaussian {fwhm_mm:g} mm",
           truth_suv_per_unit=float(case.meta["activity"]["suv_per_unit"]))
    return DemoResult(workdir, source_dir, sink.directory, panel, sink.kind, time.perf_counter() - t_start)
