"""``cdip``: conditional deep image prior (DIP) with a stability map (shared/papers/conditional-dip-stability-map.txt).

The method (paper, section 2). A 3D U-Net ``f`` (:class:`denoisers.nets.unet3d.UNet3D`) takes the anatomical prior
``g`` (MR or CT on the PET grid) as its input and is fitted to the noisy PET ``x0`` itself, from a seeded random
initialisation, by L-BFGS on the mean squared error: ``theta* = argmin ||x0 - f(theta | g)||``. Stopped early, the
network reproduces what the prior explains and the PET's smooth activity, not its noise. The network's outputs at
epochs ``n >= m`` with ``n % M == 0`` give the stability map ``S``, their voxel-wise standard deviation: large where
the optimisation keeps changing its mind (small structures, PET-only lesions the prior does not show). The final
image blends the DIP output with the input where it is unstable::

    S_norm = min(alpha * S / mean(S in the body), 1)
    x      = S_norm * x0 + (1 - S_norm) * f(theta_200 | g)

Paper defaults: 200 epochs, M = 5, m = 100 (21 samples), alpha = 0.6. Every value is a rule parameter
(:class:`CdipParams`).

Decisions made here, beyond the paper:

- **An epoch is one L-BFGS step** of ``lbfgs_max_iter`` iterations (torch's ``LBFGS.step``; its curvature history
  carries over from step to step, so N steps of one iteration are N iterations of one L-BFGS run, and more
  iterations per step only sample the same trajectory more sparsely at a multiple of the cost). The default is one
  iteration without a line search: one forward and backward pass per epoch, so the paper's 200 epochs cost 200
  passes. A strong-Wolfe line search (``line_search``) costs at least two passes per step and, on the brain
  phantom, stalled after about 100 epochs. The network's output at epoch ``n`` is the one the next step computes
  first, so sampling costs no extra pass.
- **Step size 0.1.** L-BFGS at its usual step size 1 fits the noise of a low-count series well before epoch 200:
  on the brain phantom (``training.phantoms``, 3 mm, 0.15 M counts per slice) the DIP output's PSNR peaked at
  epoch 50-100 and was 2-4 dB below its peak at epoch 200. At 0.1 the peak moves to epoch 125-150, so the paper's
  samples (epochs 100-200) straddle it, and epoch 200 is about 1 dB below it; at 0.75 M counts per slice the
  output still improves at epoch 200 (25.6 dB, against 24.2 dB for the input and 25.2 dB for the best Gaussian).
- **A lean network.** 8 features, 3 levels, one 3x3x3 convolution per stage (``convs``): two per stage cost 2.4
  times as much per epoch for the same quality (PSNR peaks within 0.1 dB, at epoch 200 within 0.5 dB). On the
  2-core development machine (shared with another job), one epoch on a 96 x 128 x 128 brain (crop 94 x 120 x 98)
  takes about 2 s on one torch thread (about 7 minutes for 200 epochs, 1.1 GB resident) and 3 s on two threads
  that compete with that job; ``threads`` sets the count for a run.
- **Body mask and crop.** The mask is the PET smoothed (2 voxels), thresholded at ``mask_threshold`` of a robust
  maximum (99.5th percentile), holes filled, specks dropped, dilated by one voxel. The network sees only the mask's
  bounding box plus ``crop_margin_vox`` (70 % of a 96 x 128 x 128 brain phantom series). Outside the crop the
  output is the input and the stability is 0. The mask also gives the PET's normalisation and ``S``'s mean.
- **Normalisation.** PET divided by its mean inside the mask (undone at the end); an MR prior divided by the 99th
  percentile of its positive values; a CT prior as ``(HU + 1000) / 1000`` clipped at 0. A prior that is zero or
  constant inside the crop carries no anatomy and is refused (``InvalidInputError``).
- **Blocks.** A crop above ``max_block_voxels`` is cut into blocks (the longest axis first, z on ties) that overlap
  by at least ``block_overlap`` voxels; each is fitted by its own network and the outputs, snapshots and ``S`` are
  blended with weights that ramp linearly across the overlaps, so there is no seam. Memory, not time, sets the
  limit: about 0.7 GB per million voxels for the default network on a CPU (4 M voxels by default).
- **Quantitation.** The blend is clipped at 0 inside the crop and scaled so that the crop's total equals the
  input's: total activity is kept to float rounding; ``info["activity_scale"]`` is the scale applied.
- **Determinism.** The network is initialised from a ``torch.Generator`` seeded by the node's seed (never torch's
  global random state); nothing else is random, so a seed gives the same result on the same device, software and
  thread count. On CUDA cuDNN is switched to deterministic algorithms for the run (and back), and the network
  avoids ops whose CUDA backward uses atomic adds (max pooling, trilinear upsampling).

The benchmark uses :func:`run_conditional_dip` (one optimisation: the DIP output, ``S``, the mask and the DIP
output at any snapshot epochs) and :func:`blend`, so the paper's curves (conditional DIP at epochs 110-200, the
blend at alpha 0-1) come from one run.

Inputs: PET and the prior named by ``prior`` (MR_PRIOR by default, or CT_PRIOR); the spacing is not used (the
network works in voxels). Outputs: DENOISED and STABILITY (``S`` in the PET's units; the node displays ``S_norm``
from it and ``info["stability_mean"]``). GPU preferred; runs on CPU. Stochastic: the result depends on the seed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator
from scipy import ndimage

from denoisers.base import (
    DeviceNeed,
    DenoiseInputs,
    DenoiseResult,
    Denoiser,
    DenoiserParams,
    DenoiserSpec,
    InputKind,
    OutputKind,
    Volume,
)
from denoisers.errors import DenoiserError, InvalidInputError

if importlib.util.find_spec("torch") is None:
    raise ImportError("the cdip denoiser needs PyTorch (pip install torch)")

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Mask = npt.NDArray[np.bool_]
Crop = tuple[slice, slice, slice]
Progress = Callable[[int, int, float], None]
"""Called after every epoch with (epochs done, epochs in all, loss), the epochs counted over all blocks."""

MASK_SMOOTH_VOX = 2.0  # Gaussian sigma before thresholding: noise must not decide where the body ends
MASK_PERCENTILE = 99.5  # the "robust maximum": a few hot voxels do not set it
MR_PERCENTILE = 99.0


class CdipParams(DenoiserParams):
    """Hyper-parameters of the conditional DIP (the paper's values by default; see the module docstring)."""

    prior: Literal["mr", "ct"] = Field("mr", description="the prior the network is conditioned on (and requires)")
    epochs: int = Field(200, ge=2, le=100_000, strict=True, description="L-BFGS steps; the output is the last")
    sample_every: int = Field(5, ge=1, le=10_000, strict=True, description="M: epochs between stability samples")
    sample_from: int = Field(100, ge=1, le=100_000, strict=True,
                             description="m: first epoch that may be sampled (must be below epochs)")
    alpha: float = Field(0.6, ge=0.0, le=100.0, strict=True, allow_inf_nan=False,
                         description="blending: 0 gives the DIP output, larger keeps more of the input")
    features: int = Field(8, ge=1, le=64, strict=True, description="U-Net width at full resolution")
    depth: int = Field(3, ge=1, le=5, strict=True, description="U-Net downsamplings")
    convs: int = Field(1, ge=1, le=3, strict=True, description="3x3x3 convolutions per U-Net stage")
    norm: Literal["instance", "batch", "none"] = Field("instance", description="normalisation in the U-Net")
    lbfgs_lr: float = Field(0.1, gt=0.0, le=10.0, strict=True, allow_inf_nan=False, description="L-BFGS step size")
    lbfgs_max_iter: int = Field(1, ge=1, le=100, strict=True, description="L-BFGS iterations per epoch")
    history_size: int = Field(10, ge=1, le=1000, strict=True, description="L-BFGS curvature pairs kept")
    line_search: bool = Field(False, strict=True, description="strong-Wolfe line search (at least 2 passes/epoch)")
    max_block_voxels: int = Field(1 << 22, ge=1 << 12, strict=True,
                                  description="crops above this many voxels are fitted in overlapping blocks")
    block_overlap: int = Field(16, ge=0, le=256, strict=True, description="minimum overlap of blocks, voxels")
    mask_threshold: float = Field(0.05, gt=0.0, lt=1.0, strict=True, allow_inf_nan=False,
                                  description="body mask: fraction of the smoothed PET's robust maximum")
    crop_margin_vox: int = Field(4, ge=0, le=256, strict=True, description="voxels kept around the body mask")
    pet_input: bool = Field(False, strict=True,
                            description="feed the PET as a second input channel (the paper feeds the prior only)")
    threads: int | None = Field(None, ge=1, le=1024, strict=True,
                                description="torch CPU threads during the run (None: as the process has it)")

    @model_validator(mode="after")
    def _check_sampling(self) -> Self:
        if self.sample_from >= self.epochs:
            raise ValueError(f"sample_from ({self.sample_from}) must be below epochs ({self.epochs})")
        if len(sample_epochs(self)) < 2:
            raise ValueError(f"sampling every {self.sample_every} epochs from epoch {self.sample_from} to "
                             f"{self.epochs} gives {len(sample_epochs(self))} stability sample; at least 2 are "
                             "needed (raise epochs, or lower sample_from or sample_every)")
        return self


def sample_epochs(params: CdipParams) -> list[int]:
    """The epochs ``n`` whose outputs make the stability map: ``n % M == 0`` and ``m <= n <= epochs``."""
    first = math.ceil(params.sample_from / params.sample_every) * params.sample_every
    return list(range(first, params.epochs + 1, params.sample_every))


# --- pure numpy helpers ---------------------------------------------------------------------------------------


def body_mask(pet: Volume, threshold: float = 0.05) -> Mask:
    """The body (or head) of a PET volume: the smoothed PET above ``threshold`` of its robust maximum, holes filled,
    components under 1 % of the largest dropped, dilated by one voxel.

    Raises
    ------
    InvalidInputError
        The PET has no positive activity.
    """
    smooth = ndimage.gaussian_filter(pet.astype(np.float32), MASK_SMOOTH_VOX, mode="nearest")
    top = float(np.percentile(smooth, MASK_PERCENTILE))
    if not top > 0:
        top = float(smooth.max())
    if not top > 0:
        raise InvalidInputError(f"the PET has no positive activity (maximum {float(pet.max()):g})")
    mask = smooth > threshold * top
    labels, count = ndimage.label(mask)
    if count > 1:  # specks of smoothed noise in the air would stretch the crop
        sizes = np.bincount(labels.ravel())[1:]
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.01 * sizes.max()))
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_dilation(mask, iterations=1)


def bounding_crop(mask: Mask, margin: int) -> Crop:
    """The bounding box of ``mask`` grown by ``margin`` voxels per side, within the volume."""
    box: list[slice] = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
    return box[0], box[1], box[2]


def normalise_prior(prior: Volume, kind: Literal["mr", "ct"]) -> Volume:
    """The prior as the network sees it: MR over the 99th percentile of its positive values; CT as
    ``(HU + 1000) / 1000`` clipped at 0 (air 0, water 1).

    Raises
    ------
    InvalidInputError
        An MR prior without positive values.
    """
    if kind == "ct":
        return np.maximum((prior.astype(np.float32) + np.float32(1000.0)) / np.float32(1000.0), 0.0)
    positive = prior[prior > 0]
    if positive.size == 0:
        raise InvalidInputError("the MR prior has no positive values (an empty or all-zero image?)")
    scale = float(np.percentile(positive, MR_PERCENTILE))
    return (prior / np.float32(scale)).astype(np.float32)


def plan_blocks(shape: tuple[int, int, int], max_voxels: int, overlap: int) -> list[Crop]:
    """Overlapping blocks of at most ``max_voxels`` covering ``shape`` (one block when it fits).

    The longest block side is halved (in count) first, z on ties; a side is not cut below ``2 * overlap + 8``
    voxels, so a block always has an interior. When that is not enough the blocks stay larger than asked (a
    warning is logged) rather than failing.
    """
    counts = [1, 1, 1]

    def side(n: int, c: int) -> int:
        return n if c == 1 else math.ceil((n + (c - 1) * overlap) / c)

    while math.prod(side(n, c) for n, c in zip(shape, counts)) > max_voxels:
        order = sorted(range(3), key=lambda a: (-side(shape[a], counts[a]), a))
        for axis in order:
            if side(shape[axis], counts[axis] + 1) >= 2 * overlap + 8:
                counts[axis] += 1
                break
        else:
            logger.warning("blocks of %s voxels exceed max_block_voxels=%d: overlap %d leaves no finer split",
                           [side(n, c) for n, c in zip(shape, counts)], max_voxels, overlap)
            break
    per_axis: list[list[slice]] = []
    for n, c in zip(shape, counts):
        b = side(n, c)
        starts = [0] if c == 1 else [round(k * (n - b) / (c - 1)) for k in range(c)]
        per_axis.append([slice(s, s + b) for s in starts])
    return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]


def _ramp(start: int, stop: int, total: int, overlap: int) -> npt.NDArray[np.float32]:
    """1-D blending weight of a block [start, stop) of an axis of ``total``: linear ramps over ``overlap`` voxels on
    sides that have a neighbour, 1 elsewhere (never 0, so every voxel has weight)."""
    n = stop - start
    w = np.ones(n, np.float32)
    ramp = (np.arange(min(overlap, n), dtype=np.float32) + 0.5) / max(overlap, 1)
    if start > 0 and overlap > 0:
        w[:ramp.size] = np.minimum(w[:ramp.size], ramp)
    if stop < total and overlap > 0:
        w[n - ramp.size:] = np.minimum(w[n - ramp.size:], ramp[::-1])
    return w


def blend(x0: Volume, dip: Volume, stability: Volume, mask: Mask, alpha: float) -> tuple[Volume, Volume]:
    """The paper's equation 3: ``S_norm = min(alpha * S / mean(S[mask]), 1)``, ``x = S_norm x0 + (1 - S_norm) dip``.

    Parameters
    ----------
    x0 : Volume
        The input (noisy) PET.
    dip : Volume
        The conditional DIP output on the same grid.
    stability : Volume
        The stability map ``S`` (standard deviation of the sampled outputs).
    mask : bool array
        Where ``S``'s mean ``S̄`` is taken (the body).
    alpha : float
        0 gives ``dip``; larger values keep more of ``x0`` where ``S`` is high.

    Returns
    -------
    (Volume, Volume)
        The blended image and ``S_norm`` (in [0, 1]; all 0 when ``S̄`` is 0).
    """
    inside = stability[mask]
    s_mean = float(np.mean(inside, dtype=np.float64)) if inside.size else 0.0
    if s_mean > 0 and alpha > 0:
        s_norm = np.minimum(np.float32(alpha / s_mean) * stability, np.float32(1.0)).astype(np.float32)
    else:
        s_norm = np.zeros(stability.shape, np.float32)
    out = (s_norm * x0 + (np.float32(1.0) - s_norm) * dip).astype(np.float32)
    return out, s_norm


def keep_total(image: Volume, reference: Volume, region: Crop) -> tuple[Volume, float]:
    """``image`` clipped at 0 and scaled inside ``region`` so that its total there equals ``reference``'s; outside
    ``region`` it is ``reference``. Returns the new volume and the scale (1 when either total is not positive)."""
    out = reference.astype(np.float32, copy=True)
    part = np.maximum(image[region], 0.0).astype(np.float32)
    total_in = float(np.sum(reference[region], dtype=np.float64))
    total_out = float(np.sum(part, dtype=np.float64))
    scale = total_in / total_out if total_in > 0 and total_out > 0 else 1.0
    out[region] = part * np.float32(scale)
    return out, scale


# --- the optimisation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DipRun:
    """One conditional DIP optimisation, de-normalised to the PET's units and grid.

    Attributes
    ----------
    dip : Volume
        The network's output after the last epoch (the paper's ``f(theta* | g)``); the input PET outside ``crop``.
    stability : Volume
        ``S``: the sample standard deviation (ddof 1) of the outputs at :func:`sample_epochs`; 0 outside ``crop``.
    mask : bool array
        The body mask (``S``'s mean and the PET's normalisation are taken inside it).
    crop : tuple of slice
        The region the network saw.
    snapshots : dict
        Epoch -> the network's output at that epoch (PET shape, the input outside ``crop``), for the epochs asked.
    pet_scale : float
        The PET's mean inside the mask (what the network's target was divided by).
    samples, blocks : int
        Stability samples and blocks fitted.
    loss : float
        Final mean squared error in normalised units (the mean over blocks).
    seconds : float
        Wall time of the optimisation.
    device : str
        Where it ran.
    """

    dip: Volume
    stability: Volume
    mask: Mask
    crop: Crop
    snapshots: dict[int, Volume] = field(default_factory=dict)
    pet_scale: float = 1.0
    samples: int = 0
    blocks: int = 1
    loss: float = float("nan")
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def stability_mean(self) -> float:
        """``S̄``: the mean of ``S`` inside the mask."""
        return float(np.mean(self.stability[self.mask], dtype=np.float64))

    def crop_text(self) -> str:
        """The crop as ``z0:z1,y0:y1,x0:x1``."""
        return ",".join(f"{s.start}:{s.stop}" for s in self.crop)


@dataclass
class _BlockFit:
    final: npt.NDArray[np.float32]
    std: npt.NDArray[np.float32]
    snapshots: dict[int, npt.NDArray[np.float32]]
    loss: float


@contextlib.contextmanager
def _torch_settings(device: str, threads: int | None) -> Iterator[None]:
    """Deterministic cuDNN on CUDA and ``threads`` CPU threads for the run; both restored afterwards (they are
    process-wide)."""
    import torch

    old_threads = torch.get_num_threads()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if device.startswith("cuda"):
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


def _fit_block(net_input: npt.NDArray[np.float32], target: npt.NDArray[np.float32], *, params: CdipParams,
               generator: torch.Generator, device: str, samples: Collection[int], snapshots: Collection[int],
               tick: Callable[[float], None]) -> _BlockFit:
    """Fit a fresh network to one block; keep the running mean and variance of the sampled outputs (Welford)."""
    import torch
    from torch.nn import functional as F

    from denoisers.nets.unet3d import UNet3D

    net = UNet3D(net_input.shape[0], 1, features=params.features, depth=params.depth, convs=params.convs,
                 norm=params.norm)
    net.reset_parameters(generator)
    net = net.to(device).train()
    x = torch.from_numpy(net_input[None]).to(device)
    y = torch.from_numpy(target[None, None]).to(device)
    if device == "cpu":  # oneDNN's 3-D convolutions run about twice as fast on channels-last tensors
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    params_cl = [p for p in net.parameters() if not p.is_contiguous()]
    optimiser = torch.optim.LBFGS(net.parameters(), lr=params.lbfgs_lr, max_iter=params.lbfgs_max_iter,
                                  history_size=params.history_size,
                                  line_search_fn="strong_wolfe" if params.line_search else None)
    # The first pass of each step is at the parameters the previous step left: the previous epoch's output.
    state: dict[str, Any] = {"want": False, "out": None}

    def closure() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        out = net(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        for param in params_cl:  # LBFGS flattens gradients with view(-1), which channels-last ones refuse
            if param.grad is not None:
                param.grad = param.grad.contiguous()
        if state["want"]:
            state["want"], state["out"] = False, out.detach()
        return loss

    count = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    kept: dict[int, npt.NDArray[np.float32]] = {}

    def record(epoch: int, out: torch.Tensor) -> None:
        nonlocal count, mean, m2
        if epoch in samples:
            count += 1
            if mean is None:
                mean, m2 = out.clone(), torch.zeros_like(out)
            else:
                delta = out - mean
                mean += delta / count
                m2 += delta * (out - mean)
        if epoch in snapshots:
            kept[epoch] = out[0, 0].float().cpu().numpy().copy()

    loss_value = float("nan")
    for epoch in range(1, params.epochs + 1):
        state["want"] = True
        loss = optimiser.step(closure)
        record(epoch - 1, state["out"])
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise DenoiserError(f"cdip: the optimisation diverged (loss {loss_value} at epoch {epoch}); lower "
                                f"lbfgs_lr ({params.lbfgs_lr}) or set line_search: true")
        tick(loss_value)
    with torch.no_grad():
        out = net(x)
        loss_value = float(F.mse_loss(out, y))
    record(params.epochs, out)
    assert mean is not None and m2 is not None and count >= 2  # guaranteed by CdipParams
    std = torch.sqrt(torch.clamp(m2 / (count - 1), min=0.0))
    return _BlockFit(final=out[0, 0].cpu().numpy().copy(), std=std[0, 0].cpu().numpy().copy(), snapshots=kept,
                     loss=loss_value)


def run_conditional_dip(pet: Volume, prior: Volume, *, params: CdipParams, seed: int = 0, device: str = "cpu",
                        snapshot_epochs: Collection[int] = (), progress: Progress | None = None) -> DipRun:
    """Run the conditional DIP once: mask, crop, normalise, fit (in blocks when large), de-normalise.

    Parameters
    ----------
    pet : Volume
        The noisy PET ``x0`` (z, y, x) float32; never modified.
    prior : Volume
        The prior on the PET grid, of the kind ``params.prior`` names (MR intensities or CT in HU).
    params : CdipParams
        Hyper-parameters (``alpha`` is not used here: see :func:`blend`).
    seed : int
        Seeds the network's initialisation (the only randomness).
    device : str
        A concrete torch device (``cpu``, ``cuda:0``); see ``denoisers.devices.resolve_device``.
    snapshot_epochs : collection of int
        Epochs (1..epochs) whose outputs to return in ``DipRun.snapshots``.
    progress : callable or None
        Called after each epoch (see :data:`Progress`).

    Raises
    ------
    InvalidInputError
        No activity in the PET, or a prior without anatomy (zero or constant inside the crop); before any fitting.
    DenoiserError
        The optimisation diverged.
    """
    import torch

    start = time.perf_counter()
    if pet.shape != prior.shape or pet.ndim != 3:
        raise InvalidInputError(f"the PET {pet.shape} and the prior {prior.shape} must be one 3-D grid")
    bad = sorted(e for e in snapshot_epochs if not 1 <= e <= params.epochs)
    if bad:
        raise ValueError(f"snapshot epochs {bad} are outside 1-{params.epochs}")
    mask = body_mask(pet, params.mask_threshold)
    pet_scale = float(np.mean(pet[mask], dtype=np.float64))
    if not pet_scale > 0:
        raise InvalidInputError(f"the PET's mean inside the body is {pet_scale:g}; nothing to denoise")
    crop = bounding_crop(mask, params.crop_margin_vox)
    guide = normalise_prior(prior[crop], params.prior) if params.prior == "ct" else normalise_prior(prior, "mr")[crop]
    low, high = float(guide.min()), float(guide.max())
    if not high - low > 1e-6 * max(1.0, abs(high)):
        raise InvalidInputError(f"the {params.prior.upper()} prior is constant ({float(prior[crop].min()):g}) "
                                "inside the body: it carries no anatomy to condition on")
    target = (pet[crop] / np.float32(pet_scale)).astype(np.float32)
    channels = [guide, target] if params.pet_input else [guide]
    net_input = np.ascontiguousarray(np.stack(channels), dtype=np.float32)

    shape = target.shape
    blocks = plan_blocks((shape[0], shape[1], shape[2]), params.max_block_voxels, params.block_overlap)
    samples = set(sample_epochs(params))
    snaps = set(int(e) for e in snapshot_epochs)
    generator = torch.Generator().manual_seed(int(seed))
    total_epochs = params.epochs * len(blocks)
    done = 0

    def tick(loss: float) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total_epochs, loss)
        if done % max(1, total_epochs // 10) == 0:
            logger.debug("cdip epoch %d/%d loss %.5g", done, total_epochs, loss)

    weight_sum = np.zeros(shape, np.float32) if len(blocks) > 1 else None
    final = np.zeros(shape, np.float32)
    std = np.zeros(shape, np.float32)
    snap_acc = {e: np.zeros(shape, np.float32) for e in sorted(snaps)}
    losses = []
    with _torch_settings(device, params.threads):
        for block in blocks:
            fit = _fit_block(net_input[(slice(None), *block)], target[block], params=params, generator=generator,
                             device=device, samples=samples, snapshots=snaps, tick=tick)
            losses.append(fit.loss)
            if weight_sum is None:  # one block: no blending arithmetic, the fit as it is
                final, std, snap_acc = fit.final, fit.std, fit.snapshots
                continue
            w = np.ones(1, np.float32)
            for axis, sl in enumerate(block):
                ramp = _ramp(sl.start, sl.stop, shape[axis], params.block_overlap)
                w = w[..., None] * ramp if axis else ramp
            weight_sum[block] += w
            final[block] += w * fit.final
            std[block] += w * fit.std
            for e, snap in fit.snapshots.items():
                snap_acc[e][block] += w * snap
    if weight_sum is not None:
        final /= weight_sum
        std /= weight_sum
        for acc in snap_acc.values():
            acc /= weight_sum

    scale = np.float32(pet_scale)

    def full(part: npt.NDArray[np.float32]) -> Volume:
        out = pet.astype(np.float32, copy=True)
        out[crop] = part * scale
        return out

    stability = np.zeros(pet.shape, np.float32)
    stability[crop] = std * scale
    seconds = time.perf_counter() - start
    logger.debug("cdip: crop %s, %d block(s), %d epochs, loss %.4g, %.1f s on %s", shape, len(blocks),
                 params.epochs, float(np.mean(losses)), seconds, device)
    return DipRun(dip=full(final), stability=stability, mask=mask, crop=crop,
                  snapshots={e: full(v) for e, v in sorted(snap_acc.items())}, pet_scale=pet_scale,
                  samples=len(samples), blocks=len(blocks), loss=float(np.mean(losses)), seconds=seconds,
                  device=device)


# --- the plugin -----------------------------------------------------------------------------------------------


class ConditionalDIPDenoiser(Denoiser[CdipParams]):
    """Conditional deep image prior with a stability map (see the module docstring)."""

    name = "cdip"
    Params = CdipParams
    device_need = DeviceNeed.GPU_PREFERRED

    @property
    def spec(self) -> DenoiserSpec:
        prior = InputKind.MR_PRIOR if self.params.prior == "mr" else InputKind.CT_PRIOR
        return self.make_spec(requires=frozenset({InputKind.PET, prior}),
                              produces=frozenset({OutputKind.DENOISED, OutputKind.STABILITY}), stochastic=True)

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        from denoisers.devices import resolve_device

        p = self.params
        device = resolve_device(self.device, self.device_need)
        seed = 0 if self.seed is None else int(self.seed)
        prior = inputs.mr_prior if p.prior == "mr" else inputs.ct_prior
        assert prior is not None  # the spec requires it; checked before _run
        run = run_conditional_dip(inputs.pet, prior, params=p, seed=seed, device=device)
        blended, _ = blend(inputs.pet, run.dip, run.stability, run.mask, p.alpha)
        denoised, activity_scale = keep_total(blended, inputs.pet, run.crop)
        return DenoiseResult(denoised=denoised, stability=run.stability, info={
            "prior": p.prior, "alpha": p.alpha, "epochs": p.epochs, "sample_every": p.sample_every,
            "sample_from": p.sample_from, "samples": run.samples, "stability_mean": run.stability_mean,
            "blocks": run.blocks, "crop": run.crop_text(), "seed": seed, "loss": round(run.loss, 6),
            "activity_scale": round(activity_scale, 6), "pet_scale": run.pet_scale, "device": device,
            "network": f"unet3d f{p.features} d{p.depth} c{p.convs} {p.norm}", "seconds": round(run.seconds, 3)})

    @classmethod
    def example(cls, *, seed: int | None = None) -> Self:
        """A tiny network and a short schedule: 12 epochs, samples at 6, 8, 10, 12."""
        params = CdipParams(epochs=12, sample_from=6, sample_every=2, features=4, depth=2, threads=1)
        return cls(params, seed=seed)
