"""``petnode models ...``: trained model versions for physicists (list, show, add, activate, retire, remove,
verify, export, import, history).

The store is ``<data_dir>/models`` (data directory from ``--data-dir``, else ``-c/--config``, else ``./var``).
Shipped models (``shipped_models_dir`` in the settings, default ``./models``) are registered on first use.
Every change is recorded in the store's audit log with the user; several commands may run at once (the store
locks). Exit codes: 0 ok, 1 refused or failed (the message says why and what to do), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import ConfigError

if TYPE_CHECKING:  # the model store and the settings pull in pydantic/yaml only when a verb needs them
    from denoisers.models import ModelCard, ModelStore
    from dicom_node.settings import NodeSettings

EXIT_OK, EXIT_FAILURE = 0, 1

_CARD_FLAGS = (  # (flag, card key, type, help)
    ("--denoiser", "denoiser", str, "plugin that runs the model, e.g. cnn (`petnode denoisers list`)"),
    ("--architecture", "architecture", str, "network, e.g. 'U-Net 2.5D, 4 levels'"),
    ("--description", "description", str, "one line for the physicist"),
    ("--input-slices", "input_slices", int, "slices per input: 1 for 2D, 3 or 5 for 2.5D"),
    ("--units", "units", str, "what the model expects: BQML, SUV or any"),
    ("--normalisation", "normalisation", str, "input normalisation: suv, mean, none ..."),
    ("--count-level", "count_level", str, "low-count level trained for, e.g. '1/10 dose'"),
    ("--training-data", "training_data", str, "summary of the training data"),
    ("--loss", "loss", str, "training loss"),
    ("--epochs", "epochs", int, "training epochs"),
    ("--voxel-tolerance", "voxel_tolerance", float, "relative voxel-size tolerance (default 0.15)"),
)


def add_subparsers(sub: Any) -> None:
    """Register ``petnode models`` and its verbs."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None,
                        help="node data directory; the store is DATA_DIR/models (default: from --config, ./var)")

    p = sub.add_parser("models", help="trained model versions: list, show, add, activate, retire, remove, "
                                      "verify, export, import, history")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True

    q = msub.add_parser("list", parents=[common], help="every model and version with its state")
    q.add_argument("--json", action="store_true",
                   help="a JSON array for scripts: name, version, state, denoiser, architecture, tracers, count level")
    q.set_defaults(func=cmd_list)

    q = msub.add_parser("show", parents=[common], help="the card of a version (NAME = the active version)")
    q.add_argument("ref", type=_any_ref, metavar="NAME[@VERSION]")
    q.set_defaults(func=cmd_show)

    q = msub.add_parser("add", parents=[common], help="install new weights as NAME@VERSION (copied, hashed)")
    q.add_argument("path", type=Path, metavar="WEIGHTS", help="state dict saved with torch.save")
    q.add_argument("--name", required=True, help="model name, e.g. unet-fdg")
    q.add_argument("--version", required=True, help="new version, e.g. 1.0.0 (versions never change once added)")
    q.add_argument("--card", type=Path, default=None, help="card.yaml from training; the options below override it")
    for flag, key, kind, helptext in _CARD_FLAGS:
        q.add_argument(flag, dest=f"card_{key}", type=kind, default=None, help=helptext)
    q.add_argument("--inputs", dest="card_inputs", default=None, metavar="KIND[,KIND]",
                   help="inputs besides the PET, comma separated: pet,mr_prior,ct_prior (default: pet)")
    q.add_argument("--voxel-mm", dest="card_expected_voxel_mm", type=_voxel_mm, default=None, metavar="DZ,DY,DX",
                   help="voxel size trained on, mm (one number = isotropic)")
    q.add_argument("--tracer", dest="card_tracers", action="append", default=None, help="tracer (repeatable)")
    q.add_argument("--scanner", dest="card_scanners", action="append", default=None, help="scanner (repeatable)")
    q.add_argument("--metric", dest="card_validation_metrics", action="append", type=_metric, default=None,
                   metavar="KEY=VALUE", help="validation metric, e.g. psnr=38.2 (repeatable)")
    q.add_argument("--activate", action="store_true", help="make it the active version at once")
    q.set_defaults(func=cmd_add)

    q = msub.add_parser("activate", parents=[common], help="make NAME@VERSION the version new series use")
    q.add_argument("ref", type=_versioned_ref, metavar="NAME@VERSION")
    q.add_argument("--unretire", action="store_true", help="allow activating a retired version (un-retires it)")
    q.set_defaults(func=cmd_activate)

    q = msub.add_parser("retire", parents=[common], help="stop using a version but keep it on record")
    q.add_argument("ref", type=_versioned_ref, metavar="NAME@VERSION")
    q.add_argument("--reason", default="", help="why (kept in the audit log)")
    q.add_argument("--rules", type=Path, default=None, help="rules YAML to check for pins (default: the node's)")
    q.set_defaults(func=cmd_retire)

    q = msub.add_parser("remove", parents=[common], help="delete a version (refused while a rule uses it)")
    q.add_argument("ref", type=_versioned_ref, metavar="NAME@VERSION")
    q.add_argument("--rules", type=Path, default=None, help="rules YAML to check (default: the node's)")
    q.set_defaults(func=cmd_remove)

    q = msub.add_parser("verify", parents=[common], help="re-hash every version; exit 1 if anything is wrong")
    q.set_defaults(func=cmd_verify)

    q = msub.add_parser("export", parents=[common], help="write card + weights to a .tar.gz or .zip")
    q.add_argument("ref", type=_any_ref, metavar="NAME[@VERSION]")
    q.add_argument("file", type=Path, metavar="FILE")
    q.set_defaults(func=cmd_export)

    q = msub.add_parser("import", parents=[common], help="install a version from an export file")
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument("--activate", action="store_true", help="make it the active version at once")
    q.set_defaults(func=cmd_import)

    q = msub.add_parser("history", parents=[common], help="who changed what, when (the audit log)")
    q.add_argument("--limit", type=int, default=20, help="last N entries (default 20; 0 = all)")
    q.add_argument("--model", default=None, help="only this model")
    q.set_defaults(func=cmd_history)


# ------------------------------------------------------------------------------------------------ argument types


def _any_ref(text: str) -> tuple[str, str | None]:
    from denoisers.errors import ModelRegistryError
    from denoisers.models import parse_ref

    try:
        return parse_ref(text)
    except ModelRegistryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _versioned_ref(text: str) -> tuple[str, str]:
    name, version = _any_ref(text)
    if version is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no version: give NAME@VERSION, e.g. {name}@1.0.0 (`petnode models list` shows them)")
    return name, version


def _voxel_mm(text: str) -> tuple[float, float, float]:
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a voxel size: give DZ,DY,DX in mm (e.g. 2.0,2.0,2.0) "
                                         "or one number for isotropic voxels")
    return values[0], values[1], values[2]


def _metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not key.strip() or number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=NUMBER (e.g. psnr=38.2)")
    return key.strip(), number


# ------------------------------------------------------------------------------------------------ helpers


def _handles_model_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Model-store refusals and weights problems are exit 1 with the message (no traceback)."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from denoisers.errors import DenoiserError

        try:
            return func(args)
        except DenoiserError as exc:
            print(f"petnode: {exc}", file=sys.stderr)
            return EXIT_FAILURE

    return wrapper


def _settings(args: argparse.Namespace) -> NodeSettings:
    from dicom_node.settings import load_settings

    return load_settings(args.config, data_dir=args.data_dir)


def open_store(settings: NodeSettings, *, quiet: bool = False) -> ModelStore:
    """The node's model store, with shipped models registered (notes and problems on stderr)."""
    from denoisers.models import ModelStore

    store = ModelStore(settings.model_store_dir.resolve())
    if settings.shipped_models_dir is not None:
        result = store.register_shipped(settings.shipped_models_dir)
        if not quiet:
            for ref in result.registered:
                state = " (active)" if ref in result.activated else ""
                print(f"note: registered shipped model {ref}{state} from {settings.shipped_models_dir}",
                      file=sys.stderr)
        for problem in result.problems:
            print(f"warning: {problem}", file=sys.stderr)
    return store


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _voxel_text(card: ModelCard | None) -> str:
    if card is None or card.expected_voxel_mm is None:
        return "-"
    return "x".join(f"{v:g}" for v in card.expected_voxel_mm)


def _rule_users(args: argparse.Namespace, settings: NodeSettings, store: ModelStore, *, strict: bool
                ) -> Callable[[str, str], list[str]]:
    """``users(name, version)``: the rules (from the node's rules file) that pin the version, or that name the
    model while the version is active. Disabled rules count: they can be re-enabled.

    ``strict``: an unreadable rules file is a ConfigError (nothing is removed without knowing); otherwise the
    check is skipped with a warning.
    """
    from dicom_node.rules import load_rules

    rules_path: Path = args.rules or settings.resolved_rules_file()
    if not rules_path.exists():
        print(f"warning: no rules file at {rules_path}, so no rule was checked for this model (use --rules or "
              "--config to name the node's)", file=sys.stderr)
        return lambda name, version: []
    try:
        ruleset = load_rules(rules_path, peer_names=None)
    except ConfigError as exc:
        if strict:
            raise ConfigError(f"{exc}\ncannot tell whether a rule uses this model, so nothing was changed: fix "
                              "the rules file or name the right one with --rules") from None
        print(f"warning: rules file {rules_path} not checked ({str(exc).splitlines()[0]})", file=sys.stderr)
        return lambda name, version: []

    def users(name: str, version: str) -> list[str]:
        from denoisers.models import parse_ref

        active = store.get(name).version if _has_active(store, name) else None
        found = []
        for rule in ruleset.rules:
            ref = rule.denoiser.model if rule.denoiser is not None else None
            if not ref:
                continue
            ref_name, ref_version = parse_ref(ref)
            disabled = " (disabled)" if rule.disabled else ""
            if ref_name == name and ref_version == version:
                found.append(f"rule {rule.name!r}{disabled} pins {ref}")
            elif ref_name == name and ref_version is None and active == version:
                found.append(f"rule {rule.name!r}{disabled} uses {name!r}, whose active version this is")
        return [f"{text} in {rules_path}" for text in found]

    return users


def _has_active(store: ModelStore, name: str) -> bool:
    from denoisers.errors import ModelRegistryError

    try:
        store.get(name)
    except ModelRegistryError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ verbs


@_handles_model_errors
def cmd_list(args: argparse.Namespace) -> int:
    store = open_store(_settings(args), quiet=bool(getattr(args, "json", False)))
    models = store.list()
    if getattr(args, "json", False):
        entries = []
        for info in models:
            for vs in info.versions:
                card = vs.card
                entries.append({
                    "name": info.name, "version": vs.version, "state": vs.state,
                    "denoiser": card.denoiser if card else None,
                    "architecture": (card.architecture or None) if card else None,
                    "tracers": list(card.tracers) if card else [],
                    "count_level": card.count_level if card else None,
                    "dose_aware": bool((card.extra.get("net") or {}).get("level_input")) if card else None,
                    "noise_index_range": card.extra.get("noise_index_range") if card else None,
                    "units": card.units if card else None,
                    "expected_voxel_mm": list(card.expected_voxel_mm) if card and card.expected_voxel_mm else None,
                    "sha256": card.sha256 if card else None,
                    "problem": vs.problem,
                })
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    if not models:
        print(f"no models installed in {store.root} (add one: petnode models add WEIGHTS --name NAME "
              "--version VERSION --card card.yaml)")
        return EXIT_OK
    rows = [("MODEL", "VERSION", "STATE", "DENOISER", "UNITS", "VOXEL mm", "TRACERS", "CREATED", "DESCRIPTION")]
    broken = []
    for info in models:
        for vs in info.versions:
            card = vs.card
            rows.append((
                info.name, vs.version, vs.state,
                card.denoiser if card else "?", card.units if card else "?", _voxel_text(card),
                ",".join(card.tracers) or "any" if card else "?",
                card.created.date().isoformat() if card else "?",
                (card.description if card else "") or "-",
            ))
            if vs.problem:
                broken.append(f"{info.name}@{vs.version}: {vs.problem}")
        if not info.active and info.versions:
            broken.append(f"{info.name}: no active version; rules naming {info.name!r} without a version fail "
                          f"until one is activated (petnode models activate {info.name}@{info.versions[-1].version})")
    print(_table(rows))
    for line in broken:
        print(f"warning: {line}", file=sys.stderr)
    return EXIT_OK


@_handles_model_errors
def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    name, version = args.ref
    mv = store.get(name, version)
    card = mv.card
    weights = mv.weights_path
    size = _size(weights.stat().st_size) if weights.is_file() else "MISSING"
    lines = [f"{mv.ref}  ({mv.state})",
             f"  {'stored in':<19} {mv.directory}",
             f"  {'weights':<19} {card.weights_file} ({size})",
             f"  {'sha256':<19} {card.sha256}"]
    if mv.retired_note:
        lines.append(f"  {'retired':<19} {mv.retired_note}")
    skip = {"name", "version", "weights_file", "sha256"}
    for key, value in card.model_dump(mode="json").items():
        if key in skip:
            continue
        if isinstance(value, list):
            text = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, dict):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif value is None or value == "":
            text = "-"
        else:
            text = str(value)
        lines.append(f"  {key.replace('_', ' '):<19} {text}")
    print("\n".join(lines))
    return EXIT_OK


@_handles_model_errors
def cmd_add(args: argparse.Namespace) -> int:
    from denoisers.models import read_card_fields
    from denoisers.registry import names as plugin_names

    fields: dict[str, Any] = read_card_fields(args.card) if args.card is not None else {}
    overrides = {key[len("card_"):]: value for key, value in vars(args).items()
                 if key.startswith("card_") and value is not None}
    if "inputs" in overrides:
        overrides["inputs"] = [s.strip() for s in overrides["inputs"].split(",") if s.strip()]
    if "validation_metrics" in overrides:
        overrides["validation_metrics"] = dict(overrides["validation_metrics"])
    fields.update(overrides)
    if not fields.get("denoiser"):
        print("petnode: add needs the plugin that runs this model: give --denoiser NAME (e.g. cnn) or a --card "
              "file that names it", file=sys.stderr)
        return 2
    source = " + ".join(filter(None, [str(args.card) if args.card else None,
                                      "command-line options" if overrides else None])) or "card"
    store = open_store(_settings(args))
    mv = store.add(args.path, fields, name=args.name, version=args.version, activate=args.activate, source=source)
    card = mv.card
    print(f"added {mv.ref}: denoiser {card.denoiser}, {card.weights_file} "
          f"({_size(mv.weights_path.stat().st_size)}, sha256 {card.sha256[:12]}...)")
    print(f"  stored in {mv.directory}")
    if mv.active:
        print(f"  active: new series routed to {mv.name!r} use it from now on")
    else:
        print(f"  not active: `petnode models activate {mv.ref}` makes new series use it")
    if card.denoiser not in plugin_names():
        print(f"warning: no denoiser plugin named {card.denoiser!r} in this petnode ({', '.join(plugin_names())}): "
              "the model is stored but no rule can run it until that plugin is installed", file=sys.stderr)
    return EXIT_OK


@_handles_model_errors
def cmd_activate(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    name, version = args.ref
    previous = store.get(name).version if _has_active(store, name) else None
    mv = store.activate(name, version, unretire=args.unretire)
    if previous == version:
        print(f"{mv.ref} was already active; nothing changed")
    else:
        was = f" (was {previous})" if previous else ""
        print(f"{mv.ref} is now active{was}; a running node uses it from its next series")
    return EXIT_OK


@_handles_model_errors
def cmd_retire(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = open_store(settings)
    name, version = args.ref
    before = store.get(name, version)
    mv = store.retire(name, version, reason=args.reason)
    if before.retired:
        print(f"{mv.ref} was already retired ({mv.retired_note}); nothing changed")
        return EXIT_OK
    print(f"retired {mv.ref}: kept on disk and in the audit log, no longer used for new series; undo with "
          f"`petnode models activate {mv.ref} --unretire`")
    for user in _rule_users(args, settings, store, strict=False)(name, version):
        print(f"warning: {user}: series it routes will fail (retired version) until the rule names another "
              f"version, or just model: {name} to follow the active one", file=sys.stderr)
    return EXIT_OK


@_handles_model_errors
def cmd_remove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = open_store(settings)
    name, version = args.ref
    users = _rule_users(args, settings, store, strict=True)

    def in_use(model: str, model_version: str) -> str | None:
        found = users(model, model_version)
        return f"{'; '.join(found)}: change those rules first" if found else None

    store.remove(name, version, in_use=in_use)
    print(f"removed {name}@{version} (card and weights deleted; the audit log keeps the record)")
    return EXIT_OK


@_handles_model_errors
def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    problems = store.verify()
    count = sum(len(info.versions) for info in store.list())
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in {count} model version(s) in {store.root}")
        return EXIT_FAILURE
    print(f"ok: {count} model version(s) in {store.root}: every sha256 matches its card")
    return EXIT_OK


@_handles_model_errors
def cmd_export(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    name, version = args.ref
    mv = store.get(name, version)
    path = store.export(mv.name, mv.version, args.file)
    print(f"exported {mv.ref} to {path} ({_size(path.stat().st_size)}): card.yaml + {mv.card.weights_file}; "
          f"install it elsewhere with `petnode models import {path.name}`")
    return EXIT_OK


@_handles_model_errors
def cmd_import(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    before = {f"{info.name}@{vs.version}" for info in store.list() for vs in info.versions}
    mv = store.import_(args.file, activate=args.activate)
    if mv.ref in before:
        print(f"{mv.ref} is already installed with identical card and weights; nothing to do"
              + ("" if not args.activate else f" ({mv.state})"))
        return EXIT_OK
    print(f"imported {mv.ref} from {args.file}: denoiser {mv.card.denoiser}, sha256 {mv.card.sha256[:12]}... "
          "verified")
    if mv.active:
        print(f"  active: new series routed to {mv.name!r} use it from now on")
    else:
        print(f"  not active: `petnode models activate {mv.ref}` makes new series use it")
    return EXIT_OK


@_handles_model_errors
def cmd_history(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    entries = store.history(None if args.limit == 0 else args.limit, model=args.model)
    if not entries:
        print("no model changes recorded yet")
        return EXIT_OK
    rows = [("TIME (UTC)", "USER", "ACTION", "MODEL", "DETAILS")]
    for entry in entries:
        details = entry.get("details") or {}
        shown = ", ".join(f"{k}={(v[:12] + '...') if k == 'sha256' and isinstance(v, str) else v}"
                          for k, v in details.items() if v not in (None, "", False))
        ref = entry.get("model", "?") + (f"@{entry['version']}" if entry.get("version") else "")
        rows.append((str(entry.get("time", "?")), str(entry.get("user", "?")), str(entry.get("action", "?")),
                     ref, shown or "-"))
    print(_table(rows))
    return EXIT_OK
