"""Rules that name a model: active version picked up without restart, provenance, card checks, tampering."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

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


def _total(datasets: list) -> float:
    """The series' total activity in its stored units (pixel values through the rescale slope)."""
    return sum(float((d.pixel_array * float(d.RescaleSlope)).sum(dtype="float64")) for d in datasets)


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
    assert _total(derived) == pytest.approx(_total(series), rel=1e-3)


def _phantom(shape: tuple[int, int, int], seed: int) -> Any:
    """A smooth body with warm and hot blobs (Bq/ml): something for a network to denoise, with Poisson noise."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = (y**2 / 0.8 + x**2 / 0.9 < 0.8).astype(float)
    activity = body * 5000.0 + 20000.0 * ((y - 0.2) ** 2 + (x + 0.3) ** 2 + z**2 < 0.04)
    activity = gaussian_filter(activity, 1.0)
    return (rng.poisson(activity / 250.0) * 250.0).astype(np.float32)


def test_shipped_rules_send_fdg_series_to_the_shipped_models(start_node, storescp_sink: StoreSCP):
    """Out of the box: with config/rules.yaml and the models/ shipped in the repository (registered when the node
    starts), an FDG whole-body series and an FDG brain series go to the shipped networks; the derived series names
    the model, its version and the count level estimated from the image; the total activity is kept."""
    import yaml

    from dicom_node.settings import SHIPPED_MODELS

    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "rules.yaml").read_text())["rules"]
    node = start_node(rules, shipped_models_dir=str(SHIPPED_MODELS),
                      peers=[{"name": "scanner", "ae_title": "SCANNER", "host": "127.0.0.1",
                              "port": storescp_sink.port}])
    cases = [("fdg-wb-fo", make_pet_series(shape=(12, 40, 40), spacing=(3.27, 4.6875, 4.6875), seed=61,
                                           activity=_phantom((12, 40, 40), 1), series_description="PET WB AC")),
             ("fdg-brain-fo", make_pet_series(shape=(10, 48, 48), spacing=(2.0, 2.0, 2.0), seed=62,
                                              activity=_phantom((10, 48, 48), 2), series_description="Brain FDG"))]
    for model, series in cases:
        assert send_datasets(series, node.port) == [0] * len(series)
    for model, series in cases:
        uid = str(series[0].SeriesInstanceUID)
        assert wait_state(node, uid, ["delivered", "failed"], timeout=120) == "delivered", node.db.series(uid)
    assert storescp_sink.wait_for(sum(len(s) for _, s in cases))
    for model, series in cases:
        uid = str(series[0].SeriesInstanceUID)
        derived = _derived(storescp_sink, node, uid)
        assert len(derived) == len(series)
        version = node.models.resolve(model).version  # registered from models/ when the node started
        description = derived[0].DerivationDescription
        assert f"{model}@{version}" in description and "noise_index" in description and "dose_aware" in description
        assert f"model {model}@{version}" in derived[0].ContributingEquipmentSequence[-1].SoftwareVersions
        assert derived[0].SeriesDescription.endswith("[petnode cnn]")
        assert _total(derived) == pytest.approx(_total(series), rel=0.01)
