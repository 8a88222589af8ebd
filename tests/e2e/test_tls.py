"""DICOM TLS against DCMTK: ``storescu +tls`` into the node's TLS port, the node's sends to ``storescp +tls``, and
the refusals (untrusted or expired certificates, plain DICOM on the TLS port, a certificate used under another
calling AE title). The CA, certificates and keys are made by the tests (tests/pki.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.cli import main
from dicom_node.node import Node
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP, require_tool, storescu
from tests.e2e.conftest import pet_rule, wait_state, write_config
from tests.factories import make_pet_series, write_series
from tests.pki import Pair, Pki, pki  # noqa: F401 - fixture

pytestmark = pytest.mark.network

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pet_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(make_pet_series(shape=(4, 12, 12), seed=41), tmp_path_factory.mktemp("pet"))


def listener(pki: Pki, server: Pair | None = None, **extra: Any) -> dict[str, Any]:
    server = server or pki.server
    return {"port": 0, "cert": str(server.cert), "key": str(server.key), "ca": str(pki.ca),
            "client_ae_titles": {"scanner-1": ["SCANNER"]}, **extra}


def tls_args(pki: Pki, client: Pair | None, *extra: str) -> list[str]:
    """storescu options: TLS with this client certificate (anonymous TLS without one), the test CA trusted."""
    head = ["+tls", str(client.key), str(client.cert)] if client is not None else ["+tla"]
    return [*head, "+cf", str(pki.ca), *extra]


def received(node: Node) -> int:
    return sum(r["received_count"] for r in node.db.list_series([], limit=100))


@pytest.fixture
def tls_node(start_node: Callable[..., Node], pki: Pki) -> Node:
    """A node with a TLS port beside its plain port; its rule keeps what it receives (no destination)."""
    require_tool("storescu")
    return start_node([], tls=listener(pki))


def test_storescu_tls_stores_into_the_tls_port(tls_node: Node, pki: Pki, pet_files: list[Path]):
    result = storescu(pet_files, HOST, tls_node.tls_port, called_ae="PETNODE", calling_ae="SCANNER",
                      extra_args=tls_args(pki, pki.client))
    assert result.returncode == 0, result.stderr + result.stdout
    uid = str(dcmread(pet_files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert wait_until(lambda: (node_row := tls_node.db.series(uid)) and node_row["received_count"] == len(pet_files))
    assert len(tls_node.db.instance_paths(uid)) == len(pet_files)


def test_refusals_leave_the_node_serving(tls_node: Node, pki: Pki, pet_files: list[Path],
                                        caplog: pytest.LogCaptureFixture):
    """Each refused caller stores nothing, for the reason the log gives; a good caller afterwards gets through."""
    one = pet_files[:1]
    cases = {
        "unable to get local issuer certificate": tls_args(pki, pki.untrusted_client),  # another CA's
        "certificate has expired": tls_args(pki, pki.expired),
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": tls_args(pki, None),  # anonymous TLS
        "a plain DICOM connection to the TLS port": [],
    }
    caplog.set_level("WARNING", logger="dicom_node.scp")
    for why, args in cases.items():
        caplog.clear()
        result = storescu(one, HOST, tls_node.tls_port, called_ae="PETNODE", calling_ae="SCANNER", extra_args=args)
        assert result.returncode != 0, f"{why}: storescu succeeded\n{result.stdout}{result.stderr}"
        assert wait_until(lambda: why in caplog.text, timeout=10), caplog.text
    # scanner-1's certificate may call as SCANNER only.
    result = storescu(one, HOST, tls_node.tls_port, called_ae="PETNODE", calling_ae="OTHER",
                      extra_args=tls_args(pki, pki.client))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr, result.stdout + result.stderr
    # scanner-2 is trusted by the CA but not mapped to any AE title.
    result = storescu(one, HOST, tls_node.tls_port, called_ae="PETNODE", calling_ae="SCANNER",
                      extra_args=tls_args(pki, pki.other_client))
    assert result.returncode != 0
    assert received(tls_node) == 0
    assert tls_node._server.guard.connections == 0 or wait_until(lambda: tls_node._server.guard.connections == 0)
    result = storescu(one, HOST, tls_node.tls_port, called_ae="PETNODE", calling_ae="SCANNER",
                      extra_args=tls_args(pki, pki.client))
    assert result.returncode == 0, result.stderr
    result = storescu(pet_files[1:2], HOST, tls_node.port, called_ae="PETNODE")  # and the plain port
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: received(tls_node) == 2)


def test_storescu_refuses_an_expired_server_certificate(start_node: Callable[..., Node], pki: Pki,
                                                         pet_files: list[Path], caplog: pytest.LogCaptureFixture):
    require_tool("storescu")
    with caplog.at_level("ERROR", logger="dicom_node.tls"):
        node = start_node([], tls=listener(pki, pki.expired))
    assert any("expired" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    result = storescu(pet_files[:1], HOST, node.tls_port, called_ae="PETNODE", calling_ae="SCANNER",
                      extra_args=tls_args(pki, pki.client))
    assert result.returncode != 0
    assert received(node) == 0


def test_tls_only_node_has_no_plain_port(start_node: Callable[..., Node], pki: Pki, pet_files: list[Path]):
    require_tool("storescu")
    node = start_node([], port=0, tls=listener(pki, plain_port_enabled=False))
    assert node.port == node.tls_port
    ok = storescu(pet_files[:1], HOST, node.tls_port, called_ae="PETNODE", calling_ae="SCANNER",
                  extra_args=tls_args(pki, pki.client))
    assert ok.returncode == 0, ok.stderr


@pytest.fixture
def tls_sink(tmp_path: Path, pki: Pki) -> Iterator[StoreSCP]:
    """DCMTK storescp +tls (server certificate from the test CA; client certificates required and verified)."""
    require_tool("storescp")
    with StoreSCP(tmp_path / "sink", ae_title="SINK",
                  extra_args=["+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca)]) as scp:
        yield scp


def test_node_sends_the_derived_series_to_storescp_tls(start_node: Callable[..., Node], tls_sink: StoreSCP,
                                                       pki: Pki, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]):
    """A derived series goes to a TLS peer (verified against the CA, host name checked, our certificate shown);
    ``petnode echo``/``status`` with the node's config use and show the peer's TLS."""
    peer = {"name": "sink", "ae_title": "SINK", "host": HOST, "port": tls_sink.port,
            "tls": {"ca": str(pki.ca), "cert": str(pki.client.cert), "key": str(pki.client.key)}}
    node = start_node([pet_rule([{"peer": "sink"}])], peers=[peer])
    series = make_pet_series(shape=(4, 12, 12), seed=43)
    files = write_series(series, tmp_path / "in")
    assert storescu(files, HOST, node.port, called_ae="PETNODE").returncode == 0
    uid = str(series[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.sends(uid)
    assert tls_sink.wait_for(len(files))
    assert "DERIVED" in str(dcmread(tls_sink.files()[0], stop_before_pixels=True).ImageType)
    assert "TLS" in tls_sink.log_text() or "tls" in tls_sink.log_text().lower()

    config = tmp_path / "config" / "node.yaml"
    assert main(["-c", str(config), "echo", f"SINK@{HOST}:{tls_sink.port}"]) == 0
    capsys.readouterr()
    assert main(["-c", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert "TLS (" in out and "peer sink tls.cert" in out and "CN=scanner-1" in out and "days left" in out


def test_send_to_a_peer_with_an_expired_certificate_fails_with_the_reason(start_node: Callable[..., Node],
                                                                           pki: Pki, tmp_path: Path):
    require_tool("storescp")
    with StoreSCP(tmp_path / "sink", ae_title="SINK",
                  extra_args=["+tls", str(pki.expired.key), str(pki.expired.cert), "+cf", str(pki.ca)]) as sink:
        peer = {"name": "sink", "ae_title": "SINK", "host": HOST, "port": sink.port,
                "tls": {"ca": str(pki.ca), "cert": str(pki.client.cert), "key": str(pki.client.key)}}
        node = start_node([pet_rule([{"peer": "sink"}])], peers=[peer],
                          send={"backoff_initial_s": 0.1, "backoff_max_s": 0.1, "poll_interval_s": 0.1,
                                "timeout_s": 5, "max_attempts": 1})
        series = make_pet_series(shape=(4, 12, 12), seed=44)
        assert storescu(write_series(series, tmp_path / "in"), HOST, node.port, called_ae="PETNODE").returncode == 0
        uid = str(series[0].SeriesInstanceUID)
        assert wait_state(node, uid, ["delivered", "failed"]) == "failed"
        error = node.db.sends(uid)[0]["last_error"]
        assert "certificate has expired" in error, error
        assert sink.files() == []


def test_config_errors_name_the_file_key_and_value(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = write_config(tmp_path, [], tls={"port": 0, "cert": "missing.crt", "key": str(pki.server.key),
                                             "ca": str(pki.ca)})
    assert main(["-c", str(config), "config", "check"]) == 2
    err = capsys.readouterr().err
    missing = tmp_path / "config" / "missing.crt"  # relative to node.yaml's folder
    assert f"node.yaml: tls.cert = '{missing}'" in err and "No such file" in err, err
    config = write_config(tmp_path, [], tls={"port": 0, "cert": str(pki.server.cert), "key": str(pki.client.key),
                                             "ca": str(pki.ca)})
    assert main(["-c", str(config), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert "does not belong to certificate" in err and str(pki.client.key) in err, err


def test_petnode_serve_with_relative_certificate_paths(pki: Pki, tmp_path: Path, pet_files: list[Path]):
    """``petnode serve`` as a process: certificate paths relative to node.yaml, the TLS port on its first line."""
    require_tool("storescu")
    config = write_config(tmp_path, [], tls={"port": 0, "cert": "tls/server.crt", "key": "tls/server.key",
                                             "ca": "tls/ca.crt"})
    (config.parent / "tls").mkdir()
    for src, name in ((pki.server.cert, "server.crt"), (pki.server.key, "server.key"), (pki.ca, "ca.crt")):
        (config.parent / "tls" / name).write_bytes(src.read_bytes())
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(config), "serve"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until listening (or the process died)
        assert "tls_port=" in line, line + (tmp_path / "serve.log").read_text()[-3000:]
        tls_port = int(line.split("tls_port=")[1].split()[0])
        result = storescu(pet_files[:1], HOST, tls_port, called_ae="PETNODE", calling_ae="SCANNER",
                          extra_args=tls_args(pki, pki.client))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=15)
