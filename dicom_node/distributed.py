"""Processing on Celery workers on other machines, behind the same lane interface as the in-process workers.

The node stays the single writer of its state and spool. With ``distributed.broker_url`` set, a lane's worker
thread in the node does not run :func:`dicom_node.pipeline.process_series` itself: :meth:`RemotePipeline.
process_series` (same signature) puts a job on the Celery queue of the lane (``cpu`` or ``gpu``) and waits. A
``petnode worker`` on any machine that mounts the node's data directory (``distributed.shared_root``) takes it,
loads the series and runs the denoiser (:func:`run_job`: the pipeline's own :func:`~dicom_node.pipeline.load_series`
and :func:`~dicom_node.pipeline.denoise_series`), and writes the result volume, its maps and the provenance facts
into one ``.npz`` under ``<shared_root>/results/`` (tmp, fsync, rename: atomic). The node then reads it and writes
the derived series and maps with :func:`~dicom_node.pipeline.write_series`, exactly as in-process, and queues the
sends.

Why a job may run twice, and why that is harmless:

- Late acknowledgement (``task_acks_late``): a worker acknowledges a job when it has finished it. A worker that
  dies (SIGKILL, power) never does, and the broker hands the job to another worker after the visibility timeout.
- The result file is named by the job (series, revision, route, method, params, prior) and replaced atomically,
  so a second run writes the same bytes under the same name; the node writes the DICOM outputs under
  deterministic UIDs and ignores a second answer for a series no longer processing (its state moves only from
  ``processing``); nothing is sent twice.

Celery is imported only here and only when a broker is configured: the embedded default never loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dicom_node.errors import ConfigError, DicomNodeError, PriorError, ProcessingInterrupted, RoutingError
from dicom_node.errors import WorkerError
from dicom_node.pipeline import Denoised, Plan, PriorRequest, ProcessResult, denoise_series, load_series
from dicom_node.pipeline import write_series
from dicom_node.settings import NodeSettings

if TYPE_CHECKING:
    from celery import Celery

    from denoisers.models import ModelStore
    from dicom_node.rules import Rule

logger = logging.getLogger(__name__)

TASK_NAME = "petnode.process_series"
RESULTS_DIR = "results"
Lane = Literal["cpu", "gpu"]
# Errors a worker reports that the node handles as it does in-process (the rule's prior fallback, a refusal).
_KNOWN_ERRORS: dict[str, type[DicomNodeError]] = {"PriorError": PriorError, "RoutingError": RoutingError}


def shared_root(settings: NodeSettings) -> Path:
    """The node's data directory as workers see it (``distributed.shared_root``, default ``data_dir``)."""
    return (settings.distributed.shared_root or settings.data_dir).resolve()


def queue_lane(denoiser: str, requested: str) -> Lane:
    """The queue a job goes to: a rule (or the node) that asks for the CPU or a GPU is obeyed; ``auto`` sends a
    method that can use a GPU to the GPU queue, and a CPU-only method (gaussian) to the CPU queue.

    Decided from the method and the configuration, not from this machine's hardware: the node may have no GPU
    while its workers do.
    """
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        return "gpu"
    from denoisers import registry
    from denoisers.base import DeviceNeed

    return "cpu" if registry.get_class(denoiser).device_need is DeviceNeed.CPU else "gpu"


def celery_app(settings: NodeSettings, *, results: bool) -> Celery:
    """The Celery application of node and workers; ``results``: with the Redis result backend (workers store
    their answers there; the node reads them with :class:`RemotePipeline`'s own backend client instead, so that
    sending a job never subscribes it to a result channel nobody drains)."""
    conf = settings.distributed
    if conf.broker_url is None:
        raise ConfigError("distributed.broker_url is not set: distributed processing is off")
    from celery import Celery

    app = Celery("petnode", broker=conf.broker_url,
                 backend=(conf.result_backend_url or conf.broker_url) if results else None,
                 set_as_current=False)
    # The broker puts back a job nobody acknowledged after the visibility timeout; workers look for such jobs
    # this often (kombu's default, 10 s x 10, would add minutes to a small timeout).
    restore_s = max(0.5, min(10.0, conf.visibility_timeout_s / 4.0))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,  # acknowledged when done: a job whose worker dies is run again by another
        task_reject_on_worker_lost=True,  # a pool process that dies gives its job back at once
        worker_prefetch_multiplier=1,  # a worker holds only the jobs it runs: a dead one strands no others
        task_track_started=True,  # the node logs which worker took a job
        task_create_missing_queues=True,
        task_default_queue=conf.queues["cpu"],
        broker_transport_options={"visibility_timeout": conf.visibility_timeout_s,
                                  "unacked_restore_interval": restore_s, "unacked_restore_throttle": 1},
        broker_connection_retry_on_startup=True,
        result_expires=int(max(conf.result_timeout_s * 2, 3600)),
        worker_hijack_root_logger=False,  # petnode's CLI configures logging
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


# --- the job -----------------------------------------------------------------------------------------------------
def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        raise DicomNodeError(f"{str(path)!r} is not under distributed.shared_root {str(root)!r}: workers cannot "
                             "read it") from None


def job_key(series_uid: str, plan: Plan, prior: PriorRequest | None = None) -> str:
    """The name of a job's result file: fixed by what the job computes, so a second run replaces the first."""
    parts = {"series": series_uid, "revision": plan.source_revision, "route": plan.route,
             "denoiser": plan.denoiser, "params": plan.params, "model": plan.model,
             "prior": [str(p) for p in prior.paths] if prior is not None else None,
             "registration": prior.registration if prior is not None else None}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{series_uid}.r{plan.source_revision}.{digest}"


def make_job(series_uid: str, paths: Sequence[Path], plan: Plan, root: Path,
             prior: PriorRequest | None = None) -> dict[str, Any]:
    """The job a worker runs, as JSON-safe data: paths relative to the shared root, the plan, the prior."""
    return {
        "key": job_key(series_uid, plan, prior),
        "series_uid": series_uid,
        "instances": [_relative(p, root) for p in paths],
        "plan": asdict(plan),
        "prior": ({"instances": [_relative(p, root) for p in prior.paths], "registration": prior.registration}
                  if prior is not None else None),
    }


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs besides the job: where the shared data is, its model store, its device setting."""

    root: Path
    models: ModelStore | None
    device: str = "auto"  # the worker's own ``device`` (used when the job's plan says auto)
    hostname: str = field(default_factory=socket.gethostname)


def worker_device(plan: Plan, device: str) -> str:
    """The concrete device a worker runs a plan on: the plan's when it names one, else the worker's setting."""
    from denoisers import registry
    from denoisers.devices import resolve_device

    requested = plan.device if plan.device != "auto" else device
    return resolve_device(requested, registry.get_class(plan.denoiser).device_need)


def run_job(job: Mapping[str, Any], ctx: WorkerContext, job_id: str = "-",
            answered: Callable[[], dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Run one job on a worker (load, denoise, write the results file); the small answer the node gets.

    Never raises for a failure of the series: the answer says ``ok: False`` with the error's type and message,
    and the node marks the series as it would in-process (a :class:`PriorError` makes it apply the rule's
    fallback). Only a dead worker leaves a job unanswered, and then the broker gives it to another.
    ``answered()``: the answer another run of this job already gave (a redelivered job), or None; asked before
    the work and before the results file is written, so a job that was done is not done (or written) again.
    """
    t_start = time.perf_counter()
    uid = str(job["series_uid"])
    plan = Plan(**job["plan"])
    log_id = f"job={job_id} series={uid} route={plan.route} denoiser={plan.denoiser}"
    answer: dict[str, Any] = {"worker": ctx.hostname, "key": job["key"], "pid": os.getpid()}
    earlier = answered() if answered is not None else None
    if earlier is not None:
        logger.info("%s: already answered by %s; not run again on %s", log_id, earlier.get("worker"), ctx.hostname)
        return earlier
    try:
        plan = replace(plan, device=worker_device(plan, ctx.device))
        answer["device"] = plan.device
        logger.info("%s: started on %s (device %s)", log_id, ctx.hostname, plan.device)
        t0 = time.perf_counter()
        volume = load_series([ctx.root / p for p in job["instances"]], plan, log_id=log_id)
        load_s = time.perf_counter() - t0
        prior = None
        if job.get("prior"):
            prior = PriorRequest([ctx.root / p for p in job["prior"]["instances"]], job["prior"]["registration"])
        denoised = denoise_series(volume, plan, models=ctx.models, prior=prior, log_id=log_id)
        earlier = answered() if answered is not None else None
        if earlier is not None:  # the broker gave it to another worker too, and that one finished first
            logger.info("%s: answered by %s meanwhile; this run's result is dropped", log_id, earlier.get("worker"))
            return earlier
        t0 = time.perf_counter()
        path = save_denoised(denoised, ctx.root / RESULTS_DIR / f"{job['key']}.npz", ctx.hostname)
        save_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - the series failed, not the worker: the node records why
        logger.warning("%s: failed on %s: %s: %s", log_id, ctx.hostname, type(exc).__name__, exc,
                       exc_info=not isinstance(exc, DicomNodeError))
        return {**answer, "ok": False, "error": type(exc).__name__, "message": str(exc)}
    timings = {"remote_load": load_s, **denoised.timings, "save": save_s,
               "remote_total": time.perf_counter() - t_start}
    logger.info("%s: done on %s in %.2f s (load %.2f, denoise %.2f, save %.2f)", log_id, ctx.hostname,
                timings["remote_total"], load_s, denoised.timings.get("denoise", 0.0), save_s)
    return {**answer, "ok": True, "result": str(path.relative_to(ctx.root)), "timings": timings}


def save_denoised(denoised: Denoised, path: Path, writer: str = "") -> Path:
    """Write a denoise step's result to ``path`` atomically: a temp file beside it (unique to this writer, so two
    runs of one job never share one), fsynced, renamed into place, the folder fsynced."""
    from dicom_node.pipeline import _json_safe

    result = denoised.result
    meta = {"info": _json_safe(result.info), "stochastic": denoised.stochastic, "seed": denoised.seed,
            "inputs": list(denoised.inputs), "model_version": denoised.model_version,
            "prior_info": _json_safe(denoised.prior_info), "prior_series_uid": denoised.prior_series_uid,
            "prior_study_uid": denoised.prior_study_uid, "timings": denoised.timings}
    arrays = {"denoised": np.asarray(result.denoised, dtype=np.float32), "meta": np.array(json.dumps(meta))}
    for kind in ("stability", "uncertainty"):
        value = getattr(result, kind, None)
        if value is not None:
            arrays[kind] = np.asarray(value, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in writer)[:40]
    tmp = path.with_name(f".{path.name}.{tag}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_denoised(path: Path) -> Denoised:
    """Read a results file written by :func:`save_denoised`."""
    from denoisers.base import DenoiseResult

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        maps = {kind: data[kind] for kind in ("stability", "uncertainty") if kind in data.files}
        denoised = data["denoised"]
    result = DenoiseResult(denoised=denoised, stability=maps.get("stability"),
                           uncertainty=maps.get("uncertainty"), info=meta["info"])
    return Denoised(result=result, stochastic=bool(meta["stochastic"]), seed=int(meta["seed"]),
                    inputs=tuple(meta["inputs"]), model_version=meta["model_version"],
                    prior_info=dict(meta["prior_info"]), prior_series_uid=meta["prior_series_uid"],
                    prior_study_uid=meta["prior_study_uid"], timings=dict(meta["timings"]))


# --- the node's side -----------------------------------------------------------------------------------------
@dataclass
class JobRecord:
    """What the node knows of a series' last remote job (for logs, the status page and tests)."""

    job_id: str
    key: str
    lane: Lane
    queue: str
    sent_at: float
    worker: str | None = None
    started_on: list[str] = field(default_factory=list)  # every worker seen starting it (a rerun adds one)
    state: str = "sent"  # sent, started, done, failed, interrupted, timed out
    timings: dict[str, float] = field(default_factory=dict)


class RemotePipeline:
    """The node's half of distributed processing: :meth:`process_series` has the in-process pipeline's signature.

    Each call runs on one of the node's lane threads (``remote:cpu`` / ``remote:gpu``, ``max_in_flight`` threads
    each): it sends the job, polls the result backend, then writes the outputs on the node.
    """

    def __init__(self, settings: NodeSettings, stopped: threading.Event) -> None:
        from celery.backends.redis import RedisBackend

        self.settings = settings
        self.conf = settings.distributed
        self.root = shared_root(settings)
        self.app = celery_app(settings, results=False)
        self.results = RedisBackend(app=self.app, url=self.conf.result_backend_url or self.conf.broker_url)
        self._stopped = stopped
        self._lock = threading.Lock()
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()  # series UID -> its last job (bounded)
        swept = self.sweep_results()
        if swept:
            logger.info("removed %d stale results file(s) under %s", swept, self.root / RESULTS_DIR)

    def lane_for(self, rule: Rule) -> tuple[str, str]:
        """(lane, requested device) for a rule: the lane is the queue, the device what the worker resolves."""
        assert rule.denoiser is not None
        requested = rule.device or self.settings.device
        return f"remote:{queue_lane(rule.denoiser.name, requested)}", requested

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in each lane's broker queue (not yet taken by a worker), for the metrics.

        kombu's Redis transport keeps a queue as a list under the queue's name, plus one list per priority step
        (``name\\x06\\x16N``); jobs are sent without a priority, so the plain list holds them."""
        client = self.results.client
        return {lane: int(client.llen(queue)) for lane, queue in sorted(self.conf.queues.items())}

    def recent_jobs(self, limit: int = 20) -> list[tuple[str, JobRecord]]:
        """The last jobs sent (series UID, record), newest first."""
        with self._lock:
            return list(reversed(self.jobs.items()))[:limit]

    def close(self) -> None:
        for closing in (self.results.client.close, self.app.close):
            try:
                closing()
            except Exception:  # noqa: BLE001 - stopping: a connection already gone is fine
                logger.debug("closing the Celery client failed", exc_info=True)

    def process_series(self, paths: Sequence[Path], plan: Plan, out_dir: Path, *, log_id: str = "",
                       models: Any = None, reader: Callable[[Path], Any] | None = None,
                       on_write: Callable[[str, int], Callable[[Path], None] | None] | None = None,
                       prior: PriorRequest | None = None, map_formats: Sequence[str] = ("sc", "pm"),
                       maps_dir: Path | None = None) -> ProcessResult:
        """Denoise on a worker, then load the series here and write the outputs (as the in-process pipeline).

        ``models`` is not used: workers read the model store on the shared data directory.
        """
        del models
        t0 = time.perf_counter()
        series_uid = _series_uid_of(paths)
        job = make_job(series_uid, paths, plan, self.root, prior)
        answer = self.run(job, plan, log_id)
        t_remote = time.perf_counter() - t0
        path = self.root / answer["result"]
        denoised = load_denoised(path)
        t1 = time.perf_counter()
        volume = load_series(paths, plan, reader=reader, log_id=log_id)
        load_s = time.perf_counter() - t1
        result = write_series(volume, replace(plan, device=answer.get("device", plan.device)), denoised, out_dir,
                              log_id=log_id, on_write=on_write, map_formats=map_formats, maps_dir=maps_dir)
        path.unlink(missing_ok=True)  # written into the spool; a second run of the job may write it again
        remote = {k: float(v) for k, v in (answer.get("timings") or {}).items()}
        result.timings.update({**remote, "load": load_s, "remote": t_remote,
                               "queued": max(0.0, t_remote - remote.get("remote_total", t_remote))})
        with self._lock:
            record = self.jobs.get(series_uid)
            if record is not None:
                record.timings = dict(result.timings)
        return result

    def run(self, job: dict[str, Any], plan: Plan, log_id: str) -> dict[str, Any]:
        """Send a job to its lane's queue and wait for a worker's answer; raises what the worker reported."""
        import uuid

        lane = queue_lane(plan.denoiser, plan.device)
        queue = self.conf.queues[lane]
        job_id = str(uuid.uuid4())
        record = JobRecord(job_id=job_id, key=job["key"], lane=lane, queue=queue, sent_at=time.time())
        with self._lock:
            self.jobs[job["series_uid"]] = record
            self.jobs.move_to_end(job["series_uid"])
            while len(self.jobs) > 256:
                self.jobs.popitem(last=False)
        self.app.send_task(TASK_NAME, args=[job], task_id=job_id, queue=queue)
        logger.info("%s: job=%s sent to queue %s", log_id, job_id, queue)
        answer = self._wait(job_id, record, log_id)
        record.worker = answer.get("worker")
        if not answer.get("ok"):
            record.state = "failed"
            kind, message = str(answer.get("error")), str(answer.get("message"))
            known = _KNOWN_ERRORS.get(kind)
            if known is not None:
                raise known(message)
            raise WorkerError(f"{kind}: {message} (worker {answer.get('worker')}, job {job_id})")
        record.state = "done"
        logger.info("%s: job=%s done by worker %s", log_id, job_id, record.worker)
        return answer

    def _wait(self, job_id: str, record: JobRecord, log_id: str) -> dict[str, Any]:
        """Poll the result backend until a worker answers (the answer stays there until ``result_expires``: a
        redelivered copy of the job finds it and does not run again)."""
        started = time.monotonic()
        deadline = started + self.conf.result_timeout_s
        while True:
            if self._stopped.is_set():
                record.state = "interrupted"
                raise ProcessingInterrupted(f"the node stopped while job {job_id} ran on a worker")
            meta = self.results.get_task_meta(job_id)
            status = meta.get("status")
            if status == "STARTED":
                host = str((meta.get("result") or {}).get("hostname") or "?")
                if host not in record.started_on:  # a second worker: the first one died (or was too slow)
                    record.started_on.append(host)
                    record.state = "started"
                    logger.info("%s: job=%s started on worker %s%s", log_id, job_id, host,
                                " (again: the worker before did not finish it)" if len(record.started_on) > 1
                                else "")
            elif status == "SUCCESS":
                return dict(meta.get("result") or {})
            elif status in ("FAILURE", "REVOKED"):
                record.state = "failed"
                raise WorkerError(f"job {job_id} {status.lower()} on a worker: {meta.get('result')!r}")
            if time.monotonic() > deadline:
                record.state = "timed out"
                raise WorkerError(f"no worker answered job {job_id} within distributed.result_timeout_s = "
                                  f"{self.conf.result_timeout_s:g} s (are workers running for queue "
                                  f"{record.queue}?)")
            # Poll often at first (small jobs), then at most once a second per waiting job.
            self._stopped.wait(min(1.0, 0.05 + (time.monotonic() - started) / 20.0))

    def sweep_results(self, max_age_s: float | None = None) -> int:
        """Remove results files (and temp files of dead workers) older than ``max_age_s`` (default: twice the
        result timeout): left by a job that ran twice, or by a node that stopped before reading them."""
        limit = time.time() - (max_age_s if max_age_s is not None else 2 * self.conf.result_timeout_s)
        removed = 0
        folder = self.root / RESULTS_DIR
        for path in [*folder.glob("*.npz"), *folder.glob(".*.tmp")] if folder.is_dir() else []:
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _series_uid_of(paths: Sequence[Path]) -> str:
    """The series UID the job is named by (one header read; the node loads the series only once the job is done)."""
    from pydicom import dcmread

    if not paths:
        raise DicomNodeError("no instances to process")
    return str(dcmread(paths[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


# --- the worker process ----------------------------------------------------------------------------------------
def worker_app(settings: NodeSettings) -> Celery:
    """The Celery app of ``petnode worker``, with the processing task bound to this worker's context."""
    from denoisers.models import ModelStore

    app = celery_app(settings, results=True)
    # The node registers the shipped models (it is the single writer of the shared data); a worker only reads.
    root = shared_root(settings)
    ctx = WorkerContext(root=root, models=ModelStore(root / settings.model_store_dir.relative_to(settings.data_dir)),
                        device=settings.device)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, track_started=True)
    def process_job(self: Any, job: dict[str, Any]) -> dict[str, Any]:
        job_id = str(self.request.id)

        def answered() -> dict[str, Any] | None:
            # A SUCCESS is final in Celery's result backend (a later STARTED does not overwrite it).
            meta = self.backend.get_task_meta(job_id, cache=False)
            return dict(meta["result"]) if meta.get("status") == "SUCCESS" and meta.get("result") else None

        here = replace(ctx, hostname=str(self.request.hostname or ctx.hostname))
        return run_job(job, here, job_id=job_id, answered=answered)

    return app


def run_worker(settings: NodeSettings, lanes: Sequence[str], *, concurrency: int = 1, hostname: str | None = None,
               pool: str = "threads", on_ready: Callable[[str], None] | None = None) -> int:
    """Run a Celery worker in this process on the queues of ``lanes`` until it is stopped (SIGTERM: warm)."""
    from celery.signals import worker_ready

    unknown = sorted(set(lanes) - set(settings.distributed.queues))
    if unknown or not lanes:
        raise ConfigError(f"--queues {','.join(lanes)!r}: lanes are cpu and gpu")
    app = worker_app(settings)
    queues = [settings.distributed.queues[lane] for lane in lanes]  # type: ignore[index]
    from celery.utils.nodenames import default_nodename, host_format

    name = host_format(default_nodename(hostname or "petnode@%h"))  # -n w1@%h as with celery itself

    def ready(sender: Any = None, **_kw: Any) -> None:
        logger.info("worker %s ready: queues %s, concurrency %d, pool %s, shared root %s", name, ",".join(queues),
                    concurrency, pool, shared_root(settings))
        if on_ready is not None:
            on_ready(name)

    worker_ready.connect(ready, weak=False)
    worker = app.Worker(hostname=name, queues=queues, concurrency=concurrency, pool=pool, quiet=True,
                        without_mingle=True, without_gossip=True, without_heartbeat=True, optimization="fair",
                        loglevel=logging.getLevelName(logging.getLogger().level))
    worker.start()
    return int(getattr(worker, "exitcode", 0) or 0)
