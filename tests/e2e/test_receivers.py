"""Receiving on several processes (``receive_processes``): the node hands connections over; same guarantees."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom_node.node import Node
from dicom_node import tls
from dicom_node.receivers import SeriesFileLocks
from dicom_node.settings import AUTO_RECEIVE_PROCESSES_MAX, PeerTls, load_settings
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP
from tests.e2e.conftest import NodeProcess, pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_pet_series
from tests.pki import Pki, pki  # noqa: F401 - fixture


def _open(port: int, n: int, sop_class: str, syntax: str) -> list[object]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(sop_class, [syntax])
    assocs = [ae.associate("127.0.0.1", port, ae_title="PETNODE") for _ in range(n)]
    assert all(a.is_established for a in assocs)
    return assocs


def test_receivers_share_the_port_and_the_series_is_delivered_once(start_node: Callable[..., Node],
                                                                   storescp_sink: StoreSCP) -> None:
    datasets = make_pet_series(shape=(32, 24, 24), seed=11)
    node = start_node([pet_rule([{"peer": "sink"}])], receive_processes=2, max_associations=20,
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    assert node.receivers is not None and node.receivers.alive() == 1
    # 16 associations open at once: the node keeps one while it is the least busy and hands the next over.
    assocs = _open(node.port, 16, str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    rows = wait_until(lambda: len(node.db.associations()) == 16 and node.db.associations(), timeout=20)
    assert rows, node.db.associations()
    owners = {r["owner"] for r in rows}
    assert len(owners) == 2, owners  # the node and its receiver each took some
    statuses: list[int] = []
    lock = threading.Lock()

    def store(assoc: object, part: list[Dataset]) -> None:
        got = [int(assoc.send_c_store(ds).Status) for ds in part]  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        with lock:
            statuses.extend(got)

    threads = [threading.Thread(target=store, args=(a, datasets[i::16])) for i, a in enumerate(assocs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [0] * 32
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)
    assert len(node.db.instance_paths(uid)) == 32
    assert storescp_sink.wait_for(32, timeout=30)
    sops = [f.name for f in storescp_sink.files()]
    assert len(sops) == 32 == len(set(sops))  # every derived instance once
    # Sending the series again: duplicates (byte-identical) are answered Success, stored once, nothing resent.
    assert send_datasets(datasets[:4], node.port) == [0] * 4
    assert len(node.db.instance_paths(uid)) == 32


def test_a_lone_sender_stays_in_the_node_and_tls_connections_are_handed_over(start_node: Callable[..., Node],
                                                                            pki: Pki) -> None:  # noqa: F811
    drop = {"name": "keep", "match": {"modality": ["PT"]}, "drop": True}
    node = start_node([drop], receive_processes=2,
                      tls={"port": 0, "cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca),
                           "client_ae_titles": {"scanner-1": ["SCANNER"]}})
    assert node.receivers is not None and node.receivers.board is not None
    datasets = make_pet_series(shape=(4, 16, 16), seed=13)
    # One association at a time, plain or TLS: always the node's (it keeps its decoded cache for the series).
    for _ in range(3):
        assert send_datasets(datasets[:1], node.port) == [0]
        assert node.receivers.board.counts()[1] == 0
    context = tls.client_context(PeerTls(ca=pki.ca, cert=pki.client.cert, key=pki.client.key))
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(datasets[0].SOPClassUID), [str(datasets[0].file_meta.TransferSyntaxUID)])
    first = ae.associate("127.0.0.1", node.tls_port, ae_title="PETNODE", tls_args=(context, "127.0.0.1"))
    second = ae.associate("127.0.0.1", node.tls_port, ae_title="PETNODE", tls_args=(context, "127.0.0.1"))
    try:
        assert first.is_established and second.is_established
        assert node.receivers.board.counts() == [1, 1]  # the second went to the receiver, over TLS
        rows = wait_until(lambda: len(node.db.associations()) == 2 and node.db.associations(), timeout=10)
        assert rows and len({r["owner"] for r in rows}) == 2, rows
        assert [int(a.send_c_store(ds).Status) for a, ds in ((first, datasets[1]), (second, datasets[2]))] == [0, 0]
    finally:
        first.release()
        second.release()
    assert wait_until(lambda: node.receivers.board.counts() == [0, 0], timeout=10)
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_until(lambda: len(node.db.instance_paths(uid)) == 3, timeout=10)


def test_a_series_a_receiver_took_completes_at_once_and_is_counted_by_the_node(start_node: Callable[..., Node],
                                                                             storescp_sink: StoreSCP) -> None:
    # Completion polls every 30 s here: the series can only be processed within the test's wait if the receiver's
    # hint (the last slice is here) wakes the node's completion job, as the node's own handler does.
    node = start_node([pet_rule([{"peer": "sink"}])], receive_processes=2,
                      completion={"quiet_period_s": 60.0, "poll_interval_s": 30.0},
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    assert node.receivers is not None and node.receivers.board is not None
    datasets = make_pet_series(shape=(8, 16, 16), seed=15)
    time.sleep(0.5)  # the completion job's first run (at start) is behind us
    busy, taken = _open(node.port, 2, str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    try:  # the node holds the first association, so the second is the receiver's
        assert node.receivers.board.counts() == [1, 1]
        assert [int(taken.send_c_store(ds).Status) for ds in datasets] == [0] * 8  # type: ignore[attr-defined]
        taken.release()  # type: ignore[attr-defined]
        uid = str(datasets[0].SeriesInstanceUID)
        assert wait_state(node, uid, ["delivered", "failed"], timeout=20) == "delivered", node.db.series(uid)
    finally:
        busy.release()  # type: ignore[attr-defined]
    scrape = node.metrics.exposition().decode()
    assert 'petnode_store_instances_total{result="received",status="0x0000"} 8.0' in scrape, scrape[:2000]


def test_a_dead_receiver_gets_nothing_more_and_the_node_keeps_receiving(start_node: Callable[..., Node]) -> None:
    drop = {"name": "keep", "match": {"modality": ["PT"]}, "drop": True}
    node = start_node([drop], receive_processes=2)
    assert node.receivers is not None and node.receivers.dispatcher is not None
    os.kill(node.receivers.pids[0], signal.SIGKILL)
    assert wait_until(lambda: node.receivers is not None and node.receivers.alive() == 0, timeout=10)
    datasets = make_pet_series(shape=(6, 16, 16), seed=14)
    assocs = _open(node.port, 3, str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    try:  # all three in the node: the dead receiver is skipped (its socket pair ended)
        assert [int(a.send_c_store(ds).Status) for a, ds in zip(assocs, datasets)] == [0, 0, 0]  # type: ignore
        assert node.receivers.board is not None and node.receivers.board.counts() == [3, 0]
    finally:
        for a in assocs:
            a.release()  # type: ignore[attr-defined]


def test_max_associations_holds_for_the_node_and_its_receivers_together(start_node: Callable[..., Node]) -> None:
    drop = {"name": "keep", "match": {"modality": ["PT"]}, "drop": True}
    node = start_node([drop], receive_processes=2, max_associations=2)
    assert node.receivers is not None and node.receivers.board is not None
    datasets = make_pet_series(shape=(2, 16, 16), seed=16)
    sop, syntax = str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID)
    held = _open(node.port, 2, sop, syntax)  # one in the node, one in the receiver: each process below its limit
    try:
        assert node.receivers.board.counts() == [1, 1]
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(sop, [syntax])
        third = ae.associate("127.0.0.1", node.port, ae_title="PETNODE")
        assert third.is_rejected  # ... but two are in progress in all, and max_associations is 2
    finally:
        for assoc in held:
            assoc.release()  # type: ignore[attr-defined]
    assert wait_until(lambda: node.receivers is not None and node.receivers.board is not None
                      and node.receivers.board.counts() == [0, 0], timeout=10)
    assert send_datasets(datasets, node.port) == [0, 0]  # the slots are free again


def test_receive_processes_auto_is_one_per_core_up_to_the_cap() -> None:
    cores = len(os.sched_getaffinity(0))
    assert load_settings(None).receive_processes == "auto"
    assert load_settings(None).receive_process_count == min(cores, AUTO_RECEIVE_PROCESSES_MAX)
    assert load_settings(None, receive_processes=3).receive_process_count == 3


def test_receivers_die_with_a_node_killed_by_sigkill(tmp_path: Path) -> None:
    drop = {"name": "keep", "match": {"modality": ["PT"]}, "drop": True}
    config = write_config(tmp_path, [drop], receive_processes=3, log_level="INFO")
    log = tmp_path / "node.log"
    node = NodeProcess(config, log).start()

    def receiver_pids() -> list[int]:
        return [int(line.rsplit("(pid ", 1)[1].rstrip(")")) for line in log.read_text().splitlines()
                if "taking connections from the node" in line]

    pids = wait_until(lambda: len(receiver_pids()) == 2 and receiver_pids(), timeout=30)
    assert pids, log.read_text()[-2000:]
    datasets = make_pet_series(shape=(4, 16, 16), seed=12)
    assert send_datasets(datasets, node.port) == [0] * 4

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (exited, not yet reaped by its dead parent's reaper) counts as gone.
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().split(") ", 1)[1][:1] != "Z"

    node.kill9()
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=20), "receivers outlived the killed node"
    # The port is free again and the restarted node has everything that was acknowledged.
    again = NodeProcess(config, log).start(port=node.port)
    try:
        assert again.port == node.port
        assert send_datasets(datasets, again.port) == [0] * 4
    finally:
        again.stop()


def test_series_file_locks_exclude_threads_and_are_reentrant(tmp_path: Path) -> None:
    locks = SeriesFileLocks(tmp_path / "locks")
    held, release, entered = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with locks("1.2.3"), locks("1.2.3"):  # re-entrant in one thread
            held.set()
            release.wait(10)

    def waiter() -> None:
        with locks("1.2.3"):
            entered.set()

    a = threading.Thread(target=holder)
    a.start()
    assert held.wait(10)
    b = threading.Thread(target=waiter)
    b.start()
    assert not entered.wait(0.3)  # blocked while the other thread holds the series
    release.set()
    assert entered.wait(10)
    a.join(10)
    b.join(10)
