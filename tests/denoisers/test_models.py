"""Model registry: cards, the store's every method, tampering, atomic ACTIVE, locking, several processes at once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from denoisers import models
from denoisers.errors import DenoiserError, ModelRegistryError, WeightsError
from denoisers.models import ModelCard, ModelStore, check_card, load_weights, parse_ref
from tests.locks import flock_is_held

REPO = Path(__file__).resolve().parents[2]


def save_weights(path: Path, value: float = 1.0, n: int = 3) -> Path:
    """A tiny state dict, as the brief asks: ``torch.save({"w": torch.ones(3)})``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.ones(n) * value}, path)
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def weights(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(value: float | None = None, name: str = "weights.pt") -> Path:
        i = next(counter)
        return save_weights(tmp_path / "src" / str(i) / name, float(i + 1) if value is None else value)

    return make


def lock_is_held(root: Path) -> bool:
    """True when someone holds the store's flock."""
    return flock_is_held(root / models.LOCK_FILE)


def audit(store: ModelStore) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (store.root / models.AUDIT_FILE).read_text().splitlines()]


def minimal_card(**kw: Any) -> dict[str, Any]:
    base = {"name": "m", "version": "1.0.0", "denoiser": "cnn", "created": "2025-01-02T03:04:05Z",
            "petnode_version": "0.1.0", "weights_file": "weights.pt", "sha256": "0" * 64}
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------- references, cards


@pytest.mark.parametrize("ref, expected", [
    ("unet-fdg", ("unet-fdg", None)),
    ("unet-fdg@1.0.0", ("unet-fdg", "1.0.0")),
    (" cnn_2@v2.1-rc1 ", ("cnn_2", "v2.1-rc1")),
])
def test_parse_ref_accepts_name_and_name_at_version(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref, words", [
    ("", "empty"),
    ("UNet", "lowercase"),
    ("unet@", "version"),
    ("unet@1@2", "version"),
    ("a/b", "not valid"),
    ("unet@../x", "not valid"),
    ("unet@ACTIVE", "not valid"),
    ("audit.log", "not valid"),  # dots are refused so a model can never collide with the store's own files
])
def test_parse_ref_refuses_bad_syntax_saying_what_is_allowed(ref: str, words: str) -> None:
    with pytest.raises(ModelRegistryError, match=words) as info:
        parse_ref(ref)
    assert "NAME@VERSION" in str(info.value)


def test_card_validation_names_the_key_and_suggests() -> None:
    with pytest.raises(ModelRegistryError, match=r"unknown key 'tracer' \(did you mean 'tracers'\?\)"):
        models.card_from_mapping(minimal_card(tracer=["FDG"]), source="card.yaml")
    with pytest.raises(ModelRegistryError, match=r"card.yaml: key 'denoiser' is missing"):
        models.card_from_mapping({k: v for k, v in minimal_card().items() if k != "denoiser"}, source="card.yaml")
    with pytest.raises(ModelRegistryError, match=r"key 'inputs' .*must include 'pet'"):
        models.card_from_mapping(minimal_card(inputs=["mr_prior"]))
    with pytest.raises(ModelRegistryError, match=r"key 'expected_voxel_mm'"):
        models.card_from_mapping(minimal_card(expected_voxel_mm=[2, 0, 2]))
    with pytest.raises(ModelRegistryError, match=r"key 'version' = 1.1: .*quote it"):
        models.card_from_mapping(minimal_card(version=1.1))
    with pytest.raises(ModelRegistryError, match=r"key 'weights_file'.*plain file name"):
        models.card_from_mapping(minimal_card(weights_file="../weights.pt"))
    with pytest.raises(ModelRegistryError, match=r"key 'sha256'.*64 hexadecimal"):
        models.card_from_mapping(minimal_card(sha256="abc"))
    card = models.card_from_mapping(minimal_card(units="suv", sha256="A" * 64, created="2025-01-02T03:04:05"))
    assert card.units == "SUV" and card.sha256 == "a" * 64
    assert card.created.tzinfo is not None and card.created.utcoffset().total_seconds() == 0  # naive -> UTC
    assert models.card_from_mapping(models.yaml.safe_load(card.to_yaml())) == card  # YAML round trip


# ---------------------------------------------------------------------------------------------- weights


def test_load_weights_uses_weights_only_and_explains_refusals(tmp_path: Path) -> None:
    import torch

    path = save_weights(tmp_path / "w.pt", 2.0)
    loaded = load_weights(path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert torch.equal(loaded["w"], torch.full((3,), 2.0))
    with pytest.raises(WeightsError, match="fails its checksum"):
        load_weights(path, expected_sha256="0" * 64)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch at all")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        load_weights(tmp_path / "junk.pt")
    # A pickled model object could run code when unpickled: weights_only=True refuses it.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(WeightsError, match=r"weights_only=True.*state_dict"):
        load_weights(tmp_path / "module.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a state dict"):
        load_weights(tmp_path / "list.pt")


def test_importing_the_model_registry_does_not_import_torch() -> None:
    code = "import sys, denoisers.models, dicom_node.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------- add, get, list


def test_add_copies_hashes_and_writes_the_card(store: ModelStore, weights: Callable[..., Path]) -> None:
    src = weights()
    mv = store.add(src, {"denoiser": "cnn", "units": "SUV", "tracers": ["FDG"]}, name="unet", version="1.0.0")
    assert mv.ref == "unet@1.0.0" and mv.state == "available" and not mv.active
    assert mv.weights_path == store.root / "unet" / "1.0.0" / "weights.pt"
    assert mv.weights_path.read_bytes() == src.read_bytes()
    assert mv.card.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    on_disk = models.load_card(store.root / "unet" / "1.0.0" / models.CARD_FILE)
    assert on_disk == mv.card and on_disk.created.tzinfo is not None and on_disk.petnode_version
    assert store.get("unet", "1.0.0") == mv
    with pytest.raises(ModelRegistryError, match=r"no active version: activate one with `petnode models "
                                                 r"activate unet@1.0.0`"):
        store.get("unet")
    assert not (store.root / "unet" / models.ACTIVE_FILE).exists()
    assert not any((store.root / models._STAGING_DIR).iterdir())  # staging cleaned up
    [info] = store.list()
    assert (info.name, info.active, [(v.version, v.state) for v in info.versions]) == (
        "unet", None, [("1.0.0", "available")])


def test_add_activate_and_natural_version_order(store: ModelStore, weights: Callable[..., Path]) -> None:
    for version in ("1.9.0", "1.10.0", "1.2.0"):
        store.add(weights(), {"denoiser": "cnn"}, name="unet", version=version)
    mv = store.add(weights(), {"denoiser": "cnn"}, name="unet", version="2.0.0", activate=True)
    assert mv.active and store.get("unet").version == "2.0.0"
    assert [v.version for v in store.list()[0].versions] == ["1.2.0", "1.9.0", "1.10.0", "2.0.0"]
    assert (store.root / "unet" / models.ACTIVE_FILE).read_text() == "2.0.0\n"


def test_add_from_a_card_file_and_its_refusals(store: ModelStore, weights: Callable[..., Path], tmp_path: Path
                                               ) -> None:
    src = weights()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    card = tmp_path / "card.yaml"
    card.write_text(f"name: unet\nversion: '1.0.0'\ndenoiser: cnn\nsha256: {sha}\nexpected_voxel_mm: [2, 2, 2]\n"
                    "created: 2024-05-06T07:08:09Z\n")
    mv = store.add(src, card, name="unet", version="1.0.0")
    assert mv.card.expected_voxel_mm == (2.0, 2.0, 2.0) and mv.card.created.year == 2024  # training date kept
    with pytest.raises(ModelRegistryError, match=r"card says version '1.0.0' but '1.1.0' was given"):
        store.add(src, card, name="unet", version="1.1.0")
    with pytest.raises(WeightsError, match=r"does not match the card's sha256"):
        store.add(weights(), card, name="unet", version="1.0.0")
    with pytest.raises(ModelRegistryError, match=r"unet@1.0.0 already exists; versions never change.*"
                                                 r"--version 1.0.1.*petnode models remove unet@1.0.0"):
        store.add(src, {"denoiser": "cnn"}, name="unet", version="1.0.0")
    with pytest.raises(ModelRegistryError, match=r"key 'units' = 'Bq/ml'"):
        store.add(src, {"denoiser": "cnn", "units": "Bq/ml"}, name="unet", version="1.2.0")
    with pytest.raises(WeightsError, match="does not exist"):
        store.add(tmp_path / "nope.pt", {"denoiser": "cnn"}, name="unet", version="1.3.0")
    assert [v.version for v in store.list()[0].versions] == ["1.0.0"]


def test_add_refuses_weights_the_node_could_not_load(store: ModelStore, tmp_path: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(WeightsError, match="state_dict"):
        store.add(tmp_path / "module.pt", {"denoiser": "cnn"}, name="unet", version="1.0.0")
    assert store.list() == [] and not (store.root / "unet").exists()


def test_get_unknown_names_suggest(store: ModelStore, weights: Callable[..., Path]) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet-fdg", version="1.0.0")
    with pytest.raises(ModelRegistryError, match=r"no model named 'unet-fgd'.*did you mean 'unet-fdg'"):
        store.get("unet-fgd")
    with pytest.raises(ModelRegistryError, match=r"no version '1.0.1' \(did you mean '1.0.0'\?\)"):
        store.get("unet-fdg", "1.0.1")


# ---------------------------------------------------------------------------------------------- activate, retire


def test_activate_retire_and_resolve(store: ModelStore, weights: Callable[..., Path]) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.1.0")
    assert store.resolve("unet").version == "1.0.0" and not store.resolve("unet").pinned
    assert store.resolve("unet@1.1.0").ref == "unet@1.1.0" and store.resolve("unet@1.1.0").pinned

    with pytest.raises(ModelRegistryError, match=r"active version of 'unet' and cannot be retired.*"
                                                 r"petnode models activate unet@1.1.0"):
        store.retire("unet", "1.0.0")
    store.activate("unet", "1.1.0")
    retired = store.retire("unet", "1.0.0", reason="overcorrects lesions")
    assert retired.retired and "overcorrects lesions" in (retired.retired_note or "")
    assert store.retire("unet", "1.0.0").retired  # idempotent
    assert [(v.version, v.state) for v in store.list()[0].versions] == [("1.0.0", "retired"), ("1.1.0", "active")]

    with pytest.raises(WeightsError, match=r"unet@1.0.0 is retired .*overcorrects lesions.*a rule pins it: change "
                                           r"the rule's model to 'unet' \(the active version, 1.1.0\)"):
        store.resolve("unet@1.0.0")
    assert store.resolve("unet").version == "1.1.0"
    with pytest.raises(ModelRegistryError, match=r"is retired .*--unretire"):
        store.activate("unet", "1.0.0")
    mv = store.activate("unet", "1.0.0", unretire=True)
    assert mv.active and not mv.retired and store.resolve("unet@1.0.0").version == "1.0.0"
    actions = [(e["action"], e["version"], e["details"]) for e in audit(store)]
    assert actions[-1] == ("activate", "1.0.0", {"unretired": True, "previous": "1.1.0"})


def test_resolve_reads_active_on_every_call(store: ModelStore, weights: Callable[..., Path]) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.1.0")
    node_view = ModelStore(store.root)  # the running node's instance; the CLI uses its own
    assert node_view.resolve("unet").version == "1.0.0"
    store.activate("unet", "1.1.0")
    assert node_view.resolve("unet").version == "1.1.0"


def test_resolve_refusals_say_what_to_do(store: ModelStore, weights: Callable[..., Path]) -> None:
    with pytest.raises(WeightsError, match=r"no model named 'unet'.*add or import it, or change the rule's model"):
        store.resolve("unet")
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0")
    with pytest.raises(WeightsError, match=r"no active version: activate one"):
        store.resolve("unet")
    with pytest.raises(WeightsError, match=r"no version '2.0.0'.*change the rule's model"):
        store.resolve("unet@2.0.0")
    with pytest.raises(WeightsError, match="NAME@VERSION"):
        store.resolve("Bad Name")
    (store.root / "unet" / models.ACTIVE_FILE).write_text("9.9.9\n")  # edited by hand
    with pytest.raises(WeightsError, match=r"active version of 'unet' is '9.9.9', which is not installed"):
        store.resolve("unet")


def test_atomic_active_survives_a_failed_replace(store: ModelStore, weights: Callable[..., Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.1.0")
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        replaced.append((Path(src).name, Path(dst).name))
        # The temp file is complete and fsynced before the replace: this is the crash point that matters.
        assert Path(src).read_text() == "1.1.0\n"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models.os, "replace", failing_replace)
    with pytest.raises(OSError):
        store.activate("unet", "1.1.0")
    monkeypatch.setattr(models.os, "replace", real_replace)
    assert replaced and replaced[0][1] == models.ACTIVE_FILE and replaced[0][0] != models.ACTIVE_FILE
    assert (store.root / "unet" / models.ACTIVE_FILE).read_text() == "1.0.0\n"  # old pointer intact
    assert sorted(p.name for p in (store.root / "unet").iterdir()) == ["1.0.0", "1.1.0", "ACTIVE"]  # no temp left
    assert store.resolve("unet").version == "1.0.0"
    assert [e["action"] for e in audit(store)].count("activate") == 1  # a failed change is not audited


def test_every_change_runs_under_the_lock(store: ModelStore, weights: Callable[..., Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []
    for method in ("_install", "_write_active"):
        real = getattr(ModelStore, method)

        def spy(self: ModelStore, *args: Any, _real: Any = real, _name: str = method) -> Any:
            seen.append((_name, lock_is_held(self.root)))
            return _real(self, *args)

        monkeypatch.setattr(ModelStore, method, spy)
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.1.0")
    store.activate("unet", "1.1.0")
    archive = store.export("unet", "1.0.0", tmp_path / "unet.tar.gz")
    ModelStore(tmp_path / "other").import_(archive, activate=True)

    def in_use(name: str, version: str) -> str | None:
        seen.append(("in_use", lock_is_held(store.root)))
        return None

    store.remove("unet", "1.0.0", in_use=in_use)
    assert {name for name, _ in seen} == {"_install", "_write_active", "in_use"}
    assert all(held for _, held in seen), seen
    assert not lock_is_held(store.root)  # released afterwards


# ---------------------------------------------------------------------------------------------- tampering, verify


def test_tampered_weights_verify_reports_and_resolve_refuses(store: ModelStore, weights: Callable[..., Path]
                                                             ) -> None:
    mv = store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="other", version="1", activate=True)
    assert store.verify() == []
    assert store.resolve("unet").version == "1.0.0"
    save_weights(mv.weights_path, 666.0)  # same size, different values
    problems = store.verify()
    assert [(p.model, p.version) for p in problems] == [("unet", "1.0.0")]
    assert "tampered" in problems[0].message and "import it again" in problems[0].message
    with pytest.raises(WeightsError, match=r"unet@1.0.0 fail their checksum.*restore it"):
        store.resolve("unet")
    with pytest.raises(WeightsError, match="cannot activate unet@1.0.0"):
        store.activate("unet", "1.0.0")
    with pytest.raises(WeightsError, match="cannot export"):
        store.export("unet", "1.0.0", store.root.parent / "x.zip")
    assert store.resolve("other").version == "1"  # the other model is unaffected


def test_resolve_hashes_once_per_file_state(store: ModelStore, weights: Callable[..., Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mv = store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    calls: list[Path] = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(5):
        store.resolve("unet")
    assert len(calls) == 1
    with open(mv.weights_path, "ab") as fh:  # a changed file (size, mtime) is hashed again and refused
        fh.write(b"\0")
    with pytest.raises(WeightsError, match="checksum"):
        store.resolve("unet")
    assert len(calls) == 2


def test_missing_weights_and_broken_cards(store: ModelStore, weights: Callable[..., Path]) -> None:
    a = store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    b = store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.1.0")
    a.weights_path.unlink()
    (b.directory / models.CARD_FILE).write_text("name: [unclosed\n")
    states = {v.version: (v.state, v.problem) for v in store.list()[0].versions}
    assert states["1.0.0"][0] == "broken" and "missing" in (states["1.0.0"][1] or "")
    assert states["1.1.0"][0] == "broken" and "not valid YAML" in (states["1.1.0"][1] or "")
    messages = [str(p) for p in store.verify()]
    assert any(m.startswith("unet@1.0.0: weights file") and "missing" in m and "petnode models remove" in m
               for m in messages)
    assert any(m.startswith("unet@1.1.0:") and "not valid YAML" in m for m in messages)
    with pytest.raises(WeightsError, match=r"weights file .* of model unet@1.0.0 is missing"):
        store.resolve("unet")
    with pytest.raises(WeightsError, match=r"unet@1.1.0 cannot be used"):
        store.resolve("unet@1.1.0")
    store.remove("unet", "1.1.0")  # a broken version can still be removed
    assert [v.version for v in store.list()[0].versions] == ["1.0.0"]


def test_verify_reports_a_dangling_active_pointer(store: ModelStore, weights: Callable[..., Path]) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0")
    (store.root / "unet" / models.ACTIVE_FILE).write_text("2.0.0\n")
    [problem] = store.verify()
    assert problem.version is None and "ACTIVE names version '2.0.0'" in problem.message


# ---------------------------------------------------------------------------------------------- remove


def test_remove_consults_in_use_and_refuses_the_active_version(store: ModelStore, weights: Callable[..., Path]
                                                               ) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.1.0")
    with pytest.raises(ModelRegistryError, match=r"unet@1.0.0 is the active version.*activate unet@1.1.0"):
        store.remove("unet", "1.0.0")
    asked: list[tuple[str, str]] = []

    def pinned(name: str, version: str) -> str:
        asked.append((name, version))
        return "rule 'pet-unet' pins unet@1.1.0"

    with pytest.raises(ModelRegistryError, match=r"unet@1.1.0 is in use and was not removed: rule 'pet-unet' pins"):
        store.remove("unet", "1.1.0", in_use=pinned)
    assert asked == [("unet", "1.1.0")] and store.get("unet", "1.1.0")
    store.remove("unet", "1.1.0", in_use=lambda n, v: None)
    with pytest.raises(ModelRegistryError, match="no version '1.1.0'"):
        store.get("unet", "1.1.0")
    # The only version, active, can go when nothing uses it: the model disappears.
    store.remove("unet", "1.0.0")
    assert store.list() == [] and not (store.root / "unet").exists()
    with pytest.raises(ModelRegistryError, match="no model named 'unet'"):
        store.remove("unet", "1.0.0")
    removes = [e for e in audit(store) if e["action"] == "remove"]
    assert [(e["version"], e["details"]["was_active"]) for e in removes] == [("1.1.0", False), ("1.0.0", True)]


# ---------------------------------------------------------------------------------------------- export, import


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_export_import_round_trip(store: ModelStore, weights: Callable[..., Path], tmp_path: Path,
                                  suffix: str) -> None:
    mv = store.add(weights(), {"denoiser": "cnn", "tracers": ["FDG"], "validation_metrics": {"psnr": 38.2}},
                   name="unet", version="1.0.0", activate=True)
    archive = store.export("unet", None, tmp_path / f"unet{suffix}")  # None: the active version
    with pytest.raises(ModelRegistryError, match="already exists: choose another file name"):
        store.export("unet", "1.0.0", archive)
    other = ModelStore(tmp_path / "other")
    imported = other.import_(archive)
    assert imported.card == mv.card and imported.weights_path.read_bytes() == mv.weights_path.read_bytes()
    assert not imported.active and other.verify() == []
    again = other.import_(archive, activate=True)  # idempotent on identical content
    assert again.active and again.card == mv.card
    assert [e["action"] for e in audit(other)] == ["import", "import", "activate"]
    assert audit(other)[1]["details"]["unchanged"] is True
    # A different model under the same version is refused: versions never change.
    different = ModelStore(tmp_path / "third")
    different.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0")
    with pytest.raises(ModelRegistryError, match=r"unet@1.0.0 is already installed with a different weights.*new "
                                                 r"version.*petnode models remove unet@1.0.0"):
        different.import_(archive)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_import_refuses_damaged_or_foreign_archives(store: ModelStore, weights: Callable[..., Path],
                                                    tmp_path: Path) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0")
    archive = store.export("unet", "1.0.0", tmp_path / "unet.zip")
    with zipfile.ZipFile(archive) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    card = members["unet/1.0.0/card.yaml"]
    target = ModelStore(tmp_path / "target")
    damaged = _tar(tmp_path / "damaged.tar.gz", {"unet/1.0.0/card.yaml": card,
                                                 "unet/1.0.0/weights.pt": b"PK\x03\x04 changed"})
    with pytest.raises(WeightsError, match=r"do not match the card.*damaged or was modified after export"):
        target.import_(damaged)
    for name, bad in {
        "traversal": {"../../evil/1.0.0/card.yaml": card, "../../evil/1.0.0/weights.pt": b"x"},
        "extra": {**members, "unet/1.0.0/notes.txt": b"x"},
        "flat": {"card.yaml": card, "weights.pt": b"x"},
    }.items():
        with pytest.raises(ModelRegistryError, match="not a petnode model export|not valid"):
            target.import_(_tar(tmp_path / f"{name}.tar.gz", bad))
    renamed = _tar(tmp_path / "renamed.tar.gz", {"unet/2.0.0/card.yaml": card, "unet/2.0.0/weights.pt": b"x"})
    with pytest.raises(ModelRegistryError, match=r"card describes unet@1.0.0.*archive holds unet@2.0.0"):
        target.import_(renamed)
    with pytest.raises(ModelRegistryError, match=r"must end in .tar.gz, .tgz or .zip"):
        target.import_(tmp_path / "unet.rar")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ModelRegistryError, match="cannot be read as a zip archive"):
        target.import_(tmp_path / "broken.zip")
    assert target.list() == [] and not (tmp_path / "evil").exists()


# ---------------------------------------------------------------------------------------------- history, shipped


def test_history_records_user_action_and_details(store: ModelStore, weights: Callable[..., Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETNODE_USER", "physicist-anna")
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    store.add(weights(), {"denoiser": "cnn"}, name="other", version="1")
    entries = store.history(None)
    assert [(e["action"], e["model"], e["version"]) for e in entries] == [
        ("add", "unet", "1.0.0"), ("activate", "unet", "1.0.0"), ("add", "other", "1")]
    assert all(e["user"] == "physicist-anna" and e["time"].endswith("Z") for e in entries)
    assert entries[0]["details"]["sha256"] == store.get("unet").card.sha256
    assert store.history(1) == entries[-1:]
    assert [e["action"] for e in store.history(None, model="unet")] == ["add", "activate"]
    assert ModelStore(store.root.parent / "empty").history() == []


def _ship(shipped: Path, name: str, version: str, value: float, **card: Any) -> Path:
    folder = shipped / name / version
    w = save_weights(folder / "weights.pt", value)
    fields = {"name": name, "version": version, "denoiser": "cnn", "created": "2025-03-01T00:00:00Z",
              "petnode_version": "0.1.0", "weights_file": "weights.pt",
              "sha256": hashlib.sha256(w.read_bytes()).hexdigest(), **card}
    (folder / models.CARD_FILE).write_text(models.yaml.safe_dump(fields))
    return folder


def test_register_shipped_is_idempotent(store: ModelStore, weights: Callable[..., Path], tmp_path: Path) -> None:
    shipped = tmp_path / "models"
    _ship(shipped, "unet-fdg", "1.0.0", 1.0)
    _ship(shipped, "unet-fdg", "1.1.0", 2.0)
    _ship(shipped, "unet-psma", "0.9", 3.0)
    bad = _ship(shipped, "broken", "1", 4.0)
    save_weights(bad / "weights.pt", 5.0)  # does not match its card
    result = store.register_shipped(shipped)
    assert sorted(result.registered) == ["unet-fdg@1.0.0", "unet-fdg@1.1.0", "unet-psma@0.9"]
    assert sorted(result.activated) == ["unet-fdg@1.1.0", "unet-psma@0.9"]  # newest, for models with none active
    assert [(p.model, p.version) for p in result.problems] == [("broken", "1")]
    assert "sha256" in result.problems[0].message
    assert {e["user"] for e in audit(store)} == {models.SHIPPED_USER}
    n_audit = len(audit(store))

    assert store.register_shipped(shipped).registered == ()  # second run: nothing new
    assert len(audit(store)) == n_audit
    # A physicist's choices stand: an activation is kept, a removed shipped version is not re-added,
    # and a new shipped version is installed but not activated.
    store.activate("unet-fdg", "1.0.0")
    store.remove("unet-psma", "0.9")
    _ship(shipped, "unet-fdg", "1.2.0", 6.0)
    result = store.register_shipped(shipped)
    assert result.registered == ("unet-fdg@1.2.0",) and result.activated == ()
    assert store.get("unet-fdg").version == "1.0.0"
    assert [m.name for m in store.list()] == ["unet-fdg"]
    # A shipped version whose name is already taken by different content is reported, not installed.
    other = ModelStore(tmp_path / "other")
    other.add(weights(), {"denoiser": "cnn"}, name="unet-fdg", version="1.0.0", activate=True)
    result = other.register_shipped(shipped)
    assert ("unet-fdg", "1.0.0") in [(p.model, p.version) for p in result.problems]
    assert other.get("unet-fdg").version == "1.0.0" and "unet-fdg@1.1.0" in result.registered
    assert ModelStore(tmp_path / "x").register_shipped(tmp_path / "no-such-dir").registered == ()


# ---------------------------------------------------------------------------------------------- check_card


def _card(**kw: Any) -> ModelCard:
    return models.card_from_mapping(minimal_card(**kw))


@pytest.mark.parametrize("card, kwargs, expected", [
    ({}, {}, None),
    ({"inputs": ["pet", "mr_prior"]}, {}, r"needs an MR prior \(mr_prior\)"),
    ({"inputs": ["pet", "mr_prior"]}, {"provided_inputs": {"pet", "mr_prior"}}, None),
    ({"expected_voxel_mm": [2, 2, 2]}, {}, r"voxel size 2.00 x 4.00 x 4.00 mm .* \(2.00 x 2.00 x 2.00 mm within 15%\)"),
    ({"expected_voxel_mm": [2, 4, 4]}, {}, None),
    ({"expected_voxel_mm": [2.2, 4.5, 3.5]}, {}, None),  # within 15 % on every axis
    ({"expected_voxel_mm": [2, 4, 4], "voxel_tolerance": 0.05}, {"spacing_mm": (2, 4.3, 4)}, "outside"),
    ({"units": "BQML"}, {"units": "PROPCNTS"}, r"expects activity concentration in Bq/ml.*'PROPCNTS'"),
    ({"units": "SUV"}, {}, None),
    ({"units": "SUV"}, {"suv_available": False}, r"cannot be converted to SUV: the SUV attributes"),
    ({"units": "SUV"}, {"units": "CNTS"}, r"Units are 'CNTS'"),
    ({"units": "any"}, {"units": "CNTS"}, None),
    ({"tracers": ["FDG"]}, {"tracer": "PSMA"}, r"trained on FDG, not PSMA"),
    ({"tracers": ["FDG"]}, {"tracer": "fdg"}, None),
    ({"tracers": ["FDG"]}, {"tracer": None}, None),
    ({}, {"denoiser": "cnn"}, None),
    ({}, {"denoiser": "cdip"}, r"is for the 'cnn' denoiser but the rule runs 'cdip'"),
])
def test_check_card(card: dict[str, Any], kwargs: dict[str, Any], expected: str | None) -> None:
    args: dict[str, Any] = {"spacing_mm": (2.0, 4.0, 4.0), "units": "BQML", "provided_inputs": {"pet", "spacing"}}
    args.update(kwargs)
    reason = check_card(_card(**card), **args)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and __import__("re").search(expected, reason), reason


# ---------------------------------------------------------------------------------------------- concurrency


def test_concurrent_activate_from_threads_is_consistent(store: ModelStore, weights: Callable[..., Path]) -> None:
    versions = ["1.0.0", "1.1.0", "1.2.0"]
    for v in versions:
        store.add(weights(), {"denoiser": "cnn"}, name="unet", version=v, activate=(v == "1.0.0"))
    n_threads, n_each = 8, 10
    start = threading.Barrier(n_threads + 1)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        own = ModelStore(store.root)  # like separate commands: own instance, own lock descriptor
        start.wait()
        try:
            for i in range(n_each):
                own.activate("unet", versions[(i + k) % len(versions)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    start.wait()
    reads = 0
    while any(t.is_alive() for t in threads):  # a reader never sees a missing or half-written pointer
        assert store.resolve("unet").version in versions
        reads += 1
    for t in threads:
        t.join()
    assert errors == []
    _assert_consistent(store, versions, 1 + n_threads * n_each)
    assert reads > 0


def _assert_consistent(store: ModelStore, versions: list[str], n_activations: int) -> None:
    entries = audit(store)  # every line is whole JSON (json.loads would fail on an interleaved line)
    activations = [e for e in entries if e["action"] == "activate"]
    assert len(activations) == n_activations
    # Pointer and audit change under one lock: the last activation audited is the active version, and each
    # activation's "previous" is the one audited before it (no lost or reordered updates).
    active = (store.root / "unet" / models.ACTIVE_FILE).read_text()
    assert active == activations[-1]["version"] + "\n" and active.strip() in versions
    for before, after in zip(activations, activations[1:]):
        assert after["details"]["previous"] == before["version"]
    leftovers = [p.name for p in (store.root / "unet").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and store.verify() == []


_WORKER = """
import sys
from pathlib import Path
from denoisers.models import ModelStore
root, versions, n, k = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
store = ModelStore(root)
print("ready", flush=True)
sys.stdin.readline()  # start together
for i in range(n):
    store.activate("unet", versions[(i + k) % len(versions)])
print("done", flush=True)
"""


def test_concurrent_activate_from_processes_is_consistent(store: ModelStore, weights: Callable[..., Path]
                                                          ) -> None:
    versions = ["1.0.0", "1.1.0", "1.2.0"]
    for v in versions:
        store.add(weights(), {"denoiser": "cnn"}, name="unet", version=v, activate=(v == "1.0.0"))
    n_procs, n_each = 6, 15
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(store.root), ",".join(versions), str(n_each),
                               str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env) for k in range(n_procs)]
    try:
        for p in procs:  # wait until every worker has imported everything, then release them at once
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        reads = 0
        while any(p.poll() is None for p in procs):
            assert store.resolve("unet").version in versions
            reads += 1
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * n_procs, [err for _, err in outputs]
    assert all(out.strip() == "done" for out, _ in outputs)
    _assert_consistent(store, versions, 1 + n_procs * n_each)
    assert reads > 0


def test_concurrent_adds_of_one_version_install_exactly_one(store: ModelStore, weights: Callable[..., Path]
                                                            ) -> None:
    sources = [weights() for _ in range(6)]
    start = threading.Barrier(len(sources))
    results: list[str] = []

    def work(src: Path) -> None:
        start.wait()
        try:
            ModelStore(store.root).add(src, {"denoiser": "cnn"}, name="unet", version="1.0.0")
            results.append(hashlib.sha256(src.read_bytes()).hexdigest())
        except ModelRegistryError as exc:
            assert "already exists" in str(exc)
            results.append("refused")

    threads = [threading.Thread(target=work, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r != "refused"]
    assert len(results) == len(sources) and len(winners) == 1
    assert store.get("unet", "1.0.0").card.sha256 == winners[0] and store.verify() == []
    assert [e["action"] for e in audit(store)] == ["add"]


def test_errors_share_the_package_root() -> None:
    assert issubclass(ModelRegistryError, DenoiserError) and issubclass(WeightsError, DenoiserError)


def test_a_garbled_active_pointer_is_reported_not_followed(store: ModelStore, weights: Callable[..., Path]) -> None:
    store.add(weights(), {"denoiser": "cnn"}, name="unet", version="1.0.0", activate=True)
    (store.root / "unet" / models.ACTIVE_FILE).write_text("../../etc\n")
    with pytest.raises(WeightsError, match=r"holds '../../etc', not a version: activate a version again"):
        store.resolve("unet")
    assert store.list()[0].active is None
    assert any("not a version" in p.message for p in store.verify())
    store.activate("unet", "1.0.0")
    assert store.resolve("unet").version == "1.0.0"
