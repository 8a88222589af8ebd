"""``petnode models ...``: every verb in-process through ``main([...])``, plus one real subprocess."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.cli import main

REPO = Path(__file__).resolve().parents[2]

Run = Callable[..., tuple[int, str, str]]


def save_weights(path: Path, value: float = 1.0) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.ones(3) * value}, path)
    return path


def write_rules(path: Path, model: str | None = None, *, disabled: bool = False) -> Path:
    denoiser: dict[str, Any] = {"name": "gaussian", "params": {"fwhm_mm": 4.0}}
    if model:
        denoiser["model"] = model
    rule = {"name": "pet-unet", "disabled": disabled, "match": {"modality": "PT"}, "denoiser": denoiser,
            "destinations": ["return_to_sender"]}
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    return path


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node config with its own data dir, rules file and (empty) shipped models folder."""
    (tmp_path / "models").mkdir()
    write_rules(tmp_path / "rules.yaml")
    config = tmp_path / "node.yaml"
    config.write_text("data_dir: var\nrules_file: rules.yaml\nshipped_models_dir: models\n")
    return config


@pytest.fixture
def run(node: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    def _run(*args: str) -> tuple[int, str, str]:
        code = main(["-c", str(node), "models", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_a_physicists_session(run: Run, node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETNODE_USER", "anna")
    store = tmp_path / "var" / "models"
    code, out, _ = run("list")
    assert code == 0 and "no models installed" in out and "petnode models add" in out

    card = tmp_path / "card.yaml"
    card.write_text("denoiser: ldpet\narchitecture: U-Net 2.5D\ndescription: FDG 1/10 dose\ninput_slices: 3\n"
                    "units: SUV\nnormalisation: suv\ntracers: [FDG]\nexpected_voxel_mm: [2.0, 2.0, 2.0]\n")
    w1 = save_weights(tmp_path / "train" / "w1.pt", 1.0)
    code, out, err = run("add", str(w1), "--name", "unet-fdg", "--version", "1.0.0", "--card", str(card),
                         "--epochs", "40", "--metric", "psnr=38.5", "--activate")
    assert code == 0, err
    assert "added unet-fdg@1.0.0: denoiser ldpet, w1.pt" in out and "active: new series" in out
    assert "no denoiser plugin named 'ldpet'" in err  # a plugin this install lacks: stored anyway, with a warning
    code, out, _ = run("add", str(save_weights(tmp_path / "train" / "w2.pt", 2.0)), "--name", "unet-fdg",
                       "--version", "1.1.0", "--card", str(card), "--description", "FDG 1/10 dose, more data")
    assert code == 0 and "not active: `petnode models activate unet-fdg@1.1.0`" in out

    code, out, _ = run("list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["MODEL", "VERSION", "STATE"]
    assert lines[1].split()[:7] == ["unet-fdg", "1.0.0", "active", "ldpet", "SUV", "2x2x2", "FDG"]
    assert lines[2].split()[:3] == ["unet-fdg", "1.1.0", "available"] and "more data" in lines[2]

    code, out, _ = run("list", "--json")
    entries = json.loads(out)
    assert code == 0 and [(e["name"], e["version"], e["state"], e["denoiser"]) for e in entries] == [
        ("unet-fdg", "1.0.0", "active", "ldpet"), ("unet-fdg", "1.1.0", "available", "ldpet")]
    assert entries[0]["tracers"] == ["FDG"] and entries[0]["architecture"] == "U-Net 2.5D"
    assert entries[0]["sha256"] == hashlib.sha256(w1.read_bytes()).hexdigest()
    assert entries[0]["dose_aware"] is False and entries[0]["noise_index_range"] is None

    code, out, _ = run("show", "unet-fdg")
    assert code == 0 and out.startswith("unet-fdg@1.0.0  (active)")
    assert hashlib.sha256(w1.read_bytes()).hexdigest() in out
    assert "input slices        3" in out and "validation metrics  psnr=38.5" in out and "epochs              40" in out

    code, out, _ = run("activate", "unet-fdg@1.1.0")
    assert code == 0 and "unet-fdg@1.1.0 is now active (was 1.0.0); a running node uses it" in out
    code, out, _ = run("activate", "unet-fdg@1.1.0")
    assert code == 0 and "already active" in out
    code, out, _ = run("retire", "unet-fdg@1.0.0", "--reason", "halo artefacts")
    assert code == 0 and "retired unet-fdg@1.0.0" in out and "--unretire" in out
    assert "retired" in run("show", "unet-fdg@1.0.0")[1] and "halo artefacts" in run("show", "unet-fdg@1.0.0")[1]

    code, out, _ = run("verify")
    assert code == 0 and "ok: 2 model version(s)" in out

    archive = tmp_path / "unet-fdg-1.1.0.tar.gz"
    code, out, _ = run("export", "unet-fdg", str(archive))  # no version: the active one
    assert code == 0 and "exported unet-fdg@1.1.0" in out and archive.is_file()
    other = tmp_path / "var2"
    code, out, _ = run("import", str(archive), "--data-dir", str(other), "--activate")
    assert code == 0 and "imported unet-fdg@1.1.0" in out and "verified" in out and "active" in out
    code, out, _ = run("import", str(archive), "--data-dir", str(other))
    assert code == 0 and "already installed with identical card and weights" in out

    code, out, _ = run("remove", "unet-fdg@1.0.0")
    assert code == 0 and "removed unet-fdg@1.0.0" in out
    assert not (store / "unet-fdg" / "1.0.0").exists()

    code, out, _ = run("history")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert code == 0 and [(r[1], r[2], r[3]) for r in rows] == [
        ("anna", "add", "unet-fdg@1.0.0"), ("anna", "activate", "unet-fdg@1.0.0"), ("anna", "add", "unet-fdg@1.1.0"),
        ("anna", "activate", "unet-fdg@1.1.0"), ("anna", "activate", "unet-fdg@1.1.0"),
        ("anna", "retire", "unet-fdg@1.0.0"), ("anna", "export", "unet-fdg@1.1.0"),
        ("anna", "remove", "unet-fdg@1.0.0")]
    assert "previous=1.0.0" in out and "reason=halo artefacts" in out
    code, out, _ = run("history", "--limit", "1")
    assert len(out.splitlines()) == 2 and "remove" in out
    audit = [json.loads(line) for line in (store / "audit.log").read_text().splitlines()]
    assert len(audit) == 8 and all(e["user"] == "anna" for e in audit)


def test_usage_errors_exit_2(run: Run, tmp_path: Path) -> None:
    w = save_weights(tmp_path / "w.pt")
    cases = [
        (("activate", "unet-fdg"), "has no version: give NAME@VERSION"),
        (("retire", "UNet@1"), "lowercase"),
        (("show", "a@"), "NAME@VERSION"),
        (("add", str(w), "--name", "a", "--version", "1"), "give --denoiser NAME"),
        (("add", str(w), "--name", "a", "--version", "1", "--denoiser", "cnn", "--voxel-mm", "2,2"), "DZ,DY,DX"),
        (("add", str(w), "--name", "a", "--version", "1", "--denoiser", "cnn", "--metric", "psnr"), "KEY=NUMBER"),
        (("frobnicate",), "invalid choice"),
        ((), "ACTION"),
    ]
    for args, words in cases:
        code, _, err = run(*args)
        assert code == 2 and words in err, (args, err)


def test_refusals_exit_1_and_say_what_to_do(run: Run, node: Path, tmp_path: Path) -> None:
    w = save_weights(tmp_path / "w.pt")
    assert run("add", str(w), "--name", "unet-fdg", "--version", "1.0.0", "--denoiser", "cnn", "--activate")[0] == 0
    code, _, err = run("show", "unet-fgd")
    assert code == 1 and "did you mean 'unet-fdg'" in err
    code, _, err = run("add", str(w), "--name", "unet-fdg", "--version", "1.0.0", "--denoiser", "cnn")
    assert code == 1 and "already exists" in err and "--version 1.0.1" in err
    code, _, err = run("add", str(w), "--name", "x", "--version", "1", "--denoiser", "cnn", "--units", "Bq")
    assert code == 1 and "command-line options: key 'units' = 'Bq'" in err
    code, _, err = run("retire", "unet-fdg@1.0.0")
    assert code == 1 and "cannot be retired while in use" in err and "add a replacement version" in err
    code, _, err = run("activate", "unet-fdg@9")
    assert code == 1 and "no version '9'" in err
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    code, _, err = run("import", str(tmp_path / "junk.tar.gz"))
    assert code == 1 and "cannot be read as a tar archive" in err
    # tamper: verify reports, exit 1
    save_weights(tmp_path / "var" / "models" / "unet-fdg" / "1.0.0" / "w.pt", 99.0)
    code, out, _ = run("verify")
    assert code == 1 and out.startswith("PROBLEM unet-fdg@1.0.0: weights changed") and "1 problem(s)" in out
    code, _, err = run("export", "unet-fdg@1.0.0", str(tmp_path / "x.zip"))
    assert code == 1 and "fail their checksum" in err


def test_remove_consults_the_rules(run: Run, node: Path, tmp_path: Path) -> None:
    for i, version in enumerate(("1.0.0", "1.1.0")):
        w = save_weights(tmp_path / f"w{i}.pt", float(i))
        assert run("add", str(w), "--name", "unet-fdg", "--version", version, "--denoiser", "cnn")[0] == 0
    assert run("activate", "unet-fdg@1.1.0")[0] == 0
    rules = tmp_path / "rules.yaml"

    write_rules(rules, "unet-fdg@1.0.0", disabled=True)  # disabled rules count: they can be re-enabled
    code, _, err = run("remove", "unet-fdg@1.0.0")
    assert code == 1 and "rule 'pet-unet' (disabled) pins unet-fdg@1.0.0" in err and "change those rules" in err
    code, _, err = run("retire", "unet-fdg@1.0.0")  # retiring is never blocked, but the pin is pointed out
    assert code == 0 and "warning: rule 'pet-unet' (disabled) pins unet-fdg@1.0.0" in err

    write_rules(rules, "unet-fdg")  # follows the active version (1.1.0)
    assert run("remove", "unet-fdg@1.0.0")[0] == 0
    code, _, err = run("remove", "unet-fdg@1.1.0")
    assert code == 1 and "uses 'unet-fdg', whose active version this is" in err

    rules.write_text("rules: [{name: x, denoiser: {name: gausian}, destinations: [return_to_sender]}]\n")
    code, _, err = run("remove", "unet-fdg@1.1.0")
    assert code == 2 and "cannot tell whether a rule uses this model" in err and "did you mean 'gaussian'" in err
    other_rules = write_rules(tmp_path / "other-rules.yaml")
    code, out, _ = run("remove", "unet-fdg@1.1.0", "--rules", str(other_rules))
    assert code == 0 and "removed unet-fdg@1.1.0" in out
    assert run("list")[1].startswith("no models installed")


def test_shipped_models_are_registered_on_first_use(run: Run, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "unet-fdg" / "1.0.0"
    w = save_weights(folder / "weights.pt", 3.0)
    card = {"name": "unet-fdg", "version": "1.0.0", "denoiser": "cnn", "created": "2025-03-01T00:00:00Z",
            "petnode_version": "0.1.0", "weights_file": "weights.pt", "description": "shipped",
            "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    code, out, err = run("list")
    assert code == 0 and "note: registered shipped model unet-fdg@1.0.0 (active)" in err
    assert out.splitlines()[1].split()[:3] == ["unet-fdg", "1.0.0", "active"]
    code, out, err = run("list")
    assert code == 0 and "registered" not in err  # idempotent
    code, out, _ = run("history")
    assert "petnode (shipped)" in out


def test_subprocess_smoke(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dicom_node", "models", "list", "--data-dir", str(tmp_path / "v")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    # Started from another folder, the models shipped beside the package are registered into the new store.
    shipped = sorted(p.parent.parent.name for p in (REPO / "models").glob("*/*/card.yaml"))
    assert shipped and all(f"registered shipped model {name}@" in proc.stderr for name in shipped)
    # One active version per shipped model (the newest, when several versions ship).
    assert sorted(line.split()[0] for line in proc.stdout.splitlines()[1:] if line.split()[2:3] == ["active"]) \
        == sorted(set(shipped))
    assert (tmp_path / "v" / "models" / shipped[0]).is_dir()


def test_rules_accept_a_model_reference_and_check_its_syntax(tmp_path: Path) -> None:
    from dicom_node.errors import ConfigError
    from dicom_node.rules import load_rules

    ruleset = load_rules(write_rules(tmp_path / "ok.yaml", "unet-fdg@1.0.0"))
    assert ruleset.rules[0].denoiser.model == "unet-fdg@1.0.0"
    assert ruleset.rules[0].denoiser.describe().endswith(" model unet-fdg@1.0.0")
    assert load_rules(write_rules(tmp_path / "none.yaml")).rules[0].denoiser.model is None
    with pytest.raises(ConfigError, match=r"rules\[0\]\.denoiser\.model: model reference 'UNet@1\.0'.*lowercase"):
        load_rules(write_rules(tmp_path / "bad.yaml", "UNet@1.0"))


def test_settings_shipped_models_dir(tmp_path: Path) -> None:
    from dicom_node.settings import load_settings

    defaults = load_settings()
    repo_models = Path(__file__).resolve().parents[2] / "models"  # beside the package, whatever the cwd
    assert defaults.shipped_models_dir == repo_models and defaults.model_store_dir == Path("var") / "models"
    config = tmp_path / "conf" / "node.yaml"
    config.parent.mkdir()
    config.write_text("data_dir: ../var\nshipped_models_dir: ../models\n")
    settings = load_settings(config)  # relative to the config file's folder, like data_dir
    assert settings.shipped_models_dir == tmp_path / "models"
    assert settings.model_store_dir == tmp_path / "var" / "models"
    config.write_text("shipped_models_dir: null\n")
    assert load_settings(config).shipped_models_dir is None
