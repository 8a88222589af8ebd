"""The quality bench at CI size: real phantom, physics, denoisers and metrics, and a report a person can read."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from training.bench_quality import matched_noise_row, rois_for, run_quality_bench
from training.phantoms import brain_phantom

pytestmark = pytest.mark.slow


def test_quality_bench_ci_brain(tmp_path: Path):
    report = run_quality_bench("brain", [0.5, 0.1], ["gaussian", "nlm"], tmp_path, size="ci", realizations=2,
                               progress=False, sweeps={"gaussian": ("fwhm_mm", (2.0, 6.0, 10.0)),
                                                       "nlm": ("h_factor", (0.25, 1.0))})
    names = {f.name for f in report.files}
    assert {"results.csv", "table.md", "crc_vs_std.png", "ptv_vs_std.png", "panel_L0.5.png",
            "panel_L0.1.png"} <= names
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2 * (3 + 2)
    gauss = {(float(r["level"]), float(r["value"])): r for r in rows if r["method"] == "gaussian"}
    for level in (0.5, 0.1):
        light, heavy = gauss[(level, 2.0)], gauss[(level, 10.0)]
        # More smoothing: less noise and less contrast recovery (the trade-off the curves show).
        assert float(heavy["uniform_std_pct"]) < float(light["uniform_std_pct"])
        assert float(heavy["crc"]) < float(light["crc"])
        assert float(light["activity_ratio"]) == pytest.approx(1.0, abs=0.02)
    # Lower counts are noisier at the same setting.
    assert float(gauss[(0.1, 2.0)]["uniform_std_pct"]) > float(gauss[(0.5, 2.0)]["uniform_std_pct"])
    table = (tmp_path / "table.md").read_text()
    assert "| 0.5 | gaussian |" in table and "| 0.1 | nlm |" in table and "At matched noise" in table
    assert "flicker %" in table and all(np.isfinite(r["flicker_pct"]) for r in report.rows)
    # Quantitation: each region's mean against the method's own input. Heavier smoothing spills more of the
    # grey matter out into the white matter.
    assert "grey matter, white matter" in table and "regional %" in table
    g = {(r["level"], r["value"]): r for r in report.rows if r["method"] == "gaussian"}
    assert g[(0.5, 10.0)]["suvmean_change_pct:grey matter"] < g[(0.5, 2.0)]["suvmean_change_pct:grey matter"] < 0
    assert g[(0.5, 10.0)]["suvmean_change_max_pct"] > g[(0.5, 2.0)]["suvmean_change_max_pct"] > 0
    # The ceiling of a method that keeps the reconstruction's resolution: the noise-free reconstruction, above
    # the full-count one and above every smoothing of a noisy one.
    c = report.ceiling
    assert c["noiseless_psnr_db"] > c["full_psnr_db"] > max(r["psnr_db"] for r in report.rows if r["level"] == 0.1)
    assert c["noiseless_psnr_db"] > max(r["psnr_db"] for r in report.rows)
    assert 0 < c["noiseless_ssim"] <= 1 and f"scores {c['noiseless_psnr_db']:.2f} dB" in table
    assert "| 0.1 |" in table.split("Ceiling:")[1] and "| nlm |" in table.split("Ceiling:")[1]


def test_regional_change_is_the_relative_change_of_each_regions_mean() -> None:
    from training.bench_quality import regional_change

    source = np.array([[1.0, 3.0], [10.0, 10.0]])
    image = np.array([[2.0, 2.0], [9.0, 10.0]])
    masks = {"a": np.array([[True, True], [False, False]]), "b": np.array([[False, False], [True, True]])}
    change = regional_change(image, source, masks)
    assert change["a"] == pytest.approx(0.0) and change["b"] == pytest.approx(-0.05)


def test_rois_and_matched_noise():
    ph = brain_phantom((16, 48, 48), (3.0, 3.0, 3.0), seed=4)
    rois = rois_for(ph.activity, ph.labels, ph.legend, "brain")
    assert len(rois.hot) >= 1 and len(rois.background) >= 4
    assert set(rois.regions) == {"grey matter", "white matter", "deep nuclei"}
    assert not np.any(np.stack(rois.background).any(axis=0) & np.stack(rois.hot).any(axis=0))
    rows = [{"uniform_std_pct": s, "value": v} for s, v in ((30.0, 1), (12.0, 2), (5.0, 3))]
    assert matched_noise_row(rows, 10.0)["value"] == 2


def test_torso_lesions_are_measured_against_their_own_host_tissue() -> None:
    """CRC compares each lesion with the tissue it sits in: a lung nodule with lung, a liver lesion with liver.
    Against the liver alone (as before), a blurred lung nodule reads colder than the liver: every method's CRC on
    the held-out torso came out negative."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    from training.bench_quality import score
    from training.phantoms import torso_phantom

    ph = torso_phantom((150, 128, 128), (4.0, 4.0, 4.0), seed=90001)  # the bench's held-out torso
    rois = rois_for(ph.activity, ph.labels, ph.legend, "torso")
    assert rois.hot_backgrounds is not None and len(rois.hot_backgrounds) == len(rois.hot) >= 2
    lung = ph.labels == ph.legend["lung"]
    in_lung = [i for i, h in enumerate(rois.hot) if (binary_dilation(h, iterations=2) & lung).sum() > 10]
    assert in_lung, "the held-out torso has lung nodules"
    for i in in_lung:
        assert all(np.all(lung[m]) for m in rois.hot_backgrounds[i])
    truth = ph.activity
    assert score([truth, truth], truth, rois, ph.voxel_mm)["crc"] == pytest.approx(1.0)
    blurred = gaussian_filter(truth, 6.0 / 2.355 / 4.0)
    crc = score([blurred, blurred], truth, rois, ph.voxel_mm)["crc"]
    assert 0.2 < crc < 0.9  # a 6 mm blur keeps part of the contrast, positive
    more = score([gaussian_filter(truth, 1.0)] * 2, truth, rois, ph.voxel_mm)["crc"]
    assert more < crc  # and more blur keeps less


def test_mlem_sweep_uses_iterates_of_one_reconstruction(tmp_path: Path):
    report = run_quality_bench("torso", [0.5], ["mlem"], tmp_path, size="ci", realizations=2, progress=False,
                               sweeps={"mlem": ("iterations", (100.0, 10.0))})
    rows = {r["value"]: r for r in report.rows}
    # Early stopping smooths: 10 ML-EM iterations are less noisy than 100 on the same counts.
    assert rows[10.0]["uniform_std_pct"] < rows[100.0]["uniform_std_pct"]


def test_a_registered_cnn_model_is_scored_beside_the_sweeps(tmp_path: Path) -> None:
    import torch

    from denoisers.models import ModelStore
    from denoisers.nets import build
    from training import TrainingError

    torch.manual_seed(3)
    net, _ = build("fo-dcnn", {"features": 4, "layers": 3})
    weights = tmp_path / "fo.pt"
    torch.save(net.state_dict(), weights)
    store = ModelStore(tmp_path / "models")
    store.add(weights, {"denoiser": "cnn", "architecture": "fo-dcnn", "normalisation": "mean",
                        "extra": {"net": {"features": 4, "layers": 3}}}, name="fo-bench", version="1", activate=True)
    report = run_quality_bench("brain", [0.1], ["gaussian", "cnn:fo-bench"], tmp_path / "q", size="ci",
                               realizations=1, progress=False, models=store,
                               sweeps={"gaussian": ("fwhm_mm", (4.0, 8.0))})
    cnn_rows = [r for r in report.rows if r["method"] == "cnn:fo-bench"]
    assert len(cnn_rows) == 1 and cnn_rows[0]["knob"] == "model"
    assert np.isfinite(cnn_rows[0]["psnr_db"]) and "cnn:fo-bench" in report.table_md.read_text()
    with pytest.raises(TrainingError, match="no model registry"):
        run_quality_bench("brain", [0.1], ["cnn:fo-bench"], tmp_path / "r", size="ci", realizations=1,
                          progress=False)
    store.add(weights, {"denoiser": "cnn", "architecture": "fo-dcnn", "normalisation": "mean",
                        "extra": {"net": {"features": 4, "layers": 3}}}, name="fo-inactive", version="1")
    with pytest.raises(TrainingError, match="cnn:fo-inactive: .*no active version"):  # before any simulation
        run_quality_bench("brain", [0.1], ["cnn:fo-inactive"], tmp_path / "s", size="ci", realizations=1,
                          progress=False, models=store)


def test_the_held_out_real_anatomy_is_scored(tmp_path: Path, realdata: Path) -> None:
    """The ACRIN study, never trained on, is what learned methods are judged on: as a 'real' phantom."""
    acrin = realdata / "ohif_acrin_nsclc_fdg_pet_042" / "PT_AC"
    report = run_quality_bench("real", [0.1], ["gaussian"], tmp_path / "q", size="ci", realizations=1,
                               progress=False, series=acrin, sweeps={"gaussian": ("fwhm_mm", (4.0, 12.0))})
    rows = {r["value"]: r for r in report.rows}
    assert set(rows) == {4.0, 12.0}
    assert all(np.isfinite(r[k]) for r in rows.values() for k in ("psnr_db", "ssim", "crc", "uniform_std_pct"))
    assert rows[12.0]["uniform_std_pct"] < rows[4.0]["uniform_std_pct"]  # more smoothing, less noise
    assert rows[12.0]["crc"] < rows[4.0]["crc"]  # ... and less contrast in the hot structures


def test_counts_per_slice_full_count_reference_and_a_diffusion_model(tmp_path: Path) -> None:
    """BC-DPM's evaluation: levels in counts per slice, PSNR/SSIM also against the full-count reconstruction, the
    margin over the best Gaussian, and the diffusion model's uncertainty panel."""
    import torch

    from denoisers.diffusion import NORMALISATION, build_network
    from denoisers.models import ModelStore
    from training import TrainingError

    store = ModelStore(tmp_path / "models")
    net = {"in_slices": 3, "base": 8, "mults": [1, 2], "blocks": 1, "attention": False}
    torch.save(build_network(dict(net)).state_dict(), tmp_path / "w.pt")
    store.add(tmp_path / "w.pt", {"denoiser": "bcdpm", "architecture": "adm-unet", "normalisation": NORMALISATION,
                                  "extra": {"net": net}}, name="ddpm", version="1.0.0", activate=True)
    report = run_quality_bench("brain", [], ["gaussian", "bcdpm:ddpm"], tmp_path / "r", size="ci",
                               realizations=1, progress=False, models=store, counts_per_slice=[3e6], slab=8,
                               sweeps={"gaussian": ("fwhm_mm", (3.0, 9.0))})
    assert [round(r["level"], 6) for r in report.rows] == [0.2] * 3  # 3 M of the ci brain's 15 M per slice
    assert all(r["slices"] == 8 and np.isfinite(r["psnr_full_db"]) and 0 < r["ssim_full"] <= 1
               for r in report.rows)
    # the full-count reconstruction is closer to the filtered image than the truth is (same resolution)
    g = [r for r in report.rows if r["method"] == "gaussian"]
    assert all(r["psnr_full_db"] > r["psnr_db"] for r in g)
    names = {f.name for f in report.files}
    assert "uncertainty_L0.2.png" in names
    table = report.table_md.read_text()
    assert "Margins over the best Gaussian" in table and "| bcdpm:ddpm |" in table
    with pytest.raises(TrainingError, match="more than the preset's full counts"):
        run_quality_bench("brain", [], ["gaussian"], tmp_path / "x", size="ci", realizations=1, progress=False,
                          counts_per_slice=[1e8])


def test_model_methods_take_any_give_back_scale() -> None:
    from training import bench_quality as bq

    assert bq._model_kind("cnn") == ("cnn", {})
    assert bq._model_kind("cnn-keep6") == ("cnn", {"keep_means_fwhm_mm": 6.0})
    assert bq._model_kind("cnn-keep4.5") == ("cnn", {"keep_means_fwhm_mm": 4.5})
    assert bq._model_kind("cnn-gkeep20") == ("cnn", {"keep_means_fwhm_mm": 20.0, "keep_means_guided": True})
    assert bq._model_kind("cnn-gkeep12n0.05") == ("cnn", {"keep_means_fwhm_mm": 12.0, "keep_means_guided": True,
                                                         "keep_means_noise_ref": 0.05})
    assert bq._model_kind("cnn-keep8n0.1") == ("cnn", {"keep_means_fwhm_mm": 8.0, "keep_means_noise_ref": 0.1})
    assert bq._model_kind("cnn-gkeep12m0.2") == ("cnn", {"keep_means_fwhm_mm": 12.0, "keep_means_guided": True,
                                                        "keep_means_max_noise": 0.2})
    assert bq._model_kind("cnn-gkeep12n0.07m0.2")[1]["keep_means_noise_ref"] == 0.07  # type: ignore[index]
    for bad in ("cnn-keep", "cnn-keepx", "cnn-gkeep0", "cnn-keep-3", "gaussian", "cnn-gkeep12n", "cnn-gkeep12n0",
                "cnn-gkeep12nx", "cnn-gkeep12m", "cnn-gkeep12m0", "cnn-gkeep12m0.2n0.1"):
        assert bq._model_kind(bad) is None, bad
    assert bq._model_method("cnn-gkeep20:fdg-brain-xu@1.1.0") == "fdg-brain-xu@1.1.0"
    assert bq._model_method("cnn-keepx:fdg-brain-xu") is None


def test_simulation_cache_gives_the_same_case_without_simulating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from training import simulate

    cache = tmp_path / "cache"
    kwargs = dict(size="ci", realizations=1, progress=False, sweeps={"gaussian": ("fwhm_mm", (4.0,))},
                  simulation_cache=cache)
    first = run_quality_bench("torso", [0.2], ["gaussian"], tmp_path / "a", **kwargs)
    cached = sorted(cache.glob("case-*.pkl"))
    assert len(cached) == 1 and not list(cache.glob("*.tmp*"))

    def no_simulation(*args: object, **kw: object) -> None:
        raise AssertionError("simulated again although the case is in the cache")

    with monkeypatch.context() as m:
        m.setattr(simulate, "simulate_case", no_simulation)
        second = run_quality_bench("torso", [0.2], ["gaussian"], tmp_path / "b", **kwargs)
        assert [r["psnr_db"] for r in second.rows] == [r["psnr_db"] for r in first.rows]
        with pytest.raises(AssertionError, match="simulated again"):  # another level is another case
            run_quality_bench("torso", [0.3], ["gaussian"], tmp_path / "c", **kwargs)
    cached[0].write_bytes(b"not a pickle")  # a damaged file is simulated again and replaced
    third = run_quality_bench("torso", [0.2], ["gaussian"], tmp_path / "d", **kwargs)
    assert [r["psnr_db"] for r in third.rows] == [r["psnr_db"] for r in first.rows]
    assert cached[0].read_bytes()[:1] != b"n"
