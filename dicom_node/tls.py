"""DICOM TLS: the secure transport profile, the SSL contexts built from it, certificate checks and expiry.

Profile: PS3.15 B.12, the BCP 195 RFC 8996, 9325 TLS Secure Transport Connection Profile. TLS 1.2 is the minimum
and TLS 1.3 is preferred when both sides have it; TLS 1.0/1.1, SSL, compression and renegotiation are off. For
TLS 1.2 only ephemeral ECDH key exchange with AEAD ciphers (AES-GCM) is offered, the four suites RFC 9325 4.2
recommends, so no RC4, 3DES, CBC, SHA-1 MACs, NULL, anonymous or export suites can be negotiated. This also
satisfies what DCMTK 3.6.7 asks for by default (its "Non-downgrading BCP 195 TLS Profile", PS3.15 B.10).

The constants below are the profile as petnode implements it (the conformance statement reads them).

Identity of a TLS caller: a verified client certificate names who is calling (its subject Common Name and its
subject alternative names, DNS and e-mail); ``tls.client_ae_titles`` in node.yaml maps such a name to the calling
AE titles that certificate may use, so a stolen or misconfigured modality certificate cannot call as another AE.

Host names: when petnode sends, the peer's certificate must name the ``host`` it is configured with (DNS or IP
subject alternative name), as RFC 9325 asks, unless the peer's ``tls.check_hostname`` is false. Verifying the
chain against a per-peer ``ca`` alone would let any certificate that CA issued (another modality's, say) stand in
for the PACS; the check is kept on by default and can be turned off for private-CA peers whose certificates do
not carry their address.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings, Peer, PeerTls, TlsSettings

logger = logging.getLogger(__name__)

TLS_PROFILE_NAME = "BCP 195 RFC 8996, 9325 TLS Secure Transport Connection Profile (DICOM PS3.15 B.12)"
MIN_VERSION = ssl.TLSVersion.TLSv1_2
MAX_VERSION = ssl.TLSVersion.TLSv1_3
# TLS 1.2 cipher suites, in preference order (OpenSSL names; IANA names in CIPHERS_TLS12_IANA).
CIPHERS_TLS12: tuple[str, ...] = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
)
CIPHERS_TLS12_IANA: tuple[str, ...] = (
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
)
# TLS 1.3 suites are all AEAD; Python cannot narrow them, OpenSSL 3 offers exactly these three.
CIPHERS_TLS13: tuple[str, ...] = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256")
# What the cipher string can never select (checked by the tests against the context's real list).
EXCLUDED_CIPHER_PARTS: tuple[str, ...] = ("RC4", "DES", "CBC", "NULL", "anon", "EXP", "MD5", "PSK", "SRP")
COMPRESSION = False
RENEGOTIATION = False


# --- contexts --------------------------------------------------------------------------------------------------
def _profile_context(protocol: int) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = MIN_VERSION
    context.maximum_version = MAX_VERSION
    context.set_ciphers(":".join(CIPHERS_TLS12))
    # No compression (CRIME) and no renegotiation (BCP 195 3.3, 3.5): both off in OpenSSL 3's defaults, said
    # here so a different OpenSSL build cannot turn them on.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of the TLS listener: our certificate, and the client certificates ``tls.ca`` vouches for."""
    if tls.cert is None or tls.key is None:
        raise ValueError("the TLS listener needs tls.cert and tls.key")
    context = _profile_context(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    _load(context, "tls", tls.cert, tls.key, tls.ca)
    if tls.ca is not None:
        # Without require_client_cert a certificate is still asked for and, when one is sent, verified (and
        # mapped to AE titles); a client without one is let in.
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: PeerTls) -> ssl.SSLContext:
    """The context of sends to one peer: its certificate verified against ``tls.ca`` (the system's trusted CAs
    when none is given), our own certificate presented when one is configured."""
    context = _profile_context(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = tls.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, "peer tls", tls.cert, tls.key, tls.ca)
    return context


def _load(context: ssl.SSLContext, where: str, cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """Certificate, key and CA into a context; a ConfigError naming the file when OpenSSL refuses one (the
    settings checked them at load, but files can change, or carry what OpenSSL rejects: a weak key, MD5)."""
    from dicom_node.errors import ConfigError

    try:
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}.cert / key: {str(cert)!r}, {str(key)!r}: {exc}") from exc
    try:
        if ca is not None:
            context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}.ca: {str(ca)!r}: {exc}") from exc


def tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``peer``; None when it has no TLS."""
    if peer.tls is None:
        return None
    return client_context(peer.tls), peer.host


def peer_at(settings: NodeSettings, ae_title: str, host: str, port: int) -> Peer | None:
    """The configured peer at this address (a send row keeps only the address): an explicit address in a rule
    that is a TLS peer's address is sent over TLS too, since that port speaks only TLS."""
    return next((p for p in settings.peers if p.ae_title == ae_title.strip() and p.host == host and p.port == port),
                None)


def handshake_problem(host: str, port: int, tls_args: tuple[ssl.SSLContext, str], timeout_s: float) -> str | None:
    """Why a TLS handshake with ``host:port`` fails (certificate untrusted or expired, wrong host name, a plain
    port, ...), or None when it succeeds. pynetdicom only logs this; a send report should say it."""
    context, hostname = tls_args
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=hostname):
                return None
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the peer's certificate is not accepted: {exc.verify_message or exc}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return f"cannot connect: {exc}"


_HANDSHAKE_HINTS = {
    "WRONG_VERSION_NUMBER": "not TLS: a plain DICOM connection to the TLS port?",
    "HTTP_REQUEST": "not TLS: an HTTP request to the TLS port",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate (tls.require_client_cert)",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions below 1.2",
    "NO_SHARED_CIPHER": "the client offers none of the profile's cipher suites",
}


def explain_handshake_error(exc: BaseException) -> str:
    """An SSL error of the server side as an operator reads it: OpenSSL's reason and what it usually means."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message or exc}"
    reason = getattr(exc, "reason", None) or str(exc)
    hint = _HANDSHAKE_HINTS.get(str(reason))
    return f"handshake failed: {reason}" + (f" ({hint})" if hint else "")


# --- client identity -------------------------------------------------------------------------------------------
def certificate_names(peercert: Mapping[str, Any] | None) -> list[str]:
    """The names a verified certificate (``SSLSocket.getpeercert()``) carries: subject CN, SAN DNS and e-mail."""
    if not peercert:
        return []
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "email"):
            names.append(str(value))
    return list(dict.fromkeys(names))


def allowed_calling_aes(names: Sequence[str], mapping: Mapping[str, Sequence[str]]) -> tuple[str, ...] | None:
    """The calling AE titles a certificate with ``names`` may use: the union over the names the mapping knows;
    None when it knows none of them."""
    found = [ae for name in names if name in mapping for ae in mapping[name]]
    return tuple(dict.fromkeys(found)) if any(name in mapping for name in names) else None


def check_calling_ae(calling_ae: str, peercert: Mapping[str, Any] | None,
                     mapping: Mapping[str, Sequence[str]]) -> str | None:
    """Why an association calling as ``calling_ae`` over TLS with this client certificate is refused, or None.

    With an empty mapping any verified certificate may use any calling AE title (``allowed_calling_aes`` still
    applies). Otherwise the certificate must be one the mapping names, and the calling AE one of its titles.
    """
    if not mapping:
        return None
    names = certificate_names(peercert)
    if not names:
        return "no client certificate, and tls.client_ae_titles maps certificates to calling AE titles"
    allowed = allowed_calling_aes(names, mapping)
    if allowed is None:
        return f"client certificate {names[0]!r} is not in tls.client_ae_titles"
    if calling_ae.strip() not in allowed:
        return (f"client certificate {names[0]!r} may call as {', '.join(allowed)} only "
                "(tls.client_ae_titles)")
    return None


# --- files and expiry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CertificateInfo:
    """One certificate of a configured file (a CA file may hold several)."""

    role: str  # e.g. "tls.cert", "peer pacs tls.ca"
    path: Path
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400.0

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.days_left(now) < 0

    def not_yet_valid(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.timezone.utc)) < self.not_before


def _certificates(path: Path) -> list[Any]:
    """The X.509 certificates in a PEM (one or more) or DER file; ValueError naming the file otherwise."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        certs = (list(x509.load_pem_x509_certificates(data)) if b"-----BEGIN" in data
                 else [x509.load_der_x509_certificate(data)])
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} is not a PEM or DER certificate file: {exc}") from exc
    if not certs:  # pragma: no cover - cryptography raises on a PEM without certificates
        raise ValueError(f"{str(path)!r} holds no certificate")
    return certs


def read_certificates(path: Path, role: str = "") -> list[CertificateInfo]:
    """Every certificate in a PEM (or DER) file; ValueError naming the file when there is none or it is bad."""
    return [CertificateInfo(role=role, path=path, subject=c.subject.rfc4514_string(),
                            issuer=c.issuer.rfc4514_string(), not_before=c.not_valid_before_utc,
                            not_after=c.not_valid_after_utc) for c in _certificates(path)]


def read_private_key(path: Path) -> Any:
    """The unencrypted private key in a PEM or DER file; ValueError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        loader = serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
        return loader(data, password=None)
    except TypeError as exc:  # encrypted: the node runs unattended, there is nobody to type a pass phrase
        raise ValueError(f"{str(path)!r} is encrypted; petnode needs an unencrypted key file (readable by the "
                         "node's user only)") from exc
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} is not a PEM or DER private key: {exc}") from exc


def check_key_pair(cert: Path, key: Path) -> None:
    """ValueError naming the files when ``key`` cannot be read or is not the private key of ``cert``."""
    from cryptography.hazmat.primitives import serialization

    first = _certificates(cert)[0]
    private = read_private_key(key)
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, fmt)
            != first.public_key().public_bytes(serialization.Encoding.DER, fmt)):
        raise ValueError(f"key {str(key)!r} does not belong to certificate {str(cert)!r} "
                         f"({first.subject.rfc4514_string()})")


def configured_certificates(settings: NodeSettings) -> list[CertificateInfo]:
    """Every certificate the node's TLS uses: its own (listener) and the CA/client files of each TLS peer."""
    files: list[tuple[str, Path]] = []
    tls = settings.tls
    for name in ("cert", "ca"):
        path = getattr(tls, name)
        if path is not None:
            files.append((f"tls.{name}", path))
    for peer in settings.peers:
        if peer.tls is None:
            continue
        for name in ("cert", "ca"):
            path = getattr(peer.tls, name)
            if path is not None:
                files.append((f"peer {peer.name} tls.{name}", path))
    out: list[CertificateInfo] = []
    for role, path in files:
        try:
            out.extend(read_certificates(path, role))
        except ValueError as exc:  # validated at load; a file replaced since is reported, not fatal here
            logger.error("%s: %s", role, exc)
    return out


def log_expiry(settings: NodeSettings, now: dt.datetime | None = None) -> list[CertificateInfo]:
    """Log ERROR for expired (or not yet valid) certificates, WARNING for those within the warning window;
    return the ones logged. Run at node start and daily."""
    days = settings.tls.expiry_warning_days
    flagged = []
    for info in configured_certificates(settings):
        left = info.days_left(now)
        if info.expired(now):
            logger.error("%s %s (%s) expired %s (%.0f days ago): TLS associations using it fail", info.role,
                         info.path, info.subject, info.not_after.date().isoformat(), -left)
        elif info.not_yet_valid(now):
            logger.error("%s %s (%s) is not valid before %s", info.role, info.path, info.subject,
                         info.not_before.isoformat(timespec="seconds"))
        elif left <= days:
            logger.warning("%s %s (%s) expires %s, in %.0f days (warning at %d days): renew it", info.role,
                           info.path, info.subject, info.not_after.date().isoformat(), left, days)
        else:
            continue
        flagged.append(info)
    return flagged


def describe(settings: NodeSettings, now: dt.datetime | None = None) -> list[str]:
    """Lines for ``petnode status``: the listener, then each certificate with its subject and days left."""
    tls = settings.tls
    lines: list[str] = []
    if tls.port is not None:
        plain = f"plain port {settings.port}" if tls.plain_port_enabled else "no plain port"
        who = ("client certificates required" if tls.require_client_cert else "client certificates optional")
        lines.append(f"listener: port {tls.port} ({plain}; {who}; "
                     f"{len(tls.client_ae_titles)} certificate(s) mapped to AE titles)")
    peers = [p.name for p in settings.peers if p.tls is not None]
    if peers:
        lines.append(f"TLS peers: {', '.join(peers)}")
    for info in configured_certificates(settings):
        left = info.days_left(now)
        flag = ("  [EXPIRED]" if left < 0 else "  [NOT YET VALID]" if info.not_yet_valid(now)
                else "  [EXPIRES SOON]" if left <= tls.expiry_warning_days else "")
        lines.append(f"{info.role:<24} {info.subject:<40} {left:7.0f} days left "
                     f"(until {info.not_after.date().isoformat()}){flag}")
    return lines


def check_pair(cert: Path | None, key: Path | None) -> None:
    """Settings validation: cert and key given together, and the key the certificate's."""
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both or neither")
    if cert is not None and key is not None:
        check_key_pair(cert, key)
