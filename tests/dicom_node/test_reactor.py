"""Event-driven pynetdicom reactors (dicom_node/reactor.py): real associations over loopback, and the waits."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node import reactor, scu
from tests.factories import make_pet_series, write_series


class _Server:
    """A pynetdicom storage SCP that records each C-STORE's association (event-driven or pynetdicom's own)."""

    def __init__(self, event_driven: bool) -> None:
        self.seen: list[tuple[str, bool]] = []
        ae = AE(ae_title="REACTOR")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        if event_driven:
            assert reactor.enable(ae)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        self.seen.append((str(event.request.AffectedSOPInstanceUID), reactor.is_enabled(event.assoc)))
        return 0x0000


@pytest.mark.parametrize("event_driven", [True, False])
def test_store_over_loopback_with_and_without(tmp_path: Path, event_driven: bool) -> None:
    """petnode's SCU (always event-driven) stores a series into an SCP of either kind; only the enabled AE's
    associations wait on events, a plain pynetdicom AE in the same process keeps its polling."""
    server = _Server(event_driven)
    try:
        files = write_series(make_pet_series(shape=(6, 8, 8), seed=7), tmp_path / "pet")
        acknowledged: list[str] = []
        report = scu.send_files(files, "REACTOR", "127.0.0.1", server.port, timeout_s=10,
                                on_stored=acknowledged.append)
        assert report.error is None and report.sent == len(files) == 6
        assert sorted(uid for uid, _ in server.seen) == sorted(acknowledged) and len(set(acknowledged)) == 6
        assert {flag for _, flag in server.seen} == {event_driven}
        assert scu.echo("REACTOR", "127.0.0.1", server.port, timeout_s=10) is None
    finally:
        server.server.shutdown()


def test_scu_association_is_event_driven() -> None:
    ae = scu._make_ae("PETNODE", 5.0)
    ae.add_requested_context(Verification)
    server = _Server(False)
    try:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="REACTOR")
        assert assoc.is_established
        try:
            assert isinstance(assoc._petnode_wait, reactor._AssociationWaiter)
            assert isinstance(assoc.dul._petnode_wait, reactor._DulWaiter)
            assert isinstance(assoc.dul.to_provider_queue, reactor.WakingQueue)
            assert isinstance(assoc.dimse.msg_queue, reactor.WakingQueue)
            assert isinstance(assoc._reactor_checkpoint, reactor._WakingCheckpoint)
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.server.shutdown()


def test_association_waiter_wakes_on_a_put() -> None:
    """A wait of 30 s ends as soon as something is put into a queue the reactor polls."""
    event = threading.Event()
    waiter = reactor._AssociationWaiter(event)
    messages = reactor.WakingQueue(event.set)
    worker = threading.Thread(target=waiter, args=(30.0,), daemon=True)
    worker.start()
    time.sleep(0.05)
    assert worker.is_alive()
    messages.put("P-DATA")
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert messages.get_nowait() == "P-DATA"


def test_pausing_the_reactor_wakes_it() -> None:
    """A send_* call clears the reactor checkpoint and waits for the reactor to stop at it: the clear must end
    the reactor's wait at once (a 30 s wait here), not after its poll delay."""
    event = threading.Event()
    waiter = reactor._AssociationWaiter(event)
    checkpoint = reactor._WakingCheckpoint(event.set, is_set=True)
    assert checkpoint.is_set()
    worker = threading.Thread(target=waiter, args=(30.0,), daemon=True)
    worker.start()
    time.sleep(0.05)
    assert worker.is_alive()
    checkpoint.clear()
    worker.join(timeout=5)
    assert not worker.is_alive() and not checkpoint.is_set()


class _FakeDul:
    def __init__(self, raw: socket.socket | None) -> None:
        self.socket = type("AssociationSocket", (), {"socket": raw})()


def test_dul_waiter_wakes_on_socket_data_and_on_a_put() -> None:
    a, b = socket.socketpair()
    try:
        wakeup = reactor._Wakeup()
        waiter = reactor._DulWaiter(_FakeDul(a), wakeup)
        primitives = reactor.WakingQueue(wakeup.set)
        for trigger in (lambda: b.send(b"x"), lambda: primitives.put("A-RELEASE")):
            a.setblocking(False)
            try:
                a.recv(16)  # whatever the previous round sent is consumed, as the DUL would
            except BlockingIOError:
                pass
            worker = threading.Thread(target=waiter, args=(30.0,), daemon=True)
            worker.start()
            time.sleep(0.05)
            assert worker.is_alive()
            trigger()
            worker.join(timeout=5)
            assert not worker.is_alive()
    finally:
        a.close()
        b.close()


def test_dul_waiter_does_not_spin_on_a_socket_nobody_reads() -> None:
    """A socket that stays readable while the DUL finds nothing in it must not turn the waits into a busy loop:
    after a few immediate wake-ups the socket is left out and the wait lasts the delay asked for."""
    a, b = socket.socketpair()
    try:
        b.send(b"never read")
        waiter = reactor._DulWaiter(_FakeDul(a), reactor._Wakeup())
        for _ in range(reactor._SPIN_LIMIT + 2):
            waiter(0.001)
        for _ in range(2):
            t0 = time.perf_counter()
            waiter(0.05)
            assert time.perf_counter() - t0 >= 0.04
    finally:
        a.close()
        b.close()


def test_only_poll_delays_become_waits() -> None:
    """pynetdicom's 1 ms and 0.1 ms polls wait on events, the 1 ms reactor delay for IDLE_WAIT_S; its deliberate
    pauses (0.1 s after an abort, 10 ms while stopping) stay sleeps, and threads that are not reactors sleep as
    before."""
    calls: list[float] = []

    class Reactor(threading.Thread):
        def run(self) -> None:
            for seconds in (0.0001, 0.001, 0.01, 0.1):
                reactor._sleep(seconds)

    worker = Reactor()
    worker._petnode_wait = calls.append  # type: ignore[attr-defined]
    worker.start()
    worker.join(timeout=5)
    assert calls == [0.0001, reactor.IDLE_WAIT_S] and reactor.IDLE_WAIT_S > 0.001
    t0 = time.perf_counter()
    reactor._sleep(0.02)  # this thread has no waiter
    assert time.perf_counter() - t0 >= 0.015


def test_unknown_pynetdicom_internals_leave_it_polling(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(reactor, "_installed", None)
    monkeypatch.setattr(reactor, "_internals_problem", lambda: "pynetdicom 9.0 has no Association._run_reactor")
    ae = AE(ae_title="X")
    with caplog.at_level("WARNING", logger="dicom_node.reactor"):
        assert reactor.enable(ae) is False
    assert not getattr(ae, reactor.ENABLED_ATTR, False)
    assert "left polling" in caplog.text and "_run_reactor" in caplog.text


def test_the_installed_pynetdicom_has_what_the_reactor_needs() -> None:
    """Fails when a pynetdicom upgrade moves the internals (setup.cfg pins <4; this says what changed)."""
    assert reactor._internals_problem() is None


def test_an_idle_association_does_not_wake_every_millisecond() -> None:
    """Both reactor threads of an established, idle association (requestor and acceptor side) wake about once per
    IDLE_WAIT_S, not a thousand times a second: with ten associations at once, waking each millisecond was a GIL
    round per thread per millisecond and halved receive throughput."""
    server = _Server(True)
    ae = scu._make_ae("PETNODE", 5.0)
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="REACTOR")
        assert assoc.is_established
        try:
            counts = {"assoc": 0, "dul": 0}
            for name, owner in (("assoc", assoc), ("dul", assoc.dul)):
                inner = owner._petnode_wait

                def counting(seconds: float, inner: Any = inner, name: str = name) -> None:
                    counts[name] += 1
                    inner(seconds)

                owner._petnode_wait = counting
            time.sleep(0.5)
            per_thread_max = 100  # once per 5 ms at most (pynetdicom's polling: about 500 here)
            assert 0 < counts["assoc"] <= per_thread_max and 0 < counts["dul"] <= per_thread_max, counts
            assert assoc.send_c_echo().Status == 0x0000  # and it still answers at once
        finally:
            assoc.release()
        assert not assoc.is_established
    finally:
        server.server.shutdown()


class _LoopingDul(threading.Thread):
    """A DUL that waits as long as it is let (30 s) and checks only its kill flag, as pynetdicom's loop does."""

    def __init__(self, wakeup: reactor._Wakeup) -> None:
        super().__init__(daemon=True)
        self.state_machine = type("StateMachine", (), {"current_state": "Sta1"})()
        self._kill_thread = False
        self._petnode_wait = reactor._DulWaiter(_FakeDul(None), wakeup)

    def run(self) -> None:
        while not self._kill_thread:
            self._petnode_wait(30.0)

    def stop_dul(self) -> bool:  # pynetdicom's: set the flag, then poll until the thread has gone
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False

    def kill_dul(self) -> None:
        self._kill_thread = True


class _LoopingAssociation(threading.Thread):
    def __init__(self, event: threading.Event) -> None:
        super().__init__(daemon=True)
        self._kill = False
        self._petnode_wait = reactor._AssociationWaiter(event)

    def run(self) -> None:
        while not self._kill:
            self._petnode_wait(30.0)

    def kill(self) -> None:
        self._kill = True


@pytest.mark.parametrize("how", ["stop_dul", "kill_dul", "kill_association"])
def test_stopping_wakes_the_thread_it_stops(how: str) -> None:
    """Waits are longer than pynetdicom's polls, so a stop or kill must wake the thread it stops: here each
    thread would otherwise sleep 30 s."""
    wakeup, event = reactor._Wakeup(), threading.Event()
    dul, assoc = _LoopingDul(wakeup), _LoopingAssociation(event)
    reactor._wake_on_stop(assoc, dul, wakeup, event)
    dul.start()
    assoc.start()
    time.sleep(0.05)
    stopped = assoc if how == "kill_association" else dul
    t0 = time.perf_counter()
    if how == "stop_dul":
        assert dul.stop_dul() is True
    elif how == "kill_dul":
        dul.kill_dul()
    else:
        assoc.kill()
    stopped.join(timeout=10)
    assert not stopped.is_alive() and time.perf_counter() - t0 < 10
    for thread in (dul, assoc):  # the other one, woken the same way, so the test leaves no thread behind
        thread._kill_thread = thread._kill = True
    wakeup.set()
    event.set()
