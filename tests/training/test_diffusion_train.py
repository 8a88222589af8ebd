"""BC-DPM's score network: training is deterministic, resumes to the same weights, writes its card; the
physicist's path (simulate, train diffusion, register, denoise with uncertainty maps) works from the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from training import TrainingError
from training.diffusion import DiffusionConfig, HighCountVolume, SlabSampler, train_diffusion

TINY = DiffusionConfig(net={"in_slices": 3, "base": 8, "mults": [1, 2], "blocks": 1, "attention": False},
                       steps=12, batch_size=4, patch=16, learning_rate=1e-3, validate_every=6, seed=3,
                       device="cpu", checkpoint_every_s=3600)


def _volumes(n: int, seed: int) -> list[HighCountVolume]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        act = gaussian_filter(rng.gamma(2.0, 1.0, (6, 24, 24)), 1.5)
        act[:, :3] = 0  # some background
        latent = (act / (2 * act[act > 0].mean()) - 1).astype(np.float32)
        out.append(HighCountVolume(latent, (2.0, 2.0, 2.0), f"synthetic-{seed}-{i}"))
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_training_writes_ema_weights_card_and_curve(tmp_path: Path) -> None:
    result = train_diffusion(TINY, _volumes(2, 0), _volumes(1, 9), tmp_path / "run", progress=False)
    assert result.finished and (tmp_path / "run" / "loss.png").is_file()
    assert [h["step"] for h in result.history] == [6, 12]
    assert all(np.isfinite(h["val_loss"]) for h in result.history)
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["denoiser"] == "bcdpm" and card["architecture"] == "adm-unet" and card["input_slices"] == 3
    assert card["normalisation"] == "body-mean"
    assert card["extra"]["diffusion"] == {"schedule": "linear", "steps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                          "scale": 2.0, "objective": "epsilon"}
    assert card["extra"]["optimiser"]["name"] == "adamw" and card["extra"]["optimiser"]["weight_decay"] == 0.01
    # the shipped weights are the EMA's, not the last step's
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    shipped = _weights(result.weights)
    assert all(torch.equal(shipped[k], ckpt["ema"][k]) for k in shipped)
    assert any(not torch.equal(shipped[k], ckpt["net"][k]) for k in shipped)


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data, val = _volumes(2, 0), _volumes(1, 9)
    whole = train_diffusion(TINY, data, val, tmp_path / "whole", progress=False)
    part = train_diffusion(replace(TINY, steps=5), data, val, tmp_path / "pieces", progress=False)
    assert part.finished  # 5 steps done; the same run continues with more steps (steps are not in the key)
    rest = train_diffusion(TINY, data, val, tmp_path / "pieces", progress=False)
    a, b = _weights(whole.weights), _weights(rest.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="another training configuration"):
        train_diffusion(replace(TINY, learning_rate=5e-4), data, val, tmp_path / "pieces", progress=False)


def test_training_lowers_the_noise_prediction_error(tmp_path: Path) -> None:
    config = replace(TINY, steps=60, validate_every=20, ema_decay=0.9)
    result = train_diffusion(config, _volumes(2, 0), _volumes(1, 9), tmp_path / "run", progress=False)
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last < first < 1.2  # at initialisation the network predicts zero noise: MSE ~1


def test_samples_are_body_patches_with_neighbours() -> None:
    vols = _volumes(1, 4)
    sampler = SlabSampler(vols, 3, 16)
    batch = sampler.batch(8, np.random.default_rng(0))
    assert batch.shape == (8, 3, 16, 16) and batch.dtype == np.float32
    assert (batch > -0.9).mean() > 0.3  # centred on the body, not the background
    with pytest.raises(TrainingError, match="no high-count volumes"):
        SlabSampler([], 3, 16)


@pytest.mark.slow
def test_simulate_train_register_and_sample_from_the_command_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Simulate, train diffusion (stopped and continued), register, denoise a DICOM series: derived PET plus the
    uncertainty map as Secondary Capture and Parametric Map."""
    from pydicom import dcmread

    from dicom_node.cli import main

    sim, run, var = tmp_path / "sim", tmp_path / "run", tmp_path / "var"
    assert main(["simulate", "brain", "--out", str(sim), "--count-levels", "1,0.01", "--realizations", "1",
                 "--size", "ci", "--dicom", "--no-progress"]) == 0
    args = ["train", "diffusion", "--sim", str(sim), "--out", str(run), "--steps", "6", "--batch", "2",
            "--patch", "32", "--net", "base=8", "--net", "mults=[1, 2]", "--net", "attention=false",
            "--validate-every", "3", "--data-dir", str(var), "--register", "ddpm-ci@0.1.0", "--activate",
            "--tracer", "FDG", "--no-progress"]
    assert main([*args, "--max-minutes", "0.00001"]) == 0
    assert "run the same command to continue" in capsys.readouterr().out
    assert main(args) == 0
    assert "registered ddpm-ci@0.1.0 (active)" in capsys.readouterr().out
    assert main(["train", "diffusion", "--sim", str(sim), "--out", str(tmp_path / "x"), "--arch", "xu-unet"]) == 2
    out = tmp_path / "out"
    assert main(["denoise", str(sim / "dicom" / "PET_L0.01_r0"), str(out), "--method", "bcdpm", "--model",
                 "ddpm-ci", "--data-dir", str(var), "--param", "samples=2", "--param", "steps=3"]) == 0
    pet = [dcmread(p) for p in sorted((out / "pet").glob("*.dcm"))]
    assert len(pet) == 24
    versions = str(pet[0].ContributingEquipmentSequence[-1].SoftwareVersions)
    assert "model ddpm-ci@0.1.0" in versions
    sc = sorted((out / "uncertainty" / "sc").glob("*.dcm"))
    pm = sorted((out / "uncertainty" / "pm").glob("*.dcm"))
    assert len(sc) == 24 and len(pm) == 1
    assert dcmread(pm[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
