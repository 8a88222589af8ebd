"""Offline training-data commands: ``petnode simulate brain|torso ...``.

``training`` (and torch) are imported inside the command functions only: ``petnode --help`` and the node's own
commands never load them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _levels(text: str) -> tuple[float, ...]:
    from training.simulate import parse_levels

    try:
        return parse_levels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def add_subparsers(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate low/full-count PET of a phantom (2-D physics, ML-EM) and save arrays (and DICOM)",
        description="Simulate a brain or torso phantom at several count levels: one full-count acquisition per "
                    "realization, lower levels by binomial thinning of it, ML-EM/OSEM with attenuation, PSF, "
                    "scatter and randoms modelled. Writes truth/recon .npy files and meta.json (and DICOM series "
                    "with --dicom) to --out.",
    )
    p.add_argument("phantom", choices=["brain", "torso"])
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--count-levels", type=_levels, default=(1.0, 0.1), metavar="L1,L2,...",
                   help="fractions of the full counts in (0, 1], e.g. 1,0.1,0.02 (default 1,0.1)")
    p.add_argument("--realizations", type=_positive_int, default=1, help="independent full-count acquisitions")
    p.add_argument("--size", choices=["ci", "full"], default="ci",
                   help="preset grid and counts: ci (24x64x64, seconds) or full (2 mm brain, 4 mm whole trunk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=_positive_int, default=None, help="ML-EM/OSEM iterations (preset: 100)")
    p.add_argument("--subsets", type=_positive_int, default=1, help="OSEM subsets (1 = ML-EM)")
    p.add_argument("--full-counts", type=_positive_float, default=None,
                   help="expected prompts of the full-count acquisition in the volume (preset by size)")
    p.add_argument("--psf-fwhm-mm", type=float, default=None, help="PSF FWHM in mm, 0 for none (preset by phantom)")
    p.add_argument("--post-filter-fwhm-mm", type=_positive_float, default=None,
                   help="Gaussian post-filter of each reconstruction (default none)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default torch's; 1 is steadier on a machine shared with other jobs)")
    p.add_argument("--dicom", action="store_true",
                   help="also write DICOM series (one study: a PET series per level and realization, and the prior)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from denoisers.errors import DenoiserError
    from training import TrainingError
    from training.phantoms import brain_phantom, torso_phantom
    from training.simulate import format_level, preset, save_case, simulate_case

    params = preset(args.phantom, args.size)
    sim: dict[str, Any] = dict(params["simulation"])
    if args.iterations is not None:
        sim["iterations"] = args.iterations
    if args.full_counts is not None:
        sim["full_counts"] = args.full_counts
    if args.psf_fwhm_mm is not None:
        sim["psf_fwhm_mm"] = args.psf_fwhm_mm or None
    t0 = time.perf_counter()
    try:
        make = brain_phantom if args.phantom == "brain" else torso_phantom
        phantom = make(**params["phantom"], seed=args.seed)
        t_phantom = time.perf_counter() - t0
        case = simulate_case(phantom, count_levels=args.count_levels, realizations=args.realizations,
                             seed=args.seed, subsets=args.subsets, post_filter_fwhm_mm=args.post_filter_fwhm_mm,
                             device=args.device, threads=args.threads, progress=not args.no_progress, **sim)
        out = save_case(case, args.out, dicom=args.dicom)
    except (TrainingError, DenoiserError) as exc:
        print(f"petnode simulate: {exc}", file=sys.stderr)
        return 1
    meta = case.meta
    p = meta["parameters"]
    shape = "x".join(str(v) for v in meta["shape"])
    spacing = "x".join(f"{v:g}" for v in meta["spacing"])
    print(f"{args.phantom} phantom {shape} voxels of {spacing} mm ({args.size}), seed {args.seed}, "
          f"{p['algorithm']} {p['iterations']} iterations, PSF {p['psf_fwhm_mm'] or 0:g} mm, "
          f"sinogram {p['angles']} angles x {p['radial_bins']} bins, device {p['device']}")
    print(f"{'level':>8} {'r':>3} {'prompts':>14} {'expected':>14}")
    for level in case.levels:
        name = format_level(level)
        for k, c in enumerate(meta["counts"][name]):
            print(f"{name:>8} {k:>3} {c['prompts']:>14,.0f} {c['expected_prompts']:>14,.0f}")
    t = meta["timings_s"]
    print(f"phantom {t_phantom:.1f} s, simulation {t['simulate_s']:.1f} s, reconstruction {t['reconstruct_s']:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s")
    print(f"saved to {out}")
    if args.dicom:
        saved = json.loads((out / "meta.json").read_text())
        series = saved.get("dicom", {}).get("series", {})
        print(f"DICOM: {len(series)} series in one study under {out / 'dicom'} ({', '.join(series)})")
    return 0
