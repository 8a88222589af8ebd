"""``bcdpm``: BC-DPM, diffusion denoising with bidirectional conditions (Shen, Yang, Zhang 2023).

``shared/papers/shen2023-bc-dpm-diffusion.txt``. A DDPM score network learns the prior of high-count PET images
(trained on those alone, no pairs: ``training.diffusion``); sampling is steered to the low-count image ``y0`` by
a conditional block in the last ``l`` transitions (the paper's equation 10):

    x_{t-1} = (1 - lambda) * (GF(y_{t-1}) + (I - GF)(x'_{t-1}))
              + lambda * (y_{t-1} + x'_{t-1} - P+(Po(P(x'_{t-1}) + r + s)))

with ``x'_{t-1}`` the network's ordinary reverse step, ``y_{t-1}`` a draw of ``q(y_{t-1} | y0)`` (the forward
diffusion of the low-count image), GF a Gaussian filter, P the projector of :mod:`denoisers.physics`, Po Poisson
noise at the series' count level, r + s randoms and scatter, and P+ their reconstruction (OSEM). ``l`` follows the
count level: 5, 10, 15 of 100 steps for 1 M, 0.3 M, 0.1 M counts per slice (paper section 3.1), i.e.
``l = 5 + 10 log10(1e6 / counts)``. The counts are estimated from the image (the noise insertion is calibrated so
that its reconstruction carries the series' own noise index, :func:`denoisers.cnn.noise_index`) unless the rule
gives them; what was used goes into ``info`` and so into the provenance.

Sampling. T = 1000 linear betas (1e-4 to 0.02), respaced correctly (:meth:`NoiseSchedule.respace`: the betas are
recomputed from the cumulative alphas at the kept steps, improved-diffusion's rule; MONAI's ``DDPMScheduler``
gets this wrong, ``shared/research/anchors_denoise.md`` 0.4). The step is DDIM's general form (Song et al. 2021):
``eta = 1`` is exactly the DDPM ancestral step with the posterior variance (the paper's sampler), ``eta = 0``
deterministic DDIM. Two modes:

- ``paper``: from white noise at step 999, 100 respaced steps, the conditions in the last ``l``, lambda 0.2.
- ``practical`` (the default, for a CPU): the low-count image diffused to step ``40 l`` (SDEdit; the "global
  skip" of arXiv 2606.08751), 10 deterministic DDIM steps (eta 0; the conditional block's draws and the start's
  noise still make the K samples differ), *every* transition conditioned, lambda 0.05, GF FWHM ``1.5 + 0.5 l`` px
  (wider scored a little higher PSNR on the brain, 8 px +0.3 dB at 0.3 M, but took 3-6 % from small hot regions
  whose contrast the prior does not restore: quantitation first). On the validation brain 10 DDIM steps scored
  0.6-0.8 dB above 20 DDPM steps in half the time.
  The count level drives how far the prior may move the image, as ``l`` does in the paper. Tuned on the
  validation brain (``brain-7``, never a bench seed) with the shipped model: a network trained for an hour on two
  CPU cores is a much weaker prior than the paper's, and with only the last ``l`` transitions conditioned it
  invents structure from the noise (PSNR below the Gaussian's); conditioned at every step with a light
  noise-insertion weight it is above it. ``petnode bench quality`` measures both modes and DDIM.

Our readings where the paper is silent:

- The estimate of ``x0`` in each step is clamped below at zero activity (PET has no negative activity); nothing
  clamps it above (lesions and bladders are far above the training range's 1).
- Latent and activity: the latent of step ``t`` is ``sqrt(abar) x0 + noise``; the noise insertion works on
  ``x' / sqrt(abar)`` in activity units, Poisson on its non-negative part (a Poisson mean cannot be negative; the
  negative part, diffusion noise, passes through unchanged) and maps back.
- GF is in-plane (the paper's slices are 2-D), FWHM ``gf_fwhm_px`` pixels.
- 2.5D: the network reads ``in_slices`` neighbouring slices of the latent volume, which moves as a whole
  (``denoisers.nets.adm_unet``), so adjacent slices agree.

K samples (default 5) run batched over slices; their mean is the result and their voxel-wise standard deviation
the uncertainty map (written as Secondary Capture and Parametric Map series by the node). The mean is clipped at
zero and scaled to the input's total activity. The same seed gives the same result on the same device.

Inputs: PET. Outputs: DENOISED, UNCERTAINTY. GPU preferred; runs on a CPU.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, model_validator

from denoisers.base import (
    DenoiseInputs,
    DenoiseResult,
    Denoiser,
    DenoiserParams,
    DenoiserSpec,
    DeviceNeed,
    InputKind,
    OutputKind,
)
from denoisers.errors import DenoiserError, InvalidInputError

logger = logging.getLogger(__name__)

T_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
NORMALISATION = "body-mean"
# Activity v maps to x = v / (SCALE * reference) - 1: no activity is -1, the body's mean -0.5, 4x the mean +1.
SCALE = 2.0
PAPER_STEPS = 100  # the paper's respaced steps; its l counts transitions of these


# --------------------------------------------------------------------------------------------------------------
# Noise schedule and respacing


@dataclass(frozen=True)
class Respaced:
    """A schedule restricted to some of its steps (ascending original indices ``timesteps``).

    ``alphas_cumprod[i]`` is the original cumulative alpha at ``timesteps[i]``; ``betas[i] = 1 - abar_i /
    abar_{i-1}`` (``abar_{-1} = 1``), so the kept steps form a proper Markov chain with the same marginals.
    """

    timesteps: npt.NDArray[np.int64]
    alphas_cumprod: npt.NDArray[np.float64]

    @property
    def alphas_cumprod_prev(self) -> npt.NDArray[np.float64]:
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    @property
    def betas(self) -> npt.NDArray[np.float64]:
        return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def posterior_variance(self) -> npt.NDArray[np.float64]:
        """The DDPM posterior variance ``beta_i (1 - abar_{i-1}) / (1 - abar_i)`` of each kept step."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM betas ``beta_1..beta_T`` (index ``t`` here is the paper's ``t + 1``)."""

    betas: npt.NDArray[np.float64]

    @classmethod
    def linear(cls, steps: int = T_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END) -> Self:
        """Ho et al.'s linear schedule (the paper's: 1000 steps, 1e-4 to 0.02)."""
        if steps < 2 or not 0 < beta_start <= beta_end < 1:
            raise InvalidInputError(f"need steps >= 2 and 0 < beta_start <= beta_end < 1, got {steps}, "
                                    f"{beta_start}, {beta_end}")
        return cls(np.linspace(beta_start, beta_end, steps, dtype=np.float64))

    @property
    def steps(self) -> int:
        return len(self.betas)

    @functools.cached_property
    def alphas_cumprod(self) -> npt.NDArray[np.float64]:
        return np.cumprod(1.0 - self.betas)

    def respace(self, timesteps: Sequence[int] | npt.NDArray[np.integer[Any]]) -> Respaced:
        """The chain on the kept ``timesteps`` (any order in, ascending out, no duplicates)."""
        kept = np.unique(np.asarray(timesteps, dtype=np.int64))
        if kept.size == 0 or kept[0] < 0 or kept[-1] >= self.steps:
            raise InvalidInputError(f"timesteps must lie in [0, {self.steps}), got {kept[:3]}...{kept[-3:]}")
        return Respaced(kept, self.alphas_cumprod[kept])


def spaced_timesteps(steps: int, count: int, start: int | None = None) -> npt.NDArray[np.int64]:
    """``count`` evenly spaced original steps over ``[0, start]`` (default the last), both ends included, rounded
    (improved-diffusion's ``space_timesteps`` for one section: 1000 -> 100 keeps 0, 10, 20, ..., 999)."""
    last = steps - 1 if start is None else int(start)
    if not 0 <= last < steps:
        raise InvalidInputError(f"start must lie in [0, {steps}), got {start}")
    count = max(1, min(int(count), last + 1))
    if count == 1:
        return np.array([last], dtype=np.int64)
    stride = last / (count - 1)
    return np.unique(np.round(np.arange(count) * stride).astype(np.int64))


def reverse_step(x: torch.Tensor, eps: torch.Tensor, i: int, chain: Respaced, eta: float,
                 noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse transition from kept step ``i`` to ``i - 1`` (to ``x0`` for ``i = 0``); returns (x_prev, x0).

    DDIM's general step: ``x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`` with ``sigma = eta
    sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``; at ``eta = 1`` mean and variance are those of the
    DDPM posterior ``q(x_{t-1} | x_t, x0)``. ``x0`` is clamped below at -1 (zero activity), and ``eps``
    recomputed from it so that the step stays consistent.
    """
    ab = float(chain.alphas_cumprod[i])
    ab_prev = float(chain.alphas_cumprod_prev[i])
    x0 = ((x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)).clamp_min(-1.0)
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab)) * math.sqrt(max(0.0, 1.0 - ab / ab_prev))
    out = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1.0 - ab_prev - sigma**2)) * eps
    if sigma > 0 and noise is not None:
        out = out + sigma * noise
    return out, x0


def conditional_block(x_prime: torch.Tensor, y_prev: torch.Tensor, lam: float,
                      gf: Callable[[torch.Tensor], torch.Tensor],
                      insert_noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The paper's equation 10: ``(1 - lam) (GF(y) + x' - GF(x')) + lam (y + x' - insert_noise(x'))``."""
    restoration = gf(y_prev) + x_prime - gf(x_prime)
    noise_insertion = y_prev + x_prime - insert_noise(x_prime)
    return (1.0 - lam) * restoration + lam * noise_insertion


# The noise index (``denoisers.cnn.noise_index``) of the simulated 2 mm brain at 1 M and 0.1 M counts per slice
# (ML-EM 100 iterations, PSF, attenuation: ``petnode simulate brain --size full``): 0.077 and 0.30. A series'
# noise index maps to the paper's count scale by the power law through these two points (0.3 M gives 0.17 there,
# 0.26 M by the law).
_NI_1M, _NI_SLOPE = 0.0774, math.log(10.0) / math.log(0.3034 / 0.0774)


def paper_counts_for_noise(noise_index: float) -> float:
    """The counts per slice of the paper's scale that give a series of this noise index (see above)."""
    return 1e6 * (_NI_1M / max(float(noise_index), 1e-6)) ** _NI_SLOPE


def cond_steps_for(counts_per_slice: float) -> int:
    """The paper's ``l`` (of 100 steps) for a count level: 5, 10, 15 at 1 M, 0.3 M, 0.1 M counts per slice,
    log-linear between and beyond, kept within 2..30."""
    value = 5.0 + 10.0 * math.log10(1e6 / max(float(counts_per_slice), 1.0))
    return int(min(30, max(2, round(value))))


# --------------------------------------------------------------------------------------------------------------
# Normalisation and the Gaussian filter


def activity_reference(volume: npt.NDArray[np.float32]) -> float:
    """The volume's reference activity: the mean inside the body (and its one-voxel rim), the body being where a
    3-voxel box average exceeds 5 % of its 99.5th percentile. Smoothed, and the rim kept, so that a noisy and a
    clean image of one patient agree: within 7-9 % from 10 M down to 0.1 M counts per slice (brain) and from
    30 M down to 0.03 M (whole body), where thresholding the voxels themselves drifts by 20-90 %."""
    from scipy import ndimage

    smooth = ndimage.uniform_filter(np.asarray(volume, dtype=np.float32), size=3, mode="nearest")
    top = float(np.percentile(smooth, 99.5))
    if not top > 0:
        return 0.0
    body = smooth > 0.05 * top
    return float(np.mean(volume[body], dtype=np.float64))


def to_latent(volume: npt.NDArray[np.float32] | torch.Tensor, reference: float) -> Any:
    """Activity -> the model's space (``x = v / (SCALE reference) - 1``)."""
    return volume / (SCALE * reference) - 1.0


def from_latent(x: Any, reference: float) -> Any:
    """The model's space -> activity."""
    return (x + 1.0) * (SCALE * reference)


def gaussian_2d(x: torch.Tensor, fwhm_px: float) -> torch.Tensor:
    """In-plane Gaussian filter of ``[..., H, W]`` (FWHM in pixels, edges replicated)."""
    if fwhm_px <= 0:
        return x
    from torch.nn import functional as F

    sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    radius = max(1, int(math.ceil(3.0 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-2], shape[-1])
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# Noise insertion in the sinogram domain


class NoiseInserter:
    """``P+(Po(P(u) + r + s))`` for ``u[B, n, n] >= 0`` in any activity unit, at ``counts_per_slice`` prompts on
    average per slice (scaled with the activity: hotter slices get more), with uniform randoms and smooth scatter
    as fractions of the trues, reconstructed by OSEM (``iterations`` x ``subsets``). Sinogram: 1.25 n radial bins,
    1.5 n angles (the paper's 160 x 192 for a 128 x 128 slice)."""

    def __init__(self, n_pix: int, pixel_mm: float, counts_per_slice: float, *, randoms_fraction: float = 0.2,
                 scatter_fraction: float = 0.0, iterations: int = 2, subsets: int = 8,
                 device: str | torch.device = "cpu") -> None:
        from denoisers.physics import ParallelProjector, SystemModel

        projector = ParallelProjector(n_pix, pixel_mm, int(round(1.25 * n_pix)), int(round(1.5 * n_pix)),
                                      device=device)
        self.system = SystemModel(projector)
        self.counts_per_slice = float(counts_per_slice)
        self.randoms_fraction = float(randoms_fraction)
        self.scatter_fraction = float(scatter_fraction)
        self.iterations = int(iterations)
        self.subsets = int(min(subsets, projector.n_angles))

    def __call__(self, u: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        from denoisers.physics import osem, simulate_counts

        batch = u.shape[0]
        if not bool((u > 0).any()):
            return u.clone()
        sino = simulate_counts(u, self.system, self.counts_per_slice * batch, self.randoms_fraction,
                               self.scatter_fraction, generator, counts_per="volume")
        recon = osem(sino.prompts, self.system, sino.additive, n_iter=self.iterations, n_subsets=self.subsets)
        return sino.to_activity(recon)


# --------------------------------------------------------------------------------------------------------------
# The plugin


class BCDPMParams(DenoiserParams):
    """Sampling settings (the network and its schedule come from the model card). Unset values follow ``mode``."""

    mode: Literal["practical", "paper"] = Field(
        "practical", description="paper: white noise at step 999, 100 steps, the conditions in the last l, "
                                 "lambda 0.2; practical: the input diffused to 40 l, 10 DDIM steps, every one "
                                 "conditioned, "
                                 "lambda 0.05, GF FWHM 1.5 + 0.5 l px (l from the count level)")
    samples: int = Field(5, ge=1, le=64, strict=True, description="posterior samples K (mean = result, std = map)")
    steps: int | None = Field(None, ge=1, le=1000, description="respaced reverse steps (paper 100, practical 10)")
    start_t: int | None = Field(None, ge=1, le=999, description="original step sampling starts at (paper 999; "
                                                                "practical 40 l)")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="1 = DDPM ancestral step (paper), 0 = DDIM "
                                                                "(practical)")
    lam: float | None = Field(None, ge=0.0, le=1.0, description="lambda of equation 10: weight of the "
                                                                "noise-insertion condition (paper 0.2, practical 0.05)")
    cond_steps: int | None = Field(None, ge=0, le=100, description="l, of 100 steps: the transitions conditioned "
                                                                   "(None: paper from the count level, practical all)")
    counts_per_slice: float | None = Field(None, gt=0, description="the series' counts per slice (None: estimated "
                                                                   "from the image)")
    gf_fwhm_px: float | None = Field(None, ge=0.0, le=30.0, description="FWHM of GF in the restoration condition, "
                                                                        "pixels (paper 3, practical 1.5 + 0.5 l)")
    randoms_fraction: float = Field(0.2, ge=0.0, le=5.0, description="randoms / trues of the noise insertion")
    scatter_fraction: float = Field(0.0, ge=0.0, le=5.0, description="scatter / trues of the noise insertion")
    recon_iterations: int = Field(4, ge=1, le=50, strict=True, description="OSEM iterations of P+")
    recon_subsets: int = Field(12, ge=1, le=64, strict=True, description="OSEM subsets of P+")
    batch: int = Field(32, ge=1, le=1024, strict=True, description="slices per network call")

    @model_validator(mode="after")
    def _start(self) -> Self:
        if self.mode == "paper" and self.start_t not in (None, 999):
            raise ValueError("mode 'paper' samples from white noise, which is only right at start_t 999")
        return self

    def resolved(self, level_steps: int) -> dict[str, Any]:
        """The settings used for a series whose count level gives the paper's ``l = level_steps``."""
        if self.mode == "paper":
            return {"start_t": 999, "steps": self.steps or PAPER_STEPS, "eta": 1.0 if self.eta is None else self.eta,
                    "cond_steps": self.cond_steps if self.cond_steps is not None else level_steps,
                    "lam": 0.2 if self.lam is None else self.lam,
                    "gf_fwhm_px": 3.0 if self.gf_fwhm_px is None else self.gf_fwhm_px}
        start = self.start_t if self.start_t is not None else int(min(999, max(100, 40 * level_steps)))
        return {"start_t": start, "steps": self.steps or 10, "eta": 0.0 if self.eta is None else self.eta,
                "cond_steps": self.cond_steps if self.cond_steps is not None else -(-start // 10) + 1,
                "lam": 0.05 if self.lam is None else self.lam,
                "gf_fwhm_px": 1.5 + 0.5 * level_steps if self.gf_fwhm_px is None else self.gf_fwhm_px}


_CACHE_SIZE = 2
_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
_cache_lock = threading.Lock()


def build_network(config: dict[str, Any]) -> Any:
    """The score network of a card's ``extra["net"]``."""
    from denoisers.nets.adm_unet import AdmUNet

    try:
        return AdmUNet(**config)
    except TypeError as exc:
        raise DenoiserError(f"the card's network config {config} does not fit adm-unet: {exc}") from exc


def _load(card: Any, weights_path: Path, device: str) -> Any:
    from denoisers.models import load_weights

    key = (str(card.sha256), device)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    state = load_weights(weights_path, expected_sha256=card.sha256)
    net = build_network(dict(card.extra.get("net") or {}))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DenoiserError(f"model {card.ref}: its weights do not fit its adm-unet config: "
                            f"{str(exc).splitlines()[0]}") from exc
    net = net.to(device).eval()
    if device == "cpu":
        net = net.to(memory_format=torch.channels_last)  # ~30 % faster convolutions on a CPU
    with _cache_lock:
        _cache[key] = net
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return net


def schedule_of(card: Any) -> NoiseSchedule:
    """The card's noise schedule (``extra["diffusion"]``: steps, beta_start, beta_end; linear)."""
    d = dict(card.extra.get("diffusion") or {})
    if d.get("schedule", "linear") != "linear":
        raise DenoiserError(f"model {card.ref}: only the linear schedule is implemented, card says {d['schedule']!r}")
    return NoiseSchedule.linear(int(d.get("steps", T_STEPS)), float(d.get("beta_start", BETA_START)),
                                float(d.get("beta_end", BETA_END)))


def _slabs(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x[S, Z, H, W]`` -> ``[S * Z, k, H, W]``: each slice with its neighbours (edges replicated)."""
    half = k // 2
    if half == 0:
        return x.reshape(-1, 1, *x.shape[2:])
    padded = torch.cat([x[:, :1].expand(-1, half, -1, -1), x, x[:, -1:].expand(-1, half, -1, -1)], dim=1)
    z = x.shape[1]
    return torch.stack([padded[:, j:j + z] for j in range(k)], dim=2).reshape(-1, k, *x.shape[2:])


def _support(volume: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Where the patient is: the in-plane smoothed volume above 2 % of its 99.5th percentile, dilated by two
    voxels in-plane."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), (0, 1.5, 1.5))
    top = float(np.percentile(smooth, 99.5))
    if not top > 0:
        return np.ones(volume.shape, dtype=bool)
    return ndimage.binary_dilation(smooth > 0.02 * top, structure=np.ones((1, 5, 5), dtype=bool))


def _body_box(volume: npt.NDArray[np.float32], multiple: int, margin: int = 4) -> tuple[slice, slice, int, int]:
    """The in-plane box holding the body (every slice), with a margin; its size is rounded up to ``multiple``
    (the box may then reach past the image: the caller pads). Returns (rows, cols, padded height, width)."""
    proj = volume.max(axis=0)
    top = float(np.percentile(proj, 99.5)) if proj.size else 0.0
    inside = proj > 0.02 * top if top > 0 else np.zeros(proj.shape, dtype=bool)
    rows_any, cols_any = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    h, w = proj.shape
    if rows_any.size == 0:
        r0, r1, c0, c1 = 0, h, 0, w
    else:
        r0, r1 = max(0, rows_any[0] - margin), min(h, rows_any[-1] + 1 + margin)
        c0, c1 = max(0, cols_any[0] - margin), min(w, cols_any[-1] + 1 + margin)
    ph = -(-(r1 - r0) // multiple) * multiple
    pw = -(-(c1 - c0) // multiple) * multiple
    return slice(int(r0), int(r1)), slice(int(c0), int(c1)), int(ph), int(pw)


class BCDPMDenoiser(Denoiser[BCDPMParams]):
    """BC-DPM from a registered diffusion model (see the module docstring)."""

    name = "bcdpm"
    Params = BCDPMParams
    device_need = DeviceNeed.GPU_PREFERRED

    @property
    def spec(self) -> DenoiserSpec:
        # Not SPACING: the network sees pixels, and the noise insertion is calibrated in counts, which a pixel
        # size only rescales (the projector's mm cancel out), so the result does not depend on it.
        return self.make_spec(requires=frozenset({InputKind.PET}),
                              produces=frozenset({OutputKind.DENOISED, OutputKind.UNCERTAINTY}),
                              needs_weights=True, stochastic=True)

    def _card(self) -> Any:
        if self.model is None:
            raise DenoiserError("the bcdpm denoiser needs a diffusion model from the registry: give the rule "
                                "`denoiser: {name: bcdpm, model: NAME}` (petnode models list shows them)")
        card = self.model.card
        if card.normalisation != NORMALISATION:
            raise DenoiserError(f"model {card.ref}: normalisation {card.normalisation!r} is not {NORMALISATION!r} "
                                "(not a bcdpm diffusion model?)")
        return card

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        from denoisers.devices import resolve_device

        card = self._card()
        device = resolve_device(self.device, self.device_need)
        t_start = time.perf_counter()
        net = _load(card, Path(self.model.weights_path), device)
        reference = activity_reference(inputs.pet)
        if not reference > 0:
            raise InvalidInputError("the series has no activity: nothing to denoise")
        out, uncertainty, info = sample_volume(net, schedule_of(card), inputs.pet, inputs.spacing, reference,
                                               self.params, seed=self.seed, device=device)
        info.update({"model": card.ref, "device": device, "seed": self.seed,
                     "seconds": round(time.perf_counter() - t_start, 3)})
        return DenoiseResult(denoised=out, uncertainty=uncertainty, info=info)

    @classmethod
    def example(cls, *, seed: int | None = None) -> Self:
        """A tiny untrained score network with its own card, sampled in 3 steps with 2 samples."""
        params = BCDPMParams(samples=2, steps=3, start_t=200, recon_iterations=1, recon_subsets=4)
        return cls(params, seed=seed, model=_example_model(0 if seed is None else seed))


def estimate_counts(y: torch.Tensor, pixel_mm: float, params: BCDPMParams, noise_index_y: float,
                    generator: torch.Generator | None, device: str) -> float:
    """Counts per slice at which the noise insertion's reconstruction of the smoothed input has the input's own
    noise index (noise ~ counts^-1/2, so one trial at 1 M counts calibrates it)."""
    from denoisers.cnn import noise_index

    trial = 1e6
    inserter = NoiseInserter(y.shape[-1], pixel_mm, trial, randoms_fraction=params.randoms_fraction,
                             scatter_fraction=params.scatter_fraction, iterations=params.recon_iterations,
                             subsets=params.recon_subsets, device=device)
    smooth = gaussian_2d(y.clamp_min(0), 3.0)
    first = inserter(smooth, generator)
    second = inserter(smooth, generator)
    # the inserted noise alone: the difference of two insertions (the smoothed input's own noise cancels)
    inserted = noise_index(((first - second) / math.sqrt(2.0) + smooth).cpu().numpy())
    return float(min(1e9, max(1e3, trial * (inserted / max(noise_index_y, 1e-9)) ** 2)))


def sample_volume(net: Any, schedule: NoiseSchedule, pet: npt.NDArray[np.float32],
                  spacing: tuple[float, float, float], reference: float, params: BCDPMParams, *,
                  seed: int | None, device: str = "cpu",
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], dict[str, Any]]:
    """BC-DPM on a (z, y, x) volume: (mean of the samples, their standard deviation, info)."""
    from denoisers.cnn import noise_index
    from denoisers.physics import make_generator

    in_slices = int(getattr(net, "in_slices", 1))
    multiple = int(getattr(net, "multiple", 1))
    rows, cols, ph, pw = _body_box(pet, multiple)
    crop = pet[:, rows, cols]
    z, h, w = crop.shape
    n = max(ph, pw)  # square for the projector; the network sees (ph, pw)
    square = np.zeros((z, n, n), dtype=np.float32)
    square[:, :h, :w] = crop
    # one generator on the CPU for every draw, so a seed means the same numbers whatever the batch size
    gen = make_generator(0 if seed is None else int(seed), "cpu")

    def randn(shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=gen).to(device)

    region = torch.zeros((n, n), dtype=torch.float32, device=device)
    region[:ph, :pw] = 1.0
    phys_gen = make_generator(int(torch.randint(0, 2**62, (1,), generator=gen)), device)

    y_act = torch.from_numpy(square).to(device)
    y0 = to_latent(y_act, reference)[None]  # [1, Z, n, n]
    level_given = params.counts_per_slice is not None
    ni = noise_index(crop)
    if level_given:
        counts = paper_counts = float(params.counts_per_slice)
    else:
        if not math.isfinite(ni) or ni <= 0:
            raise InvalidInputError("the series' count level cannot be estimated (no activity in the body?): give "
                                    "counts_per_slice in the rule")
        # Two readings of one noise level: l on the paper's scale, and the counts at which our insertion (no
        # attenuation, OSEM) reproduces the series' noise, which are higher than the detected counts.
        paper_counts = paper_counts_for_noise(ni)
        counts = estimate_counts(y_act, float(spacing[2]), params, ni, phys_gen, device)
    level_steps = cond_steps_for(paper_counts)
    used = params.resolved(level_steps)
    cond = int(used["cond_steps"])
    inserter = NoiseInserter(n, float(spacing[2]), counts, randoms_fraction=params.randoms_fraction,
                             scatter_fraction=params.scatter_fraction, iterations=params.recon_iterations,
                             subsets=params.recon_subsets, device=device)
    start = schedule.steps - 1 if params.mode == "paper" else min(int(used["start_t"]), schedule.steps - 1)
    chain = schedule.respace(spaced_timesteps(schedule.steps, int(used["steps"]), start))
    lam, gf_fwhm, eta = float(used["lam"]), float(used["gf_fwhm_px"]), float(used["eta"])
    cond_until = cond * schedule.steps / PAPER_STEPS  # condition the transitions from steps below this
    k = params.samples
    shape = (k, z, n, n)
    if params.mode == "paper":
        x = randn(shape)
    else:
        ab = float(chain.alphas_cumprod[-1])
        x = math.sqrt(ab) * y0.expand(shape) + math.sqrt(1.0 - ab) * randn(shape)

    def gf(v: torch.Tensor) -> torch.Tensor:
        return gaussian_2d(v, gf_fwhm)

    conditioned = 0
    total = len(chain.timesteps)
    with torch.inference_mode():
        for i in reversed(range(total)):
            t = int(chain.timesteps[i])
            eps = _predict(net, x[..., :ph, :pw], t, in_slices, params.batch, device)
            eps_full = torch.zeros_like(x)
            eps_full[..., :ph, :pw] = eps
            noise = randn(shape) if i > 0 else None
            x_prime, _ = reverse_step(x, eps_full, i, chain, eta, noise)
            if t < cond_until:
                ab_prev = float(chain.alphas_cumprod_prev[i])
                root = math.sqrt(ab_prev)
                y_prev = root * y0.expand(shape) + math.sqrt(1.0 - ab_prev) * randn(shape)

                def insert(v: torch.Tensor, root: float = root) -> torch.Tensor:
                    u = v.reshape(-1, n, n) / root + 1.0  # activity, in units of SCALE * reference
                    positive = u.clamp_min(0.0) * region
                    noisy = inserter(positive, phys_gen) + (u - positive)
                    return ((noisy - 1.0) * root).reshape(v.shape)

                x_prime = conditional_block(x_prime, y_prev, lam, gf, insert)
                conditioned += 1
            # outside the network's box (the projector's square padding): zero activity, no noise
            x = x_prime * region + (-math.sqrt(float(chain.alphas_cumprod_prev[i]))) * (1.0 - region)
            if progress is not None:
                progress(total - i, total)
    # Averaged before clipping at zero: clipping each sample first would bias the mean upward where activity is
    # low (the spread of the samples is not activity), and the total's rescaling would then lower every region.
    samples = from_latent(x[:, :, :h, :w], reference).double()
    mean = samples.mean(dim=0).clamp_min(0.0).cpu().numpy()
    std = (samples.std(dim=0) if k > 1 else torch.zeros_like(samples[0])).cpu().numpy()
    # Outside the patient (and a 2-voxel margin) the series' own values, lightly smoothed: the restoration
    # condition's wide GF spills activity into the air otherwise, which the total's rescaling would take from
    # every region inside (5 % on a small phantom).
    support = _support(crop)
    outside = ~support
    if outside.any():
        from scipy import ndimage

        mean[outside] = ndimage.gaussian_filter(crop.astype(np.float64), (0, 1, 1))[outside]
        std[outside] = 0.0
    total_in = float(np.sum(crop, dtype=np.float64))
    total_out = float(np.sum(mean))
    activity_scale = total_in / total_out if total_out > 0 and total_in > 0 else 1.0
    out = pet.copy()
    out[:, rows, cols] = (mean * activity_scale).astype(np.float32)
    uncertainty = np.zeros_like(pet)
    uncertainty[:, rows, cols] = (std * activity_scale).astype(np.float32)
    info = {"noise_index": round(ni, 4) if math.isfinite(ni) else None,
            "counts_per_slice": float(f"{paper_counts:.4g}"), "insertion_counts_per_slice": float(f"{counts:.4g}"),
            "counts_source": "rule" if level_given else "estimated",
            "cond_steps": cond, "conditioned_transitions": conditioned, "steps": total, "start_t": start,
            "mode": params.mode, "level_steps": level_steps, "eta": eta, "lambda": lam,
            "gf_fwhm_px": round(gf_fwhm, 3), "samples": k,
            "activity_scale": round(activity_scale, 6), "crop": [h, w],
            "uncertainty_mean": float(f"{float(std.mean()):.4g}")}
    return out, uncertainty, info


def _predict(net: Any, x: torch.Tensor, t: int, in_slices: int, batch: int, device: str) -> torch.Tensor:
    """The network's noise estimate for every slice of every sample of ``x[K, Z, H, W]``."""
    slabs = _slabs(x, in_slices)
    out = torch.empty((slabs.shape[0], 1, *slabs.shape[2:]), dtype=x.dtype, device=x.device)
    channels_last = device == "cpu"
    for b0 in range(0, slabs.shape[0], batch):
        part = slabs[b0:b0 + batch]
        if channels_last:
            part = part.contiguous(memory_format=torch.channels_last)
        tt = torch.full((part.shape[0],), t, dtype=torch.long, device=x.device)
        out[b0:b0 + batch] = net(part, tt)
    return out.reshape(x.shape)


@functools.cache
def _example_model(seed: int) -> Any:
    """The example's model: a tiny untrained score network (its zero-initialised head predicts no noise), written
    once per process."""
    from denoisers.models import ModelCard, ResolvedModel, sha256_file

    torch.manual_seed(seed)
    config = {"in_slices": 3, "base": 8, "mults": [1, 2], "blocks": 1, "attention": False}
    net = build_network(dict(config))
    folder = Path(tempfile.mkdtemp(prefix="petnode-bcdpm-example-"))
    weights = folder / "weights.pt"
    torch.save(net.state_dict(), weights)
    card = ModelCard(name="example-bcdpm", version="0.0.1", denoiser="bcdpm", architecture="adm-unet",
                     input_slices=3, normalisation=NORMALISATION, created="2026-12-05T00:00:00Z",
                     petnode_version="example", weights_file=weights.name, sha256=sha256_file(weights),
                     extra={"net": config, "diffusion": {"schedule": "linear", "steps": T_STEPS,
                                                         "beta_start": BETA_START, "beta_end": BETA_END,
                                                         "scale": SCALE}})
    return ResolvedModel(name=card.name, version=card.version, card=card, weights_path=weights, pinned=True)
