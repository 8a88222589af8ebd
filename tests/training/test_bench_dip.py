"""``petnode bench dip``: the conditional-DIP paper's curves from one optimisation per dose (tiny, CI size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_node.cli import main
from training.bench_dip import ALPHAS, GAUSS_VOXELS


def test_dip_bench_writes_every_curve_point_and_the_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dip"
    assert main(["bench", "dip", "--size", "ci", "--doses", "1", "--slab", "10", "--param", "epochs=14",
                 "--param", "sample_from=6", "--param", "sample_every=2", "--param", "features=4",
                 "--param", "depth=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "proposed alpha 0.6" in printed and "gaussian 1.5 vox" in printed
    assert {p.name for p in out.iterdir()} >= {"results.csv", "table.md", "pv_vs_std.png", "panels.png"}
    rows = (out / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    methods = [r.split(",")[header.index("method")] for r in rows[1:]]
    # Every point of the three curves: Gaussian 0-4 voxels, DIP snapshots (only the last with 14 epochs), alphas.
    assert methods.count("gaussian") == len(GAUSS_VOXELS)
    assert methods.count("cdip+stability") == len(ALPHAS)
    assert methods.count("cdip") == 1
    by = {(r.split(",")[header.index("method")], float(r.split(",")[header.index("value")])): r.split(",")
          for r in rows[1:]}
    ratio = header.index("activity_ratio")
    std = header.index("wm_std_pct")
    # The blend keeps total activity; alpha 0 is the DIP output itself, alpha 1 moves towards the input.
    assert abs(float(by[("cdip+stability", 0.6)][ratio]) / float(by[("gaussian", 0.0)][ratio]) - 1) < 1e-3
    psnr = header.index("psnr_full_db")
    assert float(by[("cdip+stability", 0.0)][psnr]) == float(by[("cdip", 14.0)][psnr])
    assert float(by[("cdip+stability", 1.0)][std]) != float(by[("cdip", 14.0)][std])
    assert np.isfinite(float(by[("cdip", 14.0)][psnr]))
