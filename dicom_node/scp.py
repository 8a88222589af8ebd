"""Wiring of the Storage/Verification SCP: which SOP classes and transfer syntaxes, limits, handlers.

Connection limits are ours, not pynetdicom's: pynetdicom counts every acceptor thread against
``maximum_associations``, including TCP connections that never send an A-ASSOCIATE-RQ, so a few idle sockets
(a port scanner, a load balancer's health check, a half-configured modality) lock every scanner out until the
network timeout. Here a connection only takes an association slot once its A-ASSOCIATE-RQ arrives
(:func:`dicom_node.handlers.handle_requested`); before that it must send the request within
``association_request_timeout_s``, and one remote address may hold at most ``max_connections_per_host`` of them.

With ``tls.port`` a second listener speaks DICOM over TLS (dicom_node/tls.py) with the same handlers, limits and
state; its handshake runs on the connection's own thread under the same request timeout, and a client
certificate mapped to calling AE titles (``tls.client_ae_titles``) is checked before the usual AE-title checks.
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node import fastdimse, reactor, tls, uidcache
from dicom_node.handlers import (
    ReceiveContext,
    _calling_ae_of,
    _peer,
    _reject,
    called_ae_of,
    handle_accepted,
    handle_conn_close,
    handle_conn_open,
    handle_echo,
    handle_rejected,
    handle_requested,
    handle_store,
    supported_storage,
)
from dicom_node.settings import NodeSettings

logger = logging.getLogger(__name__)


@dataclass
class ConnectionGuard:
    """Counts TCP connections (per remote address and in all) and negotiated associations.

    With receiver processes (``receive_processes``) ``board`` is the board they share (``receivers.LoadBoard``):
    ``max_connections`` and ``max_associations`` then hold for all the processes together, and
    ``max_connections_per_host`` for each process.
    """

    max_connections: int
    max_per_host: int
    max_associations: int
    request_timeout_s: float
    _per_host: dict[str, int] = field(default_factory=dict)
    _connections: int = 0
    _associations: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    board: Any = None
    board_index: int = 0

    def open_connection(self, host: str) -> str | None:
        """Take a connection slot for ``host``; the reason when there is none (the connection is then closed)."""
        with self._lock:
            if self._connections >= self.max_connections:
                return f"{self._connections} connections open (max_connections={self.max_connections})"
            # The node accepts for every process: the board counts what the receivers hold too.
            total = self.board.connections() if self.board is not None and self.board_index == 0 else 0
            if total >= self.max_connections:
                return (f"{total} connections open in the receiving processes together "
                        f"(max_connections={self.max_connections})")
            held = self._per_host.get(host, 0)
            if held >= self.max_per_host:
                return (f"{held} connections already open from this address "
                        f"(max_connections_per_host={self.max_per_host})")
            self._per_host[host] = held + 1
            self._connections += 1
            return None

    def close_connection(self, host: str, assoc_key: int | None) -> None:
        with self._lock:
            self._connections = max(0, self._connections - 1)
            left = self._per_host.get(host, 0) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)
            if assoc_key is not None:
                self._free_association(assoc_key)

    def end_association(self, assoc_key: int) -> None:
        """The association is released or aborted: its slot is free (its connection may linger a moment)."""
        with self._lock:
            self._free_association(assoc_key)

    def _free_association(self, assoc_key: int) -> None:  # under self._lock; once per association
        if assoc_key in self._associations:
            self._associations.discard(assoc_key)
            if self.board is not None:
                self.board.release_association(self.board_index)

    def admit_association(self, assoc_key: int) -> str | None:
        """Take an association slot (after the A-ASSOCIATE-RQ); the reason when there is none."""
        with self._lock:
            if len(self._associations) >= self.max_associations:
                return (f"{len(self._associations)} associations in progress "
                        f"(max_associations={self.max_associations})")
            if self.board is not None:
                held = self.board.admit_association(self.board_index, self.max_associations)
                if held is not None:
                    return (f"{held} associations in progress in the receiving processes together "
                            f"(max_associations={self.max_associations})")
            self._associations.add(assoc_key)
            return None

    @property
    def associations(self) -> int:
        with self._lock:
            return len(self._associations)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, plus: the connection slot is given back when the association thread ends, and a
    connection that never asked for an association is logged with its real cause."""

    def handle(self) -> None:
        server: GuardedAssociationServer = self.server  # type: ignore[assignment]
        guard = server.guard
        host = str(self.client_address[0])
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        started = False
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._tls_handshake(peer, guard.request_timeout_s):
                return
            assoc = self._create_association()
            opened = time.monotonic()
            run = assoc.run
            counted = [True] if server.board is not None else []

            def ended(_event: Any = None) -> None:
                # The association slot and the receivers' board place go as soon as the association is released or
                # aborted: its thread lives on a little (closing the transport), and a scanner that opens its next
                # association at once must find the slot free and this process idle.
                guard.end_association(id(assoc))
                if counted:  # once per connection (list.pop is atomic under the GIL)
                    counted.pop()
                    server.connection_ended()

            assoc.bind(evt.EVT_RELEASED, ended)
            assoc.bind(evt.EVT_ABORTED, ended)

            def run_and_release() -> None:
                try:
                    run()
                finally:
                    guard.close_connection(host, id(assoc))
                    ended()
                    if assoc.requestor.primitive is None:
                        logger.warning("connection from %s closed after %.1f s without an association request "
                                       "(association_request_timeout_s=%.1f); it held no association slot",
                                       peer, time.monotonic() - opened, guard.request_timeout_s)

            assoc.run = run_and_release  # type: ignore[method-assign]
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            started = True
        finally:
            if not started:  # the association thread never ran: give its slot back here
                guard.close_connection(host, None)
                server.connection_ended()

    def _tls_handshake(self, peer: str, timeout_s: float) -> bool:
        """The TLS handshake, on this connection's own thread and within the association request timeout; a
        failed one (plain DICOM to the TLS port, an untrusted or expired certificate, TLS < 1.2) closes the
        connection with the reason logged."""
        sock: ssl.SSLSocket = self.request  # type: ignore[assignment]
        previous = sock.gettimeout()
        sock.settimeout(timeout_s)
        try:
            sock.do_handshake()
        except ssl.SSLError as exc:
            logger.warning("TLS connection from %s refused: %s", peer, tls.explain_handshake_error(exc))
        except OSError as exc:  # timeout or reset before the handshake finished
            logger.warning("TLS connection from %s closed before its handshake finished: %s", peer,
                           exc or type(exc).__name__)
        else:
            sock.settimeout(previous)
            names = tls.certificate_names(sock.getpeercert())
            logger.info("TLS connection from %s: %s %s, client certificate %s", peer, sock.version(),
                        (sock.cipher() or ("?",))[0], repr(names[0]) if names else "none")
            return True
        try:
            sock.close()
        except OSError:  # pragma: no cover - already gone
            pass
        return False


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied cheaply for each association.

    pynetdicom gives every new association a ``deepcopy`` of them, and a deep copy builds every UID again (each
    one validated against its regex): with the node's storage SOP classes and transfer syntaxes that was about
    15 ms of CPU per association, most of what an association costs before its first C-STORE, and with ten
    senders at once a quarter of the receive time. Here each context is copied with its lists (the transfer
    syntaxes) copied too, which is what the deep copy protects; the UIDs, immutable strings, are shared.
    Negotiation only reads them (``pynetdicom.presentation.negotiate_as_acceptor``).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for context in self:
            if not hasattr(context, "__dict__"):
                copies.append(copy.deepcopy(context, memo))
                continue
            twin = copy.copy(context)
            for name, value in vars(twin).items():
                if isinstance(value, list):
                    setattr(twin, name, list(value))
                elif isinstance(value, (dict, set)):
                    setattr(twin, name, copy.deepcopy(value, memo))
            copies.append(twin)
        return copies


class GuardedAssociationServer(ThreadedAssociationServer):
    """The threaded association server with per-address and total connection limits."""

    guard: ConnectionGuard
    kind = "plain"  # or "tls": which of a receiver's listeners takes a connection handed over from this one
    # With receiver processes (dicom_node/receivers.py): on the node's listeners, what hands a connection to a less
    # busy receiver; on every process's listeners, the board its connections are counted on, and its place there.
    dispatcher: Any = None
    board: Any = None
    board_index = 0
    # Listen backlog. socketserver's default of 5 makes a burst of connections (idle ones included) wait in SYN
    # retries of 1 s, 3 s ... before we even see them, a scanner's among them.
    request_queue_size = 128

    @property
    def contexts(self) -> list[Any]:
        return self._petnode_contexts

    @contexts.setter
    def contexts(self, value: Sequence[Any]) -> None:  # pynetdicom's __init__ sets it
        self._petnode_contexts = _SupportedContexts(value)

    def _bind_defaults(self) -> None:
        """pynetdicom's defaults, without its PDU and DIMSE logging handlers while its logger hides INFO.

        The server hands its handlers to every association it accepts, and the A-ASSOCIATE-RQ one formats all 128
        contexts a storescu proposes (about 2 ms of CPU per association) for a logger petnode sets to WARNING
        unless asked for DEBUG (dicom_node.cli). The associations' own copies are taken off by
        ``fastdimse.unbind_standard_handlers``; with DEBUG logging both stay.
        """
        super()._bind_defaults()
        fastdimse.unbind_standard_handlers(self)  # (it checks the logger's level itself)

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection; on the TLS listener wrap it without the handshake.

        pynetdicom does the handshake right here, in the accept loop: one client that connects to the TLS port
        and sends nothing would stop the server from accepting anyone, and the connection limits would only
        count connections that got through it. Here the handshake runs on the connection's own thread
        (``_GuardedRequestHandler._tls_handshake``), after the limits, within ``association_request_timeout_s``.
        """
        assert self.socket is not None
        client, address = self.socket.accept()
        return self.wrap_accepted(client), address

    def wrap_accepted(self, client: socket.socket) -> Any:
        """On a TLS listener, the accepted connection wrapped for TLS without the handshake; else as it is."""
        if self.ssl_context is None:
            return client
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the handshake's round trips too
        except OSError:  # pragma: no cover - not a TCP socket
            pass
        return self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.hand_over(request, client_address, self.kind):
            # A receiver process has the connection now: give back the slot verify_request took here, and close
            # only this process's descriptor (no shutdown(): that would end the connection for the receiver too).
            self.guard.close_connection(str(client_address[0]), None)
            request.close()
            return
        super().process_request(request, client_address)

    def connection_ended(self) -> None:
        """A connection this process handled is over: one less on the receivers' board."""
        if self.board is not None:
            self.board.release(self.board_index)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        reason = self.guard.open_connection(host)
        if reason is not None:
            logger.warning("connection from %s:%s refused before any association: %s", host, client_address[1],
                           reason)
            return False
        return True


def make_ae(settings: NodeSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    reactor.enable(ae)  # each message handled as it arrives, not on pynetdicom's 1 ms polls (dicom_node/reactor.py)
    uidcache.install()  # the 128 contexts a scanner proposes are checked once per process, not per association
    # pynetdicom's own limit counts idle connections too; ours (ConnectionGuard) is the one that applies.
    ae.maximum_associations = settings.max_connections + 1
    ae.network_timeout = settings.network_timeout_s
    ae.dimse_timeout = settings.network_timeout_s
    # For an acceptor this is how long a new connection may wait before its A-ASSOCIATE-RQ.
    ae.acse_timeout = settings.association_request_timeout_s
    ae.add_supported_context(Verification)
    for uid, syntaxes in supported_storage().items():
        ae.add_supported_context(uid, list(syntaxes))
    return ae


def handle_tls_requested(event: Any, ctx: ReceiveContext, client_ae_titles: Mapping[str, Sequence[str]]) -> None:
    """An A-ASSOCIATE-RQ on the TLS listener: the client certificate must allow the calling AE title
    (``tls.client_ae_titles``), then the same checks as on the plain port (:func:`handle_requested`)."""
    assoc = event.assoc
    try:
        calling = _calling_ae_of(assoc)
        try:
            peercert = assoc.dul.socket.socket.getpeercert()
        except (AttributeError, OSError, ValueError):
            peercert = None
        why = tls.check_calling_ae(calling, peercert, client_ae_titles)
        if why is not None:
            logger.warning("association rejected from calling AE %r at %s over TLS (called AE %r): %s", calling,
                           _peer(assoc), called_ae_of(assoc), why)
            _reject(assoc, 0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognised
            return
    except Exception:  # noqa: BLE001 - a handler never raises; an unexpected error rejects transiently
        logger.exception("TLS association request from %s could not be checked; rejected", _peer(assoc))
        if not assoc.is_rejected and not assoc.is_aborted:
            _reject(assoc, 0x02, 0x02, 0x01)
        return
    handle_requested(event, ctx)


@dataclass
class Listeners:
    """The node's listeners: the plain port, the TLS port, or both, sharing handlers, limits and state."""

    plain: GuardedAssociationServer | None
    tls: GuardedAssociationServer | None
    guard: ConnectionGuard
    handed: bool = False  # a receiver process's: nothing listens, see HandedServer

    @property
    def servers(self) -> list[GuardedAssociationServer]:
        return [server for server in (self.plain, self.tls) if server is not None]

    @property
    def server_address(self) -> Any:
        """The plain listener's address, or the TLS one's when there is no plain port."""
        server = self.plain or self.tls
        assert server is not None
        return server.server_address

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def tls_port(self) -> int | None:
        return int(self.tls.server_address[1]) if self.tls is not None else None

    def shutdown(self) -> None:
        for server in self.servers:
            if self.handed:
                server.server_close()  # it never served: socketserver's shutdown() would wait for it forever
            else:
                server.shutdown()


def _serve(ae: AE, server: GuardedAssociationServer, guard: ConnectionGuard, kind: str, handed: bool) -> None:
    server.guard = guard
    if handed:  # no port of its own: connections come from the node (receivers.take_connections)
        return
    thread = threading.Thread(target=server.serve_forever, name=f"petnode-scp{kind}-{server.server_address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() finds it, as with ae.start_server


class HandedServer(GuardedAssociationServer):
    """A receiver process's listener: it listens on no port. The node accepts every connection and hands some
    over (``receivers.take_connections`` feeds them to ``verify_request`` / ``process_request``), so it never
    runs ``serve_forever`` and is closed with ``server_close``."""

    def server_bind(self) -> None:
        self.server_address = ("", 0)

    def server_activate(self) -> None:
        pass


def start_scp(settings: NodeSettings, ctx: ReceiveContext, *, handed: bool = False) -> Listeners:
    """Start listening (non-blocking): the plain port and, with ``tls.port``, the TLS port (instead of the plain
    one when ``tls.plain_port_enabled`` is false). ``listeners.port`` / ``tls_port`` are the ports (port 0).

    ``handed``: a receiver process's listeners, which take only connections the node hands over (HandedServer).
    """
    ae = make_ae(settings)
    guard = ConnectionGuard(max_connections=settings.max_connections, max_per_host=settings.max_connections_per_host,
                            max_associations=settings.max_associations,
                            request_timeout_s=settings.association_request_timeout_s)
    ctx.guard = guard
    ctx.settings = settings
    handlers = [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_CONN_CLOSE, handle_conn_close, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
    ]
    tls_settings = settings.tls
    server_class = HandedServer if handed else GuardedAssociationServer
    plain = secure = None
    try:
        if tls_settings.plain_port_enabled:
            plain = ae.make_server((settings.bind_address, settings.port), evt_handlers=handlers,
                                   server_class=server_class, request_handler=_GuardedRequestHandler)
            _serve(ae, plain, guard, "", handed)
            if not handed:
                logger.info("listening as %s on %s:%d", settings.ae_title, settings.bind_address,
                            plain.server_address[1])
        if tls_settings.port is not None:
            tls_handlers = [h if h[0] is not evt.EVT_REQUESTED else
                            (evt.EVT_REQUESTED, handle_tls_requested, [ctx, dict(tls_settings.client_ae_titles)])
                            for h in handlers]
            secure = ae.make_server((settings.bind_address, tls_settings.port), evt_handlers=tls_handlers,
                                    ssl_context=tls.server_context(tls_settings),
                                    server_class=server_class, request_handler=_GuardedRequestHandler)
            secure.kind = "tls"
            _serve(ae, secure, guard, "-tls", handed)
            if not handed:
                logger.info("listening as %s on %s:%d over TLS (%s; client certificates %s%s)", settings.ae_title,
                            settings.bind_address, secure.server_address[1], tls.TLS_PROFILE_NAME,
                            "required" if tls_settings.require_client_cert else "optional",
                            f", {len(tls_settings.client_ae_titles)} mapped to AE titles"
                            if tls_settings.client_ae_titles else "")
    except BaseException:
        Listeners(plain=plain, tls=secure, guard=guard, handed=handed).shutdown()
        raise
    return Listeners(plain=plain, tls=secure, guard=guard, handed=handed)
