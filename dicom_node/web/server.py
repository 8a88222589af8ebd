"""uvicorn on a background thread of the node: started by :meth:`Node.start`, stopped by :meth:`Node.stop`.

The socket is bound here, before the thread starts, so a port in use is known at once: the node logs an ERROR and
goes on receiving DICOM without its page (the page is for people; C-STOREs from scanners come first).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.node import Node

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6; port 0: any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(128)  # connections queue from now on, even before uvicorn's loop takes the socket
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class WebServer:
    """One running uvicorn server on its own thread and event loop."""

    def __init__(self, server: Any, sock: socket.socket, host: str) -> None:
        self._server = server
        self.app = server.config.app  # the Starlette app (its state holds the thumbnail cache)
        self._sock = sock
        self.host = host
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name=f"petnode-web-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except Exception:  # noqa: BLE001 - the page is gone, DICOM goes on; say why once
            logger.exception("status page on port %d stopped with an error", self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving (open keep-alive connections are closed); returns within a few seconds in any case."""
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        self._sock.close()


def start_web(node: Node) -> WebServer | None:
    """Serve ``node``'s status page and metrics when ``web.enabled``; None when disabled or it cannot listen."""
    settings = node.settings.web
    if not settings.enabled:
        return None
    try:
        import uvicorn

        from dicom_node.web.app import make_app

        sock = _bind(settings.bind_address, settings.port)
    except (OSError, ImportError) as exc:
        logger.error("status page not started: cannot listen on %s:%d (web.bind_address, web.port): %s; DICOM "
                     "receive goes on without it", settings.bind_address, settings.port,
                     getattr(exc, "strerror", None) or exc)
        return None
    try:
        config = uvicorn.Config(make_app(node), lifespan="off", access_log=False, log_config=None,
                                log_level="warning", timeout_graceful_shutdown=2, server_header=False)
        web = WebServer(uvicorn.Server(config), sock, settings.bind_address)
    except Exception:  # noqa: BLE001 - whatever keeps the page from starting must not keep DICOM from running
        sock.close()
        logger.exception("status page not started; DICOM receive goes on without it")
        return None
    logger.info("status page at %s (metrics at %smetrics)%s", web.url, web.url,
                "; login required" if settings.needs_login else "")
    return web
