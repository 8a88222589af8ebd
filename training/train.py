"""Training and fine-tuning the supervised denoisers (``cnn`` models), in pieces that survive being stopped.

``train(config, train_volumes, val_volumes, out_dir)`` trains the network of ``config.architecture`` on 2.5D
samples (:class:`training.datasets.SlabDataset`) and writes into ``out_dir``:

- ``checkpoint.pt``: network, optimiser, epoch and step within it, history, written atomically at least every
  ``checkpoint_every_s`` seconds and at every epoch's end. ``train`` called again on the same ``out_dir`` with
  the same config continues from it (the sample order of an epoch is fixed by the seed, so a resumed run sees the
  samples it would have seen), which is how a lent GPU is used in 10-minute pieces (``max_seconds``);
- ``weights.pt``: the final state dict, and ``loss.png``: training and validation loss per epoch;
- ``card.json``: the model card fields for the registry (architecture, network config, input slices,
  normalisation, loss, epochs, validation metrics, training data, voxel size).

Losses (``training.losses``): ``mse``, ``l1`` (Xu 2017's choice), ``ssim``, ``ms-ssim``, ``lesion-mse`` (the
feature-oriented paper's weighted L2), ``lesion-mse+ssim`` (that plus ``ssim_weight`` x (1 - SSIM); no paper's),
``lesion-mse+bg-ssim`` (the same with SSIM averaged with the inverse lesion weights, sparing the lesions) and
``perceptual`` (Gong 2018's VGG19 features; needs a local weights file).
Optimisers: ``adam`` (Gong 2018, the feature-oriented study) or ``rmsprop`` (Xu 2017).

Fine-tuning (Gong 2018): ``config.init_from`` (a state dict) starts from a trained network and
``config.fine_tune_last`` trains only the last layers (that many convolutions, or for ``gong-resnet`` that many
residual blocks and the last stage) plus every batch norm; everything else is frozen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from training import TrainingError
from training.datasets import PairedVolume, SlabDataset

logger = logging.getLogger(__name__)

Loss = Literal["mse", "l1", "ssim", "ms-ssim", "lesion-mse", "lesion-mse+ssim", "lesion-mse+bg-ssim",
              "perceptual"]
# The losses that weigh an SSIM term with TrainConfig.ssim_weight.
SSIM_WEIGHTED_LOSSES = ("lesion-mse+ssim", "lesion-mse+bg-ssim")


@dataclass
class TrainConfig:
    """What to train and how (recorded in the checkpoint; a resumed run must use the same)."""

    architecture: str
    net: dict[str, Any] = field(default_factory=dict)
    loss: Loss = "l1"
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "rmsprop"] = "adam"
    patch: int | None = 64
    normalise: Literal["mean", "suv", "none"] = "mean"
    samples_per_slice: int = 1
    seed: int = 0
    device: str = "auto"
    checkpoint_every_s: float = 60.0
    fine_tune_last: int | None = None
    vgg_weights: str | None = None
    vgg_sha256: str | None = None
    # "step": the learning rate divided by 10 after 7/9 and again after 8/9 of the epochs (the feature-oriented
    # study's 350/50/50 of 450 epochs; Xu 2017 also decays its rate); "constant": as given (Gong 2018's default).
    lr_schedule: Literal["constant", "step"] = "step"
    # SSIM_WEIGHTED_LOSSES: the weight of (1 - SSIM) beside the lesion-weighted MSE (see _loss_fn).
    ssim_weight: float = 1.0

    def learning_rate_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (0-based)."""
        if self.lr_schedule == "constant" or self.epochs < 3:
            return self.learning_rate
        drops = (epoch >= round(self.epochs * 7 / 9)) + (epoch >= round(self.epochs * 8 / 9))
        return self.learning_rate * 0.1 ** drops

    def key(self) -> str:
        """What a checkpoint must match to be continued (everything but where and how long it runs)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("device", "checkpoint_every_s", "epochs")}
        if self.loss not in SSIM_WEIGHTED_LOSSES:
            del fields["ssim_weight"]  # unused: runs checkpointed before it existed continue
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TrainResult:
    weights: Path
    card: dict[str, Any]
    history: list[dict[str, float]]
    finished: bool  # False: stopped by max_seconds; call train again to continue


def _device(requested: str) -> str:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``, as the rest of petnode resolves devices."""
    from denoisers.base import DeviceNeed
    from denoisers.devices import resolve_device
    from denoisers.errors import DenoiserError

    try:
        return resolve_device(requested, DeviceNeed.GPU_PREFERRED)
    except (ValueError, DenoiserError) as exc:
        raise TrainingError(str(exc)) from exc


def trainable_parameters(net: nn.Module, last: int | None) -> list[nn.Parameter]:
    """All parameters, or for fine-tuning the last ``last`` layers (blocks for gong-resnet) plus every BN."""
    if last is None:
        return list(net.parameters())
    if hasattr(net, "fine_tune_parameters"):
        return list(net.fine_tune_parameters(last))  # gong-resnet: last blocks and the last stage
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    chosen: dict[int, nn.Parameter] = {}
    for module in [*convs[len(convs) - last:], *(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))]:
        for p in module.parameters():
            chosen[id(p)] = p
    return list(chosen.values())


def _loss_fn(config: TrainConfig, data_range: float) -> Any:
    from training import losses

    if config.loss == "mse":
        return lambda p, t: losses.mse_loss(p, t)
    if config.loss == "l1":
        return lambda p, t: losses.l1_loss(p, t)
    if config.loss == "ssim":
        return lambda p, t: 1.0 - losses.ssim(p, t, data_range)
    if config.loss == "ms-ssim":
        return lambda p, t: 1.0 - losses.ms_ssim(p, t, data_range)
    if config.loss == "lesion-mse":
        return lambda p, t: losses.weighted_mse_loss(p, t, losses.lesion_weight_map(t))
    if config.loss in SSIM_WEIGHTED_LOSSES:
        # Not in the feature-oriented paper: its lesion-weighted MSE plus ssim_weight x (1 - SSIM). The MSE alone
        # averages a low-count input's uncertain texture into flat regions, which SSIM (local contrast and
        # structure) counts against it; the term keeps that structure where the MSE would give it up.
        # "bg-ssim" averages the SSIM map with the inverse of the lesion weights, so the lesions stay the MSE's.
        weight, off_lesions = config.ssim_weight, config.loss == "lesion-mse+bg-ssim"

        def lesion_mse_plus_ssim(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            lesion = losses.lesion_weight_map(t)
            similarity = (losses.weighted_ssim(p, t, data_range, 1.0 / lesion) if off_lesions
                          else losses.ssim(p, t, data_range))
            return losses.weighted_mse_loss(p, t, lesion) + weight * (1.0 - similarity)
        return lesion_mse_plus_ssim
    if config.loss == "perceptual":
        perceptual = losses.PerceptualLoss(config.vgg_weights, config.vgg_sha256, scale=data_range)
        return lambda p, t: perceptual.to(p.device)(p, t)
    raise TrainingError(f"unknown loss {config.loss!r}")


def _save_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _plot(history: list[dict[str, float]], path: Path, *, x: str = "epoch", y_label: str = "loss",
          labels: tuple[str, str] = ("training", "validation")) -> None:
    """The training and validation loss of ``history`` against its ``x`` key, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [h[x] for h in history]
    ax.plot(xs, [h["train_loss"] for h in history], "o-", label=labels[0])
    if any("val_loss" in h for h in history):
        ax.plot(xs, [h.get("val_loss", math.nan) for h in history], "s-", label=labels[1])
    ax.set_xlabel("optimiser step" if x == "step" else x)
    ax.set_ylabel(y_label)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def _validate(net: nn.Module, data: SlabDataset, loss_fn: Any, device: str, batch: int) -> dict[str, float]:
    net.eval()
    losses, sq_err, sq_ref, peak = [], 0.0, 0.0, 0.0
    for start in range(0, len(data), batch):
        items = [data[i] for i in range(start, min(len(data), start + batch))]
        x = torch.stack([a for a, _ in items]).to(device)
        t = torch.stack([b for _, b in items]).to(device)
        p = net(x)
        losses.append(float(loss_fn(p, t)) * len(items))
        sq_err += float((p - t).square().sum())
        sq_ref += float(t.square().sum())
        peak = max(peak, float(t.max()))
    n = len(data)
    mse = sq_err / max(1, n * int(np.prod(data[0][1].shape)))
    return {"val_loss": sum(losses) / n, "val_nrmse": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else math.nan,
            "val_psnr": 10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else math.inf}


def train(config: TrainConfig, train_volumes: Sequence[PairedVolume], val_volumes: Sequence[PairedVolume],
          out_dir: Path, *, init_from: dict[str, Any] | None = None, max_seconds: float | None = None,
          progress: bool = True, description: str = "") -> TrainResult:
    """Train (or continue training) into ``out_dir``; see the module docstring."""
    from tqdm import tqdm

    from denoisers.nets import build

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    net, spec = build(config.architecture, config.net)
    patch = (config.patch, config.patch) if config.patch else None
    dataset = SlabDataset(train_volumes, k=spec.in_slices, patch=patch, normalise=config.normalise,
                          seed=config.seed, samples_per_slice=config.samples_per_slice,
                          target_slices=spec.out_slices, transposes=patch is not None, use_prior=False,
                          level_input=spec.level_input)
    val = (SlabDataset(val_volumes, k=spec.in_slices, patch=None, normalise=config.normalise, flips=False,
                       transposes=False, seed=config.seed + 1, target_slices=spec.out_slices, use_prior=False,
                       level_input=spec.level_input)
           if val_volumes else None)
    if init_from is not None:
        try:
            net.load_state_dict(init_from, strict=True)
        except RuntimeError as exc:
            raise TrainingError(f"the starting weights do not fit {config.architecture} {config.net}: "
                                f"{str(exc).splitlines()[0]}") from exc
    trained = trainable_parameters(net, config.fine_tune_last)
    trained_ids = {id(p) for p in trained}
    for p in net.parameters():
        p.requires_grad_(id(p) in trained_ids)
    net.to(device)
    optimiser: torch.optim.Optimizer = (torch.optim.RMSprop(trained, lr=config.learning_rate)
                                        if config.optimizer == "rmsprop" else
                                        torch.optim.Adam(trained, lr=config.learning_rate))
    # The targets' robust maximum on the normalised scale: SSIM's data range and the perceptual loss's scale.
    sample = torch.stack([dataset[i][1] for i in range(0, len(dataset), max(1, len(dataset) // 64))])
    data_range = max(float(torch.quantile(sample.flatten()[:1_000_000], 0.999)), 1e-6)
    loss_fn = _loss_fn(config, data_range)

    ckpt_path = out_dir / "checkpoint.pt"
    history: list[dict[str, float]] = []
    epoch, step, running = 0, 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("key") != config.key():
            raise TrainingError(f"{ckpt_path} is from another training configuration: use another --out, or "
                                "remove it to start again")
        net.load_state_dict(ckpt["net"])
        optimiser.load_state_dict(ckpt["optimiser"])
        epoch, step, history = int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt["history"])
        running = float(ckpt.get("running", 0.0))
        logger.info("continuing %s from epoch %d, step %d", ckpt_path, epoch, step)

    def save() -> None:
        _save_atomically({"key": config.key(), "config": asdict(config), "net": net.state_dict(),
                          "optimiser": optimiser.state_dict(), "epoch": epoch, "step": step,
                          "running": running, "history": history}, ckpt_path)

    started = last_save = time.monotonic()
    batches = math.ceil(len(dataset) / config.batch_size)
    while epoch < config.epochs:
        dataset.set_epoch(epoch)
        for group in optimiser.param_groups:
            group["lr"] = config.learning_rate_at(epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(len(dataset))
        net.train()
        bar = tqdm(total=batches, initial=step, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False)
        while step < batches:
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            items = [dataset[int(i)] for i in idx]
            x = torch.stack([a for a, _ in items]).to(device)
            t = torch.stack([b for _, b in items]).to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), t)
            if not torch.isfinite(loss):
                raise TrainingError(f"the {config.loss} loss became {float(loss)} at epoch {epoch + 1}, step "
                                    f"{step + 1}: lower the learning rate")
            loss.backward()
            optimiser.step()
            running += float(loss.detach())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / step:.4g}")
            now = time.monotonic()
            if now - last_save >= config.checkpoint_every_s or (max_seconds is not None and
                                                              now - started >= max_seconds):
                save()
                last_save = now
                if max_seconds is not None and now - started >= max_seconds:
                    bar.close()
                    return TrainResult(out_dir / "weights.pt", {}, history, False)
        bar.close()
        record = {"epoch": epoch + 1, "train_loss": running / max(1, step)}
        if val is not None:
            record.update(_validate(net, val, loss_fn, device, config.batch_size))
        history.append(record)
        epoch, step, running = epoch + 1, 0, 0.0
        save()
        last_save = time.monotonic()
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        if max_seconds is not None and time.monotonic() - started >= max_seconds and epoch < config.epochs:
            return TrainResult(out_dir / "weights.pt", {}, history, False)
    weights = out_dir / "weights.pt"
    _save_atomically(net.to("cpu").state_dict(), weights)
    complete = list(history)
    if complete:
        _plot(complete, out_dir / "loss.png")
    spacings = {tuple(round(s, 3) for s in v.spacing) for v in train_volumes if v.spacing is not None}
    from denoisers.cnn import noise_index

    levels = dataset.noise_indices or [noise_index(v.low) for v in train_volumes]
    levels = [v for v in levels if math.isfinite(v)]
    last = complete[-1] if complete else {}
    card = {
        "denoiser": "cnn",
        "architecture": config.architecture,
        "input_slices": spec.in_slices,
        "normalisation": config.normalise,
        "loss": config.loss,
        "epochs": config.epochs,
        "expected_voxel_mm": list(next(iter(spacings))) if len(spacings) == 1 else None,
        "training_data": description or f"{len(train_volumes)} volume(s): "
                                        f"{', '.join(str(v.source) for v in train_volumes[:4])}",
        "validation_metrics": {k[4:]: round(float(v), 5) for k, v in last.items()
                               if k.startswith("val_") and math.isfinite(v)},
        "extra": {"net": dict(config.net), "seed": config.seed, "optimizer": config.optimizer,
                  "learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule, "patch": config.patch,
                  "fine_tune_last": config.fine_tune_last, "trained_parameters": sum(p.numel() for p in trained),
                  **({"ssim_weight": config.ssim_weight} if config.loss in SSIM_WEIGHTED_LOSSES else {}),
                  "noise_index_range": [round(min(levels), 4), round(max(levels), 4)] if levels else None},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2))
    return TrainResult(weights, card, complete, True)
