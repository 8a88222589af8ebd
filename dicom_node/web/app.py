"""The Starlette application: the status page, thumbnails, ``/metrics``, ``/healthz`` and ``/readyz``.

Endpoints are plain functions: Starlette runs them in its thread pool, so the database and file reads they do
never block the event loop (and never the DICOM side, which runs on its own threads).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.web.auth import Login, LoginMiddleware
from dicom_node.web.metrics import CONTENT_TYPE
from dicom_node.web.page import StatusPage
from dicom_node.web.thumbs import Thumbnails

if TYPE_CHECKING:
    from dicom_node.node import Node

_UID = re.compile(r"^[0-9.]{1,64}$")
# The page loads nothing from elsewhere and runs no script: say so to the browser too.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def make_app(node: Node) -> Starlette:
    """The web application of ``node`` (its metrics registry gets the scrape-time collector here)."""
    settings = node.settings.web
    page = StatusPage(node, settings.refresh_s)
    thumbs = Thumbnails(node.db)
    node.metrics.bind(node)

    def index(request: Request) -> Response:
        return HTMLResponse(page.render(), headers=SECURITY_HEADERS)

    def metrics(request: Request) -> Response:
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE, headers={"cache-control": "no-store"})

    def thumbnail(request: Request) -> Response:
        uid = request.path_params["series_uid"]
        png = thumbs.png(uid) if _UID.match(uid) else None
        if png is None:
            return PlainTextResponse("no thumbnail\n", status_code=404, headers=SECURITY_HEADERS)
        return Response(png, media_type="image/png", headers=SECURITY_HEADERS)

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n", headers={"cache-control": "no-store"})

    def readyz(request: Request) -> Response:
        checks = node.readiness()
        failing = [name for name, ok in checks.items() if not ok]
        if failing:
            return PlainTextResponse("not ready: " + ", ".join(failing) + "\n", status_code=503,
                                     headers={"cache-control": "no-store"})
        return PlainTextResponse("ready\n", headers={"cache-control": "no-store"})

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/thumb/{series_uid}.png", thumbnail, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        middleware=[Middleware(LoginMiddleware, login=Login(settings))],
    )
    app.state.thumbnails = thumbs  # tests look at its render count
    return app
