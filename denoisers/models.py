"""Model registry: trained weights, their cards, versions, checksums, and which version is active.

The plugin registry (``denoisers.registry``) says which denoiser *classes* exist; this module says which trained
*weights* are installed. A store is a plain folder that a physicist can inspect::

    root/
      audit.log                   one JSON line per change: time (UTC), user, action, model, version, details
      .lock                       fcntl.flock'ed around every change (several processes may administer at once)
      shipped.json                shipped versions already seen (a removed shipped version is not re-added)
      <name>/
        ACTIVE                    the active version, one line; replaced atomically (temp + fsync + os.replace)
        <version>/
          card.yaml               the ModelCard, including the weights' sha256
          <weights file>          e.g. weights.pt, a plain state dict
          RETIRED                 present when the version is retired (holds who, when and why)

Versions are immutable: a version directory appears whole (staged beside the store, then renamed into place) and
is never rewritten; a new model is a new version. Readers never take the lock: the rename and ``os.replace``
make every change atomic for them, so a running node reads ``ACTIVE`` per series and picks up an activation
without a restart.

Pure: no DICOM, no network. ``torch`` is imported only by ``load_weights``, which always uses
``torch.load(..., weights_only=True)`` so a weights file cannot run code.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import difflib
import fcntl
import getpass
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from denoisers.errors import ModelRegistryError, WeightsError

logger = logging.getLogger(__name__)

__all__ = [
    "ModelCard",
    "ModelInfo",
    "ModelStore",
    "ModelVersion",
    "Problem",
    "ResolvedModel",
    "ShippedRegistration",
    "VersionState",
    "card_from_mapping",
    "check_card",
    "check_name",
    "check_version",
    "format_ref",
    "load_card",
    "load_weights",
    "parse_ref",
    "read_card_fields",
    "sha256_file",
    "version_key",
]

CARD_FILE = "card.yaml"
ACTIVE_FILE = "ACTIVE"
RETIRED_FILE = "RETIRED"
AUDIT_FILE = "audit.log"
LOCK_FILE = ".lock"
SHIPPED_FILE = "shipped.json"
SHIPPED_USER = "petnode (shipped)"
_STAGING_DIR = ".staging"

# Model names become folder names and appear in rules files: lowercase, no dots (so they can never collide with
# the store's own files such as audit.log), like rule names.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_RESERVED_VERSIONS = frozenset({ACTIVE_FILE.lower(), RETIRED_FILE.lower(), CARD_FILE})
_DENOISER_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

State = Literal["active", "available", "retired", "broken"]


# --------------------------------------------------------------------------------------------------------------
# Names and references


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ModelRegistryError saying what is allowed."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ModelRegistryError(
            f"model name {name!r} is not valid: use 1-64 lowercase letters, digits, '-' or '_', starting with a "
            "letter or digit (e.g. 'unet-fdg')"
        )
    return name


def check_version(version: str) -> str:
    """Return ``version`` if it is a valid version, else raise ModelRegistryError saying what is allowed."""
    if not isinstance(version, str) or not _VERSION_RE.match(version) or version.lower() in _RESERVED_VERSIONS:
        raise ModelRegistryError(
            f"model version {version!r} is not valid: use 1-64 letters, digits, '.', '_', '+' or '-', starting "
            "with a letter or digit (e.g. '1.0.0')"
        )
    return version


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``"name"`` or ``"name@version"`` into ``(name, version or None)``.

    Raises
    ------
    ModelRegistryError
        The text is not NAME or NAME@VERSION with a valid name and version.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRegistryError(
            f"model reference {ref!r} is empty: give NAME or NAME@VERSION (e.g. 'unet-fdg' or 'unet-fdg@1.0.0')"
        )
    name, sep, version = ref.strip().partition("@")
    try:
        check_name(name)
        if sep:
            check_version(version)
    except ModelRegistryError as exc:
        raise ModelRegistryError(f"model reference {ref!r}: {exc}; write NAME or NAME@VERSION") from None
    return name, (version if sep else None)


def format_ref(name: str, version: str | None) -> str:
    """``name@version`` (or ``name``)."""
    return name if version is None else f"{name}@{version}"


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key: ``1.10.0`` after ``1.9.0``; numbers before text at the same position."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|[^\d.+_-]+", version))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _short(sha: str) -> str:
    return sha[:12]


# --------------------------------------------------------------------------------------------------------------
# The model card


def _utc(value: dt.datetime) -> dt.datetime:
    # A card written by hand may carry a naive time; cards are compared and audited in UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _petnode_version() -> str:
    # Not dicom_node.__version__: denoisers must not import the service package.
    from importlib import metadata

    try:
        return metadata.version("petnode")
    except metadata.PackageNotFoundError:
        return "unknown"


class ModelCard(BaseModel):
    """What one trained model version is, how it was made, and which series it may be used on.

    Written as ``card.yaml`` beside the weights. Only ``name``, ``version``, ``denoiser``, ``weights_file`` and
    ``sha256`` are required (the store fills ``created`` and ``petnode_version`` when absent); the other fields
    default to "unknown" values (empty text, ``units: any``) that ``check_card`` treats as "no restriction".

    ``expected_voxel_mm`` is (dz, dy, dx) in mm, the order of ``DenoiseInputs.spacing``; ``voxel_tolerance`` is
    relative (0.15 = 15 % per axis).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    denoiser: str
    architecture: str = ""
    description: str = ""
    input_slices: int = Field(1, ge=1)
    inputs: tuple[Literal["pet", "mr_prior", "ct_prior"], ...] = ("pet",)
    expected_voxel_mm: tuple[float, float, float] | None = None
    voxel_tolerance: float = Field(0.15, gt=0, lt=1)
    units: Literal["BQML", "SUV", "any"] = "any"
    normalisation: str = "none"
    tracers: tuple[str, ...] = ()
    scanners: tuple[str, ...] = ()
    count_level: str | None = None
    training_data: str = ""
    loss: str = ""
    epochs: int = Field(0, ge=0)
    validation_metrics: dict[str, float] = Field(default_factory=dict)
    created: dt.datetime
    petnode_version: str
    weights_file: str
    sha256: str
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return check_name(value)
        except ModelRegistryError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML reads an unquoted 1.0 as a float; "1.0" was meant, but 1.10 would become 1.1: refuse.
            raise ValueError(f"version {value!r} was read as a number: quote it in the card (version: \"1.0.0\")")
        try:
            return check_version(value)
        except ModelRegistryError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("units", mode="before")
    @classmethod
    def _units(cls, value: Any) -> Any:
        # Case is not meaningful to a reader ("bqml", "suv"); the card stores the canonical spelling.
        if isinstance(value, str):
            return {"bqml": "BQML", "suv": "SUV", "any": "any"}.get(value.strip().lower(), value)
        return value

    @field_validator("denoiser")
    @classmethod
    def _denoiser(cls, value: str) -> str:
        if not _DENOISER_RE.match(value):
            raise ValueError(f"denoiser {value!r} is not a plugin name (lowercase, e.g. 'cnn'; see "
                             "`petnode denoisers list`)")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "pet" not in value:
            raise ValueError(f"inputs {list(value)} must include 'pet'")
        if len(set(value)) != len(value):
            raise ValueError(f"inputs {list(value)} lists an input twice")
        return value

    @field_validator("expected_voxel_mm")
    @classmethod
    def _voxel(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(v > 0 for v in value):
            raise ValueError(f"expected_voxel_mm {list(value)} must be three positive sizes in mm (dz, dy, dx)")
        return value

    @field_validator("created")
    @classmethod
    def _created(cls, value: dt.datetime) -> dt.datetime:
        return _utc(value)

    @field_validator("weights_file")
    @classmethod
    def _weights_file(cls, value: str) -> str:
        if (not value or value != Path(value).name or value.startswith(".") or value in (CARD_FILE, RETIRED_FILE)
                or "\\" in value):
            raise ValueError(f"weights_file {value!r} must be a plain file name (no folders, not hidden, not "
                             f"{CARD_FILE!r} or {RETIRED_FILE!r}), e.g. 'weights.pt'")
        return value

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha(cls, value: Any) -> Any:
        text = value.strip().lower() if isinstance(value, str) else value
        if not isinstance(text, str) or not _SHA_RE.match(text):
            raise ValueError(f"sha256 {value!r} must be 64 hexadecimal digits (what `sha256sum` prints)")
        return text

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _format_card_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            hint = _did_you_mean(str(err["loc"][0]), ModelCard.model_fields)
            lines.append(f"{source}: unknown key {key!r}{hint}")
        elif err["type"] == "missing":
            lines.append(f"{source}: key {key!r} is missing")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: key {key!r} = {err.get('input')!r}: {msg}")
    return "\n".join(lines)


def card_from_mapping(data: Mapping[str, Any], *, source: str = "model card") -> ModelCard:
    """Validate a card from a mapping; ModelRegistryError names each bad key and value (and did-you-mean)."""
    if not isinstance(data, Mapping):
        raise ModelRegistryError(f"{source}: a model card must be a mapping of keys, got {type(data).__name__}")
    try:
        return ModelCard.model_validate(dict(data))
    except ValidationError as exc:
        raise ModelRegistryError(_format_card_error(source, exc)) from None


def read_card_fields(path: Path) -> dict[str, Any]:
    """The raw mapping in a ``card.yaml`` (not validated; ``card_from_mapping`` validates)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelRegistryError(f"cannot read model card {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelRegistryError(f"model card {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelRegistryError(f"model card {str(path)!r} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_card(path: Path) -> ModelCard:
    """Read and validate ``card.yaml`` (ModelRegistryError naming the file, key and value)."""
    return card_from_mapping(read_card_fields(Path(path)), source=str(path))


# --------------------------------------------------------------------------------------------------------------
# Weights


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: Path, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Load a state dict with ``torch.load(..., map_location="cpu", weights_only=True)``.

    The file is read once into memory; when ``expected_sha256`` is given those same bytes are hashed, so the
    weights loaded are exactly the weights checked (no window for the file to change in between).

    Raises
    ------
    WeightsError
        Unreadable file, checksum mismatch, PyTorch missing, not loadable with ``weights_only=True`` (a pickled
        model object rather than a state dict), or not a mapping.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc.strerror or exc}") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise WeightsError(
                f"weights file {str(path)!r} fails its checksum (sha256 {_short(actual)}..., card says "
                f"{_short(expected_sha256)}...): it was changed or corrupted; restore it or re-import the model"
            )
    return _load_state_dict(data, source=repr(str(path)))


# --------------------------------------------------------------------------------------------------------------
# Checking a card against a series


_INPUT_WORDS = {"pet": "a PET volume", "mr_prior": "an MR prior (mr_prior)", "ct_prior": "a CT prior (ct_prior)"}


def check_card(
    card: ModelCard,
    *,
    spacing_mm: tuple[float, float, float] | Iterable[float],
    units: str,
    provided_inputs: Iterable[str],
    suv_available: bool = True,
    tracer: str | None = None,
    denoiser: str | None = None,
    resample: bool = False,
) -> str | None:
    """Why a series cannot use this model, or None when it can.

    Parameters
    ----------
    card
        The model's card.
    spacing_mm
        The series' voxel size (dz, dy, dx) in mm.
    units
        The series' Units (0054,1001), e.g. ``"BQML"``.
    provided_inputs
        Input kinds the pipeline can supply (``"pet"``, ``"mr_prior"``, ``"ct_prior"``; InputKind values work).
    suv_available
        Whether the series has the attributes SUVbw needs (a ``units: SUV`` model gets BQML * SUV factor).
    tracer
        The series' canonical tracer name (``dicom_node.tracers``); refused only when the card lists tracers
        and this one is not among them. None: not checked.
    denoiser
        The plugin the rule runs; refused when the card is for another plugin. None: not checked.
    resample
        The rule lets the plugin resample the series to the card's voxel size: another voxel size is no reason.
    """
    ref = card.ref
    if denoiser is not None and denoiser != card.denoiser:
        return (f"model {ref} is for the {card.denoiser!r} denoiser but the rule runs {denoiser!r}: set the rule's "
                f"denoiser name to {card.denoiser!r}, or name a model made for {denoiser!r}")
    provided = {str(kind) for kind in provided_inputs}
    missing = [kind for kind in card.inputs if kind not in provided]
    if missing:
        needs = " and ".join(_INPUT_WORDS.get(k, k) for k in missing)
        return (f"model {ref} needs {needs}, which this series does not have: route the series to a model that "
                "does not need it, or make the prior available in the same study")
    spacing = tuple(float(s) for s in spacing_mm)
    if card.expected_voxel_mm is not None and not resample:
        if len(spacing) != 3:
            return f"voxel size {spacing} is not (dz, dy, dx) in mm"
        off = [abs(s - e) / e for s, e in zip(spacing, card.expected_voxel_mm)]
        if max(off) > card.voxel_tolerance:
            shown = " x ".join(f"{s:.2f}" for s in spacing)
            wanted = " x ".join(f"{e:.2f}" for e in card.expected_voxel_mm)
            return (f"voxel size {shown} mm (z, y, x) is outside what model {ref} was trained on ({wanted} mm "
                    f"within {card.voxel_tolerance:.0%}): route this series to a model trained at this voxel "
                    "size, or to a method without weights (e.g. gaussian)")
    if card.units == "BQML" and units != "BQML":
        return (f"model {ref} expects activity concentration in Bq/ml (Units BQML) but the series has Units "
                f"{units or '(empty)'!r}: send the attenuation- and decay-corrected series, or route this one "
                "elsewhere")
    if card.units == "SUV" and not (units == "GML" or (units == "BQML" and suv_available)):
        why = "the SUV attributes (patient weight, dose, times) are missing" if units == "BQML" else (
            f"its Units are {units or '(empty)'!r}, not BQML")
        return (f"model {ref} works in SUV but this series cannot be converted to SUV: {why}; fix the series "
                "at the scanner, or route it to a model with units 'any'")
    if tracer is not None and card.tracers:
        if tracer.lower() not in {t.lower() for t in card.tracers}:
            return (f"model {ref} was trained on {', '.join(card.tracers)}, not {tracer}: route {tracer} series "
                    "to a model trained on it")
    return None


# --------------------------------------------------------------------------------------------------------------
# What the store returns


@dataclass(frozen=True)
class ModelVersion:
    """One installed version: its card and where its files are."""

    name: str
    version: str
    card: ModelCard
    directory: Path
    active: bool
    retired: bool
    retired_note: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def weights_path(self) -> Path:
        return self.directory / self.card.weights_file

    @property
    def state(self) -> State:
        return "active" if self.active else "retired" if self.retired else "available"


@dataclass(frozen=True)
class VersionState:
    """One version as ``list()`` sees it; ``card`` is None and ``problem`` set when it is broken."""

    version: str
    state: State
    card: ModelCard | None
    problem: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One model name with its versions, oldest first."""

    name: str
    active: str | None
    versions: tuple[VersionState, ...]


@dataclass(frozen=True)
class Problem:
    """Something ``verify`` (or shipped registration) found wrong, and what to do about it."""

    model: str
    version: str | None
    message: str

    def __str__(self) -> str:
        return f"{format_ref(self.model, self.version)}: {self.message}"


@dataclass(frozen=True)
class ResolvedModel:
    """What the node needs to run a model: checked card and weights, and the ref recorded in provenance."""

    name: str
    version: str
    card: ModelCard
    weights_path: Path
    pinned: bool

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ShippedRegistration:
    """What ``register_shipped`` did: versions added, versions activated, problems (never raised)."""

    registered: tuple[str, ...] = ()
    activated: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()


def _user() -> str:
    for var in ("PETNODE_USER", "SUDO_USER"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # getpass raises KeyError/OSError when the uid has no passwd entry (containers)
        return f"uid {os.getuid()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------------------
# The store


class ModelStore:
    """Installed model versions under ``root`` (see the module docstring for the layout).

    Every change runs under an exclusive ``fcntl.flock`` on ``root/.lock``, so several ``petnode models``
    commands (and the node) can work on one store at once; the lock is re-entrant within a thread. Reads take no
    lock. Safe to share between threads.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._hash_cache: dict[tuple[str, int, int, int], str] = {}
        self._cache_lock = threading.Lock()
        self._held = threading.local()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ---------------------------------------------------------------- locking, audit, small file helpers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("model store %s is busy (another petnode command is changing it); waiting", self.root)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _audit(self, action: str, model: str, version: str | None, details: Mapping[str, Any] | None = None,
               *, user: str | None = None) -> None:
        entry = {
            "time": _now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "user": user or _user(),
            "action": action,
            "model": model,
            "version": version,
            "details": dict(details or {}),
        }
        line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode("utf-8")
        with self._locked():
            fd = os.open(self.root / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        logger.info("models: %s %s by %s %s", action, format_ref(model, version), entry["user"],
                    json.dumps(entry["details"], default=str))

    def _model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def _names(self) -> builtins.list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def _versions(self, name: str) -> builtins.list[str]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = [p.name for p in model_dir.iterdir()
                 if p.is_dir() and _VERSION_RE.match(p.name) and p.name.lower() not in _RESERVED_VERSIONS]
        return sorted(found, key=version_key)

    def _read_active(self, name: str) -> str | None:
        try:
            text = (self.root / name / ACTIVE_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ModelRegistryError(f"cannot read the active version of {name!r}: {exc.strerror or exc}") from None
        if text and (not _VERSION_RE.match(text) or text.lower() in _RESERVED_VERSIONS):
            raise ModelRegistryError(f"{str(self.root / name / ACTIVE_FILE)!r} holds {text[:40]!r}, not a version: "
                                     f"activate a version again (`petnode models activate {name}@VERSION`)")
        return text or None

    def _active_or_none(self, name: str) -> str | None:
        try:
            return self._read_active(name)
        except ModelRegistryError:
            return None

    def _write_active(self, name: str, version: str) -> None:
        model_dir = self._model_dir(name)
        tmp = model_dir / f".{ACTIVE_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            _write_file_durably(tmp, f"{version}\n".encode())
            os.replace(tmp, model_dir / ACTIVE_FILE)  # atomic: readers see the old or the new version, never half
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(model_dir)

    def _retired_note(self, version_dir: Path) -> str | None:
        marker = version_dir / RETIRED_FILE
        try:
            return marker.read_text(encoding="utf-8").strip() or "retired"
        except FileNotFoundError:
            return None

    def _staging(self) -> Path:
        staging = self.root / _STAGING_DIR / f"{os.getpid()}-{secrets.token_hex(6)}"
        staging.mkdir(parents=True)
        return staging

    def _cached_sha(self, path: Path) -> str:
        """sha256 of ``path``, re-hashed only when (inode, mtime, size) changed (big weights, one per series)."""
        st = path.stat()
        key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            cached = self._hash_cache.get(key)
        if cached is not None:
            return cached
        digest = sha256_file(path)
        with self._cache_lock:
            self._hash_cache = {k: v for k, v in self._hash_cache.items() if k[0] != key[0]}
            self._hash_cache[key] = digest
        return digest

    def _activation_hint(self, name: str, exclude: str) -> str:
        """``activate another version first (`petnode models activate x@y`)`` naming the best candidate."""
        others = [v for v in self._versions(name) if v != exclude]
        usable = [v for v in others if not (self.root / name / v / RETIRED_FILE).exists()]
        if usable:
            return f"activate another version first (`petnode models activate {name}@{usable[-1]}`)"
        if others:
            return (f"activate another version first (the others are retired: `petnode models activate "
                    f"{name}@{others[-1]} --unretire`)")
        return "add a replacement version and activate it first"

    def _unknown_model(self, name: str) -> str:
        names = self._names()
        installed = ", ".join(names) if names else "none"
        return (f"no model named {name!r} in {str(self.root)!r}{_did_you_mean(name, names)}; installed: "
                f"{installed} (see `petnode models list`)")

    def _unknown_version(self, name: str, version: str) -> str:
        versions = self._versions(name)
        return (f"model {name!r} has no version {version!r}{_did_you_mean(version, versions)}; installed "
                f"versions: {', '.join(versions) or 'none'}")

    def _load_version(self, name: str, version: str, *, active: str | None = None) -> ModelVersion:
        version_dir = self.root / name / version
        card = load_card(version_dir / CARD_FILE)
        if (card.name, card.version) != (name, version):
            raise ModelRegistryError(
                f"{str(version_dir / CARD_FILE)!r} describes {card.ref}, but it is stored as {name}@{version}: "
                "the folder was renamed or the card replaced; restore it or remove this version"
            )
        note = self._retired_note(version_dir)
        return ModelVersion(name=name, version=version, card=card, directory=version_dir,
                            active=(active == version), retired=note is not None, retired_note=note)

    # ---------------------------------------------------------------- reading

    parse_ref = staticmethod(parse_ref)

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """One installed version; ``version=None`` means the active one.

        Raises
        ------
        ModelRegistryError
            Unknown model or version (with did-you-mean), no active version, or an unreadable card.
        """
        check_name(name)
        if not (self.root / name).is_dir():
            raise ModelRegistryError(self._unknown_model(name))
        # A garbled ACTIVE must not stop work on a named version (activating one is how it gets repaired).
        active = self._read_active(name) if version is None else self._active_or_none(name)
        if version is None:
            if active is None:
                versions = self._versions(name)
                hint = f"`petnode models activate {name}@{versions[-1]}`" if versions else "add a version first"
                raise ModelRegistryError(f"model {name!r} has no active version: activate one with {hint}")
            version = active
        check_version(version)
        if not (self.root / name / version).is_dir():
            if version == active:
                raise ModelRegistryError(
                    f"the active version of {name!r} is {version!r}, which is not installed: activate an installed "
                    f"version ({', '.join(self._versions(name)) or 'none'})"
                )
            raise ModelRegistryError(self._unknown_version(name, version))
        return self._load_version(name, version, active=active)

    def list(self) -> builtins.list[ModelInfo]:
        """Every model and version with its state (cheap checks only: card readable, weights present;
        ``verify`` re-hashes)."""
        out = []
        for name in self._names():
            try:
                active = self._read_active(name)
            except ModelRegistryError:
                active = None
            states = []
            for version in self._versions(name):
                try:
                    mv = self._load_version(name, version, active=active)
                except ModelRegistryError as exc:
                    states.append(VersionState(version, "broken", None, str(exc)))
                    continue
                if not mv.weights_path.is_file():
                    states.append(VersionState(version, "broken", mv.card,
                                               f"weights file {mv.card.weights_file!r} is missing"))
                    continue
                states.append(VersionState(version, mv.state, mv.card))
            out.append(ModelInfo(name=name, active=active, versions=tuple(states)))
        return out

    def history(self, limit: int | None = 20, *, model: str | None = None) -> builtins.list[dict[str, Any]]:
        """The last ``limit`` audit entries (oldest first), optionally for one model only."""
        try:
            lines = (self.root / AUDIT_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON; skipped", self.root / AUDIT_FILE, number)
                continue
            if model is None or entry.get("model") == model:
                entries.append(entry)
        return entries if limit is None else entries[-limit:] if limit > 0 else []

    def resolve(self, ref: str) -> ResolvedModel:
        """Card and checked weights for a rule's ``model`` (``name`` = active version, ``name@version`` pinned).

        Reads ``ACTIVE`` on every call, so an activation reaches a running node at its next series. The weights'
        sha256 is verified every call (cached by inode, mtime and size, so big files are not re-read per series;
        an edit that restores all three is caught by ``verify``, which never uses the cache, and by
        ``load_weights(..., expected_sha256=card.sha256)``, which hashes the very bytes it loads).
        Retired versions are never used: an unpinned ref never points at one, and a pinned one is refused.

        Raises
        ------
        WeightsError
            For every reason the weights cannot be used; the message says what to do.
        """
        try:
            name, version = parse_ref(ref)
        except ModelRegistryError as exc:
            raise WeightsError(str(exc)) from None
        if not (self.root / name).is_dir():
            raise WeightsError(self._unknown_model(name) + "; add or import it, or change the rule's model")
        try:
            active = self._read_active(name)
        except ModelRegistryError as exc:
            raise WeightsError(str(exc)) from None
        pinned = version is not None
        if version is None:
            if active is None:
                raise WeightsError(f"model {name!r} has no active version: activate one with `petnode models "
                                   f"activate {name}@VERSION` (installed: {', '.join(self._versions(name)) or 'none'})")
            version = active
        if not (self.root / name / version).is_dir():
            if pinned:
                raise WeightsError(self._unknown_version(name, version) + "; change the rule's model to an "
                                   "installed version, or import that version")
            raise WeightsError(f"the active version of {name!r} is {version!r}, which is not installed: activate "
                               f"an installed version ({', '.join(self._versions(name)) or 'none'})")
        try:
            mv = self._load_version(name, version, active=active)
        except ModelRegistryError as exc:
            raise WeightsError(f"model {name}@{version} cannot be used: {exc}") from None
        if mv.retired:
            if pinned:
                raise WeightsError(
                    f"model {mv.ref} is retired ({mv.retired_note}) and a rule pins it: change the rule's model to "
                    f"{name!r} (the active version{f', {active}' if active else ''}) or to another version, or "
                    f"bring it back with `petnode models activate {mv.ref} --unretire`"
                )
            raise WeightsError(f"the active version of {name!r}, {version}, is marked retired: activate another "
                               "version (`petnode models list` shows them)")
        weights = mv.weights_path
        if not weights.is_file():
            raise WeightsError(f"weights file {str(weights)!r} of model {mv.ref} is missing: restore it from a "
                               f"backup or export, or remove this version (`petnode models remove {mv.ref}`)")
        actual = self._cached_sha(weights)
        if actual != mv.card.sha256:
            raise WeightsError(
                f"weights of model {mv.ref} fail their checksum (sha256 {_short(actual)}..., card says "
                f"{_short(mv.card.sha256)}...): the file was changed or corrupted; restore it, or remove this "
                f"version and import it again (`petnode models verify` checks every model)"
            )
        logger.debug("resolved model %s -> %s", ref, mv.ref)
        return ResolvedModel(name=name, version=version, card=mv.card, weights_path=weights, pinned=pinned)

    def verify(self) -> builtins.list[Problem]:
        """Re-hash every version and check cards, weights and ACTIVE pointers; an empty list means all is well."""
        problems: builtins.list[Problem] = []
        for name in self._names():
            versions = self._versions(name)
            try:
                active = self._read_active(name)
            except ModelRegistryError as exc:
                problems.append(Problem(name, None, str(exc)))
                active = None
            for version in versions:
                ref = f"{name}@{version}"
                try:
                    mv = self._load_version(name, version, active=active)
                except ModelRegistryError as exc:
                    problems.append(Problem(name, version, f"{exc}; restore card.yaml from a backup or export, or "
                                                           f"remove this version (`petnode models remove {ref}`)"))
                    continue
                weights = mv.weights_path
                if not weights.is_file():
                    problems.append(Problem(name, version, f"weights file {str(weights)!r} is missing: restore it "
                                                           f"or remove this version (`petnode models remove {ref}`)"))
                    continue
                actual = sha256_file(weights)  # verify never trusts the cache
                if actual != mv.card.sha256:
                    problems.append(Problem(name, version, (
                        f"weights changed since they were added (sha256 {_short(actual)}..., card says "
                        f"{_short(mv.card.sha256)}...): the file is corrupt or was tampered with; restore it from a "
                        f"backup, or remove this version and import it again from an export")))
                if mv.active and mv.retired:
                    problems.append(Problem(name, version, "is active but marked retired: activate another version"))
            if active is not None and active not in versions:
                problems.append(Problem(name, None, (
                    f"ACTIVE names version {active!r}, which is not installed: activate an installed version "
                    f"({', '.join(versions) or 'none'})")))
        return problems

    # ---------------------------------------------------------------- changing

    def add(
        self,
        weights_path: Path,
        card: Mapping[str, Any] | Path | None = None,
        *,
        name: str,
        version: str,
        activate: bool = False,
        check_loadable: bool = True,
        user: str | None = None,
        source: str | None = None,
    ) -> ModelVersion:
        """Install a new version: copy the weights, compute their sha256, write the card.

        Parameters
        ----------
        weights_path
            The trained weights (a state dict saved with ``torch.save``).
        card
            Card fields, or the path of a ``card.yaml``. ``name``, ``version``, ``weights_file`` (default: the
            weights' file name), ``sha256``, ``created`` and ``petnode_version`` are filled in; a ``sha256`` or
            ``name``/``version`` already in the card must agree.
        activate
            Make it the active version at once.
        check_loadable
            Load the weights with ``weights_only=True`` first, so a file the node could not load is refused now.
        source
            How to name the card fields in error messages (e.g. the card file and the command line).

        Raises
        ------
        ModelRegistryError
            Bad name/version/card, or the version already exists (versions are immutable).
        WeightsError
            Weights missing, unloadable, or not matching the card's sha256.
        """
        check_name(name)
        check_version(version)
        weights_path = Path(weights_path)
        if isinstance(card, (str, Path)):
            fields = read_card_fields(Path(card))
            source = source or str(card)
        else:
            fields = dict(card or {})
            source = source or "card fields"
        for key, given in (("name", name), ("version", version)):
            if key in fields and fields[key] is not None and str(fields[key]) != given:
                raise ModelRegistryError(f"{source}: the card says {key} {fields[key]!r} but {given!r} was given: "
                                         f"make them agree, or leave {key!r} out of the card")
        if not weights_path.is_file():
            raise WeightsError(f"weights file {str(weights_path)!r} does not exist or is not a file: give the path "
                               "of the trained weights (e.g. weights.pt)")
        sha = sha256_file(weights_path)
        expected = fields.get("sha256")
        if expected is not None and str(expected).strip().lower() != sha:
            raise WeightsError(f"{str(weights_path)!r} does not match the card's sha256 (file {_short(sha)}..., "
                               f"card {_short(str(expected))}...): wrong file or wrong card; check which belongs "
                               "to which, or leave sha256 out of the card to record this file's")
        fields.update(name=name, version=version, sha256=sha)
        fields["weights_file"] = fields.get("weights_file") or weights_path.name
        fields.setdefault("created", _now())
        fields.setdefault("petnode_version", _petnode_version())
        model_card = card_from_mapping(fields, source=source)
        if check_loadable:
            load_weights(weights_path, expected_sha256=sha)
        staging = self._staging()
        try:
            digest = hashlib.sha256()
            with open(weights_path, "rb") as src, open(staging / model_card.weights_file, "wb") as dst:
                for block in iter(lambda: src.read(_CHUNK), b""):
                    digest.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            if digest.hexdigest() != sha:
                raise WeightsError(f"{str(weights_path)!r} changed while it was being added: add it again once "
                                   "whatever writes it has finished")
            _write_file_durably(staging / CARD_FILE, model_card.to_yaml().encode("utf-8"))
            with self._locked():
                mv = self._install(staging, model_card)
                self._audit("add", name, version, {"sha256": sha, "weights_file": model_card.weights_file,
                                                   "source": str(weights_path)}, user=user)
                if activate:
                    self.activate(name, version, user=user)
                    mv = dataclasses.replace(mv, active=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return mv

    def _install(self, staging: Path, card: ModelCard) -> ModelVersion:
        """Move a complete staged version into place (caller holds the lock)."""
        model_dir = self._model_dir(card.name)
        target = model_dir / card.version
        if target.exists():
            raise ModelRegistryError(
                f"model {card.ref} already exists; versions never change once added: give the new weights a new "
                f"version (e.g. --version {_next_version(card.version)}), or remove the old one first "
                f"(`petnode models remove {card.ref}`)"
            )
        model_dir.mkdir(parents=True, exist_ok=True)
        _fsync_dir(staging)
        os.rename(staging, target)  # the whole version appears at once
        _fsync_dir(model_dir)
        _fsync_dir(self.root)
        return ModelVersion(name=card.name, version=card.version, card=card, directory=target,
                            active=False, retired=False)

    def activate(self, name: str, version: str, *, unretire: bool = False, user: str | None = None) -> ModelVersion:
        """Make ``version`` the active version of ``name`` (atomically; a running node uses it from its next series).

        The weights are re-hashed first: a damaged version is never activated. A retired version is refused
        unless ``unretire`` (which removes its RETIRED marker).

        Raises
        ------
        ModelRegistryError, WeightsError
        """
        check_name(name)
        check_version(version)
        with self._locked():
            mv = self.get(name, version)
            if not mv.weights_path.is_file():
                raise WeightsError(f"cannot activate {mv.ref}: its weights file {str(mv.weights_path)!r} is missing; "
                                   "restore it or remove this version")
            actual = sha256_file(mv.weights_path)
            if actual != mv.card.sha256:
                raise WeightsError(f"cannot activate {mv.ref}: its weights fail their checksum (sha256 "
                                   f"{_short(actual)}..., card says {_short(mv.card.sha256)}...); restore the file "
                                   "or import the model again")
            details: dict[str, Any] = {}
            if mv.retired:
                if not unretire:
                    raise ModelRegistryError(
                        f"{mv.ref} is retired ({mv.retired_note}): to bring it back into use run `petnode models "
                        f"activate {mv.ref} --unretire`"
                    )
                (mv.directory / RETIRED_FILE).unlink()
                _fsync_dir(mv.directory)
                details["unretired"] = True
            previous = self._active_or_none(name)
            self._write_active(name, version)
            details["previous"] = previous
            self._audit("activate", name, version, details, user=user)
        return dataclasses.replace(mv, active=True, retired=False, retired_note=None)

    def retire(self, name: str, version: str, *, reason: str = "", user: str | None = None) -> ModelVersion:
        """Mark a version retired: kept for the record, never used by an unpinned ref, refused when pinned.

        Raises
        ------
        ModelRegistryError
            Unknown version, or it is the active version (activate another first).
        """
        with self._locked():
            mv = self.get(name, version)
            if mv.active:
                hint = self._activation_hint(name, version)
                if not self._versions(name)[1:]:
                    hint += f", or remove the model (`petnode models remove {mv.ref}`)"
                raise ModelRegistryError(f"{mv.ref} is the active version of {name!r} and cannot be retired while "
                                         f"in use: {hint}, then retire it")
            if mv.retired:
                return mv
            who = user or _user()
            note = f"retired {_now().isoformat(timespec='seconds')} by {who}" + (f": {reason}" if reason else "")
            _write_file_durably(mv.directory / RETIRED_FILE, (note + "\n").encode("utf-8"))
            _fsync_dir(mv.directory)
            self._audit("retire", name, version, {"reason": reason}, user=user)
        return dataclasses.replace(mv, retired=True, retired_note=note)

    def remove(
        self,
        name: str,
        version: str,
        *,
        in_use: Callable[[str, str], str | None] | None = None,
        user: str | None = None,
    ) -> None:
        """Delete a version (card and weights).

        Parameters
        ----------
        in_use
            Called under the lock with ``(name, version)``; a returned reason (e.g. "rule 'x' pins it") refuses
            the removal. The node's CLI passes a check of the rules file.

        Raises
        ------
        ModelRegistryError
            Unknown version, in use, or the active version while other versions exist.
        """
        check_name(name)
        check_version(version)
        with self._locked():
            version_dir = self.root / name / version
            if not version_dir.is_dir():
                if not (self.root / name).is_dir():
                    raise ModelRegistryError(self._unknown_model(name))
                raise ModelRegistryError(self._unknown_version(name, version))
            try:
                sha: str | None = self.get(name, version).card.sha256
            except ModelRegistryError:
                sha = None  # a broken version (unreadable card) can still be removed
            active = self._active_or_none(name)
            others = [v for v in self._versions(name) if v != version]
            if active == version and others:
                raise ModelRegistryError(f"{name}@{version} is the active version of {name!r}: "
                                         f"{self._activation_hint(name, version)}, then remove it")
            if in_use is not None:
                reason = in_use(name, version)
                if reason:
                    raise ModelRegistryError(f"{name}@{version} is in use and was not removed: {reason}")
            trash = self._staging()
            try:
                os.rename(version_dir, trash / version)  # gone from the store at once, deleted below
                if not others:
                    (self.root / name / ACTIVE_FILE).unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        (self.root / name).rmdir()
                _fsync_dir(self.root)
                self._audit("remove", name, version, {"sha256": sha, "was_active": active == version}, user=user)
            finally:
                shutil.rmtree(trash, ignore_errors=True)

    # ---------------------------------------------------------------- moving between stores

    def export(self, name: str, version: str | None, file: Path, *, user: str | None = None) -> Path:
        """Write ``NAME/VERSION/card.yaml`` and the weights to ``file`` (``.tar.gz``/``.tgz`` or ``.zip``).

        The weights are verified first (a damaged model is not passed on). An existing file is not overwritten.

        Raises
        ------
        ModelRegistryError, WeightsError
        """
        file = Path(file)
        kind = _archive_kind(file)
        mv = self.get(name, version)
        data = mv.weights_path.read_bytes() if mv.weights_path.is_file() else None
        if data is None:
            raise WeightsError(f"cannot export {mv.ref}: its weights file {str(mv.weights_path)!r} is missing")
        if hashlib.sha256(data).hexdigest() != mv.card.sha256:
            raise WeightsError(f"cannot export {mv.ref}: its weights fail their checksum; run `petnode models "
                               "verify` and restore the file first")
        if file.exists():
            raise ModelRegistryError(f"{str(file)!r} already exists: choose another file name or delete it first")
        members = {f"{mv.name}/{mv.version}/{CARD_FILE}": mv.card.to_yaml().encode("utf-8"),
                   f"{mv.name}/{mv.version}/{mv.card.weights_file}": data}
        mtime = mv.card.created.timestamp()
        tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
        try:
            if kind == "zip":
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                    stamp = dt.datetime.fromtimestamp(max(mtime, 315532800), dt.timezone.utc).timetuple()[:6]
                    for arcname, payload in members.items():
                        zf.writestr(zipfile.ZipInfo(arcname, date_time=stamp), payload,
                                    compress_type=zipfile.ZIP_DEFLATED)
            else:
                with tarfile.open(tmp, "w:gz") as tf:
                    for arcname, payload in members.items():
                        info = tarfile.TarInfo(arcname)
                        info.size, info.mtime, info.mode = len(payload), int(mtime), 0o644
                        tf.addfile(info, io.BytesIO(payload))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        self._audit("export", mv.name, mv.version, {"file": str(file.resolve())}, user=user)
        return file

    def import_(self, file: Path, *, activate: bool = False, check_loadable: bool = True,
                user: str | None = None) -> ModelVersion:
        """Install a version from an ``export`` archive; idempotent when the same version is already here.

        Raises
        ------
        ModelRegistryError
            Not a petnode model archive, invalid card, or the same version is installed with different content.
        WeightsError
            The weights do not match the card (archive damaged or modified), or cannot be loaded.
        """
        file = Path(file)
        name, version, card_bytes, weights_name, weights_bytes = _read_archive(file)
        source = f"{file}:{name}/{version}/{CARD_FILE}"
        try:
            fields = yaml.safe_load(card_bytes.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ModelRegistryError(f"{source} is not valid YAML: {exc}") from None
        card = card_from_mapping(fields, source=source)
        if (card.name, card.version, card.weights_file) != (name, version, weights_name):
            raise ModelRegistryError(f"{file}: the card describes {card.ref} with weights {card.weights_file!r} but "
                                     f"the archive holds {name}@{version} with {weights_name!r}: the archive was "
                                     "altered; export it again from the source")
        actual = hashlib.sha256(weights_bytes).hexdigest()
        if actual != card.sha256:
            raise WeightsError(f"{file}: the weights of {card.ref} do not match the card (sha256 {_short(actual)}..., "
                               f"card says {_short(card.sha256)}...): the archive is damaged or was modified after "
                               "export; export it again from the source")
        if check_loadable:
            _load_state_dict(weights_bytes, source=repr(f"{file}:{weights_name}"))
        staging = self._staging()
        try:
            _write_file_durably(staging / weights_name, weights_bytes)
            _write_file_durably(staging / CARD_FILE, card.to_yaml().encode("utf-8"))
            with self._locked():
                existing = self._existing_same(card)
                if existing is not None:
                    self._audit("import", name, version, {"file": str(file), "unchanged": True}, user=user)
                    mv = existing
                else:
                    mv = self._install(staging, card)
                    self._audit("import", name, version, {"file": str(file), "sha256": card.sha256}, user=user)
                if activate and not mv.active:
                    mv = self.activate(name, version, user=user)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return mv

    def _existing_same(self, card: ModelCard) -> ModelVersion | None:
        """The installed version if identical to ``card`` (same card, same weights); None if not installed.

        Raises ModelRegistryError when the version is installed with different content (caller holds the lock).
        """
        if not (self.root / card.name / card.version).is_dir():
            return None
        try:
            mv = self.get(card.name, card.version)
        except ModelRegistryError as exc:
            raise ModelRegistryError(f"{card.ref} is already installed but unreadable ({exc}); remove it first "
                                     f"(`petnode models remove {card.ref}`)") from None
        if mv.card.model_dump(mode="json") == card.model_dump(mode="json"):
            return mv
        what = ("weights" if mv.card.sha256 != card.sha256 else "card")
        raise ModelRegistryError(
            f"{card.ref} is already installed with a different {what} (sha256 here {_short(mv.card.sha256)}..., new "
            f"{_short(card.sha256)}...): versions never change once installed; give the new model a new version, or "
            f"remove the installed one first (`petnode models remove {card.ref}`) if nothing uses it"
        )

    def register_shipped(self, directory: Path) -> ShippedRegistration:
        """Install every ``directory/<name>/<version>/card.yaml`` not seen before (idempotent).

        Each shipped version is installed once: a shipped version the physicist removed later is not re-added.
        A model that has no active version gets its newest non-retired shipped version activated; a model that
        already has one keeps it (a new shipped version waits for a deliberate ``petnode models activate``).
        Problems (invalid card, checksum mismatch, a different model under the same version) are returned, not
        raised, so one bad shipped folder does not stop the node. Audit user: ``petnode (shipped)``.
        """
        directory = Path(directory)
        cards = sorted(directory.glob(f"*/*/{CARD_FILE}")) if directory.is_dir() else []
        if not cards:
            return ShippedRegistration()
        seen = self._read_shipped()
        candidates = [c for c in cards if f"{c.parent.parent.name}@{c.parent.name}" not in seen]
        if not candidates:
            return ShippedRegistration()
        registered: builtins.list[str] = []
        activated: builtins.list[str] = []
        problems: builtins.list[Problem] = []
        with self._locked():
            seen = self._read_shipped()
            touched: dict[str, builtins.list[str]] = {}
            for card_path in candidates:
                name, version = card_path.parent.parent.name, card_path.parent.name
                ref = f"{name}@{version}"
                if ref in seen:
                    continue
                try:
                    check_name(name)
                    check_version(version)
                    card = load_card(card_path)
                    if (card.name, card.version) != (name, version):
                        raise ModelRegistryError(f"{card_path} describes {card.ref}: move it to "
                                                 f"{card.name}/{card.version}/ or fix the card")
                    weights = card_path.parent / card.weights_file
                    if not weights.is_file():
                        raise WeightsError(f"shipped weights {str(weights)!r} are missing")
                    existing = self._existing_same(card)
                    if existing is None:
                        self.add(weights, card_path, name=name, version=version, check_loadable=False,
                                 user=SHIPPED_USER)
                        registered.append(ref)
                    seen[ref] = card.sha256
                    touched.setdefault(name, []).append(version)
                except (ModelRegistryError, WeightsError) as exc:
                    logger.warning("shipped model %s not registered: %s", ref, exc)
                    problems.append(Problem(name, version, f"shipped model not registered: {exc}"))
            for name, versions in touched.items():
                try:
                    has_active = self._read_active(name) is not None
                except ModelRegistryError as exc:
                    problems.append(Problem(name, None, str(exc)))
                    continue
                if not has_active:
                    usable = [v for v in sorted(versions, key=version_key)
                              if (self.root / name / v).is_dir() and not (self.root / name / v / RETIRED_FILE).exists()]
                    if usable:
                        try:
                            self.activate(name, usable[-1], user=SHIPPED_USER)
                            activated.append(f"{name}@{usable[-1]}")
                        except (ModelRegistryError, WeightsError) as exc:
                            problems.append(Problem(name, usable[-1], f"shipped model not activated: {exc}"))
            self._write_shipped(seen)
        return ShippedRegistration(tuple(registered), tuple(activated), tuple(problems))

    def _read_shipped(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / SHIPPED_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s unreadable (%s); shipped models will be checked again", self.root / SHIPPED_FILE, exc)
            return {}
        return {str(k): str(v) for k, v in data.get("seen", {}).items()} if isinstance(data, dict) else {}

    def _write_shipped(self, seen: Mapping[str, str]) -> None:
        path = self.root / SHIPPED_FILE
        tmp = path.with_name(f".{SHIPPED_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            _write_file_durably(tmp, json.dumps({"seen": dict(sorted(seen.items()))}, indent=1).encode("utf-8"))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Archives


def _archive_kind(file: Path) -> Literal["tar", "zip"]:
    lower = file.name.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar"
    if lower.endswith(".zip"):
        return "zip"
    raise ModelRegistryError(f"{str(file)!r}: a model export must end in .tar.gz, .tgz or .zip")


def _read_archive(file: Path) -> tuple[str, str, bytes, str, bytes]:
    """(name, version, card bytes, weights file name, weights bytes) from an export, reading members as data only
    (never extracting paths, so a crafted archive cannot write outside the store)."""
    kind = _archive_kind(file)
    if not file.is_file():
        raise ModelRegistryError(f"{str(file)!r} does not exist or is not a file")
    files: dict[str, bytes] = {}
    not_petnode = (f"{str(file)!r} is not a petnode model export: expected exactly NAME/VERSION/{CARD_FILE} and "
                   "the weights file (made by `petnode models export`)")
    try:
        if kind == "zip":
            with zipfile.ZipFile(file) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    if len(files) >= 2:
                        raise ModelRegistryError(not_petnode)
                    files[info.filename] = zf.read(info)
        else:
            with tarfile.open(file, "r:gz") as tf:
                for member in tf:
                    if member.isdir():
                        continue
                    if not member.isfile() or len(files) >= 2:
                        raise ModelRegistryError(not_petnode)
                    extracted = tf.extractfile(member)
                    assert extracted is not None  # a regular file always has data
                    files[member.name] = extracted.read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise ModelRegistryError(f"{str(file)!r} cannot be read as a {kind} archive: {exc}") from None
    parts = [tuple(p.split("/")) for p in files]
    if len(files) != 2 or any(len(p) != 3 for p in parts) or len({p[:2] for p in parts}) != 1:
        raise ModelRegistryError(not_petnode + f"; found {sorted(files) or 'nothing'}")
    name, version = parts[0][0], parts[0][1]
    try:
        check_name(name)
        check_version(version)
    except ModelRegistryError as exc:
        raise ModelRegistryError(f"{str(file)!r}: {exc}") from None
    card_key = f"{name}/{version}/{CARD_FILE}"
    if card_key not in files:
        raise ModelRegistryError(not_petnode + f"; found {sorted(files)}")
    weights_key = next(k for k in files if k != card_key)
    return name, version, files[card_key], weights_key.rsplit("/", 1)[1], files[weights_key]


def _load_state_dict(data: bytes, *, source: str) -> dict[str, Any]:
    """``torch.load(..., map_location="cpu", weights_only=True)`` on bytes, every failure a WeightsError."""
    try:
        import torch
    except ImportError as exc:
        raise WeightsError(f"loading model weights needs PyTorch, which cannot be imported here ({exc}): install "
                           "petnode with its torch dependency (see the Makefile)") from exc
    if not data.startswith((b"PK\x03\x04", b"\x80")):
        # torch.save writes a zip archive (or, with the legacy format, a pickle stream starting with 0x80)
        raise WeightsError(f"{source} is not a PyTorch weights file (torch.save writes a zip archive; this file "
                           f"starts with {data[:8]!r}): give the file that training saved, e.g. weights.pt")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"cannot load {source} as PyTorch weights with weights_only=True ({type(exc).__name__}: {first[:200]}); "
            "petnode loads only plain state dicts, for safety: save with torch.save(model.state_dict(), path), "
            "not the model object"
        ) from exc
    if not isinstance(obj, dict):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a state dict: save with "
                           "torch.save(model.state_dict(), path)")
    return obj


def _next_version(version: str) -> str:
    """``1.0.0`` -> ``1.0.1`` (for hints only)."""
    match = re.match(r"^(.*?)(\d+)([^\d]*)$", version)
    return f"{match.group(1)}{int(match.group(2)) + 1}{match.group(3)}" if match else f"{version}.1"
