"""Login for the status page and metrics: a bearer token (Prometheus, scripts) or HTTP basic auth (a browser).

A browser asks for basic auth by itself when answered 401 with ``WWW-Authenticate: Basic``, so a PACS
administrator needs no login page and no cookie: the configured user and password, or any user name with the
token as the password. Prometheus sends either (``authorization: {credentials: ...}`` or ``basic_auth``).
Comparisons are of SHA-256 digests with :func:`hmac.compare_digest` (constant time, equal lengths).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dicom_node.settings import WebSettings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Supervisors probe these without credentials; they reveal nothing but "ok" / "not ready" and which check failed.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class Login:
    """The credentials ``settings`` configure (digests only are kept); ``allows`` checks an Authorization header."""

    def __init__(self, settings: WebSettings) -> None:
        self.required = settings.needs_login
        self._token = _digest(settings.token) if settings.token is not None else None
        self._user = _digest(settings.user) if settings.user is not None else None
        if settings.password_sha256 is not None:
            self._password: bytes | None = bytes.fromhex(settings.password_sha256)
        else:
            self._password = _digest(settings.password) if settings.password is not None else None

    def _token_ok(self, token: str) -> bool:
        return self._token is not None and hmac.compare_digest(_digest(token), self._token)

    def allows(self, authorization: str | None) -> bool:
        """Whether this ``Authorization`` header value is a valid login (always True when none is required)."""
        if not self.required:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return self._token_ok(value)
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if not sep:
            return False
        # Both checks always run, so the time taken does not tell which part was wrong.
        user_ok = self._user is not None and hmac.compare_digest(_digest(user), self._user)
        password_ok = self._password is not None and hmac.compare_digest(_digest(password), self._password)
        return (user_ok and password_ok) or self._token_ok(password)


class LoginMiddleware:
    """Answers 401 (with nothing else) to any request without a valid login, except the open probes."""

    def __init__(self, app: ASGIApp, login: Login) -> None:
        self.app = app
        self.login = login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.login.required or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        if self.login.allows(raw.decode("latin-1") if raw is not None else None):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        # A browser's first request never carries a login (it asks after the 401): only wrong ones are news.
        logger.log(logging.WARNING if raw is not None else logging.DEBUG, "status page: %s for %s %s from %s; "
                   "answered 401", "wrong login" if raw is not None else "no login", scope.get("method"),
                   scope.get("path"), client[0] if client else "?")
        body = b"401 Unauthorized\n"
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Basic realm="petnode", charset="UTF-8"'), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})
