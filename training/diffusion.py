"""Training BC-DPM's score network (``petnode train diffusion``): DDPM on high-count images only, no pairs.

The paper's training stage (``shared/papers/shen2023-bc-dpm-diffusion.txt``, section 2.1, Algorithm 1, section
3.1): T = 1000, linear betas 1e-4 to 0.02, the epsilon objective ``|eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar)
eps, t)|^2``, AdamW (lr 1e-4, weight decay 0.01, betas 0.9 / 0.999). Added, as ADM and every DDPM since do: an
exponential moving average of the weights (the EMA weights are what is shipped).

Data: high-count volumes (the full-count reconstructions of simulated cases, ``--sim DIR``; or their truth with
``target="truth"``), normalised by :func:`denoisers.diffusion.activity_reference` exactly as the sampler will
normalise a series. Each sample is ``in_slices`` neighbouring slices (2.5D, all noised at one ``t`` with
independent noise) cropped to a ``patch`` x ``patch`` square around the body, randomly flipped and rotated in-plane
and flipped along z; the target is the centre slice's noise.

``focus_t`` / ``focus_fraction`` (optional, default off): that fraction of the batch draws ``t`` below
``focus_t`` instead of over all of [0, T). The sampler's practical mode starts at step 40 l (200 to 600 for 1 M
to 0.1 M counts per slice) and never evaluates the network above it, so a CPU's few thousand steps are better
spent there; the card records it.

Checkpoints (network, EMA, optimiser, step, history) every ``checkpoint_every_s`` seconds; the same call on the
same ``out_dir`` continues (the batches of step ``s`` are drawn from ``(seed, s)``, so a resumed run sees what it
would have seen), which is how a lent GPU is used in 10-minute pieces (``max_seconds``). CUDA when present.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from training import TrainingError
from training.train import _plot, _save_atomically

logger = logging.getLogger(__name__)

DEFAULT_NET: dict[str, Any] = {"in_slices": 3, "base": 16, "mults": [1, 2, 4, 4], "blocks": 1, "attention": True,
                               "dropout": 0.0}


@dataclass
class DiffusionConfig:
    """What to train and how (recorded in the checkpoint; a resumed run must use the same)."""

    net: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NET))
    steps: int = 20_000  # optimiser steps
    batch_size: int = 8
    patch: int = 96
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    diffusion_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    focus_t: int | None = None
    focus_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    checkpoint_every_s: float = 60.0
    validate_every: int = 500

    def key(self) -> str:
        """What a checkpoint must match to be continued (not where or how long it runs)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("device", "checkpoint_every_s", "steps")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class HighCountVolume:
    """One high-count volume in the model's space (``denoisers.diffusion.to_latent``)."""

    latent: np.ndarray  # float32 (z, y, x)
    spacing: tuple[float, float, float]
    source: str


@dataclass
class DiffusionResult:
    weights: Path
    card: dict[str, Any]
    history: list[dict[str, float]]
    finished: bool


def load_high_count(directory: Path, *, target: Literal["recon", "noiseless", "truth"] = "recon",
                    level: float = 1.0) -> list[HighCountVolume]:
    """The high-count volumes of a simulated case: its reconstructions at ``level`` (default the full counts,
    every realization), its noise-free reconstruction (``simulate --noiseless``), or its truth."""
    from denoisers.diffusion import activity_reference, to_latent
    from training.simulate import format_level, load_case

    case = load_case(Path(directory))
    if target == "truth":
        volumes = [case.truth]
    elif target == "noiseless":
        if case.noiseless is None:
            raise TrainingError(f"{directory} has no noise-free reconstruction: simulate it with --noiseless")
        volumes = [case.noiseless]
    else:
        key = next((lv for lv in case.recons if format_level(lv) == format_level(level)), None)
        if key is None:
            raise TrainingError(f"{directory} has no reconstruction at count level {level:g} (it has "
                                f"{', '.join(format_level(v) for v in case.recons)})")
        volumes = list(case.recons[key])
    out = []
    for k, vol in enumerate(volumes):
        vol = np.asarray(vol, dtype=np.float32)
        ref = activity_reference(vol)
        if not ref > 0:
            raise TrainingError(f"{directory}: volume {k} has no activity")
        out.append(HighCountVolume(to_latent(vol, ref).astype(np.float32), tuple(case.spacing),
                                   f"{directory}:{target}{'' if target != 'recon' else f'@{level:g}#{k}'}"))
    return out


class SlabSampler:
    """Random training samples: ``k`` neighbouring slices cropped to a square patch around the body."""

    def __init__(self, volumes: Sequence[HighCountVolume], k: int, patch: int) -> None:
        if not volumes:
            raise TrainingError("no high-count volumes to train on")
        self.volumes = list(volumes)
        self.k = k
        self.patch = patch
        # slices with body in them, and the body pixels to centre patches on
        self.slices: list[tuple[int, int]] = []
        for v, vol in enumerate(self.volumes):
            for z in range(vol.latent.shape[0]):
                if float((vol.latent[z] > -0.9).mean()) > 0.01:
                    self.slices.append((v, z))
        if not self.slices:
            raise TrainingError("the training volumes have no slice with activity")

    def batch(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """``[size, k, patch, patch]`` float32."""
        half = self.k // 2
        out = np.empty((size, self.k, self.patch, self.patch), dtype=np.float32)
        for b in range(size):
            v, z = self.slices[int(rng.integers(len(self.slices)))]
            vol = self.volumes[v].latent
            zs = np.clip(np.arange(z - half, z + half + 1), 0, vol.shape[0] - 1)
            slab = vol[zs]
            _, h, w = slab.shape
            p = self.patch
            if h < p or w < p:  # pad with zero activity (latent -1)
                padded = np.full((self.k, max(h, p), max(w, p)), -1.0, dtype=np.float32)
                padded[:, :h, :w] = slab
                slab, h, w = padded, max(h, p), max(w, p)
            body = np.argwhere(slab[half] > -0.9)
            cy, cx = body[int(rng.integers(len(body)))] if len(body) else (h // 2, w // 2)
            y0 = int(np.clip(cy - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, h - p))
            x0 = int(np.clip(cx - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, w - p))
            patch = slab[:, y0:y0 + p, x0:x0 + p]
            if rng.random() < 0.5:
                patch = patch[:, :, ::-1]
            if rng.random() < 0.5:
                patch = patch[:, ::-1, :]
            if rng.random() < 0.5:
                patch = patch[::-1]
            patch = np.rot90(patch, int(rng.integers(4)), axes=(1, 2))
            out[b] = patch
        return out


def _timesteps(config: DiffusionConfig, size: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.randint(0, config.diffusion_steps, (size,), generator=gen)
    if config.focus_t and config.focus_fraction > 0:
        low = torch.randint(0, int(config.focus_t), (size,), generator=gen)
        pick = torch.rand(size, generator=gen) < config.focus_fraction
        t = torch.where(pick, low, t)
    return t


def _noised(x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps


@torch.no_grad()
def _validate(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
              device: str) -> dict[str, float]:
    """Epsilon MSE on fixed (x_t, t, eps) batches, overall and for t < 300 (the low-noise end, where the practical
    sampler spends most of its steps)."""
    net.eval()
    total, n, low, n_low = 0.0, 0, 0.0, 0
    for xt, t, eps, _ in batches:
        pred = net(xt.to(device), t.to(device)).cpu()
        err = (pred[:, 0] - eps).square().mean(dim=(1, 2))
        total += float(err.sum())
        n += len(err)
        mask = t < 300
        low += float(err[mask].sum())
        n_low += int(mask.sum())
    net.train()
    return {"val_loss": total / max(1, n), "val_loss_t300": low / max(1, n_low) if n_low else math.nan}


def train_diffusion(config: DiffusionConfig, train_volumes: Sequence[HighCountVolume],
                    val_volumes: Sequence[HighCountVolume], out_dir: Path, *, max_seconds: float | None = None,
                    progress: bool = True, description: str = "") -> DiffusionResult:
    """Train (or continue training) the score network into ``out_dir``; see the module docstring."""
    from tqdm import tqdm

    from denoisers.diffusion import NORMALISATION, SCALE, NoiseSchedule, build_network
    from training.train import _device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    net = build_network(dict(config.net))
    k = int(net.in_slices)
    if config.patch % net.multiple:
        raise TrainingError(f"patch {config.patch} must be a multiple of {net.multiple} for this network")
    sampler = SlabSampler(train_volumes, k, config.patch)
    schedule = NoiseSchedule.linear(config.diffusion_steps, config.beta_start, config.beta_end)
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)
    val_batches = []
    if val_volumes:
        vs = SlabSampler(val_volumes, k, config.patch)
        vrng = np.random.default_rng([config.seed, 7_777])
        vgen = torch.Generator().manual_seed(config.seed + 7_777)
        for _ in range(4):
            x0 = torch.from_numpy(vs.batch(16, vrng))
            t = torch.randint(0, config.diffusion_steps, (16,), generator=vgen)
            xt, eps = _noised(x0, t, abar, vgen)
            val_batches.append((xt, t, eps[:, k // 2], x0))
    net.to(device)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999))
    ckpt_path = out_dir / "checkpoint.pt"
    history: list[dict[str, float]] = []
    step, running, running_n = 0, 0.0, 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("key") != config.key():
            raise TrainingError(f"{ckpt_path} is from another training configuration: use another --out, or "
                                "remove it to start again")
        net.load_state_dict(ckpt["net"])
        ema.load_state_dict(ckpt["ema"])
        optimiser.load_state_dict(ckpt["optimiser"])
        step, history = int(ckpt["step"]), list(ckpt["history"])
        running, running_n = float(ckpt.get("running", 0.0)), int(ckpt.get("running_n", 0))
        logger.info("continuing %s from step %d", ckpt_path, step)

    def save() -> None:
        _save_atomically({"key": config.key(), "config": asdict(config), "net": net.state_dict(),
                          "ema": ema.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                          "running": running, "running_n": running_n, "history": history}, ckpt_path)

    started = last_save = time.monotonic()
    bar = tqdm(total=config.steps, initial=step, desc="train diffusion", disable=not progress)
    net.train()
    while step < config.steps:
        rng = np.random.default_rng([config.seed, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = torch.from_numpy(sampler.batch(config.batch_size, rng))
        t = _timesteps(config, config.batch_size, gen)
        xt, eps = _noised(x0, t, abar, gen)
        pred = net(xt.to(device), t.to(device))
        loss = (pred[:, 0] - eps[:, k // 2].to(device)).square().mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {float(loss)} at step {step + 1}: lower the learning rate")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the network
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - decay)
            for be, bn in zip(ema.buffers(), net.buffers()):
                be.copy_(bn)
        running += float(loss.detach())
        running_n += 1
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{running / running_n:.4g}")
        if step % config.validate_every == 0 or step == config.steps:
            record: dict[str, float] = {"step": step, "train_loss": running / max(1, running_n)}
            if val_batches:
                record.update(_validate(ema, val_batches, device))
            history.append(record)
            running, running_n = 0.0, 0
            logger.info("step %d: %s", step, ", ".join(f"{k_} {v:.4g}" for k_, v in record.items() if k_ != "step"))
        now = time.monotonic()
        out_of_time = max_seconds is not None and now - started >= max_seconds
        if now - last_save >= config.checkpoint_every_s or out_of_time or step == config.steps:
            save()
            last_save = now
            if out_of_time and step < config.steps:
                bar.close()
                return DiffusionResult(out_dir / "weights.pt", {}, history, False)
    bar.close()
    weights = out_dir / "weights.pt"
    _save_atomically(ema.to("cpu").state_dict(), weights)
    if history:
        _plot(history, out_dir / "loss.png", x="step", y_label="epsilon MSE",
              labels=("training (mean since last point)", "validation (EMA weights)"))
    spacings = sorted({tuple(round(s, 3) for s in v.spacing) for v in train_volumes})
    last = history[-1] if history else {}
    card = {
        "denoiser": "bcdpm",
        "architecture": "adm-unet",
        "input_slices": k,
        "normalisation": NORMALISATION,
        "loss": "epsilon-mse (DDPM L_simple)",
        "epochs": 0,
        "training_data": description or f"{len(train_volumes)} high-count volume(s): "
                                        f"{', '.join(v.source for v in train_volumes[:4])}",
        "validation_metrics": {k_[4:]: round(float(v), 5) for k_, v in last.items()
                               if k_.startswith("val_") and math.isfinite(v)},
        "extra": {"net": dict(config.net),
                  "diffusion": {"schedule": "linear", "steps": config.diffusion_steps,
                                "beta_start": config.beta_start, "beta_end": config.beta_end, "scale": SCALE,
                                "objective": "epsilon"},
                  "optimiser": {"name": "adamw", "learning_rate": config.learning_rate,
                                "weight_decay": config.weight_decay, "ema_decay": config.ema_decay},
                  "optimiser_steps": config.steps, "batch_size": config.batch_size, "patch": config.patch,
                  "focus_t": config.focus_t, "focus_fraction": config.focus_fraction, "seed": config.seed,
                  "voxel_mm_trained": [list(s) for s in spacings],
                  "trained_parameters": sum(p.numel() for p in net.parameters())},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2))
    return DiffusionResult(weights, card, history, True)
