"""Proves the external-tool wrappers in tests/dicomtools.py work against the real programs."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.dicomtools import (
    LOOPBACK,
    Orthanc,
    OrthancError,
    StoreSCP,
    echoscu,
    free_port,
    have_tool,
    require_tool,
    run_dciodvfy,
    storescu,
)


def _sc_image(series_uid: str, study_uid: str, number: int) -> Dataset:
    """A tiny Secondary Capture image that dciodvfy accepts with no errors and no warnings (checked by hand)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Tools^Test"
    ds.PatientID = "TOOLS1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Modality = "OT"
    # An unpaired body part: without it dciodvfy wants Laterality (Type 2C it cannot evaluate).
    ds.BodyPartExamined = "CHEST"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = number
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(16, dtype=np.uint16).reshape(4, 4) + number).tobytes()
    return ds


def _write_series(directory: Path, count: int) -> tuple[str, list[Path]]:
    directory.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        path = directory / f"{number:04d}.dcm"
        _sc_image(series_uid, study_uid, number).save_as(path, enforce_file_format=True)
        paths.append(path)
    return series_uid, paths


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# -- generic helpers ------------------------------------------------------------------------------------------------


def test_free_port_can_be_bound_on_loopback() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))


def test_require_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "petnode-no-such-tool-xyz"
    assert not have_tool(missing)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must not skip"):
        require_tool(missing)


def test_require_tool_returns_the_path_of_an_installed_tool() -> None:
    assert Path(require_tool("sh")).is_file()


# -- dciodvfy ----------------------------------------------------------------------------------------------------


def test_dciodvfy_accepts_a_valid_file(tmp_path: Path) -> None:
    _, (path,) = _write_series(tmp_path, 1)
    errors, warnings = run_dciodvfy(path)
    print("dciodvfy warnings:", *warnings, sep="\n  ")
    assert errors == []


def test_dciodvfy_reports_a_missing_type1_attribute(tmp_path: Path) -> None:
    ds = _sc_image(generate_uid(), generate_uid(), 1)
    del ds.Rows
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = run_dciodvfy(path)
    assert any("<Rows>" in line for line in errors), errors


def test_dciodvfy_reports_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"garbage, not DICOM\n")
    errors, _ = run_dciodvfy(path)
    assert errors


def test_dciodvfy_missing_file_raises(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    with pytest.raises(FileNotFoundError):
        run_dciodvfy(tmp_path / "absent.dcm")


# -- storescp / storescu / echoscu ---------------------------------------------------------------------------------


@pytest.mark.network
def test_storescu_sends_a_directory_to_storescp(tmp_path: Path, storescp_sink: StoreSCP) -> None:
    _, paths = _write_series(tmp_path / "src", 5)
    result = storescu(tmp_path / "src", LOOPBACK, storescp_sink.port, called_ae="SINK")
    assert result.returncode == 0, result.stderr
    assert storescp_sink.wait_for(5, timeout=10)
    received = storescp_sink.files()
    assert len(received) == 5
    assert _sop_uids(received) == _sop_uids(paths)
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in received}
    for path in paths:
        original = pydicom.dcmread(path)
        assert by_uid[str(original.SOPInstanceUID)].PixelData == original.PixelData


@pytest.mark.network
def test_storescu_file_list_and_echoscu(tmp_path: Path, storescp_sink: StoreSCP) -> None:
    assert echoscu(LOOPBACK, storescp_sink.port, called_ae="SINK").returncode == 0
    _, paths = _write_series(tmp_path / "src", 3)
    result = storescu(paths[:2], LOOPBACK, storescp_sink.port, called_ae="SINK", calling_ae="TESTSCU")
    assert result.returncode == 0, result.stderr
    assert storescp_sink.wait_for(2, timeout=10)
    assert _sop_uids(storescp_sink.files()) == _sop_uids(paths[:2])


@pytest.mark.network
def test_storescp_wait_for_returns_false_on_timeout(storescp_sink: StoreSCP) -> None:
    assert not storescp_sink.wait_for(1, timeout=0.1)
    assert storescp_sink.files() == []


@pytest.mark.network
def test_storescp_is_stopped_when_the_body_raises(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        with scp:
            proc, port = scp._proc, scp.port
            assert proc is not None and proc.poll() is None
            raise RuntimeError("boom")
    assert proc.poll() is not None
    assert echoscu(LOOPBACK, port, called_ae="STORESCP").returncode != 0


def test_storescp_treats_the_file_being_written_as_incomplete(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "out")
    scp.log_path.write_text(
        "I: Association Received\nI: Received Store Request (MsgID 1, SC)\nRECV: .\n"
        "I: storing DICOM file: out/SC.1.2.3.dcm\nI: Received Store Request (MsgID 2, SC)\n"
        "I: storing DICOM file: out/SC.1.2.4.dcm\nW: DICOM file already exists, overwriting: out/SC.1.2.4.dcm\n"
    )
    assert scp._in_flight() == Path("out/SC.1.2.4.dcm")
    with scp.log_path.open("a") as log:
        log.write("I: Association Release\n")
    assert scp._in_flight() is None


# -- Orthanc -----------------------------------------------------------------------------------------------------


@pytest.mark.network
def test_orthanc_starts_without_plugins_and_lists_an_upload(tmp_path: Path, orthanc: Orthanc) -> None:
    system = orthanc.system()
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert set(orthanc.rest("GET", "/plugins")) <= {"explorer.js"}  # built in; no .so plugin loaded
    assert orthanc.startup_s is not None
    print(f"Orthanc started in {orthanc.startup_s:.2f} s")

    series_uid, paths = _write_series(tmp_path, 3)
    answers = orthanc.upload_all(paths)
    assert {a["Status"] for a in answers} == {"Success"}
    assert orthanc.series() == [answers[0]["ParentSeries"]]

    found = orthanc.find_series(series_uid)
    assert found is not None and found["ID"] == answers[0]["ParentSeries"]
    assert found["MainDicomTags"]["SeriesInstanceUID"] == series_uid
    instances = orthanc.series_instances(found["ID"])
    assert len(instances) == 3
    assert {orthanc.instance_tags(i["ID"])["SOPInstanceUID"] for i in instances} == _sop_uids(paths)
    assert pydicom.dcmread(io.BytesIO(orthanc.instance_file(instances[0]["ID"]))).SeriesInstanceUID
    assert orthanc.find_series(generate_uid()) is None


@pytest.mark.network
def test_orthanc_receives_from_storescu_and_answers_echo(tmp_path: Path, orthanc: Orthanc) -> None:
    assert echoscu(LOOPBACK, orthanc.dicom_port, called_ae="ORTHANC").returncode == 0
    series_uid, paths = _write_series(tmp_path, 4)
    result = storescu(paths, LOOPBACK, orthanc.dicom_port, called_ae="ORTHANC")
    assert result.returncode == 0, result.stderr
    series = orthanc.wait_for_series(
        lambda s: s["MainDicomTags"].get("SeriesInstanceUID") == series_uid and len(s["Instances"]) == 4,
        timeout=10,
    )
    assert series is not None
    assert orthanc.wait_for_series(lambda s: False, timeout=0.05) is None


@pytest.mark.network
def test_orthanc_stores_to_a_storescp_peer(tmp_path: Path, orthanc: Orthanc, storescp_sink: StoreSCP) -> None:
    orthanc.add_modality("SINK", "SINK", LOOPBACK, storescp_sink.port)
    orthanc.echo_modality("SINK")
    series_uid, paths = _write_series(tmp_path, 3)
    answers = orthanc.upload_all(paths)
    job = orthanc.store_to_modality("SINK", answers[0]["ParentSeries"])
    assert job["InstancesCount"] == 3 and job["FailedInstancesCount"] == 0
    # Synchronous store: every C-STORE was answered, so storescp has finished writing all files.
    assert storescp_sink.wait_for(3, timeout=5)
    assert _sop_uids(storescp_sink.files()) == _sop_uids(paths)


@pytest.mark.network
@pytest.mark.slow
def test_orthanc_modalities_from_config(storescp_sink: StoreSCP) -> None:
    with Orthanc(modalities={"PETNODE": ("PETNODE", LOOPBACK, storescp_sink.port)}) as server:
        server.echo_modality("PETNODE")
        server.add_modality("PETNODE", "ELSEWHERE", LOOPBACK, 104)
        server.add_modality("EXTRA", "EXTRA", LOOPBACK, 104)
        server.reset()
        modalities = server.rest("GET", "/modalities?expand")
        assert set(modalities) == {"PETNODE"} and modalities["PETNODE"]["AET"] == "PETNODE"
        server.echo_modality("PETNODE")


@pytest.mark.network
def test_orthanc_reset_empties_the_shared_server(tmp_path: Path, orthanc: Orthanc) -> None:
    _, paths = _write_series(tmp_path, 2)
    orthanc.upload_all(paths)
    orthanc.add_modality("EXTRA", "EXTRA", LOOPBACK, 104)
    assert orthanc.series()
    orthanc.reset()
    assert orthanc.series() == []
    assert orthanc.rest("GET", "/modalities") == []


@pytest.mark.network
def test_orthanc_rest_errors_raise(orthanc: Orthanc) -> None:
    with pytest.raises(OrthancError) as info:
        orthanc.rest("GET", "/series/does-not-exist")
    assert info.value.status == 404
    with pytest.raises(OrthancError):
        orthanc.echo_modality("NOPE")
    # A registered peer that is not listening fails too.
    orthanc.add_modality("DEAD", "DEAD", LOOPBACK, free_port())
    with pytest.raises(OrthancError):
        orthanc.echo_modality("DEAD")


@pytest.mark.network
@pytest.mark.slow
def test_orthanc_is_stopped_and_removed_when_the_body_raises() -> None:
    server = Orthanc()
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            proc, workdir, dicom_port = server._proc, server.workdir, server.dicom_port
            assert proc is not None and workdir is not None and (workdir / "storage").is_dir()
            raise RuntimeError("boom")
    assert proc.poll() is not None
    assert not workdir.exists()
    assert echoscu(LOOPBACK, dicom_port, called_ae="ORTHANC").returncode != 0
