"""Commands that do not need a running node: ``echo``, ``send``, ``rules test``, ``denoise``."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError, DicomNodeError

_ADDRESS_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def parse_address(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae, host, port); a clear usage error otherwise."""
    m = _ADDRESS_RE.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
    return m["ae"], m["host"], int(m["port"])


def add_subparsers(sub: Any) -> None:
    p = sub.add_parser("echo", help="C-ECHO a peer: petnode echo AE@HOST:PORT")
    p.add_argument("address", type=parse_address, metavar="AE@HOST:PORT")
    p.add_argument("--calling-ae", default="PETNODE")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--to", type=parse_address, required=True, metavar="AE@HOST:PORT")
    p.add_argument("--calling-ae", default="PETNODE")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("rules", help="rules tools")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    rsub.required = True
    q = rsub.add_parser("test", help="which rule matches a DICOM file or series folder, and why the others do not")
    q.add_argument("path", type=Path, metavar="FILE_OR_DIR")
    q.add_argument("--rules", type=Path, default=None, help="rules YAML (default: the node's)")
    q.add_argument("--calling-ae", default=None, help="pretend the series came from this AE")
    q.add_argument("--called-ae", default=None, help="pretend it was sent to this AE (default: the node's)")
    q.add_argument("--data-dir", type=Path, default=None,
                   help="node data directory (its model registry, for rules that name a model)")
    q.set_defaults(func=cmd_rules_test)

    p = sub.add_parser("denoise", help="offline: denoise a PET series folder into a derived series folder")
    p.add_argument("in_dir", type=Path, metavar="IN_DIR")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--method", default="gaussian", help="denoiser name (petnode denoisers list)")
    p.add_argument("--fwhm-mm", type=float, default=None, help="gaussian FWHM in mm")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser parameter (repeatable; VALUE is read as YAML, e.g. 4.0 or true)")
    p.add_argument("--suffix", default=None, help="SeriesDescription suffix (default: ' [petnode METHOD]')")
    p.add_argument("--series-number-offset", type=int, default=1000)
    p.add_argument("--refuse-non-quantitative", action="store_true",
                   help="fail instead of processing a series that is not in BQML with SUV attributes")
    p.add_argument("--model", default=None, metavar="NAME[@VERSION]",
                   help="registered model (--method cnn), from the node's registry (--data-dir or -c)")
    p.add_argument("--data-dir", type=Path, default=None, help="node data directory holding the model registry")
    p.add_argument("--prior", type=Path, default=None, metavar="PRIOR_DIR",
                   help="MR or CT series folder: the anatomical prior of methods that need one (cdip); put on the "
                        "PET grid by its DICOM geometry (same Frame of Reference) or by rigid registration")
    p.add_argument("--registration", choices=["auto", "always", "never"], default="auto",
                   help="with --prior: auto registers only a prior in another Frame of Reference (default)")
    p.add_argument("--maps", default="sc,pm", metavar="FORMATS",
                   help="DICOM forms of the method's maps: sc (Secondary Capture), pm (Parametric Map), both "
                        "(default sc,pm) or none. A method with maps writes every series in its own folder: "
                        "OUT_DIR/pet and OUT_DIR/<map>/<form>")
    p.add_argument("--write-processes", type=int, default=2, metavar="N",
                   help="forked processes writing the derived series (default 2; 1 writes in this process)")
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("denoisers", help="denoiser plugins")
    dsub = p.add_subparsers(dest="denoisers_command", metavar="ACTION")
    dsub.required = True
    q = dsub.add_parser("list", help="each denoiser: parameters, what it requires and produces, availability here")
    q.set_defaults(func=cmd_denoisers_list)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bsub.required = True
    q = bsub.add_parser("receive", help="receive rate beside DCMTK storescp (same series, same run) and the "
                                        "latency from last instance received to last derived instance delivered")
    q.add_argument("series_dir", type=Path, metavar="SERIES_DIR")
    q.add_argument("--repeats", type=int, default=3, help="rounds of the commands and of the concurrent senders")
    q.add_argument("--pairs", type=int, default=5,
                   help="rounds of the rows whose reference runs in the same round (one association, latency, NLM)")
    q.set_defaults(func=cmd_bench_receive)
    q = bsub.add_parser("speed", help="time each method per volume and per slice (CPU, and CUDA when present); "
                                      "NLM against scikit-image in the same run")
    q.add_argument("--methods", default="gaussian,nlm",
                   help="comma-separated denoiser names; cnn:NAME[@VERSION] = a registered model (at its card's "
                        "voxel size)")
    q.add_argument("--data-dir", type=Path, default=None, help="node data directory whose models cnn:NAME uses")
    q.add_argument("--shape", default="200,192,192", help="volume size z,y,x")
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--no-reference", action="store_true", help="skip the scikit-image NLM reference")
    q.add_argument("--out", type=Path, default=None, help="write speed.csv here")
    q.set_defaults(func=cmd_bench_speed)
    q = bsub.add_parser("quality", help="the papers' image-quality evaluation on held-out simulated phantoms: "
                                        "smoothing sweeps, CRC/STD, PSNR/SSIM/NRMSE, SUV bias; markdown, CSV, PNG")
    q.add_argument("--phantom", choices=["brain", "torso", "real"], default="brain",
                   help="real: a PET series as the activity (--series), e.g. the held-out ACRIN study")
    q.add_argument("--series", type=Path, default=None, metavar="DIR", help="with --phantom real: the PET series")
    q.add_argument("--count-levels", default="0.5,0.1,0.02", help="fractions of full counts, e.g. 0.5,0.1,0.02")
    q.add_argument("--counts-per-slice", default=None, metavar="C1,C2,...",
                   help="instead of --count-levels: counts per slice, e.g. 1e6,3e5,1e5 (BC-DPM's levels)")
    q.add_argument("--slab", type=int, default=None,
                   help="score only this many central slices (through the first hot structure): minutes, not "
                        "hours, for cdip and bcdpm on a CPU")
    q.add_argument("--methods", default="gaussian,nlm,mlem",
                   help="comma-separated (mlem = ML-EM iterations; cnn:NAME[@VERSION] = a registered model; "
                        "cnn-keepN:NAME = the same with the input's local means kept above N mm, cnn-gkeepN:NAME "
                        "the same among voxels of similar intensity (keep_means_guided); "
                        "bcdpm:NAME (10 DDIM steps), bcdpm-ddpm:NAME (20 DDPM steps), bcdpm-paper:NAME (white "
                        "noise, 100 steps) = a diffusion model; cdip = conditional DIP with the case's MR prior)")
    q.add_argument("--data-dir", type=Path, default=None, help="node data directory whose models cnn:NAME uses")
    q.add_argument("--realizations", type=int, default=3)
    q.add_argument("--size", choices=["ci", "full"], default="ci")
    q.add_argument("--out", type=Path, default=Path("reports/quality"), help="report folder")
    q.add_argument("--simulation-cache", type=Path, default=None, metavar="DIR",
                   help="keep the simulated case here and reuse it when the phantom, levels, realizations and "
                        "simulation code are the same (the full torso takes half an hour to simulate on 2 cores)")
    q.set_defaults(func=cmd_bench_quality)
    q = bsub.add_parser("dip", help="the conditional-DIP paper's evaluation on a held-out brain with its MR prior: "
                                    "peak-to-valley vs white-matter STD (Gaussian, conditional DIP, stability "
                                    "blend), ROI SUV bias, a PET-only lesion, PSNR/SSIM beside a CNN, time")
    q.add_argument("--doses", default="0.1,0.2,0.5,1", help="fractions of a clinical full dose (1 M counts/slice)")
    q.add_argument("--size", choices=["ci", "full"], default="full")
    q.add_argument("--slab", type=int, default=40, help="slices through the deep nuclei every method sees")
    q.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="cdip parameter (repeatable)")
    q.add_argument("--cnn", default=None, metavar="NAME[@VERSION]", help="also a registered CNN (e.g. fdg-brain-xu)")
    q.add_argument("--data-dir", type=Path, default=None, help="node data directory whose models --cnn uses")
    q.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    q.add_argument("--out", type=Path, default=Path("reports/dip"), help="report folder")
    q.set_defaults(func=cmd_bench_dip)

    p = sub.add_parser("demo", help="simulate a patient, run it through a node on free ports into a sink, and "
                                    "write a comparison panel")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--phantom", choices=["torso", "brain"], default="torso")
    p.add_argument("--count-level", type=float, default=0.25)
    p.add_argument("--fwhm-mm", type=float, default=8.0)
    p.set_defaults(func=cmd_demo)


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files given, and every file below folders given (sorted; hidden files skipped)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            out.append(path)
        else:
            raise DicomNodeError(f"{str(path)!r} does not exist")
    return out


def peer_tls_args(args: argparse.Namespace, ae: str, host: str, port: int) -> Any:
    """TLS when the address is a peer with ``tls`` in the node settings given with -c (None otherwise)."""
    if args.config is None:
        return None
    from dicom_node import tls
    from dicom_node.settings import load_settings

    peer = tls.peer_at(load_settings(args.config), ae, host, port)
    return tls.tls_args(peer) if peer is not None else None


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node import scu

    ae, host, port = args.address
    t0 = time.perf_counter()
    problem = scu.echo(ae, host, port, calling_ae=args.calling_ae, timeout_s=args.timeout,
                       tls_args=peer_tls_args(args, ae, host, port))
    if problem:
        print(f"C-ECHO {ae}@{host}:{port} failed: {problem}", file=sys.stderr)
        return 1
    print(f"C-ECHO {ae}@{host}:{port} ok ({1000 * (time.perf_counter() - t0):.0f} ms)")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node import scu

    ae, host, port = args.to
    files = dicom_files(args.paths)
    t0 = time.perf_counter()
    report = scu.send_files(files, ae, host, port, calling_ae=args.calling_ae, timeout_s=args.timeout,
                            tls_args=peer_tls_args(args, ae, host, port))
    elapsed = time.perf_counter() - t0
    print(f"C-STORE to {ae}@{host}:{port}: {report.summary()} in {elapsed:.2f} s"
          f" ({report.sent / elapsed if elapsed > 0 else 0:.0f} instances/s)")
    for name, why in list(report.failures.items())[:20]:
        print(f"  {name}: {why}", file=sys.stderr)
    return 0 if report.ok else 1


def _first_dicom(path: Path) -> tuple[Any, int]:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    files = dicom_files([path])
    series: dict[str, Any] = {}
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), [ds, 0])[1] += 1
    if not series:
        raise DicomNodeError(f"no DICOM file found in {str(path)!r}")
    if len(series) > 1:
        print(f"note: {len(series)} series in {path}; testing the first one "
              f"({next(iter(series))})", file=sys.stderr)
    ds, count = next(iter(series.values()))
    return ds, count


def cmd_rules_test(args: argparse.Namespace) -> int:
    from dicom_node.cli.node_commands import load_node_config
    from dicom_node.pipeline import delivery_plan
    from dicom_node.rules import MatchContext, attribute_values, explain, is_own_output, select_rule

    settings, ruleset = load_node_config(args, **({"data_dir": args.data_dir} if args.data_dir else {}))
    ds, count = _first_dicom(args.path)
    ctx = MatchContext(ds, calling_ae=args.calling_ae, called_ae=args.called_ae or settings.ae_title)
    print(f"series {ds.get('SeriesInstanceUID', '?')} ({count} instance(s)); calling AE "
          f"{ctx.calling_ae or '(not given)'}, called AE {ctx.called_ae}")
    print("\nattributes the rules use:")
    for key, value in attribute_values(ctx, ruleset).items():
        print(f"  {key:<44} {value}")
    print("\nrules:")
    for ex in explain(ruleset, ctx):
        mark = "MATCH" if ex.matched else "no"
        print(f"  [{mark:>5}] {ex.rule}")
        for reason in ex.reasons:
            print(f"          - {reason}")
    rule = select_rule(ruleset, ctx)
    if rule is None:
        why = ("petnode's own output: never routed again" if is_own_output(ds)
               else "no rule matches: not processed, not forwarded")
        print(f"\nresult: {why}")
        return 0
    print(f"\nresult: rule {rule.name!r} applies: {rule.action}")
    if rule.denoiser is not None and rule.denoiser.model and args.path.is_dir():
        _model_for_series(args.path, rule, settings)
    print("what would be sent, per destination:")
    for line in delivery_plan(rule, settings, ctx.calling_ae):
        print(f"  {line}")
    return 0


def _model_for_series(folder: Path, rule: Any, settings: Any) -> None:
    """For a rule that names a model: the model this series would get, whether its card fits, and the series'
    count level estimated from its images (as the cnn plugin records it)."""
    from dicom_node.cli.model_commands import open_store
    from dicom_node.pipeline import Plan, resolve_model
    from dicom_node.series import SeriesError, load_pet_series

    try:
        volume = load_pet_series(dicom_files([folder]))
    except SeriesError as exc:
        print(f"model: not checked, the folder is not one PET series ({exc})")
        return
    try:
        resolved = resolve_model(volume, Plan.from_rule(rule), open_store(settings, quiet=True))
    except Exception as exc:  # noqa: BLE001 - DicomNodeError, WeightsError, card problems: say why
        print(f"model: {rule.denoiser.model} cannot process this series: {exc}")
        return
    line = f"model: {resolved.ref} ({resolved.card.architecture or resolved.card.denoiser}); its card fits"
    if rule.denoiser.name == "cnn":
        from denoisers.cnn import noise_index

        trained = resolved.card.extra.get("noise_index_range")
        line += (f"; series noise index {noise_index(volume.array):.3g}"
                 + (f" (trained on {trained[0]:.3g}-{trained[1]:.3g})" if trained else ""))
    print(line)


def parse_key_values(items: list[str], option: str = "--param") -> dict[str, Any]:
    """``KEY=VALUE`` options (repeatable) as a dict; VALUE is read as YAML (4.0, true, a word)."""
    if not items:
        return {}
    import yaml  # here, not at the top: most commands never parse a parameter

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        params[key.strip()] = yaml.safe_load(value)
    return params


def cmd_denoise(args: argparse.Namespace) -> int:
    from denoisers import registry
    from denoisers.errors import DenoiserError
    from dicom_node.pipeline import Plan, process_series

    if args.write_processes < 1:
        raise ConfigError(f"--write-processes must be at least 1, not {args.write_processes}")
    params = parse_key_values(args.param)
    if args.fwhm_mm is not None:
        params["fwhm_mm"] = args.fwhm_mm
    try:
        registry.validate_params(args.method, params)
    except DenoiserError as exc:
        raise ConfigError(f"--method {args.method}: {exc}") from None
    plan = Plan(route="offline", denoiser=args.method, params=params,
                non_quantitative="refuse" if args.refuse_non_quantitative else "process",
                series_description_suffix=args.suffix if args.suffix is not None else f" [petnode {args.method}]",
                series_number_offset=args.series_number_offset, model=args.model,
                write_processes=args.write_processes)
    store = None
    if args.model:
        from dicom_node.cli.model_commands import open_store
        from dicom_node.settings import load_settings

        store = open_store(load_settings(args.config, data_dir=args.data_dir), quiet=True)
    formats = [] if args.maps.strip().lower() == "none" else [f.strip().lower() for f in args.maps.split(",")
                                                               if f.strip()]
    if bad := [f for f in formats if f not in ("sc", "pm")]:
        raise ConfigError(f"--maps: unknown form(s) {', '.join(map(repr, bad))}; use sc, pm, sc,pm or none")
    try:
        # built without its model: only what the method produces and requires is read here
        with registry.create(args.method, params) as den:
            produces = {str(k) for k in den.spec.produces}
            requires = {str(k) for k in den.spec.requires}
    except DenoiserError as exc:
        raise ConfigError(f"--method {args.method}: {exc}") from None
    if needed := sorted(k for k in requires if k.endswith("_prior")):
        if args.prior is None:
            raise ConfigError(f"--method {args.method} needs a prior ({', '.join(needed)}): give --prior PRIOR_DIR")
    prior = None
    if args.prior is not None:
        from dicom_node.pipeline import PriorRequest

        prior_files = dicom_files([args.prior])
        if not prior_files:
            raise ConfigError(f"--prior {str(args.prior)!r}: no DICOM files there")
        prior = PriorRequest(prior_files, args.registration)
    has_maps = bool(produces - {"denoised"})
    out_dir = args.out_dir / "pet" if has_maps else args.out_dir
    files = dicom_files([args.in_dir])
    try:
        result = process_series(files, plan, out_dir, log_id="offline", models=store, prior=prior,
                                map_formats=formats, maps_dir=args.out_dir)
    except DenoiserError as exc:
        raise DicomNodeError(f"denoiser {args.method!r} failed: {exc}") from exc
    print(f"wrote {len(result.files)} derived instance(s) to {out_dir} (series {result.output_series_uid}); "
          f"total activity ratio {result.activity_ratio:.5f}; load {result.timings['load']:.2f} s, denoise "
          f"{result.timings['denoise']:.2f} s, write {result.timings['write']:.2f} s")
    if result.prior_series_uid:
        print(f"prior: series {result.prior_series_uid} ({result.info.get('prior', 'on the PET grid')})")
    for m in result.map_series:
        print(f"wrote {m.kind} map as {m.format} ({len(m.files)} file(s)) to {m.files[0].parent if m.files else '?'} "
              f"(series {m.series_uid})")
    if not result.quantitative:
        print("note: the input is not quantitative (not BQML or SUV attributes missing); processed in its own units",
              file=sys.stderr)
    return 0


def cmd_bench_receive(args: argparse.Namespace) -> int:
    from statistics import median

    from dicom_node.bench import bench_receive

    f = bench_receive(args.series_dir, repeats=args.repeats, pairs=args.pairs)
    ref, ours, minimal = (median(x) for x in (f.storescp_per_s, f.petnode_per_s, f.minimal_per_s))
    minimal_ed = median(f.minimal_event_driven_per_s)
    lat, naive, naive_command = median(f.latency_s), median(f.naive_round_trip_s), median(f.naive_command_s)
    gauss, nlm, sk = median(f.denoise_gaussian_s), median(f.denoise_nlm_s), median(f.skimage_nlm_s)

    def paired(ours_runs: list[float], references: list[float], speed_up: bool = False) -> float:
        """The median of the rounds' ratios: each reference ran in the same round as petnode, right after it."""
        pairs = zip(ours_runs, references)
        return median((r / max(o, 1e-9)) if speed_up else (o / max(r, 1e-9)) for o, r in pairs)

    print(f"series {args.series_dir}: {f.instances} instances; DCMTK storescu with TCP_NODELAY=1; {args.repeats} "
          f"repeat(s), medians; {os.cpu_count()} CPUs; ratios marked * are the median of per-round ratios (the "
          f"reference measured in the same round as petnode: {args.pairs} rounds for one association, latency and "
          f"NLM in a node, {args.repeats} for the commands)")
    print(f"{'what':<64} {'petnode':>10} {'reference':>10} {'ratio':>7}  reference")
    rows = [
        ("latency: last instance acked -> last derived stored at storescp", lat, median(f.naive_paired_s),
         paired(f.latency_s, f.naive_paired_s), "* naive pydicom round trip (s)"),
        ("petnode denoise --method gaussian (s)", gauss, naive, paired(f.denoise_gaussian_s, f.naive_round_trip_s),
         "* naive pydicom round trip (s)"),
        ("petnode denoise --method gaussian (s)", gauss, naive_command,
         paired(f.denoise_gaussian_s, f.naive_command_s), "* the same round trip as a program (start, imports) (s)"),
        ("receive, one association (instances/s)", ours, minimal, paired(f.petnode_per_s, f.minimal_per_s),
         "* minimal pynetdicom SCP, fsync (/s)"),
        ("receive, one association (instances/s)", ours, minimal_ed,
         paired(f.petnode_per_s, f.minimal_event_driven_per_s),
         "* the same, with petnode's reactors and C-STORE messages (/s)"),
        ("receive, one association (instances/s)", ours, ref, ours / ref, "DCMTK storescp, no fsync (/s)"),
        (f"NLM in a running node (its denoise step, torch {f.torch_threads} threads) (s)", median(f.node_nlm_s), sk,
         paired(f.node_nlm_s, f.skimage_nlm_s, speed_up=True),
         "* scikit-image fast NLM, 1 thread (s); ratio = speed-up"),
        ("NLM command (nlm - gaussian command, with import torch) (s)", nlm - gauss, sk,
         sk / max(nlm - gauss, 1e-9), "scikit-image fast NLM, 1 thread (s); ratio = speed-up"),
    ]
    for what, value, reference, ratio, label in rows:
        print(f"{what:<64} {value:>10.2f} {reference:>10.2f} {ratio:>7.2f}  {label}")
    send_only, libraries = median(f.send_only_s), median(f.libraries_s)
    print(f"floors: petnode's SCU (pynetdicom) sending the {f.instances} files alone to the same storescp "
          f"{send_only:.2f} s ({send_only / naive:.2f}x the naive round trip); an interpreter importing the "
          f"Gaussian command's libraries {libraries:.2f} s ({libraries / naive:.2f}x)")

    def scaling(table: dict[int, list[float]], processes: int, own: bool) -> str:
        cells = []
        for n, rates in sorted(table.items()):
            busy = f.concurrent_busy.get((processes, own, n))
            cells.append(f"{n} sender(s) {median(rates):.1f}/s" + (f" ({median(busy):.0%} busy)" if busy else ""))
        return ", ".join(cells)

    print("receive with concurrent senders (DCMTK storescu, each its own association), instances/s (how busy the "
          "machine's cores were, senders and node together):")
    tables = [("one process, the series split between the senders", f.concurrent_per_s, 1, False),
              ("one process, each sender its own copy of the series", f.concurrent_own_per_s, 1, True),
              (f"receive_processes={f.receive_processes} (the default, auto), the series split",
               f.concurrent_multi_per_s, f.receive_processes, False),
              (f"receive_processes={f.receive_processes} (the default, auto), each sender its own series",
               f.concurrent_multi_own_per_s, f.receive_processes, True)]
    for label, table, processes, own in tables:
        if table:
            print(f"  {label}: {scaling(table, processes, own)}")
    for label, base in (("interpreter with petnode's CLI", f.baseline_rss_mb),
                        ("interpreter with the command's libraries (numpy, pydicom, pydantic)", f.libraries_rss_mb)):
        print(f"peak memory of the gaussian command: {f.peak_rss_mb:.0f} MB = {label} {base:.0f} MB + "
              f"{f.peak_rss_mb - base:.0f} MB ({(f.peak_rss_mb - base) / max(f.volume_mb, 1e-9):.1f}x the volume "
              f"in float32, {f.volume_mb:.1f} MB)")
    return 0


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def cmd_denoisers_list(args: argparse.Namespace) -> int:
    from denoisers import registry
    from denoisers.devices import cuda_count

    for name, reason in registry.available().items():
        if reason is not None:
            print(f"{name}: NOT AVAILABLE here: {reason}\n")
            continue
        cls = registry.get_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {doc}")
        try:
            spec = registry.create_example(name).spec
            print(f"  requires: {', '.join(sorted(spec.requires))}; produces: {', '.join(sorted(spec.produces))}; "
                  f"device: {spec.device}; weights: {'yes (model registry)' if spec.needs_weights else 'no'}; "
                  f"stochastic: {'yes' if spec.stochastic else 'no'}")
        except Exception as exc:  # noqa: BLE001 - e.g. a learned method whose example needs a model
            print(f"  (spec needs a configured instance: {exc})")
        print("  params:")
        for field_name, field in cls.Params.model_fields.items():
            default = "required" if field.is_required() else f"default {field.default!r}"
            desc = f": {field.description}" if field.description else ""
            print(f"    {field_name} ({_type_name(field.annotation)}, {default}){desc}")
        print()
    gpus = cuda_count() if any(registry.get_class(n).device_need != "cpu"
                               for n, r in registry.available().items() if r is None) else 0
    print(f"CUDA devices here: {gpus}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import csv

    from training.bench_speed import bench_methods, bench_nlm, format_nlm_table

    try:
        shape = tuple(int(v) for v in args.shape.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise ConfigError(f"--shape {args.shape!r}: expected three positive integers z,y,x") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    store = None
    if any(":" in m for m in methods):
        from dicom_node.cli.model_commands import open_store
        from dicom_node.settings import load_settings

        store = open_store(load_settings(args.config, data_dir=args.data_dir), quiet=True)
    from denoisers.errors import DenoiserError
    from training import TrainingError

    try:
        rows = bench_methods(methods, shape, repeats=args.repeats, models=store)  # type: ignore[arg-type]
    except (DenoiserError, TrainingError) as exc:
        print(f"petnode bench speed: {exc}", file=sys.stderr)
        return 1
    width = max(12, *(len(r["method"]) + 2 for r in rows))
    print(f"{'method':<{width}}{'device':<9}{'volume':>14}{'best s':>9}{'median s':>10}{'ms/slice':>10}")
    for r in rows:
        print(f"{r['method']:<{width}}{r['device']:<9}{r['shape']:>14}{r['best_s']:>9.3f}{r['median_s']:>10.3f}"
              f"{r['per_slice_ms']:>10.2f}")
    if "nlm" in methods and not args.no_reference:
        print()
        result = bench_nlm(shape, repeats=args.repeats)  # type: ignore[arg-type]
        print(format_nlm_table(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "speed.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.out / 'speed.csv'}")
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from training import TrainingError
    from training.bench_quality import run_quality_bench
    from training.simulate import parse_levels

    try:
        levels = parse_levels(args.count_levels)
    except Exception as exc:  # noqa: BLE001 - SimulationError with the bad value
        raise ConfigError(f"--count-levels {args.count_levels!r}: {exc}") from None
    counts = None
    if args.counts_per_slice:
        try:
            counts = [float(c) for c in args.counts_per_slice.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(f"--counts-per-slice {args.counts_per_slice!r}: give numbers, e.g. "
                              "1e6,3e5,1e5") from None
        if not counts or any(not c > 0 for c in counts):
            raise ConfigError(f"--counts-per-slice {args.counts_per_slice!r}: give positive numbers")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    store = None
    if any(":" in m for m in methods):
        from dicom_node.cli.model_commands import open_store
        from dicom_node.settings import load_settings

        store = open_store(load_settings(args.config, data_dir=args.data_dir), quiet=True)
    try:
        report = run_quality_bench(args.phantom, levels, methods, args.out, size=args.size,
                                   realizations=args.realizations, models=store, series=args.series,
                                   counts_per_slice=counts, slab=args.slab,
                                   simulation_cache=args.simulation_cache)
    except TrainingError as exc:
        raise ConfigError(f"bench quality: {exc}") from None
    print(report.table_md.read_text())
    print(f"report in {args.out} ({report.seconds:.0f} s): " + ", ".join(f.name for f in report.files))
    return 0


def cmd_bench_dip(args: argparse.Namespace) -> int:
    from denoisers.base import DeviceNeed
    from denoisers.devices import resolve_device
    from denoisers.errors import DenoiserError
    from denoisers.dip import CdipParams
    from training.bench_dip import run_dip_bench

    try:
        doses = [float(d) for d in args.doses.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--doses {args.doses!r}: give fractions such as 0.1,0.2,0.5,1") from None
    params = parse_key_values(args.param)
    try:
        CdipParams(**{"epochs": 200, "sample_every": 5, "sample_from": 100, **params})
    except Exception as exc:  # noqa: BLE001 - pydantic's message names the bad parameter
        raise ConfigError(f"--param: {exc}") from None
    model = None
    if args.cnn:
        from dicom_node.cli.model_commands import open_store
        from dicom_node.settings import load_settings

        model = open_store(load_settings(args.config, data_dir=args.data_dir), quiet=True).resolve(args.cnn)
    try:
        report = run_dip_bench(args.out, doses=doses, size=args.size, slab=args.slab, cdip_params=params,
                               cnn_model=model, cnn_label=args.cnn or "",
                               device=resolve_device(args.device, DeviceNeed.GPU_PREFERRED))
    except DenoiserError as exc:
        raise DicomNodeError(f"bench dip: {exc}") from exc
    print(report.table_md.read_text())
    print(f"report in {args.out} ({report.seconds:.0f} s): " + ", ".join(f.name for f in report.files))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from dicom_node.demo import run_demo

    workdir = args.out or Path(tempfile.mkdtemp(prefix="petnode-demo-"))
    result = run_demo(workdir, phantom=args.phantom, count_level=args.count_level, fwhm_mm=args.fwhm_mm)
    print(f"demo finished in {result.seconds:.1f} s")
    print(f"  simulated low-count PET sent: {result.source_dir}")
    print(f"  derived series received by {result.sink}: {result.derived_dir}")
    print(f"  comparison panel: {result.panel}")
    return 0

