"""The conditional-DIP paper's evaluation on a held-out simulated brain with its MR prior (``petnode bench dip``).

Figure 4 of ``shared/papers/conditional-dip-stability-map.txt``: peak-to-valley ratio (deep nuclei over white
matter) against white-matter noise (STD) at 1/10, 1/5, 1/2 and full dose, for OSEM/ML-EM + Gaussian (FWHM 0 to 4
voxels in 0.5 steps), plain conditional DIP (epochs 110 to 200 every 10) and the stability-weighted method (alpha
0 to 1 in 0.1 steps); ROI SUV bias against the truth (figure 5: Gaussian 1.5 voxels, DIP 200 epochs, alpha 0.6);
the mismatch case (a lesion in the PET that the MR does not show) and whether it survives; PSNR / SSIM against
the truth and against the full-count reconstruction, beside a shipped CNN; time per volume.

One DIP optimisation per dose gives every DIP and blend point (``denoisers.dip.run_conditional_dip`` returns the
snapshots and the stability map). "Full dose" is a clinical brain scan (1 M true counts per 2 mm slice, the
brain preset's level 0.1); the reference reconstruction has ten times that. To keep the DIP's CPU time in
minutes the methods see a slab of ``slab`` slices through the deep nuclei (the whole slab for every method).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from denoisers import metrics
from training import TrainingError

HELD_OUT_SEED = 90011  # never a training seed (those are 1-7)
FULL_DOSE = 0.1  # the brain preset's level that is a clinical full dose (1 M counts per slice)
DOSES = (0.1, 0.2, 0.5, 1.0)  # fractions of the full dose: the paper's 1/10, 1/5, 1/2 and full
GAUSS_VOXELS = tuple(np.round(np.arange(0.0, 4.01, 0.5), 2))
DIP_EPOCHS = tuple(range(110, 201, 10))
ALPHAS = tuple(np.round(np.arange(0.0, 1.01, 0.1), 2))


@dataclass
class DipBenchReport:
    rows: list[dict[str, Any]]
    out_dir: Path
    table_md: Path
    files: list[Path]
    seconds: float


def _gauss(volume: np.ndarray, fwhm_vox: float) -> np.ndarray:
    if fwhm_vox <= 0:
        return volume.astype(np.float32, copy=True)
    return ndimage.gaussian_filter(volume, fwhm_vox / 2.3548, mode="nearest").astype(np.float32)


def _slab(mask: np.ndarray, n: int, total: int) -> slice:
    """``n`` slices centred on ``mask``'s centre of mass along z (clipped to the volume)."""
    zc = int(round(float(np.mean(np.nonzero(mask)[0])))) if mask.any() else total // 2
    start = int(np.clip(zc - n // 2, 0, max(0, total - n)))
    return slice(start, min(total, start + n))


def _measures(image: np.ndarray, truth: np.ndarray, full: np.ndarray, rois: dict[str, np.ndarray]) -> dict[str, Any]:
    x = np.asarray(image, dtype=np.float64)
    out: dict[str, Any] = {
        "peak_to_valley": metrics.peak_to_valley_ratio(x, rois["peak"], rois["valley"]),
        "wm_std_pct": 100.0 * metrics.roi_std(x, rois["valley"], relative=True),
        "psnr_truth_db": metrics.psnr(x, truth, rois["body"]),
        "ssim_truth": metrics.ssim(x, truth, rois["body"]),
        "psnr_full_db": metrics.psnr(x, full, rois["body"]),
        "ssim_full": metrics.ssim(x, full, rois["body"]),
        "activity_ratio": metrics.total_activity_ratio(x, truth),
    }
    for name in ("grey matter", "white matter", "deep nuclei", "lesion"):
        mask = rois.get(name)
        if mask is not None and mask.any():
            out[f"bias_pct:{name}"] = 100.0 * metrics.suv_mean_bias(x, truth, mask)
    return out


def run_dip_bench(out_dir: Path, *, doses: Sequence[float] = DOSES, seed: int = HELD_OUT_SEED, slab: int = 40,
                  size: str = "full", cdip_params: dict[str, Any] | None = None, cnn_model: Any = None,
                  cnn_label: str = "", progress: bool = True, device: str = "cpu") -> DipBenchReport:
    """Simulate the held-out brain (one PET-only lesion), run every method at every dose, write the report."""
    from tqdm import tqdm

    from denoisers.dip import CdipParams, blend, keep_total, run_conditional_dip
    from training.bench_quality import _denoise, rois_for
    from training.phantoms import brain_phantom
    from training.simulate import preset, simulate_case

    if not doses or any(not 0 < d <= 1 for d in doses):
        raise TrainingError(f"doses are fractions of the full dose in (0, 1], got {list(doses)}")
    t0 = time.perf_counter()
    params = preset("brain", size)
    full_level = FULL_DOSE
    ph = brain_phantom(**params["phantom"], seed=seed, lesions=1, mismatch=True)
    levels = tuple(sorted({1.0, *(round(full_level * d, 6) for d in doses)}, reverse=True))
    case = simulate_case(ph, count_levels=levels, realizations=1, seed=seed, progress=progress,
                         **params["simulation"])
    if case.prior is None:
        raise TrainingError("the brain phantom came without its MR prior")
    legend = case.meta["phantom"].get("legend")
    all_rois = rois_for(case.truth.astype(np.float64), case.labels, legend, "brain")
    zs = _slab(all_rois.peak if all_rois.peak is not None else all_rois.body, slab, case.truth.shape[0])
    truth = case.truth[zs].astype(np.float64)
    lesion = np.zeros(case.truth.shape, bool)
    for name, value in (legend or {}).items():
        if name.startswith("lesion"):
            lesion |= case.labels == value
    assert all_rois.peak is not None and all_rois.valley is not None
    rois = {"body": all_rois.body[zs], "peak": all_rois.peak[zs], "valley": all_rois.valley[zs],
            **{k: v[zs] for k, v in all_rois.regions.items()}, "lesion": lesion[zs]}
    if not rois["lesion"].any():
        rois.pop("lesion")
    prior = case.prior[zs].astype(np.float32)
    full = case.recons[1.0][0][zs]
    spacing = case.spacing
    cd = CdipParams(**{"epochs": 200, "sample_every": 5, "sample_from": 100, **(cdip_params or {})})
    epochs = tuple(e for e in DIP_EPOCHS if e <= cd.epochs) or (cd.epochs,)
    rows: list[dict[str, Any]] = []
    panels: dict[float, dict[str, np.ndarray]] = {}
    for dose in tqdm(doses, desc="bench dip", disable=not progress):
        level = round(full_level * dose, 6)
        x0 = case.recons[level][0][zs].astype(np.float32)
        base = {"dose": dose, "level": level}
        t = time.perf_counter()
        for fwhm in GAUSS_VOXELS:
            img = _gauss(x0, float(fwhm))
            rows.append({**base, "method": "gaussian", "knob": "fwhm_vox", "value": float(fwhm),
                         **_measures(img, truth, full, rois)})
        gauss_s = (time.perf_counter() - t) / len(GAUSS_VOXELS)
        t = time.perf_counter()
        bar = tqdm(total=cd.epochs, desc=f"cdip dose {dose:g}", leave=False, disable=not progress)
        run = run_conditional_dip(x0, prior, params=cd, seed=seed, device=device, snapshot_epochs=epochs,
                                  progress=lambda *_a, **_k: bar.update(1))
        bar.close()
        dip_s = time.perf_counter() - t
        for e in epochs:
            img, _ = keep_total(run.snapshots.get(e, run.dip), x0, run.crop)
            rows.append({**base, "method": "cdip", "knob": "epochs", "value": float(e), "seconds": dip_s,
                         **_measures(img, truth, full, rois)})
        for alpha in ALPHAS:
            mixed, _ = blend(x0, run.dip, run.stability, run.mask, float(alpha))
            img, _ = keep_total(mixed, x0, run.crop)
            rows.append({**base, "method": "cdip+stability", "knob": "alpha", "value": float(alpha),
                         "seconds": dip_s, **_measures(img, truth, full, rois)})
            if abs(alpha - cd.alpha) < 1e-6:
                panels.setdefault(dose, {})[f"proposed alpha {alpha:g}"] = img
        s_norm = blend(x0, run.dip, run.stability, run.mask, cd.alpha)[1]
        panels.setdefault(dose, {}).update({"input": x0, "gaussian 1.5 vox": _gauss(x0, 1.5),
                                            f"cdip {cd.epochs}": keep_total(run.dip, x0, run.crop)[0],
                                            "normalised stability": s_norm})
        if cnn_model is not None:
            t = time.perf_counter()
            img = _denoise("cnn", {"resample": True}, x0, spacing, model=cnn_model)
            rows.append({**base, "method": f"cnn {cnn_label}".strip(), "knob": "model", "value": 0.0,
                         "seconds": time.perf_counter() - t, **_measures(img, truth, full, rois)})
        for r in rows:
            if r["level"] == level and r["method"] == "gaussian":
                r["seconds"] = gauss_s
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [_write_csv(rows, out_dir / "results.csv")]
    table = out_dir / "table.md"
    table.write_text(_markdown(rows, cd, slab, truth.shape, seed))
    files.append(table)
    files += _plots(rows, out_dir)
    files += _panels(panels, truth, out_dir)
    return DipBenchReport(rows, out_dir, table, files, time.perf_counter() - t0)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pick(rows: list[dict[str, Any]], dose: float, method: str, value: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["dose"] == dose and r["method"] == method and abs(r["value"] - value) < 1e-6),
                None)


def _markdown(rows: list[dict[str, Any]], cd: Any, slab: int, shape: tuple[int, ...], seed: int) -> str:
    doses = sorted({r["dose"] for r in rows})
    cnn = sorted({r["method"] for r in rows if r["method"].startswith("cnn")})
    lines = [f"# Conditional DIP bench (held-out brain seed {seed}, {slab}-slice slab {shape}, MR prior)", "",
             f"cdip: {cd.epochs} epochs, M={cd.sample_every}, m={cd.sample_from}, alpha={cd.alpha}, "
             f"features {cd.features}, depth {cd.depth}, norm {cd.norm}.", "",
             "## Figure 5 settings: Gaussian 1.5 voxels, conditional DIP at its last epoch, proposed alpha 0.6", "",
             "| dose | method | P/V | WM STD % | PSNR truth dB | SSIM truth | PSNR full dB | bias GM % | bias WM % "
             "| bias nuclei % | lesion bias % | s/volume |", "|" + "---|" * 12]
    for dose in doses:
        picks = [("gaussian", 0.0), ("gaussian", 1.5), ("cdip", float(min(cd.epochs, 200))),
                 ("cdip+stability", float(cd.alpha)), *((m, 0.0) for m in cnn)]
        for method, value in picks:
            r = _pick(rows, dose, method, value)
            if r is None:
                continue
            label = {"gaussian": f"gaussian {value:g} vox", "cdip": f"cdip {value:g} ep",
                     "cdip+stability": f"proposed alpha {value:g}"}.get(method, method)
            bias = " | ".join(f"{r.get(f'bias_pct:{n}', float('nan')):+.1f}"
                              for n in ("grey matter", "white matter", "deep nuclei", "lesion"))
            lines.append(
                f"| {dose:g} | {label} | {r['peak_to_valley']:.3f} | {r['wm_std_pct']:.2f} | {r['psnr_truth_db']:.2f} "
                f"| {r['ssim_truth']:.4f} | {r['psnr_full_db']:.2f} | {bias} | {r.get('seconds', float('nan')):.1f} |")
    lines += ["", "Bias: mean in the ROI against the truth's (the reconstruction's own partial-volume loss "
              "included). The lesion is in the PET only (absent from the MR prior).", ""]
    return "\n".join(lines)


def _plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doses = sorted({r["dose"] for r in rows})
    fig, axes = plt.subplots(1, len(doses), figsize=(4.2 * len(doses), 4), squeeze=False)
    styles = {"gaussian": ("o-", "OSEM + Gaussian (0-4 vox)"), "cdip": ("s-", "conditional DIP (110-200 ep)"),
              "cdip+stability": ("^-", "proposed (alpha 0-1)")}
    for ax, dose in zip(axes[0], doses, strict=True):
        for method, (style, label) in styles.items():
            pts = sorted((r["value"], r["wm_std_pct"], r["peak_to_valley"]) for r in rows
                         if r["dose"] == dose and r["method"] == method)
            if pts:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], style, ms=3, label=label)
        for r in rows:
            if r["dose"] == dose and r["method"].startswith("cnn"):
                ax.plot(r["wm_std_pct"], r["peak_to_valley"], "k*", ms=9, label=r["method"])
        ax.set_title(f"dose {dose:g}")
        ax.set_xlabel("white matter STD (%)")
        ax.set_ylabel("peak-to-valley (deep nuclei / WM)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "pv_vs_std.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _panels(panels: dict[float, dict[str, np.ndarray]], truth: np.ndarray, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doses = sorted(panels)
    names = list(next(iter(panels.values())).keys()) if panels else []
    z = truth.shape[0] // 2
    vmax = float(np.percentile(truth[z], 99.5))
    fig, axes = plt.subplots(len(doses), len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.3 * len(doses)),
                             squeeze=False)
    for i, dose in enumerate(doses):
        axes[i][0].imshow(truth[z], cmap="gray_r", vmin=0, vmax=vmax)
        axes[i][0].set_title("truth" if i == 0 else "", fontsize=8)
        axes[i][0].set_ylabel(f"dose {dose:g}", fontsize=8)
        for j, name in enumerate(names):
            img = panels[dose][name]
            stab = name.startswith("normalised")
            axes[i][j + 1].imshow(img[z], cmap="magma" if stab else "gray_r", vmin=0, vmax=1.0 if stab else vmax)
            axes[i][j + 1].set_title(name if i == 0 else "", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = out_dir / "panels.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
