"""Two receiving nodes behind one address: one PostgreSQL state, one spool (the same data directory).

A series whose instances arrive half at each node is completed once, processed once and delivered once (real
pynetdicom associations over loopback, a real PostgreSQL server).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE, evt

from dicom_node.node import Node
from dicom_node.rules import load_rules
from dicom_node.settings import load_settings
from tests.conftest import wait_until
from tests.e2e.conftest import FAST, RecordingSCP, pet_rule, send_datasets
from tests.factories import make_ct_series, make_pet_series

pytestmark = pytest.mark.network
PET = "1.2.840.10008.5.1.4.1.1.128"


def _write_node_config(tmp_path: Path, name: str, rules: list[dict[str, Any]], postgres_url: str,
                       **settings: Any) -> Path:
    """node.yaml + rules.yaml for node ``name``: the shared data directory and database, its own node id."""
    cfg = tmp_path / f"config-{name}"
    cfg.mkdir()
    (cfg / "rules.yaml").write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    data = {**FAST, "data_dir": str(tmp_path / "shared-var"), "rules_file": "rules.yaml",
            "state": {"database_url": postgres_url, "node_id": f"node-{name}", "heartbeat_s": 1.0,
                      "node_timeout_s": 3.0}, **settings}
    (cfg / "node.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg / "node.yaml"


def _start_in_process(config: Path) -> Node:
    settings = load_settings(config)
    node = Node(settings, load_rules(settings.resolved_rules_file(), peer_names=[p.name for p in settings.peers]))
    node.start()
    return node


@pytest.fixture
def two_nodes(tmp_path: Path, postgres_url: str, recorder: RecordingSCP) -> Iterator[Callable[[], tuple[Node, Node]]]:
    """``start()`` -> nodes A and B: distinct ports and node ids, the same data directory and database."""
    nodes: list[Node] = []

    def start() -> tuple[Node, Node]:
        rules = [pet_rule([{"ae_title": "RECORDER", "host": "127.0.0.1", "port": recorder.port}])]
        for name in ("a", "b"):
            nodes.append(_start_in_process(_write_node_config(tmp_path, name, rules, postgres_url)))
        return nodes[0], nodes[1]

    yield start
    for node in nodes:
        node.stop()


def test_a_series_split_over_two_nodes_is_processed_and_delivered_once(two_nodes, recorder: RecordingSCP) -> None:
    a, b = two_nodes()
    assert a.db.shared and a.port != b.port
    assert {n["node_id"] for n in a.db.nodes()} == {"node-a", "node-b"}
    datasets = make_pet_series(shape=(16, 16, 16), seed=83)
    uid = str(datasets[0].SeriesInstanceUID)
    statuses: dict[str, list[int]] = {}

    def send(name: str, node: Node, part: list[Any]) -> None:
        statuses[name] = send_datasets(part, node.port)

    # Both halves at once, each over its own association to its own node (as a load balancer would split them).
    senders = [threading.Thread(target=send, args=("a", a, datasets[0::2])),
               threading.Thread(target=send, args=("b", b, datasets[1::2]))]
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    assert statuses == {"a": [0] * 8, "b": [0] * 8}
    assert wait_until(lambda: (a.db.series(uid) or {}).get("state") in ("delivered", "failed"), 60), \
        a.db.series(uid)
    row = b.db.series(uid)
    assert row["state"] == "delivered" and row["received_count"] == 16, row
    # Each node recorded its own half in the shared database, both in the shared spool.
    paths = [Path(i["path"]) for i in a.db.instances(uid)]
    assert len(paths) == 16 and all(p.exists() for p in paths)
    # Processed once: exactly one node ran the pipeline, and wrote one derived series.
    assert (uid in a.timings) != (uid in b.timings), (list(a.timings), list(b.timings))
    assert [o["payload"] for o in a.db.outputs(uid)] == ["derived"]
    # Delivered once: every derived instance reached the PACS exactly once, over one finished send.
    assert len(recorder.stored) == 16 == len(set(recorder.stored)), recorder.stored
    assert [(s["kind"], s["state"], s["sent"]) for s in a.db.sends(uid)] == [("derived", "done", 16)]
    assert not any(uid.startswith(s) for s in recorder.stored)  # derived UIDs, not the received ones
    # Neither node keeps anything of the series in memory: the one that did not process it forgets it too.
    assert wait_until(lambda: all(uid not in n._headers and uid not in n._receipt and n.decoded.size_bytes == 0
                                  for n in (a, b)), 10), [(n._headers.keys(), n.decoded.size_bytes) for n in (a, b)]


def test_a_node_that_stops_leaves_and_the_other_carries_on(two_nodes, recorder: RecordingSCP) -> None:
    a, b = two_nodes()
    a.stop()  # a clean stop: its row goes, nothing of it is left to take back
    assert wait_until(lambda: [n["node_id"] for n in b.db.nodes()] == ["node-b"], 10)
    datasets = make_pet_series(shape=(8, 16, 16), seed=84)
    assert send_datasets(datasets, b.port) == [0] * 8
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_until(lambda: (b.db.series(uid) or {}).get("state") == "delivered", 60), b.db.series(uid)
    assert uid in b.timings and len(recorder.stored) == 8
    # b's heartbeat keeps it alive for the others (a node would otherwise take its work back).
    before = next(n["heartbeat_at"] for n in b.db.nodes())
    assert wait_until(lambda: next(n["heartbeat_at"] for n in b.db.nodes()) > before, 10)
    assert time.time() - next(n["heartbeat_at"] for n in b.db.nodes()) < 5


def test_status_and_series_commands_follow_the_database_url(two_nodes, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    a, b = two_nodes()
    datasets = make_pet_series(shape=(4, 16, 16), seed=85)
    assert send_datasets(datasets[:2], b.port) == [0, 0]
    capsys.readouterr()
    assert main(["-c", str(tmp_path / "config-a" / "node.yaml"), "status"]) == 0
    out = capsys.readouterr().out
    assert str(datasets[0].SeriesInstanceUID)[:20] in out  # b's series, seen through a's configuration
    assert "nodes sharing postgresql://" in out and "node-a" in out and "node-b" in out
    assert main(["-c", str(tmp_path / "config-a" / "node.yaml"), "series", "show",
                 str(datasets[0].SeriesInstanceUID)]) == 0
    assert "received_count" in capsys.readouterr().out


def test_the_stuck_work_sweep_leaves_a_live_nodes_work_alone(two_nodes) -> None:
    from dicom_node.state import InstanceRecord, SeriesState

    a, b = two_nodes()
    for uid in ("9.1", "9.2"):
        b.db.store_instance(InstanceRecord(
            sop_instance_uid=f"{uid}.1", series_uid=uid, study_uid="9", sop_class_uid=PET, modality="PT",
            path=Path("/nonexistent"), ipp=None, iop=None, expected_count=None, calling_ae="SCANNER",
            called_ae="PETNODE", peer_host="127.0.0.1"))
    assert a.db.set_state("9.1", SeriesState.PROCESSING)  # a works on it (a is alive: it beats)
    assert a.db.set_state("9.2", SeriesState.PROCESSING)
    with a.db._tx() as c:  # ... and 9.2 was taken by a node that is gone (it never beat here)
        c.execute("UPDATE series SET owner = 'node-gone' WHERE series_uid = '9.2'")
    # Long after stuck_after_s, b's sweep: a's work is not b's to take back, the gone node's is.
    assert b.sweep_stuck(now=time.time() + 10_000) == {"processing": 1, "sending": 0}
    assert b.db.series("9.1")["state"] == "processing" and b.db.series("9.1")["owner"] == "node-a"
    # Taken back from the gone node: no longer its processing (a live node's completion job may already have
    # picked it up again, as its own, within the moment between the sweep and this read).
    gone = b.db.series("9.2")
    assert not (gone["state"] == "processing" and gone["owner"] == "node-gone"), gone


class _GatedSink:
    """A CT storage SCP that notes every C-STORE (a re-send shows twice) and, once it has ``hold_after`` of them,
    holds the next until ``gate`` is set: a send stays in flight for as long as a test needs."""

    def __init__(self, hold_after: int) -> None:
        self.hold_after = hold_after
        self.gate = threading.Event()
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="SLOW")
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        if len(self.received) >= self.hold_after:
            self.gate.wait(30)
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


def test_a_killed_node_s_send_is_taken_over_only_once_its_heartbeat_stops(tmp_path: Path, postgres_url: str) -> None:
    from tests.e2e.conftest import NodeProcess

    sink = _GatedSink(hold_after=5)
    ct = make_ct_series(shape=(40, 16, 16), seed=86)
    uid = str(ct[0].SeriesInstanceUID)
    rules = [{"name": "ct", "match": {"modality": ["CT"]}, "destinations": [{"peer": "slow"}]}]
    peers = [{"name": "slow", "ae_title": "SLOW", "host": "127.0.0.1", "port": sink.port}]
    a = NodeProcess(_write_node_config(tmp_path, "a", rules, postgres_url, peers=peers), tmp_path / "a.log").start()
    b: Node | None = None
    try:
        assert send_datasets(ct, a.port) == [0] * 40
        assert wait_until(lambda: len(sink.received) == 5, timeout=60), (tmp_path / "a.log").read_text()[-3000:]
        # b starts while a sends: its recovery leaves a's send alone, and so does its stuck-work sweep.
        b = _start_in_process(_write_node_config(tmp_path, "b", rules, postgres_url, peers=peers))
        (send,) = b.db.sends(uid)
        assert (send["state"], send["owner"]) == ("sending", "node-a")
        assert b.sweep_stuck(now=time.time() + 10_000) == {"processing": 0, "sending": 0}
        a.kill9()  # mid-send: its row stays, its heartbeat stops
        sink.gate.set()
        assert b.db.sends(uid)[0]["state"] == "sending"  # still a's, until a is known to be gone
        assert wait_until(lambda: b.db.live_nodes(time.time() - 3.0) == set(), timeout=10)
        assert b.sweep_stuck() == {"processing": 0, "sending": 1}
        assert wait_until(lambda: len(set(sink.received)) == 40, timeout=60), len(set(sink.received))
        assert wait_until(lambda: (b.db.series(uid) or {}).get("state") == "delivered", timeout=30)
        assert len(sink.received) <= 41  # at most the instance in flight at the kill arrives twice
        assert b.db.sends(uid)[0]["owner"] == "node-b"
    finally:
        sink.gate.set()
        a.stop()
        if b is not None:
            b.stop()
        sink.server.shutdown()
