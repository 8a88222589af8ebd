"""BC-DPM in a running node: a rule naming a registered diffusion model returns the denoised PET and the
uncertainty map (Secondary Capture and Parametric Map) to a real DCMTK peer; the count level used is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom import dcmread

from denoisers.diffusion import BETA_END, BETA_START, NORMALISATION, SCALE, T_STEPS, build_network
from denoisers.models import ModelStore
from tests.conftest import wait_until
from tests.dicomtools import StoreSCP, run_dciodvfy
from tests.e2e.conftest import send_datasets, wait_state
from tests.factories import make_pet_series

pytestmark = pytest.mark.network

SHAPE = (8, 24, 24)
SPACING = (3.0, 3.0, 3.0)
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PM_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
NET = {"in_slices": 3, "base": 8, "mults": [1, 2], "blocks": 1, "attention": False}


def _register(store: ModelStore, tmp: Path) -> None:
    torch.manual_seed(0)
    weights = tmp / "ddpm.pt"
    torch.save(build_network(dict(NET)).state_dict(), weights)
    store.add(weights, {"denoiser": "bcdpm", "architecture": "adm-unet", "input_slices": 3,
                        "normalisation": NORMALISATION,
                        "extra": {"net": NET, "diffusion": {"schedule": "linear", "steps": T_STEPS,
                                                            "beta_start": BETA_START, "beta_end": BETA_END,
                                                            "scale": SCALE}}},
              name="ddpm-tiny", version="1.0.0", activate=True)


def _rule(port: int) -> list[dict[str, Any]]:
    return [{"name": "pet-bcdpm", "match": {"modality": ["PT"]},
             "denoiser": {"name": "bcdpm", "model": "ddpm-tiny",
                          "params": {"samples": 3, "steps": 3, "start_t": 150, "recon_subsets": 4}},
             "output": {"series_description_suffix": " [bcdpm]"},
             "destinations": [{"ae_title": "SINK", "host": "127.0.0.1", "port": port, "send": ["derived", "maps"]}]}]


def test_a_bcdpm_route_returns_the_denoised_series_and_the_uncertainty_maps(start_node, storescp_sink: StoreSCP,
                                                                            tmp_path: Path) -> None:
    node = start_node(_rule(storescp_sink.port))
    _register(node.models, tmp_path)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    rng = np.random.default_rng(4)
    activity = (np.where(y**2 + x**2 < 0.6, 5000.0, 0.0) * rng.gamma(8, 1 / 8, SHAPE)).astype(np.float32)
    pet = make_pet_series(shape=SHAPE, spacing=SPACING, activity=activity, seed=4)
    uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet, node.port) == [0] * SHAPE[0]
    assert wait_state(node, uid, ["delivered", "failed", "refused"], timeout=120) == "delivered", node.db.series(uid)
    assert storescp_sink.wait_for(2 * SHAPE[0] + 1)
    received: dict[str, list[Any]] = {}
    for f in storescp_sink.files():
        ds = dcmread(f)
        received.setdefault(str(ds.SOPClassUID), []).append((f, ds))
    assert sorted(received) == sorted([PET_STORAGE, SC_STORAGE, PM_STORAGE])
    derived = [ds for _, ds in received[PET_STORAGE]]
    assert len(derived) == SHAPE[0] and derived[0].SeriesDescription.endswith("[bcdpm]")
    description = str(derived[0].ContributingEquipmentSequence[0].ContributionDescription)
    assert "bcdpm" in description and "counts_per_slice" in description and "cond_steps" in description
    assert "model ddpm-tiny@1.0.0" in str(derived[0].ContributingEquipmentSequence[-1].SoftwareVersions)
    sc = [ds for _, ds in received[SC_STORAGE]]
    pm = [ds for _, ds in received[PM_STORAGE]]
    assert len(sc) == SHAPE[0] and len(pm) == 1 and int(pm[0].NumberOfFrames) == SHAPE[0]
    assert "UNCERTAINTY" in str(pm[0].ContentLabel)
    assert {str(d.StudyInstanceUID) for d in sc + pm} == {str(pet[0].StudyInstanceUID)}
    for sop_class in (PET_STORAGE, SC_STORAGE, PM_STORAGE):
        errors, _ = run_dciodvfy(received[sop_class][0][0])
        assert errors == [], (sop_class, errors)
    outputs = node.db.outputs(uid)
    assert {(o["payload"], o["format"]) for o in outputs} == {("derived", "pet"), ("maps", "sc"), ("maps", "pm")}


def test_a_map_send_claimed_while_the_run_still_holds_the_writer_sends_the_maps(
        start_node, storescp_sink: StoreSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The map sends are queued just before the run lets go of the derived series' writer. A sender that claims
    one in that moment (CI saw it under load) must send the map files, not follow the derived writer: that found
    every derived file confirmed, marked the map send done and the series delivered without its Parametric Map."""
    node = start_node(_rule(storescp_sink.port))
    _register(node.models, tmp_path)
    pet = make_pet_series(shape=SHAPE, spacing=SPACING, seed=5)
    uid = str(pet[0].SeriesInstanceUID)
    queue_map_sends = node._queue_map_sends

    def queue_and_race(*args: Any, **kwargs: Any) -> int:
        queued = queue_map_sends(*args, **kwargs)
        # Widen the window deterministically: the derived send done, the map sends claimed and looked at by the
        # sender while this run still holds the writer.
        assert wait_until(lambda: all(s["state"] == "done" for s in node.db.sends(uid) if s["kind"] == "derived"))
        node.dispatch_sends()
        assert wait_until(lambda: not node._sending, timeout=30)
        return queued

    monkeypatch.setattr(node, "_queue_map_sends", queue_and_race)
    assert send_datasets(pet, node.port) == [0] * SHAPE[0]
    assert wait_state(node, uid, ["delivered", "failed", "refused"], timeout=120) == "delivered", node.db.series(uid)
    classes = sorted(str(dcmread(f).SOPClassUID) for f in storescp_sink.files())
    assert classes.count(PM_STORAGE) == 1 and classes.count(SC_STORAGE) == SHAPE[0], (classes, node.db.sends(uid))
    assert classes.count(PET_STORAGE) == SHAPE[0]
