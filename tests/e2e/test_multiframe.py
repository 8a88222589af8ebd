"""A multi-frame PET series through the whole node: an Enhanced PET instance in, a classic derived series out."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.series import ENHANCED_PET_IMAGE_STORAGE, compute_suv_bw_factor
from tests.dicomtools import StoreSCP, run_dciodvfy
from tests.e2e.conftest import pet_rule, send_datasets, wait_state
from tests.factories import make_enhanced_pet_series, make_pet_series

pytestmark = pytest.mark.network


def test_enhanced_pet_instance_comes_back_as_a_derived_classic_series(start_node, storescp_sink: StoreSCP):
    classic = make_pet_series(shape=(9, 32, 32), seed=8)
    enhanced = make_enhanced_pet_series(classic, reverse_frames=True)
    assert len(enhanced) == 1 and int(enhanced[0].NumberOfFrames) == 9
    node = start_node(
        [pet_rule([{"peer": "sink"}])],
        peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}],
    )
    assert send_datasets(enhanced, node.port) == [0]
    # One instance without NumberOfSlices: complete after the quiet period, then processed and sent.
    uid = str(enhanced[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)
    assert storescp_sink.wait_for(9, timeout=30)

    derived = [dcmread(f) for f in storescp_sink.files()]
    assert len(derived) == 9
    assert {d.SeriesInstanceUID for d in derived} == {node.db.series(uid)["output_series_uid"]}
    frames = sorted(int(d.SourceImageSequence[0].ReferencedFrameNumber) for d in derived)
    assert frames == list(range(1, 10))
    for d in derived:
        ref = d.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == enhanced[0].SOPInstanceUID
        assert ref.ReferencedSOPClassUID == ENHANCED_PET_IMAGE_STORAGE
        assert d.SOPClassUID == classic[0].SOPClassUID  # classic PET Image Storage
        assert d.StudyInstanceUID == classic[0].StudyInstanceUID
        assert d.FrameOfReferenceUID == classic[0].FrameOfReferenceUID
        assert d.ImageType[0] == "DERIVED" and d.Units == "BQML"
        # SUV stays right: the derived headers give the classic series' SUVbw factor.
        assert compute_suv_bw_factor(d) == pytest.approx(compute_suv_bw_factor(classic[0]), rel=1e-12)
    # Frame k of the head-first instance is the classic slice 9 - k, at the same position.
    by_position = {tuple(float(v) for v in c.ImagePositionPatient): c for c in classic}
    for d in derived:
        assert tuple(float(v) for v in d.ImagePositionPatient) in by_position
    total = sum(float(np.sum(d.pixel_array * float(d.RescaleSlope))) for d in derived)
    expected = sum(float(np.sum(c.pixel_array * float(c.RescaleSlope))) for c in classic)
    assert total == pytest.approx(expected, rel=2e-3)  # the Gaussian keeps total activity
    for f in storescp_sink.files():
        errors, _ = run_dciodvfy(f)
        assert errors == [], f"{f.name}: {errors}"


def test_enhanced_pet_in_several_instances_completes_and_is_processed(start_node):
    """Positions of multi-frame instances live in their frames: completion must not call them non-contiguous."""
    classic = make_pet_series(shape=(8, 8, 8), seed=77)
    enhanced = make_enhanced_pet_series(classic, instances=3)
    node = start_node([pet_rule([{"ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}])])
    assert send_datasets(enhanced, node.port) == [0] * 3
    uid = str(enhanced[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["incomplete", "sending", "failed", "delivered"]) == "sending", node.db.series(uid)
