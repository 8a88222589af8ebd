"""The status page, metrics and probes over real HTTP (urllib) against a real node on loopback."""

from __future__ import annotations

import base64
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset

from dicom_node.errors import ConfigError
from dicom_node.node import Node
from dicom_node.rules import load_rules
from dicom_node.settings import WebSettings, load_settings
from dicom_node.state import InstanceRecord, SeriesState, StateDB
from dicom_node.web.auth import Login
from dicom_node.web.metrics import NodeMetrics
from tests.conftest import wait_until
from tests.e2e.conftest import pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_pet_series

pytestmark = pytest.mark.network

TOKEN = "t0ken-for-the-status-page"
PASSWORD = "correct horse battery"
DEAD_PEER = {"name": "dead", "ae_title": "DEAD", "host": "127.0.0.1", "port": 9}  # nothing listens on port 9


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` (never through a proxy); status, headers and body, for error statuses too."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def _make(rules: list[dict[str, Any]] | None = None, *, start: bool = True, **settings: Any) -> Node:
        settings.setdefault("peers", [DEAD_PEER])
        folder = tmp_path / f"n{len(nodes)}"
        folder.mkdir()
        path = write_config(folder, rules if rules is not None else
                            [pet_rule([{"peer": "dead"}])], **settings)
        node_settings = load_settings(path)
        node = Node(node_settings, load_rules(node_settings.resolved_rules_file(), peer_names=["dead"]))
        nodes.append(node)
        if start:
            node.start()
        return node

    yield _make
    for node in nodes:
        node.stop()


# --- settings ---------------------------------------------------------------------------------------------------
def test_off_loopback_without_login_is_a_config_error_naming_the_key(tmp_path: Path):
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"web": {"bind_address": "0.0.0.0"}}))
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    message = str(err.value)
    assert str(config) in message and "web.bind_address" in message and "'0.0.0.0'" in message
    assert "web.token" in message

    assert WebSettings(bind_address="0.0.0.0", token=TOKEN).needs_login
    assert WebSettings(bind_address="192.0.2.7", user="admin", password_sha256="ab" * 32).needs_login
    assert not WebSettings(bind_address="::1").needs_login  # loopback: no login needed
    assert not WebSettings(bind_address="localhost").needs_login
    WebSettings(bind_address="0.0.0.0", enabled=False)  # a page that is not served needs no login
    for bad in ({"user": "admin"}, {"password": PASSWORD}, {"user": "a", "password": PASSWORD,
                                                           "password_sha256": "ab" * 32},
                {"token": "short"}, {"password_sha256": "not hex"}):
        with pytest.raises(ValueError):
            WebSettings(**bad)
    assert load_settings().web == WebSettings(enabled=True, bind_address="127.0.0.1", port=8080)
    assert TOKEN not in repr(WebSettings(token=TOKEN))


def test_login_checks_bearer_and_basic():
    login = Login(WebSettings(token=TOKEN, user="admin", password=PASSWORD))
    assert login.allows(f"Bearer {TOKEN}")
    assert login.allows(basic("admin", PASSWORD)["Authorization"])
    assert login.allows(basic("anyone", TOKEN)["Authorization"])  # a browser with only the token
    for bad in (None, "", f"Bearer {TOKEN}x", "Bearer", basic("admin", PASSWORD + "x")["Authorization"],
                basic("root", PASSWORD)["Authorization"], "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
                f"Token {TOKEN}"):
        assert not login.allows(bad), bad
    hashed = Login(WebSettings(user="admin", password_sha256="2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe"
                                                              "97bf527a25b"))
    assert hashed.allows(basic("admin", "secret")["Authorization"])
    assert not hashed.allows(f"Bearer {TOKEN}")
    assert Login(WebSettings()).allows(None)  # loopback without a login configured


def test_each_node_has_its_own_registry():
    a, b = NodeMetrics(), NodeMetrics()  # the global registry would refuse the second set of names
    a.stored(0)
    a.stored(0xA700)
    b.stored(0)
    text = a.exposition().decode()
    assert metric(text, "petnode_store_instances_total", result="received", status="0x0000") == 1.0
    assert metric(text, "petnode_store_instances_total", result="refused", status="0xA700") == 1.0
    assert metric(b.exposition().decode(), "petnode_store_instances_total", result="refused",
                  status="0xA700") is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_scrape_queries_on_each_backend(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    """Series by state and the send backlog, as the metrics and the page read them, on SQLite and PostgreSQL."""
    target = tmp_path / "state.sqlite3" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    db = StateDB(target)
    try:
        for k in range(3):
            db.record_instance(InstanceRecord(
                sop_instance_uid=f"1.2.3.{k}", series_uid=f"1.2.{k % 2}", study_uid="1.2", sop_class_uid="1.2.840",
                modality="PT", path=tmp_path / f"{k}.dcm", ipp=None, iop=None, expected_count=None,
                calling_ae="SCANNER", called_ae="PETNODE", peer_host="127.0.0.1"))
        db.set_state("1.2.1", SeriesState.FAILED, error="boom")
        assert db.series_counts() == {"receiving": 1, "failed": 1}
        db.add_send("1.2.0", "PACS", "127.0.0.1", 104, 10, output_series_uid="9.1")
        db.add_send("1.2.1", "PACS", "127.0.0.1", 104, 4, output_series_uid="9.2")
        db.add_send("1.2.1", "OTHER", "-", 0, 4, output_series_uid="9.2", failed_reason="unknown peer")
        send = next(s for s in db.sends("1.2.0"))
        db.finish_send(send["id"], ok=False, sent=3, error="association aborted", retry_at=time.time() + 60)
        rows = {(r["destination"], r["state"]): r for r in db.send_backlog()}
        assert set(rows) == {("PACS@127.0.0.1:104", "pending"), ("OTHER@-:0", "failed")}
        pacs = rows[("PACS@127.0.0.1:104", "pending")]
        assert int(pacs["sends"]) == 2 and int(pacs["remaining"]) == 7 + 4
        assert pacs["last_error"] == "association aborted" and pacs["oldest"] > 0
        assert rows[("OTHER@-:0", "failed")]["last_error"] == "unknown peer"
    finally:
        db.close()


def test_thumbnail_shows_input_output_and_map_side_by_side(tmp_path: Path):
    """Input and output share the input's window (inverted gray); a map gets its own colour panel."""
    import io

    import numpy as np
    from PIL import Image

    from dicom_node.web.thumbs import GAP_PX, PANEL_MAX_FACTOR, render
    from tests.factories import write_series

    hot = np.zeros((3, 16, 16), np.float32)
    hot[:, 4:8, 4:8] = 1000.0
    source, derived, stability = (write_series(make_pet_series(shape=(3, 16, 16), seed=21, activity=hot * f),
                                               tmp_path / name)[1]
                                  for f, name in ((1.0, "in"), (0.5, "out"), (1.0, "map")))
    image = np.asarray(Image.open(io.BytesIO(render(source, derived, stability))).convert("RGB")).astype(int)
    panel = image.shape[0]  # 16 px slices enlarged (by at most PANEL_MAX_FACTOR), square panels
    assert panel == 16 * PANEL_MAX_FACTOR and image.shape[1] == 3 * panel + 2 * GAP_PX
    inside, outside = (panel * 6 // 16, panel * 6 // 16), (panel * 12 // 16, panel * 12 // 16)
    first, second, third = (image[:, k * (panel + GAP_PX):k * (panel + GAP_PX) + panel] for k in range(3))
    assert first[inside].tolist() == [0, 0, 0] and first[outside].tolist() == [255, 255, 255]  # hot is dark
    assert 100 < second[inside][0] < 160 and len(set(second[inside].tolist())) == 1  # half as hot: mid gray
    assert len(set(third[inside].tolist())) == 3  # the map in colour


# --- a running node ---------------------------------------------------------------------------------------------
def test_metrics_page_and_thumbnail_after_a_real_cstore(make_node: Callable[..., Node]):
    node = make_node()
    assert node.web_port and node.web_url == f"http://127.0.0.1:{node.web_port}/"
    series = make_pet_series(shape=(5, 24, 24), seed=11, series_description="<b>WB & co</b>",
                             PatientName="Doe^Jane", PatientID="PID-4711", PatientBirthDate="19511231")
    uid = str(series[0].SeriesInstanceUID)
    broken = make_pet_series(shape=(1, 8, 8), seed=12)[0]
    del broken.PixelData  # 0xA900: a PET image without pixels
    assert send_datasets([*series, broken], node.port) == [0] * 5 + [0xA900]
    assert wait_state(node, uid, ["sending", "delivered", "failed"]) == "sending"
    # The send to the dead peer fails and is retried: a failure per attempt.
    assert wait_until(lambda: (node.db.sends(uid) or [{}])[0].get("attempts", 0) >= 1, timeout=30)

    status, headers, body = fetch(node.web_url + "metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert metric(text, "petnode_store_instances_total", result="received", status="0x0000") == 5.0
    assert metric(text, "petnode_store_instances_total", result="refused", status="0xA900") == 1.0
    assert metric(text, "petnode_series", state="sending") == 1.0
    assert metric(text, "petnode_series", state="failed") == 0.0
    assert metric(text, "petnode_processing_seconds_count", denoiser="gaussian") == 1.0
    dest = "DEAD@127.0.0.1:9"
    assert (metric(text, "petnode_send_failures_total", destination=dest) or 0) >= 1.0
    assert (metric(text, "petnode_send_seconds_count", destination=dest) or 0) >= 1.0
    assert metric(text, "petnode_sends", destination=dest, state="pending") in (0.0, 1.0)
    # The whole derived series, even when the first attempt failed while it was still being written.
    assert metric(text, "petnode_send_backlog_instances", destination=dest) == 5.0
    assert metric(text, "petnode_lane_queue_depth", lane="cpu:gaussian") == 0.0
    assert 0.0 < (metric(text, "petnode_disk_used_ratio") or 0) <= 1.0
    assert (metric(text, "petnode_disk_free_bytes") or 0) > 0

    status, headers, body = fetch(node.web_url)
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert uid in page and "pet-gaussian" in page and "5/5" in page and "DEAD@127.0.0.1:9" in page
    assert "&lt;b&gt;WB &amp; co&lt;/b&gt;" in page and "<b>WB" not in page  # escaped
    for identifier in ("Doe", "Jane", "PID-4711", "19511231"):
        assert identifier not in page
    assert "fdg-wb-xu" in page  # the shipped models and their active versions
    assert f'src="thumb/{uid}.png"' in page
    assert "default-src 'none'" in headers["content-security-policy"]

    status, headers, png = fetch(node.web_url + f"thumb/{uid}.png")
    assert status == 200 and headers["content-type"] == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert height >= 24 * 2 and width > 2 * height  # two enlarged 24x24 panels side by side
    thumbs = node._web.app.state.thumbnails  # type: ignore[union-attr]
    assert fetch(node.web_url + f"thumb/{uid}.png")[2] == png and thumbs.renders == 1  # cached
    assert fetch(node.web_url + "thumb/1.2.3.png")[0] == 404
    assert fetch(node.web_url + "thumb/..%2Fetc.png")[0] == 404

    assert fetch(node.web_url + "healthz")[:1] == (200,)
    assert fetch(node.web_url + "readyz")[2] == b"ready\n"
    assert node.readiness() == {"scp": True, "database": True, "scheduler": True}


def test_login_required_on_every_route_but_the_probes(make_node: Callable[..., Node]):
    node = make_node(rules=[], web={"port": 0, "token": TOKEN, "user": "admin", "password": PASSWORD})
    url = node.web_url
    for path in ("", "metrics", "thumb/1.2.3.png", "nowhere"):
        status, headers, body = fetch(url + path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Basic realm=")
        assert body == b"401 Unauthorized\n"  # nothing else: no AE title, no version
        assert fetch(url + path, {"Authorization": f"Bearer {TOKEN[:-1]}"})[0] == 401
        assert fetch(url + path, basic("admin", "wrong password"))[0] == 401
    assert fetch(url, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert fetch(url + "metrics", basic("admin", PASSWORD))[0] == 200
    assert fetch(url, basic("browser", TOKEN))[0] == 200
    for probe, answer in (("healthz", b"ok\n"), ("readyz", b"ready\n")):
        assert fetch(url + probe)[::2] == (200, answer)


def test_a_port_in_use_leaves_dicom_receiving(make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="dicom_node.web.server"):
            node = make_node(web={"port": port})
        assert node.web_port is None and node.web_url is None
        assert any(r.levelno == logging.ERROR and "status page not started" in r.getMessage()
                   and str(port) in r.getMessage() for r in caplog.records)
        series = make_pet_series(shape=(2, 8, 8), seed=13)
        assert send_datasets(series, node.port) == [0, 0]
        assert node.readiness()["scp"]


def test_metrics_never_change_a_cstore_answer(make_node: Callable[..., Node]):
    node = make_node(rules=[], start=False, web={"enabled": False})

    def broken(status: int) -> None:
        raise RuntimeError("metrics backend down")

    node.metrics.stored = broken  # type: ignore[method-assign]
    node.start()
    assert node.web_port is None
    series: list[Dataset] = make_pet_series(shape=(2, 8, 8), seed=14)
    assert send_datasets(series, node.port) == [0, 0]
