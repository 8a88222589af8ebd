"""The running node: SCP + APScheduler jobs (completion, sends, retention) + worker pools.

Processing runs on a pool of CPU workers and every destination has its own senders, so a slow series never blocks
receiving, and a destination that is down never delays another one. Everything a destination gets (the received
series forwarded as it is, the derived series, maps) goes through the same sends: confirmed per instance, resumed
without duplicates, retried by one policy, optionally held until the whole study is ready.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node import heap, scu, tls
from dicom_node.completion import Verdict, decide
from dicom_node.decoded import DecodedCache
from dicom_node.errors import DicomNodeError, PriorError, ProcessingInterrupted, RoutingError
from dicom_node.handlers import ReceiveContext
from dicom_node.outputs.derived_pet import is_petnode_output
from dicom_node.progress import Follow, WriteProgress
from dicom_node.receivers import Receivers, series_locks_for
from dicom_node.pipeline import Destination, Plan, PriorRequest, ProcessResult, process_series, resolve_destination
from dicom_node.pipeline import resolve_destinations
from dicom_node.rules import MatchContext, PriorSpec, Rule, RuleSet, evaluate_match, map_formats, select_rule
from dicom_node.scp import start_scp
from dicom_node.series import MULTIFRAME_PET_STORAGE, read_instance
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from dicom_node.state import Payload, SeriesState, SendState, default_node_id, open_state
from dicom_node.web import NodeMetrics, WebServer, start_web

if TYPE_CHECKING:
    from denoisers.models import ModelStore
    from dicom_node.distributed import RemotePipeline

logger = logging.getLogger(__name__)

# Seconds between looks at whether the heap grew (dicom_node/heap.py); it is frozen again only when idle.
HEAP_CHECK_S = 30


def open_model_store(settings: NodeSettings) -> ModelStore:
    """The node's model store, with the shipped models (``models/``) registered on first use."""
    from denoisers.models import ModelStore

    store = ModelStore(settings.model_store_dir)
    shipped = settings.shipped_models_dir
    if shipped is not None and shipped.is_dir():
        result = store.register_shipped(shipped)
        for ref in result.registered:
            logger.info("shipped model %s registered", ref)
        for problem in result.problems:
            logger.warning("shipped model problem: %s", problem)
    return store


def backoff_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds before the next try after ``attempts`` failed tries (1 -> initial, doubling, capped)."""
    return float(min(max_s, initial_s * 2.0 ** min(max(0, attempts - 1), 64)))


class Node:
    """One petnode instance. ``start()`` returns once it listens; ``stop()`` shuts everything down."""

    def __init__(self, settings: NodeSettings, ruleset: RuleSet) -> None:
        self.settings = settings
        self.ruleset = ruleset
        self.node_id = default_node_id(settings)
        self.db = open_state(settings, node_id=self.node_id)
        # A shared database (several nodes, one spool): the database's series lock excludes the other nodes too.
        # Receiver processes (receive_processes > 1) sharing this spool: a lock file per series stripe.
        self.spool = Spool(settings.data_dir, settings.disk,
                           series_guard=self.db.series_lock if self.db.shared else series_locks_for(settings))
        self.db.multi_process = settings.receive_process_count > 1
        self.receivers: Receivers | None = None
        self.models = open_model_store(settings)
        self.decoded = DecodedCache(int(settings.workers.decoded_cache_mb * 2**20))
        self._stopped = threading.Event()
        # Distributed processing (distributed.broker_url): jobs run on Celery workers, the node writes and sends.
        # None: the in-process lanes, and Celery is never imported.
        self.remote: RemotePipeline | None = None
        if settings.distributed.enabled:
            from dicom_node.distributed import RemotePipeline

            self.remote = RemotePipeline(settings, self._stopped)
        self._server: Any = None
        self._scheduler: Any = None
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._senders: dict[str, ThreadPoolExecutor] = {}
        self._processing: set[str] = set()
        self._sending: dict[int, dict[str, Any]] = {}  # running sends: id -> row (a destination may run several)
        # Forwarding on receipt: the rule found for each series still arriving (None: not forwarded on receipt),
        # and the series that received instances since their running send last looked. Per node: with a shared
        # database each node knows only its own arrivals; queueing is idempotent in the database, a running send
        # reads every instance recorded by any node, and completion queues the original again in any case.
        self._receipt: dict[str, Rule | None] = {}
        self._fresh: set[str] = set()
        self.timings: dict[str, dict[str, float]] = {}  # the last series processed: seconds per step
        # Derived series being written, by source series: (output series UID, progress); their sends follow it.
        self._writing: dict[str, tuple[str, WriteProgress]] = {}
        self._futures: set[Future[Any]] = set()
        self._futures_lock = threading.Lock()  # its own: futures are tracked while self._lock is held
        self._evict_lock = threading.Lock()
        self._lock = threading.Lock()
        self._headers: dict[str, Dataset] = {}
        self.metrics = NodeMetrics()  # this node's Prometheus registry (dicom_node/web/metrics.py)
        self._web: WebServer | None = None
        self._peer_tls: dict[str, Any] = {}  # peer name -> pynetdicom tls_args (its SSL context, host name)

    # --- lifecycle -------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def web_port(self) -> int | None:
        """The status page's port (``web.port``; 0 there picks a free one); None when it is not served."""
        return self._web.port if self._web is not None else None

    @property
    def web_url(self) -> str | None:
        """Where the status page is (``http://127.0.0.1:8080/`` by default); None when it is not served."""
        return self._web.url if self._web is not None else None

    def readiness(self) -> dict[str, bool]:
        """What ``/readyz`` checks: the SCP listens, the database answers, the scheduler runs."""
        try:
            self.db.series_counts()
            db_ok = True
        except Exception:  # noqa: BLE001 - any failure means not ready
            db_ok = False
        server, scheduler = self._server, self._scheduler
        sockets = [s.socket for s in (server.plain, server.tls) if s is not None] if server is not None else []
        return {"scp": bool(sockets) and not self._stopped.is_set() and all(s.fileno() >= 0 for s in sockets),
                "database": db_ok, "scheduler": scheduler is not None and bool(scheduler.running)}

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's port (``tls.port`` in node.yaml); None without one."""
        return self._server.tls_port if self._server is not None else None

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        shared = self.db.shared
        # Shared: only this node's own and gone nodes' interrupted work is taken back, never a live node's.
        recovered = self.db.recover(live_since=time.time() - self.settings.state.node_timeout_s if shared else None)
        if any(recovered.values()):
            logger.warning("recovered after an unclean stop: %d series back to processing, %d sends to retry",
                           recovered["processing"], recovered["sending"])
        # Shared: another node may have written a file it has not recorded yet; only old unknown files go.
        orphans = self.spool.sweep_orphans(self.db.known_paths(),
                                           min_age_s=self.settings.state.orphan_grace_s if shared else 0.0)
        if orphans:
            logger.warning("removed %d spool file(s) the database does not know (written by a process that stopped "
                           "before recording them; their C-STOREs were never acknowledged)", len(orphans))
        self._server = start_scp(self.settings, ReceiveContext(spool=self.spool, db=self.db,
                                                               make_room=self.make_room,
                                                               on_received=self.on_received,
                                                               decoded=self.decoded if self.decoded.max_bytes
                                                               else None, metrics=self.metrics.stored))
        processes = self.settings.receive_process_count
        if processes > 1:
            self.receivers = Receivers(self.settings, on_received=self.on_received, on_status=self.metrics.stored,
                                       on_pressure=lambda: self._wake("disk"))
            try:
                self.receivers.start(processes - 1)
            except Exception:
                self._server.shutdown()
                raise
            self.receivers.attach(self._server.servers)
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                            "misfire_grace_time": None})
        now = datetime.now()
        self._scheduler.add_job(self.check_completion, "interval", id="completion", next_run_time=now,
                                seconds=self.settings.completion.poll_interval_s)
        self._scheduler.add_job(self.dispatch_sends, "interval", id="sends", next_run_time=now,
                                seconds=self.settings.send.poll_interval_s)
        self._scheduler.add_job(self.run_retention, "interval", id="retention", next_run_time=now,
                                minutes=self.settings.retention.interval_min)
        self._scheduler.add_job(self.make_room, "interval", id="disk", next_run_time=now,
                                seconds=self.settings.disk.pressure_check_interval_s)
        self._scheduler.add_job(self.sweep_stuck, "interval", id="stuck", seconds=60)
        self._scheduler.add_job(self.freeze_heap, "interval", id="heap", seconds=HEAP_CHECK_S)
        if shared:
            self.db.register_node(host=socket.gethostname(), pid=os.getpid(), ae_title=self.settings.ae_title,
                                  port=self.port)
            self._scheduler.add_job(self._beat, "interval", id="heartbeat", seconds=self.settings.state.heartbeat_s)
            logger.info("state shared on %s as node %s (live nodes: %s)", self.db.describe(), self.node_id,
                        ", ".join(sorted(self.db.live_nodes(time.time() - self.settings.state.node_timeout_s)))
                        or "none other")
        if tls.configured_certificates(self.settings):
            # Expiring certificates: logged now (below) and once a day.
            self._scheduler.add_job(self.check_certificates, "interval", id="certificates", days=1)
        self._scheduler.start()
        self._warm_up()
        self._web = start_web(self)  # None when disabled or its port is taken (logged; DICOM goes on)
        from dicom_node import __version__

        self.check_certificates()
        heap.freeze_if_grown()  # before the first association: the modules imported so far are here for good
        logger.info("petnode %s started: AE %s port %d, data %s, %d rule(s), device %s", __version__,
                    self.settings.ae_title, self.port, self.settings.data_dir, len(self.ruleset.rules),
                    self.settings.device)

    def _warm_up(self) -> None:
        """Import torch in the background when a rule's method runs on it (NLM, the learned methods): the first
        series would otherwise pay for the import (about 1 s on the 2-core machine) inside its latency."""
        from denoisers import registry
        from denoisers.base import DeviceNeed

        def needs_torch(rule: Rule) -> bool:
            try:
                need = registry.get_class(rule.denoiser.name).device_need if rule.denoiser is not None else None
                return need is not None and need != DeviceNeed.CPU
            except Exception:  # noqa: BLE001 - an unavailable plugin is reported when a series needs it
                return False

        if any(not rule.disabled and needs_torch(rule) for rule in self.ruleset.rules):
            def load() -> None:
                try:
                    import torch  # noqa: F401
                except Exception:  # noqa: BLE001 - the plugin reports a broken torch when it runs
                    logger.debug("torch could not be imported ahead of time", exc_info=True)

            threading.Thread(target=load, name="petnode-warm-up", daemon=True).start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return  # stopped already (idempotent: tests and signal handlers may both stop)
        self._stopped.set()
        if self._web is not None:
            self._web.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._server is not None:
            self._server.shutdown()
        if self.receivers is not None:
            self.receivers.stop()
        for ex in [*self._lanes.values(), *self._senders.values()]:
            ex.shutdown(wait=True, cancel_futures=True)
        if self.remote is not None:
            self.remote.close()
        if self.db.shared:
            try:
                self.db.leave()  # the other nodes may take back at once whatever this one leaves unfinished
            except Exception:  # noqa: BLE001 - its heartbeat goes stale instead
                logger.exception("could not leave the shared state database")
        self.db.close()

    # --- completion ------------------------------------------------------------------------------------------
    def _header(self, series_uid: str) -> Dataset:
        cached = self._headers.get(series_uid)
        if cached is None:
            paths = self.db.instance_paths(series_uid)
            cached = dcmread(paths[0], stop_before_pixels=True)
            self._headers[series_uid] = cached
        return cached

    def rule_by_name(self, name: str | None) -> Rule | None:
        return next((r for r in self.ruleset.rules if r.name == name), None)

    def check_completion(self) -> None:
        """Scheduler job: decide completion of receiving series; queue complete ones for processing."""
        now = time.time()
        with self._lock:  # shared: what to forget (taken before the listing: later entries are kept)
            cached = set(self._receipt) | set(self._headers) if self.db.shared else set()
        rows = self.db.list_series([SeriesState.RECEIVING, SeriesState.INCOMPLETE, SeriesState.COMPLETE,
                                    SeriesState.WAITING_PRIOR], limit=10_000)
        if self.db.shared:
            self._forget_decided(cached - {r["series_uid"] for r in rows})
        for row in rows:
            uid = row["series_uid"]
            decided = False
            try:
                if row["state"] == SeriesState.WAITING_PRIOR:
                    rule = self.rule_by_name(row.get("rule"))
                    wait_s = rule.prior.wait_s if rule is not None and rule.prior is not None else 0.0
                    if now - float(row.get("waiting_since") or now) >= wait_s:
                        self._wake_waiting([uid])  # its time is up: processing applies the fallback
                elif row["state"] == SeriesState.COMPLETE:
                    self._submit(uid)  # queued before a restart, or a worker was busy
                elif row["state"] == SeriesState.RECEIVING or row["force_complete"]:
                    decided = self._check_one(row, now)
            except Exception:  # noqa: BLE001 - one bad series must not stop the others
                logger.exception("series=%s: completion check failed", uid)
            if decided and (row["modality"] or "") in ("MR", "CT"):
                self._wake_waiting()  # a possible prior is here: PET series waiting for one look again

    def _forget_decided(self, uids: set[str]) -> None:
        """Shared database: series another node decided (or processed) leave this node's caches. Its own decisions
        clear them as they are made; another node's would otherwise leave a header, a receipt rule and the
        instances this node decoded behind for every series the other one completed."""
        for uid in uids:
            self._headers.pop(uid, None)
            with self._lock:
                self._receipt.pop(uid, None)
                mine = uid in self._processing
            if not mine:
                self.decoded.drop_series(uid)

    def _check_one(self, row: dict[str, Any], now: float) -> bool:
        """Decide one receiving series; True once it is decided (no longer waiting for instances)."""
        uid = row["series_uid"]
        header = self._header(uid)
        if is_petnode_output(header) or self.db.is_own_output(uid):
            self.decoded.drop_series(uid)
            self.db.set_state(uid, SeriesState.OWN_OUTPUT, error="petnode's own derived series: not processed")
            logger.info("series=%s: our own derived series came back; never routed again (loop guard)", uid)
            self._headers.pop(uid, None)
            with self._lock:
                self._receipt.pop(uid, None)
            return True
        rule = select_rule(self.ruleset, MatchContext(header, row["calling_ae"], row["called_ae"]))
        quiet = (rule.quiet_period_s if rule is not None and rule.quiet_period_s is not None
                 else self.settings.completion.quiet_period_s)
        instances = self.db.instances(uid)
        # Multi-frame PET keeps its geometry in the frames' functional groups, not in per-instance positions: the
        # loader checks it frame by frame (same tolerance); completion waits for the quiet period. A series that is
        # only forwarded or dropped is not loaded at all: its geometry is the receiver's business.
        check_geometry = rule is None or rule.processes
        per_instance = ([] if row["sop_class_uid"] in MULTIFRAME_PET_STORAGE or not check_geometry
                        else instances)
        decision = decide(
            modality=row["modality"] or "", received=len(instances), expected=row["expected_count"],
            seconds_quiet=now - (row["last_received"] or now), quiet_period_s=quiet,
            positions=[i["ipp"] for i in per_instance], orientations=[i["iop"] for i in per_instance],
            forced=bool(row["force_complete"]), tolerance=self.settings.completion.spacing_tolerance,
            image_indices=[i["image_index"] for i in per_instance],
        )
        if decision.verdict is Verdict.WAIT:
            return False
        self._headers.pop(uid, None)
        with self._lock:
            self._receipt.pop(uid, None)
        if decision.verdict is Verdict.INCOMPLETE:
            if row["state"] != SeriesState.INCOMPLETE:
                self.db.set_state(uid, SeriesState.INCOMPLETE, error=decision.reason,
                                  expect=[SeriesState.RECEIVING])
                logger.warning("series=%s: incomplete: %s (petnode series complete %s forces it)", uid,
                               decision.reason, uid)
                if rule is not None and rule.forwards:
                    # The PACS gets what was received, whatever processing decides: an incomplete series is
                    # still the scanner's data.
                    self._queue_originals(uid, rule, row, len(instances))
            return True
        if not rule or not rule.processes:
            self.decoded.drop_series(uid)  # never loaded: what the handler decoded for it is not needed
        if rule is None:
            self.db.set_state(uid, SeriesState.UNROUTED, error="no rule matched (petnode rules test explains)")
            logger.info("series=%s modality=%s: complete (%s); no rule matched, nothing to do", uid,
                        row["modality"], decision.reason)
            return True
        if rule.drop:
            if self.db.set_state(uid, SeriesState.DROPPED, rule=rule.name, error=f"dropped by rule {rule.name!r}",
                                 expect=[SeriesState.RECEIVING, SeriesState.INCOMPLETE]):
                logger.info("series=%s modality=%s route=%s: complete (%s); dropped by the rule: sent nowhere, "
                            "files removed after %g h", uid, row["modality"], rule.name, decision.reason,
                            self.settings.retention.dropped_max_age_h)
            return True
        if rule.forwards:
            self._queue_originals(uid, rule, row, len(instances))
        if not rule.processes:
            if self.db.set_state(uid, SeriesState.SENDING, rule=rule.name,
                                 expect=[SeriesState.RECEIVING, SeriesState.INCOMPLETE]):
                logger.info("series=%s modality=%s route=%s: complete (%s); forwarded as it is", uid,
                            row["modality"], rule.name, decision.reason)
                self.db.settle_series(uid)  # forwarded on receipt: everything may be confirmed already
                self.dispatch_sends()
            return True
        if self.db.set_state(uid, SeriesState.COMPLETE, rule=rule.name,
                             expect=[SeriesState.RECEIVING, SeriesState.INCOMPLETE]):
            logger.info("series=%s route=%s: complete (%s)", uid, rule.name, decision.reason)
            self._submit(uid)
        else:
            # Another node sharing the database completed it first and processes it: what this node decoded of
            # its own half is never loaded here (it already popped the header and receipt entries above, so the
            # forgetting in check_completion would not find the series).
            self.decoded.drop_series(uid)
        return True

    # --- priors ----------------------------------------------------------------------------------------------
    def _wake_waiting(self, uids: Sequence[str] | None = None) -> None:
        """PET series waiting for a prior (all, or ``uids``) are looked at again by a worker."""
        for uid in self.db.wake_waiting(uids):
            logger.info("series=%s: looking for its prior again", uid)
            self._submit(uid)

    def _find_prior(self, uid: str, row: dict[str, Any], spec: PriorSpec) -> str | None:
        """The series UID of the newest complete series that is ``spec``'s prior for PET series ``uid``, or None.

        Scope ``study``: the PET's study; ``patient``: the same patient (Patient ID and its issuer, both present and
        equal) received within ``window_h`` hours of the PET, this study's series first.
        """
        pet_paths = self.db.instance_paths(uid)
        pet_header = dcmread(pet_paths[0], stop_before_pixels=True) if pet_paths else Dataset()
        since = None
        if spec.scope == "patient":
            since = float(row.get("first_received") or time.time()) - spec.window_h * 3600.0
        study = row.get("study_uid")
        candidates = self.db.prior_candidates(spec.modality, study_uid=study if spec.scope == "study" else None,
                                              since=since)
        candidates.sort(key=lambda r: (r["study_uid"] != study, -(r["last_received"] or 0.0)))
        for cand in candidates:
            cand_uid = cand["series_uid"]
            paths = self.db.instance_paths(cand_uid)
            if cand_uid == uid or not paths:
                continue
            try:
                header = dcmread(paths[0], stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - an unreadable candidate is not a prior
                logger.warning("series=%s: candidate prior %s unreadable: %s", uid, cand_uid, exc)
                continue
            if is_petnode_output(header):
                continue
            if spec.scope == "patient" and not _same_patient(pet_header, header):
                continue
            ok, reasons = evaluate_match(spec.match, MatchContext(header, cand["calling_ae"], cand["called_ae"]))
            if ok:
                return cand_uid
            logger.debug("series=%s: %s %s is not the prior: %s", uid, spec.modality, cand_uid, "; ".join(reasons))
        return None

    def _fallback_plan(self, rule: Rule, plan: Plan, why: str, log_id: str) -> Plan | None:
        """The plan the rule's prior fallback makes (None: no output), logged with the reason."""
        assert rule.prior is not None
        fallback = rule.prior.fallback
        if fallback is None:
            logger.warning("%s: %s; the rule's fallback is no output", log_id, why)
            return None
        logger.warning("%s: %s; falling back to %s", log_id, why, fallback.describe())
        return dataclasses.replace(plan, denoiser=fallback.name, params=dict(fallback.params), model=fallback.model)

    def _queue_map_sends(self, uid: str, rule: Rule, row: dict[str, Any], map_series: Sequence[Any]) -> int:
        """Queue each map series for the destinations that asked for its form; the number of sends queued."""
        queued = 0
        for dest in rule.destinations:
            formats = map_formats(dest.payloads(True))
            wanted = [m for m in map_series if m.format in formats]
            if not wanted:
                continue
            resolved = resolve_destination(dest, self.settings, row.get("calling_ae"))
            for m in wanted:
                common = {"output_series_uid": m.series_uid, "kind": Payload.MAPS, "study_uid": row.get("study_uid"),
                          "hold_quiet_s": self._hold_s(rule)}
                if isinstance(resolved, Destination):
                    self.db.add_send(uid, resolved.ae_title, resolved.host, resolved.port, len(m.files), **common)
                else:
                    self.db.add_send(uid, resolved.label, "-", 0, len(m.files), failed_reason=resolved.reason,
                                     **common)
                queued += 1
        return queued

    def _hold_s(self, rule: Rule) -> float | None:
        """The study quiet period this rule's sends are held for (None: not held)."""
        if not rule.hold_study:
            return None
        return (rule.study_quiet_period_s if rule.study_quiet_period_s is not None
                else self.settings.completion.study_quiet_period_s)

    def _queue_sends(self, uid: str, rule: Rule, row: dict[str, Any], payload: Payload, output_uid: str,
                     total: int) -> None:
        """Queue ``payload`` for every destination of ``rule`` that gets it."""
        for dest in resolve_destinations(rule, self.settings, row.get("calling_ae"), payload.value):
            common = {"output_series_uid": output_uid, "kind": payload, "study_uid": row.get("study_uid"),
                      "hold_quiet_s": self._hold_s(rule)}
            if isinstance(dest, Destination):
                self.db.add_send(uid, dest.ae_title, dest.host, dest.port, total, **common)
            else:
                logger.error("series=%s route=%s: destination %s cannot be resolved: %s", uid, rule.name,
                             dest.label, dest.reason)
                self.db.add_send(uid, dest.label, "-", 0, total, failed_reason=dest.reason, **common)

    def _queue_originals(self, uid: str, rule: Rule, row: dict[str, Any], total: int) -> None:
        """Forward the received series as it is to the rule's destinations that get the original."""
        self._queue_sends(uid, rule, row, Payload.ORIGINAL, uid, total)

    # --- forwarding on receipt -------------------------------------------------------------------------------
    def on_received(self, series_uid: str, count_reached: bool = False) -> None:
        """Called by the C-STORE handler once an instance is durable and recorded (never raises).

        For a series whose rule forwards on receipt, the original's sends are queued with the first instance; each
        later one only marks the series fresh and wakes the sends job, which does the database work off the
        association's thread. A running send picks up new instances itself before it releases its association.

        Departure from DESIGN.md ("a complete series is matched against the rules"): here the rules are matched on
        the series' first instance, because a router's low latency is the point of on_receipt. The attributes
        rules read are series-level, the same on every instance; completion matches again on the complete series
        and queues the original anyway, so nothing depends on this early match being the last word.
        """
        if count_reached:
            self._wake("completion")  # the last slice is here: no need to wait for the next poll
        try:
            with self._lock:
                known = series_uid in self._receipt
                rule = self._receipt.get(series_uid)
            if not known:
                rule, row = self._receipt_rule(series_uid)
                with self._lock:
                    self._receipt[series_uid] = rule
                if rule is not None:
                    self._queue_originals(series_uid, rule, row, int(row.get("received_count") or 0))
            if rule is None or self._stopped.is_set():
                return
            with self._lock:
                first = series_uid not in self._fresh  # later ones until the sends job looks need no new wake
                self._fresh.add(series_uid)
            if first:
                self._wake("sends")
        except Exception:  # noqa: BLE001 - forwarding trouble must never fail a C-STORE already stored
            logger.exception("series=%s: could not forward on receipt (the series is forwarded when complete)",
                             series_uid)

    def _wake(self, job: str) -> None:
        """Run a scheduler job now instead of at its next interval (a hint: errors are only logged)."""
        try:
            if self._scheduler is not None and not self._stopped.is_set():
                self._scheduler.modify_job(job, next_run_time=datetime.now())
        except Exception:  # noqa: BLE001 - e.g. the scheduler shutting down
            logger.debug("could not wake the %s job", job, exc_info=True)

    def _receipt_rule(self, series_uid: str) -> tuple[Rule | None, dict[str, Any]]:
        """The series' rule when it forwards the original on receipt (else None), and the series row."""
        row = self.db.series(series_uid) or {}
        if row.get("state") != SeriesState.RECEIVING:
            return None, row
        header = self._header(series_uid)
        if is_petnode_output(header) or self.db.is_own_output(series_uid):
            return None, row
        rule = select_rule(self.ruleset, MatchContext(header, row["calling_ae"], row["called_ae"]))
        if rule is None or rule.drop or rule.forward != "on_receipt" or not rule.forwards:
            return None, row
        logger.info("series=%s route=%s: forwarding instances as they arrive", series_uid, rule.name)
        return rule, row

    # --- processing ------------------------------------------------------------------------------------------
    def lane_for(self, rule: Rule) -> tuple[str, str]:
        """(lane, device) for a rule: one single-worker lane per GPU; on the CPU one lane per method.

        Separate CPU lanes mean a slow method (NLM on a big series) never queues a Gaussian route behind it.
        """
        from denoisers import registry
        from denoisers.devices import resolve_device

        if rule.denoiser is None:
            return "cpu:forward", "cpu"  # an operator reprocessing with a forwarding rule: no denoising
        if self.remote is not None:  # distributed: one lane per queue (cpu, gpu); the worker picks the device
            return self.remote.lane_for(rule)
        need = registry.get_class(rule.denoiser.name).device_need
        device = resolve_device(rule.device or self.settings.device, need)
        return (device if device.startswith("cuda") else f"cpu:{rule.denoiser.name}"), device

    def _executor(self, lane: str) -> ThreadPoolExecutor:
        with self._lock:
            ex = self._lanes.get(lane)
            if ex is None:
                workers = 1 if lane.startswith("cuda") else self.settings.workers.cpu
                if lane.startswith("remote:"):  # these threads wait for Celery workers, then write the outputs
                    workers = self.settings.distributed.max_in_flight
                ex = ThreadPoolExecutor(workers, thread_name_prefix=f"petnode-{lane.replace(':', '-')}")
                self._lanes[lane] = ex
            return ex

    def _submit(self, series_uid: str) -> None:
        with self._lock:
            if series_uid in self._processing or self._stopped.is_set():
                return
            self._processing.add(series_uid)
        try:
            rule = self.rule_by_name((self.db.series(series_uid) or {}).get("rule"))
            lane, device = self.lane_for(rule) if rule is not None else ("cpu:unknown", "cpu")
        except Exception as exc:  # noqa: BLE001 - e.g. cuda:1 configured on a one-GPU machine
            with self._lock:
                self._processing.discard(series_uid)
            logger.error("series=%s: cannot schedule: %s", series_uid, exc)
            self.db.set_state(series_uid, SeriesState.FAILED, error=f"{type(exc).__name__}: {exc}",
                              expect=[SeriesState.COMPLETE])
            return
        self._track(self._executor(lane).submit(self._process, series_uid, device), f"series={series_uid} processing")

    def _process(self, uid: str, device: str = "cpu") -> None:
        progress: WriteProgress | None = None
        try:
            if not self.db.set_state(uid, SeriesState.PROCESSING, expect=[SeriesState.COMPLETE]):
                return
            row = self.db.series(uid) or {}
            rule = self.rule_by_name(row.get("rule"))
            if rule is None:
                raise DicomNodeError(f"rule {row.get('rule')!r} is no longer in the rules file")
            if not rule.processes:  # `petnode series reprocess --rule` naming a forwarding or drop rule
                if rule.forwards:
                    self._queue_originals(uid, rule, row, len(self.db.instance_paths(uid)))
                self.db.set_state(uid, SeriesState.SENDING if rule.forwards else SeriesState.DROPPED,
                                  expect=[SeriesState.PROCESSING])
                self.db.settle_series(uid)
                return
            assert rule.denoiser is not None
            log_id = f"series={uid} route={rule.name} denoiser={rule.denoiser.name}"
            revision = int(row.get("revision") or 0)
            out_dir = self.spool.output_dir(uid, rule.name if not revision else f"{rule.name}.r{revision}")
            t0 = time.perf_counter()
            plan = dataclasses.replace(Plan.from_rule(rule), device=device, source_revision=revision,
                                       spacing_tolerance=self.settings.completion.spacing_tolerance,
                                       write_processes=self.settings.workers.write_processes)
            # Sends start as the files are written (held ones wait for their study anyway).
            streams = not rule.hold_study and any("derived" in d.payloads(True) for d in rule.destinations)

            def start_sends(output_uid: str, total: int) -> Callable[[Path], None] | None:
                nonlocal progress
                if not streams:
                    return None
                progress = WriteProgress()
                with self._lock:
                    self._writing[uid] = (output_uid, progress)
                self.db.set_outputs(uid, output_uid, out_dir)
                self._queue_sends(uid, rule, row, Payload.DERIVED, output_uid, total)
                self.dispatch_sends()
                return progress.add

            prior: PriorRequest | None = None
            if rule.prior is not None:
                prior_uid = self._find_prior(uid, row, rule.prior)
                if prior_uid is not None:
                    self.db.set_prior(uid, prior_uid)
                    prior = PriorRequest(self.db.instance_paths(prior_uid), rule.prior.registration)
                    logger.info("%s: %s prior %s found", log_id, rule.prior.modality, prior_uid)
                else:
                    waited = time.time() - float(row.get("waiting_since") or time.time())
                    if waited < rule.prior.wait_s:
                        why = (f"waiting for its {rule.prior.modality} prior ({rule.prior.describe()}); "
                               f"{rule.prior.wait_s - waited:.0f} s left")
                        if self.db.wait_for_prior(uid, why) is not None:
                            logger.info("%s: %s", log_id, why)
                        return
                    fallback = self._fallback_plan(rule, plan, f"no {rule.prior.modality} prior arrived within "
                                                   f"{rule.prior.wait_s:g} s", log_id)
                    if fallback is None:
                        self.db.set_prior(uid, None)
                        self.db.set_state(uid, SeriesState.REFUSED, expect=[SeriesState.PROCESSING],
                                          error=f"no {rule.prior.modality} prior arrived within "
                                                f"{rule.prior.wait_s:g} s; the rule's fallback is no output")
                        self.db.settle_series(uid)
                        return
                    plan = fallback
            wanted_maps = sorted({f for d in rule.destinations for f in map_formats(d.payloads(True))})
            # Past the cache (after a restart, or an evicted series): the loader's own reader, Pixel Data deferred.
            reader = self.decoded.reader(read_instance)
            # In-process, or denoised on a Celery worker and written here (the same steps: pipeline.py).
            pipeline = process_series if self.remote is None else self.remote.process_series
            try:
                result = pipeline(self.db.instance_paths(uid), plan, out_dir, log_id=log_id,
                                  models=self.models, reader=reader, on_write=start_sends, prior=prior,
                                  map_formats=wanted_maps)
            except PriorError as exc:
                fallback = self._fallback_plan(rule, plan, f"its prior cannot be used: {exc}", log_id)
                self.db.set_prior(uid, None)
                if fallback is None:
                    self.db.set_state(uid, SeriesState.REFUSED, expect=[SeriesState.PROCESSING],
                                      error=f"prior not usable ({exc}); the rule's fallback is no output")
                    self.db.settle_series(uid)
                    return
                result = pipeline(self.db.instance_paths(uid), fallback, out_dir, log_id=log_id,
                                  models=self.models, reader=reader, on_write=start_sends,
                                  map_formats=wanted_maps)
            if progress is not None:
                progress.finish()
            now_revision = int((self.db.series(uid) or {}).get("revision") or 0)
            if now_revision != revision:
                # A changed instance arrived while this ran: the output is already stale. Process again.
                logger.warning("%s: an instance changed during processing (revision %d -> %d); processing again "
                               "instead of sending a stale result", log_id, revision, now_revision)
                self.db.cancel_sends(uid, f"superseded: revision {revision} -> {now_revision} during processing")
                self.db.set_state(uid, SeriesState.RECEIVING, expect=[SeriesState.PROCESSING])
                return
            self.db.set_outputs(uid, result.output_series_uid, out_dir)
            with self._lock:
                self.timings[uid] = {**result.timings, "total": time.perf_counter() - t0}
                while len(self.timings) > 256:
                    self.timings.pop(next(iter(self.timings)))
            self.metrics.processed(rule.denoiser.name, time.perf_counter() - t0)
            logger.info("%s: %d derived instances written in %.2f s (load %.2f, denoise %.2f, write %.2f)%s%s",
                        log_id, len(result.files), time.perf_counter() - t0, result.timings["load"],
                        result.timings["denoise"], result.timings["write"],
                        f"; run {result.info}" if result.info else "",
                        f"; maps {', '.join(result.maps)}" if result.maps else "")
            self._record_outputs(uid, result, out_dir)
            self._queue_sends(uid, rule, row, Payload.DERIVED, result.output_series_uid, len(result.files))
            if result.map_series:
                self._queue_map_sends(uid, rule, row, result.map_series)
                logger.info("%s: map series %s", log_id, ", ".join(
                    f"{m.kind} {m.format} ({len(m.files)} files)" for m in result.map_series))
            self.db.set_state(uid, SeriesState.SENDING, expect=[SeriesState.PROCESSING])
            self.db.settle_series(uid)
        except ProcessingInterrupted as exc:  # left in processing: recover() queues it again at the restart
            logger.warning("series=%s: %s; it is processed again when the node starts", uid, exc)
        except RoutingError as exc:
            logger.warning("series=%s: refused: %s", uid, exc)
            self.db.set_state(uid, SeriesState.REFUSED, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the one broad catch: mark failed, keep the node going
            reason = f"{type(exc).__name__}: {exc}"
            logger.error("series=%s: processing failed: %s", uid, reason,
                         exc_info=not isinstance(exc, DicomNodeError))
            if progress is not None:  # sends that followed the writer stop; what they sent is re-sent in full
                progress.finish(error=reason)
                self.db.cancel_sends(uid, f"processing failed while the output was written: {reason}")
            self.db.set_state(uid, SeriesState.FAILED, error=reason)
        finally:
            if progress is not None:
                progress.finish(error="processing stopped")  # a no-op when it finished
            self.decoded.drop_series(uid)  # what processing did not take (e.g. it failed before loading)
            with self._lock:
                self._processing.discard(uid)
                self._writing.pop(uid, None)
        self.dispatch_sends()

    def _record_outputs(self, uid: str, result: ProcessResult, out_dir: Path) -> None:
        """Every series this run wrote, in the outputs table (sends read their files from there; the loop guard
        knows them); outputs of earlier runs are forgotten."""
        keep = [result.output_series_uid, *(m.series_uid for m in result.map_series)]
        self.db.forget_outputs(uid, keep=keep)
        self.db.record_output(uid, result.output_series_uid, payload="derived", kind="pet", fmt="pet",
                              directory=out_dir, count=len(result.files))
        for m in result.map_series:
            self.db.record_output(uid, m.series_uid, payload="maps", kind=m.kind, fmt=m.format,
                                  directory=m.files[0].parent if m.files else out_dir, count=len(m.files),
                                  description=m.description)

    # --- sending ---------------------------------------------------------------------------------------------
    def dispatch_sends(self) -> None:
        """Scheduler job: hand every due send to its destination's senders (a few associations at once)."""
        if self._stopped.is_set():
            return
        per_dest = self.settings.send.associations_per_destination
        with self._lock:
            running = {r["series_uid"] for r in self._sending.values() if r["kind"] == Payload.ORIGINAL}
            idle = [uid for uid in self._fresh if uid not in running]
        for uid in idle:  # instances arrived for a series forwarded on receipt whose send is not running
            self.db.wake_original_sends(uid)
            with self._lock:
                self._fresh.discard(uid)  # a pending send reads every instance there is when it runs
        for study, why in self.db.release_held(time.time(), self.settings.completion.study_hold_max_s):
            logger.info("study=%s: held sends released: %s", study, why)
        with self._lock:
            due = self.db.claim_due_sends(time.time(), busy=[r["destination"] for r in self._sending.values()],
                                          per_destination=per_dest)
            for row in due:
                self._sending[row["id"]] = row
                if row["kind"] == Payload.ORIGINAL:
                    self._fresh.discard(row["series_uid"])  # this send looks at every instance there is now
                ex = self._senders.get(row["destination"])
                if ex is None:
                    ex = ThreadPoolExecutor(per_dest, thread_name_prefix=f"petnode-send-{row['ae_title']}")
                    self._senders[row["destination"]] = ex
                self._track(ex.submit(self._send, row), f"series={row['series_uid']} send to {row['destination']}")

    def retry_at(self, row: dict[str, Any], attempts: int, now: float) -> float | None:
        """When to try a failed send again; None when the retry horizon (or max_attempts) is reached."""
        policy = self.settings.send
        if policy.max_attempts is not None and attempts >= policy.max_attempts:
            return None
        started = row.get("created_at")
        if started is None:
            started = row.get("updated_at", now)
        at = now + backoff_delay(attempts, policy.backoff_initial_s, policy.backoff_max_s)
        if at - started > policy.retry_horizon_h * 3600.0:
            return None
        return at

    def _send(self, row: dict[str, Any]) -> None:
        uid, dest = row["series_uid"], row["destination"]
        attempts = row["attempts"] + 1
        kind = Payload(row["kind"])
        try:
            series = self.db.series(uid) or {}
            more: Callable[[], Sequence[Path]] | None = None
            progress = None
            if kind is Payload.ORIGINAL:
                files = self.db.instance_paths(uid)
                if series.get("state") == SeriesState.RECEIVING:
                    more = lambda: self.db.instance_paths(uid)  # noqa: E731 - still arriving: take what comes
                forwarded_to = row["ae_title"]
            else:
                with self._lock:
                    writing = self._writing.get(uid)
                # Only the derived series' own send follows its writer. A map series' send claimed before the run
                # let go of the writer (maps are queued just before) would otherwise follow the derived files,
                # find them all confirmed and be marked done without one map instance sent.
                if writing is not None and kind is Payload.DERIVED and writing[0] == row["output_series_uid"]:
                    progress = writing[1]
                forwarded_to = None
                if progress is not None:  # still being written: send what is there, then follow the writer
                    files = progress.wait_beyond(0, self._stopped)
                    more = Follow(progress, len(files), self._stopped)
                elif series.get("state") not in (SeriesState.SENDING, SeriesState.DELIVERED, SeriesState.FAILED):
                    # Queued by a run that stopped while writing (the node restarted), or being written by another
                    # node sharing the database (whose own sender follows its writer): the output on disk may be
                    # partial. Back to pending without an attempt; the writing run sends it.
                    self.db.requeue_send(row["id"], delay_s=self.settings.send.poll_interval_s)
                    return
                elif kind is Payload.MAPS:
                    output = self.db.output(row["output_series_uid"])
                    files = sorted(Path(output["dir"]).glob("*.dcm")) if output else []
                else:
                    files = sorted(Path(series["output_dir"]).glob("*.dcm")) if series.get("output_dir") else []
            if not files:
                report = scu.SendReport(total=row["total"], error=f"no {kind.value} files on disk (purged?)")
                self.metrics.sent(dest, None, ok=False)
            else:
                t0 = time.perf_counter()
                confirmed = self.db.confirmed_for(dest, uid)
                # Forwards are remembered before they go (loop guard); derived series need no such memory.
                remember = (functools.partial(self.db.remember_forwards, dest, forwarded_to, uid)
                            if forwarded_to is not None else None)
                report = scu.send_files(files, row["ae_title"], row["host"], row["port"],
                                        tls_args=self._tls_args(row["ae_title"], row["host"], row["port"]),
                                        calling_ae=self.settings.ae_title, timeout_s=self.settings.send.timeout_s,
                                        already_stored=confirmed, more=more, before_sending=remember,
                                        on_stored=lambda sop: self.db.confirm_sent(dest, uid, [sop]))
                if progress is not None and (progress.error or not progress.done):
                    report.error = (f"the derived series was not written to the end ({progress.error})"
                                    if progress.error else "stopped while the derived series was written")
                logger.info("series=%s dest=%s %s: %s in %.2f s", uid, dest, kind.value, report.summary(),
                            time.perf_counter() - t0)
                self.metrics.sent(dest, time.perf_counter() - t0, ok=report.ok)
            now = time.time()
            retry_at = None if report.ok else self.retry_at(row, attempts, now)
            state = self.db.finish_send(row["id"], ok=report.ok, sent=report.sent,
                                        error=None if report.ok else report.summary(), retry_at=retry_at,
                                        total=self._attempt_total(kind, row, report.total) if files else None)
            self._log_attempt(uid, dest, state, attempts, report.summary(), retry_at)
        except Exception as exc:  # noqa: BLE001 - the crash path obeys the same retry policy as a failed send
            logger.exception("series=%s dest=%s: send crashed", uid, dest)
            self.metrics.sent(dest, None, ok=False)
            try:
                retry_at = self.retry_at(row, attempts, time.time())
                reason = f"internal error: {type(exc).__name__}: {exc}"
                state = self.db.finish_send(row["id"], ok=False, sent=0, error=reason, retry_at=retry_at)
                self._log_attempt(uid, dest, state, attempts, reason, retry_at)
            except Exception:  # noqa: BLE001 - the database itself failed: recover() resets it at restart
                logger.exception("series=%s dest=%s: could not record the failed send", uid, dest)
        finally:
            with self._lock:
                self._sending.pop(row["id"], None)
                fresh = kind is Payload.ORIGINAL and uid in self._fresh
        if fresh:  # instances arrived after this send last looked: dispatch wakes it and it goes again
            try:
                self.dispatch_sends()
            except Exception:  # noqa: BLE001 - completion queues the original again in any case
                logger.exception("series=%s: could not wake the forward", uid)
        try:
            if self.db.settle_series(uid) is SeriesState.DELIVERED:
                logger.info("series=%s: delivered to every destination", uid)
        except Exception:  # noqa: BLE001
            logger.exception("series=%s: could not settle the series state", uid)

    @staticmethod
    def _attempt_total(kind: Payload, row: dict[str, Any], found: int) -> int:
        """The send's total after an attempt that found ``found`` files. An original forwarded while it arrives
        grows with it; a derived series followed while it is written was queued with its full count, and an
        attempt that failed before the writer finished must not shrink it (status would say 1/1 for 1 of 16)."""
        if kind is Payload.ORIGINAL:
            return found
        return max(found, int(row.get("total") or 0))

    def _tls_args(self, ae_title: str, host: str, port: int) -> Any:
        """TLS for a send when the destination is a peer configured with ``tls`` (a send row keeps only the
        address: return_to_sender, peer and address destinations alike); one context per peer, reused."""
        peer = tls.peer_at(self.settings, ae_title, host, port)
        if peer is None or peer.tls is None:
            return None
        with self._lock:
            cached = self._peer_tls.get(peer.name)
        if cached is None:
            cached = tls.tls_args(peer)
            with self._lock:
                self._peer_tls[peer.name] = cached
        return cached

    def _beat(self) -> None:
        """Scheduler job (shared database): this node is alive, its work in progress stays its own."""
        try:
            self.db.beat()
        except Exception:  # noqa: BLE001 - the database may be away for a moment; the next beat tries again
            logger.exception("could not record this node's heartbeat in the shared state database")

    def check_certificates(self) -> None:
        """Scheduler job (daily, and at start): expired and soon-expiring TLS certificates in the log."""
        tls.log_expiry(self.settings)

    def _log_attempt(self, uid: str, dest: str, state: SendState, attempts: int, summary: str,
                     retry_at: float | None) -> None:
        if state is SendState.PENDING and retry_at is not None:
            logger.warning("series=%s dest=%s: attempt %d failed (%s); retrying, next attempt at %s", uid, dest,
                           attempts, summary, datetime.fromtimestamp(retry_at).strftime("%Y-%m-%d %H:%M:%S"))
        elif state is SendState.FAILED:
            logger.error("series=%s dest=%s: gave up after %d attempts over the retry horizon of %.0f h (%s); "
                         "`petnode series retry` sends again", uid, dest, attempts,
                         self.settings.send.retry_horizon_h, summary)

    # --- retention -------------------------------------------------------------------------------------------
    def run_retention(self, now: float | None = None) -> int:
        """Scheduler job: remove finished series older than their state's retention age."""
        from dicom_node.retention import run_retention

        return run_retention(self.db, self.spool, self.settings.retention, now=now)

    def make_room(self) -> int:
        """Remove the oldest finished series while the disk is within the eviction headroom of its watermark.

        Called by the scheduler every ``disk.pressure_check_interval_s`` and by ``handle_store`` before it
        would refuse an instance; one eviction at a time (a second caller waits for the first).
        """
        from dicom_node.retention import relieve_pressure

        with self._evict_lock:
            return relieve_pressure(self.db, self.spool, self.settings)

    # --- work that vanished ----------------------------------------------------------------------------------
    def _track(self, future: Future[Any], what: str) -> None:
        """Keep every future until it is done and log anything it raised (nothing vanishes silently)."""
        with self._futures_lock:
            self._futures.add(future)

        def done(f: Future[Any]) -> None:
            with self._futures_lock:
                self._futures.discard(f)
            if not f.cancelled() and f.exception() is not None:
                logger.error("%s crashed outside its own error handling: %r (the stuck-work sweep resets it)",
                             what, f.exception())

        future.add_done_callback(done)

    def freeze_heap(self) -> bool:
        """Scheduler job: freeze the heap again once later imports (torch at the first CNN or NLM series) have grown
        it, but only while nothing is received, processed or sent here (the full collection holds the GIL)."""
        with self._lock:
            busy = bool(self._processing or self._sending)
        server = self._server
        if busy or (server is not None and server.guard.connections) or (
                self.receivers is not None and self.receivers.board is not None
                and self.receivers.board.connections()):
            return False
        return heap.freeze_if_grown()

    def sweep_stuck(self, now: float | None = None) -> dict[str, int]:
        """Scheduler job: put back work whose worker is gone (an error in the error path, a dead thread).

        A series in ``processing`` that no worker holds, or a send in ``sending`` that no sender runs, has been
        left behind; after ``stuck_after_s`` it goes back to ``complete`` / ``pending`` and runs again.

        A shared database: this node's in-memory view only covers its own work. Work another live node owns is
        never touched (its workers are not in ``_processing``); work of a node that is gone (no heartbeat for
        ``state.node_timeout_s``) is taken back at once.
        """
        now = time.time() if now is None else now
        limit = self.settings.workers.stuck_after_s
        with self._lock:
            processing, sending_ids = set(self._processing), set(self._sending)
        reset = {"processing": 0, "sending": 0}
        live = self.db.live_nodes(time.time() - self.settings.state.node_timeout_s) if self.db.shared else set()

        def left_behind(owner: str | None, mine: bool, updated_at: float) -> bool:
            if self.db.shared and owner is not None and owner != self.db.node_id:
                return owner not in live  # another node's: only once it is gone
            return not mine and now - updated_at > limit

        for row in self.db.list_series([SeriesState.PROCESSING], limit=100_000):
            if left_behind(row.get("owner"), row["series_uid"] in processing, row["updated_at"]):
                if self.db.set_state(row["series_uid"], SeriesState.COMPLETE, expect=[SeriesState.PROCESSING]):
                    reset["processing"] += 1
                    logger.warning("series=%s: left in processing by a worker that is gone; queued again",
                                   row["series_uid"])
        for send in self.db.sends():
            if send["state"] == "sending" and left_behind(send.get("owner"), send["id"] in sending_ids,
                                                          send["updated_at"]):
                if self.db.requeue_send(send["id"]):
                    reset["sending"] += 1
                    logger.warning("series=%s dest=%s: send left in sending by a sender that is gone; queued "
                                   "again", send["series_uid"], send["destination"])
        return reset


def _same_patient(a: Dataset, b: Dataset) -> bool:
    """Whether two headers are of the same patient: Patient ID present and equal, and the issuer (when either
    has one) equal; a birth date that both carry must agree too. Never logged (patient identifiers)."""
    pid_a, pid_b = str(a.get("PatientID", "") or "").strip(), str(b.get("PatientID", "") or "").strip()
    if not pid_a or pid_a != pid_b:
        return False
    if str(a.get("IssuerOfPatientID", "") or "").strip() != str(b.get("IssuerOfPatientID", "") or "").strip():
        return False
    birth_a, birth_b = str(a.get("PatientBirthDate", "") or ""), str(b.get("PatientBirthDate", "") or "")
    return not (birth_a and birth_b and birth_a != birth_b)
