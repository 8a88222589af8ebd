"""Operations over HTTP: the read-only status page, Prometheus metrics, health and readiness probes.

``start_web(node)`` (called by :meth:`dicom_node.node.Node.start`) serves them on a background thread;
:class:`NodeMetrics` is the node's own Prometheus registry, fed by the receive path, processing and sends.
The app itself (Starlette, uvicorn) is imported only when the server starts.
"""

from __future__ import annotations

from dicom_node.web.metrics import NodeMetrics
from dicom_node.web.server import WebServer, start_web

__all__ = ["NodeMetrics", "WebServer", "start_web"]
