"""Processing on Celery workers: a real ``redis-server``, two ``petnode worker`` processes, a node that sends.

The jobs spread over both workers; a worker SIGKILLed in the middle of a job is replaced by the other after the
visibility timeout, and every derived instance still reaches the destination exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.node import Node
from tests.conftest import wait_until
from tests.dicomtools import free_port, require_tool, terminate
from tests.e2e.conftest import FAST, RecordingSCP, pet_rule, send_datasets, wait_state
from tests.factories import make_pet_series

pytestmark = pytest.mark.network

SHAPE = (32, 96, 96)
# NLM with a wide search window: a few seconds a series on one core, longer than the time between two series
# arriving, so that the second job finds the first worker busy; short enough that the SIGKILL test stays short.
NLM = {"name": "nlm", "params": {"search_vox": 11}}
VISIBILITY_S = 6.0  # longer than a job here (else a job still running is handed out again: harmless, slower)


class Redis:
    """``redis-server`` on a free loopback port, nothing persisted, its files in a temporary folder."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = directory / "redis.log"
        self.proc = subprocess.Popen(
            [require_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return self.proc.poll() is not None  # exited: stop waiting, the assert below says so

        wait_until(answers, timeout=15)
        assert self.proc.poll() is None, f"redis-server did not start: {self.log.read_text()[-2000:]}"
        client.close()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        terminate(self.proc)


class Worker:
    """``petnode worker`` as a real process (so that it can be SIGKILLed); ready once it says so on stdout."""

    def __init__(self, config: Path, name: str, log: Path) -> None:
        self.name, self.log = name, log
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "-c", str(config), "worker", "-n", name, "--concurrency", "1",
             "--queues", "cpu,gpu"],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
            # Two workers share this machine's cores: one torch thread each (a GPU box runs one worker per GPU).
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the worker consumes (or the process died)
        assert "petnode worker ready" in line, f"worker {self.name} did not start: {line!r}\n{self.text()[-3000:]}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        terminate(self.proc, grace_s=15.0)
        self._log.close()


@pytest.fixture
def cluster(tmp_path: Path, start_node: Callable[..., Node]) -> Iterator[Callable[..., tuple[Node, list[Worker],
                                                                                             RecordingSCP]]]:
    """Factory: ``cluster(denoiser)`` -> (node, [worker w1, worker w2], sink), all on loopback and one shared root.

    The workers read the node's data directory through ``distributed.shared_root`` (here a local folder; a
    network file system in production) with their own node.yaml, as on other machines.
    """
    redis_server = Redis(tmp_path / "redis")
    sink = RecordingSCP(ae_title="SINK")
    workers: list[Worker] = []
    shared = tmp_path / "shared"
    distributed = {"broker_url": redis_server.url, "shared_root": str(shared), "visibility_timeout_s": VISIBILITY_S,
                   "result_timeout_s": 90}

    def _start(denoiser: dict[str, Any]) -> tuple[Node, list[Worker], RecordingSCP]:
        config = tmp_path / "worker.yaml"
        config.write_text(yaml.safe_dump({**FAST, "data_dir": str(shared), "distributed": distributed,
                                          "log_level": "INFO"}))
        workers.extend(Worker(config, name, tmp_path / f"{name}.log") for name in ("w1@%h", "w2@%h"))
        node = start_node([pet_rule([{"peer": "sink"}], name="pet-nlm", denoiser=denoiser)],
                          data_dir=str(shared / "node"), distributed=distributed,
                          peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": sink.port}])
        for worker in workers:
            worker.wait_ready()
        return node, workers, sink

    yield _start
    for worker in workers:
        worker.stop()
    sink.stop()
    redis_server.stop()


def _short(name: str) -> str:
    return name.split("@")[0]


def test_jobs_spread_over_two_workers_and_each_series_is_delivered_once(cluster):
    node, workers, sink = cluster(NLM)
    series = [make_pet_series(shape=SHAPE, seed=60 + i) for i in range(4)]
    for datasets in series:
        assert send_datasets(datasets, node.port) == [0] * SHAPE[0]
    uids = [str(s[0].SeriesInstanceUID) for s in series]
    for uid in uids:
        assert wait_state(node, uid, ["delivered", "failed"], timeout=80) == "delivered", \
            (node.db.series(uid), workers[0].text()[-2000:], workers[1].text()[-2000:])
    assert node.remote is not None
    ran_on = {uid: node.remote.jobs[uid].worker for uid in uids}
    assert {_short(str(w)) for w in ran_on.values()} == {"w1", "w2"}, f"the jobs did not spread: {ran_on}"
    for worker in workers:  # each worker's own log says it ran the series it answered
        ran = [uid for uid, w in ran_on.items() if _short(str(w)) == _short(worker.name)]
        assert all(f"series={uid}" in worker.text() for uid in ran)
    # Every derived instance once, nothing twice; nothing left in the results folder.
    assert len(sink.counts) == len(series) * SHAPE[0] and set(sink.counts.values()) == {1}, sink.counts
    assert not list((node.remote.root / "results").glob("*.npz"))


def test_a_worker_killed_mid_job_is_replaced_and_the_series_delivered_once(cluster):
    node, workers, sink = cluster(NLM)
    datasets = make_pet_series(shape=SHAPE, seed=70)
    uid = str(datasets[0].SeriesInstanceUID)
    assert send_datasets(datasets, node.port) == [0] * SHAPE[0]

    def who_started() -> Worker | None:  # the worker whose log says it started this series' job
        return next((w for w in workers for line in w.text().splitlines()
                     if f"series={uid}" in line and "started on" in line), None)

    victim = wait_until(who_started, timeout=40)
    assert victim is not None, "no worker started the job"
    victim.kill9()  # mid-job: it never acknowledges it, so the broker gives it to the other after the timeout
    survivor = next(w for w in workers if w is not victim)
    assert wait_state(node, uid, ["delivered", "failed"], timeout=80) == "delivered", \
        (node.db.series(uid), survivor.text()[-3000:])
    assert node.remote is not None
    record = node.remote.jobs[uid]
    assert _short(str(record.worker)) == _short(survivor.name)
    assert [_short(h) for h in record.started_on[:2]] == [_short(victim.name), _short(survivor.name)]
    assert f"series={uid}" in survivor.text() and "done on" in survivor.text()
    assert len(sink.counts) == SHAPE[0] and set(sink.counts.values()) == {1}, sink.counts


def test_a_node_stopped_while_a_job_waits_leaves_the_series_to_its_restart(tmp_path: Path, start_node):
    """No worker takes the job: stopping the node does not wait for one, and does not fail the series."""
    redis_server = Redis(tmp_path / "redis")
    try:
        node = start_node([pet_rule([{"ae_title": "SINK", "host": "127.0.0.1", "port": 9}], denoiser=NLM)],
                          distributed={"broker_url": redis_server.url, "result_timeout_s": 60})
        datasets = make_pet_series(shape=(4, 16, 16), seed=80)
        uid = str(datasets[0].SeriesInstanceUID)
        assert send_datasets(datasets, node.port) == [0] * 4
        assert node.remote is not None
        assert wait_until(lambda: uid in node.remote.jobs, timeout=30), "the job was never sent"
        assert wait_state(node, uid, ["processing"], timeout=10) == "processing"
        # No worker: the job waits in the broker's queue, and the metrics and the status page say so.
        lane = node.remote.jobs[uid].lane
        assert node.web_url is not None
        waiting = f'petnode_broker_queue_depth{{lane="{lane}"}} 1.0'

        def scrape() -> str | None:  # the job is recorded just before it reaches the broker
            text = urllib.request.urlopen(node.web_url + "metrics", timeout=10).read().decode()
            return text if waiting in text else None

        metrics = wait_until(scrape, timeout=10)
        assert metrics is not None, "the broker queue's depth never showed the waiting job"
        assert 'petnode_remote_jobs{state="sent"} 1.0' in metrics
        page = urllib.request.urlopen(node.web_url, timeout=10).read().decode()
        assert "<h2>Workers</h2>" in page and f"{lane}: 1 waiting" in page and uid in page
        stopped = threading.Event()
        threading.Thread(target=lambda: (node.stop(), stopped.set()), daemon=True).start()
        assert stopped.wait(10), "stop() waited for a worker"
        assert node.remote.jobs[uid].state == "interrupted"
        from dicom_node.state import StateDB

        db = StateDB(node.settings.state_db)
        try:
            assert (db.series(uid) or {}).get("state") == "processing"  # recover() queues it again at the start
        finally:
            db.close()
    finally:
        redis_server.stop()
