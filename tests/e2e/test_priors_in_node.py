"""Prior-guided processing in a running node: the PET waits for its MR, the derived PET and the stability map
(Secondary Capture and Parametric Map) go to a real DCMTK peer; without an MR the rule's fallback applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.outputs.derived_pet import is_petnode_output
from tests.dicomtools import StoreSCP, run_dciodvfy
from tests.e2e.conftest import send_datasets, wait_state
from tests.factories import make_mr_series, make_pet_series

pytestmark = pytest.mark.network

SHAPE = (10, 24, 24)
SPACING = (3.0, 3.0, 3.0)
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PM_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
# A tiny, quick conditional DIP (the method's own tests cover its numerics).
CDIP = {"name": "cdip", "params": {"prior": "mr", "features": 4, "depth": 2, "epochs": 12, "sample_from": 6,
                                   "sample_every": 2}}


def _brain(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A head-like PET activity and a T1-like MR of the same anatomy (MR contrast differs)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    head = (z / 1.1) ** 2 + y ** 2 + x ** 2 < 0.8
    core = (z / 1.1) ** 2 + y ** 2 + x ** 2 < 0.35
    rng = np.random.default_rng(seed)
    pet = np.where(core, 8000.0, np.where(head, 4000.0, 0.0)) * rng.gamma(50, 1 / 50, SHAPE)
    mr = np.where(core, 900.0, np.where(head, 2000.0, 0.0))
    return pet.astype(np.float32), mr.astype(np.float32)


def _study(seed: int, mr_for_same: bool = True) -> tuple[list[Any], list[Any]]:
    study, frame = generate_uid(), generate_uid()
    pet, mr = _brain(seed)
    pet_series = make_pet_series(shape=SHAPE, spacing=SPACING, activity=pet, study_uid=study, for_uid=frame,
                                 seed=seed, series_description="PET Brain")
    mr_series = make_mr_series(shape=SHAPE, spacing=SPACING, intensity=mr, study_uid=study,
                               for_uid=frame if mr_for_same else generate_uid(), seed=seed,
                               series_description="T1 MPRAGE")
    return pet_series, mr_series


def _rule(sink_port: int, prior: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "pet-mr-cdip", "match": {"modality": ["PT"]}, "denoiser": CDIP, "prior": prior,
             "output": {"series_description_suffix": " [cdip]"},
             "destinations": [{"ae_title": "SINK", "host": "127.0.0.1", "port": sink_port,
                               "send": ["derived", "maps"]}]}]


def _by_series(sink: StoreSCP) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f in sink.files():
        ds = dcmread(f)
        out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


@pytest.mark.parametrize("order", ["pet_first", "mr_first"])
def test_pet_and_mr_in_either_order_give_derived_pet_and_both_maps(start_node, storescp_sink: StoreSCP,
                                                                    order: str) -> None:
    node = start_node(_rule(storescp_sink.port, {"modality": "MR", "match": {"series_description": "(?i)t1"},
                                                 "wait_s": 120, "fallback": "none"}))
    pet, mr = _study(3)
    pet_uid, mr_uid = str(pet[0].SeriesInstanceUID), str(mr[0].SeriesInstanceUID)
    first, second = (pet, mr) if order == "pet_first" else (mr, pet)
    assert send_datasets(first, node.port) == [0] * len(first)
    if order == "pet_first":
        assert wait_state(node, pet_uid, ["waiting_prior"]) == "waiting_prior", node.db.series(pet_uid)
        assert "waiting for its MR prior" in (node.db.series(pet_uid)["error"] or "")
    assert send_datasets(second, node.port) == [0] * len(second)
    assert wait_state(node, pet_uid, ["delivered", "failed", "refused"], timeout=120) == "delivered", \
        node.db.series(pet_uid)
    row = node.db.series(pet_uid)
    assert row["prior_series_uid"] == mr_uid

    received = _by_series(storescp_sink)
    derived = received.pop(row["output_series_uid"])
    assert len(derived) == SHAPE[0] and all(d.SOPClassUID == PET_STORAGE for d in derived)
    related = {str(item.SeriesInstanceUID) for item in derived[0].RelatedSeriesSequence}
    assert related == {pet_uid, mr_uid}  # the source PET and the MR prior
    assert "cdip" in derived[0].ContributingEquipmentSequence[0].ContributionDescription
    assert "mr_prior" in derived[0].ContributingEquipmentSequence[0].ContributionDescription
    # The two map series: the SC one image per PET slice, the PM one multi-frame instance.
    classes = {uid: {str(d.SOPClassUID) for d in ds} for uid, ds in received.items()}
    assert sorted(classes.values(), key=str) == sorted([{SC_STORAGE}, {PM_STORAGE}], key=str), (
        classes, [f.name for f in storescp_sink.files()], node.db.sends(pet_uid), storescp_sink.log_text()[-3000:])
    sc = next(ds for ds in received.values() if str(ds[0].SOPClassUID) == SC_STORAGE)
    pm = next(ds for ds in received.values() if str(ds[0].SOPClassUID) == PM_STORAGE)
    assert len(sc) == SHAPE[0] and len(pm) == 1 and int(pm[0].NumberOfFrames) == SHAPE[0]
    assert all(is_petnode_output(d) for d in sc + pm)  # the loop guard knows them
    assert {str(d.StudyInstanceUID) for d in sc + pm} == {str(pet[0].StudyInstanceUID)}
    outputs = node.db.outputs(pet_uid)
    assert {(o["payload"], o["format"]) for o in outputs} == {("derived", "pet"), ("maps", "sc"), ("maps", "pm")}
    for o in outputs:
        assert node.db.is_own_output(o["output_series_uid"])
    # The MR itself matched no rule: kept (it was the prior), nothing sent for it.
    assert node.db.series(mr_uid)["state"] == "unrouted"


def test_maps_from_the_node_pass_dciodvfy(start_node, storescp_sink: StoreSCP) -> None:
    node = start_node(_rule(storescp_sink.port, {"modality": "MR", "wait_s": 60}))
    pet, mr = _study(5)
    assert send_datasets(mr, node.port) == [0] * len(mr)
    assert send_datasets(pet, node.port) == [0] * len(pet)
    pet_uid = str(pet[0].SeriesInstanceUID)
    assert wait_state(node, pet_uid, ["delivered", "failed", "refused"], timeout=120) == "delivered"
    checked = set()
    for f in storescp_sink.files():
        sop_class = str(dcmread(f, stop_before_pixels=True).SOPClassUID)
        if sop_class in checked:
            continue
        errors, _ = run_dciodvfy(f)
        assert errors == [], (sop_class, errors)
        checked.add(sop_class)
    assert checked == {PET_STORAGE, SC_STORAGE, PM_STORAGE}


def test_the_mr_never_comes_and_the_fallback_runs(start_node, storescp_sink: StoreSCP) -> None:
    node = start_node(_rule(storescp_sink.port, {"modality": "MR", "wait_s": 1.5,
                                                 "fallback": {"name": "gaussian", "params": {"fwhm_mm": 6.0}}}))
    pet, _ = _study(7)
    pet_uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet, node.port) == [0] * len(pet)
    assert wait_state(node, pet_uid, ["waiting_prior"]) == "waiting_prior"
    assert wait_state(node, pet_uid, ["delivered", "failed", "refused"], timeout=60) == "delivered"
    row = node.db.series(pet_uid)
    assert row["prior_series_uid"] is None
    derived = _by_series(storescp_sink)[row["output_series_uid"]]
    text = str(derived[0].ContributingEquipmentSequence[0].ContributionDescription)
    assert text.startswith("gaussian denoising") and "mr_prior" not in text
    assert {str(i.SeriesInstanceUID) for i in derived[0].RelatedSeriesSequence} == {pet_uid}
    assert len(_by_series(storescp_sink)) == 1  # no maps: Gaussian makes none


def test_no_mr_and_no_fallback_is_refused_with_its_reason(start_node, storescp_sink: StoreSCP) -> None:
    node = start_node(_rule(storescp_sink.port, {"modality": "MR", "wait_s": 0.5, "fallback": "none",
                                                 "match": {"series_description": "(?i)t1|mprage"}}))
    pet, mr = _study(9)
    # An MR of the study that is not the prior the rule asks for (a T2).
    for ds in mr:
        ds.SeriesDescription = "T2 FLAIR"
    assert send_datasets(mr, node.port) == [0] * len(mr)
    pet_uid = str(pet[0].SeriesInstanceUID)
    assert send_datasets(pet, node.port) == [0] * len(pet)
    assert wait_state(node, pet_uid, ["delivered", "failed", "refused"], timeout=60) == "refused"
    assert "no MR prior arrived within 0.5 s" in node.db.series(pet_uid)["error"]
    assert storescp_sink.files() == []


def test_an_mr_from_another_scanner_is_registered(start_node, storescp_sink: StoreSCP, tmp_path: Path) -> None:
    node = start_node(_rule(storescp_sink.port, {"modality": "MR", "wait_s": 60}))
    pet, mr = _study(11, mr_for_same=False)  # another Frame of Reference: the node must register it
    assert send_datasets(mr, node.port) == [0] * len(mr)
    assert send_datasets(pet, node.port) == [0] * len(pet)
    pet_uid = str(pet[0].SeriesInstanceUID)
    state = wait_state(node, pet_uid, ["delivered", "failed", "refused"], timeout=120)
    assert state == "delivered", node.db.series(pet_uid)
    derived = _by_series(storescp_sink)[node.db.series(pet_uid)["output_series_uid"]]
    assert "rigid" in str(derived[0].ContributingEquipmentSequence[0].ContributionDescription)
