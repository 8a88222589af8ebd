"""Node configuration: pydantic models loaded once from YAML and passed down.

Every field has an embedded default, so ``petnode serve`` runs with no file at all (AE title PETNODE, port 11112,
data directory ``./var``). Errors name the file, the key and the bad value.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from denoisers.devices import check_device_name
from dicom_node.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_RULES_FILE = Path("config/rules.yaml")
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"
"""The trained models shipped with petnode (``models/`` at the repository root)."""
_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Peer(_Frozen):
    """A DICOM application entity petnode knows: a destination, or a sender to return results to."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    # Calling AE titles this peer uses when it sends to petnode, when they differ from ``ae_title`` (a PACS that
    # sends under another title): instances petnode forwarded to it that come back under these are recognised.
    sends_as: tuple[AETitle, ...] = ()

    def calls_as(self, calling_ae: str) -> bool:
        """Whether an association calling as ``calling_ae`` comes from this peer."""
        return calling_ae.strip() in (self.ae_title, *self.sends_as)


class DiskSettings(_Frozen):
    """Refuse C-STOREs (0xA700) before the disk is really full, and make room before refusing.

    When free space comes within ``evict_headroom_mb`` / ``evict_headroom_percent`` of the watermark, the oldest
    finished series are removed (see :class:`RetentionSettings`) until it is clear again; a C-STORE is refused
    only when nothing finished is left to remove.
    """

    min_free_mb: float = Field(500.0, ge=0)
    max_used_percent: float = Field(95.0, gt=0, le=100)
    evict_headroom_mb: float = Field(1000.0, ge=0)
    evict_headroom_percent: float = Field(2.0, ge=0, lt=100)
    pressure_check_interval_s: float = Field(10.0, gt=0)


class CompletionSettings(_Frozen):
    quiet_period_s: float = Field(30.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)
    # Relative tolerance on slice spacing when checking that slices are contiguous: the one setting completion and
    # the loader share (10 %: real GE bed junctions differ by 2-3 %, a missing slice doubles a gap).
    spacing_tolerance: float = Field(0.1, gt=0, lt=0.5)
    # Rules with hold_study: their sends wait until every series of the study is complete and processed and no
    # instance of the study arrived for this long (a rule's study_quiet_period_s overrides it) ...
    study_quiet_period_s: float = Field(60.0, gt=0, le=86400)
    # ... but never longer than this (an incomplete series must not keep a study from the PACS for ever).
    study_hold_max_s: float = Field(3600.0, gt=0, le=7 * 86400)


class SendSettings(_Frozen):
    """Sending derived series: retries with capped exponential backoff until ``retry_horizon_h`` has passed.

    The horizon, not a count, decides when a send gives up: a PACS down for a night's maintenance still gets
    everything in the morning. ``max_attempts`` (None: no limit) can stop earlier.
    """

    retry_horizon_h: float = Field(48.0, gt=0)
    max_attempts: int | None = Field(None, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(900.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)
    # Associations open at once to one destination: one slow series does not hold up the others.
    associations_per_destination: int = Field(2, ge=1, le=16)


class WorkerSettings(_Frozen):
    """Processing threads: ``cpu`` per CPU lane (one lane per method), and one worker per GPU."""

    cpu: int = Field(2, ge=1, le=64)
    # PET instances stay decoded in memory from receipt until their series is processed (not read and decoded
    # again), up to this many MB; oldest series out first; 0 turns it off (dicom_node/decoded.py).
    decoded_cache_mb: float = Field(512.0, ge=0)
    # Work left in processing/sending with no worker holding it this long is put back (see Node.sweep_stuck).
    stuck_after_s: float = Field(300.0, gt=0)


class RetentionSettings(_Frozen):
    """How long each finished series keeps its spool and outputs (hours since it finished).

    Every final state has an age: the CT and MR of a PET/CT study (``unrouted``) would otherwise fill the disk.
    Series that need a person (failed, incomplete, refused) are kept longer. Series still receiving, waiting,
    processing or sending are never removed.
    """

    delivered_max_age_h: float = Field(72.0, gt=0)
    unrouted_max_age_h: float = Field(72.0, gt=0)
    own_output_max_age_h: float = Field(24.0, gt=0)
    refused_max_age_h: float = Field(168.0, gt=0)
    incomplete_max_age_h: float = Field(168.0, gt=0)
    failed_max_age_h: float = Field(336.0, gt=0)
    dropped_max_age_h: float = Field(24.0, gt=0)
    # How long the node remembers what it forwarded (to recognise it when a PACS routes it back: loop guard).
    forwarded_memory_days: float = Field(90.0, gt=0)
    interval_min: float = Field(60.0, gt=0)


class NodeSettings(_Frozen):
    """Everything ``petnode serve`` needs. Defaults are the embedded defaults."""

    ae_title: AETitle = "PETNODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0 = any free port (tests)
    data_dir: Path = Path("var")
    rules_file: Path | None = None  # None: ./config/rules.yaml
    # Model versions shipped with petnode (models/<name>/<version>/card.yaml), registered into the model store
    # (<data_dir>/models) on first use; None: register nothing. The default is the models/ folder beside the
    # package (the repository's, for `make serve` from any working directory), not one relative to where the
    # node happens to be started.
    shipped_models_dir: Path | None = SHIPPED_MODELS
    # Associations negotiated at once. Only real associations count: a TCP connection holds a slot from its
    # A-ASSOCIATE-RQ on, so idle sockets cannot lock scanners out.
    max_associations: int = Field(10, ge=1, le=1000)
    # TCP connections at once from one remote address (associations and connections still negotiating), and in
    # all; beyond them a new connection is closed at once.
    max_connections_per_host: int = Field(20, ge=1, le=10000)
    max_connections: int = Field(200, ge=1, le=10000)
    # Seconds a new connection may take to send its A-ASSOCIATE-RQ (ACSE timeout) before it is closed.
    association_request_timeout_s: float = Field(5.0, gt=0, le=600)
    allowed_calling_aes: tuple[AETitle, ...] = ()  # empty: accept any calling AE
    # Called AE titles answered besides ae_title (aliases a scanner or PACS may be configured with).
    called_ae_aliases: tuple[AETitle, ...] = ()
    # Refuse associations whose called AE title is neither ae_title nor an alias (as PACS do); off by default,
    # the called AE is then only recorded (rules can match on it).
    refuse_unknown_called_ae: bool = False
    # An instance whose SOP Instance UID is already stored with other content: "store" it where the sender
    # meant it (a new version in the same series, the old one kept and the series re-opened; or a new instance
    # in another series), or "refuse" it with 0x0111 (Duplicate SOP Instance). Byte-identical copies are always
    # accepted once and answered Success.
    conflicting_instance: Literal["store", "refuse"] = "store"
    network_timeout_s: float = Field(60.0, gt=0)
    disk: DiskSettings = DiskSettings()
    completion: CompletionSettings = CompletionSettings()
    send: SendSettings = SendSettings()
    workers: WorkerSettings = WorkerSettings()
    device: Annotated[str, AfterValidator(check_device_name)] = "auto"  # auto | cpu | cuda | cuda:N; rules override
    retention: RetentionSettings = RetentionSettings()
    peers: tuple[Peer, ...] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _unique_peers(self) -> NodeSettings:
        names = [p.name for p in self.peers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"peer names must be unique, repeated: {dupes}")
        return self

    @model_validator(mode="after")
    def _connection_limits(self) -> NodeSettings:
        if self.max_connections < self.max_associations:
            raise ValueError(f"max_connections ({self.max_connections}) must be at least max_associations "
                             f"({self.max_associations})")
        return self

    def answers_to(self, called_ae: str) -> bool:
        """True when ``called_ae`` is our AE title or one of its aliases."""
        called = called_ae.strip()
        return called == self.ae_title or called in self.called_ae_aliases

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.sqlite3"

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)

    @property
    def model_store_dir(self) -> Path:
        """The model store (``petnode models ...``): installed weights, cards, ACTIVE pointers, audit log."""
        return self.data_dir / "models"

    def resolved_rules_file(self) -> Path:
        return self.rules_file if self.rules_file is not None else DEFAULT_RULES_FILE


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at ``loc`` (for did-you-mean on unknown keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(source: str, model: type[BaseModel], exc: ValidationError) -> str:
    """One line per problem: file, dotted key path, bad value, message, and a did-you-mean for unknown keys."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
        value = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1)
            msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
            lines.append(f"{source}: {key}: {msg}")
            continue
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{source}: {key} = {shown}: {msg}")
    return "\n".join(lines)


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_settings(path: Path | None = None, **overrides: Any) -> NodeSettings:
    """Load node settings from ``path`` (or the embedded defaults), applying keyword overrides last.

    Relative ``data_dir``, ``rules_file`` and ``shipped_models_dir`` in a file are resolved against the file's
    folder, so a config file works from any working directory.
    """
    data: dict[str, Any] = {}
    source = "(embedded defaults)"
    if path is not None:
        source = str(path)
        loaded = load_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of settings, got {type(loaded).__name__}")
        data = dict(loaded)
        for key in ("data_dir", "rules_file", "shipped_models_dir"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str((path.parent / data[key]).resolve())
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return NodeSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, NodeSettings, exc)) from None
