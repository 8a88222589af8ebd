"""Prometheus metrics of one node: a registry per :class:`~dicom_node.node.Node` (never the global one), so several
nodes in one process (tests, the bench) keep their own numbers.

Events are counted where they happen (the C-STORE handler, processing, sends) through the small methods below,
which never raise; what the database and the disk hold (series by state, send backlog, disk use) and the queues
of the running node are read when Prometheus scrapes (:class:`NodeCollector`), so they are never stale.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from dicom_node.node import Node

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Processing runs from a second (Gaussian on a small series) to many minutes (diffusion sampling on a CPU).
PROCESSING_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
SEND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class NodeMetrics:
    """The node's counters and histograms, and its registry (with :class:`NodeCollector` once ``bind`` ran)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.store = Counter("petnode_store_instances", "C-STORE requests answered, by result (received: "
                             "acknowledged with success; refused: any other status) and DICOM status",
                             ["result", "status"], registry=self.registry)
        self.processing = Histogram("petnode_processing_seconds", "Seconds from the start of processing a series "
                                    "to its derived series written, by denoiser", ["denoiser"],
                                    buckets=PROCESSING_BUCKETS, registry=self.registry)
        self.send = Histogram("petnode_send_seconds", "Seconds one send attempt (one association) took, by "
                              "destination", ["destination"], buckets=SEND_BUCKETS, registry=self.registry)
        self.send_failures = Counter("petnode_send_failures", "Send attempts that did not deliver everything, by "
                                     "destination", ["destination"], registry=self.registry)
        try:
            ProcessCollector(registry=self.registry)  # memory, CPU, open files of this process
        except Exception:  # noqa: BLE001 - not every platform has /proc: the node's own metrics still work
            logger.debug("process metrics unavailable", exc_info=True)
        self._bound = False
        self._lock = threading.Lock()

    def bind(self, node: Node) -> None:
        """Add the scrape-time collector reading ``node`` (once)."""
        with self._lock:
            if not self._bound:
                self.registry.register(NodeCollector(node))
                self._bound = True

    # --- events (each never raises: metrics must never fail the work they count) --------------------------------
    def stored(self, status: int) -> None:
        """A C-STORE was answered with ``status`` (called by the handler)."""
        try:
            self.store.labels("received" if status == 0 else "refused", f"0x{status:04X}").inc()
        except Exception:  # noqa: BLE001
            logger.debug("could not count a C-STORE", exc_info=True)

    def processed(self, denoiser: str, seconds: float) -> None:
        """A series was processed (failures show as ``petnode_series{state="failed"}``)."""
        try:
            self.processing.labels(denoiser).observe(seconds)
        except Exception:  # noqa: BLE001
            logger.debug("could not record processing of %s", denoiser, exc_info=True)

    def sent(self, destination: str, seconds: float | None, *, ok: bool) -> None:
        """A send attempt ended (``seconds`` None: it never opened an association)."""
        try:
            if seconds is not None:
                self.send.labels(destination).observe(seconds)
            if not ok:
                self.send_failures.labels(destination).inc()
        except Exception:  # noqa: BLE001
            logger.debug("could not record a send to %s", destination, exc_info=True)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class NodeCollector:
    """Gauges read at scrape time: series by state, sends and backlog per destination, queue depths, disk use."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        # Each family on its own: a database that does not answer must not hide the disk or the queues.
        for family in (self._series, self._sends, self._queues, self._disk):
            try:
                yield from family()
            except Exception:  # noqa: BLE001 - a scrape never fails because one source is unavailable
                logger.warning("metrics: %s unavailable", family.__name__.strip("_"), exc_info=True)

    def _series(self) -> Iterator[Metric]:
        from dicom_node.state import SeriesState

        counts = self.node.db.series_counts()
        g = GaugeMetricFamily("petnode_series", "Series the node holds (not purged), by state", labels=["state"])
        for state in SeriesState:
            g.add_metric([state.value], counts.get(state.value, 0))
        yield g

    def _sends(self) -> Iterator[Metric]:
        rows = self.node.db.send_backlog()
        sends = GaugeMetricFamily("petnode_sends", "Sends not yet done, by destination and state (pending, sending, "
                                  "failed)", labels=["destination", "state"])
        backlog = GaugeMetricFamily("petnode_send_backlog_instances", "Instances queued for a destination and not "
                                    "yet confirmed (pending and sending sends)", labels=["destination"])
        remaining: dict[str, int] = {}
        for row in rows:
            sends.add_metric([row["destination"], row["state"]], row["sends"])
            if row["state"] in ("pending", "sending"):
                remaining[row["destination"]] = remaining.get(row["destination"], 0) + int(row["remaining"] or 0)
        for dest, n in sorted(remaining.items()):
            backlog.add_metric([dest], n)
        yield sends
        yield backlog

    def _queues(self) -> Iterator[Metric]:
        lanes = GaugeMetricFamily("petnode_lane_queue_depth", "Series waiting for a worker of their processing lane "
                                  "(not yet started)", labels=["lane"])
        for lane, depth in sorted(queue_depths(getattr(self.node, "_lanes", {})).items()):
            lanes.add_metric([lane], depth)
        yield lanes
        senders = GaugeMetricFamily("petnode_send_queue_depth", "Sends claimed for a destination waiting for one of "
                                    "its associations", labels=["destination"])
        for dest, depth in sorted(queue_depths(getattr(self.node, "_senders", {})).items()):
            senders.add_metric([dest], depth)
        yield senders
        yield GaugeMetricFamily("petnode_series_in_processing", "Series queued or running in any lane",
                                value=len(getattr(self.node, "_processing", ())))
        remote = getattr(self.node, "remote", None)
        if remote is not None:  # distributed processing: the broker's queues and the jobs in flight
            broker = GaugeMetricFamily("petnode_broker_queue_depth", "Jobs waiting in a lane's Celery queue for a "
                                       "worker (distributed.broker_url)", labels=["lane"])
            for lane, depth in remote.queue_depths().items():
                broker.add_metric([lane], depth)
            yield broker
            jobs = GaugeMetricFamily("petnode_remote_jobs", "The node's recent remote jobs by state",
                                     labels=["state"])
            counts: dict[str, int] = {}
            for _, record in remote.recent_jobs(limit=256):
                counts[record.state] = counts.get(record.state, 0) + 1
            for state, n in sorted(counts.items()):
                jobs.add_metric([state], n)
            yield jobs

    def _disk(self) -> Iterator[Metric]:
        from dicom_node.spool import disk_usage_mb

        free_mb, total_mb, used_pct = disk_usage_mb(self.node.settings.data_dir)
        yield GaugeMetricFamily("petnode_disk_free_bytes", "Free space on the data directory's file system",
                                value=free_mb * 2**20)
        yield GaugeMetricFamily("petnode_disk_total_bytes", "Size of the data directory's file system",
                                value=total_mb * 2**20)
        yield GaugeMetricFamily("petnode_disk_used_ratio", "Used fraction of the data directory's file system "
                                "(C-STOREs are refused above disk.max_used_percent)", value=used_pct / 100.0)


def queue_depths(executors: dict[str, Any]) -> dict[str, int]:
    """Work items waiting (not started) in each ThreadPoolExecutor.

    The executor keeps them in ``_work_queue`` (CPython's implementation, stable since 3.2); an executor without
    one counts as empty rather than failing the scrape.
    """
    depths = {}
    for name, ex in list(executors.items()):
        queue = getattr(ex, "_work_queue", None)
        depths[name] = int(queue.qsize()) if queue is not None else 0
    return depths
