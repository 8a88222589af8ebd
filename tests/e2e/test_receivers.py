"""Receiving on several processes that share the port (``receive_processes``): same guarantees, more senders."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom_node.node import Node
from dicom_node.receivers import SeriesFileLocks
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP
from tests.e2e.conftest import NodeProcess, pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_pet_series


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
    # 16 associations open at once: the kernel spreads them over both listeners (all on one: p = 2**-15).
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


def test_receivers_die_with_a_node_killed_by_sigkill(tmp_path: Path) -> None:
    drop = {"name": "keep", "match": {"modality": ["PT"]}, "drop": True}
    config = write_config(tmp_path, [drop], receive_processes=3, log_level="INFO")
    log = tmp_path / "node.log"
    node = NodeProcess(config, log).start()

    def receiver_pids() -> list[int]:
        return [int(line.rsplit("(pid ", 1)[1].rstrip(")")) for line in log.read_text().splitlines()
                if "receiving on port" in line]

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
