"""Speed benchmarks of the denoisers against a reference measured in the same process (``petnode bench speed``).

``bench_nlm`` times our PyTorch NLM (``denoisers.nlm.nonlocal_means``) against scikit-image's ``denoise_nl_means``
in fast mode on the same volume (seeded, or a real series), with the same windows and the same absolute ``h`` in the
same units. scikit-image's loop is single-threaded Cython; ours runs on ``threads`` torch threads (by default every
CPU this process may use), so a plain ratio would credit ours with the extra cores. Each row therefore says how
many threads it used, and the ``_1t`` rows (ours on one thread) are the like-for-like comparisons.

Both loop over the search offsets, and skimage's fast mode weighs the patch uniformly and normalises each voxel's
weights to 1 (``normalisation="row"``), so ``ours_uniform`` is the apples-to-apples filter for the work done;
``ours_symmetric`` is the same windows and h with the activity-conserving normalisation (four passes over the
weights). ``node_nlm`` is what the node runs: ``NLMDenoiser`` with its default parameters through its public
``denoise`` (noise estimate, h = 1.25 sigma, 4 mm smoothed comparison image, symmetric filter), timed as a whole.
The values differ more than the filters suggest, because scikit-image's fast 3-D distance (checked
on 0.26 against a loop reference, to 0.3 % of the maximum) sums the squared differences over a box of
``(p - 1)**3`` voxels, at offsets ``-r + 1 .. r`` from the centre (its integral-image box is one voxel short and not
centred), and divides by ``p**3``; it also cuts weights below ``exp(-5)`` to 0 and approximates ``exp``.
``max_abs_diff_vs_skimage`` reports how far apart the results are.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training import TrainingError

logger = logging.getLogger(__name__)


def bench_volume(shape: tuple[int, int, int], seed: int = 0) -> npt.NDArray[np.float32]:
    """Return a seeded noisy PET-like volume in Bq/ml: an elliptic body, two cold lungs, hot spheres, Poisson noise.

    The noise level (about 20 % in the body) is that of a short clinical frame; values are counts times a
    calibration factor, so the noise is signal dependent as in PET.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    body = (y / 0.75) ** 2 + (x / 0.9) ** 2 < 1.0
    lungs = (((y + 0.05) / 0.4) ** 2 + ((np.abs(x) - 0.4) / 0.25) ** 2 < 1.0) & (np.abs(z) < 0.7)
    activity = np.where(body, 1.0, 0.02) - 0.7 * lungs
    spheres = ((0.3, 0.1, 0.2, 0.12, 6.0), (-0.4, -0.2, -0.3, 0.08, 4.0), (0.0, 0.3, 0.5, 0.05, 8.0))
    for cz, cy, cx, r, contrast in spheres:
        activity = activity + contrast * (((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) < r * r)
    counts = rng.poisson(25.0 * activity)
    return (counts * (5000.0 / 25.0)).astype(np.float32)  # 1.0 -> 5 kBq/ml, a typical FDG background


def _time(fn: Callable[[], npt.NDArray[np.float32]], repeats: int, label: str) -> tuple[list[float], Any]:
    """Run ``fn`` ``repeats`` times; return the wall times and the last result (tqdm progress when repeats > 1)."""
    runs: range | Any = range(repeats)
    if repeats > 1:
        from tqdm import tqdm

        runs = tqdm(runs, desc=label, unit="run", leave=False)
    times: list[float] = []
    result = None
    for _ in runs:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


SKIMAGE_THREADS = 1
"""scikit-image's ``denoise_nl_means`` runs one thread (a Cython loop, no OpenMP), whatever the machine has."""

# (label, gaussian patch weighting, normalisation, one thread): what ``bench_nlm`` times of ``nonlocal_means``.
_OURS: tuple[tuple[str, bool, str, bool], ...] = (
    ("ours_gaussian", True, "row", False),
    ("ours_uniform", False, "row", False),
    ("ours_uniform_1t", False, "row", True),
    ("ours_symmetric", False, "symmetric", False),
)

# (label, one thread): the node's NLM denoiser with its default parameters, through ``NLMDenoiser.denoise``.
_NODE: tuple[tuple[str, bool], ...] = (("node_nlm", False), ("node_nlm_1t", True))


def bench_nlm(
    shape: tuple[int, int, int] = (200, 192, 192),
    patch: int = 3,
    search: int = 5,
    repeats: int = 1,
    device: str = "cpu",
    include_skimage: bool = True,
    *,
    seed: int = 0,
    threads: int | None = None,
    chunk_slices: int | None = None,
    volume: npt.NDArray[np.float32] | None = None,
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    include_node: bool = True,
) -> dict[str, Any]:
    """Time our NLM (row normalisation with both patch weightings, on ``threads`` and on one thread, the symmetric
    filter, and the node's default NLM denoiser on ``threads`` and on one) and scikit-image's fast NLM
    (single-threaded) on one volume.

    Parameters
    ----------
    shape : tuple of int
        Volume (z, y, x) of the seeded phantom (``bench_volume``); ignored when ``volume`` is given.
    patch, search : int
        Odd window sizes in voxels (scikit-image: ``patch_size=patch``, ``patch_distance=search // 2``).
    repeats : int
        Runs per method; the best (minimum) time is the figure reported, the median is kept beside it.
    device : str
        Torch device for ours ("cpu", "cuda", "auto").
    include_skimage : bool
        Also time scikit-image (single-threaded; about 17 s on 200 x 192 x 192 with a 5^3 search here).
    seed : int
        Seed of the volume.
    threads : int or None
        torch intra-op threads for ours (restored afterwards); None: the CPUs this process may use.
        ``ours_uniform_1t`` always uses one.
    chunk_slices : int or None
        Slab size for ``nonlocal_means``; None: the device default (the node rows always use the node's).
    volume : ndarray, optional
        A (z, y, x) volume to time on instead of the phantom, e.g. a real series (``load_series``).
    spacing : tuple of float
        Voxel size in mm (z, y, x) for the node rows (its 4 mm comparison image is in mm).
    include_node : bool
        Also time the node's NLM denoiser (``node_nlm``, ``node_nlm_1t``).

    Returns
    -------
    dict
        ``shape``, ``patch``, ``search``, ``h``, ``device``, ``threads`` (torch threads of ours),
        ``skimage_threads`` (1), ``repeats``, ``cpu``, ``source`` ("phantom" or "volume"), ``spacing``; per method
        (``ours_gaussian``, ``ours_uniform``, ``ours_uniform_1t``, ``ours_symmetric``, ``node_nlm``,
        ``node_nlm_1t``, ``skimage``) ``<m>_s`` (best), ``<m>_median_s``, ``<m>_times_s``, ``<m>_per_slice_ms`` and
        ``<m>_threads``; ``node_info`` (the node denoiser's ``info``: its own h, slab, cached weights); when
        scikit-image ran, ``speedup_<m>`` (scikit-image time / ours) for each of ours, and
        ``max_abs_diff_vs_skimage`` (ours_uniform) with ``max_rel_diff_vs_skimage`` (over the volume's maximum) and
        ``max_abs_change_ours_uniform`` (how much the filter changed the volume: the scale the difference is small
        against).

    Raises
    ------
    TrainingError
        Bad sizes, or scikit-image requested but not installed.
    """
    import torch

    from denoisers.base import DenoiseInputs
    from denoisers.nlm import NLMDenoiser, NLMParams, estimate_image_std, nonlocal_means, resolve_device

    if patch < 1 or search < 1 or patch % 2 == 0 or search % 2 == 0:
        raise TrainingError(f"patch and search must be odd voxel counts >= 1, got {patch} and {search}")
    if repeats < 1:
        raise TrainingError(f"repeats must be >= 1, got {repeats}")
    denoise_nl_means: Callable[..., Any] | None = None
    if include_skimage:
        try:
            from skimage.restoration import denoise_nl_means
        except ImportError as exc:
            raise TrainingError(
                f"scikit-image is needed for the reference ({exc}); or pass include_skimage=False"
            ) from exc

    dev = resolve_device(device)
    vol = bench_volume(shape, seed) if volume is None else np.ascontiguousarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise TrainingError(f"expected a (z, y, x) volume, got shape {vol.shape}")
    shape = (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2]))
    h = estimate_image_std(vol)  # one absolute h for every run (the Gong 2018 choice), in the same units
    previous_threads = torch.get_num_threads()
    n_threads = threads if threads is not None else len(os.sched_getaffinity(0))
    result: dict[str, Any] = {
        "shape": list(shape),
        "patch": patch,
        "search": search,
        "h": h,
        "device": dev,
        "threads": n_threads,
        "skimage_threads": SKIMAGE_THREADS,
        "repeats": repeats,
        "cpu": platform.processor() or platform.machine(),
        "source": "phantom" if volume is None else "volume",
        "spacing": list(spacing),
    }
    outputs: dict[str, npt.NDArray[np.float32]] = {}
    try:
        for label, gaussian, normalisation, one_thread in _OURS:
            label_threads = 1 if one_thread else n_threads
            torch.set_num_threads(label_threads)

            def ours(gaussian: bool = gaussian, normalisation: Any = normalisation) -> npt.NDArray[np.float32]:
                return nonlocal_means(
                    vol,
                    h,
                    (patch,) * 3,
                    (search,) * 3,
                    gaussian_patch_weighting=gaussian,
                    normalisation=normalisation,
                    chunk_slices=chunk_slices,
                    device=dev,
                )

            times, outputs[label] = _time(ours, repeats, label)
            _record(result, label, times, shape[0], label_threads)
        if include_node:
            inputs = DenoiseInputs(pet=vol, spacing=spacing)
            for label, one_thread in _NODE:
                label_threads = 1 if one_thread else n_threads
                torch.set_num_threads(label_threads)
                info: dict[str, Any] = {}

                def node() -> npt.NDArray[np.float32]:
                    res = NLMDenoiser(NLMParams(), device=dev).denoise(inputs)
                    info.update(res.info)
                    return res.denoised

                times, outputs[label] = _time(node, repeats, label)
                _record(result, label, times, shape[0], label_threads)
                result["node_info"] = {k: info[k] for k in ("h", "h_factor", "guide_fwhm_mm", "chunk_slices",
                                                             "weight_cache_mb", "normalisation") if k in info}
    finally:
        torch.set_num_threads(previous_threads)

    if denoise_nl_means is not None:
        nl_means = denoise_nl_means

        def reference() -> npt.NDArray[np.float32]:
            return np.asarray(
                nl_means(
                    vol,
                    patch_size=patch,
                    patch_distance=search // 2,
                    h=h,
                    fast_mode=True,
                    channel_axis=None,
                    preserve_range=True,
                )
            )

        times, ref = _time(reference, repeats, "skimage")
        _record(result, "skimage", times, shape[0], SKIMAGE_THREADS)
        for label in _labels():
            if f"{label}_s" in result:
                result[f"speedup_{label}"] = result["skimage_s"] / result[f"{label}_s"]
        ours_uniform = outputs["ours_uniform"].astype(np.float64)
        diff = float(np.abs(ours_uniform - ref).max())
        result["max_abs_diff_vs_skimage"] = diff
        result["max_rel_diff_vs_skimage"] = diff / float(vol.max())
        result["max_abs_change_ours_uniform"] = float(np.abs(ours_uniform - vol).max())
    logger.info("bench_nlm %s", {k: v for k, v in result.items() if not k.endswith("_times_s")})
    return result


def _record(result: dict[str, Any], label: str, times: list[float], slices: int, threads: int) -> None:
    best = min(times)
    result[f"{label}_s"] = best
    result[f"{label}_median_s"] = statistics.median(times)
    result[f"{label}_times_s"] = times
    result[f"{label}_per_slice_ms"] = 1000.0 * best / slices
    result[f"{label}_threads"] = threads


def _labels() -> list[str]:
    """Every method ``bench_nlm`` may time of ours, in table order."""
    return [label for label, *_ in _OURS] + [label for label, _ in _NODE]


def format_nlm_table(result: dict[str, Any]) -> str:
    """Return ``bench_nlm``'s result as a small text table (threads, best time, median, per slice, speed-up)."""
    source = result.get("source", "phantom")
    head = (
        f"NLM {'x'.join(map(str, result['shape']))} ({source}), patch {result['patch']}, search {result['search']}, "
        f"h {result['h']:.4g}, {result['device']}, ours on {result['threads']} torch thread(s) unless marked _1t, "
        f"scikit-image on {result['skimage_threads']}, best of {result['repeats']}"
    )
    lines = [head, f"{'method':<17}{'threads':>8}{'best s':>9}{'median s':>10}{'ms/slice':>10}{'speed-up':>10}"]
    for label in _labels() + ["skimage"]:
        if f"{label}_s" not in result:
            continue
        key = f"speedup_{label}"
        ratio = f"{result[key]:.1f}x" if key in result else "1.0x" if label == "skimage" else "-"
        lines.append(
            f"{label:<17}{result[f'{label}_threads']:>8}{result[f'{label}_s']:>9.2f}"
            f"{result[f'{label}_median_s']:>10.2f}{result[f'{label}_per_slice_ms']:>10.1f}{ratio:>10}"
        )
    if "speedup_ours_uniform_1t" in result:
        lines.append(
            f"like for like (same filter, one thread each): ours_uniform_1t is "
            f"{result['speedup_ours_uniform_1t']:.1f}x scikit-image; ours_uniform's "
            f"{result['speedup_ours_uniform']:.1f}x also counts its {result['ours_uniform_threads']} threads"
        )
    if "speedup_node_nlm" in result:
        info = result.get("node_info", {})
        lines.append(
            f"the node's NLM (NLMDenoiser.denoise with its defaults: noise estimate, "
            f"h {info.get('h', float('nan')):.4g} = {info.get('h_factor', '?')} sigma, "
            f"{info.get('guide_fwhm_mm', '?')} mm comparison image, "
            f"{info.get('normalisation', '?')} filter, {info.get('chunk_slices', '?')}-slice slabs, "
            f"{info.get('weight_cache_mb', '?')} MiB of cached weights) is {result['speedup_node_nlm']:.1f}x "
            f"scikit-image on {result['node_nlm_threads']} threads and {result['speedup_node_nlm_1t']:.1f}x on one"
        )
    if "max_abs_diff_vs_skimage" in result:
        lines.append(
            f"max |ours_uniform - skimage| = {result['max_abs_diff_vs_skimage']:.4g} "
            f"({100 * result['max_rel_diff_vs_skimage']:.3g} % of the volume maximum; the filter itself changed "
            f"voxels by up to {result['max_abs_change_ours_uniform']:.4g})"
        )
    return "\n".join(lines)


def bench_methods(
    methods: list[str],
    shape: tuple[int, int, int] = (200, 192, 192),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    repeats: int = 1,
    devices: list[str] | None = None,
    *,
    seed: int = 0,
    models: Any = None,
) -> list[dict[str, Any]]:
    """Time each registered method with its default parameters, per volume and per slice, on each device.

    ``cnn:NAME[@VERSION]`` runs a model from ``models`` (a ``ModelStore``) on a volume at its card's voxel size
    (so the time is the network's, not a resampling's).

    Each row says how many CPU threads the method used (``threads``: 1 for the scipy-based CPU-only methods,
    torch's intra-op threads for the others). ``devices`` defaults to the CPU plus ``cuda:0`` when present
    (CPU-only methods are timed on the CPU only).
    """
    from denoisers import registry
    from denoisers.base import DeviceNeed, DenoiseInputs
    from denoisers.devices import cuda_count

    volume = bench_volume(shape, seed)
    inputs = DenoiseInputs(pet=volume, spacing=spacing)
    devices = devices or (["cpu", "cuda:0"] if cuda_count() else ["cpu"])
    rows: list[dict[str, Any]] = []
    for method in methods:
        name, _, ref = method.partition(":")
        model = None
        method_inputs = inputs
        if ref:
            if models is None:
                raise TrainingError(f"{method}: no model registry given")
            model = models.resolve(ref)
            voxel = model.card.expected_voxel_mm
            method_inputs = DenoiseInputs(pet=volume, spacing=tuple(voxel) if voxel else spacing)
        cls = registry.get_class(name)
        # CPU-only methods run scipy/numpy code on one thread; the others run torch on its intra-op threads.
        threads = 1 if cls.device_need is DeviceNeed.CPU else _torch_threads()
        for device in devices:
            if device != "cpu" and cls.device_need is DeviceNeed.CPU:
                continue
            denoiser = registry.create(name, {}, device=device, model=model)
            denoiser.denoise(method_inputs)  # warm-up: imports, kernels, CUDA context
            times, _ = _time(lambda d=denoiser, i=method_inputs: d.denoise(i).denoised, repeats,
                             f"{method} on {device}")
            rows.append({"method": method, "device": device, "shape": "x".join(map(str, shape)),
                         "threads": threads, "best_s": min(times), "median_s": statistics.median(times),
                         "per_slice_ms": 1000.0 * min(times) / shape[0], "repeats": repeats})
    return rows


def _torch_threads() -> int:
    """torch's intra-op threads (the CPU threads a torch method uses; on a GPU, those of its host side)."""
    import torch

    return int(torch.get_num_threads())


def load_series(directory: Path) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    """Read a PET series folder as the node does (``dicom_node.series.load_pet_series``): the (z, y, x) volume in
    its stored units (e.g. Bq/ml) and the spacing in mm."""
    from dicom_node.series import load_pet_series

    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise TrainingError(f"{str(directory)!r} holds no files")
    volume = load_pet_series(files)
    spacing = tuple(float(s) for s in volume.spacing)
    return np.asarray(volume.array, dtype=np.float32), (spacing[0], spacing[1], spacing[2])


def main(argv: list[str] | None = None) -> int:
    """``python -m training.bench_speed [--series DIR]``: the NLM table (``bench_nlm``) on a real series or the
    seeded phantom."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--series", type=Path, default=None, help="a PET series folder (default: the phantom)")
    parser.add_argument("--shape", default="200,192,192", help="phantom size z,y,x")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of ours (default: all CPUs)")
    parser.add_argument("--no-reference", action="store_true", help="skip scikit-image")
    args = parser.parse_args(argv)
    volume, spacing = (None, (2.0, 2.0, 2.0)) if args.series is None else load_series(args.series)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        parser.error(f"--shape {args.shape!r}: expected z,y,x")
    result = bench_nlm(
        (shape[0], shape[1], shape[2]), repeats=args.repeats, include_skimage=not args.no_reference,
        threads=args.threads, volume=volume, spacing=spacing,
    )
    print(format_nlm_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
