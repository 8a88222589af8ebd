"""Process one complete series with one rule: load, denoise, check, write the derived series, plan the sends.

:func:`process_series` is the single place that catches broadly: whatever goes wrong, the series is marked
failed with a reason an operator can read, and the worker moves on.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.errors import DicomNodeError, RoutingError
from dicom_node.outputs.derived_pet import Provenance, derived_series_uid, write_derived_pet
from dicom_node.series import PetVolume, load_pet_series

if TYPE_CHECKING:
    from denoisers.base import DenoiseInputs, DenoiseResult
    from denoisers.models import ModelStore, ResolvedModel
    # Types only: the rules and settings models (pydantic, YAML) are imported where they are used, so
    # `petnode denoise` (which has neither) does not pay for building them at every start.
    from dicom_node.rules import Rule
    from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)

# A denoiser that moves total activity by more than this has produced a quantitatively wrong image.
MAX_ACTIVITY_CHANGE = 0.05


@dataclass(frozen=True, slots=True)
class Destination:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Unresolved:
    label: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What to do with one series: the part of a rule the processing needs (the offline CLI builds one too)."""

    route: str
    denoiser: str
    params: dict[str, Any] = field(default_factory=dict)
    non_quantitative: str = "process"  # or "refuse"
    series_description_suffix: str = " [petnode]"
    series_number_offset: int = 1000
    device: str = "cpu"  # concrete device (cpu or cuda:N), chosen by the node's worker lane
    model: str | None = None  # model registry ref: "name" (its active version) or "name@version"
    source_revision: int = 0  # the series' revision (changed instances re-sent): part of the output UIDs
    spacing_tolerance: float = 0.1  # completion.spacing_tolerance: the loader checks what completion checked
    write_processes: int = 1  # forked processes writing the derived series (workers.write_processes)

    @classmethod
    def from_rule(cls, rule: Rule) -> Plan:
        if rule.denoiser is None:
            raise RoutingError(f"rule {rule.name!r} forwards or drops series; it has no denoiser to process with")
        return cls(route=rule.name, denoiser=rule.denoiser.name, params=dict(rule.denoiser.params),
                   model=rule.denoiser.model,
                   non_quantitative=rule.non_quantitative,
                   series_description_suffix=rule.output.series_description_suffix,
                   series_number_offset=rule.output.series_number_offset)


@dataclass(frozen=True)
class PriorRequest:
    """The MR or CT series a plan's method is given as its anatomical prior (found by the node or named offline)."""

    paths: Sequence[Path]
    registration: str = "auto"  # auto | always | never (see dicom_node.priors.prepare_prior)


@dataclass(frozen=True)
class ProcessResult:
    output_series_uid: str
    files: list[Path]
    timings: dict[str, float]
    activity_ratio: float
    quantitative: bool
    info: dict[str, Any] = field(default_factory=dict)  # the denoiser's info, as written to the provenance
    seed: int | None = None
    maps: dict[str, Path] = field(default_factory=dict)  # map kind -> .npy beside the derived series
    map_series: list[Any] = field(default_factory=list)  # dicom_node.outputs.maps.MapSeries written
    prior_series_uid: str | None = None


def series_seed(series_uid: str, route: str, revision: int = 0) -> int:
    """The seed a stochastic denoiser draws from: fixed by the series, its revision and the route, so a re-run
    writes the same pixels under the same deterministic UIDs."""
    digest = hashlib.sha256(f"petnode/seed/v1\0{series_uid}\0{route}\0{revision}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # a non-negative int64


def resolve_destination(dest: Any, settings: NodeSettings, calling_ae: str | None) -> Destination | Unresolved:
    """One destination of a rule as an address; a sender we cannot return to is reported, not guessed."""
    from dicom_node.rules import Address, PeerRef, ReturnToSender

    if isinstance(dest, ReturnToSender):
        peer = settings.peer_by_ae(calling_ae) if calling_ae else None
        if peer is None:
            return Unresolved(f"return_to_sender ({calling_ae or 'unknown AE'})",
                              f"calling AE {calling_ae!r} is not in the node's peers table, so petnode does not "
                              "know its port: add it under `peers:` in node.yaml")
        return Destination(peer.ae_title, peer.host, peer.port)
    if isinstance(dest, PeerRef):
        peer = settings.peer(dest.peer)
        if peer is None:  # load_rules refuses unknown peers; this guards a node.yaml edited later
            return Unresolved(dest.peer, f"peer {dest.peer!r} is not in the peers table")
        return Destination(peer.ae_title, peer.host, peer.port)
    if isinstance(dest, Address):
        return Destination(dest.ae_title, dest.host, dest.port)
    raise RoutingError(f"unknown destination {dest!r}")  # pragma: no cover - the rules model has no other kind


def resolve_destinations(rule: Rule, settings: NodeSettings, calling_ae: str | None, payload: str | None = None
                         ) -> list[Destination | Unresolved]:
    """Turn a rule's destinations (those that get ``payload``: original, derived, maps; all when None) into
    addresses; a sender we cannot return to is reported, not guessed."""
    out = [resolve_destination(dest, settings, calling_ae) for dest in rule.destinations
           if payload is None or payload in dest.payloads(rule.processes)]
    # The same address twice would send twice.
    seen: set[Destination] = set()
    unique: list[Destination | Unresolved] = []
    for d in out:
        if isinstance(d, Destination):
            if d in seen:
                continue
            seen.add(d)
        unique.append(d)
    return unique


def _maps_of(rule: Rule) -> str:
    """Which maps the rule's method makes, in words (asks the denoiser itself: it may depend on params)."""
    assert rule.denoiser is not None
    try:
        from denoisers import registry

        denoiser = registry.create(rule.denoiser.name, rule.denoiser.params, device="cpu")
        try:
            kinds = sorted(str(k) for k in denoiser.spec.produces if str(k) != "denoised")
        finally:
            denoiser.close()
    except Exception as exc:  # noqa: BLE001 - e.g. a learned method without its model here: say so
        return f"maps the method makes (not known here: {exc})"
    if not kinds:
        return f"maps: none ({rule.denoiser.name} makes no maps)"
    return f"maps ({', '.join(kinds)}) after processing"


def delivery_plan(rule: Rule, settings: NodeSettings, calling_ae: str | None) -> list[str]:
    """What each destination would get from ``rule`` and when, one line per destination (rules test)."""
    if rule.drop:
        return [f"dropped: sent nowhere; files kept {settings.retention.dropped_max_age_h:g} h (dropped retention)"]
    lines = []
    when_original = ("instance by instance as it arrives" if rule.forward == "on_receipt"
                     else "when the series is complete (or declared incomplete)")
    for dest in rule.destinations:
        resolved = resolve_destination(dest, settings, calling_ae)
        where = dest.describe()
        if isinstance(resolved, Destination):
            address = f"{resolved.ae_title}@{resolved.host}:{resolved.port}"
            where = where if where == address else f"{where} ({address})"
        else:
            where = f"{where} (NOT RESOLVED: {resolved.reason})"
        parts = []
        for payload in dest.payloads(rule.processes):
            if payload == "original":
                parts.append(f"original as received, {when_original}")
            elif payload == "derived":
                parts.append(f"derived series ({rule.denoiser.describe() if rule.denoiser else '?'}) after "
                             "processing")
            else:
                form = {"maps": "Secondary Capture and Parametric Map", "secondary_capture": "Secondary Capture",
                        "parametric_map": "Parametric Map"}.get(payload, payload)
                text = _maps_of(rule)
                parts.append(text if text.startswith("maps: none") else f"{text} as {form}")
        lines.append(f"{where}: {'; '.join(parts)}")
    if rule.hold_study:
        quiet = (rule.study_quiet_period_s if rule.study_quiet_period_s is not None
                 else settings.completion.study_quiet_period_s)
        lines.append(f"study hold: these sends wait until every series of the study is complete and processed and "
                     f"no instance arrived for {quiet:g} s (at most {settings.completion.study_hold_max_s:g} s)")
    return lines


def _activity_ratio(before: np.ndarray, after: np.ndarray) -> float:
    total = float(np.sum(before, dtype=np.float64))
    return float(np.sum(after, dtype=np.float64)) / total if total > 0 else 1.0


def offered_inputs(inputs: DenoiseInputs) -> frozenset[str]:
    """What the pipeline really gives the denoiser (checked against a model card's required inputs)."""
    return frozenset({"spacing", *(str(kind) for kind in inputs.provided())})


def resolve_model(volume: PetVolume, plan: Plan, models: ModelStore | None,
                  provided: frozenset[str] = frozenset({"pet", "spacing"})) -> ResolvedModel | None:
    """The plan's model with its card checked against this series; refuses early instead of a wrong image."""
    if plan.model is None:
        return None
    if models is None:
        raise DicomNodeError(f"rule {plan.route!r} names model {plan.model!r} but no model store is configured")
    from denoisers.models import check_card
    from dicom_node.tracers import canonical_tracer

    resolved = models.resolve(plan.model)  # WeightsError: missing, tampered, retired-and-pinned
    problem = check_card(resolved.card, spacing_mm=volume.spacing, units=volume.units,
                         provided_inputs=set(provided), suv_available=volume.suv_factor is not None,
                         tracer=canonical_tracer(volume.headers[0]), denoiser=plan.denoiser,
                         resample=bool(plan.params.get("resample")))
    if problem:
        raise DicomNodeError(f"model {resolved.ref} cannot process this series: {problem}")
    return resolved


def build_inputs(volume: PetVolume, prior: Any = None) -> DenoiseInputs:
    """The denoiser's inputs for a series, with its prior (``dicom_node.priors.PreparedPrior``) when it has one."""
    from denoisers.base import DenoiseInputs

    mr = prior.array if prior is not None and prior.kind == "mr" else None
    ct = prior.array if prior is not None and prior.kind == "ct" else None
    return DenoiseInputs(pet=volume.array, spacing=volume.spacing, suv_factor=volume.suv_factor, mr_prior=mr,
                         ct_prior=ct)


def denoise_volume(volume: PetVolume, plan: Plan, weights: Path | None = None, *, seed: int | None = None,
                   inputs: DenoiseInputs | None = None, model: Any = None) -> tuple[DenoiseResult, bool]:
    """Run the plan's denoiser on the volume; the whole result (volume, maps, info) and whether it is stochastic.

    Imported lazily: torch only loads for learned methods.
    """
    from denoisers import registry

    denoiser = registry.create(plan.denoiser, plan.params, device=plan.device, weights=weights, seed=seed,
                               model=model)
    try:
        result = denoiser.denoise(inputs if inputs is not None else build_inputs(volume))
        stochastic = bool(denoiser.spec.stochastic)
    finally:
        denoiser.close()
    return result, stochastic


@dataclass(frozen=True)
class Denoised:
    """What the denoise step hands the write step: the method's result and what the provenance says about it.

    In-process it goes straight from :func:`denoise_series` to :func:`write_series`; in the distributed mode
    (:mod:`dicom_node.distributed`) a worker makes it and the node reads it back from the worker's results file.
    """

    result: DenoiseResult
    stochastic: bool
    seed: int
    inputs: tuple[str, ...]  # what the method was given (offered_inputs): part of the output UIDs with a prior
    model_version: str | None = None
    prior_info: dict[str, Any] = field(default_factory=dict)  # how the prior was put on the PET grid
    prior_series_uid: str | None = None
    prior_study_uid: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # prior, denoise


def load_series(paths: Sequence[Path], plan: Plan, *, reader: Callable[[Path], Any] | None = None,
                log_id: str = "") -> PetVolume:
    """Load the PET volume a plan processes; refuses a non-quantitative series when the rule says so."""
    volume = load_pet_series(paths, spacing_tolerance=plan.spacing_tolerance, reader=reader)
    if not volume.is_quantitative:
        why = volume.suv_problem or f"Units are {volume.units!r}, not BQML"
        if plan.non_quantitative == "refuse":
            raise RoutingError(f"rule {plan.route!r} refuses non-quantitative series: {why}")
        logger.warning("%s: series is not quantitative (%s); processing in its own units %r as the rule "
                       "allows", log_id, why, volume.units)
    return volume


def denoise_series(volume: PetVolume, plan: Plan, *, models: ModelStore | None = None,
                   prior: PriorRequest | None = None, log_id: str = "") -> Denoised:
    """Put the prior (if any) on the PET grid, resolve the model, and run the plan's denoiser."""
    timings: dict[str, float] = {}
    prepared = None
    prior_study_uid: str | None = None
    if prior is not None:
        from dicom_node import priors

        t0 = time.perf_counter()
        prior_image = priors.read_prior_series(prior.paths)
        prepared = priors.prepare_prior(volume, prior_image, registration=prior.registration)  # type: ignore[arg-type]
        prior_study_uid = prior_image.study_uid or None
        timings["prior"] = time.perf_counter() - t0
        logger.info("%s: %s prior %s put on the PET grid by %s in %.2f s", log_id, prepared.kind.upper(),
                    prepared.series_uid, prepared.method, timings["prior"])
    inputs = build_inputs(volume, prepared)
    provided = offered_inputs(inputs)
    resolved = resolve_model(volume, plan, models, provided)
    seed = series_seed(volume.series_uid, plan.route, plan.source_revision)
    t0 = time.perf_counter()
    result, stochastic = denoise_volume(volume, plan, resolved.weights_path if resolved else None, seed=seed,
                                        inputs=inputs, model=resolved)
    timings["denoise"] = time.perf_counter() - t0
    return Denoised(result=result, stochastic=stochastic, seed=seed, inputs=tuple(sorted(provided)),
                    model_version=resolved.ref if resolved else None, prior_info=_prior_info(prepared),
                    prior_series_uid=prepared.series_uid if prepared is not None else None,
                    prior_study_uid=prior_study_uid, timings=timings)


def write_series(volume: PetVolume, plan: Plan, denoised: Denoised, out_dir: Path, *, log_id: str = "",
                 on_write: Callable[[str, int], Callable[[Path], None] | None] | None = None,
                 map_formats: Sequence[str] = ("sc", "pm"), maps_dir: Path | None = None) -> ProcessResult:
    """Check the denoised volume (finite, total activity kept) and write the derived series and the maps.

    ``timings`` of the result hold ``write`` and the denoise step's own.
    """
    result = denoised.result
    ratio = _activity_ratio(volume.array, result.denoised)
    finite = bool(np.isfinite(np.sum(result.denoised, dtype=np.float64)))  # a NaN or inf anywhere; no copy
    if not finite or abs(ratio - 1.0) > MAX_ACTIVITY_CHANGE:
        raise DicomNodeError(f"denoiser {plan.denoiser!r} changed total activity by "
                             f"{100 * (ratio - 1):+.2f} % (limit {100 * MAX_ACTIVITY_CHANGE:.0f} %): "
                             "output withheld")
    if volume.suv_factor is not None:
        logger.info("%s device=%s: SUVmax %.2f -> %.2f, total activity ratio %.5f", log_id, plan.device,
                    float(volume.array.max()) * volume.suv_factor,
                    float(result.denoised.max()) * volume.suv_factor, ratio)

    provenance = Provenance(
        method=plan.denoiser,
        params=dict(plan.params),
        route=plan.route,
        model_version=denoised.model_version,
        series_description_suffix=plan.series_description_suffix,
        series_number_offset=plan.series_number_offset,
        source_revision=plan.source_revision,
        info=_json_safe({**dict(result.info or {}), **denoised.prior_info}),
        seed=denoised.seed,
        stochastic=denoised.stochastic,
        inputs=denoised.inputs,
        prior_series_uid=denoised.prior_series_uid,
        prior_study_uid=denoised.prior_study_uid,
    )
    output_uid = derived_series_uid(volume.series_uid, provenance)
    on_written = on_write(output_uid, len(volume.headers)) if on_write is not None else None
    t0 = time.perf_counter()
    files = write_derived_pet(volume, result.denoised, out_dir, provenance, on_written=on_written,
                              processes=plan.write_processes)
    maps = _save_maps(result, out_dir)
    map_series = (write_maps(volume, result, output_uid, provenance, maps_dir or out_dir / "maps", map_formats)
                  if map_formats else [])
    timings = {**denoised.timings, "write": time.perf_counter() - t0}

    return ProcessResult(
        output_series_uid=output_uid,
        files=files,
        timings=timings,
        activity_ratio=ratio,
        quantitative=volume.is_quantitative,
        info=dict(provenance.info),
        seed=denoised.seed,
        maps=maps,
        map_series=map_series,
        prior_series_uid=provenance.prior_series_uid,
    )


def process_series(paths: Sequence[Path], plan: Plan, out_dir: Path, *, log_id: str = "",
                   models: ModelStore | None = None, reader: Callable[[Path], Any] | None = None,
                   on_write: Callable[[str, int], Callable[[Path], None] | None] | None = None,
                   prior: PriorRequest | None = None, map_formats: Sequence[str] = ("sc", "pm"),
                   maps_dir: Path | None = None) -> ProcessResult:
    """Load, denoise, check and write; raises :class:`DicomNodeError` (or a denoiser error) on failure.

    ``reader`` reads one instance (default: from disk); the node's takes what the C-STORE handler decoded.
    ``on_write(output_series_uid, count)`` is called once the output is checked, just before its files are
    written; what it returns is called with each file as it is written (the node starts its sends there).
    ``prior``: the MR/CT series to read, put on the PET grid (:mod:`dicom_node.priors`; a prior that cannot be
    used raises :class:`dicom_node.errors.PriorError`, on which the node applies the rule's fallback) and give
    the method. ``map_formats``: the DICOM forms ("sc" Secondary Capture, "pm" Parametric Map) the method's maps
    are written in (none: only the .npy beside the derived series), each series in its own folder under
    ``maps_dir`` (default ``out_dir / "maps"``): ``<kind>/<format>/``.

    The three steps (:func:`load_series`, :func:`denoise_series`, :func:`write_series`) are the ones the
    distributed mode splits between a worker (load, denoise) and the node (load, write).
    """
    t0 = time.perf_counter()
    volume = load_series(paths, plan, reader=reader, log_id=log_id)
    load_s = time.perf_counter() - t0
    denoised = denoise_series(volume, plan, models=models, prior=prior, log_id=log_id)
    result = write_series(volume, plan, denoised, out_dir, log_id=log_id, on_write=on_write,
                          map_formats=map_formats, maps_dir=maps_dir)
    result.timings["load"] = load_s
    return result


# How each kind of map is shown in its Secondary Capture (a fixed window, the same for every patient): the
# stability map as the paper's normalised stability S_norm = min(alpha * S / mean S, 1) on 0..1; an uncertainty
# map as it is, from 0 to its 99th percentile.
def map_display(kind: str, values: np.ndarray, info: Mapping[str, Any]) -> tuple[np.ndarray, tuple[float, float], str]:
    """What the Secondary Capture of a map shows: the values, the fixed window and a label."""
    if kind == "stability":
        mean = float(info.get("stability_mean") or 0.0)
        alpha = float(info.get("alpha", 0.6))
        if mean > 0:
            shown = np.minimum(alpha * values / np.float32(mean), 1.0).astype(np.float32)
            return shown, (0.0, 1.0), f"normalised stability (alpha {alpha:g})"
    top = float(np.percentile(values, 99)) if values.size else 1.0
    return values, (0.0, top if top > 0 else 1.0), kind


def write_maps(volume: PetVolume, result: DenoiseResult, output_uid: str, provenance: Provenance, out_dir: Path,
               formats: Sequence[str]) -> list[Any]:
    """Write every map of ``result`` as DICOM series (Secondary Capture and/or Parametric Map) under ``out_dir``."""
    if result.stability is None and result.uncertainty is None:
        return []
    from dicom_node.outputs.derived_pet import derived_instance_uids
    from dicom_node.outputs.maps import write_map_series

    if not volume.units and "pm" in formats:
        # A Parametric Map states its units; a series without Units gets the Secondary Capture only.
        logger.warning("series=%s has no Units: its maps are written as Secondary Capture only, without the "
                       "Parametric Map", volume.series_uid)
        formats = [f for f in formats if f != "pm"]
        if not formats:
            return []
    written: list[Any] = []
    instance_uids: list[str] | None = None
    for kind in ("stability", "uncertainty"):
        values = getattr(result, kind, None)
        if values is None:
            continue
        if instance_uids is None:
            instance_uids = list(derived_instance_uids(volume, output_uid))
        shown, window, label = map_display(kind, np.asarray(values, dtype=np.float32), result.info or {})
        written += write_map_series(volume, np.asarray(values, dtype=np.float32), kind=kind,
                                    derived_series_uid=output_uid, derived_instance_uids=instance_uids,
                                    provenance=provenance, out_dir=out_dir, units=volume.units,
                                    display=shown, window=window, display_label=label, formats=tuple(formats))
    return written


def _prior_info(prepared: Any) -> dict[str, Any]:
    """What the provenance says about the prior: how it was put on the PET grid, and the registration's measures."""
    if prepared is None:
        return {}
    out: dict[str, Any] = {"prior": prepared.method}
    for key in ("mi_ratio", "rotation_deg", "shift_mm"):
        value = (prepared.registration or {}).get(key)
        if value is not None:
            out[f"registration_{key}"] = value
    return out


def _json_safe(info: Any) -> dict[str, Any]:
    """The denoiser's info with numpy scalars as plain numbers and anything bulky left out (it goes into
    a 1024-character DICOM text)."""
    out: dict[str, Any] = {}
    for key, value in dict(info or {}).items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float):
            value = float(f"{value:.6g}")
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[str(key)] = value
    return out


def _save_maps(result: DenoiseResult, out_dir: Path) -> dict[str, Path]:
    """Keep the maps a method produced (stability, uncertainty) beside the derived series, as float32 .npy.

    Written into DICOM (Secondary Capture / Parametric Map) by the map writers; until then they are kept, not
    discarded, and recorded in the result.
    """
    saved: dict[str, Path] = {}
    for kind in ("stability", "uncertainty"):
        volume = getattr(result, kind, None)
        if volume is None:
            continue
        path = out_dir / "maps" / f"{kind}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(volume, dtype=np.float32))
        saved[kind] = path
    return saved
