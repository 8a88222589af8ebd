"""``cnn``: the supervised denoising networks (Gong 2018, Xu 2017, the feature-oriented DCNN), built from a card.

A rule names a registered model (``denoiser: {name: cnn, model: NAME[@VERSION]}``); the node checks its card against
the series and hands the plugin the checked model (card + weights path). Everything about the network comes from
the card: ``architecture`` (``gong-resnet``, ``xu-unet``, ``fo-dcnn``; :mod:`denoisers.nets`), its configuration
in ``extra["net"]`` and the intensity ``normalisation`` it was trained with, undone after inference:

- ``mean``: the volume divided by its mean (computable from the input alone; ``training.datasets.volume_scale``);
- ``suv``: multiplied by the series' SUVbw factor (refused when the series has none);
- ``none``: as it is.

A series at another voxel size than the card's is refused, unless the rule sets ``resample: true``: the series is
then resampled (cubic spline) to the card's voxel size, denoised, and resampled back onto its own grid.

The weights are loaded with ``torch.load(weights_only=True)`` from the bytes whose sha256 the card holds, into a
network that must match them exactly (``strict``). Loaded networks are kept (a few per process, by weights hash and
device) so a node does not rebuild them for every series.

Count level. Each series' noise index (:func:`noise_index`: estimated noise over mean activity in the body, from
the image alone, never from a dose or duration header) goes into ``info`` and so into the derived series'
provenance. A dose-aware network (``extra["net"]["level_input"]``) is given it as an input channel
(:func:`denoisers.nets.level_feature`), so one model serves every count level it was trained on. A card that
records the range it was trained on (``extra["noise_index_range"]``, written by ``training.train``) gets a warning,
in the log and in ``info``, for a series well outside it.

Quantitation. The network's output is clipped at zero and then scaled so that its total equals the input's: total
activity is kept exactly (to float rounding) whatever the network does; regional SUVmean depends on the network and
is what ``petnode bench quality`` reports. The scale applied is in ``info["activity_scale"]``. A rule can ask
for the input's regional means back above a scale (``keep_means_fwhm_mm``; see :func:`_give_back`), at the
price of the noise above that scale.

Inputs: PET, SPACING (+ the SUV factor for ``suv`` cards). Outputs: DENOISED. GPU preferred; runs on CPU.
Deterministic (inference only, no dropout).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from pydantic import Field, model_validator

from denoisers.base import (
    DeviceNeed,
    DenoiseInputs,
    DenoiseResult,
    Denoiser,
    DenoiserParams,
    DenoiserSpec,
    InputKind,
    OutputKind,
)
from denoisers.errors import DenoiserError, InvalidInputError

if importlib.util.find_spec("torch") is None:
    raise ImportError("the cnn denoiser needs PyTorch (pip install torch)")

logger = logging.getLogger(__name__)

_CACHE_SIZE = 4
_cache: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()
_cache_lock = threading.Lock()


def _resample(volume: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float]
              ) -> np.ndarray:
    """Resampling of a (z, y, x) volume from ``spacing`` to ``target`` mm (same extent; cubic, see _to_shape)."""
    shape = [max(1, round(n * s / t)) for n, s, t in zip(volume.shape, spacing, target)]
    return _to_shape(volume, tuple(shape))


def _to_shape(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cubic-spline resampling onto ``shape`` voxels over the same extent (voxel centres mapped, edges held).

    Cubic, not linear: a linear round trip from the ACRIN study's 4.7 mm grid to 4 mm and back lowers its SUVmax by
    20 % on its own (a cubic one by 1 %), which would be charged to the network. Small undershoots next to hot
    spots are clipped with the network's output."""
    from scipy import ndimage

    coords = np.meshgrid(*[(np.arange(m) + 0.5) * (n / m) - 0.5 for n, m in zip(volume.shape, shape)],
                         indexing="ij", sparse=False)
    return ndimage.map_coordinates(volume, coords, order=3, mode="nearest").astype(np.float32)


def noise_index(pet: np.ndarray) -> float:
    """The count level of a series read from the image itself: the estimated noise standard deviation (finest
    wavelet band, inside the body) over the mean activity inside the body. Lower counts, higher index; it does
    not trust a header (dose, duration) that reconstruction settings and patient size make meaningless."""
    from denoisers.nlm import body_mask, estimate_noise_sigma

    body = body_mask(pet)
    mean = float(np.mean(pet[body], dtype=np.float64))
    return estimate_noise_sigma(pet) / mean if mean > 0 else float("nan")


class CNNParams(DenoiserParams):
    """How inference runs; what the network is comes from the model card."""

    batch: int = Field(8, ge=1, le=256, strict=True, description="slices per forward pass")
    half_precision: bool = Field(False, strict=True, description="float16 on CUDA (ignored on a CPU)")
    resample: bool = Field(False, strict=True,
                           description="resample a series at another voxel size to the card's and back, "
                                       "instead of refusing it")
    keep_means_fwhm_mm: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False,
        description="give back the input's local means at this scale (FWHM in mm): the network's output plus a "
                    "Gaussian of this width applied to what the network removed. Regional SUVmeans stay "
                    "nearer the input's; the lowest-frequency noise stays too (off by default)")
    keep_means_guided: bool = Field(
        False, strict=True,
        description="with keep_means_fwhm_mm: give back what the network removed only among voxels of similar "
                    "output intensity (grey matter from grey matter, a lesion from its own voxels), so the "
                    "regional means come back with less of the noise and without mixing neighbouring tissues")
    keep_means_noise_ref: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False,
        description="with keep_means_fwhm_mm: the series noise index (info noise_index) that scale is meant for; "
                    "a noisier series (fewer counts) gets a wider scale, (index / ref) ** (2/3) times it, a "
                    "quieter one a narrower scale, so about the same noise comes back at every count level")
    keep_means_max_noise: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False,
        description="with keep_means_fwhm_mm: give back only for series up to about this noise index (info "
                    "noise_index), tapered over a factor of 2 around it (all below max/sqrt2, none above "
                    "max*sqrt2); at ultra-low counts the noise that comes back costs more than the means it keeps")
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"keep_means_fwhm_mm", "keep_means_noise_ref",
                                                          "keep_means_max_noise"})

    @model_validator(mode="after")
    def _give_back_options_need_a_scale(self) -> Self:
        if self.keep_means_fwhm_mm is None:
            for name, what in (("keep_means_guided", "the scale the means are kept above"),
                               ("keep_means_noise_ref", "the scale it adapts"),
                               ("keep_means_max_noise", "the give-back it limits")):
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"{name} needs keep_means_fwhm_mm ({what})")
        return self

    def keep_means_weight(self, noise: float) -> float:
        """How much of the give-back a series of noise index ``noise`` gets: 1 without ``keep_means_max_noise``
        or at most max/sqrt2, 0 from max*sqrt2 on, linear in log(index) between (no step at one index value). An
        index that cannot be estimated gets the whole give-back, as without the limit."""
        top = self.keep_means_max_noise
        if top is None or not (math.isfinite(noise) and noise > 0):
            return 1.0
        return float(min(1.0, max(0.0, 0.5 - math.log2(noise / top))))

    def keep_means_scale(self, noise: float) -> float | None:
        """The give-back FWHM (mm) for a series of noise index ``noise``, None without a give-back.

        The noise a Gaussian of FWHM f leaves of white noise falls as f ** -3/2 in 3-D; the voxel noise grows with
        the index, so f ~ index ** (2/3) gives back about the same noise at every count level. Without
        ``keep_means_noise_ref``, or with an index that cannot be estimated, the scale is the one given."""
        fwhm, ref = self.keep_means_fwhm_mm, self.keep_means_noise_ref
        if fwhm is None or ref is None or not (math.isfinite(noise) and noise > 0):
            return fwhm
        return float(fwhm * (noise / ref) ** (2.0 / 3.0))


def _load(card: Any, weights_path: Path, device: str) -> tuple[Any, Any]:
    """The network of ``card`` with its checked weights, on ``device``, in eval mode (cached)."""
    from denoisers.models import load_weights
    from denoisers.nets import build

    key = (str(card.sha256), repr(sorted((card.extra.get("net") or {}).items())), device)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    state = load_weights(weights_path, expected_sha256=card.sha256)
    net, spec = build(card.architecture, card.extra.get("net") or {})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DenoiserError(f"model {card.name}@{card.version}: its weights do not fit a {card.architecture!r} "
                            f"network configured {card.extra.get('net') or {}}: {str(exc).splitlines()[0]}") from exc
    net = net.to(device).eval()
    with _cache_lock:
        _cache[key] = (net, spec)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return net, spec


class CNNDenoiser(Denoiser[CNNParams]):
    """A supervised 2.5D network from the model registry (see the module docstring)."""

    name = "cnn"
    Params = CNNParams
    device_need = DeviceNeed.GPU_PREFERRED

    @property
    def spec(self) -> DenoiserSpec:
        return self.make_spec(requires=frozenset({InputKind.PET, InputKind.SPACING}),
                              produces=frozenset({OutputKind.DENOISED}), needs_weights=True)

    def _card(self) -> Any:
        if self.model is None:
            raise DenoiserError("the cnn denoiser needs a model from the registry: give the rule "
                                "`denoiser: {name: cnn, model: NAME}` (petnode models list shows them)")
        return self.model.card

    def _scale(self, card: Any, inputs: DenoiseInputs) -> float:
        how = (card.normalisation or "none").strip().lower()
        if how == "none":
            return 1.0
        if how == "mean":
            mean = float(np.mean(inputs.pet, dtype=np.float64))
            if not mean > 0:
                raise InvalidInputError(f"model {card.ref} normalises by the volume's mean, which is {mean:g}")
            return 1.0 / mean
        if how == "suv":
            if inputs.suv_factor is None or not inputs.suv_factor > 0:
                raise InvalidInputError(f"model {card.ref} was trained on SUV images and this series has no SUV "
                                        "factor (weight, dose, half-life or times missing)")
            return float(inputs.suv_factor)
        raise DenoiserError(f"model {card.ref}: unknown normalisation {card.normalisation!r} (mean, suv or none)")

    def _check_voxels(self, card: Any, spacing: tuple[float, float, float]) -> bool:
        """A network sees voxels, not millimetres: a series at another voxel size than its training is refused,
        or resampled when the rule allows it (True: resample)."""
        expected = card.expected_voxel_mm
        if expected is None:
            return False
        off = [abs(s - e) / e for s, e in zip(spacing, expected)]
        if max(off) > card.voxel_tolerance:
            if self.params.resample:
                return True
            raise InvalidInputError(
                f"model {card.ref} was trained on {expected[0]:g} x {expected[1]:g} x {expected[2]:g} mm voxels "
                f"(dz, dy, dx; tolerance {100 * card.voxel_tolerance:g} %); this series has {spacing[0]:g} x "
                f"{spacing[1]:g} x {spacing[2]:g} mm (a rule may allow `resample: true`)")
        return False

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        from denoisers.devices import resolve_device
        from denoisers.nets import level_feature
        from denoisers.nets.infer import apply_25d

        card = self._card()
        resample = self._check_voxels(card, inputs.spacing)
        device = resolve_device(self.device, self.device_need)
        t0 = time.perf_counter()
        net, spec = _load(card, Path(self.model.weights_path), device)
        scale = self._scale(card, inputs)
        pet = inputs.pet * np.float32(scale)
        if resample:
            pet = _resample(pet, inputs.spacing, card.expected_voxel_mm)
        # The count level of what the network sees (after any resampling, which changes the noise per voxel).
        noise = noise_index(pet)
        if spec.level_input and not math.isfinite(noise):
            raise InvalidInputError(f"model {card.ref} needs the series' count level, and it cannot be estimated "
                                    "(no activity in the body?)")
        out = apply_25d(net, spec, pet, batch=self.params.batch, device=device,
                        half_precision=self.params.half_precision,
                        level=level_feature(noise) if spec.level_input else None)
        if resample:
            out = _to_shape(out, inputs.pet.shape)
        out /= np.float32(scale)
        keep_fwhm = self.params.keep_means_scale(noise)
        keep_weight = self.params.keep_means_weight(noise) if keep_fwhm is not None else 0.0
        if keep_fwhm is not None and keep_weight > 0:
            give_back = _give_back_guided if self.params.keep_means_guided else _give_back
            back = give_back(out, inputs.pet, inputs.spacing, keep_fwhm)
            if keep_weight < 1:
                back *= np.float32(keep_weight)
            out += back
        np.maximum(out, 0.0, out=out)
        info_level: dict[str, Any] = {"noise_index": round(noise, 4), "dose_aware": spec.level_input}
        if keep_fwhm is not None:
            info_level["keep_means_fwhm_mm"] = round(keep_fwhm, 2)
            info_level["keep_means_weight"] = round(keep_weight, 3)
        trained = card.extra.get("noise_index_range")
        if trained and len(trained) == 2 and not (trained[0] / 1.5 <= noise <= trained[1] * 1.5):
            info_level["noise_index_note"] = (f"outside the trained {trained[0]:.3g}-{trained[1]:.3g}: the model "
                                              "may leave noise or smooth lesions")
            logger.warning("model %s: series noise index %.3g is outside the range it was trained on (%.3g-%.3g)",
                           card.ref, noise, trained[0], trained[1])
        total_in = float(np.sum(inputs.pet, dtype=np.float64))
        total_out = float(np.sum(out, dtype=np.float64))
        activity_scale = total_in / total_out if total_out > 0 and total_in > 0 else 1.0
        if activity_scale != 1.0:
            out *= np.float32(activity_scale)
        return DenoiseResult(denoised=out.astype(np.float32, copy=False), info={
            "model": card.ref, "architecture": card.architecture, "normalisation": card.normalisation,
            "activity_scale": round(activity_scale, 6), "device": device, **info_level,
            **({"resampled_to_mm": list(card.expected_voxel_mm)} if resample else {}),
            "seconds": round(time.perf_counter() - t0, 3)})

    @classmethod
    def example(cls, *, seed: int | None = None) -> Self:
        """A tiny untrained feature-oriented DCNN with its own card and weights in a temporary folder."""
        return cls(CNNParams(), seed=seed, model=_example_model(0 if seed is None else seed))


def _give_back(out: np.ndarray, pet: np.ndarray, spacing: tuple[float, float, float], fwhm_mm: float
               ) -> np.ndarray:
    """What to add to the network's ``out``: ``G * (pet - out)``, G a Gaussian of ``fwhm_mm``; with it the image
    is the network's below that scale and the measurement's above it. A network smooths grey matter into white
    matter and small nuclei into their surroundings (a few % of a region's mean at low counts); what it removed
    there is mostly that signal plus high-frequency noise, and the Gaussian gives back the first and little of the
    second."""
    return _blur(np.subtract(pet, out, dtype=np.float32), spacing, fwhm_mm)


def _blur(volume: np.ndarray, spacing: tuple[float, float, float], fwhm_mm: float) -> np.ndarray:
    """``volume`` filtered with the node's Gaussian of ``fwhm_mm`` (the keep-means give-backs)."""
    from denoisers.gaussian import GaussianDenoiser, GaussianParams

    return GaussianDenoiser(GaussianParams(fwhm_mm=float(fwhm_mm))).denoise(
        DenoiseInputs(pet=volume, spacing=spacing)).denoised


# Output-intensity levels of the guided give-back: 0, then a quarter of the body's median output times 1.5^k up
# to the maximum. Geometric, so each tissue (grey and white matter at 4:1, a lesion over its background) falls
# between its own two levels, and coarser than the output's own noise (levels as fine as quantiles of the body
# split one tissue by its leftover noise and gave that noise back). Measured on the held-out brain (docs).
GUIDE_RATIO = 1.5
# Voxel shares (local fraction of voxels at a level) are shrunk by this prior, so a level held by a few isolated
# voxels does not hand each its own noise back (that raised SUVmax by up to +190 % without it).
GUIDE_PRIOR = 0.01


def _give_back_guided(out: np.ndarray, pet: np.ndarray, spacing: tuple[float, float, float],
                      fwhm_mm: float) -> np.ndarray:
    """What to add to the network's ``out``: ``sum_k w_k (G * (w_k r)) / (G * w_k)``, what it removed
    (``r = pet - out``) averaged with a Gaussian of ``fwhm_mm`` among voxels of similar output intensity (a
    bilateral grid in the intensity axis with linear memberships ``w_k``, which sum to 1 in every voxel).

    The unguided :func:`_give_back` gives a voxel of grey matter the average of what was removed around it,
    white matter's included, and at low counts needs a small scale (much noise given back) to keep a region's
    mean. Here a region's voxels share their own regional error, averaged over more voxels at a larger scale:
    the network's regional bias comes back with less of the input's noise. The guide is the network's output,
    smooth, so noise spikes of the input do not get levels of their own.
    """
    guide = np.asarray(out, dtype=np.float32)
    removed = np.subtract(pet, out, dtype=np.float32)
    back = np.zeros_like(guide)
    body = guide > 0.05 * float(np.percentile(guide, 99.5)) if guide.size else guide > 0
    if not np.any(body):
        return back
    middle = float(np.median(guide[body]))
    count = int(np.ceil(np.log(max(float(guide.max()), middle) / (0.25 * middle)) / np.log(GUIDE_RATIO))) + 1
    levels = np.concatenate([[0.0], 0.25 * middle * GUIDE_RATIO ** np.arange(count)]).astype(np.float32)
    position = np.interp(guide, levels, np.arange(len(levels), dtype=np.float32)).astype(np.float32)
    below = np.minimum(np.floor(position), len(levels) - 1).astype(np.int16)
    frac = position - below
    for k in range(len(levels)):
        weight = np.where(below == k, 1.0 - frac, 0.0).astype(np.float32)
        weight += np.where(below == k - 1, frac, 0.0).astype(np.float32)
        if not np.any(weight):
            continue
        share = _blur(weight, spacing, fwhm_mm)
        mean_removed = np.divide(_blur(weight * removed, spacing, fwhm_mm), share + np.float32(GUIDE_PRIOR),
                                 out=np.zeros_like(share), where=share > 1e-4)
        back += weight * mean_removed
    return back


@functools.cache
def _example_model(seed: int) -> Any:
    """The example's model, written once per process and seed (not a new temporary folder per call)."""
    import torch

    from denoisers.models import ModelCard, ResolvedModel, sha256_file
    from denoisers.nets import build

    torch.manual_seed(seed)
    net_config = {"features": 4, "layers": 3}
    net, _ = build("fo-dcnn", net_config)
    folder = Path(tempfile.mkdtemp(prefix="petnode-cnn-example-"))
    weights = folder / "weights.pt"
    torch.save(net.state_dict(), weights)
    card = ModelCard(name="example-fo-dcnn", version="0.0.1", denoiser="cnn", architecture="fo-dcnn",
                     input_slices=3, normalisation="mean", expected_voxel_mm=(3.27, 4.0, 4.0),
                     created="2026-12-04T00:00:00Z", petnode_version="example", weights_file=weights.name,
                     sha256=sha256_file(weights), extra={"net": net_config})
    return ResolvedModel(name=card.name, version=card.version, card=card, weights_path=weights, pinned=True)
