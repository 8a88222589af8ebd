"""Wiring of the Storage/Verification SCP: which SOP classes and transfer syntaxes, limits, handlers.

Connection limits are ours, not pynetdicom's: pynetdicom counts every acceptor thread against
``maximum_associations``, including TCP connections that never send an A-ASSOCIATE-RQ, so a few idle sockets
(a port scanner, a load balancer's health check, a half-configured modality) lock every scanner out until the
network timeout. Here a connection only takes an association slot once its A-ASSOCIATE-RQ arrives
(:func:`dicom_node.handlers.handle_requested`); before that it must send the request within
``association_request_timeout_s``, and one remote address may hold at most ``max_connections_per_host`` of them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.handlers import (
    ReceiveContext,
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
    """Counts TCP connections (per remote address and in all) and negotiated associations."""

    max_connections: int
    max_per_host: int
    max_associations: int
    request_timeout_s: float
    _per_host: dict[str, int] = field(default_factory=dict)
    _connections: int = 0
    _associations: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open_connection(self, host: str) -> str | None:
        """Take a connection slot for ``host``; the reason when there is none (the connection is then closed)."""
        with self._lock:
            if self._connections >= self.max_connections:
                return f"{self._connections} connections open (max_connections={self.max_connections})"
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
                self._associations.discard(assoc_key)

    def admit_association(self, assoc_key: int) -> str | None:
        """Take an association slot (after the A-ASSOCIATE-RQ); the reason when there is none."""
        with self._lock:
            if len(self._associations) >= self.max_associations:
                return (f"{len(self._associations)} associations in progress "
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
            assoc = self._create_association()
            opened = time.monotonic()
            run = assoc.run

            def run_and_release() -> None:
                try:
                    run()
                finally:
                    guard.close_connection(host, id(assoc))
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


class GuardedAssociationServer(ThreadedAssociationServer):
    """The threaded association server with per-address and total connection limits."""

    guard: ConnectionGuard
    # Listen backlog. socketserver's default of 5 makes a burst of connections (idle ones included) wait in SYN
    # retries of 1 s, 3 s ... before we even see them, a scanner's among them.
    request_queue_size = 128

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


def start_scp(settings: NodeSettings, ctx: ReceiveContext) -> GuardedAssociationServer:
    """Start listening (non-blocking); ``server.server_address[1]`` is the port (useful with port 0)."""
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
    server = ae.make_server((settings.bind_address, settings.port), evt_handlers=handlers,
                            server_class=GuardedAssociationServer, request_handler=_GuardedRequestHandler)
    server.guard = guard
    thread = threading.Thread(target=server.serve_forever, name=f"petnode-scp-{server.server_address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() finds it, as with ae.start_server
    logger.info("listening as %s on %s:%d", settings.ae_title, settings.bind_address, server.server_address[1])
    return server
