"""Rules that name a model: active version picked up without restart, provenance, card checks, tampering."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydicom import dcmread

from denoisers import registry
from denoisers.base import DenoiseInputs, DenoiseResult, Denoiser, DenoiserParams, DenoiserSpec, InputKind
from denoisers.models import ModelStore, load_weights
from dicom_node.cli import main
from tests.dicomtools import StoreSCP
from tests.e2e.conftest import pet_rule, send_datasets, wait_state
from tests.factories import make_pet_series

pytestmark = pytest.mark.network

SPACING = (3.27, 4.0, 4.0)


class ScaledParams(DenoiserParams):
    pass


class ScaledDenoiser(Denoiser[ScaledParams]):
    """Test-only learned method: multiplies by the scalar in its weights file (so the version shows in pixels)."""

    name: ClassVar[str] = "scaled"
    Params: ClassVar[type[DenoiserParams]] = ScaledParams

    @property
    def spec(self) -> DenoiserSpec:
        return DenoiserSpec(requires=frozenset({InputKind.PET}), needs_weights=True)

    def _run(self, inputs: DenoiseInputs) -> DenoiseResult:
        assert self.weights is not None
        w = float(load_weights(self.weights)["w"])
        return DenoiseResult(denoised=(inputs.pet * w).astype("float32"))


def _add(store: ModelStore, tmp: Path, name: str, version: str, w: float, voxel: tuple[float, ...],
         activate: bool) -> None:
    path = tmp / f"{name}-{version}.pt"
    torch.save({"w": torch.tensor(w)}, path)
    store.add(path, {"denoiser": "scaled", "architecture": "scalar", "expected_voxel_mm": list(voxel),
                     "voxel_tolerance": 0.05, "units": "BQML"}, name=name, version=version, activate=activate)


def _derived(sink: StoreSCP, node, uid: str) -> list:
    out_uid = node.db.series(uid)["output_series_uid"]
    return [d for d in (dcmread(f) for f in sink.files()) if d.SeriesInstanceUID == out_uid]


def test_models_in_a_running_node(start_node, storescp_sink: StoreSCP, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(registry._BUILTIN, "scaled", f"{__name__}:ScaledDenoiser")
    sink = [{"peer": "sink"}]
    node = start_node(
        [pet_rule(sink, name="small-voxels", match={"modality": ["PT"], "series_description": "SMALLVOX"},
                  denoiser={"name": "scaled", "model": "toy2"}),
         pet_rule(sink, name="toy", denoiser={"name": "scaled", "model": "toy"})],
        peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}],
    )
    store = node.models
    _add(store, tmp_path, "toy", "1.0.0", 1.0, SPACING, activate=True)
    _add(store, tmp_path, "toy2", "1.0.0", 1.0, (2.0, 2.0, 2.0), activate=True)

    a = make_pet_series(shape=(4, 16, 16), spacing=SPACING, seed=51)
    assert send_datasets(a, node.port) == [0] * 4
    uid_a = str(a[0].SeriesInstanceUID)
    assert wait_state(node, uid_a, ["delivered", "failed"]) == "delivered", node.db.series(uid_a)
    assert storescp_sink.wait_for(4)
    first = _derived(storescp_sink, node, uid_a)[0]
    assert "model toy@1.0.0" in first.ContributingEquipmentSequence[-1].SoftwareVersions

    # A physicist activates a new version with the node running: the next series uses it, no restart.
    _add(store, tmp_path, "toy", "1.1.0", 1.02, SPACING, activate=False)
    data = ["--data-dir", str(node.settings.data_dir)]
    assert main(["models", "activate", "toy@1.1.0", *data]) == 0
    b = make_pet_series(shape=(4, 16, 16), spacing=SPACING, seed=52)
    assert send_datasets(b, node.port) == [0] * 4
    uid_b = str(b[0].SeriesInstanceUID)
    assert wait_state(node, uid_b, ["delivered", "failed"]) == "delivered", node.db.series(uid_b)
    assert storescp_sink.wait_for(8)
    second = _derived(storescp_sink, node, uid_b)
    assert "model toy@1.1.0" in second[0].ContributingEquipmentSequence[-1].SoftwareVersions
    assert node.db.series(uid_a)["output_series_uid"] != node.db.series(uid_b)["output_series_uid"]

    # A card the series cannot meet (trained at 2 mm, series at 4 mm): the route fails early with the reason.
    c = make_pet_series(shape=(4, 16, 16), spacing=SPACING, seed=53, series_description="SMALLVOX")
    assert send_datasets(c, node.port) == [0] * 4
    uid_c = str(c[0].SeriesInstanceUID)
    assert wait_state(node, uid_c, ["failed"]) == "failed"
    assert "toy2@1.0.0 cannot process this series" in node.db.series(uid_c)["error"]
    assert "voxel" in node.db.series(uid_c)["error"]
    assert node.db.series(uid_c)["output_series_uid"] is None

    # Tampered weights: never loaded silently.
    weights = store.get("toy", "1.1.0").weights_path
    weights.write_bytes(weights.read_bytes() + b"\0")
    d = make_pet_series(shape=(4, 16, 16), spacing=SPACING, seed=54)
    assert send_datasets(d, node.port) == [0] * 4
    uid_d = str(d[0].SeriesInstanceUID)
    assert wait_state(node, uid_d, ["failed"]) == "failed"
    assert "WeightsError" in node.db.series(uid_d)["error"] and "sha256" in node.db.series(uid_d)["error"]


def test_config_check_resolves_models(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch):
    from tests.e2e.conftest import write_config

    monkeypatch.setitem(registry._BUILTIN, "scaled", f"{__name__}:ScaledDenoiser")
    config = write_config(tmp_path, [pet_rule(["return_to_sender"], denoiser={"name": "scaled", "model": "toy"})])
    assert main(["-c", str(config), "config", "check"]) == 1
    assert "model 'toy'" in capsys.readouterr().err
    _add(ModelStore(tmp_path / "var" / "models"), tmp_path, "toy", "1.0.0", 1.0, SPACING, activate=True)
    assert main(["-c", str(config), "config", "check"]) == 0
    assert "model ok: rule 'pet-gaussian' -> toy@1.0.0" in capsys.readouterr().out


def test_a_registered_cnn_model_processes_a_series(start_node, storescp_sink: StoreSCP, tmp_path: Path):
    """The real `cnn` plugin in a running node: a feature-oriented DCNN registered in the node's store, named by a
    rule, processes a series; the derived series names the model and keeps the total activity."""
    from denoisers.nets import build

    torch.manual_seed(7)
    net, _ = build("fo-dcnn", {"features": 4, "layers": 4})
    weights = tmp_path / "fo.pt"
    torch.save(net.state_dict(), weights)
    node = start_node(
        [pet_rule([{"peer": "sink"}], name="fo", denoiser={"name": "cnn", "model": "fo-test"})],
        peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}],
    )
    node.models.add(weights, {"denoiser": "cnn", "architecture": "fo-dcnn", "normalisation": "mean",
                              "input_slices": 3, "expected_voxel_mm": list(SPACING), "units": "BQML",
                              "extra": {"net": {"features": 4, "layers": 4}}},
                    name="fo-test", version="0.1.0", activate=True)
    series = make_pet_series(shape=(6, 16, 16), spacing=SPACING, seed=52)
    assert send_datasets(series, node.port) == [0] * 6
    uid = str(series[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)
    assert storescp_sink.wait_for(6)
    derived = _derived(storescp_sink, node, uid)
    assert len(derived) == 6
    assert "model fo-test@0.1.0" in derived[0].ContributingEquipmentSequence[-1].SoftwareVersions
    assert "architecture" in derived[0].DerivationDescription and "fo-dcnn" in derived[0].DerivationDescription

    def total(datasets: list) -> float:
        return sum(float((d.pixel_array * float(d.RescaleSlope)).sum()) for d in datasets)

    assert total(derived) == pytest.approx(total(series), rel=1e-3)
