"""Whole path over real loopback associations: scanner (pynetdicom or DCMTK) -> petnode -> storescp / Orthanc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.conftest import wait_until
from tests.dicomtools import Orthanc, StoreSCP, run_dciodvfy, storescu
from tests.e2e.conftest import pet_rule, send_datasets, wait_state
from tests.factories import make_pet_series, write_series

pytestmark = pytest.mark.network


def _check_derived(files: list[Path], source_dir_or_datasets: list, *, expect_count: int) -> str:
    """Every file is a valid derived PET of the source study; returns the derived series UID."""
    assert len(files) == expect_count
    derived = [dcmread(f) for f in files]
    series_uids = {str(d.SeriesInstanceUID) for d in derived}
    assert len(series_uids) == 1
    src = source_dir_or_datasets[0]
    assert series_uids != {str(src.SeriesInstanceUID)}
    for d in derived:
        assert d.StudyInstanceUID == src.StudyInstanceUID
        assert d.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert d.ImageType[0] == "DERIVED"
        assert d.Units == src.Units
    return series_uids.pop()


def _dciodvfy_all(files: list[Path]) -> None:
    warnings: set[str] = set()
    for f in files:
        errors, warns = run_dciodvfy(f)
        assert errors == [], f"{f.name}: {errors}"
        warnings.update(warns)
    print(f"dciodvfy: 0 errors on {len(files)} files; distinct warnings ({len(warnings)}):")
    for w in sorted(warnings):
        print("  ", w)


def _activity(datasets: list) -> float:
    return float(sum(np.sum(d.pixel_array * float(d.RescaleSlope) + float(d.get("RescaleIntercept", 0)))
                     for d in datasets))


def test_pynetdicom_synthetic_to_storescp_and_orthanc(start_node, storescp_sink: StoreSCP, orthanc: Orthanc):
    datasets = make_pet_series(shape=(12, 32, 32), seed=3)
    node = start_node(
        [pet_rule([{"peer": "sink"}, {"peer": "pacs"}])],
        peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port},
               {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    assert send_datasets(datasets, node.port) == [0] * 12
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)
    assert storescp_sink.wait_for(12, timeout=30)
    files = storescp_sink.files()
    derived_uid = _check_derived(files, datasets, expect_count=12)
    # Quantitation end to end: the derived series carries the same total activity.
    assert _activity([dcmread(f) for f in files]) == pytest.approx(_activity(datasets), rel=2e-3)
    _dciodvfy_all(files)
    found = orthanc.wait_for_series(lambda s: s["MainDicomTags"]["SeriesInstanceUID"] == derived_uid, timeout=30)
    assert found is not None and len(found["Instances"]) == 12


def test_storescu_real_series_to_orthanc(realdata: Path, start_node, orthanc: Orthanc, storescp_sink: StoreSCP):
    """The real 267-slice whole-body series from DCMTK storescu; the derived series lands in Orthanc's study."""
    src_dir = realdata / "mirp_tcia_sts_001_fdg_pet" / "PT_AC"
    sources = sorted(src_dir.rglob("*.dcm")) or sorted(p for p in src_dir.rglob("*") if p.is_file())
    first = dcmread(sources[0], stop_before_pixels=True)
    node = start_node(
        [pet_rule([{"peer": "pacs"}, {"peer": "sink"}])],
        peers=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
               {"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}],
    )
    orthanc.add_modality("PETNODE", "PETNODE", "127.0.0.1", node.port)
    result = storescu([src_dir], "127.0.0.1", node.port, called_ae="PETNODE", calling_ae="SCANNER")
    assert result.returncode == 0, result.stderr[-2000:]
    uid = str(first.SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"], timeout=120) == "delivered", node.db.series(uid)
    derived_uid = node.db.series(uid)["output_series_uid"]
    # Processing took every slice the handler had decoded on receipt instead of reading it back from disk.
    assert (node.decoded.hits, node.decoded.misses, node.decoded.size_bytes) == (267, 0, 0)
    found = orthanc.wait_for_series(lambda s: s["MainDicomTags"]["SeriesInstanceUID"] == derived_uid, timeout=60)
    assert found is not None and len(found["Instances"]) == len(sources) == 267
    study = orthanc.rest("GET", f"/studies/{found['ParentStudy']}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == first.StudyInstanceUID
    assert storescp_sink.wait_for(267, timeout=60)
    _dciodvfy_all(storescp_sink.files())


def test_storescu_synthetic_and_petnode_send_real(realdata: Path, start_node, storescp_sink: StoreSCP,
                                                  tmp_path: Path):
    """DCMTK sends a synthetic series, the pynetdicom `petnode send` CLI the real ACRIN PET: both come back."""
    from dicom_node.cli import main

    node = start_node([pet_rule([{"peer": "sink"}])],
                      peers=[{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": storescp_sink.port}])
    synthetic = make_pet_series(shape=(10, 24, 24), seed=5)
    write_series(synthetic, tmp_path / "synthetic")
    result = storescu([tmp_path / "synthetic"], "127.0.0.1", node.port, called_ae="PETNODE")
    assert result.returncode == 0, result.stderr[-2000:]

    acrin = realdata / "ohif_acrin_nsclc_fdg_pet_042" / "PT_AC"
    assert main(["send", str(acrin), "--to", f"PETNODE@127.0.0.1:{node.port}", "--calling-ae", "SCANNER"]) == 0
    acrin_first = dcmread(next(p for p in sorted(acrin.rglob("*")) if p.is_file()), stop_before_pixels=True)

    for uid in (str(synthetic[0].SeriesInstanceUID), str(acrin_first.SeriesInstanceUID)):
        assert wait_state(node, uid, ["delivered", "failed"], timeout=120) == "delivered", node.db.series(uid)
    assert storescp_sink.wait_for(10 + 135, timeout=60)
    by_series: dict[str, list] = {}
    for f in storescp_sink.files():
        d = dcmread(f)
        by_series.setdefault(str(d.SeriesInstanceUID), []).append(d)
    derived_acrin = by_series[node.db.series(str(acrin_first.SeriesInstanceUID))["output_series_uid"]]
    assert len(derived_acrin) == 135
    # SUV stays right: the derived series' SUV attributes give the same SUVbw factor as the RWV oracle.
    from dicom_node.series import compute_suv_bw_factor

    assert compute_suv_bw_factor(derived_acrin[0]) == pytest.approx(4.2111e-4, rel=1e-3)
    assert wait_until(lambda: len(by_series) == 2)


def test_orthanc_pushes_study_and_gets_derived_back(start_node, orthanc: Orthanc, tmp_path: Path):
    """Orthanc as the sender (REST /modalities/PETNODE/store); petnode returns the result to the sender."""
    node = start_node([pet_rule(["return_to_sender"])],
                      peers=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                              "port": orthanc.dicom_port}])
    orthanc.add_modality("PETNODE", "PETNODE", "127.0.0.1", node.port)
    datasets = make_pet_series(shape=(9, 24, 24), seed=7)
    uploaded = orthanc.upload_all(write_series(datasets, tmp_path / "series"))
    study_id = uploaded[0]["ParentStudy"]
    answer = orthanc.store_to_modality("PETNODE", [study_id])
    assert answer.get("FailedInstancesCount", 0) == 0
    uid = str(datasets[0].SeriesInstanceUID)
    assert wait_state(node, uid, ["delivered", "failed"]) == "delivered", node.db.series(uid)
    assert node.db.series(uid)["calling_ae"] == "ORTHANC"
    derived_uid = node.db.series(uid)["output_series_uid"]
    found = orthanc.wait_for_series(lambda s: s["MainDicomTags"]["SeriesInstanceUID"] == derived_uid, timeout=30)
    assert found is not None and len(found["Instances"]) == 9
    assert found["ParentStudy"] == study_id  # the same study in the PACS
