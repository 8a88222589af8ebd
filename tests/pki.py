"""A throw-away PKI for the DICOM TLS tests: a CA, server and client certificates, an untrusted client (another
CA) and expired certificates, written as PEM files with ``cryptography``.

RSA 2048 keys: DCMTK 3.6.7's default profile (Non-downgrading BCP 195) negotiates ECDHE-RSA suites under TLS 1.2.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path  # the trusted CA certificate
    server: Pair  # CN petnode-server, SAN localhost / 127.0.0.1; also the node's client certificate for sends
    client: Pair  # CN scanner-1 (a modality), signed by the CA
    other_client: Pair  # CN scanner-2, signed by the CA
    untrusted_client: Pair  # CN scanner-1, signed by another CA
    expired: Pair  # CN petnode-expired, SAN 127.0.0.1, signed by the CA, expired yesterday
    soon: Pair  # CN petnode-soon, signed by the CA, expires in 10 days
    other_ca: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "petnode tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: rsa.RSAPrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)


def _ca(root: Path, cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey, Path]:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = root / f"{cn.replace(' ', '-')}.crt"
    _write(path, cert)
    return cert, key, path


def _leaf(root: Path, name: str, cn: str, ca: tuple[x509.Certificate, rsa.RSAPrivateKey, Path], *,
          days: float = 365, expired: bool = False) -> Pair:
    key = _key()
    ca_cert, ca_key, _ = ca
    now = dt.datetime.now(dt.timezone.utc)
    start, end = ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired
                  else (now - dt.timedelta(hours=1), now + dt.timedelta(days=days)))
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    path = root / f"{name}.crt"
    _write(path, cert, key)
    return Pair(cert=path, key=path.with_suffix(".key"))


def make_pki(root: Path) -> Pki:
    """Write the whole PKI under ``root`` (about a second: eight RSA keys)."""
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca(root, "petnode test CA")
    other = _ca(root, "rogue CA")
    return Pki(root=root, ca=ca[2], other_ca=other[2],
               server=_leaf(root, "server", "petnode-server", ca),
               client=_leaf(root, "client", "scanner-1", ca),
               other_client=_leaf(root, "client2", "scanner-2", ca),
               untrusted_client=_leaf(root, "untrusted", "scanner-1", other),
               expired=_leaf(root, "expired", "petnode-expired", ca, expired=True),
               soon=_leaf(root, "soon", "petnode-soon", ca, days=10))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI, made once per test module that imports this fixture."""
    return make_pki(tmp_path_factory.mktemp("pki"))
