"""Node configuration: pydantic models loaded once from YAML and passed down.

Every field has an embedded default, so ``petnode serve`` runs with no file at all (AE title PETNODE, port 11112,
data directory ``./var``). Errors name the file, the key and the bad value.
"""

from __future__ import annotations

import difflib
import logging
import os
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


# "auto" receive processes: one per usable core, but no more than this. Each is an interpreter of about 80 MB, and
# beyond four the state database's single writer, not the interpreters, limits receiving.
AUTO_RECEIVE_PROCESSES_MAX = 4


def auto_receive_processes() -> int:
    """The number of receiving processes "auto" means on this machine (the cores this process may run on)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(AUTO_RECEIVE_PROCESSES_MAX, cores))


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _certificate_file(value: Path | None) -> Path | None:
    from dicom_node.tls import read_certificates

    if value is not None:
        read_certificates(value)
    return value


def _key_file(value: Path | None) -> Path | None:
    from dicom_node.tls import read_private_key

    if value is not None:
        read_private_key(value)
    return value


CertificateFile = Annotated[Path, AfterValidator(_certificate_file)]
KeyFile = Annotated[Path, AfterValidator(_key_file)]


class PeerTls(_Frozen):
    """TLS to one peer (dicom_node/tls.py has the profile): its certificate is verified against ``ca`` (the
    system's trusted CAs when omitted); ``cert``/``key``, when given, are presented as our client certificate.

    ``check_hostname``: the peer's certificate must name ``host`` (DNS name or IP address in its subject
    alternative names), as RFC 9325 asks. Turn it off only for a peer whose certificate, from a private CA of
    its own, does not carry its address: the CA then is the only check.
    """

    ca: CertificateFile | None = None
    cert: CertificateFile | None = None
    key: KeyFile | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> PeerTls:
        from dicom_node.tls import check_pair

        check_pair(self.cert, self.key)
        return self


class TlsSettings(_Frozen):
    """DICOM TLS of the node: a TLS listener on ``port`` beside the plain one (or instead of it), and when
    certificates expire. The default (no port) leaves TLS off; peers have their own ``tls`` for sends.

    ``client_ae_titles`` maps a client certificate's subject Common Name (or a DNS / e-mail subject alternative
    name) to the calling AE titles it may use; when it is not empty every TLS caller must present a mapped
    certificate and call as one of its titles, else A-ASSOCIATE-RJ.
    """

    port: int | None = Field(None, ge=0, le=65535)  # None: no TLS listener; 0: any free port (tests)
    cert: CertificateFile | None = None
    key: KeyFile | None = None
    ca: CertificateFile | None = None  # CAs whose client certificates are trusted
    require_client_cert: bool = True
    client_ae_titles: dict[str, tuple[AETitle, ...]] = {}
    plain_port_enabled: bool = True  # False: only the TLS port listens
    expiry_warning_days: int = Field(30, ge=0, le=3650)  # own and peers' certificates: WARNING this close

    @model_validator(mode="after")
    def _listener(self) -> TlsSettings:
        from dicom_node.tls import check_pair

        check_pair(self.cert, self.key)
        if self.port is None:
            if not self.plain_port_enabled:
                raise ValueError("plain_port_enabled is false but no TLS port is set: the node would not listen")
            return self
        if self.cert is None:
            raise ValueError(f"a TLS port ({self.port}) needs cert and key")
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca (the CAs whose client certificates are trusted); set "
                             "require_client_cert: false to accept clients without one")
        if self.client_ae_titles and self.ca is None:
            raise ValueError("client_ae_titles needs ca: only verified client certificates name a caller")
        return self


class Peer(_Frozen):
    """A DICOM application entity petnode knows: a destination, or a sender to return results to."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    # Calling AE titles this peer uses when it sends to petnode, when they differ from ``ae_title`` (a PACS that
    # sends under another title): instances petnode forwarded to it that come back under these are recognised.
    sends_as: tuple[AETitle, ...] = ()
    tls: PeerTls | None = None  # None: plain TCP

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
    # Forked processes that write a derived series (dicom_node/forked.py): the encoding then leaves the node's
    # interpreter to the send that follows the writer; 1 writes in the processing thread.
    write_processes: int = Field(2, ge=1, le=64)
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


class WebSettings(_Frozen):
    """The status page, ``/metrics`` (Prometheus) and ``/healthz`` / ``/readyz`` (dicom_node/web/).

    Bound to loopback by default, where no login is asked. Anywhere else a login is required: ``token`` (sent as
    ``Authorization: Bearer <token>``, or as the password of HTTP basic auth in a browser) and/or ``user`` with
    ``password_sha256`` (hex SHA-256 of the password; ``password`` in clear is accepted too). Every route but
    ``/healthz`` and ``/readyz`` then needs it.
    """

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0 = any free port (tests; Node.web_port says which)
    token: str | None = Field(None, min_length=16, repr=False)
    user: str | None = Field(None, min_length=1, pattern=r"^[^:\s]+$")
    password_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", repr=False)
    password: str | None = Field(None, min_length=8, repr=False)
    refresh_s: float = Field(5.0, ge=0, le=3600)  # the page reloads itself this often; 0: never

    @model_validator(mode="after")
    def _login(self) -> WebSettings:
        import ipaddress

        if self.password is not None and self.password_sha256 is not None:
            raise ValueError("give web.password or web.password_sha256, not both")
        if (self.user is None) != (self.password is None and self.password_sha256 is None):
            raise ValueError("web.user needs web.password_sha256 (or web.password), and they need web.user")
        try:
            loopback = self.bind_address == "localhost" or ipaddress.ip_address(self.bind_address).is_loopback
        except ValueError:
            loopback = False  # a host name: it may resolve beyond this machine
        if self.enabled and not loopback and self.token is None and self.user is None:
            raise ValueError(f"web.bind_address {self.bind_address!r} is not loopback: the status page then needs "
                             "a login (set web.token, or web.user and web.password_sha256)")
        return self

    @property
    def needs_login(self) -> bool:
        return self.token is not None or self.user is not None


class DistributedSettings(_Frozen):
    """Processing on Celery workers on other machines (``petnode worker``), with a Redis broker.

    ``broker_url`` None (the default): processing runs in the node's own lanes, and Celery is never imported.
    With a broker, each job goes to the queue of its lane (``queues.cpu`` or ``queues.gpu``); workers read the
    series from ``shared_root`` (a network file system every worker mounts; default: the node's ``data_dir``)
    and write the denoised volume back there; the node writes the derived series and sends it, as it does
    in-process (see ``dicom_node/distributed.py`` and ``docs/scaling.md``).
    """

    broker_url: str | None = Field(None, pattern=r"^rediss?://")  # redis://host:6379/0
    # Where results are kept (Celery result backend); None: the broker's Redis.
    result_backend_url: str | None = Field(None, pattern=r"^rediss?://")
    # The node's data directory as every worker sees it (absolute); None: data_dir (node and workers on one
    # machine, or the same mount point everywhere).
    shared_root: Path | None = None
    # A job a worker took but never acknowledged (the worker died) goes back on the queue after this long. Longer
    # than the slowest job: a job still running when it expires is run a second time (harmless, but wasted).
    visibility_timeout_s: float = Field(1800.0, gt=0)
    # The node gives a job up (series failed, `petnode series retry` runs it again) after waiting this long.
    result_timeout_s: float = Field(7200.0, gt=0)
    # Jobs the node has on the queues at once (each waits in a node thread): the workers' total concurrency or
    # a little more.
    max_in_flight: int = Field(16, ge=1, le=1024)
    queues: dict[Literal["cpu", "gpu"], str] = Field(
        default_factory=lambda: {"cpu": "petnode.cpu", "gpu": "petnode.gpu"})

    @model_validator(mode="after")
    def _check(self) -> DistributedSettings:
        if self.shared_root is not None and not self.shared_root.is_absolute():
            raise ValueError(f"distributed.shared_root {str(self.shared_root)!r} must be an absolute path (workers "
                             "on other machines resolve it)")
        if set(self.queues) != {"cpu", "gpu"}:
            raise ValueError(f"distributed.queues {dict(self.queues)!r} must name both lanes, cpu and gpu")
        return self

    @property
    def enabled(self) -> bool:
        return self.broker_url is not None


class StateSettings(_Frozen):
    """Where the state database lives, and how nodes sharing one behave (``dicom_node/state.py``).

    ``database_url`` None (the default): ``<data_dir>/state.sqlite3``, one node. ``postgresql://user@host/db``
    (psycopg 3): several nodes behind one address share one state and one spool; every node must then see the
    same ``data_dir`` at the same path (shared storage), since the database records absolute file paths.
    """

    database_url: str | None = None
    # This node's name among those sharing the database (unique per node; stable across restarts, so a node
    # restarted after a crash takes its own interrupted work back at once). None: <host name>:<port>, plus the
    # process id when the port is 0.
    node_id: str | None = Field(None, min_length=1, max_length=200)
    # Shared database only: how often a node says it is alive, and after how long without a heartbeat the others
    # take its interrupted work (processing, sends) back.
    heartbeat_s: float = Field(10.0, gt=0)
    node_timeout_s: float = Field(60.0, gt=0)
    # Shared database only: at start, spool files the database does not know are removed only when older than
    # this (another node may have just written one it has not recorded yet).
    orphan_grace_s: float = Field(3600.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> StateSettings:
        from dicom_node.database import check_url

        if self.database_url is not None:
            check_url(self.database_url)
        if self.node_timeout_s <= self.heartbeat_s:
            raise ValueError(f"state.node_timeout_s ({self.node_timeout_s:g}) must be longer than state.heartbeat_s "
                             f"({self.heartbeat_s:g})")
        return self


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
    # Processes receiving DICOM: 1 = the node alone; N adds N - 1 receiver processes, so receive scales with
    # concurrent associations beyond one interpreter's lock (dicom_node/receivers.py). The node accepts every
    # connection and keeps it while it is the least busy process (a lone scanner's series stays in the node, with
    # its decoded cache); others are handed to the receiver with the fewest connections. "auto": one per usable
    # CPU core, at most AUTO_RECEIVE_PROCESSES_MAX. max_connections and max_associations hold for all the processes
    # together (the node counts on a board they share), max_connections_per_host for each process.
    receive_processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
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
    web: WebSettings = WebSettings()  # status page and metrics (dicom_node/web/)
    peers: tuple[Peer, ...] = ()
    tls: TlsSettings = TlsSettings()  # DICOM TLS listener and certificate expiry (off by default)
    # Processing on Celery workers elsewhere (petnode worker); off (None broker) by default.
    distributed: DistributedSettings = DistributedSettings()
    state: StateSettings = StateSettings()  # the state database: SQLite in data_dir, or a shared PostgreSQL
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

    @property
    def receive_process_count(self) -> int:
        """``receive_processes`` resolved: "auto" is the usable CPU cores, at most AUTO_RECEIVE_PROCESSES_MAX."""
        if self.receive_processes == "auto":
            return auto_receive_processes()
        return self.receive_processes

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


def _resolve_tls_files(data: dict[str, Any], base: Path) -> None:
    """Relative certificate and key paths (``tls`` and each peer's ``tls``) against the config file's folder."""
    def resolved(block: Any) -> Any:
        if not isinstance(block, dict):
            return block
        return {k: (str((base / v).resolve()) if k in ("cert", "key", "ca") and isinstance(v, str)
                    and not Path(v).is_absolute() else v) for k, v in block.items()}

    if "tls" in data:
        data["tls"] = resolved(data["tls"])
    if isinstance(data.get("peers"), list):
        data["peers"] = [{**p, "tls": resolved(p["tls"])} if isinstance(p, dict) and "tls" in p else p
                         for p in data["peers"]]


def load_settings(path: Path | None = None, **overrides: Any) -> NodeSettings:
    """Load node settings from ``path`` (or the embedded defaults), applying keyword overrides last.

    Relative ``data_dir``, ``rules_file``, ``shipped_models_dir`` and TLS certificate/key paths in a file are
    resolved against the file's folder, so a config file works from any working directory.
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
        _resolve_tls_files(data, path.parent)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return NodeSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, NodeSettings, exc)) from None
