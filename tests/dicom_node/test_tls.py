"""DICOM TLS units: the profile's contexts, the listener (real sockets on loopback), client certificates mapped to
calling AE titles, settings validation and certificate expiry. DCMTK interoperability is in tests/e2e/test_tls.py."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node import scu, tls
from dicom_node.errors import ConfigError
from dicom_node.handlers import ReceiveContext
from dicom_node.scp import Listeners, start_scp
from dicom_node.settings import NodeSettings, PeerTls, load_settings
from dicom_node.spool import Spool
from dicom_node.state import StateDB
from tests.conftest import wait_until
from tests.factories import make_pet_series, write_series
from tests.pki import Pair, Pki, pki  # noqa: F401 - fixture

HOST = "127.0.0.1"


def scp_settings(pki: Pki, tmp_path: Path, server: Pair | None = None, **tls_extra: Any) -> NodeSettings:
    server = server or pki.server
    return NodeSettings.model_validate({
        "bind_address": HOST, "port": 0, "data_dir": str(tmp_path / "var"),
        "tls": {"port": 0, "cert": str(server.cert), "key": str(server.key), "ca": str(pki.ca),
                "client_ae_titles": {"scanner-1": ["SCANNER"]}, **tls_extra},
        "disk": {"min_free_mb": 1, "max_used_percent": 100},
    })


@pytest.fixture
def make_scp(tmp_path: Path) -> Iterator[Any]:
    started: list[tuple[Listeners, StateDB]] = []

    def _start(settings: NodeSettings) -> tuple[Listeners, StateDB]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = StateDB(settings.state_db)
        listeners = start_scp(settings, ReceiveContext(spool=Spool(settings.data_dir, settings.disk), db=db))
        started.append((listeners, db))
        return listeners, db

    yield _start
    for listeners, db in started:
        listeners.shutdown()
        db.close()


def client_args(pki: Pki, client: Pair | None = None, hostname: str = HOST) -> tuple[ssl.SSLContext, str]:
    client = client or pki.client
    return tls.client_context(PeerTls(ca=pki.ca, cert=client.cert, key=client.key)), hostname


def handshake(port: int, context: ssl.SSLContext, hostname: str | None = None) -> str:
    """A bare TLS handshake with the listener: the negotiated version, or the client's error."""
    with socket.create_connection((HOST, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=hostname) as sock:
                sock.recv(0)
                return str(sock.version())
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"


# --- the profile -----------------------------------------------------------------------------------------------
def test_contexts_follow_the_bcp195_profile(pki: Pki, tmp_path: Path):
    contexts = {"server": tls.server_context(scp_settings(pki, tmp_path).tls), "client": client_args(pki)[0]}
    for role, context in contexts.items():
        assert context.minimum_version == tls.MIN_VERSION == ssl.TLSVersion.TLSv1_2, role
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3, role
        assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION, role
        assert context.verify_mode == ssl.CERT_REQUIRED, role
        ciphers = context.get_ciphers()
        tls12 = {c["name"] for c in ciphers if c["protocol"] == "TLSv1.2"}
        assert tls12 == set(tls.CIPHERS_TLS12), role
        assert {c["name"] for c in ciphers if c["protocol"] == "TLSv1.3"} <= set(tls.CIPHERS_TLS13), role
        for c in ciphers:
            assert c["aead"] and not any(bad in c["name"] for bad in tls.EXCLUDED_CIPHER_PARTS), c
            assert c["protocol"] == "TLSv1.3" or c["kea"] == "kx-ecdhe", c
    assert len(tls.CIPHERS_TLS12) == len(tls.CIPHERS_TLS12_IANA)
    assert contexts["client"].check_hostname


def test_the_listener_refuses_old_tls_and_weak_ciphers(pki: Pki, tmp_path: Path, make_scp: Any,
                                                       caplog: pytest.LogCaptureFixture):
    listeners, _ = make_scp(scp_settings(pki, tmp_path))
    good = client_args(pki)[0]
    assert handshake(listeners.tls_port, good, HOST) == "TLSv1.3"
    good.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(listeners.tls_port, good, HOST) == "TLSv1.2"
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):  # so says Python too
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    assert handshake(listeners.tls_port, old).startswith("refused")
    assert wait_until(lambda: "UNSUPPORTED_PROTOCOL" in caplog.text, timeout=5), caplog.text

    cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc.check_hostname, cbc.verify_mode = False, ssl.CERT_NONE
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-RSA-AES128-SHA:AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0")
    cbc.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    assert handshake(listeners.tls_port, cbc).startswith("refused")
    assert wait_until(lambda: "NO_SHARED_CIPHER" in caplog.text, timeout=5), caplog.text


# --- the listener ----------------------------------------------------------------------------------------------
def test_store_and_echo_over_tls_with_the_mapped_calling_ae(pki: Pki, tmp_path: Path, make_scp: Any):
    listeners, db = make_scp(scp_settings(pki, tmp_path))
    files = write_series(make_pet_series(shape=(3, 8, 8), seed=3), tmp_path / "pet")
    report = scu.send_files(files, "PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER",
                            tls_args=client_args(pki))
    assert report.ok, report.summary()
    assert db.list_series([])[0]["received_count"] == 3
    assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER", tls_args=client_args(pki)) is None
    assert scu.echo("PETNODE", HOST, listeners.port, calling_ae="ANY") is None  # the plain port still answers
    # The same certificate under another calling AE title, and a trusted certificate nobody mapped.
    assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="OTHER",
                    tls_args=client_args(pki)) == "association rejected by the peer"
    assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER",
                    tls_args=client_args(pki, pki.other_client)) == "association rejected by the peer"
    assert wait_until(lambda: listeners.guard.connections == 0, timeout=5)


def test_without_a_mapping_any_trusted_certificate_may_call(pki: Pki, tmp_path: Path, make_scp: Any):
    listeners, _ = make_scp(scp_settings(pki, tmp_path, client_ae_titles={}))
    assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="ANYONE",
                    tls_args=client_args(pki, pki.other_client)) is None


def test_an_idle_or_plain_connection_to_the_tls_port_blocks_nobody(pki: Pki, tmp_path: Path, make_scp: Any,
                                                                   caplog: pytest.LogCaptureFixture):
    """pynetdicom does the handshake in its accept loop: one silent client would stop the whole listener.
    Here a silent client is closed after association_request_timeout_s and others are served meanwhile."""
    settings = scp_settings(pki, tmp_path).model_copy(update={"association_request_timeout_s": 1.0})
    listeners, _ = make_scp(settings)
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    with socket.create_connection((HOST, listeners.tls_port)) as idle:
        assert wait_until(lambda: listeners.guard.connections == 1, timeout=5)
        assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER", tls_args=client_args(pki),
                        timeout_s=3) is None
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the node after the request timeout
    assert wait_until(lambda: "closed before its handshake finished" in caplog.text, timeout=5)
    # Plain DICOM on the TLS port: dropped with the reason, the listener goes on.
    assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER", timeout_s=3) is not None
    assert wait_until(lambda: "a plain DICOM connection to the TLS port" in caplog.text, timeout=5)
    assert scu.echo("PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER", tls_args=client_args(pki)) is None
    assert wait_until(lambda: listeners.guard.connections == 0, timeout=5)


def test_scu_says_why_the_handshake_failed(pki: Pki, tmp_path: Path, make_scp: Any):
    listeners, _ = make_scp(scp_settings(pki, tmp_path))
    wrong_name = client_args(pki, hostname="pacs.example.org")
    assert "Hostname mismatch" in str(scu.echo("PETNODE", HOST, listeners.tls_port, tls_args=wrong_name))
    untrusted = tls.client_context(PeerTls(ca=pki.other_ca, cert=pki.client.cert, key=pki.client.key)), HOST
    files = write_series(make_pet_series(shape=(2, 8, 8), seed=4), tmp_path / "pet")
    report = scu.send_files(files, "PETNODE", HOST, listeners.tls_port, calling_ae="SCANNER", tls_args=untrusted)
    assert not report.ok and "the peer's certificate is not accepted" in str(report.error), report.error
    # The listener sends its chain up to our CA, which the client does not trust.
    assert "self-signed certificate in certificate chain" in str(report.error)


# --- client identity -------------------------------------------------------------------------------------------
def test_certificate_names_and_calling_ae_mapping():
    cert = {"subject": ((("organizationName", "Hospital"),), (("commonName", "pet-ct-1"),)),
            "subjectAltName": (("DNS", "petct1.hospital.org"), ("IP Address", "10.0.0.5"))}
    assert tls.certificate_names(cert) == ["pet-ct-1", "petct1.hospital.org"]
    assert tls.certificate_names({}) == [] and tls.certificate_names(None) == []
    mapping = {"pet-ct-1": ["PETCT1"], "petct1.hospital.org": ["PETCT1_B"]}
    assert tls.allowed_calling_aes(["pet-ct-1", "petct1.hospital.org"], mapping) == ("PETCT1", "PETCT1_B")
    assert tls.check_calling_ae("PETCT1_B", cert, mapping) is None
    assert "may call as PETCT1, PETCT1_B only" in str(tls.check_calling_ae("CT2", cert, mapping))
    assert "not in tls.client_ae_titles" in str(tls.check_calling_ae("X", {"subject": ((("commonName", "o"),),)},
                                                                     mapping))
    assert "no client certificate" in str(tls.check_calling_ae("PETCT1", {}, mapping))
    assert tls.check_calling_ae("ANY", {}, {}) is None  # no mapping: the certificate check alone decides


# --- settings --------------------------------------------------------------------------------------------------
def test_tls_is_off_by_default():
    settings = NodeSettings()
    assert settings.tls.port is None and settings.tls.plain_port_enabled and not tls.describe(settings)
    assert tls.configured_certificates(settings) == []


def _load(tmp_path: Path, data: dict[str, Any]) -> NodeSettings:
    path = tmp_path / "conf" / "node.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_settings(path)


def test_relative_certificate_paths_resolve_against_the_config_folder(pki: Pki, tmp_path: Path):
    conf = tmp_path / "conf"
    conf.mkdir()
    for name in ("server.crt", "server.key"):
        (conf / name).write_bytes((pki.root / name).read_bytes())
    (conf / "ca.crt").write_bytes(pki.ca.read_bytes())
    settings = _load(tmp_path, {
        "tls": {"port": 2762, "cert": "server.crt", "key": "server.key", "ca": "ca.crt"},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 2762, "tls": {"ca": "ca.crt"}},
                  {"name": "plain", "ae_title": "PLAIN", "host": "h", "port": 104}],
    })
    assert settings.tls.cert == conf / "server.crt" and settings.tls.ca == conf / "ca.crt"
    assert settings.peers[0].tls is not None and settings.peers[0].tls.ca == conf / "ca.crt"
    assert settings.peers[0].tls.check_hostname and settings.peers[1].tls is None
    assert tls.peer_at(settings, "PACS", "pacs", 2762) is settings.peers[0]
    assert tls.peer_at(settings, "PACS", "pacs", 104) is None  # another address: plain TCP


@pytest.mark.parametrize(("tls_block", "expected"), [
    ({"port": 1, "cert": "nowhere.crt", "key": "{key}"}, "tls.cert = '{conf}/nowhere.crt': Value error, cannot read"),
    ({"port": 1, "cert": "{ca}", "key": "{ca}", "ca": "{ca}"}, "tls.key = '{ca}': Value error, '{ca}' is not a PEM"),
    ({"port": 1, "cert": "{key}", "key": "{key}"}, "tls.cert = '{key}': Value error, '{key}' is not a PEM or DER "
                                                    "certificate"),
    ({"port": 1, "cert": "{cert}", "key": "{other_key}", "ca": "{ca}"}, "does not belong to certificate '{cert}'"),
    ({"port": 1}, "a TLS port (1) needs cert and key"),
    ({"port": 1, "cert": "{cert}", "key": "{key}"}, "require_client_cert needs ca"),
    ({"plain_port_enabled": False}, "the node would not listen"),
    ({"port": 1, "cert": "{cert}", "key": "{key}", "ca": "{ca}", "client_ae_titles": {"x": ["WAY_TOO_LONG_AE_TITLE"]}},
     "tls.client_ae_titles.x[0] = 'WAY_TOO_LONG_AE_TITLE'"),
    ({"port": 1, "cert": "{cert}", "key": "{key}", "ca": "{ca}", "cipher": "RC4"}, "tls.cipher: unknown key"),
], ids=["missing-file", "not-a-key", "not-a-certificate", "key-mismatch", "port-without-cert", "no-client-ca",
        "no-listener-at-all", "bad-ae-title", "unknown-key"])
def test_settings_errors_name_the_key_and_the_value(pki: Pki, tmp_path: Path, tls_block: dict[str, Any],
                                                    expected: str):
    values = {"cert": str(pki.server.cert), "key": str(pki.server.key), "other_key": str(pki.client.key),
              "ca": str(pki.ca), "conf": str(tmp_path / "conf")}
    block = {k: (v.format(**values) if isinstance(v, str) else v) for k, v in tls_block.items()}
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {"tls": block})
    message = str(info.value)
    assert "node.yaml: tls" in message and expected.format(**values) in message, message


def test_peer_tls_errors(pki: Pki, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"peers\[0\]\.tls = \{\.\.\.\}: Value error, cert and key go together"):
        _load(tmp_path, {"peers": [{"name": "p", "ae_title": "P", "host": "h", "port": 1,
                                    "tls": {"ca": str(pki.ca), "cert": str(pki.client.cert)}}]})


# --- expiry ----------------------------------------------------------------------------------------------------
def test_expiry_is_logged_and_shown(pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    settings = NodeSettings.model_validate({
        "data_dir": str(tmp_path),
        "tls": {"port": 0, "cert": str(pki.soon.cert), "key": str(pki.soon.key), "ca": str(pki.ca)},
        "peers": [{"name": "old", "ae_title": "OLD", "host": HOST, "port": 1,
                   "tls": {"ca": str(pki.ca), "cert": str(pki.expired.cert), "key": str(pki.expired.key)}}],
    })
    with caplog.at_level(logging.WARNING, logger="dicom_node.tls"):
        flagged = tls.log_expiry(settings)
    assert sorted(i.role for i in flagged) == ["peer old tls.cert", "tls.cert"]
    levels = {r.levelname: r.getMessage() for r in caplog.records}
    assert "CN=petnode-soon" in levels["WARNING"] and "in 10 days" in levels["WARNING"], levels
    assert "CN=petnode-expired" in levels["ERROR"] and "expired" in levels["ERROR"], levels
    lines = "\n".join(tls.describe(settings))
    assert "[EXPIRES SOON]" in lines and "[EXPIRED]" in lines and "CN=petnode test CA" in lines, lines
    # Ten years on the CA expires too; with a 5-day window the 10-day certificate is fine today.
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3651)
    assert {i.role for i in tls.log_expiry(settings, now=later)} >= {"tls.ca", "peer old tls.ca"}
    quiet = settings.model_copy(update={"tls": settings.tls.model_copy(update={"expiry_warning_days": 5})})
    assert [i.role for i in tls.log_expiry(quiet)] == ["peer old tls.cert"]
