"""Every ``petnode`` verb, in-process (``main(argv)``), plus subprocess smoke tests of the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.cli import main
from tests.conftest import REPO, wait_until
from tests.dicomtools import StoreSCP, free_port, run_dciodvfy
from tests.e2e.conftest import NodeProcess, pet_rule, send_datasets, wait_state, write_config
from tests.factories import make_ct_series, make_pet_series, write_series

pytestmark = pytest.mark.network


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]):
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["echo", "not-an-address"]) == 2
    assert "AE@HOST:PORT" in capsys.readouterr().err
    assert main([]) == 2


def test_config_check_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # The shipped rules name the shipped models, registered into the (new) data directory's registry.
    assert main(["config", "check", "--rules", str(REPO / "config" / "rules.yaml"), "--data-dir",
                 str(tmp_path / "var")]) == 0
    out = capsys.readouterr().out
    assert "rules ok" in out and "model ok: rule 'fdg-whole-body-cnn' -> fdg-wb-fo@" in out
    config = write_config(tmp_path, [pet_rule(["return_to_sender"], denoiser={"name": "gausian"})])
    assert main(["-c", str(config), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert "gausian" in err and "gaussian" in err  # did-you-mean
    (tmp_path / "bad.yaml").write_text("port: [1\n")
    assert main(["-c", str(tmp_path / "bad.yaml"), "config", "check"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_echo_and_send(start_node, storescp_sink: StoreSCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    node = start_node([pet_rule([{"peer": "sink"}])],
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    assert main(["echo", f"PETNODE@127.0.0.1:{node.port}"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["echo", f"NOBODY@127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "failed" in capsys.readouterr().err
    files = write_series(make_pet_series(shape=(3, 8, 8), seed=21), tmp_path / "in")
    assert main(["send", str(tmp_path / "in"), "--to", f"SINK@127.0.0.1:{storescp_sink.port}"]) == 0
    assert "3/3 stored" in capsys.readouterr().out
    assert storescp_sink.wait_for(len(files))
    assert main(["send", str(tmp_path / "missing"), "--to", f"SINK@127.0.0.1:{storescp_sink.port}"]) == 1


def test_status_series_complete_and_retry(start_node, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    down = free_port()
    node = start_node([pet_rule([{"ae_title": "DOWN", "host": "127.0.0.1", "port": down}])],
                      send={"backoff_initial_s": 0.1, "backoff_max_s": 0.1, "poll_interval_s": 0.1,
                            "timeout_s": 2, "max_attempts": 2})
    series = make_pet_series(shape=(6, 12, 12), seed=22)
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series[:4], node.port) == [0] * 4  # 4 of 6: waits for the rest
    data = ["--data-dir", str(node.settings.data_dir)]
    assert main(["status", *data]) == 0
    out = capsys.readouterr().out
    assert uid in out and "4/6" in out and "receiving" in out
    assert main(["series", "complete", uid[:-3], *data]) == 0  # a unique prefix is enough
    assert wait_state(node, uid, ["failed"]) == "failed"  # processed (4 slices), then the send gave up
    assert main(["series", "show", uid, *data]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and f"DOWN@127.0.0.1:{down}" in out and "2 attempt(s)" in out
    assert main(["series", "list", "--state", "failed", *data]) == 0
    assert uid in capsys.readouterr().out
    with StoreSCP(tmp_path / "late", ae_title="DOWN", port=down) as late:
        assert main(["series", "retry", uid, *data]) == 0
        assert late.wait_for(4)
        assert wait_state(node, uid, ["delivered"]) == "delivered"
    assert main(["series", "retry", uid, *data]) == 1  # nothing left to retry
    assert main(["series", "show", "9.9.9", *data]) == 1
    assert main(["status", "--data-dir", str(tmp_path / "nowhere")]) == 1


def test_rules_test_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rules = [pet_rule(["return_to_sender"], name="fdg-only", match={"modality": ["PT"], "tracer": ["FDG"]}),
             pet_rule(["return_to_sender"], name="psma-only", match={"modality": ["PT"], "tracer": ["PSMA"]})]
    config = write_config(tmp_path, rules)
    write_series(make_pet_series(shape=(2, 8, 8), seed=23), tmp_path / "pet")
    assert main(["-c", str(config), "rules", "test", str(tmp_path / "pet"), "--calling-ae", "SCANNER"]) == 0
    out = capsys.readouterr().out
    assert "rule 'fdg-only' applies" in out
    assert "psma-only" in out and "Modality" in out
    write_series(make_ct_series(shape=(2, 8, 8)), tmp_path / "ct")
    assert main(["-c", str(config), "rules", "test", str(tmp_path / "ct")]) == 0
    assert "no rule matches" in capsys.readouterr().out


def test_rules_test_shows_what_each_destination_gets(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    peers = [{"name": "pacs", "ae_title": "PACS", "host": "192.0.2.30", "port": 104},
             {"name": "scanner", "ae_title": "SCANNER", "host": "192.0.2.20", "port": 104}]
    rules = [pet_rule([{"peer": "pacs", "send": ["original", "derived", "maps"]},
                       {"return_to_sender": True, "send": ["derived"]}], hold_study=True,
                      study_quiet_period_s=45.0),
             {"name": "scouts", "priority": 10, "match": {"modality": ["CT"], "series_description": "(?i)scout"},
              "drop": True},
             {"name": "ct", "match": {"modality": ["CT"]}, "forward": "on_receipt",
              "destinations": [{"peer": "pacs"}]}]
    config = write_config(tmp_path, rules, peers=peers)
    write_series(make_pet_series(shape=(2, 8, 8), seed=25), tmp_path / "pet")
    assert main(["-c", str(config), "rules", "test", str(tmp_path / "pet"), "--calling-ae", "SCANNER"]) == 0
    out = capsys.readouterr().out
    assert "rule 'pet-gaussian' applies: process and forward" in out
    assert ("peer pacs (PACS@192.0.2.30:104): original as received, when the series is complete (or declared "
            "incomplete); derived series (gaussian(fwhm_mm=6.0") in out
    assert "maps: none (gaussian makes no maps)" in out
    assert "return_to_sender (SCANNER@192.0.2.20:104): derived series" in out
    assert "no instance arrived for 45 s (at most 3600 s)" in out
    assert main(["-c", str(config), "rules", "test", str(tmp_path / "pet"), "--calling-ae", "OTHER"]) == 0
    assert "return_to_sender (NOT RESOLVED: calling AE 'OTHER' is not in the node's peers" in capsys.readouterr().out
    write_series(make_ct_series(shape=(2, 8, 8)), tmp_path / "ct")
    assert main(["-c", str(config), "rules", "test", str(tmp_path / "ct")]) == 0
    out = capsys.readouterr().out
    assert "rule 'ct' applies: forward" in out
    assert "peer pacs (PACS@192.0.2.30:104): original as received, instance by instance as it arrives" in out
    write_series(make_ct_series(shape=(1, 8, 8), series_description="SCOUT"), tmp_path / "scout")
    assert main(["-c", str(config), "rules", "test", str(tmp_path / "scout")]) == 0
    assert "applies: drop" in (out := capsys.readouterr().out) and "dropped: sent nowhere" in out


def test_status_shows_held_and_forwarded_sends(start_node, storescp_sink: StoreSCP,
                                               capsys: pytest.CaptureFixture[str]):
    pet = make_pet_series(shape=(3, 8, 8), seed=26)
    ct = make_ct_series(shape=(3, 8, 8), seed=27, study_uid=str(pet[0].StudyInstanceUID))
    node = start_node([{"name": "ct", "match": {"modality": ["CT"]}, "hold_study": True,
                        "study_quiet_period_s": 600.0, "destinations": [{"peer": "sink"}]}],
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    assert send_datasets(ct, node.port) == [0] * 3
    uid = str(ct[0].SeriesInstanceUID)
    assert wait_until(lambda: node.db.sends(uid), timeout=30)
    data = ["--data-dir", str(node.settings.data_dir)]
    assert main(["status", *data]) == 0
    out = capsys.readouterr().out
    assert uid in out and "sending" in out
    assert "original to SINK@127.0.0.1" in out and "held until every series of the study is complete" in out
    assert storescp_sink.files() == []


def test_offline_denoise_writes_valid_derived_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    series = make_pet_series(shape=(5, 16, 16), seed=24)
    write_series(series, tmp_path / "in")
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "out"), "--method", "gaussian",
                 "--fwhm-mm", "4"]) == 0
    assert "wrote 5 derived instance(s)" in capsys.readouterr().out
    out = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(out) == 5
    d = dcmread(out[0])
    assert d.ImageType[0] == "DERIVED" and d.StudyInstanceUID == series[0].StudyInstanceUID
    assert run_dciodvfy(out[0])[0] == []
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "o2"), "--param", "fwhm_mn=3"]) == 2
    assert "fwhm_mm" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "o3"), "--write-processes", "0"]) == 2
    assert "--write-processes must be at least 1" in capsys.readouterr().err


def test_serve_on_embedded_defaults_subprocess(tmp_path: Path):
    """What `make serve` runs: `petnode serve` from the repository, defaults plus config/rules.yaml."""
    exe = Path(sys.executable).with_name("petnode")
    proc = subprocess.Popen([str(exe), "serve", "--port", "0", "--data-dir", str(tmp_path / "var")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening ae=PETNODE" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("port=")[1].split()[0])
        assert main(["echo", f"PETNODE@127.0.0.1:{port}"]) == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert (tmp_path / "var" / "state.sqlite3").exists()
    assert subprocess.run([sys.executable, "-m", "dicom_node", "--version"], capture_output=True,
                          text=True).stdout.startswith("petnode ")


def test_node_process_reports_bad_config(tmp_path: Path):
    config = write_config(tmp_path, [pet_rule([{"peer": "nobody"}])])
    with pytest.raises(RuntimeError, match="nobody"):
        NodeProcess(config, tmp_path / "log").start()


def test_offline_denoise_non_bqml_real_series(realdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """ACRIN PT_NAC is in PROPCNTS: processed in its own units with a clear note, or refused on request."""
    nac = realdata / "ohif_acrin_nsclc_fdg_pet_042" / "PT_NAC"
    assert main(["denoise", str(nac), str(tmp_path / "out"), "--fwhm-mm", "6"]) == 0
    captured = capsys.readouterr()
    assert "not quantitative" in captured.err
    d = dcmread(sorted((tmp_path / "out").glob("*.dcm"))[0])
    assert d.Units == "PROPCNTS"
    assert main(["denoise", str(nac), str(tmp_path / "o2"), "--refuse-non-quantitative"]) == 1
    assert "PROPCNTS" in capsys.readouterr().err
    assert not list((tmp_path / "o2").glob("*.dcm"))


def test_denoisers_list(capsys: pytest.CaptureFixture[str]):
    assert main(["denoisers", "list"]) == 0
    out = capsys.readouterr().out
    assert "gaussian:" in out and "fwhm_mm (float, default 4.0)" in out and "requires: pet, spacing" in out
    assert "CUDA devices here:" in out


def test_bench_speed_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["bench", "speed", "--shape", "8,24,24", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gaussian" in out and "nlm" in out and "skimage" in out and "speed-up" in out
    rows = (tmp_path / "speed.csv").read_text().splitlines()
    assert rows[0].startswith("method,device") and len(rows) == 3
    assert main(["bench", "speed", "--shape", "8,24"]) == 2


def test_bench_speed_times_a_registered_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import torch

    from denoisers.models import ModelStore
    from denoisers.nets import build

    net, _ = build("fo-dcnn", {"features": 4, "layers": 3})
    torch.save(net.state_dict(), tmp_path / "w.pt")
    ModelStore(tmp_path / "var" / "models").add(
        tmp_path / "w.pt", {"denoiser": "cnn", "architecture": "fo-dcnn", "normalisation": "mean",
                            "input_slices": 3, "expected_voxel_mm": [2.0, 2.0, 2.0],
                            "extra": {"net": {"features": 4, "layers": 3}}}, name="tiny", version="1.0.0",
        activate=True)
    args = ["bench", "speed", "--shape", "4,16,16", "--repeats", "1", "--data-dir", str(tmp_path / "var")]
    assert main([*args, "--methods", "cnn:tiny"]) == 0
    assert "cnn:tiny" in capsys.readouterr().out
    assert main([*args, "--methods", "cnn:other"]) == 1
    assert "no model named 'other'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`petnode demo`: simulated patient -> node -> sink, and a panel a person can look at."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "comparison panel" in out
    panel = tmp_path / "demo_panel.png"
    assert panel.stat().st_size > 10_000 and panel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sent = sorted((tmp_path / "simulated" / "dicom").glob("PET_*/*"))
    received = [dcmread(p) for p in (tmp_path / "received").iterdir()]
    assert len(received) == len(sent) > 0
    assert all(d.ImageType[0] == "DERIVED" for d in received)
