"""Offline training commands: ``petnode simulate brain|torso ...`` and ``petnode train ...``.

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
    p.add_argument("phantom", choices=["brain", "torso", "real"],
                   help="real: a real PET series (--series) as the activity, randomly transformed per seed")
    p.add_argument("--series", type=Path, default=None, metavar="DIR",
                   help="with real: the PET series folder (never the held-out ACRIN study)")
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
    p.add_argument("--noiseless", action="store_true",
                   help="also reconstruct the expected (noise-free) prompts of the full acquisition: a training "
                        "target without counting noise (petnode train --target noiseless)")
    p.add_argument("--dicom", action="store_true",
                   help="also write DICOM series (one study: a PET series per level and realization, and the prior)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    t = sub.add_parser(
        "train",
        help="train or fine-tune a cnn model (gong-resnet, xu-unet, fo-dcnn), or a BC-DPM diffusion model "
             "(train diffusion), and register it",
        description="Train a supervised denoiser on paired low/full-count volumes: simulated cases (petnode "
                    "simulate ... --out DIR) at one or more count levels, and/or real paired DICOM series "
                    "(--pair LOW_DIR FULL_DIR). Checkpoints every minute into --out; run the same command again "
                    "to continue a stopped run. --register NAME@VERSION adds the result to the model registry. "
                    "--fine-tune NAME[@VERSION] starts from a registered model and trains its last layers and "
                    "batch norms (Gong et al. 2018). `petnode train diffusion` trains BC-DPM's score network "
                    "(DDPM, epsilon objective) on the high-count images of --sim cases only (no pairs): --level "
                    "picks the reconstruction (default 1, the full counts), --steps the optimiser steps.",
    )
    t.add_argument("what", nargs="?", choices=["cnn", "diffusion"], default="cnn",
                   help="cnn (default): a supervised network; diffusion: BC-DPM's score network")
    t.add_argument("--arch", choices=["gong-resnet", "xu-unet", "fo-dcnn"], help="network (not with --fine-tune)")
    t.add_argument("--net", action="append", default=[], metavar="KEY=VALUE",
                   help="network setting, repeatable (e.g. features=32, depth=3, in_slices=5)")
    t.add_argument("--sim", type=Path, action="append", default=[], metavar="DIR", help="a simulated case")
    t.add_argument("--level", type=_levels, default=None, metavar="L1,L2,...",
                   help="input count levels of the simulated cases (default 0.1; diffusion: the high-count "
                        "level trained on, default 1)")
    t.add_argument("--pair", type=Path, nargs=2, action="append", default=[], metavar=("LOW_DIR", "FULL_DIR"),
                   help="a real paired reconstruction (two DICOM series folders), repeatable")
    t.add_argument("--pairs-csv", type=Path, action="append", default=[], metavar="FILE",
                   help="real pairs listed in a CSV: columns low,full[,split] (series folders relative to the CSV; "
                        "split train or val)")
    t.add_argument("--val-pair", type=Path, nargs=2, action="append", default=[], metavar=("LOW_DIR", "FULL_DIR"),
                   help="a real pair kept for validation, repeatable")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="real pairs without --val-pair or a CSV split: the last fraction of each pair's slices is "
                        "held out for validation (default 0.2; 0 for none)")
    t.add_argument("--val", type=Path, action="append", default=[], metavar="DIR",
                   help="a simulated case kept for validation (else the last realization of the last --sim)")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder (checkpoint, weights, curve)")
    t.add_argument("--loss", choices=["mse", "l1", "ssim", "ms-ssim", "lesion-mse", "lesion-mse+ssim",
                                      "lesion-mse+bg-ssim", "perceptual"],
                   default=None, help="default: the architecture's paper (gong: perceptual when --vgg is given else "
                                      "mse; xu: l1; fo: lesion-mse); lesion-mse+ssim adds --ssim-weight x (1 - SSIM), "
                                      "lesion-mse+bg-ssim the same with SSIM weighted off the lesions")
    t.add_argument("--ssim-weight", type=_positive_float, default=1.0,
                   help="with --loss lesion-mse+ssim or +bg-ssim: the weight of (1 - SSIM) (default 1)")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--batch", type=_positive_int, default=None, help="default 16 (diffusion 8)")
    t.add_argument("--lr", type=_positive_float, default=None, help="default 1e-3 (diffusion 1e-4, the paper's)")
    t.add_argument("--lr-schedule", choices=["step", "constant"], default="step",
                   help="step: the rate / 10 after 7/9 and after 8/9 of the epochs (default); constant")
    t.add_argument("--patch", type=_positive_int, default=None,
                   help="square training patch (pixels; default 64, diffusion 96)")
    t.add_argument("--normalise", choices=["mean", "suv", "none"], default="mean")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop (checkpointed) after this long; run again to continue")
    t.add_argument("--vgg", type=Path, default=None, metavar="FILE", help="VGG19 weights for the perceptual loss")
    t.add_argument("--vgg-sha256", default=None, help="their sha256 (checked)")
    t.add_argument("--fine-tune", default=None, metavar="NAME[@VERSION]", help="start from a registered model")
    t.add_argument("--last", type=_positive_int, default=1,
                   help="with --fine-tune: layers (gong-resnet: residual blocks) trained, plus every batch norm")
    t.add_argument("--register", default=None, metavar="NAME@VERSION", help="add the result to the registry")
    t.add_argument("--activate", action="store_true", help="with --register: make it the active version")
    t.add_argument("--tracer", action="append", default=[], help="tracer(s) the model is for (card), e.g. FDG")
    t.add_argument("--description", default=None, help="what the model is for (card), e.g. 'FDG brain, 2 mm'")
    t.add_argument("--data-dir", type=Path, default=None,
                   help="node data directory whose model registry --fine-tune and --register use")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = t.add_argument_group("diffusion (petnode train diffusion)")
    d.add_argument("--steps", type=_positive_int, default=20_000, help="optimiser steps (default 20000)")
    t.add_argument("--target", choices=["recon", "noiseless", "truth"], default="recon",
                   help="what the network learns to give (--sim cases): cnn: the full-count reconstruction of the "
                        "same acquisition (recon, default: what real pairs offer), the reconstruction of the "
                        "expected prompts (noiseless: the same image without its own noise; simulate --noiseless) "
                        "or the noise-free activity (truth: denoising and the scanner's blur); diffusion: the "
                        "high-count images at --level (recon), the noise-free reconstruction or the truth")
    d.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    d.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights (default 0.999)")
    d.add_argument("--focus-t", type=_positive_int, default=None,
                   help="with --focus-fraction: draw that fraction of the timesteps below this step")
    d.add_argument("--focus-fraction", type=float, default=0.0)
    d.add_argument("--validate-every", type=_positive_int, default=500, help="steps between validations")
    t.set_defaults(func=cmd_train)


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
        if args.phantom == "real":
            from training.real_phantom import real_pet_phantom

            if args.series is None:
                print("petnode simulate real: give --series DIR (a PET series used as the activity map)",
                      file=sys.stderr)
                return 1
            phantom = real_pet_phantom(args.series, **params["phantom"], seed=args.seed)
        else:
            make = brain_phantom if args.phantom == "brain" else torso_phantom
            phantom = make(**params["phantom"], seed=args.seed)
        t_phantom = time.perf_counter() - t0
        case = simulate_case(phantom, count_levels=args.count_levels, realizations=args.realizations,
                             seed=args.seed, subsets=args.subsets, post_filter_fwhm_mm=args.post_filter_fwhm_mm,
                             noiseless=args.noiseless, device=args.device, threads=args.threads,
                             progress=not args.no_progress, **sim)
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


_PAPER_LOSS = {"gong-resnet": "mse", "xu-unet": "l1", "fo-dcnn": "lesion-mse"}


def cmd_train(args: argparse.Namespace) -> int:
    if args.what == "diffusion":
        return cmd_train_diffusion(args)
    args.level = args.level or (0.1,)
    args.batch = args.batch or 16
    args.lr = args.lr or 1e-3
    args.patch = args.patch or 64
    from denoisers.errors import DenoiserError
    from denoisers.models import load_weights, parse_ref
    from dicom_node.cli.model_commands import open_store
    from dicom_node.cli.tool_commands import parse_key_values
    from dicom_node.settings import load_settings
    from training import TrainingError
    from training.datasets import from_dicom_pair, from_simulation, read_pairs_csv, split_slices
    from training.simulate import load_case
    from training.train import TrainConfig, train

    try:
        store = None
        if args.fine_tune or args.register:
            store = open_store(load_settings(args.config, data_dir=args.data_dir), quiet=True)
        init = None
        net = parse_key_values(args.net, "--net")
        arch = args.arch
        if args.fine_tune:
            assert store is not None
            base = store.resolve(args.fine_tune)
            if arch and arch != base.card.architecture:
                raise TrainingError(f"--arch {arch} differs from {base.ref}'s {base.card.architecture}")
            arch, net = base.card.architecture, dict(base.card.extra.get("net") or {})
            init = load_weights(base.weights_path, expected_sha256=base.card.sha256)
        if not arch:
            raise TrainingError("give --arch (gong-resnet, xu-unet or fo-dcnn) or --fine-tune NAME")
        train_set, val_set = [], []
        target = {"recon": "full", "noiseless": "noiseless", "truth": "truth"}[args.target]
        for directory in args.sim:
            case = load_case(directory)
            ks = list(range(case.realizations))
            held = ks[-1:] if not args.val and directory == args.sim[-1] and len(ks) > 1 else []
            for level in args.level:
                train_set += from_simulation(directory, level, target=target,
                                             realizations=[k for k in ks if k not in held])
                val_set += from_simulation(directory, level, target=target, realizations=held) if held else []
        for directory in args.val:
            for level in args.level:
                val_set += from_simulation(directory, level, target=target)
        real = [(low, full, "train") for low, full in args.pair]
        real += [(low, full, "val") for low, full in args.val_pair]
        for csv_file in args.pairs_csv:
            real += read_pairs_csv(csv_file)
        real_train = [from_dicom_pair(low, full) for low, full, split in real if split == "train"]
        real_val = [from_dicom_pair(low, full) for low, full, split in real if split == "val"]
        if real_train and not real_val and args.val_fraction > 0:
            for pair in real_train:  # a contiguous block of each pair's slices becomes the validation set
                kept, held = split_slices(pair, args.val_fraction)
                train_set.append(kept)
                val_set.append(held)
        else:
            train_set += real_train
            val_set += real_val
        if not train_set:
            raise TrainingError("no training data: give --sim DIR (petnode simulate ...) and/or --pair LOW FULL "
                                "or --pairs-csv FILE")
        config = TrainConfig(
            architecture=arch, net=net, loss=args.loss or ("perceptual" if arch == "gong-resnet" and args.vgg
                                                           else _PAPER_LOSS[arch]),
            epochs=args.epochs, batch_size=args.batch, learning_rate=args.lr,
            optimizer="rmsprop" if arch == "xu-unet" else "adam", patch=args.patch, normalise=args.normalise,
            seed=args.seed, device=args.device, fine_tune_last=args.last if args.fine_tune else None,
            lr_schedule=args.lr_schedule, ssim_weight=args.ssim_weight,
            vgg_weights=str(args.vgg) if args.vgg else None, vgg_sha256=args.vgg_sha256)
        levels = ", ".join(f"{level:g}" for level in args.level)
        described = (f"{len(train_set)} pair(s): simulated {', '.join(str(d) for d in args.sim) or '-'} at count "
                     f"level(s) {levels}"
                     + ({"truth": ", target the noise-free activity",
                         "noiseless": ", target the noise-free reconstruction (expected prompts)",
                         "full": ", target the full-count reconstruction"}[target] if args.sim else "")
                     + f"; real pairs {len(real)}"
                     + (f"; fine-tuned from {args.fine_tune}" if args.fine_tune else ""))
        result = train(config, train_set, val_set, args.out, init_from=init, progress=not args.no_progress,
                       max_seconds=args.max_minutes * 60 if args.max_minutes else None, description=described)
    except (TrainingError, DenoiserError, OSError) as exc:
        print(f"petnode train: {exc}", file=sys.stderr)
        return 1
    if not result.finished:
        print(f"stopped after {args.max_minutes:g} min with a checkpoint in {args.out}; run the same command to "
              "continue")
        return 0
    last = result.history[-1] if result.history else {}
    print(f"trained {config.architecture} {config.net or ''} for {config.epochs} epoch(s), loss {config.loss}: "
          + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "epoch"))
    print(f"weights {result.weights}; loss curve {args.out / 'loss.png'}")
    if args.register:
        name, version = parse_ref(args.register)
        if version is None:
            print("petnode train: --register needs NAME@VERSION", file=sys.stderr)
            return 1
        trained = (result.card.get("extra") or {}).get("noise_index_range")
        level_parts = ["dose-aware"] if (config.net or {}).get("level_input") else []
        if trained:
            level_parts.append(f"noise index {trained[0]:g}-{trained[1]:g}")
        if args.sim:
            level_parts.append(f"trained at {levels} of the simulated full counts")
        if real:
            level_parts.append(f"{len(real)} real pair(s)")
        return _register(store, result, args, name, version, "; ".join(level_parts), "petnode train")
    return 0


def _register(store: Any, result: Any, args: argparse.Namespace, name: str, version: str, count_level: str,
              prog: str) -> int:
    """Add a finished training run to the registry with its card (tracers, count level and description from the
    command line); 0 when done, 1 (with the reason on stderr) when the registry refuses it."""
    from denoisers.errors import DenoiserError

    card = {k: v for k, v in result.card.items() if v is not None}
    if args.tracer:
        card["tracers"] = list(args.tracer)
    card["count_level"] = count_level
    if args.description:
        card["description"] = args.description
    assert store is not None
    try:
        store.add(result.weights, card, name=name, version=version, activate=args.activate)
    except DenoiserError as exc:
        print(f"{prog}: cannot register {args.register}: {exc}", file=sys.stderr)
        return 1
    print(f"registered {name}@{version}" + (" (active)" if args.activate else
                                             f"; activate with `petnode models activate {name}@{version}`"))
    return 0


def cmd_train_diffusion(args: argparse.Namespace) -> int:
    """``petnode train diffusion``: BC-DPM's score network on high-count images (see ``training.diffusion``)."""
    from denoisers.errors import DenoiserError
    from denoisers.models import parse_ref
    from dicom_node.cli.model_commands import open_store
    from dicom_node.cli.tool_commands import parse_key_values
    from dicom_node.errors import DicomNodeError
    from dicom_node.settings import load_settings
    from training import TrainingError
    from training.diffusion import DEFAULT_NET, DiffusionConfig, load_high_count, train_diffusion

    unused = [flag for flag, value in (("--arch", args.arch), ("--fine-tune", args.fine_tune),
                                       ("--pair", args.pair), ("--pairs-csv", args.pairs_csv),
                                       ("--val-pair", args.val_pair), ("--loss", args.loss), ("--vgg", args.vgg))
              if value]
    if unused:
        print(f"petnode train diffusion: {', '.join(unused)} do not apply (the score network is trained on "
              "high-count images alone, with the epsilon objective)", file=sys.stderr)
        return 2
    try:
        if args.register and parse_ref(args.register)[1] is None:
            raise TrainingError("--register needs NAME@VERSION")
        store = open_store(load_settings(args.config, data_dir=args.data_dir), quiet=True) if args.register else None
        levels = args.level or (1.0,)
        if len(levels) != 1:
            raise TrainingError("give one --level: the high-count reconstruction to learn from")
        if not args.sim:
            raise TrainingError("no training data: give --sim DIR (petnode simulate ... --out DIR)")
        train_set = [v for d in args.sim for v in load_high_count(d, target=args.target, level=levels[0])]
        val_set = [v for d in args.val for v in load_high_count(d, target=args.target, level=levels[0])]
        net = {**DEFAULT_NET, **parse_key_values(args.net, "--net")}
        if isinstance(net.get("mults"), str):
            net["mults"] = [int(m) for m in str(net["mults"]).replace("-", ",").split(",") if m]
        config = DiffusionConfig(net=net, steps=args.steps, batch_size=args.batch or 8, patch=args.patch or 96,
                                 learning_rate=args.lr or 1e-4, weight_decay=args.weight_decay, ema_decay=args.ema,
                                 focus_t=args.focus_t, focus_fraction=args.focus_fraction, seed=args.seed,
                                 device=args.device, validate_every=args.validate_every)
        what = {"truth": "truth", "noiseless": "noise-free reconstructions"}.get(
            args.target, f"reconstructions at count level {levels[0]:g}")
        described = (f"{len(train_set)} high-count volume(s), {what}: simulated "
                     f"{', '.join(str(d) for d in args.sim)}; validation {', '.join(str(d) for d in args.val) or '-'}")
        result = train_diffusion(config, train_set, val_set, args.out, progress=not args.no_progress,
                                 max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                                 description=described)
    except (TrainingError, DenoiserError, DicomNodeError, OSError, ValueError) as exc:
        print(f"petnode train diffusion: {exc}", file=sys.stderr)
        return 1
    if not result.finished:
        print(f"stopped after {args.max_minutes:g} min with a checkpoint in {args.out}; run the same command to "
              "continue")
        return 0
    last = result.history[-1] if result.history else {}
    print(f"trained the score network {config.net} for {config.steps} step(s): "
          + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"))
    print(f"weights (EMA) {result.weights}; loss curve {args.out / 'loss.png'}")
    if args.register:
        name, version = parse_ref(args.register)
        return _register(store, result, args, name, str(version),
                         "any (one model for every count level: the count level steers the sampler)",
                         "petnode train diffusion")
    return 0
