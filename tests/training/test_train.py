"""Training: it learns, it is deterministic, it resumes from a checkpoint to the very same weights, fine-tuning
trains only what it should, and a trained model registers and runs in the cnn plugin."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from training import TrainingError
from training.datasets import PairedVolume
from training.train import TrainConfig, train

SPACING = (3.0, 3.0, 3.0)


def _pairs(n: int, seed: int) -> list[PairedVolume]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        truth = gaussian_filter(rng.gamma(2.0, 1.0, (8, 32, 32)), 2.0) * 100.0
        low = rng.poisson(truth / 4.0) * 4.0  # a quarter of the counts
        out.append(PairedVolume(low.astype(np.float32), truth.astype(np.float32), spacing=SPACING,
                                source=f"synthetic-{seed}-{i}"))
    return out


FO = TrainConfig(architecture="fo-dcnn", net={"features": 8, "layers": 4}, loss="mse", epochs=3, batch_size=8,
                 learning_rate=2e-3, patch=16, samples_per_slice=2, seed=1, device="cpu")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_training_learns_and_writes_card_curve_and_weights(tmp_path: Path) -> None:
    val = _pairs(1, 9)
    config = replace(FO, epochs=8, samples_per_slice=4)
    result = train(config, _pairs(2, 0), val, tmp_path / "run", progress=False)
    assert result.finished and result.weights.is_file() and (tmp_path / "run" / "loss.png").is_file()
    history = result.history
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # Better than doing nothing: the validation NRMSE beats that of the noisy input itself.
    low, full = val[0].low, val[0].full
    noisy_nrmse = float(np.sqrt(((low - full) ** 2).sum() / (full**2).sum()))
    assert history[-1]["val_nrmse"] < noisy_nrmse
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["architecture"] == "fo-dcnn" and card["input_slices"] == 3 and card["normalisation"] == "mean"
    assert card["expected_voxel_mm"] == list(SPACING) and card["extra"]["net"] == FO.net
    assert set(card["validation_metrics"]) == {"loss", "nrmse", "psnr"}


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data, val = _pairs(2, 0), _pairs(1, 9)
    whole = train(FO, data, val, tmp_path / "whole", progress=False)
    first = train(FO, data, val, tmp_path / "pieces", progress=False, max_seconds=0.0)  # stops after one step
    assert not first.finished and (tmp_path / "pieces" / "checkpoint.pt").is_file()
    second = train(FO, data, val, tmp_path / "pieces", progress=False)
    assert second.finished
    a, b = _weights(whole.weights), _weights(second.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="another training configuration"):
        train(replace(FO, learning_rate=1e-2), data, val, tmp_path / "pieces", progress=False)


def test_fine_tuning_changes_only_the_last_layers_and_batch_norms(tmp_path: Path) -> None:
    data = _pairs(1, 3)
    start = _weights(train(replace(FO, epochs=1), data, [], tmp_path / "pre", progress=False).weights)
    tuned = _weights(train(replace(FO, epochs=1, fine_tune_last=1, seed=2), data, [], tmp_path / "ft",
                           init_from=start, progress=False).weights)
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    convs = [k for k in start if k.endswith(".weight") and start[k].ndim == 4]
    last_conv = max(convs, key=lambda k: int(k.split(".")[1]))
    assert last_conv in changed
    frozen_convs = {k for k in start if start[k].ndim == 4 and k != last_conv}
    assert not frozen_convs & changed  # earlier convolutions untouched
    assert any(k.endswith("running_mean") for k in changed)  # batch norms adapt to the new data


def test_a_trained_model_registers_and_runs_in_the_cnn_plugin(tmp_path: Path) -> None:
    from denoisers import registry
    from denoisers.base import DenoiseInputs
    from denoisers.models import ModelStore

    result = train(replace(FO, epochs=1), _pairs(1, 4), [], tmp_path / "run", progress=False)
    store = ModelStore(tmp_path / "models")
    store.add(result.weights, {k: v for k, v in result.card.items() if v is not None}, name="fo-tiny",
              version="0.1.0", activate=True)
    resolved = store.resolve("fo-tiny")
    pet = _pairs(1, 5)[0].low
    out = registry.create("cnn", model=resolved).denoise(DenoiseInputs(pet=pet, spacing=SPACING)).denoised
    assert out.shape == pet.shape and float(out.min()) >= 0
    assert float(out.sum(dtype=np.float64)) == pytest.approx(float(pet.sum(dtype=np.float64)), rel=1e-5)


@pytest.mark.slow
def test_simulate_train_register_and_denoise_from_the_command_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The physicist's path: simulate, train (stopped and continued), register, denoise a DICOM series with it."""
    from pydicom import dcmread

    from dicom_node.cli import main

    sim, run, var = tmp_path / "sim", tmp_path / "run", tmp_path / "var"
    assert main(["simulate", "brain", "--out", str(sim), "--count-levels", "1,0.1", "--realizations", "2",
                 "--size", "ci", "--dicom", "--no-progress"]) == 0
    train_args = ["train", "--arch", "fo-dcnn", "--net", "features=8", "--net", "layers=4", "--sim", str(sim),
                  "--level", "0.1", "--out", str(run), "--epochs", "2", "--batch", "8", "--patch", "32",
                  "--data-dir", str(var), "--register", "fo-ci@0.1.0", "--activate", "--tracer", "FDG",
                  "--no-progress"]
    assert main([*train_args, "--max-minutes", "0.0001"]) == 0  # a piece: stops checkpointed
    assert "run the same command to continue" in capsys.readouterr().out
    assert main(train_args) == 0
    out = capsys.readouterr().out
    assert "registered fo-ci@0.1.0 (active)" in out and (run / "loss.png").is_file()
    assert main(["denoise", str(sim / "dicom" / "PET_L0.1_r1"), str(tmp_path / "out"), "--method", "cnn",
                 "--model", "fo-ci", "--data-dir", str(var)]) == 0
    derived = [dcmread(p) for p in sorted((tmp_path / "out").glob("*.dcm"))]
    assert len(derived) == 24
    assert "model fo-ci@0.1.0" in derived[0].ContributingEquipmentSequence[-1].SoftwareVersions
    assert main(["denoise", str(sim / "dicom" / "PET_L0.1_r1"), str(tmp_path / "out2"), "--method", "cnn",
                 "--model", "nothing-here", "--data-dir", str(var)]) != 0
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: fdg-brain\n    match: {modality: [PT]}\n"
                     "    denoiser: {name: cnn, model: fo-ci}\n"
                     "    destinations: [{ae_title: PACS, host: 127.0.0.1, port: 104}]\n")
    capsys.readouterr()
    assert main(["rules", "test", str(sim / "dicom" / "PET_L0.1_r1"), "--rules", str(rules), "--data-dir",
                 str(var)]) == 0
    shown = capsys.readouterr().out
    assert "model: fo-ci@0.1.0 (fo-dcnn); its card fits; series noise index" in shown and "trained on" in shown


def test_step_schedule_divides_the_rate_by_ten_twice() -> None:
    config = replace(FO, epochs=9, learning_rate=0.01)
    assert [config.learning_rate_at(e) for e in range(9)] == pytest.approx([0.01] * 7 + [0.001, 0.0001])
    assert replace(config, lr_schedule="constant").learning_rate_at(8) == 0.01


def test_a_dose_aware_network_trains_and_records_its_level_range(tmp_path: Path) -> None:
    config = replace(FO, epochs=2, net={**FO.net, "level_input": True})
    data = _pairs(2, 0)
    result = train(config, data, _pairs(1, 9), tmp_path / "run", progress=False)
    assert result.finished and result.card["extra"]["net"]["level_input"] is True
    low, high = result.card["extra"]["noise_index_range"]
    assert 0 < low <= high
    first = torch.load(result.weights, weights_only=True)["noise.0.weight"]
    assert first.shape[1] == 4  # three slices and the level


@pytest.mark.slow
def test_fine_tuning_on_real_pairs_made_from_the_sarcoma_series(tmp_path: Path, realdata: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Gong 2018's fine-tuning on a site's own paired scans: pairs made from the real sarcoma PET series (its image
    as the activity, run through the project's physics, written as DICOM), matched by slice position, given as two
    folders or as a CSV; only the last layers and the batch norms change, and a validation split is scored."""
    from dicom_node.cli import main

    sim, var = tmp_path / "sim", tmp_path / "var"
    assert main(["simulate", "real", "--series", str(realdata / "mirp_tcia_sts_001_fdg_pet" / "PT_AC"), "--out",
                 str(sim), "--count-levels", "1,0.1", "--realizations", "2", "--size", "ci", "--seed", "5",
                 "--iterations", "30", "--dicom", "--no-progress"]) == 0
    base = ["train", "--arch", "fo-dcnn", "--net", "features=8", "--net", "layers=4", "--level", "0.1", "--epochs",
            "1", "--batch", "8", "--patch", "32", "--data-dir", str(var), "--no-progress"]
    assert main([*base, "--sim", str(sim), "--out", str(tmp_path / "pre"), "--register", "site@1.0.0",
                 "--activate"]) == 0
    low, full = sim / "dicom" / "PET_L0.1_r0", sim / "dicom" / "PET_L1_r0"
    tune = ["train", "--fine-tune", "site", "--last", "1", "--epochs", "2", "--batch", "8", "--patch", "32",
            "--data-dir", str(var), "--no-progress"]
    assert main([*tune, "--pair", str(low), str(full), "--out", str(tmp_path / "ft"), "--register",
                 "site@1.1.0"]) == 0
    card = json.loads((tmp_path / "ft" / "card.json").read_text())
    assert set(card["validation_metrics"]) == {"loss", "nrmse", "psnr"}  # the last 20 % of the slices
    assert "fine-tuned from site" in card["training_data"] and card["extra"]["fine_tune_last"] == 1
    from denoisers.models import ModelStore

    registered = ModelStore(var / "models").resolve("site@1.1.0").card.count_level or ""
    assert registered.endswith("1 real pair(s)") and "simulated" not in registered  # not the unused --level
    before = _weights(next((var / "models" / "site" / "1.0.0").glob("*.pt")))
    after = _weights(next((var / "models" / "site" / "1.1.0").glob("*.pt")))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last_conv = max(k for k in before if k.endswith(".weight") and before[k].ndim == 4)
    assert last_conv in changed and any(".running_mean" in k or "bn" in k or k.endswith(".bias") for k in changed)
    frozen_convs = [k for k in before if before[k].ndim == 4 and k != last_conv]
    assert frozen_convs and not changed & set(frozen_convs)

    # The same pairs from a CSV (relative folders), the second realization as the validation pair.
    (sim / "pairs.csv").write_text("low,full,split\ndicom/PET_L0.1_r0,dicom/PET_L1_r0,train\n"
                                   "dicom/PET_L0.1_r1,dicom/PET_L1_r1,val\n")
    assert main([*tune, "--pairs-csv", str(sim / "pairs.csv"), "--out", str(tmp_path / "ft2")]) == 0
    card = json.loads((tmp_path / "ft2" / "card.json").read_text())
    assert card["training_data"].startswith("1 pair(s)") and "real pairs 2" in card["training_data"]
    assert card["validation_metrics"]
    (sim / "bad.csv").write_text("low,full,split\ndicom/PET_L0.1_r0,dicom/PET_L1_r0,test\n")
    capsys.readouterr()
    assert main([*tune, "--pairs-csv", str(sim / "bad.csv"), "--out", str(tmp_path / "ft3")]) == 1
    assert "split must be train or val" in capsys.readouterr().err


@pytest.mark.slow
def test_train_against_the_truth_needs_no_full_count_level(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--target truth trains on the noise-free activity of simulated cases: a case simulated without its
    full-count level trains that way, and the default (the full-count reconstruction) says what is missing;
    --target noiseless needs a case simulated with --noiseless and says so otherwise."""
    from dicom_node.cli import main

    sim = tmp_path / "sim"
    assert main(["simulate", "brain", "--out", str(sim), "--count-levels", "0.1", "--realizations", "2",
                 "--size", "ci", "--iterations", "10", "--no-progress"]) == 0
    base = ["train", "--arch", "fo-dcnn", "--net", "features=8", "--net", "layers=4", "--sim", str(sim), "--level",
            "0.1", "--epochs", "1", "--batch", "8", "--patch", "32", "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "recon")]) == 1
    assert "no full-count level 1" in capsys.readouterr().err
    assert main([*base, "--target", "truth", "--out", str(tmp_path / "truth")]) == 0
    card = json.loads((tmp_path / "truth" / "card.json").read_text())
    assert "target the noise-free activity" in card["training_data"]
    assert main([*base, "--target", "noiseless", "--out", str(tmp_path / "noiseless")]) == 1
    assert "simulate it with --noiseless" in capsys.readouterr().err
    noiseless = tmp_path / "sim-noiseless"
    assert main(["simulate", "brain", "--out", str(noiseless), "--count-levels", "0.1", "--size", "ci",
                 "--iterations", "10", "--noiseless", "--no-progress"]) == 0
    assert (noiseless / "recon_noiseless.npy").is_file()
    base[base.index(str(sim))] = str(noiseless)
    assert main([*base, "--target", "noiseless", "--out", str(tmp_path / "noiseless")]) == 0
    card = json.loads((tmp_path / "noiseless" / "card.json").read_text())
    assert "target the noise-free reconstruction" in card["training_data"]


def test_lesion_mse_plus_ssim_is_the_sum_of_its_terms() -> None:
    """The combined loss is the lesion-weighted MSE plus ssim_weight x (1 - SSIM), each as training.losses has it;
    a config that does not use the weight keeps the checkpoint key it had before the weight existed."""
    import hashlib
    from dataclasses import asdict

    from training import losses
    from training.train import _loss_fn

    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 1, 32, 32, generator=gen) + 0.5
    target[:, :, 10:13, 10:13] += 4.0  # a lesion for the weight map
    pred = target + 0.2 * torch.randn(2, 1, 32, 32, generator=gen)
    data_range = 5.0
    config = TrainConfig(architecture="fo-dcnn", loss="lesion-mse+ssim", ssim_weight=0.25)
    got = float(_loss_fn(config, data_range)(pred, target))
    mse_term = float(losses.weighted_mse_loss(pred, target, losses.lesion_weight_map(target)))
    ssim_term = 1.0 - float(losses.ssim(pred, target, data_range))
    assert mse_term > 0 and 0 < ssim_term < 1
    assert got == pytest.approx(mse_term + 0.25 * ssim_term, rel=1e-6)
    assert float(_loss_fn(replace(config, ssim_weight=1.0), data_range)(pred, target)) == pytest.approx(
        mse_term + ssim_term, rel=1e-6)
    assert float(_loss_fn(config, data_range)(target, target)) == pytest.approx(0.0, abs=1e-6)

    # The lesion-sparing variant: SSIM averaged with the inverse of the lesion weights.
    bg = replace(config, loss="lesion-mse+bg-ssim")
    lesion = losses.lesion_weight_map(target)
    assert float(lesion.max()) > 5  # the lesion is in the map, so the weighting matters
    bg_ssim_term = 1.0 - float(losses.weighted_ssim(pred, target, data_range, 1.0 / lesion))
    assert float(_loss_fn(bg, data_range)(pred, target)) == pytest.approx(mse_term + 0.25 * bg_ssim_term, rel=1e-6)
    assert bg_ssim_term != pytest.approx(ssim_term, rel=1e-4)

    plain = TrainConfig(architecture="fo-dcnn", loss="lesion-mse")
    fields = {k: v for k, v in asdict(plain).items()
              if k not in ("device", "checkpoint_every_s", "epochs", "ssim_weight")}
    assert plain.key() == hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    assert config.key() != replace(config, ssim_weight=0.5).key()
